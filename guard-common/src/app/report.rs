//! Telling the agent about abusive sources, without ever making the app
//! depend on it: reports go to the [`AgentClient`]'s bounded queue, which
//! never blocks; whatever it cannot deliver is counted, not retried here.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::IntCounter;

use super::{GuardError, Limits};
use crate::addr::Prefix;
use crate::client::{AgentClient, BlockReport};
use crate::state::reason;

/// `guard_app_reports_{sent,failed}_total`, read from the client's own
/// counters at scrape time so they can never drift from what it did.
pub(crate) struct ReportCounters {
    client: Option<AgentClient>,
    sent: IntCounter,
    failed: IntCounter,
    /// Two scrapes at once must not both add the same delta.
    sync: Mutex<()>,
}

impl ReportCounters {
    pub fn new(client: Option<AgentClient>) -> Result<Self, GuardError> {
        Ok(Self {
            client,
            sent: IntCounter::new(
                "guard_app_reports_sent_total",
                "Block reports the agent answered.",
            )?,
            failed: IntCounter::new(
                "guard_app_reports_failed_total",
                "Block reports that never reached the agent (queue full, client gone, or an agent error).",
            )?,
            sync: Mutex::new(()),
        })
    }

    fn refresh(&self) {
        let Some(client) = &self.client else { return };
        let _one_at_a_time = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = client.stats();
        let failed = stats.failed.saturating_add(stats.dropped);
        // Both sides only grow, so the difference is what happened since the
        // last scrape.
        self.sent.inc_by(stats.sent.saturating_sub(self.sent.get()));
        self.failed.inc_by(failed.saturating_sub(self.failed.get()));
    }

    pub fn sent(&self) -> u64 {
        self.refresh();
        self.sent.get()
    }

    pub fn failed(&self) -> u64 {
        self.refresh();
        self.failed.get()
    }
}

/// What the registry holds: the same counters the guard reads.
pub(crate) struct ReportCollector(pub Arc<ReportCounters>);

impl Collector for ReportCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.0.sent.desc();
        d.extend(self.0.failed.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.refresh();
        let mut m = self.0.sent.collect();
        m.extend(self.0.failed.collect());
        m
    }
}

/// Reporting state shared by all connections.
pub(crate) struct Reporter {
    pub client: Option<AgentClient>,
    pub allowlist: Vec<Prefix>,
    /// Set while reports are being refused, so an outage logs once.
    pub refusing: AtomicBool,
    pub log: ReportLog,
}

/// At most one line per this long about reports, so an attack from many
/// sources (a report each) does not flood the app's log; the next line
/// counts the ones in between. The metrics count every report.
const REPORT_LOG_EVERY: Duration = Duration::from_secs(1);

/// When the last line about a report was logged, and how many reports have
/// gone unlogged since.
#[derive(Default)]
pub(crate) struct ReportLog {
    last_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl ReportLog {
    /// Whether a report at `now` may be logged, and how many went unlogged
    /// before it.
    fn slot(&self, now: SystemTime) -> Option<u64> {
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let last = self.last_ms.load(Ordering::Relaxed);
        let every = REPORT_LOG_EVERY.as_millis() as u64;
        let due = last == 0 || now_ms.saturating_sub(last) >= every;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.unlogged.swap(0, Ordering::Relaxed));
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// " (and N more since the last line)" when N is not 0.
fn and_more(unlogged: u64) -> String {
    if unlogged == 0 {
        String::new()
    } else {
        format!(" (and {unlogged} more since the last line)")
    }
}

impl Reporter {
    /// Hands the agent client a block of the source `ip` belongs to, as
    /// wide as `limits` key sources. Never waits; the detection time is
    /// now. Exemptions are the caller's to check first.
    pub fn report(&self, ip: IpAddr, code: u32, detail: String, limits: &Limits) {
        let why = reason::name(code);
        let now = SystemTime::now();
        let Some(client) = &self.client else {
            if let Some(unlogged) = self.log.slot(now) {
                log::info!(
                    "would report {ip} ({why}: {detail}) but no agent is configured{}",
                    and_more(unlogged)
                );
            }
            return;
        };
        let report = BlockReport {
            prefix: Prefix::of(ip, limits.source_prefix_v4, limits.source_prefix_v6),
            ttl: limits.report_ttl,
            reason: code,
            detected_at: now,
            detail,
        };
        if let Some(unlogged) = self.log.slot(now) {
            log::warn!(
                "reporting {} to the agent: {why}{}",
                report.prefix,
                and_more(unlogged)
            );
        }
        match client.report(report) {
            Ok(()) => {
                if self.refusing.swap(false, Ordering::Relaxed) {
                    log::info!("the agent client accepts reports again");
                }
            }
            Err(e) => {
                if !self.refusing.swap(true, Ordering::Relaxed) {
                    log::warn!("{e}; the app keeps serving and counts it in guard_app_reports_failed_total");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_one_per_second_and_count_the_rest() {
        let log = ReportLog::default();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(log.slot(t0), Some(0));
        for ms in [1, 200, 999] {
            assert_eq!(log.slot(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(log.slot(t0 + Duration::from_millis(1000)), Some(3));
        assert_eq!(log.slot(t0 + Duration::from_millis(1001)), None);
        assert_eq!(and_more(0), "");
        assert_eq!(and_more(3), " (and 3 more since the last line)");
    }
}
