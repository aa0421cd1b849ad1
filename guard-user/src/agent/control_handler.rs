//! The control socket's requests, answered: `impl ControlHandler for Agent`. The one place
//! where the agent's results and errors become wire replies.

use std::time::Duration;

use guard_common::proto::{
    cap_str, BlockOutcome, BlockRequest, ErrorCode, Request, Response, MAX_LIST_ENTRIES,
    MAX_ORIGIN_LEN,
};

use super::{
    blocks::{BlockOrder, Blocked, DecidedBy},
    config::config_entries,
    error::AgentError,
    rules::Owner,
    Agent,
};
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

/// A peer's block request as the agent decides it: the peer's role is whose block it is.
fn order_of(block: BlockRequest, peer: &PeerInfo, origin: String) -> BlockOrder {
    let owner = match peer.role {
        Role::Operator => Owner::Operator,
        Role::Reporter => Owner::Reporter(peer.uid),
    };
    BlockOrder {
        prefix: block.prefix,
        ttl: (block.ttl_secs != 0).then(|| Duration::from_secs(u64::from(block.ttl_secs))),
        reason: block.reason,
        detected_at_unix_ns: block.detected_at_unix_ns,
        detail: block.detail,
        origin,
        by: DecidedBy::Peer { owner },
    }
}

/// What the peer is told when the agent did not do what it asked.
pub(super) fn error_reply(e: &AgentError) -> Response {
    let code = match e {
        AgentError::Refused { .. } => {
            return Response::BlockResult {
                outcome: BlockOutcome::Refused,
                reason_text: e.to_string(),
                expires_in_secs: 0,
            }
        }
        AgentError::NotBlocked(_) | AgentError::NotAllowed(_) => ErrorCode::NotFound,
        AgentError::StaysAllowed(_) | AgentError::InvalidConfig(_) => ErrorCode::Invalid,
        AgentError::ConfigWrite(_) | AgentError::BlockWrite(_) | AgentError::Kernel(_) => {
            ErrorCode::Internal
        }
    };
    Response::error(code, e.to_string())
}

fn block_reply(prefix: guard_common::addr::Prefix, blocked: Blocked) -> Response {
    let (outcome, reason_text, expires_in_secs) = match blocked {
        Blocked::Added { expires_in_secs } => (
            BlockOutcome::Added,
            format!("{prefix} blocked"),
            expires_in_secs,
        ),
        Blocked::Merged { expires_in_secs } => (
            BlockOutcome::Merged,
            format!("{prefix} was already blocked; expiry extended"),
            expires_in_secs,
        ),
    };
    Response::BlockResult {
        outcome,
        reason_text,
        expires_in_secs,
    }
}

/// The reply to a request the agent carried out (`Ok`) or did not (`Err`).
fn reply<T>(result: Result<T, AgentError>, answer: impl FnOnce(T) -> Response) -> Response {
    result.map_or_else(|e| error_reply(&e), answer)
}

impl ControlHandler for Agent {
    fn handle(&self, peer: &PeerInfo, req: Request) -> Response {
        let origin = origin_of(peer);
        match req {
            Request::Hello { .. } => Response::error(ErrorCode::Unexpected, "already greeted"),
            Request::Block(block) => {
                let prefix = block.prefix;
                reply(self.block(order_of(block, peer, origin)), |blocked| {
                    block_reply(prefix, blocked)
                })
            }
            Request::Unblock { prefix } => reply(self.unblock(&prefix, &origin), |()| Response::Ok),
            Request::ListBlocks { offset, limit } => {
                let (total, entries) = self.list_blocks(offset, limit);
                Response::Blocks { total, entries }
            }
            Request::Allow { prefix } => {
                reply(self.set_allow(prefix, true, &origin), |()| Response::Ok)
            }
            Request::Disallow { prefix } => {
                reply(self.set_allow(prefix, false, &origin), |()| Response::Ok)
            }
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
            Request::Stats => reply(self.stats_counters(), |counters| Response::Stats {
                counters,
            }),
            Request::GetConfig => Response::Config {
                entries: config_entries(&self.settings.lock().expect("settings lock").live),
            },
            Request::SetConfig { changes } => reply(self.set_config(&changes, &origin), |live| {
                Response::Config {
                    entries: config_entries(&live),
                }
            }),
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
            Request::Escalation { prefix } => {
                let standing = self.escalation(&prefix);
                Response::Escalation {
                    tracked: standing.is_some(),
                    strikes: standing.map_or(0, |s| s.strikes),
                    streak_secs: standing.map_or(0, |s| s.streak_secs),
                }
            }
        }
    }
}
