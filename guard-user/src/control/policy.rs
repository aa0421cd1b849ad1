//! Who may connect and what each role may ask: peer credentials, roles, the widest
//! prefixes a reporter may name, and the per-request check.

use guard_common::addr::{v4_mapped, Prefix, V4_MAPPED_BITS};
use guard_common::proto::{BlockRequest, ErrorCode, Request, Response};
use guard_common::state::reason;

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// From `SO_PEERCRED`, as of the peer's `connect`.
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`); empty where the kernel
    /// cannot tell.
    pub groups: Vec<u32>,
    /// The name the client gave in its `Hello`; self-declared, so for logs
    /// and the origin of blocks, never for decisions.
    pub client_name: String,
    /// What the peer may do, from its credentials ([`role_of`]).
    pub role: Role,
}

/// What a peer may do on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every request; blocks no wider than [`Policy::widest_block`].
    Operator,
    /// Block reports no wider than [`Policy::widest_report`], and the
    /// read-only requests (stats, config, blocks, allows, history).
    Reporter,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Reporter => "reporter",
        }
    }
}

/// The widest prefix a block may name, per family, as prefix lengths: a
/// smaller number is a wider prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Widest {
    pub v4: u8,
    pub v6: u8,
}

impl Widest {
    /// What the app may report by default: a /24 or a /48, the kernel's
    /// default aggregate prefixes.
    pub const REPORT: Self = Self { v4: 24, v6: 48 };
    /// What an operator may block by default: a /8 or a /32 (an ISP's
    /// allocation). Wider than that is a firewall rule, not a block.
    pub const BLOCK: Self = Self { v4: 8, v6: 32 };

    /// Whether `p` is no wider than this. A prefix in the unified space
    /// that is shorter than /96 yet holds the IPv4-mapped range covers all
    /// of IPv4, so it counts as an IPv4 /0 as well.
    pub fn admits(&self, p: &Prefix) -> bool {
        let len = p.prefix_len();
        if p.is_v4() {
            return len - V4_MAPPED_BITS >= u32::from(self.v4);
        }
        let all_v4 = Prefix::new(v4_mapped([0; 4]), V4_MAPPED_BITS);
        let v4_ok = !p.contains_prefix(&all_v4) || self.v4 == 0;
        v4_ok && len >= u32::from(self.v6)
    }
}

impl std::fmt::Display for Widest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{} for IPv4, /{} for IPv6", self.v4, self.v6)
    }
}

/// Which peers may use the socket, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The agent's own effective uid.
    pub agent_uid: u32,
    /// The socket file's group: its members may connect.
    pub socket_gid: Option<u32>,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Operators besides root and the agent's uid.
    pub operator_uids: Vec<u32>,
    /// Members (primary or supplementary) are operators.
    pub operator_gids: Vec<u32>,
    /// Reporters whatever else they are, e.g. an app running as root in
    /// its container.
    pub reporter_uids: Vec<u32>,
    /// The widest prefix a reporter may name in a block report.
    pub widest_report: Widest,
    /// The widest prefix anyone, operators included, may block.
    pub widest_block: Widest,
}

/// Root, the agent's own uid, an allowed uid, or a member (primary or
/// supplementary) of an allowed group or of the socket's group.
pub fn peer_allowed(peer: &PeerInfo, policy: &Policy) -> bool {
    if peer.uid == 0 || peer.uid == policy.agent_uid || policy.allowed_uids.contains(&peer.uid) {
        return true;
    }
    let in_group = |gid: u32| peer.gid == gid || peer.groups.contains(&gid);
    policy.socket_gid.is_some_and(in_group) || policy.allowed_gids.iter().any(|g| in_group(*g))
}

/// The role of a permitted peer: a `reporter_uids` entry is a reporter;
/// otherwise root, the agent's own uid, an `operator_uids` entry and a
/// member of an operator group are operators; everyone else is a reporter.
pub fn role_of(peer: &PeerInfo, policy: &Policy) -> Role {
    if policy.reporter_uids.contains(&peer.uid) {
        return Role::Reporter;
    }
    let in_group = |gid: &u32| peer.gid == *gid || peer.groups.contains(gid);
    if peer.uid == 0
        || peer.uid == policy.agent_uid
        || policy.operator_uids.contains(&peer.uid)
        || policy.operator_gids.iter().any(in_group)
    {
        Role::Operator
    } else {
        Role::Reporter
    }
}

/// Whether `peer` may make `req`; the `NotPermitted` reply if not.
pub fn authorize(peer: &PeerInfo, req: &Request, policy: &Policy) -> Result<(), Response> {
    let refuse = |message: String| Err(Response::error(ErrorCode::NotPermitted, message));
    match (peer.role, req) {
        (Role::Reporter, Request::Block(BlockRequest { prefix, reason, .. })) => {
            if !(policy.widest_report.admits(prefix) && policy.widest_block.admits(prefix)) {
                refuse(format!(
                    "{prefix} is wider than a report may name ({}); report the sources \
                     themselves, or have an operator run `guard block`",
                    policy.widest_report
                ))
            } else if matches!(*reason, reason::OPERATOR | reason::ESCALATED_OVER_CAP) {
                refuse(format!(
                    "a report may not give the reason `{}`: only operators and the agent \
                     itself use it",
                    reason::name(*reason)
                ))
            } else {
                Ok(())
            }
        }
        (Role::Operator, Request::Block(BlockRequest { prefix, .. }))
            if !policy.widest_block.admits(prefix) =>
        {
            refuse(format!(
                "{prefix} is wider than any block may be ({}); raise [control] \
                 widest_block_v4/widest_block_v6 in guard.toml to allow it",
                policy.widest_block
            ))
        }
        (Role::Operator, _) => Ok(()),
        (
            Role::Reporter,
            Request::ListBlocks { .. }
            | Request::ListAllows
            | Request::Stats
            | Request::GetConfig
            | Request::History { .. }
            | Request::Escalation { .. }
            // Answered `Unexpected` by the session before it gets here.
            | Request::Hello { .. },
        ) => Ok(()),
        (
            Role::Reporter,
            Request::Unblock { .. }
            | Request::Allow { .. }
            | Request::Disallow { .. }
            | Request::SetConfig { .. },
        ) => refuse(format!(
            "`{}` needs the operator role, and uid {} may only report blocks and read: run \
             it as root or as a member of operator_group (guard.toml)",
            req.name(),
            peer.uid
        )),
    }
}
