//! The running agent: owns the maps, answers the control socket, turns
//! reports and over-cap events into expiring kernel blocks, sweeps expiries,
//! serves metrics, and reloads on SIGHUP.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use guard_common::{
    addr::{Addr, Prefix, MAX_PREFIX_LEN},
    config::{FLAG_ALLOW_EMPTY, FLAG_BLOCK_EMPTY},
    config_kv,
    event::{EVENT_AGGREGATE_OVER_CAP, EVENT_CONN_LIMIT, EVENT_SOURCE_OVER_CAP},
    proto::{
        cap_str, BlockInfo, BlockOutcome, ErrorCode, Request, Response, MAX_LIST_ENTRIES,
        MAX_ORIGIN_LEN,
    },
    state::reason,
    BlockEntry, LiveConfig, OverCapEvent,
};
use log::{error, info, warn};
use tokio::io::unix::AsyncFd;

use crate::{
    audit::AuditLog,
    control::{ControlHandler, ControlServer, ControlServerConfig, ControlStats, PeerInfo},
    datapath::{monotonic_ns, Datapath, GuardMaps},
    metrics::Metrics,
    paths::PinLayout,
    settings::{RunArgs, Settings},
};

/// What the agent remembers about a block beyond the kernel entry.
#[derive(Clone, Debug)]
struct BlockMeta {
    expires_ns: u64,
    reason: u32,
    origin: String,
    /// When the block was last decided or extended (Unix ns; 0 when adopted
    /// from an earlier run): a fleet unblock older than this does not lift it.
    decided_unix_ns: u64,
}

/// Who decided a block: this host (the fleet hears of it) or another host
/// of the fleet (applied here, never sent back).
#[derive(Clone, Copy, Debug)]
enum DecidedBy {
    Here { level: u32 },
    Fleet { decided_unix_ns: u64 },
}

/// Sources over their cap being watched for escalation at once. Only
/// sources that completed a handshake get in, so this is far above what a
/// real incident holds; beyond it new ones are counted, not watched.
const MAX_OFFENDERS: usize = 65_536;

#[derive(Default, Debug)]
struct Offender {
    streak_start_ns: u64,
    last_event_ns: u64,
    strikes: u32,
}

pub struct Agent {
    maps: Mutex<GuardMaps>,
    settings: Mutex<Settings>,
    blocks: Mutex<HashMap<Prefix, BlockMeta>>,
    offenders: Mutex<HashMap<Prefix, Offender>>,
    pub metrics: Metrics,
    audit: AuditLog,
    control_stats: Mutex<Option<Arc<ControlStats>>>,
    /// Connection tracking counts only this namespace's sockets.
    netns_cookie: u64,
    adaptive: Mutex<(crate::adaptive::Controller, u64)>,
    /// `blocks.len()`, readable without the blocks lock (the config write
    /// needs it while other locks are held).
    blocks_len: AtomicUsize,
    /// What a cookie SYN-ACK must say on this host, and whether cookies
    /// can work here at all (why not, if not).
    cookie_host: crate::cookies::HostParams,
    cookies_unavailable: Option<&'static str>,
    cookie_keys: Mutex<crate::cookies::KeyRotation>,
    /// Where this host's decisions go to the fleet, once it is linked.
    fleet: std::sync::OnceLock<Arc<crate::fleet::Outbox>>,
}

