//! The messages of the control protocol, independent of their encoding.

use core::fmt;
use std::string::String;
use std::vec::Vec;

use crate::addr::Prefix;

/// A block someone asks the agent for: what a `Block` request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    pub prefix: Prefix,
    /// 0 = the agent's default TTL.
    pub ttl_secs: u32,
    /// A code from [`crate::state::reason`].
    pub reason: u32,
    /// When the client saw the abuse; 0 = unknown.
    pub detected_at_unix_ns: u64,
    /// Free text for the audit log, at most
    /// [`super::MAX_DETAIL_LEN`] bytes.
    pub detail: String,
}

impl From<BlockRequest> for Request {
    fn from(block: BlockRequest) -> Self {
        Self::Block(block)
    }
}

/// What a client asks the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The first frame of every session.
    Hello {
        version: u16,
        client_name: String,
    },
    /// Block a prefix.
    Block(BlockRequest),
    Unblock {
        prefix: Prefix,
    },
    /// One page of the blocklist.
    ListBlocks {
        offset: u32,
        limit: u32,
    },
    Allow {
        prefix: Prefix,
    },
    Disallow {
        prefix: Prefix,
    },
    ListAllows,
    Stats,
    GetConfig,
    /// `key=value` changes in the text form of [`crate::config_kv`],
    /// applied all or nothing.
    SetConfig {
        changes: Vec<(String, String)>,
    },
    /// Audit log lines since a time, optionally only those about prefixes
    /// overlapping `prefix`.
    History {
        since_unix_secs: u64,
        prefix: Option<Prefix>,
        limit: u32,
    },
    /// Where a prefix stands toward escalation: the agent's over-cap streak
    /// and strikes for exactly this prefix (the source or aggregate prefix
    /// an over-cap event names). Added after protocol version 1 shipped; an
    /// older agent answers `unknown_type`.
    Escalation {
        prefix: Prefix,
    },
}

/// How the agent handled a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockOutcome {
    /// A new blocklist entry.
    Added,
    /// The prefix was already blocked (by it or a wider prefix); the entry
    /// was kept or extended.
    Merged,
    /// Not blocked, e.g. the prefix is allowlisted or the request exceeds
    /// what the agent accepts from this client.
    Refused,
}

impl BlockOutcome {
    pub(crate) const fn to_u8(self) -> u8 {
        match self {
            Self::Added => 0,
            Self::Merged => 1,
            Self::Refused => 2,
        }
    }

    pub(crate) const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Added),
            1 => Some(Self::Merged),
            2 => Some(Self::Refused),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Merged => "merged",
            Self::Refused => "refused",
        }
    }
}

impl fmt::Display for BlockOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One blocklist entry as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub prefix: Prefix,
    /// A code from [`crate::state::reason`].
    pub reason: u32,
    /// 0 = never expires.
    pub expires_in_secs: u32,
    /// Who asked for it (`operator`, a client name, `escalation`...), at
    /// most [`super::MAX_ORIGIN_LEN`] bytes.
    pub origin: String,
}

/// Why the agent could not do what was asked. Codes this build does not
/// know decode as [`ErrorCode::Other`], so a newer agent's errors still
/// reach an older client intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame could not be parsed.
    BadFrame,
    /// The frame's length exceeds [`super::MAX_FRAME`].
    TooLarge,
    UnknownType,
    /// The client's protocol version is not the agent's.
    BadVersion,
    /// This peer may not make this request.
    NotPermitted,
    /// Well-formed but unacceptable (bad config value, bad prefix...).
    Invalid,
    /// The agent failed; the request may be retried.
    Internal,
    /// The target of the request does not exist (e.g. unblocking a prefix
    /// that is not blocked).
    NotFound,
    /// The agent is at its connection limit; retry later.
    Busy,
    /// A request out of order (anything but `Hello` first, `Hello` twice,
    /// or a response sent to the agent).
    Unexpected,
    Other(u16),
}

impl ErrorCode {
    pub const fn to_u16(self) -> u16 {
        match self {
            Self::BadFrame => 1,
            Self::TooLarge => 2,
            Self::UnknownType => 3,
            Self::BadVersion => 4,
            Self::NotPermitted => 5,
            Self::Invalid => 6,
            Self::Internal => 7,
            Self::NotFound => 8,
            Self::Busy => 9,
            Self::Unexpected => 10,
            Self::Other(code) => code,
        }
    }

