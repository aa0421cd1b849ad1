//! The agent's blocklist: adopting, adding, extending, lifting, expiring and
//! listing blocks, and escalating sources over their cap — the kernel writes
//! and bookkeeping around the decisions `blocks` makes.

use std::{
    sync::atomic::Ordering,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use guard_common::{
    addr::{Prefix, MAX_PREFIX_LEN},
    event::{EVENT_AGGREGATE_OVER_CAP, EVENT_CONN_LIMIT, EVENT_SOURCE_OVER_CAP},
    proto::{cap_str, BlockInfo, MAX_LIST_ENTRIES, MAX_ORIGIN_LEN},
    state::reason,
    BlockEntry, OverCapEvent,
};
use log::{error, info, warn};

use super::{
    blocks::{
        decide_block, expires_unix_ms, is_expired, remaining_secs, BlockDecision, BlockMeta,
        BlockOrder, Blocked, DecidedBy, SourceCounts, Standing, Streak,
    },
    error::AgentError,
    rules::{admit, Blocklist, FleetLimits, Owner, Refusal, Rules},
    unix_now_ns, Agent,
};
use crate::datapath::monotonic_ns;

impl Agent {
    /// Loads the blocks an earlier run left in the kernel.
    pub(super) fn adopt_blocks(&self) -> Result<()> {
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
                    owner: Owner::Adopted,
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

    /// Keeps `blocks_len` in step; when the blocklist just emptied, lets
    /// the program skip its lookup again.
    pub(super) fn blocks_changed(&self, len: usize) {
        let before = self.blocks_len.swap(len, Ordering::SeqCst);
        if len == 0 && before != 0 {
            self.refresh_config();
        }
    }

    /// The rules' settings as they stand (they reload with the config).
    pub(super) fn rules(&self) -> Rules {
        let s = self.settings.lock().expect("settings lock");
        Rules {
            allow: s.allow.clone(),
            blocks: s.blocks.clone(),
            widest_block: s.control.widest_block,
            widest_report: s.control.widest_report,
            fleet: s.fleet.as_ref().map(|f| FleetLimits {
                rate: f.host_rate,
                burst: f.host_burst,
                share_percent: f.host_share_percent,
            }),
        }
    }

    /// Counts a refused block, and audits it unless the same owner had the same refusal
    /// audited in the last seconds. Takes the blocklist's lock guard and releases it.
    fn refused(
        &self,
        mut blocks: std::sync::MutexGuard<'_, Blocklist>,
        order: &BlockOrder,
        owner: Owner,
        refusal: Refusal,
        now_ns: u64,
    ) -> AgentError {
        let prefix = order.prefix;
        self.metrics
            .block_reports
            .with_label_values(&["refused"])
            .inc();
        self.rule_metrics
            .refusals
            .with_label_values(&[owner.class(), refusal.label()])
            .inc();
        let due = blocks.audit_due(&owner, refusal.label(), now_ns);
        drop(blocks);
        let label = refusal.label();
        let error = AgentError::Refused {
            prefix,
            owner,
            refusal,
        };
        if let Some(skipped) = due {
            let detail = if skipped > 0 {
                format!("{error} ({skipped} more refused alike since the last record)")
            } else {
                error.to_string()
            };
            self.audit.record(
                "refuse",
                Some(&prefix),
                None,
                Some(label),
                &order.origin,
                None,
                &detail,
            );
        }
        error
    }

    /// Tells the fleet, if linked, what this host decided.
    pub(super) fn share(&self, decision: crate::fleet::Decision) {
        if let Some(outbox) = self.fleet.get() {
            outbox.push(decision);
        }
    }

    /// Decides a block by the rules every block meets, whatever its origin, and writes it.
    pub(super) fn block(&self, order: BlockOrder) -> Result<Blocked, AgentError> {
        let rules = self.rules();
        let owner = order.by.owner();
        let now = monotonic_ns();
        let now_unix = unix_now_ns();
        let mut blocks = self.blocks.lock().expect("blocks lock");
        let ttl = match admit(&rules, &order.proposal(&owner), &mut blocks, now, now_unix) {
            Ok(ttl) => ttl,
            Err(refusal) => return Err(self.refused(blocks, &order, owner, refusal, now)),
        };
        let prefix = order.prefix;
        let BlockDecision {
            expires_ns,
            reason: entry_reason,
            merged,
            extended,
        } = decide_block(
            blocks.get(&prefix),
            now + ttl.as_nanos() as u64,
            order.reason,
        );
        let decided_unix_ns = order.decided_unix_ns(now_unix);
        let entry = BlockEntry {
            expires_ns,
            reason: entry_reason,
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
            return Err(AgentError::BlockWrite(e));
        }
        if order.detected_at_unix_ns != 0 {
            let latency = unix_now_ns().saturating_sub(order.detected_at_unix_ns);
            self.metrics.block_latency.observe(latency as f64 / 1e9);
        }
        let expires_in_secs = remaining_secs(expires_ns, now);
        if let (Some(level), true) = (order.shared_level(), extended) {
            self.share(crate::fleet::Decision {
                action: crate::fleet::Action::Block,
                prefix: prefix.to_string(),
                expires_unix_ms: expires_unix_ms(expires_ns, now, decided_unix_ns),
                decided_unix_ms: decided_unix_ns / 1_000_000,
                reason: reason::name(entry.reason).to_string(),
                origin: order.origin.clone(),
                level,
                detail: cap_str(&order.detail, 200).to_string(),
            });
        }
        if merged {
            blocks.extend(&prefix, expires_ns, decided_unix_ns);
            blocks.claim(&prefix, &owner);
            self.metrics
                .block_reports
                .with_label_values(&["merged"])
                .inc();
            return Ok(Blocked::Merged { expires_in_secs });
        }
        blocks.insert(
            prefix,
            BlockMeta {
                expires_ns,
                reason: order.reason,
                origin: order.origin.clone(),
                decided_unix_ns,
                owner,
            },
        );
        self.metrics.blocklist_entries.set(blocks.len() as i64);
        self.blocks_len.store(blocks.len(), Ordering::SeqCst);
        self.metrics
            .block_reports
            .with_label_values(&["added"])
            .inc();
        drop(blocks);
        let detected = (order.detected_at_unix_ns != 0)
            .then(|| UNIX_EPOCH + Duration::from_nanos(order.detected_at_unix_ns));
        self.audit.record(
            if order.reason == reason::ESCALATED_OVER_CAP {
                "escalate"
            } else {
                "block"
            },
            Some(&prefix),
            Some(ttl.as_secs()),
            Some(reason::name(order.reason)),
            &order.origin,
            detected,
            &order.detail,
        );
        Ok(Blocked::Added { expires_in_secs })
    }

    /// Lifts a block here, and tells the fleet.
    pub(super) fn unblock(&self, prefix: &Prefix, origin: &str) -> Result<(), AgentError> {
        self.unblock_entry(prefix, origin)?;
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
        Ok(())
    }

    /// Lifts a block here only (the fleet's own unblocks end here).
    pub(super) fn unblock_entry(&self, prefix: &Prefix, origin: &str) -> Result<(), AgentError> {
        let existed = self.maps().remove_block(prefix)?;
        let known = self.forget_block(prefix).is_some();
        if !(existed || known) {
            return Err(AgentError::NotBlocked(*prefix));
        }
        self.metrics.unblocks.inc();
        self.audit
            .record("unblock", Some(prefix), None, None, origin, None, "");
        Ok(())
    }

    /// Drops the agent's record of a block the kernel no longer holds, keeping the counts
    /// in step.
    fn forget_block(&self, prefix: &Prefix) -> Option<BlockMeta> {
        let mut blocks = self.blocks.lock().expect("blocks lock");
        let meta = blocks.remove(prefix);
        self.metrics.blocklist_entries.set(blocks.len() as i64);
        let len = blocks.len();
        drop(blocks);
        self.blocks_changed(len);
        meta
    }

    /// Removes blocks whose time is up. The kernel already ignores them;
    /// this keeps the map and the counts honest.
    pub fn sweep_expired(&self) {
        let now = monotonic_ns();
        let expired: Vec<(Prefix, BlockMeta)> = {
            let blocks = self.blocks.lock().expect("blocks lock");
            blocks
                .iter()
                .filter(|(_, m)| is_expired(m.expires_ns, now))
                .map(|(p, m)| (*p, m.clone()))
                .collect()
        };
        for (prefix, meta) in expired {
            if let Err(e) = self.maps().remove_block(&prefix) {
                warn!("expire {prefix}: {e}");
                continue;
            }
            self.forget_block(&prefix);
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
        self.offenders.forget_quiet(now);
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
        // Only a source whose own SYNs became connections during its streak
        // can be blocked for its rate (see `streak_proves_source`); a
        // SYN-only flood, forged or not, stays where the cap drops it.
        let counts = SourceCounts {
            admitted: ev.syns.saturating_sub(ev.over_cap),
            completed: u64::from(ev.completed),
        };
        let Some(streak) = self
            .offenders
            .over_cap(prefix, now, counts, &esc, interval_ns)
        else {
            self.metrics
                .escalations_skipped
                .with_label_values(&["offenders_full"])
                .inc();
            return;
        };
        let (ttl, level) = match streak {
            Streak::Watching => return,
            Streak::NotProven => {
                self.metrics
                    .escalations_skipped
                    .with_label_values(&["unproven_source"])
                    .inc();
                return;
            }
            Streak::Escalate(ttl, level) => (ttl, level),
        };
        let order = BlockOrder {
            prefix,
            ttl: Some(ttl),
            reason: reason::ESCALATED_OVER_CAP,
            detected_at_unix_ns: 0,
            detail: format!(
                "over its SYN cap for {}s ({} SYNs, {} over)",
                esc.over_cap_for.as_secs(),
                ev.syns,
                ev.over_cap
            ),
            origin: "kernel:over_cap".into(),
            by: DecidedBy::Here { level },
        };
        if let Ok(Blocked::Added { .. }) = self.block(order) {
            self.metrics.escalations.inc();
            warn!(
                "escalated {prefix} to the blocklist for {}s: over its SYN cap for {}s",
                ttl.as_secs(),
                esc.over_cap_for.as_secs()
            );
        }
    }

    /// Where `prefix` stands toward escalation (for `guard explain`); `None` when it is
    /// not watched.
    pub(super) fn escalation(&self, prefix: &Prefix) -> Option<Standing> {
        let interval_ns = self
            .settings
            .lock()
            .expect("settings lock")
            .live
            .event_interval_ns();
        // Event times are the kernel's monotonic clock, as on_event sees them.
        self.offenders.standing(prefix, monotonic_ns(), interval_ns)
    }

    /// One page of the blocklist, with how many blocks there are in all.
    pub(super) fn list_blocks(&self, offset: u32, limit: u32) -> (u64, Vec<BlockInfo>) {
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
                expires_in_secs: remaining_secs(m.expires_ns, now),
                origin: cap_str(&m.origin, MAX_ORIGIN_LEN).to_string(),
            })
            .collect();
        (total, entries)
    }
}
