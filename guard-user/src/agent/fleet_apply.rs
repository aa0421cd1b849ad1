//! Decisions from the rest of the fleet, applied here: `impl Applier for Agent`.

use guard_common::{
    addr::Prefix,
    proto::{cap_str, BlockOutcome, Response, MAX_ORIGIN_LEN},
    state::reason,
};

use super::{
    blocks::{remote_block_ttl, DecidedBy},
    Agent,
};

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
                let ttl = match remote_block_ttl(d.expires_unix_ms, crate::fleet::unix_now_ms()) {
                    Ok(ttl) => ttl,
                    Err(why) => return Applied::Dropped(why),
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
