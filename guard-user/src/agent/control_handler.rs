//! The control socket's requests, answered: `impl ControlHandler for Agent`.

use std::time::Duration;

use guard_common::proto::{
    cap_str, ErrorCode, Request, Response, MAX_LIST_ENTRIES, MAX_ORIGIN_LEN,
};

use super::{config::config_entries, rules::Owner, Agent};
use crate::control::{ControlHandler, PeerInfo, Role};

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
                match peer.role {
                    Role::Operator => Owner::Operator,
                    Role::Reporter => Owner::Reporter(peer.uid),
                },
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
