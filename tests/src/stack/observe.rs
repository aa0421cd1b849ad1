//! What the stack reads while it runs: the kernel's counters and blocklist from the pinned
//! maps, the agent's metrics, the audit log, the server kernel's own handshake losses.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use guard_common::stats::Stat;

use super::Stack;

/// Kernel verdict counters, by their `guard status` names.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    pub fn get(&self, stat: Stat) -> u64 {
        self.0.get(stat.name()).copied().unwrap_or(0)
    }

    /// What grew since `before`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(before.0.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        )
    }

    /// Every packet the program dropped, whatever the reason.
    pub fn drops(&self) -> u64 {
        Stat::ALL
            .iter()
            .filter(|s| matches!(s.labels(), Some(("drop", _))))
            .map(|s| self.get(*s))
            .sum()
    }

    /// The non-zero drop reasons, e.g. "source_rate 81234, blocked 12".
    pub fn drop_breakdown(&self) -> String {
        let parts: Vec<String> = Stat::ALL
            .iter()
            .filter_map(|s| match s.labels() {
                Some(("drop", reason)) if self.get(*s) > 0 => {
                    Some(format!("{reason} {}", self.get(*s)))
                }
                _ => None,
            })
            .collect();
        parts.join(", ")
    }
}

/// A value of an unlabelled series in Prometheus text, e.g. `guard_block_latency_seconds_sum`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// A plain HTTP/1.0 GET from inside `ns`; returns the body of a 200 answer.
pub fn http_get_in(ns: &crate::Netns, addr: SocketAddr, path: &str) -> Result<String> {
    let text = ns.run_in(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("cannot connect to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .with_context(|| format!("reading http://{addr}{path}"))?;
        Ok(text)
    })??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("http://{addr}{path}: no HTTP response"))?;
    ensure!(
        head.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "http://{addr}{path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

impl Stack {
    /// The kernel's counters, read from the pinned maps; `None` while guard is not loaded.
    pub fn counters(&self) -> Result<Option<Counters>> {
        if !self.pins.layout().map(guard_common::maps::CONFIG).exists() {
            return Ok(None);
        }
        let maps = self.pins.maps()?;
        let totals = maps
            .stat_totals()
            .context("cannot read the kernel counters")?;
        Ok(Some(Counters(
            Stat::ALL
                .iter()
                .map(|s| (s.name().to_string(), totals[s.index() as usize]))
                .collect(),
        )))
    }

    /// Prefixes blocked in the kernel right now.
    pub fn kernel_blocks(&self) -> Result<Vec<String>> {
        let maps = self.pins.maps()?;
        Ok(maps
            .blocks()
            .context("cannot read the blocklist")?
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect())
    }

    /// The agent's Prometheus text.
    pub fn agent_metrics(&self) -> Result<String> {
        http_get_in(&self.lab.server, self.metrics_addr(), "/metrics")
    }

    /// Blocks placed on a report with a detection time, and their mean detection-to-kernel
    /// time in milliseconds (`guard_block_latency_seconds`).
    pub fn block_latency(&self) -> Result<Option<(u64, f64)>> {
        let text = self.agent_metrics()?;
        let count = metric(&text, "guard_block_latency_seconds_count").unwrap_or(0.0);
        let sum = metric(&text, "guard_block_latency_seconds_sum").unwrap_or(0.0);
        Ok((count > 0.0).then(|| (count as u64, sum / count * 1000.0)))
    }

    /// The audit log's records (empty before the agent wrote any).
    pub fn audit(&self) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(self.audit_log()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("cannot read the audit log"),
        };
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad audit line {l:?}")))
            .collect()
    }

    /// Established connections the kernel counts for `source` right now (conn_limit's view).
    pub fn tracked_connections(&self, source: Ipv4Addr) -> Result<u64> {
        let maps = self.pins.maps()?;
        let want = source.to_ipv6_mapped().octets();
        Ok(maps
            .connections()
            .context("cannot read the connection counts")?
            .into_iter()
            .filter(|(addr, _)| *addr == want)
            .map(|(_, n)| n)
            .sum())
    }

    /// The per-source SYN rate the kernel runs with now (adaptive mode changes it).
    pub fn live_syn_rate(&self) -> Result<u32> {
        let maps = self.pins.maps()?;
        Ok(maps
            .config()
            .context("cannot read the live config")?
            .syn_rate)
    }

    /// Handshakes the server's own kernel lost because a queue was full: accept-queue
    /// overflows (each also counts as a listen drop, so only this one is read) and SYN-queue
    /// drops. The same signal the adaptive mode watches.
    pub fn server_handshake_losses(&self) -> Result<u64> {
        Ok(self.lab.server.counter("TcpExt", "ListenOverflows")?
            + self.lab.server.counter("TcpExt", "TCPReqQFullDrop")?)
    }
}

/// An audit record's `ts` (RFC 3339 in UTC with milliseconds, as the agent writes it, e.g.
/// `2026-11-28T11:37:36.102Z`) in Unix seconds.
pub fn audit_ts_unix(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 in the proleptic Gregorian calendar, counting years from March
    // so the leap day is the last day of its year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_timestamps() {
        assert_eq!(audit_ts_unix("1970-01-01T00:00:00.000Z"), Some(0.0));
        assert_eq!(audit_ts_unix("2000-03-01T00:00:01Z"), Some(951_868_801.0));
        let t = audit_ts_unix("2026-11-28T11:37:36.102Z").unwrap();
        assert!((t - 1_795_865_856.102).abs() < 1e-3, "{t}");
        assert_eq!(audit_ts_unix("2026-11-28 11:37:36Z"), None);
        assert_eq!(audit_ts_unix("2026-13-28T11:37:36Z"), None);
    }

    #[test]
    fn metric_lines() {
        let text = "# HELP x y\nguard_block_latency_seconds_sum 0.25\n\
                    guard_block_latency_seconds_count 2\nguard_packets_total{verdict=\"drop\"} 9\n";
        assert_eq!(metric(text, "guard_block_latency_seconds_sum"), Some(0.25));
        assert_eq!(metric(text, "guard_block_latency_seconds_count"), Some(2.0));
        assert_eq!(metric(text, "guard_packets_total"), None);
    }

    #[test]
    fn counters_deltas_and_drops() {
        let c = |pairs: &[(&str, u64)]| {
            Counters(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        };
        let before = c(&[
            ("drop_blocked", 5),
            ("pass_syn", 10),
            ("drop_source_rate", 1),
        ]);
        let after = c(&[
            ("drop_blocked", 12),
            ("pass_syn", 11),
            ("drop_source_rate", 1),
        ]);
        let d = after.since(&before);
        assert_eq!(d.get(Stat::DropBlocked), 7);
        assert_eq!(d.drops(), 7);
        assert_eq!(d.drop_breakdown(), "blocked 7");
        assert_eq!(after.drops(), 13);
    }
}