/// What goes into the kernel's allowlist: loopback never reaches an
/// interface guard attaches to (the stack drops martian sources), so it is
/// only honoured here, in the refusal of block requests; leaving it out
/// lets the program skip the allowlist lookup while the list is empty.
fn kernel_allows(s: &Settings) -> impl Iterator<Item = &Prefix> {
    let loopback = crate::settings::loopback();
    s.allow.iter().filter(move |p| !loopback.contains(p))
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn origin_of(peer: &PeerInfo) -> String {
    let name = if peer.client_name.is_empty() {
        "client"
    } else {
        peer.client_name.as_str()
    };
    let pid = peer.pid.map(|p| format!(",pid={p}")).unwrap_or_default();
    let text = format!("{}:uid={}{pid}", cap_str(name, 24), peer.uid);
    cap_str(&text, MAX_ORIGIN_LEN).to_string()
}

impl Agent {
    fn new(
        maps: GuardMaps,
        mut settings: Settings,
        audit: AuditLog,
        netns_cookie: u64,
        cookies_supported: bool,
    ) -> Self {
        settings.live.conn_netns_cookie = netns_cookie;
        let cookie_host = crate::cookies::HostParams::detect(&settings.interfaces);
        let metrics = Metrics::new();
        metrics
            .blocklist_capacity
            .set(settings.blocks.capacity as i64);
        metrics.mark_config_loaded();
        Self {
            maps: Mutex::new(maps),
            settings: Mutex::new(settings),
            blocks: Mutex::new(HashMap::new()),
            offenders: Mutex::new(HashMap::new()),
            metrics,
            audit,
            control_stats: Mutex::new(None),
            netns_cookie,
            blocks_len: AtomicUsize::new(0),
            cookies_unavailable: crate::cookies::unavailable_reason(
                cookies_supported,
                &cookie_host,
            ),
            cookie_host,
            cookie_keys: Mutex::new(crate::cookies::KeyRotation::default()),
            fleet: std::sync::OnceLock::new(),
            adaptive: Mutex::new((
                crate::adaptive::Controller::new(),
                crate::adaptive::read_distress_counters().unwrap_or(0),
            )),
        }
    }

    /// What the kernel runs with: the operator's config, tightened by the
    /// adaptive level, with this namespace's cookie for connection tracking.
    fn effective(&self, s: &Settings) -> LiveConfig {
        let level = self.adaptive.lock().expect("adaptive lock").0.level;
        let mut c = LiveConfig {
            conn_netns_cookie: self.netns_cookie,
            ..crate::adaptive::effective(&s.live, &s.adaptive, level)
        };
        self.cookie_host.apply(&mut c);
        c.flags &= !(FLAG_ALLOW_EMPTY | FLAG_BLOCK_EMPTY);
        if kernel_allows(s).next().is_none() {
            c.flags |= FLAG_ALLOW_EMPTY;
        }
        if self.blocks_len.load(Ordering::SeqCst) == 0 {
            c.flags |= FLAG_BLOCK_EMPTY;
        }
        c
    }

    /// Rewrites the kernel's config from the current state (after the
    /// allowlist or blocklist went empty or stopped being empty).
    fn refresh_config(&self) {
        let s = self.settings.lock().expect("settings lock");
        let cfg = self.effective(&s);
        drop(s);
        if let Err(e) = self.maps().set_config(&cfg) {
            error!("write the live config: {e}");
        }
    }

    /// Keeps `blocks_len` in step; when the blocklist just emptied, lets
    /// the program skip its lookup again.
    fn blocks_changed(&self, len: usize) {
        let before = self.blocks_len.swap(len, Ordering::SeqCst);
        if len == 0 && before != 0 {
            self.refresh_config();
        }
    }

    /// One adaptive step: reads the server's handshake-loss counters and
    /// moves the level when the controller says so.
    pub fn adaptive_tick(&self) {
        let s = self.settings.lock().expect("settings lock");
        if !s.adaptive.enabled {
            return;
        }
        let now_total = match crate::adaptive::read_distress_counters() {
            Ok(v) => v,
            Err(e) => {
                warn!("adaptive: cannot read /proc/net/netstat: {e}");
                return;
            }
        };
        let changed = {
            let mut guard = self.adaptive.lock().expect("adaptive lock");
            let (controller, last_total) = &mut *guard;
            let distressed = now_total > *last_total;
            *last_total = now_total;
            let before = controller.level;
            let changed = controller.tick(distressed, Instant::now(), s.adaptive.calm);
            // At the floors another step changes nothing but would make
            // the way back longer: stay where tightening last mattered.
            if let Some(level) = changed {
                let at = |l| crate::adaptive::effective(&s.live, &s.adaptive, l);
                let (a, b) = (at(before), at(level));
                if level > before && (a.syn_rate, a.syn_burst) == (b.syn_rate, b.syn_burst) {
                    controller.level = before;
                    return;
                }
            }
            changed
        };
        let Some(level) = changed else {
            return;
        };
        let cfg = self.effective(&s);
        if let Err(e) = self.maps().set_config(&cfg) {
            error!("adaptive: write the live config: {e}");
            return;
        }
        drop(s);
        self.metrics.adaptive_level.set(level as i64);
        self.metrics.adaptive_changes.inc();
        self.metrics.sync_config(&cfg);
        let detail = format!(
            "level {level}: syn_rate={} syn_burst={}",
            cfg.syn_rate, cfg.syn_burst
        );
        info!("adaptive limits {detail}");
        self.audit
            .record("adaptive", None, None, None, "adaptive", None, &detail);
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, GuardMaps> {
        self.maps.lock().expect("maps lock")
    }

    /// Refuses cookies where they cannot work, with the reason.
    fn check_cookies(&self, live: &LiveConfig) -> std::result::Result<(), &'static str> {
        match self.cookies_unavailable {
            Some(why) if live.cookies_enabled() => Err(why),
            _ => Ok(()),
        }
    }

    /// Provisions the SYN cookie keys (keeping those an earlier run's
    /// outstanding cookies need).
    fn start_cookie_keys(&self) -> Result<()> {
        let mut maps = self.maps();
        self.cookie_keys
            .lock()
            .expect("cookie keys lock")
            .start(&mut maps)
            .context("provision the SYN cookie keys")
    }

    /// Once per tick: the next epoch's key, when its time has come.
    pub fn rotate_cookie_keys(&self) {
        let mut maps = self.maps();
        self.cookie_keys
            .lock()
            .expect("cookie keys lock")
            .tick(&mut maps);
    }

    /// Puts settings into the kernel: live config, ports, allow-list.
    fn apply(&self, s: &Settings) -> Result<()> {
        self.check_cookies(&s.live).map_err(anyhow::Error::msg)?;
        let mut maps = self.maps();
        let live = self.effective(s);
        maps.set_config(&live).context("write the live config")?;
        maps.set_ports(&s.ports)
            .context("write the protected ports")?;
        let current = maps.allows().context("read the allow-list")?;
        for p in kernel_allows(s) {
            if !current.contains(p) {
                maps.insert_allow(p).with_context(|| format!("allow {p}"))?;
            }
        }
        for p in current
            .iter()
            .filter(|p| !kernel_allows(s).any(|k| k == *p))
        {
            maps.remove_allow(p)
                .with_context(|| format!("disallow {p}"))?;
        }
        self.metrics.allowlist_entries.set(s.allow.len() as i64);
        self.metrics.sync_config(&live);
        Ok(())
    }

    /// Loads the blocks an earlier run left in the kernel.
    fn adopt_blocks(&self) -> Result<()> {
        let entries = self.maps().blocks().context("read pinned blocks")?;
        let mut blocks = self.blocks.lock().expect("blocks lock");
        for (prefix, entry) in entries {
            blocks.insert(
                prefix,
                BlockMeta {
                    expires_ns: entry.expires_ns,
                    reason: entry.reason,
                    origin: "adopted".into(),
                    decided_unix_ns: 0,
                },
            );
        }
        self.metrics.blocklist_entries.set(blocks.len() as i64);
        self.blocks_len.store(blocks.len(), Ordering::SeqCst);
        if !blocks.is_empty() {
            info!("adopted {} blocks from the pinned blocklist", blocks.len());
        }
        drop(blocks);
        self.refresh_config();
        Ok(())
    }

    /// Refuses what must never be blocked: anything overlapping the
    /// allow-list (loopback and trusted proxies are on it).
    fn protected_overlap(&self, prefix: &Prefix) -> Option<Prefix> {
        let s = self.settings.lock().expect("settings lock");
        s.allow
            .iter()
            .find(|a| a.contains_prefix(prefix) || prefix.contains_prefix(a))
            .copied()
    }

    /// Adds or extends a block. `detected_at_unix_ns` feeds the latency
    /// histogram.
    pub fn block(
        &self,
        prefix: Prefix,
        ttl: Option<Duration>,
        reason_code: u32,
        origin: &str,
        detected_at_unix_ns: u64,
        detail: &str,
    ) -> Response {
        self.block_decided(
            prefix,
            ttl,
            reason_code,
            origin,
            detected_at_unix_ns,
            detail,
            DecidedBy::Here { level: 0 },
        )
    }

    /// Tells the fleet, if linked, what this host decided.
    fn share(&self, decision: crate::fleet::Decision) {
        if let Some(outbox) = self.fleet.get() {
            outbox.push(decision);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn block_decided(
        &self,
        prefix: Prefix,
        ttl: Option<Duration>,
        reason_code: u32,
        origin: &str,
        detected_at_unix_ns: u64,
        detail: &str,
        by: DecidedBy,
    ) -> Response {
        let result = |outcome: BlockOutcome, text: String, expires: u32| Response::BlockResult {
            outcome,
            reason_text: text,
            expires_in_secs: expires,
        };
        if let Some(allowed) = self.protected_overlap(&prefix) {
            self.metrics
                .block_reports
                .with_label_values(&["refused"])
                .inc();
            return result(
                BlockOutcome::Refused,
                format!("{prefix} overlaps allow-listed {allowed} (loopback, trusted proxy or operator allow-list)"),
                0,
            );
        }
        let (default_ttl, max_ttl, capacity) = {
            let s = self.settings.lock().expect("settings lock");
            (s.blocks.default_ttl, s.blocks.max_ttl, s.blocks.capacity)
        };
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(default_ttl)
            .min(max_ttl);
        let now = monotonic_ns();
        let expires_ns = now + ttl.as_nanos() as u64;
        let mut blocks = self.blocks.lock().expect("blocks lock");
        let merged = blocks.get(&prefix).cloned();
        if merged.is_none() && blocks.len() as u32 >= capacity {
            self.metrics
                .block_reports
                .with_label_values(&["refused"])
                .inc();
            return result(
                BlockOutcome::Refused,
                format!("blocklist full ({capacity} entries)"),
                0,
            );
        }
        let expires_ns = match &merged {
            // Never shorten a block, never make a permanent one expire.
            Some(old) if old.expires_ns == 0 => 0,
            Some(old) => old.expires_ns.max(expires_ns),
            None => expires_ns,
        };
        let extended = merged
            .as_ref()
            .is_none_or(|old| old.expires_ns != expires_ns);
        let decided_unix_ns = match by {
            DecidedBy::Here { .. } => unix_now_ns(),
            DecidedBy::Fleet { decided_unix_ns } => decided_unix_ns,
        };
        let entry = BlockEntry {
            expires_ns,
            reason: merged.as_ref().map_or(reason_code, |m| m.reason),
            _pad: 0,
        };
        if blocks.is_empty() {
            // The program skips the blocklist while it is empty: tell it
            // to look before the first entry lands.
            self.blocks_len.store(1, Ordering::SeqCst);
            self.refresh_config();
        }
        if let Err(e) = self.maps().insert_block(&prefix, &entry) {
            error!("block {prefix}: {e}");
            return Response::error(
                ErrorCode::Internal,
                format!("kernel map update failed: {e}"),
            );
        }
        if detected_at_unix_ns != 0 {
            let latency = unix_now_ns().saturating_sub(detected_at_unix_ns);
            self.metrics.block_latency.observe(latency as f64 / 1e9);
        }
        let remaining = if expires_ns == 0 {
            0
        } else {
            ((expires_ns - now) / 1_000_000_000).max(1) as u32
        };
        let detected = (detected_at_unix_ns != 0)
            .then(|| UNIX_EPOCH + Duration::from_nanos(detected_at_unix_ns));
        if let (DecidedBy::Here { level }, true) = (by, extended) {
            let expires_unix_ms = if expires_ns == 0 {
                0
            } else {
                (decided_unix_ns + (expires_ns - now)) / 1_000_000
            };
            self.share(crate::fleet::Decision {
                action: crate::fleet::Action::Block,
                prefix: prefix.to_string(),
                expires_unix_ms,
                decided_unix_ms: decided_unix_ns / 1_000_000,
                reason: reason::name(entry.reason).to_string(),
                origin: origin.to_string(),
                level,
                detail: cap_str(detail, 200).to_string(),
            });
        }
        match merged {
            Some(_) => {
                let meta = blocks.get_mut(&prefix).expect("present");
                meta.expires_ns = expires_ns;
                meta.decided_unix_ns = meta.decided_unix_ns.max(decided_unix_ns);
                self.metrics
                    .block_reports
                    .with_label_values(&["merged"])
                    .inc();
                result(
                    BlockOutcome::Merged,
                    format!("{prefix} was already blocked; expiry extended"),
                    remaining,
                )
            }
            None => {
                blocks.insert(
                    prefix,
                    BlockMeta {
                        expires_ns,
                        reason: reason_code,
                        origin: origin.to_string(),
                        decided_unix_ns,
                    },
                );
                self.metrics.blocklist_entries.set(blocks.len() as i64);
                self.blocks_len.store(blocks.len(), Ordering::SeqCst);
                self.metrics
                    .block_reports
                    .with_label_values(&["added"])
                    .inc();
                drop(blocks);
                self.audit.record(
                    if reason_code == reason::ESCALATED_OVER_CAP {
                        "escalate"
                    } else {
                        "block"
                    },
                    Some(&prefix),
                    Some(ttl.as_secs()),
                    Some(reason::name(reason_code)),
                    origin,
                    detected,
                    detail,
                );
                result(BlockOutcome::Added, format!("{prefix} blocked"), remaining)
            }
        }
    }

    pub fn unblock(&self, prefix: &Prefix, origin: &str) -> Response {
        let resp = self.unblock_entry(prefix, origin);
        if matches!(resp, Response::Ok) {
            self.share(crate::fleet::Decision {
                action: crate::fleet::Action::Unblock,
                prefix: prefix.to_string(),
                expires_unix_ms: 0,
                decided_unix_ms: unix_now_ns() / 1_000_000,
                reason: String::new(),
                origin: origin.to_string(),
                level: 0,
                detail: String::new(),
            });
        }
        resp
    }

    fn unblock_entry(&self, prefix: &Prefix, origin: &str) -> Response {
        let existed = match self.maps().remove_block(prefix) {
            Ok(existed) => existed,
            Err(e) => return Response::error(ErrorCode::Internal, e.to_string()),
        };
        let mut blocks = self.blocks.lock().expect("blocks lock");
        let known = blocks.remove(prefix).is_some();
        self.metrics.blocklist_entries.set(blocks.len() as i64);
        let len = blocks.len();
        drop(blocks);
        self.blocks_changed(len);
        if existed || known {
            self.metrics.unblocks.inc();
            self.audit
                .record("unblock", Some(prefix), None, None, origin, None, "");
            Response::Ok
        } else {
            Response::error(ErrorCode::NotFound, format!("{prefix} is not blocked"))
        }
    }

    /// Removes blocks whose time is up. The kernel already ignores them;
    /// this keeps the map and the counts honest.
    pub fn sweep_expired(&self) {
        let now = monotonic_ns();
        let expired: Vec<(Prefix, BlockMeta)> = {
            let blocks = self.blocks.lock().expect("blocks lock");
            blocks
                .iter()
                .filter(|(_, m)| m.expires_ns != 0 && m.expires_ns <= now)
                .map(|(p, m)| (*p, m.clone()))
                .collect()
        };
        for (prefix, meta) in expired {
            if let Err(e) = self.maps().remove_block(&prefix) {
                warn!("expire {prefix}: {e}");
                continue;
            }
            let mut blocks = self.blocks.lock().expect("blocks lock");
            blocks.remove(&prefix);
            self.metrics.blocklist_entries.set(blocks.len() as i64);
            let len = blocks.len();
            drop(blocks);
            self.blocks_changed(len);
            self.metrics.blocks_expired.inc();
            self.audit.record(
                "expire",
                Some(&prefix),
                None,
                Some(reason::name(meta.reason)),
                &meta.origin,
                None,
                "",
            );
        }
        // Offenders that went quiet long ago are forgotten, keeping the
        // table bounded by the sources actually over their cap.
        let mut offenders = self.offenders.lock().expect("offenders lock");
        offenders.retain(|_, o| now.saturating_sub(o.last_event_ns) < 3600 * 1_000_000_000);
    }

    /// One over-cap event from the kernel.
    pub fn on_event(&self, ev: &OverCapEvent) {
        let kind = match ev.kind {
            EVENT_SOURCE_OVER_CAP => "source",
            EVENT_AGGREGATE_OVER_CAP => "aggregate",
            EVENT_CONN_LIMIT => "conn_limit",
            _ => "other",
        };
        self.metrics
            .over_cap_events
            .with_label_values(&[kind])
            .inc();
        let prefix = Prefix::new(ev.addr, (ev.prefix_len as u32).min(MAX_PREFIX_LEN));
        // Escalation only ever blocks a single source: an aggregate prefix
        // holds legitimate neighbours too.
        if ev.kind != EVENT_SOURCE_OVER_CAP || ev.dry_run != 0 {
            return;
        }
        let (esc, interval_ns) = {
            let s = self.settings.lock().expect("settings lock");
            (s.escalation.clone(), s.live.event_interval_ns())
        };
        if !esc.enabled {
            return;
        }
        let now = ev.ts_ns;
        // Only a source that proved its address can be blocked for its rate:
        // SYNs carry any source address an attacker writes, so a streak of
        // over-cap SYNs alone would let anyone get a victim blocked (about 21
        // spoofed SYN/s for 10 s did it). Proof is a handshake completed by
        // this kernel during the streak or just before it; a SYN-only flood
        // stays where the cap already drops it, and never enters the table.
        let window = esc.over_cap_for.as_nanos() as u64 + 2 * interval_ns + 1_000_000_000;
        if !self.completed_handshake_within(&ev.addr, now, window) {
            self.metrics
                .escalations_skipped
                .with_label_values(&["unproven_source"])
                .inc();
            return;
        }
        let ttl = {
            let mut offenders = self.offenders.lock().expect("offenders lock");
            if offenders.len() >= MAX_OFFENDERS && !offenders.contains_key(&prefix) {
                self.metrics
                    .escalations_skipped
                    .with_label_values(&["offenders_full"])
                    .inc();
                return;
            }
            let o = offenders.entry(prefix).or_default();
            // Events come once per window while the source stays over:
            // a gap longer than two windows ends the streak.
            if o.last_event_ns == 0
                || now.saturating_sub(o.last_event_ns) > 2 * interval_ns + 1_000_000_000
            {
                o.streak_start_ns = now;
            }
            o.last_event_ns = now;
            if now.saturating_sub(o.streak_start_ns) < esc.over_cap_for.as_nanos() as u64 {
                return;
            }
            let factor = 1u32.checked_shl(o.strikes).unwrap_or(u32::MAX);
            let ttl = esc.ttl.saturating_mul(factor).min(esc.max_ttl);
            o.strikes = o.strikes.saturating_add(1);
            o.streak_start_ns = now;
            (ttl, o.strikes)
        };
        let (ttl, level) = ttl;
        let resp = self.block_decided(
            prefix,
            Some(ttl),
            reason::ESCALATED_OVER_CAP,
            "kernel:over_cap",
            0,
            &format!(
                "over its SYN cap for {}s ({} SYNs, {} over)",
                esc.over_cap_for.as_secs(),
                ev.syns,
                ev.over_cap
            ),
            DecidedBy::Here { level },
        );
        if matches!(
            resp,
            Response::BlockResult {
                outcome: BlockOutcome::Added,
                ..
            }
        ) {
            self.metrics.escalations.inc();
            warn!(
                "escalated {prefix} to the blocklist for {}s: over its SYN cap for {}s",
                ttl.as_secs(),
                esc.over_cap_for.as_secs()
            );
        }
    }

    /// Whether the kernel saw `key` (a source, as the datapath keys it)
    /// complete a handshake toward a protected port within `window` before
    /// `now` (both on the kernel's monotonic clock).
    fn completed_handshake_within(&self, key: &Addr, now: u64, window: u64) -> bool {
        match self.maps().known_good.get(key, 0) {
            Ok(at) => at <= now.saturating_add(1_000_000_000) && now.saturating_sub(at) <= window,
            Err(_) => false,
        }
    }

    fn prune_connections(&self) {
        match self.maps().prune_idle_connections() {
            Ok(0) => {}
            Ok(n) => log::debug!("pruned {n} idle connection counters"),
            Err(e) => warn!("prune connection counters: {e}"),
        }
    }

    pub fn render_metrics(&self) -> String {
        let sizes = self.settings.lock().expect("settings lock").map_sizes;
        match self.maps().stat_totals() {
            Ok(totals) => self.metrics.sync_stats(&totals, sizes.sources),
            Err(e) => warn!("read kernel counters: {e}"),
        }
        if let Some(stats) = self.control_stats.lock().expect("stats lock").as_ref() {
            self.metrics.sync_control(&stats.snapshot());
        }
        self.metrics.render()
    }

    fn set_config(&self, changes: &[(String, String)], origin: &str) -> Response {
        let mut s = self.settings.lock().expect("settings lock");
        let new = match config_kv::apply_config_changes(&s.live, changes) {
            Ok(c) => c,
            Err(e) => return Response::error(ErrorCode::Invalid, e.to_string()),
        };
        if let Err(e) = new.validate() {
            return Response::error(ErrorCode::Invalid, e.to_string());
        }
        if let Err(why) = self.check_cookies(&new) {
            return Response::error(ErrorCode::Invalid, why);
        }
        s.live = new;
        let effective = self.effective(&s);
        if let Err(e) = self.maps().set_config(&effective) {
            return Response::error(ErrorCode::Invalid, e.to_string());
        }
        self.metrics.sync_config(&effective);
        drop(s);
        let detail: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.audit
            .record("config", None, None, None, origin, None, &detail.join(" "));
        Response::Config {
            entries: config_entries(&new),
        }
    }

    fn set_allow(&self, prefix: Prefix, allow: bool, origin: &str) -> Response {
        let mut s = self.settings.lock().expect("settings lock");
        let is_loopback = crate::settings::loopback().contains(&prefix);
        if allow {
            if !s.allow.contains(&prefix) {
                s.allow.push(prefix);
            }
            if !is_loopback {
                // Clear "allowlist empty" before the entry lands.
                let cfg = self.effective(&s);
                let mut maps = self.maps();
                if let Err(e) = maps
                    .set_config(&cfg)
                    .and_then(|()| maps.insert_allow(&prefix))
                {
                    return Response::error(ErrorCode::Internal, e.to_string());
                }
            }
        } else {
            if is_loopback || s.trusted_proxies.contains(&prefix) {
                return Response::error(
                    ErrorCode::Invalid,
                    format!("{prefix} is loopback or a trusted proxy and stays allowed"),
                );
            }
            match self.maps().remove_allow(&prefix) {
                Ok(true) => {}
                Ok(false) => {
                    return Response::error(
                        ErrorCode::NotFound,
                        format!("{prefix} is not allow-listed"),
                    )
                }
                Err(e) => return Response::error(ErrorCode::Internal, e.to_string()),
            }
            s.allow.retain(|p| *p != prefix);
            let cfg = self.effective(&s);
            if let Err(e) = self.maps().set_config(&cfg) {
                return Response::error(ErrorCode::Internal, e.to_string());
            }
        }
        self.metrics.allowlist_entries.set(s.allow.len() as i64);
        drop(s);
        self.audit.record(
            if allow { "allow" } else { "disallow" },
            Some(&prefix),
            None,
            None,
            origin,
            None,
            "",
        );
        Response::Ok
    }

    /// Where `prefix` stands toward escalation (for `guard explain`).
    fn escalation(&self, prefix: &Prefix) -> Response {
        let interval_ns = self
            .settings
            .lock()
            .expect("settings lock")
            .live
            .event_interval_ns();
        let offenders = self.offenders.lock().expect("offenders lock");
        let Some(o) = offenders.get(prefix) else {
            return Response::Escalation {
                tracked: false,
                strikes: 0,
                streak_secs: 0,
            };
        };
        // Event times are the kernel's monotonic clock, as on_event sees them.
        let now = monotonic_ns();
        // The same gap that on_event takes as the end of a streak.
        let ongoing = now.saturating_sub(o.last_event_ns) <= 2 * interval_ns + 1_000_000_000;
        Response::Escalation {
            tracked: true,
            strikes: o.strikes,
            streak_secs: if ongoing {
                (now.saturating_sub(o.streak_start_ns) / 1_000_000_000) as u32
            } else {
                0
            },
        }
    }

    fn stats_counters(&self) -> Response {
        let totals = match self.maps().stat_totals() {
            Ok(t) => t,
            Err(e) => return Response::error(ErrorCode::Internal, e.to_string()),
        };
        let mut counters: Vec<(String, u64)> = guard_common::stats::Stat::ALL
            .iter()
            .map(|s| (s.name().to_string(), totals[s.index() as usize]))
            .collect();
        counters.push((
            "blocklist_entries".into(),
            self.blocks.lock().expect("blocks lock").len() as u64,
        ));
        Response::Stats { counters }
    }

    fn list_blocks(&self, offset: u32, limit: u32) -> Response {
        let now = monotonic_ns();
        // Only the keys are copied under the lock (reports wait on it); the
        // page is picked outside it, and its origins looked up after.
        let mut all: Vec<Prefix> = self
            .blocks
            .lock()
            .expect("blocks lock")
            .keys()
            .copied()
            .collect();
        let total = all.len() as u64;
        let page = guard_common::proto::page_sorted(
            &mut all,
            offset as usize,
            limit.min(MAX_LIST_ENTRIES) as usize,
        );
        let blocks = self.blocks.lock().expect("blocks lock");
        let entries = page
            .iter()
            // Gone meanwhile (unblocked or expired): no longer blocked.
            .filter_map(|p| blocks.get(p).map(|m| (p, m)))
            .map(|(p, m)| BlockInfo {
                prefix: *p,
                reason: m.reason,
                expires_in_secs: if m.expires_ns == 0 {
                    0
                } else {
                    (m.expires_ns.saturating_sub(now) / 1_000_000_000).max(1) as u32
                },
                origin: cap_str(&m.origin, MAX_ORIGIN_LEN).to_string(),
            })
            .collect();
        Response::Blocks { total, entries }
    }

    /// SIGHUP: re-read the config file, apply it live, reopen the audit log.
    pub fn reload(&self, args: &RunArgs) {
        if let Err(e) = self.audit.reopen() {
            error!("reopen the audit log: {e}");
        }
        let new = match Settings::load(args) {
            Ok(s) => s,
            Err(e) => {
                error!("reload refused, keeping the running config: {e:#}");
                self.metrics.reload_success.set(0);
                return;
            }
        };
        let old_ifaces = self
            .settings
            .lock()
            .expect("settings lock")
            .interfaces
            .clone();
        if new.interfaces != old_ifaces {
            warn!("interfaces changed in the config file; restart the agent to attach elsewhere (keeping {old_ifaces:?})");
        }
        let old_level = self
            .settings
            .lock()
            .expect("settings lock")
            .log_level
            .clone();
        if new.log_level != old_level {
            apply_log_level(new.log_level.as_deref());
        }
        let old_fleet = self.settings.lock().expect("settings lock").fleet.clone();
        if new.fleet != old_fleet {
            warn!("[fleet] changed in the config file; it takes effect when the agent restarts");
        }
        match self.apply(&new) {
            Ok(()) => {
                self.metrics
                    .blocklist_capacity
                    .set(new.blocks.capacity as i64);
                let detail = format!(
                    "reloaded {}",
                    new.config_file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
                let mut new = Settings {
                    interfaces: old_ifaces,
                    ..new
                };
                new.live.conn_netns_cookie = self.netns_cookie;
                *self.settings.lock().expect("settings lock") = new;
                self.audit
                    .record("config", None, None, None, "operator:sighup", None, &detail);
                self.metrics.mark_config_loaded();
                info!("configuration reloaded");
            }
            Err(e) => {
                self.metrics.reload_success.set(0);
                error!("reload failed half-way: {e:#}")
            }
        }
    }
}

/// Puts guard.toml's `log_level` in force (at start and on SIGHUP).
fn apply_log_level(level: Option<&str>) {
    match crate::logging::apply_level(level) {
        Ok(crate::logging::Applied::Set) => {
            info!(
                "log level: {}",
                level.unwrap_or(crate::logging::DEFAULT_FILTER)
            )
        }
        Ok(crate::logging::Applied::EnvWins) if level.is_some() => {
            warn!("RUST_LOG is set, so log_level in the config file is not applied")
        }
        Ok(_) => {}
        // Settings::load checked it; kept for a caller that did not.
        Err(e) => warn!("{e}"),
    }
}

fn config_entries(c: &LiveConfig) -> Vec<(String, String)> {
    config_kv::config_entries(c)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

impl crate::fleet::Applier for Agent {
    fn apply_remote(&self, host: &str, d: &crate::fleet::Decision) -> crate::fleet::Applied {
        use crate::fleet::{Action, Applied};
        let Ok(prefix) = d.prefix.parse::<Prefix>() else {
            return Applied::Dropped("malformed");
        };
        let origin = cap_str(&format!("fleet:{host}"), MAX_ORIGIN_LEN).to_string();
        let decided_unix_ns = d.decided_unix_ms.saturating_mul(1_000_000);
        match d.action {
            Action::Block => {
                // Expiry is absolute: a late or replayed decision keeps only
                // what is left of it, and one from a clock far ahead is held
                // to this host's widest TTL by `block_decided`.
                let now_ms = crate::fleet::unix_now_ms();
                let ttl = if d.expires_unix_ms == 0 {
                    None
                } else if d.expires_unix_ms <= now_ms {
                    return Applied::Dropped("expired");
                } else {
                    Some(Duration::from_millis(d.expires_unix_ms - now_ms))
                };
                if self.protected_overlap(&prefix).is_some() {
                    return Applied::Dropped("allowlisted");
                }
                let ttl =
                    ttl.unwrap_or(self.settings.lock().expect("settings lock").blocks.max_ttl);
                let before = self
                    .blocks
                    .lock()
                    .expect("blocks lock")
                    .get(&prefix)
                    .map(|m| m.expires_ns);
                let reason_code = reason::from_name(&d.reason).unwrap_or(reason::OTHER);
                let detail = format!("{} on {host}: {}", d.origin, d.detail);
                match self.block_decided(
                    prefix,
                    Some(ttl),
                    reason_code,
                    &origin,
                    0,
                    cap_str(&detail, 240),
                    DecidedBy::Fleet { decided_unix_ns },
                ) {
                    Response::BlockResult {
                        outcome: BlockOutcome::Added,
                        ..
                    } => Applied::Changed,
                    Response::BlockResult {
                        outcome: BlockOutcome::Merged,
                        ..
                    } => {
                        let after = self
                            .blocks
                            .lock()
                            .expect("blocks lock")
                            .get(&prefix)
                            .map(|m| m.expires_ns);
                        if after != before {
                            Applied::Changed
                        } else {
                            Applied::Unchanged
                        }
                    }
                    Response::BlockResult { .. } => Applied::Dropped("blocklist_full"),
                    _ => Applied::Dropped("kernel_error"),
                }
            }
            Action::Unblock => {
                let newer_here = self
                    .blocks
                    .lock()
                    .expect("blocks lock")
                    .get(&prefix)
                    .map(|m| m.decided_unix_ns > decided_unix_ns);
                match newer_here {
                    None => Applied::Unchanged,
                    // Blocked again here after that host lifted it.
                    Some(true) => Applied::Dropped("superseded"),
                    Some(false) => match self.unblock_entry(&prefix, &origin) {
                        Response::Ok => Applied::Changed,
                        _ => Applied::Unchanged,
                    },
                }
            }
        }
    }
}

impl ControlHandler for Agent {
    fn handle(&self, peer: &PeerInfo, req: Request) -> Response {
        let origin = origin_of(peer);
        match req {
            Request::Hello { .. } => Response::error(ErrorCode::Unexpected, "already greeted"),
            Request::Block {
                prefix,
                ttl_secs,
                reason,
                detected_at_unix_ns,
                detail,
            } => self.block(
                prefix,
                (ttl_secs != 0).then(|| Duration::from_secs(ttl_secs as u64)),
                reason,
                &origin,
                detected_at_unix_ns,
                &detail,
            ),
            Request::Unblock { prefix } => self.unblock(&prefix, &origin),
            Request::ListBlocks { offset, limit } => self.list_blocks(offset, limit),
            Request::Allow { prefix } => self.set_allow(prefix, true, &origin),
            Request::Disallow { prefix } => self.set_allow(prefix, false, &origin),
            Request::ListAllows => {
                let s = self.settings.lock().expect("settings lock");
                Response::Allows {
                    entries: s
                        .allow
                        .iter()
                        .take(MAX_LIST_ENTRIES as usize)
                        .copied()
                        .collect(),
                }
            }
            Request::Stats => self.stats_counters(),
            Request::GetConfig => Response::Config {
                entries: config_entries(&self.settings.lock().expect("settings lock").live),
            },
            Request::SetConfig { changes } => self.set_config(&changes, &origin),
            Request::History {
                since_unix_secs,
                prefix,
                limit,
            } => match self.audit.history(
                since_unix_secs,
                prefix.as_ref(),
                limit.min(MAX_LIST_ENTRIES) as usize,
            ) {
                Ok(lines) => Response::History { lines },
                Err(e) => Response::error(ErrorCode::Internal, format!("read the audit log: {e}")),
            },
            Request::Escalation { prefix } => self.escalation(&prefix),
        }
    }
}

/// `guard run`.
pub async fn run(args: RunArgs) -> Result<()> {
    let settings = Settings::load(&args)?;
    apply_log_level(settings.log_level.as_deref());
    // A broken $NOTIFY_SOCKET must not keep protection from starting: under systemd a missing
    // READY=1 still shows up (the start times out), so a warning is enough here.
    let notifier = crate::notify::Notifier::from_env().unwrap_or_else(|e| {
        warn!("readiness notifications are off: {e}");
        crate::notify::Notifier::disabled()
    });
    let notify = |what: &str, sent: Result<(), crate::notify::NotifyError>| {
        if let Err(e) = sent {
            warn!("cannot tell the service manager {what}: {e}");
        }
    };
    let layout = PinLayout::new(&settings.pin_root);
    let mut dp = Datapath::load(&settings.map_sizes, Some(&layout))?;
    let fresh = dp.is_fresh();
    info!(
        "guard program loaded ({}) with pins under {}",
        if fresh {
            "new maps"
        } else {
            "adopting pinned maps: counters and blocks carry over"
        },
        layout.dir().display()
    );
    let logger = match aya_log::EbpfLogger::init(dp.ebpf_mut()) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("kernel-side logging unavailable: {e}");
            None
        }
    };
    let events = dp.take_events().context("the events ring buffer")?;
    let mut attached = Vec::new();
    for iface in &settings.interfaces {
        let kind = dp.attach(iface, settings.attach)?;
        attached.push((iface.clone(), kind));
    }
    // The agent works on its own handles of the pinned maps; `dp` stays
    // alive for the run so its program objects outlive every attach.
    let maps = GuardMaps::open_pinned(&layout)?;
    let audit = AuditLog::open(settings.audit_log.as_deref())
        .with_context(|| format!("open the audit log {:?}", settings.audit_log))?;
    let cookie = match crate::datapath::netns_cookie() {
        Ok(c) => c,
        Err(e) => {
            warn!("cannot read this network namespace's cookie ({e}); connection tracking counts every namespace's sockets in its cgroup");
            0
        }
    };
    let cgroup = match (&settings.cgroup, &settings.host_cgroup_mount) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(host)) => match crate::pod_cgroup::pod_cgroup(host) {
            Ok(found) => {
                info!(
                    "connection tracking counts the pod's cgroup {} (this container: {})",
                    found.pod.display(),
                    found.container.display()
                );
                Some(found.pod)
            }
            Err(e) => {
                warn!("connection tracking is off (conn_limit, known-good): the pod's cgroup was not found: {e}");
                None
            }
        },
        (None, None) => {
            let root = crate::datapath::cgroup2_mount();
            if root.is_none() {
                warn!("no cgroup v2 mount found: connection tracking (conn_limit, known-good) is off; pass --cgroup");
            }
            root
        }
    };
    if let Some(path) = &cgroup {
        if let Err(e) = dp.attach_sockops(path) {
            let e = anyhow::Error::new(e);
            warn!("connection tracking is off ({e:#}): conn_limit and the known-good budget cannot work");
        }
    }
    let agent = Arc::new(Agent::new(
        maps,
        settings.clone(),
        audit,
        cookie,
        dp.cookies_supported(),
    ));
    agent.start_cookie_keys()?;
    agent.apply(&settings)?;
    agent.adopt_blocks()?;
    for (iface, kind) in &attached {
        agent
            .metrics
            .attach_info
            .with_label_values(&[iface, kind.metric_label()])
            .set(1);
    }

    let fleet = match settings.fleet.clone() {
        Some(fs) => {
            let metrics = Arc::new(crate::fleet::FleetMetrics::register(
                &agent.metrics.registry,
            ));
            let link = crate::fleet::Fleet::start(
                fs,
                settings.blocks.max_ttl,
                metrics,
                agent.clone() as Arc<dyn crate::fleet::Applier>,
            )
            .await?;
            let _ = agent.fleet.set(link.outbox.clone());
            Some(link)
        }
        None => None,
    };

    let control = ControlServer::bind(ControlServerConfig::from_settings(&settings))?;
    *agent.control_stats.lock().expect("stats lock") = Some(control.stats());

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let control_task = tokio::spawn(control.serve(agent.clone(), wait(shutdown_rx.clone())));
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "listen for metrics on {} (set --metrics-addr)",
                settings.metrics_addr
            )
        })?;
    let metrics_task = tokio::spawn(serve_metrics(
        metrics_routes(agent.clone()),
        metrics_listener,
        wait(shutdown_rx.clone()),
    ));
    let events_task = tokio::spawn(consume_events(
        agent.clone(),
        events,
        wait(shutdown_rx.clone()),
    ));
    let log_task = logger.map(|l| tokio::spawn(pump_kernel_log(l, wait(shutdown_rx.clone()))));

    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut sweeps: u64 = 0;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    info!(
        "guard running on {:?} protecting ports {:?}; metrics on http://{}/metrics, control socket {}",
        settings.interfaces,
        settings.ports,
        settings.metrics_addr,
        settings.control_socket.display()
    );
    // Only now: the program is attached, the control socket and metrics listen, so whatever
    // systemd starts after guard (the app) can report at once.
    let status = format!(
        "protecting ports {:?} on {}",
        settings.ports,
        attached
            .iter()
            .map(|(iface, kind)| format!("{iface} ({})", kind.metric_label()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    notify("it is ready", notifier.ready(&status));
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                agent.sweep_expired();
                agent.adaptive_tick();
                agent.rotate_cookie_keys();
                sweeps += 1;
                if sweeps.is_multiple_of(60) {
                    agent.prune_connections();
                }
            }
            _ = hup.recv() => {
                notify("a reload starts", notifier.reloading());
                agent.reload(&args);
                notify("the reload ended", notifier.ready(&status));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify("it stops", notifier.stopping());
    info!(
        "stopping: the program stays attached and pinned under {} (`guard unload` removes it)",
        layout.dir().display()
    );
    let _ = shutdown_tx.send(true);
    let _ = control_task.await;
    let _ = metrics_task.await;
    let _ = events_task.await;
    if let Some(t) = log_task {
        let _ = t.await;
    }
    if let Some(link) = fleet {
        link.shutdown(Duration::from_secs(3)).await;
    }
    drop(dp);
    Ok(())
}

fn metrics_routes(
    agent: Arc<Agent>,
) -> warp::filters::BoxedFilter<(warp::http::Response<String>,)> {
    use warp::Filter as _;
    let metrics = warp::path("metrics").and(warp::path::end()).map(move || {
        warp::http::Response::builder()
            .header(
                warp::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )
            .body(agent.render_metrics())
            .expect("static header")
    });
    let health = warp::path("healthz")
        .and(warp::path::end())
        .map(|| warp::http::Response::new(String::from("ok\n")));
    metrics.or(health).unify().boxed()
}

async fn serve_metrics(
    routes: warp::filters::BoxedFilter<(warp::http::Response<String>,)>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}

async fn consume_events(
    agent: Arc<Agent>,
    ring: RingBuf<MapData>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // SAFETY: the AsyncFd owns the ring buffer, so the fd it polls lives
    // exactly as long as the registration.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!("events: cannot poll the ring buffer: {}", e);
            return;
        }
    };
    tokio::pin!(shutdown);
    let mut logged = Instant::now() - Duration::from_secs(10);
    let mut since_log = 0u64;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() < std::mem::size_of::<OverCapEvent>() {
                        continue;
                    }
                    // SAFETY: the program writes whole OverCapEvent records.
                    let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const OverCapEvent) };
                    drop(item);
                    since_log += 1;
                    if logged.elapsed() >= Duration::from_secs(5) {
                        let p = Prefix::new(ev.addr, ev.prefix_len as u32);
                        info!("{since_log} over-cap event(s) in the last {}s, latest: {p} ({} SYNs, {} over cap{})",
                            logged.elapsed().as_secs().min(99), ev.syns, ev.over_cap, if ev.dry_run != 0 { ", dry-run" } else { "" });
                        logged = Instant::now();
                        since_log = 0;
                    }
                    agent.on_event(&ev);
                }
                guard.clear_ready();
            }
        }
    }
}

async fn pump_kernel_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // SAFETY: as for the events ring: the AsyncFd owns the logger's fd.
    let mut fd = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel log: {}", e);
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
}
