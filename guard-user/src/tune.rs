//! `guard tune --suggest`: watch real per-source new-connection rates in the
//! kernel's own per-source state (read-only: observing never changes a
//! verdict) and propose a rate, burst and aggregate cap.

use std::{collections::HashMap, fmt::Write as _, time::Duration};

use guard_common::{addr::prefix_key, Addr, LiveConfig};

use crate::datapath::{DatapathError, GuardMaps};

/// Per-key SYN counts over time, one sample a second.
#[derive(Debug, Default)]
pub struct Observation {
    /// key -> SYNs in each one-second step.
    pub per_second: HashMap<Addr, Vec<u64>>,
    pub seconds: u64,
}

impl Observation {
    /// Feeds two consecutive snapshots of `(source, total syns)`.
    pub fn step(&mut self, before: &HashMap<Addr, u64>, after: &HashMap<Addr, u64>) {
        self.seconds += 1;
        for (k, total) in after {
            let prev = before.get(k).copied().unwrap_or(0);
            // An evicted-then-recreated entry restarts from zero.
            let delta = if *total >= prev { total - prev } else { *total };
            let series = self.per_second.entry(*k).or_default();
            series.resize((self.seconds - 1) as usize, 0);
            series.push(delta);
        }
    }

    /// The same observation grouped by a wider prefix.
    pub fn grouped(&self, v4_len: u8, v6_len: u8) -> Observation {
        let mut out = Observation {
            seconds: self.seconds,
            ..Default::default()
        };
        for (k, series) in &self.per_second {
            let g = out
                .per_second
                .entry(prefix_key(k, v4_len, v6_len))
                .or_default();
            if g.len() < series.len() {
                g.resize(series.len(), 0);
            }
            for (i, v) in series.iter().enumerate() {
                g[i] += v;
            }
        }
        out
    }

