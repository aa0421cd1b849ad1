//! Live configuration: what the kernel runs with (the operator's config,
//! the adaptive level, the empty-list flags), `guard config set`, the
//! allow-list, and SIGHUP reloads.

use std::{sync::atomic::Ordering, time::Instant};

use anyhow::{Context as _, Result};
use guard_common::{
    addr::Prefix,
    config::{FLAG_ALLOW_EMPTY, FLAG_BLOCK_EMPTY},
    config_kv, LiveConfig,
};
use log::{error, info, warn};

use super::{error::AgentError, Agent};
use crate::settings::{RunArgs, Settings};

/// What goes into the kernel's allowlist: loopback never reaches an
/// interface guard attaches to (the stack drops martian sources), so it is
/// only honoured here, in the refusal of block requests; leaving it out
/// lets the program skip the allowlist lookup while the list is empty.
fn kernel_allows(s: &Settings) -> impl Iterator<Item = &Prefix> {
    let loopback = crate::settings::loopback();
    s.allow.iter().filter(move |p| !loopback.contains(p))
}

impl Agent {
    /// What the kernel runs with: the operator's config, tightened by the
    /// adaptive level, with this namespace's cookie for connection tracking.
    pub(super) fn effective(&self, s: &Settings) -> LiveConfig {
        self.effective_with(s, &s.live)
    }

