//! What the server side of the rig spent: the NAPI thread to the nanosecond, the server and
//! the agent processes in clock ticks.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::measure::{clock_ticks, proc_cpu_ticks};

/// A reading of [`Rig::cpu_snapshot`].
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    pub(super) at: Instant,
    pub(super) napi: Duration,
    pub(super) processes: Duration,
}

/// Shares of one window, in percent of one core.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuShares {
    /// The NAPI thread alone: the receive path.
    pub napi_pct: f64,
    /// NAPI thread + server + agent.
    pub server_side_pct: f64,
}

impl CpuSnapshot {
    pub fn shares_since(&self, before: &CpuSnapshot) -> CpuShares {
        let window = (self.at - before.at).as_secs_f64();
        if window <= 0.0 {
            return CpuShares::default();
        }
        let pct = |d: Duration| d.as_secs_f64() * 100.0 / window;
        let napi = self.napi.saturating_sub(before.napi);
        CpuShares {
            napi_pct: pct(napi),
            server_side_pct: pct(napi + self.processes.saturating_sub(before.processes)),
        }
    }
}

/// User + system CPU time of a process, all its threads (those that exited too), from
/// /proc/<pid>/stat: exact in total, in steps of one clock tick (10 ms).
pub(super) fn process_cpu(pid: u32) -> Result<Duration> {
    let ticks = proc_cpu_ticks(pid)
        .with_context(|| format!("cannot read the CPU times in /proc/{pid}/stat"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks()?))
}

/// Time one thread has run, to the nanosecond, from /proc/<tid>/schedstat: the NAPI thread's
/// share is a few percent of a core, where /proc/<pid>/stat's 10 ms steps would show.
pub(super) fn thread_runtime(tid: u32) -> Result<Duration> {
    let path = format!("/proc/{tid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ns = parse_schedstat_runtime(&text).with_context(|| format!("bad {path}: {text}"))?;
    Ok(Duration::from_nanos(ns))
}

/// The first field of /proc/<tid>/schedstat: nanoseconds on a CPU.
pub(super) fn parse_schedstat_runtime(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_of_this_process() {
        assert!(process_cpu(std::process::id()).is_ok());
        assert!(thread_runtime(std::process::id()).unwrap() > Duration::ZERO);
        assert_eq!(
            parse_schedstat_runtime("123456789 4242 17\n"),
            Some(123_456_789)
        );
        assert_eq!(parse_schedstat_runtime(""), None);
    }
}