    /// (mean rate per second, peak in one second) of every key.
    pub fn profiles(&self) -> Vec<(f64, u64)> {
        self.per_second
            .values()
            .map(|s| {
                let sum: u64 = s.iter().sum();
                (
                    sum as f64 / self.seconds.max(1) as f64,
                    s.iter().copied().max().unwrap_or(0),
                )
            })
            .collect()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[derive(Debug, Clone, PartialEq)]
pub struct Suggestion {
    pub rate: u32,
    pub burst: u32,
    /// Keys whose observed behaviour this proposal would have capped.
    pub would_cap: usize,
    pub keys: usize,
    pub rate_p50: f64,
    pub rate_p99: f64,
    pub peak_p99: f64,
    pub peak_max: f64,
}

/// Rate: the p99 mean rate with 2x headroom; burst: the p99 one-second
/// peak with 2x headroom (never below the rate). Sources beyond that are
/// the outliers the cap is for, and the count says how many there were.
pub fn suggest(profiles: &[(f64, u64)], floor_rate: u32, floor_burst: u32) -> Suggestion {
    let mut rates: Vec<f64> = profiles.iter().map(|p| p.0).collect();
    let mut peaks: Vec<f64> = profiles.iter().map(|p| p.1 as f64).collect();
    rates.sort_by(f64::total_cmp);
    peaks.sort_by(f64::total_cmp);
    let rate = ((percentile(&rates, 0.99) * 2.0).ceil() as u32).max(floor_rate);
    let burst = ((percentile(&peaks, 0.99) * 2.0).ceil() as u32)
        .max(rate)
        .max(floor_burst);
    let would_cap = profiles
        .iter()
        .filter(|(r, peak)| *r > rate as f64 || *peak > burst as u64)
        .count();
    Suggestion {
        rate,
        burst,
        would_cap,
        keys: profiles.len(),
        rate_p50: percentile(&rates, 0.5),
        rate_p99: percentile(&rates, 0.99),
        peak_p99: percentile(&peaks, 0.99),
        peak_max: peaks.last().copied().unwrap_or(0.0),
    }
}

fn snapshot(maps: &GuardMaps) -> Result<HashMap<Addr, u64>, DatapathError> {
    Ok(maps
        .sources()?
        .into_iter()
        .map(|(k, s)| (k, s.syns))
        .collect())
}

/// Watches for `observe`, then prints the distribution and proposals.
pub fn observe_and_suggest(maps: &GuardMaps, observe: Duration) -> Result<String, DatapathError> {
    let cfg: LiveConfig = maps.config()?;
    let mut obs = Observation::default();
    let mut before = snapshot(maps)?;
    let steps = observe.as_secs().max(1);
    for _ in 0..steps {
        std::thread::sleep(Duration::from_secs(1));
        let after = snapshot(maps)?;
        obs.step(&before, &after);
        before = after;
    }
    let mut out = String::new();
    let src = suggest(&obs.profiles(), 1, 2);
    let agg_obs = obs.grouped(cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
    let agg = suggest(&agg_obs.profiles(), 1, 2);
    let _ = writeln!(
        out,
        "observed {} s: {} sources opened connections",
        obs.seconds, src.keys
    );
    let _ = writeln!(
        out,
        "per source: rate p50 {:.2}/s, p99 {:.2}/s; one-second peak p99 {:.0}, max {:.0}",
        src.rate_p50, src.rate_p99, src.peak_p99, src.peak_max
    );
    let _ = writeln!(
        out,
        "suggest: syn_rate={} syn_burst={}  (now {} / {}): would have capped {} of {} sources",
        src.rate, src.burst, cfg.syn_rate, cfg.syn_burst, src.would_cap, src.keys
    );
    let _ = writeln!(
        out,
        "per /{} (v4) /{} (v6): {} prefixes, rate p99 {:.2}/s, peak max {:.0}",
        cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6, agg.keys, agg.rate_p99, agg.peak_max
    );
    let _ = writeln!(
        out,
        "suggest: aggregate_rate={} aggregate_burst={}: would have capped {} of {} prefixes",
        agg.rate, agg.burst, agg.would_cap, agg.keys
    );
    let _ = writeln!(
        out,
        "safe path: guard config --dry-run --set syn_rate={} --set syn_burst={}; watch would_drop in `guard status`; then guard config --enforce",
        src.rate, src.burst
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guard_common::addr::v4_mapped;

    #[test]
    fn suggestion_covers_the_many_and_names_the_outliers() {
        // 99 sources at 1-2/s with peaks of 3, one at 50/s.
        let mut p: Vec<(f64, u64)> = (0..99).map(|i| (1.0 + (i % 2) as f64, 3)).collect();
        p.push((50.0, 60));
        let s = suggest(&p, 1, 2);
        assert_eq!(s.keys, 100);
        assert!(s.rate >= 4 && s.rate < 50, "{s:?}");
        assert!(s.burst >= 6 && s.burst < 60, "{s:?}");
        assert_eq!(s.would_cap, 1, "only the flooder");
        let empty = suggest(&[], 5, 10);
        assert_eq!((empty.rate, empty.burst, empty.would_cap), (5, 10, 0));
    }

    #[test]
    fn observation_turns_totals_into_per_second_series_and_groups() {
        let a = v4_mapped([198, 18, 0, 2]);
        let b = v4_mapped([198, 18, 0, 3]);
        let mut obs = Observation::default();
        let s0: HashMap<Addr, u64> = [(a, 10)].into();
        let s1: HashMap<Addr, u64> = [(a, 12), (b, 5)].into();
        let s2: HashMap<Addr, u64> = [(a, 12), (b, 1)].into();
        obs.step(&s0, &s1);
        obs.step(&s1, &s2);
        assert_eq!(obs.per_second[&a], vec![2, 0]);
        assert_eq!(
            obs.per_second[&b],
            vec![5, 1],
            "a recreated entry counts from zero"
        );
        let g = obs.grouped(24, 48);
        assert_eq!(g.per_second[&v4_mapped([198, 18, 0, 0])], vec![7, 1]);
        let prof = obs.profiles();
        assert!(prof.contains(&(1.0, 2)) && prof.contains(&(3.0, 5)));
    }
}