    /// [`Self::effective`] for the operator's config `live` in place of
    /// `s.live` (a change not committed yet).
    fn effective_with(&self, s: &Settings, live: &LiveConfig) -> LiveConfig {
        let level = self.adaptive.lock().expect("adaptive lock").0.level;
        let mut c = LiveConfig {
            conn_netns_cookie: self.netns_cookie,
            ..crate::adaptive::effective(live, &s.adaptive, level)
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
    pub(super) fn refresh_config(&self) {
        let s = self.settings.lock().expect("settings lock");
        let cfg = self.effective(&s);
        drop(s);
        if let Err(e) = self.maps().set_config(&cfg) {
            error!("write the live config: {e}");
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

    /// Refuses cookies where they cannot work, with the reason.
    pub(super) fn check_cookies(&self, live: &LiveConfig) -> std::result::Result<(), &'static str> {
        match self.cookies_unavailable {
            Some(why) if live.cookies_enabled() => Err(why),
            _ => Ok(()),
        }
    }

    /// Puts settings into the kernel: live config, ports, allow-list.
    pub(super) fn apply(&self, s: &Settings) -> Result<()> {
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

    /// `guard config set`: the kernel first, then the agent's view (see
    /// [`change_live`]); the settings lock is held throughout, so changes
    /// do not interleave.
    /// Returns the operator's config as it now stands.
    pub(super) fn set_config(
        &self,
        changes: &[(String, String)],
        origin: &str,
    ) -> Result<LiveConfig, AgentError> {
        let mut s = self.settings.lock().expect("settings lock");
        let changed = change_live(
            &s.live,
            changes,
            |new| self.check_cookies(new),
            |new| {
                let effective = self.effective_with(&s, new);
                self.maps().set_config(&effective).map(|()| effective)
            },
        );
        let (new, effective) = changed?;
        s.live = new;
        self.metrics.sync_config(&effective);
        drop(s);
        let detail: Vec<String> = changes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.audit
            .record("config", None, None, None, origin, None, &detail.join(" "));
        Ok(new)
    }

    pub(super) fn set_allow(
        &self,
        prefix: Prefix,
        allow: bool,
        origin: &str,
    ) -> Result<(), AgentError> {
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
                maps.set_config(&cfg)?;
                maps.insert_allow(&prefix)?;
            }
        } else {
            if is_loopback || s.trusted_proxies.contains(&prefix) {
                return Err(AgentError::StaysAllowed(prefix));
            }
            if !self.maps().remove_allow(&prefix)? {
                return Err(AgentError::NotAllowed(prefix));
            }
            s.allow.retain(|p| *p != prefix);
            let cfg = self.effective(&s);
            self.maps().set_config(&cfg)?;
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
        Ok(())
    }

    /// SIGHUP: re-read the config file, apply it live, reopen the audit log.
    pub fn reload(&self, args: &RunArgs) {
        if let Err(e) = self.audit.reopen() {
            error!("reopen the audit log: {e}");
        }
        let new = match Settings::load(args) {
            Ok(s) => s,
            Err(e) => {
                // The gauge first: whoever reads the log line finds it set.
                self.metrics.reload_success.set(0);
                error!("reload refused, keeping the running config: {e:#}");
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

/// One live config change, in the order that keeps the agent and the kernel
/// in agreement: `changes` are applied to `current` and the result checked
/// once (the config's own rules, then `check`, e.g. cookies on a host that
/// cannot do them); then `write` puts it in the kernel. The caller commits
/// the returned config (with what `write` returned) only on `Ok`, so a
/// refusal or a failed write leaves the agent's view as it was. A refusal
/// is the request's fault; a failed write is the agent's, as the request
/// itself was fine.
pub(super) fn change_live<W, E: std::fmt::Display>(
    current: &LiveConfig,
    changes: &[(String, String)],
    check: impl FnOnce(&LiveConfig) -> Result<(), &'static str>,
    write: impl FnOnce(&LiveConfig) -> Result<W, E>,
) -> Result<(LiveConfig, W), AgentError> {
    // apply_config_changes validates the whole result.
    let new = config_kv::apply_config_changes(current, changes)
        .map_err(|e| AgentError::InvalidConfig(e.to_string()))?;
    check(&new).map_err(|why| AgentError::InvalidConfig(why.to_string()))?;
    let written = write(&new).map_err(|e| {
        error!("config set: write the live config: {e}");
        AgentError::ConfigWrite(e.to_string())
    })?;
    Ok((new, written))
}

/// Puts guard.toml's `log_level` in force (at start and on SIGHUP).
pub(super) fn apply_log_level(level: Option<&str>) {
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

pub(super) fn config_entries(c: &LiveConfig) -> Vec<(String, String)> {
    config_kv::config_entries(c)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::control_handler::error_reply;
    use guard_common::proto::{ErrorCode, Response};

    fn changes(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The control socket's reply to a refused change: what these tests pin down.
    fn code(e: &AgentError) -> ErrorCode {
        match error_reply(e) {
            Response::Error { code, .. } => code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// What `Agent::set_config` does with the result: commit only on `Ok`.
    fn set(
        live: &mut LiveConfig,
        kv: &[(&str, &str)],
        check: impl FnOnce(&LiveConfig) -> Result<(), &'static str>,
        write: impl FnOnce(&LiveConfig) -> Result<(), String>,
    ) -> Result<(), AgentError> {
        let (new, ()) = change_live(live, &changes(kv), check, write)?;
        *live = new;
        Ok(())
    }

    #[test]
    fn a_change_is_written_to_the_kernel_before_it_is_committed() {
        let base = LiveConfig::default();
        let mut live = base;
        let mut written = None;
        set(
            &mut live,
            &[("syn_rate", "50")],
            |_| Ok(()),
            |new| {
                written = Some(*new);
                Ok(())
            },
        )
        .expect("a valid change");
        assert_eq!(live.syn_rate, 50);
        assert_eq!(written, Some(live), "the kernel got what the agent kept");
        assert_ne!(live, base);
    }

    #[test]
    fn a_failed_kernel_write_is_internal_and_leaves_the_agents_view_alone() {
        let base = LiveConfig::default();
        let mut live = base;
        let mut tried = None;
        let err = set(
            &mut live,
            &[("syn_rate", "50")],
            |_| Ok(()),
            |new| {
                tried = Some(new.syn_rate);
                Err("map config: EPERM".to_string())
            },
        )
        .unwrap_err();
        assert_eq!(code(&err), ErrorCode::Internal);
        let Response::Error { message, .. } = error_reply(&err) else {
            unreachable!()
        };
        assert!(message.contains("EPERM"), "{message}");
        assert_eq!(tried, Some(50), "the write was attempted with the change");
        assert_eq!(live, base, "the agent still agrees with the kernel");
    }

    #[test]
    fn an_invalid_change_is_refused_before_the_kernel_is_touched() {
        let base = LiveConfig::default();
        let mut live = base;
        for kv in [
            &[("syn_rate", "fast")][..],
            &[("no_such_key", "1")],
            &[("event_interval_ms", "0")],
            &[("syn_rate", "5"), ("syn_rate", "6")],
        ] {
            let err = set(&mut live, kv, |_| Ok(()), |_| panic!("wrote {kv:?}")).unwrap_err();
            assert_eq!(code(&err), ErrorCode::Invalid, "{kv:?}");
            assert_eq!(live, base);
        }
    }

    #[test]
    fn a_check_refusal_is_invalid_with_its_reason_and_writes_nothing() {
        let base = LiveConfig::default();
        let mut live = base;
        let mut checked = None;
        let err = set(
            &mut live,
            &[("syn_rate", "50")],
            |new| {
                checked = Some(new.syn_rate);
                Err("cookies cannot work here")
            },
            |_| panic!("wrote a refused change"),
        )
        .unwrap_err();
        assert_eq!(
            error_reply(&err),
            Response::error(ErrorCode::Invalid, "cookies cannot work here")
        );
        assert_eq!(checked, Some(50), "the check saw the new config");
        assert_eq!(live, base);
    }
}
