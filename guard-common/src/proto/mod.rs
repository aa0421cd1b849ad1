//! The control protocol between the agent and its clients (the warp app,
//! `cargo xtask tune`, the `guard` CLI), over the agent's Unix socket.
//!
//! # Framing
//!
//! Every message is one frame: `[u32 BE length][u8 type][payload]`, where
//! `length` counts the type byte and the payload and is at most
//! [`MAX_FRAME`]. Integers are big-endian. A string is a `u16` byte length
//! followed by UTF-8; a list is a `u32` count followed by its items; a
//! prefix is its 16 address bytes (unified IPv4-mapped space, see
//! [`crate::addr`]) followed by its unified length as a `u8` (0..=128, host
//! bits clear); an optional value is a `u8` tag (0 absent, 1 present)
//! followed by the value.
//!
//! # Session
//!
//! The client's first frame is [`Request::Hello`]; the agent answers
//! [`Response::HelloOk`] or [`Response::Error`] and closes. After that the
//! client sends one request at a time and reads one response per request.
//! `Hello`, `HelloOk` and `Error` keep their layout in every protocol
//! version, so two versions can always tell each other they disagree.
//!
//! Requests use type bytes `0x01..=0x7f`, responses `0x80..=0xff`.

mod codec;
mod message;

#[cfg(test)]
mod tests;

// `encode` writes into a `BytesMut`; re-exported so users need not pin their
// own `bytes` to the same version.
pub use bytes::BytesMut;
pub use codec::{decode_frame, encode, FrameDecoder};
pub use message::{BlockInfo, BlockOutcome, BlockRequest, ErrorCode, Message, Request, Response};

use std::string::String;
use std::vec::Vec;

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/guard/control.sock";

/// The protocol version this build speaks; exchanged in the handshake.
pub const PROTO_VERSION: u16 = 1;

/// Largest `length` a frame header may carry (type byte + payload).
pub const MAX_FRAME: usize = 64 * 1024;

/// Bytes in front of the type byte.
pub const HEADER_LEN: usize = 4;

/// Longest `client_name` in `Hello` (bytes).
pub const MAX_NAME_LEN: usize = 128;

/// Longest `detail` in a `Block` request (bytes); use [`cap_str`] to fit a
/// free-form text into it.
pub const MAX_DETAIL_LEN: usize = 256;

/// Most block entries the agent puts in one `Blocks` page. With origins of
/// at most [`MAX_ORIGIN_LEN`] bytes a full page stays well inside a frame.
pub const MAX_LIST_ENTRIES: u32 = 500;

/// Longest `origin` of a [`BlockInfo`] (bytes).
pub const MAX_ORIGIN_LEN: usize = 64;

/// The longest prefix of `s` that is at most `max` bytes and ends on a
/// character boundary.
pub fn cap_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Items `offset..offset + limit` of `items` in ascending order (a page of
/// a sorted list), found without sorting the rest: O(n + limit·log limit)
/// instead of O(n·log n). Reorders `items`.
pub fn page_sorted<T: Ord>(items: &mut [T], offset: usize, limit: usize) -> &mut [T] {
    let n = items.len();
    let start = offset.min(n);
    let end = offset.saturating_add(limit).min(n);
    if start == end {
        return &mut [];
    }
    if start > 0 {
        items.select_nth_unstable(start);
    }
    let rest = &mut items[start..];
    let len = end - start;
    if len < rest.len() {
        rest.select_nth_unstable(len);
    }
    let page = &mut rest[..len];
    page.sort_unstable();
    page
}

/// The newest of `lines` (newest last) that one [`Response::History`]
/// frame can carry, at most `limit`, still newest last. A line longer than
/// a protocol string is left out rather than failing the whole reply.
pub fn newest_history_lines(mut lines: Vec<String>, limit: usize) -> Vec<String> {
    // Type byte and the list's count.
    let mut size = 1 + 4;
    let mut kept = 0;
    let mut keep = Vec::with_capacity(limit.min(lines.len()));
    while kept < limit {
        let Some(line) = lines.pop() else { break };
        if line.len() > u16::MAX as usize {
            continue;
        }
        // Each string is its u16 length and its bytes.
        size += 2 + line.len();
        if size > MAX_FRAME {
            break;
        }
        keep.push(line);
        kept += 1;
    }
    keep.reverse();
    keep
}

/// Why bytes could not be decoded, or a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame with a zero length (every frame carries at least a type byte)")]
    EmptyFrame,
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("{what} ends before its {field} is complete")]
    Truncated {
        what: &'static str,
        field: &'static str,
    },
    #[error("{what} has {extra} bytes after its last field")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("{field} is {len} bytes long; at most {max} are allowed")]
    StringTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("prefix length {0} is out of range (0..=128 in the unified address space)")]
    BadPrefixLen(u8),
    #[error("prefix has address bits set past its length")]
    HostBitsSet,
    #[error("{field} has the unknown value {value}")]
    BadTag { field: &'static str, value: u64 },
    #[error("{field} claims {count} items but the frame cannot hold that many")]
    CountTooLarge { field: &'static str, count: u64 },
}

impl ProtoError {
    /// The code an agent replies with when a client sent this.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::TooLarge,
            Self::UnknownType(_) => ErrorCode::UnknownType,
            Self::EmptyFrame
            | Self::Truncated { .. }
            | Self::TrailingBytes { .. }
            | Self::CountTooLarge { .. } => ErrorCode::BadFrame,
            Self::BadUtf8 { .. }
            | Self::StringTooLong { .. }
            | Self::BadPrefixLen(_)
            | Self::HostBitsSet
            | Self::BadTag { .. } => ErrorCode::Invalid,
        }
    }
}
