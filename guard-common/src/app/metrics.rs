//! The app-side metrics. Names and labels are a contract with the ops
//! dashboard; change them only together with it.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::GuardError;

/// The kind of a guarded connection (label `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnKind {
    WebSocket,
    Sse,
}

impl ConnKind {
    pub const fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "ws",
            Self::Sse => "sse",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::WebSocket => 0,
            Self::Sse => 1,
        }
    }
}

/// Why an admission was refused (label `reason` of the rejected counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The source is at `per_ip_max_connections` (429).
    PerIpCap,
    /// The service is at `max_connections` (503).
    GlobalCap,
    /// The source opens connections faster than `per_ip_connect_rate` (429).
    PerIpRate,
    /// The identity is at `per_identity_max_connections` (429).
    PerIdentityCap,
    /// The identity opens connections faster than
    /// `per_identity_connect_rate` (429).
    PerIdentityRate,
    /// The source's network (its /24 or /48) is at
    /// `per_prefix_max_connections_v4`/`_v6` (429).
    PerPrefixCap,
}

impl RejectReason {
    pub const ALL: [Self; 6] = [
        Self::PerIpCap,
        Self::GlobalCap,
        Self::PerIpRate,
        Self::PerIdentityCap,
        Self::PerIdentityRate,
        Self::PerPrefixCap,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::PerIpCap => "per_ip_cap",
            Self::GlobalCap => "global_cap",
            Self::PerIpRate => "per_ip_rate",
            Self::PerIdentityCap => "per_identity_cap",
            Self::PerIdentityRate => "per_identity_rate",
            Self::PerPrefixCap => "per_prefix_cap",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::PerIpCap => 0,
            Self::GlobalCap => 1,
            Self::PerIpRate => 2,
            Self::PerIdentityCap => 3,
            Self::PerIdentityRate => 4,
            Self::PerPrefixCap => 5,
        }
    }
}

/// Why a message was discarded (label `reason` of the dropped counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    Rate,
    Size,
    Invalid,
    SlowConsumer,
}

impl DropReason {
    pub const ALL: [Self; 4] = [Self::Rate, Self::Size, Self::Invalid, Self::SlowConsumer];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::Size => "size",
            Self::Invalid => "invalid",
            Self::SlowConsumer => "slow_consumer",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::Rate => 0,
            Self::Size => 1,
            Self::Invalid => 2,
            Self::SlowConsumer => 3,
        }
    }
}

/// How an inbound message broke a limit (label `reason` of the violation
/// counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// Over the message or byte rate.
    Rate,
    /// Over `max_message_size` / `max_frame_size`.
    Size,
    /// Failed validation: bad UTF-8, a protocol error, or the app's check.
    Invalid,
}

impl Violation {
    pub const ALL: [Self; 3] = [Self::Rate, Self::Size, Self::Invalid];

    pub const fn label(self) -> &'static str {
        self.dropped().label()
    }

    /// The same reason on the dropped counter.
    pub const fn dropped(self) -> DropReason {
        match self {
            Self::Rate => DropReason::Rate,
            Self::Size => DropReason::Size,
            Self::Invalid => DropReason::Invalid,
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::Rate => 0,
            Self::Size => 1,
            Self::Invalid => 2,
        }
    }
}

/// Why a connection ended (label `reason` of the closed counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Message flood: closed with 1008 and the source reported.
    Flood,
    /// The peer sent nothing for `idle_timeout`.
    Idle,
    /// The client did not keep up with what it was sent.
    SlowConsumer,
    /// Too many invalid or oversized messages.
    Violations,
    /// Everything else: either side closed, the client vanished, the
    /// handler returned or panicked.
    Normal,
}

impl CloseReason {
    pub const ALL: [Self; 5] = [
        Self::Flood,
        Self::Idle,
        Self::SlowConsumer,
        Self::Violations,
        Self::Normal,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Flood => "flood",
            Self::Idle => "idle",
            Self::SlowConsumer => "slow_consumer",
            Self::Violations => "violations",
            Self::Normal => "normal",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::Flood => 0,
            Self::Idle => 1,
            Self::SlowConsumer => 2,
            Self::Violations => 3,
            Self::Normal => 4,
        }
    }
}

