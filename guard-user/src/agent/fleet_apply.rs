//! Decisions from the rest of the fleet, applied here: `impl Applier for Agent`. A fleet
//! block meets the rules every block meets (`rules::admit`); an unblock lifts only what the
//! fleet may lift here, and nothing dated ahead of this host's clock.

use guard_common::{
    addr::Prefix,
    proto::{cap_str, MAX_ORIGIN_LEN},
    state::reason,
};

use super::{
    blocks::{remote_block_ttl, BlockOrder, Blocked, DecidedBy},
    error::AgentError,
    rules::Owner,
    unix_now_ns, Agent,
};
use crate::fleet::{Action, Applied, Decision, Remote, UnblockScope};

impl crate::fleet::Applier for Agent {
    fn apply_remote(&self, from: &Remote<'_>, d: &Decision) -> Applied {
        let Ok(prefix) = d.prefix.parse::<Prefix>() else {
            return Applied::Dropped("malformed");
        };
        let host = from.host;
        let origin = cap_str(&format!("fleet:{host}"), MAX_ORIGIN_LEN).to_string();
        let decided_unix_ns = d.decided_unix_ms.saturating_mul(1_000_000);
        match d.action {
            Action::Block => {
                // Expiry is absolute: a late or replayed decision keeps only
                // what is left of it, and one from a clock far ahead is held
                // to this host's widest TTL by the rules.
                let ttl = match remote_block_ttl(d.expires_unix_ms, crate::fleet::unix_now_ms()) {
                    Ok(ttl) => ttl,
                    Err(why) => return Applied::Dropped(why),
                };
                let ttl =
                    ttl.unwrap_or(self.settings.lock().expect("settings lock").blocks.max_ttl);
                let before = self
                    .blocks
                    .lock()
                    .expect("blocks lock")
                    .get(&prefix)
                    .map(|m| m.expires_ns);
                let detail = format!("{} on {host}: {}", d.origin, d.detail);
                let order = BlockOrder {
                    prefix,
                    ttl: Some(ttl),
                    reason: reason::from_name(&d.reason).unwrap_or(reason::OTHER),
                    detected_at_unix_ns: 0,
                    detail: cap_str(&detail, 240).to_string(),
                    origin,
                    by: DecidedBy::Fleet {
                        decided_unix_ns,
                        host: host.to_string(),
                        own: from.own,
                        live: from.live,
                    },
                };
                match self.block(order) {
                    Ok(Blocked::Added { .. }) => Applied::Changed,
                    Ok(Blocked::Merged { .. }) => {
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
                    Err(AgentError::Refused { refusal, .. }) => Applied::Dropped(refusal.label()),
                    Err(_) => Applied::Dropped("kernel_error"),
                }
            }
            Action::Unblock => {
                let (skew, scope) = {
                    let s = self.settings.lock().expect("settings lock");
                    let scope = s.fleet.as_ref().map_or(UnblockScope::Fleet, |f| f.unblocks);
                    (s.blocks.max_skew, scope)
                };
                // Dated ahead, it would outrank every block decided until then.
                if decided_unix_ns > unix_now_ns().saturating_add(skew.as_nanos() as u64) {
                    return Applied::Dropped("future_dated");
                }
                let here = self
                    .blocks
                    .lock()
                    .expect("blocks lock")
                    .get(&prefix)
                    .map(|m| {
                        (
                            m.decided_unix_ns > decided_unix_ns,
                            matches!(m.owner, Owner::Fleet(_)),
                        )
                    });
                match here {
                    None => Applied::Unchanged,
                    // Blocked again here after that host lifted it.
                    Some((true, _)) => Applied::Dropped("superseded"),
                    // This host's own block: lifted where it was decided (its
                    // own unblock replayed here is that), or everywhere when
                    // the operator said so.
                    Some((false, false)) if !from.own && scope == UnblockScope::Fleet => {
                        Applied::Dropped("local_block")
                    }
                    Some((false, _)) => match self.unblock_entry(&prefix, &origin) {
                        Ok(()) => Applied::Changed,
                        Err(_) => Applied::Unchanged,
                    },
                }
            }
        }
    }
}
