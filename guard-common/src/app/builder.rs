//! [`GuardBuilder`]: every setting of a [`Guard`], and why building one can
//! fail.

use std::collections::hash_map::RandomState;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use prometheus::Registry;
use tokio::time::Instant;

use super::admission::Tables;
use super::guard::Inner;
use super::metrics::Metrics;
use super::peer::ProxyConfig;
use super::report::{ReportCollector, ReportCounters, ReportLog, Reporter};
use super::server::ServerShared;
use super::{Guard, Limits, ProxyHeader, ServerLimits};
use crate::addr::Prefix;
use crate::client::AgentClient;

/// Why a [`Guard`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("invalid guard limits: {0}")]
    Limits(String),
    #[error("cannot register the guard's metrics (already registered in this registry?): {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Builds a [`Guard`]; every setting has a default.
#[derive(Default)]
#[must_use]
pub struct GuardBuilder {
    limits: Limits,
    server_limits: ServerLimits,
    agent: Option<AgentClient>,
    registry: Option<Registry>,
    trusted_proxies: Vec<Prefix>,
    proxy_header: ProxyHeader,
    allowlist: Vec<Prefix>,
}

impl GuardBuilder {
    /// The limits to enforce (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The limits of guard's own server, [`Guard::serve`] (default
    /// [`ServerLimits::default`]).
    pub fn server_limits(mut self, limits: ServerLimits) -> Self {
        self.server_limits = limits;
        self
    }

    /// Where abusive sources are reported; without one nothing is reported
    /// and everything else works the same.
    pub fn agent(mut self, client: AgentClient) -> Self {
        self.agent = Some(client);
        self
    }

    /// Where the `guard_app_*` metrics are registered.
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Proxies whose [`ProxyHeader`] is believed; they are never reported.
    pub fn trusted_proxies(mut self, proxies: impl IntoIterator<Item = Prefix>) -> Self {
        self.trusted_proxies.extend(proxies);
        self
    }

    /// Which header trusted proxies name clients in (default
    /// `X-Forwarded-For`).
    pub fn proxy_header(mut self, header: ProxyHeader) -> Self {
        self.proxy_header = header;
        self
    }

    /// Prefixes that are limited like everyone but never reported.
    pub fn allowlist(mut self, prefixes: impl IntoIterator<Item = Prefix>) -> Self {
        self.allowlist.extend(prefixes);
        self
    }

    pub fn build(self) -> Result<Guard, GuardError> {
        self.limits.validate()?;
        let metrics = Metrics::new(self.registry.as_ref())?;
        let server = ServerShared::new(
            self.server_limits,
            self.limits.source_prefix_v4,
            self.limits.source_prefix_v6,
            self.registry.as_ref(),
        )?;
        let report_counters = Arc::new(ReportCounters::new(self.agent.clone())?);
        if let Some(registry) = &self.registry {
            registry.register(Box::new(ReportCollector(report_counters.clone())))?;
        }
        Ok(Guard {
            inner: Arc::new(Inner {
                limits: self.limits,
                proxy: ProxyConfig {
                    trusted: self.trusted_proxies,
                    header: self.proxy_header,
                },
                tables: Mutex::new(Tables::default()),
                metrics,
                reporter: Reporter {
                    client: self.agent,
                    allowlist: self.allowlist,
                    refusing: AtomicBool::new(false),
                    log: ReportLog::default(),
                },
                report_counters,
                server,
                epoch: Instant::now(),
                hasher: RandomState::new(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_limits_fail_the_build_with_a_reason() {
        let err = Guard::builder()
            .limits(Limits {
                outbound_queue: 0,
                ..Limits::default()
            })
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("outbound_queue"), "{err}");
    }

    #[test]
    fn metrics_register_once_per_registry() {
        let registry = Registry::new();
        Guard::builder().registry(&registry).build().unwrap();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for expected in [
            "guard_app_connections_open",
            "guard_app_connections_admitted_total",
            "guard_app_connections_rejected_total",
            "guard_app_messages_received_total",
            "guard_app_messages_received_bytes_total",
            "guard_app_messages_dropped_total",
            "guard_app_violations_total",
            "guard_app_floods_detected_total",
            "guard_app_connections_closed_total",
            "guard_app_sse_evictions_total",
            "guard_app_reconnect_storms_total",
            "guard_app_reports_sent_total",
            "guard_app_reports_failed_total",
            "guard_app_server_connections_waiting",
            "guard_app_server_connections_total",
            "guard_app_server_closed_total",
            "guard_app_server_fd_headroom",
            "guard_app_server_accept_errors_total",
            "guard_app_server_tls_handshake_failures_total",
            "guard_app_server_streams_handed_off_total",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        let again = Guard::builder().registry(&registry).build();
        assert!(matches!(again, Err(GuardError::Metrics(_))));
    }
}
