//! The fleet's Prometheus series.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct FleetMetrics {
    pub published: IntCounter,
    pub received: IntCounter,
    pub applied: IntCounterVec,
    pub dropped: IntCounterVec,
    pub publish_errors: IntCounter,
    pub queue_depth: IntGauge,
    pub lag: Histogram,
    pub connected: IntGauge,
    pub connection_events: IntCounterVec,
    pub caught_up: IntGauge,
    pub stream_sequence: IntGauge,
    pub follower_restarts: IntCounter,
    pub stream_present: IntGauge,
    pub stream_resets: IntCounterVec,
}

impl FleetMetrics {
    pub fn register(r: &Registry) -> Self {
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        let counter = |name: &str, help: &str| reg(r, IntCounter::new(name, help).expect("valid"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let gauge = |name: &str, help: &str| reg(r, IntGauge::new(name, help).expect("valid"));
        let m = Self {
            published: counter(
                "guard_fleet_decisions_published_total",
                "Block and unblock decisions of this host acknowledged by JetStream.",
            ),
            received: counter(
                "guard_fleet_decisions_received_total",
                "Decisions of other hosts read from the stream.",
            ),
            applied: counter_vec(
                "guard_fleet_decisions_applied_total",
                "Decisions of other hosts that changed this host's kernel blocklist.",
                &["action"],
            ),
            dropped: counter_vec(
                "guard_fleet_decisions_dropped_total",
                "Decisions not published (queue_full) or not applied, by reason.",
                &["reason"],
            ),
            publish_errors: counter(
                "guard_fleet_publish_errors_total",
                "Publish attempts that failed and were retried.",
            ),
            queue_depth: gauge(
                "guard_fleet_publish_queue_depth",
                "Decisions of this host waiting to be acknowledged by JetStream.",
            ),
            lag: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "guard_fleet_apply_lag_seconds",
                        "From another host's decision to its block being in this host's kernel (wall clocks of both).",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ]),
                )
                .expect("valid histogram"),
            ),
            connected: gauge(
                "guard_fleet_connected",
                "1 while the agent is connected to a NATS server.",
            ),
            connection_events: counter_vec(
                "guard_fleet_connection_events_total",
                "NATS connection events (connected, disconnected, …).",
                &["event"],
            ),
            caught_up: gauge(
                "guard_fleet_caught_up",
                "1 once the stream was replayed up to where it stood when the agent subscribed.",
            ),
            stream_sequence: gauge(
                "guard_fleet_stream_sequence",
                "The last stream sequence this agent has read.",
            ),
            follower_restarts: counter(
                "guard_fleet_follower_restarts_total",
                "Times the agent re-subscribed to the stream from its last sequence (a read \
                 error, or messages owed that did not arrive).",
            ),
            stream_present: gauge(
                "guard_fleet_stream_present",
                "1 while the stream this agent follows exists; 0 once it was found missing \
                 (deleted), until it is created again.",
            ),
            stream_resets: counter_vec(
                "guard_fleet_stream_resets_total",
                "Times the stream was found deleted, recreated (another stream under its name) \
                 or truncated (ending before what this agent had read); the agent then reads \
                 it again from its start.",
                &["kind"],
            ),
        };
        // Every series exists from the start, so `increase()` in an alert sees the first one.
        for action in ["block", "unblock"] {
            m.applied.with_label_values(&[action]);
        }
        for reason in DROP_REASONS {
            m.dropped.with_label_values(&[reason]);
        }
        for kind in ["deleted", "recreated", "truncated"] {
            m.stream_resets.with_label_values(&[kind]);
        }
        m
    }
}

/// Every `reason` of `guard_fleet_decisions_dropped_total`: not published (`queue_full`),
/// unreadable or out of bounds (`malformed`, `unknown_version`, `oversized`,
/// `host_mismatch`), or refused by this host (the rest, from the agent's `Applier`: the
/// rules every block meets, and what a fleet unblock may not lift).
pub const DROP_REASONS: [&str; 16] = [
    "queue_full",
    "malformed",
    "unknown_version",
    "oversized",
    "host_mismatch",
    "expired",
    "allowlisted",
    "too_wide",
    "future_dated",
    "rate_limited",
    "blocklist_full",
    "reserved",
    "share",
    "kernel_error",
    "superseded",
    "local_block",
];
