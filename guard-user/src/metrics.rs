//! The agent's Prometheus metrics. A scrape reads the per-CPU counters (a
//! few dozen syscalls) and maintained gauges: never a walk of a large map.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use guard_common::stats::{Stat, STAT_SLOTS};

pub struct Metrics {
    pub registry: Registry,
    packets: IntCounterVec,
    syn_seen: IntCounter,
    events_lost: IntCounter,
    conns_untracked: IntCounter,
    cookie_acks: IntCounterVec,
    handshakes: IntCounterVec,
    pub over_cap_events: IntCounterVec,
    pub blocklist_entries: IntGauge,
    pub blocklist_capacity: IntGauge,
    pub allowlist_entries: IntGauge,
    tracked_sources: IntGauge,
    sources_created: IntCounter,
    /// 1 when the last SIGHUP reload applied, 0 when it was refused or failed.
    pub reload_success: IntGauge,
    pub reload_success_time: IntGauge,
    pub block_reports: IntCounterVec,
    pub escalations: IntCounter,
    pub escalations_skipped: IntCounterVec,
    pub blocks_expired: IntCounter,
    pub unblocks: IntCounter,
    pub block_latency: Histogram,
    pub attach_info: IntGaugeVec,
    dry_run: IntGauge,
    config: IntGaugeVec,
    control_requests: IntCounterVec,
    control_refused: IntCounter,
    conns_tracked: IntGauge,
    pub adaptive_level: IntGauge,
    pub adaptive_changes: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

/// Brings a counter up to a total read elsewhere (kernel counters only
/// grow; if they went back, the maps were recreated and we start over).
fn sync_counter(c: &IntCounter, total: u64) {
    let cur = c.get();
    if total >= cur {
        c.inc_by(total - cur);
    } else {
        c.reset();
        c.inc_by(total);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "guard_block_latency_seconds",
                "From the app's detection of abuse to the kernel block being in place.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(latency.clone()))
            .expect("unique metric");
        let build = gauge_vec(
            &r,
            "guard_build_info",
            "The running agent's version.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …:
        // what an operator compares across agents and against MemoryMax.
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");
        let metrics = Self {
            packets: counter_vec(
                &r,
                "guard_packets_total",
                "Packets the guard program judged, by verdict and reason.",
                &["verdict", "reason"],
            ),
            syn_seen: counter(&r, "guard_syn_seen_total", "Connection-opening SYNs toward protected ports."),
            events_lost: counter(&r, "guard_events_lost_total", "Over-cap events the program could not queue."),
            conns_untracked: counter(
                &r,
                "guard_connections_untracked_total",
                "Established connections the kernel could not count (connection table full): their sources are not held to conn_limit.",
            ),
            cookie_acks: counter_vec(
                &r,
                "guard_syn_cookie_acks_total",
                "ACKs toward a listener checked as replies to a SYN cookie: valid (handed to the listener), invalid (not ours: left to the kernel), over_cap (proven source over its rate cap: dropped), conn_limit (proven source holding conn_limit connections: dropped), blocked (source blocked: dropped), limited (source, prefix or everyone out of invalid replies: dropped unchecked), assign_failed (the kernel refused the connection).",
                &["result"],
            ),
            handshakes: counter_vec(
                &r,
                "guard_handshakes_in_flight_total",
                "Handshakes charged to their source as in flight against conn_limit (charged), and charges taken back when the connection was established (completed); the rest expire after handshake_timeout_s.",
                &["event"],
            ),
            over_cap_events: counter_vec(
                &r,
                "guard_over_cap_events_total",
                "Over-cap events received from the kernel (one per source per window).",
                &["kind"],
            ),
            blocklist_entries: gauge(&r, "guard_blocklist_entries", "Prefixes blocked in the kernel."),
            blocklist_capacity: gauge(&r, "guard_blocklist_capacity", "Most prefixes the blocklist holds."),
            allowlist_entries: gauge(&r, "guard_allowlist_entries", "Allow-listed prefixes (incl. loopback and trusted proxies)."),
            tracked_sources: gauge(
                &r,
                "guard_tracked_sources",
                "Sources with per-source state in the kernel (upper bound: the LRU evicts silently).",
            ),
            sources_created: counter(
                &r,
                "guard_sources_created_total",
                "Per-source entries the kernel created (new sources; the table is an LRU, so \
                 rate() of this, not guard_tracked_sources, shows how many new sources arrive).",
            ),
            reload_success: gauge(
                &r,
                "guard_config_last_reload_successful",
                "1 when the last reload (SIGHUP) of the config file applied, 0 when it was refused.",
            ),
            reload_success_time: gauge(
                &r,
                "guard_config_last_reload_success_timestamp_seconds",
                "When the config was last loaded or reloaded successfully (unix seconds).",
            ),
            block_reports: counter_vec(
                &r,
                "guard_block_reports_total",
                "Block requests received, by result.",
                &["result"],
            ),
            escalations: counter(&r, "guard_escalations_total", "Sources blocked for staying over their cap."),
            escalations_skipped: counter_vec(
                &r,
                "guard_escalations_skipped_total",
                "Over-cap events that could not lead to a block, by why (unproven_source: fewer than half of the SYNs its cap admitted during the streak became connections, so they may carry a victim's address; offenders_full).",
                &["reason"],
            ),
            blocks_expired: counter(&r, "guard_blocks_expired_total", "Blocks removed when their TTL ran out."),
            unblocks: counter(&r, "guard_unblocks_total", "Blocks removed on request."),
            block_latency: latency,
            attach_info: gauge_vec(
                &r,
                "guard_attach_info",
                "Where the guard program is attached (1 per interface).",
                &["interface", "mode"],
            ),
            dry_run: gauge(&r, "guard_dry_run", "1 while drops are only counted (dry-run mode)."),
            config: gauge_vec(&r, "guard_config", "Live config values.", &["key"]),
            control_requests: counter_vec(
                &r,
                "guard_control_requests_total",
                "Control-socket requests, by request and result.",
                &["request", "result"],
            ),
            control_refused: counter(
                &r,
                "guard_control_refused_total",
                "Control-socket connections refused by the peer-credential check.",
            ),
            conns_tracked: gauge(
                &r,
                "guard_concurrent_connections_tracked",
                "Established connections toward protected ports, counted in the kernel.",
            ),
            adaptive_level: gauge(
                &r,
                "guard_adaptive_level",
                "Steps the adaptive mode has tightened per-source limits (0 = as configured).",
            ),
            adaptive_changes: counter(&r, "guard_adaptive_changes_total", "Adaptive limit changes."),
            registry: r,
        };
        // Every label value the agent uses exists from the start, at 0: dashboards and
        // alerts query these before the first block or over-cap event, and rate() over a
        // series that appears later misses its first increase.
        for result in ["added", "merged", "refused"] {
            metrics.block_reports.with_label_values(&[result]);
        }
        for kind in ["source", "aggregate", "conn_limit"] {
            metrics.over_cap_events.with_label_values(&[kind]);
        }
        metrics
    }

    /// Folds the kernel's per-CPU counter totals in.
    pub fn sync_stats(&self, totals: &[u64; STAT_SLOTS as usize], sources_capacity: u32) {
        for stat in Stat::ALL {
            let total = totals[stat.index() as usize];
            if let Some((verdict, reason)) = stat.labels() {
                sync_counter(&self.packets.with_label_values(&[verdict, reason]), total);
            }
        }
        sync_counter(&self.syn_seen, totals[Stat::SynSeen.index() as usize]);
        sync_counter(&self.events_lost, totals[Stat::EventsLost.index() as usize]);
        sync_counter(
            &self.conns_untracked,
            totals[Stat::ConnUntracked.index() as usize],
        );
        for (stat, result) in [
            (Stat::CookieAckValid, "valid"),
            (Stat::CookieAckInvalid, "invalid"),
            (Stat::CookieAckOverCap, "over_cap"),
            (Stat::CookieAckAssignFailed, "assign_failed"),
            (Stat::CookieAckConnLimit, "conn_limit"),
            (Stat::CookieAckBlocked, "blocked"),
            (Stat::CookieAckLimited, "limited"),
        ] {
            sync_counter(
                &self.cookie_acks.with_label_values(&[result]),
                totals[stat.index() as usize],
            );
        }
        for (stat, event) in [
            (Stat::HandshakeCharged, "charged"),
            (Stat::HandshakeCompleted, "completed"),
        ] {
            sync_counter(
                &self.handshakes.with_label_values(&[event]),
                totals[stat.index() as usize],
            );
        }
        let opened = totals[Stat::ConnOpened.index() as usize];
        let closed = totals[Stat::ConnClosed.index() as usize];
        self.conns_tracked.set(opened.saturating_sub(closed) as i64);
        let created = totals[Stat::SourcesCreated.index() as usize];
        self.tracked_sources
            .set(created.min(sources_capacity as u64) as i64);
        sync_counter(&self.sources_created, created);
    }

    /// The config (file and flags) is in force as loaded: at start and after a reload.
    pub fn mark_config_loaded(&self) {
        self.reload_success.set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.reload_success_time.set(now.as_secs() as i64);
    }

    pub fn sync_config(&self, cfg: &guard_common::LiveConfig) {
        self.dry_run.set(cfg.dry_run() as i64);
        for (key, value) in guard_common::config_kv::config_entries(cfg) {
            let numeric = match value.as_str() {
                "true" => 1,
                "false" => 0,
                // Named choices (syn_cookies) as their index: off = 0.
                v => v.parse().unwrap_or_else(|_| {
                    guard_common::syncookie::MODE_NAMES
                        .iter()
                        .position(|n| *n == v)
                        .unwrap_or(0) as i64
                }),
            };
            self.config.with_label_values(&[key]).set(numeric);
        }
    }

    pub fn sync_control(&self, snap: &crate::control::ControlStatsSnapshot) {
        sync_counter(&self.control_refused, snap.refused_peer);
        for rc in &snap.requests {
            sync_counter(
                &self.control_requests.with_label_values(&[rc.kind, "ok"]),
                rc.ok,
            );
            sync_counter(
                &self.control_requests.with_label_values(&[rc.kind, "error"]),
                rc.error,
            );
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
