//! The server's metrics (`guard_app_server_*`). Names and labels are a
//! contract with the alerts in `guard-user/deploy/alerts.yml`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::super::GuardError;

/// Why the server closed a connection itself (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerClose {
    /// No complete request head within `head_timeout`.
    HeadDeadline,
    /// Idle between requests past `keep_alive_idle`.
    IdleDeadline,
    /// The oldest waiting connection when the global budget was full.
    BudgetGlobal,
    /// The oldest waiting connection of a full source or network.
    BudgetPrefix,
    /// Closed to give descriptors back (the oldest waiting connections when
    /// headroom is low, or taken and closed at once when none was left).
    FdShed,
}

impl ServerClose {
    pub const ALL: [Self; 5] = [
        Self::HeadDeadline,
        Self::IdleDeadline,
        Self::BudgetGlobal,
        Self::BudgetPrefix,
        Self::FdShed,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::HeadDeadline => "head_deadline",
            Self::IdleDeadline => "idle_deadline",
            Self::BudgetGlobal => "budget_global",
            Self::BudgetPrefix => "budget_prefix",
            Self::FdShed => "fd_shed",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::HeadDeadline => 0,
            Self::IdleDeadline => 1,
            Self::BudgetGlobal => 2,
            Self::BudgetPrefix => 3,
            Self::FdShed => 4,
        }
    }

    /// Stored in an atomic where 0 means "not closing".
    pub(crate) const fn code(self) -> u8 {
        self.index() as u8 + 1
    }
}

/// Why `accept` failed (label `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// The process is out of descriptors (EMFILE).
    ProcessFds,
    /// The system is out of descriptors (ENFILE).
    SystemFds,
    /// The connection died in the backlog (ECONNABORTED and the like).
    Connection,
    /// Anything else (ENOBUFS, ENOMEM, ...).
    Other,
}

impl AcceptError {
    const ALL: [Self; 4] = [
        Self::ProcessFds,
        Self::SystemFds,
        Self::Connection,
        Self::Other,
    ];

    const fn label(self) -> &'static str {
        match self {
            Self::ProcessFds => "emfile",
            Self::SystemFds => "enfile",
            Self::Connection => "connection",
            Self::Other => "other",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::ProcessFds => 0,
            Self::SystemFds => 1,
            Self::Connection => 2,
            Self::Other => 3,
        }
    }
}

pub(crate) struct ServerMetrics {
    pub waiting: IntGauge,
    pub connections: IntCounter,
    closed: [IntCounter; 5],
    pub fd_headroom: IntGauge,
    pub streams_handed_off: IntCounter,
    accept_errors: [IntCounter; 4],
    // Registered either way, so dashboards see the series at 0.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub tls_failures: IntCounter,
}

impl ServerMetrics {
    pub fn new(registry: Option<&Registry>) -> Result<Self, GuardError> {
        let waiting = IntGauge::new(
            "guard_app_server_connections_waiting",
            "Connections accepted by guard's server that have no request in flight and are not upgraded (the not-yet-admitted budget).",
        )?;
        let connections = IntCounter::new(
            "guard_app_server_connections_total",
            "Connections accepted by guard's server.",
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "guard_app_server_closed_total",
                "Connections guard's server closed itself, by why.",
            ),
            &["reason"],
        )?;
        let fd_headroom = IntGauge::new(
            "guard_app_server_fd_headroom",
            "Descriptors left before the open-files soft limit.",
        )?;
        let streams_handed_off = IntCounter::new(
            "guard_app_server_streams_handed_off_total",
            "Event streams guard's server took out of hyper after their head, to stream them without hyper's per-connection buffers.",
        )?;
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "guard_app_server_accept_errors_total",
                "accept() failures of guard's server, by kind.",
            ),
            &["kind"],
        )?;
        let tls_failures = IntCounter::new(
            "guard_app_server_tls_handshake_failures_total",
            "TLS handshakes that failed or were abandoned.",
        )?;
        if let Some(registry) = registry {
            registry.register(Box::new(waiting.clone()))?;
            registry.register(Box::new(connections.clone()))?;
            registry.register(Box::new(closed.clone()))?;
            registry.register(Box::new(fd_headroom.clone()))?;
            registry.register(Box::new(streams_handed_off.clone()))?;
            registry.register(Box::new(accept_errors.clone()))?;
            registry.register(Box::new(tls_failures.clone()))?;
        }
        Ok(Self {
            waiting,
            connections,
            closed: ServerClose::ALL.map(|r| closed.with_label_values(&[r.label()])),
            fd_headroom,
            streams_handed_off,
            accept_errors: AcceptError::ALL.map(|k| accept_errors.with_label_values(&[k.label()])),
            tls_failures,
        })
    }

    pub fn closed(&self, reason: ServerClose) -> &IntCounter {
        &self.closed[reason.index()]
    }

    pub fn accept_error(&self, kind: AcceptError) -> &IntCounter {
        &self.accept_errors[kind.index()]
    }
}