    pub const fn from_u16(code: u16) -> Self {
        match code {
            1 => Self::BadFrame,
            2 => Self::TooLarge,
            3 => Self::UnknownType,
            4 => Self::BadVersion,
            5 => Self::NotPermitted,
            6 => Self::Invalid,
            7 => Self::Internal,
            8 => Self::NotFound,
            9 => Self::Busy,
            10 => Self::Unexpected,
            other => Self::Other(other),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::TooLarge => "too_large",
            Self::UnknownType => "unknown_type",
            Self::BadVersion => "bad_version",
            Self::NotPermitted => "not_permitted",
            Self::Invalid => "invalid",
            Self::Internal => "internal",
            Self::NotFound => "not_found",
            Self::Busy => "busy",
            Self::Unexpected => "unexpected",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) => write!(f, "error {code}"),
            named => f.write_str(named.name()),
        }
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    HelloOk {
        version: u16,
        agent_version: String,
    },
    Ok,
    BlockResult {
        outcome: BlockOutcome,
        reason_text: String,
        /// 0 = never expires (or refused).
        expires_in_secs: u32,
    },
    /// One page of the blocklist; `total` counts every entry.
    Blocks {
        total: u64,
        entries: Vec<BlockInfo>,
    },
    Allows {
        entries: Vec<Prefix>,
    },
    Stats {
        counters: Vec<(String, u64)>,
    },
    Config {
        entries: Vec<(String, String)>,
    },
    History {
        lines: Vec<String>,
    },
    /// `tracked` is false when the agent watches no streak for the prefix
    /// (then `strikes` and `streak_secs` are 0). `strikes` counts the
    /// escalations so far (each doubles the next block's TTL);
    /// `streak_secs` how long the current over-cap streak has lasted.
    Escalation {
        tracked: bool,
        strikes: u32,
        streak_secs: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Response {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }
}

/// Either direction; what the decoder produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Response(Response),
}

impl From<Request> for Message {
    fn from(r: Request) -> Self {
        Self::Request(r)
    }
}

impl From<Response> for Message {
    fn from(r: Response) -> Self {
        Self::Response(r)
    }
}

/// Type bytes on the wire.
pub(crate) mod ty {
    pub const HELLO: u8 = 0x01;
    pub const BLOCK: u8 = 0x02;
    pub const UNBLOCK: u8 = 0x03;
    pub const LIST_BLOCKS: u8 = 0x04;
    pub const ALLOW: u8 = 0x05;
    pub const DISALLOW: u8 = 0x06;
    pub const LIST_ALLOWS: u8 = 0x07;
    pub const STATS: u8 = 0x08;
    pub const GET_CONFIG: u8 = 0x09;
    pub const SET_CONFIG: u8 = 0x0a;
    pub const HISTORY: u8 = 0x0b;
    pub const ESCALATION: u8 = 0x0c;

    pub const ERROR: u8 = 0x80;
    pub const HELLO_OK: u8 = 0x81;
    pub const OK: u8 = 0x82;
    pub const BLOCK_RESULT: u8 = 0x83;
    pub const BLOCKS: u8 = 0x84;
    pub const ALLOWS: u8 = 0x85;
    pub const STATS_REPLY: u8 = 0x86;
    pub const CONFIG: u8 = 0x87;
    pub const HISTORY_REPLY: u8 = 0x88;
    pub const ESCALATION_REPLY: u8 = 0x89;
}

impl Request {
    /// Every request kind, in type-byte order; [`Request::kind_index`]
    /// indexes into it (per-kind counters use both).
    pub const KINDS: [&'static str; 12] = [
        "hello",
        "block",
        "unblock",
        "list_blocks",
        "allow",
        "disallow",
        "list_allows",
        "stats",
        "get_config",
        "set_config",
        "history",
        "escalation",
    ];

    pub(crate) const fn type_byte(&self) -> u8 {
        match self {
            Self::Hello { .. } => ty::HELLO,
            Self::Block(_) => ty::BLOCK,
            Self::Unblock { .. } => ty::UNBLOCK,
            Self::ListBlocks { .. } => ty::LIST_BLOCKS,
            Self::Allow { .. } => ty::ALLOW,
            Self::Disallow { .. } => ty::DISALLOW,
            Self::ListAllows => ty::LIST_ALLOWS,
            Self::Stats => ty::STATS,
            Self::GetConfig => ty::GET_CONFIG,
            Self::SetConfig { .. } => ty::SET_CONFIG,
            Self::History { .. } => ty::HISTORY,
            Self::Escalation { .. } => ty::ESCALATION,
        }
    }

    /// Position of this request's kind in [`Request::KINDS`].
    pub const fn kind_index(&self) -> usize {
        self.type_byte() as usize - ty::HELLO as usize
    }

    /// A short lowercase name for logs and metrics.
    pub const fn name(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }
}

impl Response {
    pub(crate) const fn type_byte(&self) -> u8 {
        match self {
            Self::Error { .. } => ty::ERROR,
            Self::HelloOk { .. } => ty::HELLO_OK,
            Self::Ok => ty::OK,
            Self::BlockResult { .. } => ty::BLOCK_RESULT,
            Self::Blocks { .. } => ty::BLOCKS,
            Self::Allows { .. } => ty::ALLOWS,
            Self::Stats { .. } => ty::STATS_REPLY,
            Self::Config { .. } => ty::CONFIG,
            Self::History { .. } => ty::HISTORY_REPLY,
            Self::Escalation { .. } => ty::ESCALATION_REPLY,
        }
    }

    /// A short lowercase name for logs and error messages.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Error { .. } => "error",
            Self::HelloOk { .. } => "hello_ok",
            Self::Ok => "ok",
            Self::BlockResult { .. } => "block_result",
            Self::Blocks { .. } => "blocks",
            Self::Allows { .. } => "allows",
            Self::Stats { .. } => "stats",
            Self::Config { .. } => "config",
            Self::History { .. } => "history",
            Self::Escalation { .. } => "escalation",
        }
    }
}
