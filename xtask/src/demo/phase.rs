//! What one run of a scenario measured, and the report the runs make.
#![cfg(feature = "lab")]

use guard_tests::fleet::FleetDemo;
use serde::Serialize;

use super::scenarios::*;
use guard_tests::stack::{
    audit_ts_unix, Adaptive, AppOptions, Counters, LegitOutcome, Sample, SLICE_SECS,
};

/// One run of a scenario.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Phase {
    pub(super) guard: bool,
    /// Legit connection attempts that succeeded, in percent, and the counts.
    pub(super) legit_success_pct: f64,
    pub(super) legit_connects_ok: u64,
    pub(super) legit_connects: u64,
    /// Chat messages and feed events that reached legit clients.
    pub(super) legit_delivered: u64,
    /// The probe's connects whose first SYN did not make it.
    pub(super) lost_syn: u64,
    pub(super) probe_connects: u64,
    /// Mean CPU the server side used (its packet thread, the app and the agent, in
    /// percent of one core) while the attack ran, and before it.
    pub(super) server_cpu_pct: f64,
    pub(super) server_cpu_before_pct: f64,
    /// Mean busy share of the whole server core (whoever used it), during and before.
    pub(super) core_busy_pct: f64,
    pub(super) core_busy_before_pct: f64,
    /// What the kernel program counted during the phase (with guard only).
    pub(super) kernel: Option<Counters>,
    pub(super) kernel_drops: Option<u64>,
    /// Blocks placed on a report, and their mean detection-to-kernel-block time.
    pub(super) blocks_with_latency: u64,
    pub(super) block_latency_ms: Option<f64>,
    /// The attack's window in the timeline (seconds since the legit load started).
    pub(super) attack_window: (f64, f64),
    pub(super) attacker: String,
    pub(super) attacker_detail: serde_json::Value,
    /// Audit records the agent wrote during the phase.
    pub(super) audit: Vec<serde_json::Value>,
    /// For scenarios with adaptive mode: how legit connects fared over the attack.
    pub(super) recovery: Option<Recovery>,
    /// With `--prometheus`, runs with guard: which shipped alerts were active when.
    pub(super) alerts: Option<PhaseAlerts>,
    pub(super) legit: LegitOutcome,
}

/// The lab variant of the shipped alert rules (`for:` and windows 60 times shorter, see
/// `guard_tests::deploy::lab_rules`) as the demo's Prometheus evaluated them in one phase,
/// from the attack's start until its samples had left every window.
#[derive(Debug, Clone, Serialize, Default)]
pub(super) struct PhaseAlerts {
    /// Still pending or firing when the phase began, after waiting for quiet (an earlier
    /// phase's doing, not this attack's; normally empty).
    pub(super) before: Vec<String>,
    /// Firing at some evaluation in the window.
    pub(super) fired: Vec<String>,
    /// Pending or firing at some evaluation in the window.
    pub(super) active: Vec<String>,
    /// Every alerting rule loaded, to list the quiet ones.
    pub(super) rules: Vec<String>,
}

impl PhaseAlerts {
    /// Fired during the attack's window.
    pub(super) fn fired_during(&self) -> Vec<&str> {
        self.fired.iter().map(String::as_str).collect()
    }

    /// Whose condition held in the window but not for the rule's `for:`.
    pub(super) fn pending_only(&self) -> Vec<&str> {
        self.active
            .iter()
            .filter(|a| !self.fired.contains(a))
            .map(String::as_str)
            .collect()
    }

    /// Loaded rules never pending nor firing, before or during the window.
    pub(super) fn quiet(&self) -> Vec<&str> {
        self.rules
            .iter()
            .filter(|r| !self.before.contains(r) && !self.active.contains(r))
            .map(String::as_str)
            .collect()
    }
}