/// Every handle resolved once, so the hot path is one atomic add.
pub(crate) struct Metrics {
    open: [IntGauge; 2],
    admitted: [IntCounter; 2],
    rejected: [[IntCounter; RejectReason::ALL.len()]; 2],
    pub received: IntCounter,
    pub received_bytes: IntCounter,
    dropped: [IntCounter; 4],
    violations: [IntCounter; 3],
    pub floods: IntCounter,
    closed: [IntCounter; 5],
    pub sse_evictions: IntCounter,
    pub storms: IntCounter,
}

const KINDS: [ConnKind; 2] = [ConnKind::WebSocket, ConnKind::Sse];

impl Metrics {
    /// Creates the metrics and registers them in `registry`; without one
    /// they are still kept (tests and the guard itself read them).
    pub fn new(registry: Option<&Registry>) -> Result<Self, GuardError> {
        let open = IntGaugeVec::new(
            Opts::new(
                "guard_app_connections_open",
                "Guarded connections open now.",
            ),
            &["kind"],
        )?;
        let admitted = IntCounterVec::new(
            Opts::new(
                "guard_app_connections_admitted_total",
                "Connections admitted by the guard.",
            ),
            &["kind"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "guard_app_connections_rejected_total",
                "Connection attempts refused by the guard (429 per source, 503 global).",
            ),
            &["kind", "reason"],
        )?;
        let received = IntCounter::new(
            "guard_app_messages_received_total",
            "WebSocket messages received, control frames included.",
        )?;
        let received_bytes = IntCounter::new(
            "guard_app_messages_received_bytes_total",
            "Payload bytes of received WebSocket messages.",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "guard_app_messages_dropped_total",
                "Messages discarded by the guard, inbound or outbound.",
            ),
            &["reason"],
        )?;
        let violations = IntCounterVec::new(
            Opts::new(
                "guard_app_violations_total",
                "Inbound messages that broke a limit, whatever the policy did with them.",
            ),
            &["reason"],
        )?;
        let floods = IntCounter::new(
            "guard_app_floods_detected_total",
            "Connections found flooding (violation threshold reached, mostly rate).",
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "guard_app_connections_closed_total",
                "Guarded connections ended, by why.",
            ),
            &["reason"],
        )?;
        let sse_evictions = IntCounter::new(
            "guard_app_sse_evictions_total",
            "SSE subscribers evicted (told to retry later).",
        )?;
        let storms = IntCounter::new(
            "guard_app_reconnect_storms_total",
            "Sources found reconnecting in a storm.",
        )?;

        if let Some(registry) = registry {
            registry.register(Box::new(open.clone()))?;
            registry.register(Box::new(admitted.clone()))?;
            registry.register(Box::new(rejected.clone()))?;
            registry.register(Box::new(received.clone()))?;
            registry.register(Box::new(received_bytes.clone()))?;
            registry.register(Box::new(dropped.clone()))?;
            registry.register(Box::new(violations.clone()))?;
            registry.register(Box::new(floods.clone()))?;
            registry.register(Box::new(closed.clone()))?;
            registry.register(Box::new(sse_evictions.clone()))?;
            registry.register(Box::new(storms.clone()))?;
        }

        // Resolving every label set up front also makes each series exist
        // (at 0) from the start, which dashboards and rate() need.
        Ok(Self {
            open: KINDS.map(|k| open.with_label_values(&[k.label()])),
            admitted: KINDS.map(|k| admitted.with_label_values(&[k.label()])),
            rejected: KINDS.map(|k| {
                RejectReason::ALL.map(|r| rejected.with_label_values(&[k.label(), r.label()]))
            }),
            received,
            received_bytes,
            dropped: DropReason::ALL.map(|r| dropped.with_label_values(&[r.label()])),
            violations: Violation::ALL.map(|r| violations.with_label_values(&[r.label()])),
            floods,
            closed: CloseReason::ALL.map(|r| closed.with_label_values(&[r.label()])),
            sse_evictions,
            storms,
        })
    }

    pub fn open(&self, kind: ConnKind) -> &IntGauge {
        &self.open[kind.index()]
    }

    pub fn admitted(&self, kind: ConnKind) -> &IntCounter {
        &self.admitted[kind.index()]
    }

    pub fn rejected(&self, kind: ConnKind, reason: RejectReason) -> &IntCounter {
        &self.rejected[kind.index()][reason.index()]
    }

    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        &self.dropped[reason.index()]
    }

    pub fn violation(&self, reason: Violation) -> &IntCounter {
        &self.violations[reason.index()]
    }

    pub fn closed(&self, reason: CloseReason) -> &IntCounter {
        &self.closed[reason.index()]
    }
}
