//! Adaptive limits: while the server shows distress (its own kernel drops
//! handshakes because the listen queues overflow, or SYN queues fill), the
//! agent tightens the per-source rate and burst one step at a time, never
//! below a floor, and relaxes them one step per calm period once it stops.
//!
//! The signal is the server namespace's own TCP counters: they measure the
//! harm (connections the server could not take) rather than a traffic
//! pattern, so a flood of many sources each under the static cap still
//! shows up.

use std::time::{Duration, Instant};

use guard_common::LiveConfig;

/// Highest tightening step; at 25 % per step that is ~6 % of the base.
pub const MAX_LEVEL: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveSettings {
    pub enabled: bool,
    pub floor_syn_rate: u32,
    pub floor_syn_burst: u32,
    pub step_percent: u32,
    pub calm: Duration,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            floor_syn_rate: 5,
            floor_syn_burst: 10,
            step_percent: 25,
            calm: Duration::from_secs(30),
        }
    }
}

/// `base` shrunk by `step_percent` per level, never below `floor` (nor
/// above `base`, if the floor is set higher than the configured value).
pub fn scaled(base: u32, floor: u32, step_percent: u32, level: u32) -> u32 {
    let keep = 100u64.saturating_sub(step_percent.min(99) as u64);
    let mut v = base as u64;
    for _ in 0..level.min(MAX_LEVEL) {
        v = v * keep / 100;
    }
    (v as u32).max(floor.min(base))
}

/// The config the kernel runs with at `level`: the operator's `base` with
/// the per-source rate and burst tightened.
pub fn effective(base: &LiveConfig, s: &AdaptiveSettings, level: u32) -> LiveConfig {
    if level == 0 || !s.enabled || !base.source_cap_enabled() {
        return *base;
    }
    LiveConfig {
        syn_rate: scaled(base.syn_rate, s.floor_syn_rate, s.step_percent, level),
        syn_burst: scaled(base.syn_burst, s.floor_syn_burst, s.step_percent, level).max(1),
        ..*base
    }
}

/// Decides the level from one distress reading per tick.
#[derive(Debug)]
pub struct Controller {
    pub level: u32,
    last_distress: Option<Instant>,
    last_change: Option<Instant>,
}

impl Controller {
    pub fn new() -> Self {
        Self {
            level: 0,
            last_distress: None,
            last_change: None,
        }
    }

    /// Returns the new level when it changes.
    pub fn tick(&mut self, distressed: bool, now: Instant, calm: Duration) -> Option<u32> {
        if distressed {
            self.last_distress = Some(now);
            if self.level < MAX_LEVEL {
                self.level += 1;
                self.last_change = Some(now);
                return Some(self.level);
            }
            return None;
        }
        if self.level == 0 {
            return None;
        }
        let quiet_since = match (self.last_distress, self.last_change) {
            (Some(d), Some(c)) => d.max(c),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return None,
        };
        if now.duration_since(quiet_since) >= calm {
            self.level -= 1;
            self.last_change = Some(now);
            return Some(self.level);
        }
        None
    }
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

/// The namespace's handshake-loss counters, summed: accept-queue overflows
/// and drops, and SYNs dropped because the SYN queue was full.
pub fn parse_distress_counters(netstat: &str) -> u64 {
    const WANTED: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPReqQFullDrop"];
    let mut total = 0;
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let (Some(("TcpExt", names)), Some(("TcpExt", values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if WANTED.contains(&name) {
                total += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Reads the counters of the namespace this process runs in.
pub fn read_distress_counters() -> std::io::Result<u64> {
    Ok(parse_distress_counters(&std::fs::read_to_string(
        "/proc/net/netstat",
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_steps_down_to_the_floor() {
        assert_eq!(scaled(100, 5, 25, 0), 100);
        assert_eq!(scaled(100, 5, 25, 1), 75);
        assert_eq!(scaled(100, 5, 25, 2), 56);
        assert_eq!(scaled(100, 5, 25, 10), 5);
        assert_eq!(
            scaled(100, 5, 25, 1000),
            5,
            "levels past the maximum change nothing"
        );
        assert_eq!(
            scaled(3, 5, 25, 4),
            3,
            "a floor above the base keeps the base"
        );
        assert_eq!(scaled(u32::MAX, 0, 99, 10), 0);
    }

    #[test]
    fn effective_touches_only_rate_and_burst() {
        let s = AdaptiveSettings {
            enabled: true,
            ..Default::default()
        };
        let base = LiveConfig {
            syn_rate: 40,
            syn_burst: 80,
            aggregate_burst: 100,
            ..LiveConfig::DEFAULT
        };
        let e = effective(&base, &s, 2);
        assert_eq!((e.syn_rate, e.syn_burst), (22, 45));
        assert_eq!(
            LiveConfig {
                syn_rate: 40,
                syn_burst: 80,
                ..e
            },
            base
        );
        assert_eq!(effective(&base, &s, 0), base);
        let off = AdaptiveSettings::default();
        assert_eq!(effective(&base, &off, 5), base, "disabled: never tightens");
        let uncapped = LiveConfig {
            syn_burst: 0,
            ..base
        };
        assert_eq!(
            effective(&uncapped, &s, 5),
            uncapped,
            "a cap that is off stays off"
        );
    }

    #[test]
    fn tightens_on_distress_and_relaxes_one_step_per_calm_period() {
        let calm = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = Controller::new();
        assert_eq!(c.tick(false, at(0), calm), None);
        assert_eq!(c.tick(true, at(1), calm), Some(1));
        assert_eq!(c.tick(true, at(2), calm), Some(2));
        assert_eq!(
            c.tick(false, at(20), calm),
            None,
            "not calm for long enough"
        );
        assert_eq!(c.tick(false, at(32), calm), Some(1));
        assert_eq!(
            c.tick(false, at(40), calm),
            None,
            "one step per calm period"
        );
        assert_eq!(c.tick(false, at(62), calm), Some(0));
        assert_eq!(c.tick(false, at(200), calm), None);
        for s in 0..20 {
            c.tick(true, at(300 + s), calm);
        }
        assert_eq!(c.level, MAX_LEVEL);
    }

    #[test]
    fn netstat_parsing_sums_the_handshake_loss_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPReqQFullDrop\n\
                    TcpExt: 3 10 12 4\n\
                    IpExt: InNoRoutes ListenDrops\n\
                    IpExt: 0 99\n";
        assert_eq!(parse_distress_counters(text), 26);
        assert_eq!(parse_distress_counters("garbage"), 0);
    }
}
