//! Telling the agent about abusive sources, without ever making the app
//! depend on it: reports go to the [`AgentClient`]'s bounded queue, which
//! never blocks; whatever it cannot deliver is counted, not retried here.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

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
}

impl Reporter {
    /// Hands the agent client a block of the source `ip` belongs to, as
    /// wide as `limits` key sources. Never waits; the detection time is
    /// now. Exemptions are the caller's to check first.
    pub fn report(&self, ip: IpAddr, code: u32, detail: String, limits: &Limits) {
        let why = reason::name(code);
        let Some(client) = &self.client else {
            log::info!("would report {ip} ({why}: {detail}) but no agent is configured");
            return;
        };
        let report = BlockReport {
            prefix: Prefix::of(ip, limits.source_prefix_v4, limits.source_prefix_v6),
            ttl: limits.report_ttl,
            reason: code,
            detected_at: SystemTime::now(),
            detail,
        };
        log::warn!("reporting {} to the agent: {why}", report.prefix);
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