/// When legit clients got their connections back during an attack.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Recovery {
    /// Adaptive changes: seconds after the attack began, and the audit's detail.
    pub(super) steps: Vec<(f64, String)>,
    /// Whether any timeline slice during the attack completed under 99 % of its connects.
    pub(super) hurt: bool,
    /// Seconds after the attack began from which every slice to the attack's end completed
    /// at least 99 % of its connects; `None` if that never happened.
    pub(super) recovered_after_s: Option<f64>,
    /// Timeline connects from then to the attack's end: completed, attempted.
    pub(super) after_ok: u32,
    pub(super) after_all: u32,
}

impl Recovery {
    pub(super) fn measure(
        outcome: &LegitOutcome,
        audit: &[serde_json::Value],
        window: (f64, f64),
    ) -> Self {
        let (start, end) = window;
        let slice = SLICE_SECS as f64;
        let inside: Vec<&Sample> = outcome
            .timeline
            .iter()
            .filter(|s| s.t - slice >= start - 0.05 && s.t <= end + 0.05)
            .collect();
        let good = |s: &Sample| u64::from(s.connects_ok) * 100 >= u64::from(s.connects) * 99;
        // The first slice of the tail of good slices that runs to the attack's end.
        let from = inside
            .iter()
            .rposition(|s| !good(s))
            .map_or(0, |bad| bad + 1);
        let tail = &inside[from..];
        let steps = audit
            .iter()
            .filter(|r| r["event"] == "adaptive")
            .filter_map(|r| {
                let at = audit_ts_unix(r["ts"].as_str()?)? - outcome.started_unix - start;
                Some((at, r["detail"].as_str().unwrap_or("").to_string()))
            })
            .collect();
        Self {
            steps,
            hurt: from > 0,
            recovered_after_s: (!tail.is_empty()).then(|| tail[0].t - slice - start),
            after_ok: tail.iter().map(|s| s.connects_ok).sum(),
            after_all: tail.iter().map(|s| s.connects).sum(),
        }
    }

    pub(super) fn summary(&self) -> String {
        let adaptive = match self.steps.last() {
            Some((at, detail)) => format!(
                "adaptive: {} step(s), the first at +{:.1}s, {detail} at +{at:.1}s; ",
                self.steps.len(),
                self.steps[0].0
            ),
            None => String::new(),
        };
        let legit = match (self.hurt, self.recovered_after_s) {
            (false, _) => "legit connects never fell under 99%".to_string(),
            (true, Some(at)) => format!(
                "legit back to >=99% from +{at:.1}s ({}/{} timeline connects after)",
                self.after_ok, self.after_all
            ),
            (true, None) => "legit connects under 99% to the attack's end".to_string(),
        };
        adaptive + &legit
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ScenarioReport {
    pub(super) key: &'static str,
    pub(super) title: &'static str,
    pub(super) tune: &'static [&'static str],
    pub(super) adaptive: Option<Adaptive>,
    pub(super) app: AppOptions,
    pub(super) phases: Vec<Phase>,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) generated_unix: u64,
    pub(super) mode: &'static str,
    pub(super) release_build: bool,
    pub(super) server_core: Option<usize>,
    pub(super) attacker_core: Option<usize>,
    pub(super) measured_core: usize,
    pub(super) napi_thread_pinned: bool,
    pub(super) timing: Timing,
    pub(super) scenarios: Vec<ScenarioReport>,
    /// The fleet scenario (no with/without phases: it shows one decision reaching every
    /// host, through a NATS node failure and a host restart).
    pub(super) fleet: Option<FleetDemo>,
}

#[cfg(test)]
mod tests {
    use super::PhaseAlerts;

    #[test]
    fn fired_pending_and_quiet_split_the_rules() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = PhaseAlerts {
            before: names(&["GuardAgentDown"]),
            fired: names(&["GuardDropsSurging"]),
            active: names(&["GuardDropsSurging", "GuardEventsLost"]),
            rules: names(&[
                "GuardAgentDown",
                "GuardDropsSurging",
                "GuardEventsLost",
                "GuardAppFloodsDetected",
            ]),
        };
        assert_eq!(a.fired_during(), ["GuardDropsSurging"]);
        assert_eq!(a.pending_only(), ["GuardEventsLost"]);
        assert_eq!(a.quiet(), ["GuardAppFloodsDetected"]);
    }
}
