//! What the program tells the agent through the `EVENTS` ring buffer.

use crate::addr::Addr;

pub const EVENT_SOURCE_OVER_CAP: u8 = 1;
pub const EVENT_AGGREGATE_OVER_CAP: u8 = 2;
pub const EVENT_CONN_LIMIT: u8 = 3;

/// Raised the first time in an event window that a source (or aggregate
/// prefix) goes over its cap, never per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverCapEvent {
    /// The masked source or aggregate prefix.
    pub addr: Addr,
    pub ts_ns: u64,
    /// Total SYNs seen from this key, and how many were over the cap.
    pub syns: u64,
    pub over_cap: u64,
    /// Unified prefix length of `addr`.
    pub prefix_len: u8,
    /// One of the `EVENT_*` kinds.
    pub kind: u8,
    /// 1 when the program is in dry-run mode (nothing was dropped).
    pub dry_run: u8,
    pub _pad: u8,
    /// Handshakes this key completed so far (sources only; the low 32 bits
    /// of `SourceState::completed`): with `syns - over_cap`, how many of
    /// its admitted SYNs turned into connections.
    pub completed: u32,
}

const _: () = assert!(core::mem::size_of::<OverCapEvent>() == 48);
