//! The running agent: owns the maps, answers the control socket, turns
//! reports and over-cap events into expiring kernel blocks, sweeps expiries,
//! serves metrics, and reloads on SIGHUP. This module holds the `Agent` and
//! what ties its parts together; the parts live in:
//! - `blocks`: block policy as plain functions (TTL, merge, escalation),
//! - `rules`: the rules every block meets whatever its origin (allow-list,
//!   width, clock, rates, quotas and shares), and the blocklist's counts,
//! - `blocklist`: the agent's blocks and over-cap escalation, around that policy,
//! - `config`: the live config, `guard config set`, the allow-list, reloads,
//! - `offenders`: the sources over their cap that escalation watches,
//! - `error`: why the agent did not do what it was asked,
//! - `control_handler`: the control socket's requests, and the one place the
//!   agent's results and errors become wire replies,
//! - `fleet_apply`: decisions from other hosts of the fleet,
//! - `run`: `guard run`, the wiring.

mod blocklist;
mod blocks;
mod config;
mod control_handler;
mod error;
mod fleet_apply;
mod offenders;
mod rules;
mod run;

pub use run::run;

use std::{
    sync::atomic::AtomicUsize,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use log::warn;

use self::error::AgentError;
use self::offenders::Offenders;
use self::rules::{Blocklist, RuleMetrics};
use crate::{
    audit::AuditLog, control::ControlStats, datapath::GuardMaps, metrics::Metrics,
    settings::Settings,
};

/// Lock order: `blocks`, then `settings`, then `maps`, then `adaptive` or `cookie_keys`;
/// `control_stats` and the lock inside `offenders` are never held with another. A method
/// holding one of these takes only those after it: deciding a block holds `blocks` while
/// the config is refreshed (`settings`, then `maps`), a config change holds `settings`
/// while it writes `maps`, and `maps` is held while `adaptive` or `cookie_keys` is read.
pub struct Agent {
    maps: Mutex<GuardMaps>,
    settings: Mutex<Settings>,
    blocks: Mutex<Blocklist>,
    offenders: Offenders,
    pub metrics: Metrics,
    rule_metrics: RuleMetrics,
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

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

impl Agent {
    pub(super) fn new(
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
            blocks: Mutex::new(Blocklist::default()),
            offenders: Offenders::default(),
            rule_metrics: RuleMetrics::register(&metrics.registry),
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

    pub(super) fn maps(&self) -> std::sync::MutexGuard<'_, GuardMaps> {
        self.maps.lock().expect("maps lock")
    }

    /// Provisions the SYN cookie keys (keeping those an earlier run's
    /// outstanding cookies need).
    pub(super) fn start_cookie_keys(&self) -> Result<()> {
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

    pub(super) fn prune_connections(&self) {
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
            let snap = stats.snapshot();
            self.metrics.sync_control(&snap);
            for (why, n) in &snap.busy_by {
                let c = self
                    .rule_metrics
                    .control_busy
                    .with_label_values(&[why.label()]);
                c.inc_by(n.saturating_sub(c.get()));
            }
        }
        self.metrics.render()
    }

    /// The kernel's counters by name, and the blocklist's size.
    fn stats_counters(&self) -> Result<Vec<(String, u64)>, AgentError> {
        let totals = self.maps().stat_totals()?;
        let mut counters: Vec<(String, u64)> = guard_common::stats::Stat::ALL
            .iter()
            .map(|s| (s.name().to_string(), totals[s.index() as usize]))
            .collect();
        counters.push((
            "blocklist_entries".into(),
            self.blocks.lock().expect("blocks lock").len() as u64,
        ));
        Ok(counters)
    }
}
