//! Map values the kernel writes and the agent reads (or the reverse).

use crate::bucket::TokenBucket;

/// Per-source (and per-aggregate-prefix) state in the `SOURCES` and
/// `AGGREGATES` LRU hashes, keyed by the masked [`crate::Addr`].
///
/// Updates are plain read-modify-writes on the shared value, not atomic
/// across CPUs: two CPUs charging the same source in the same instant can
/// each take the same token. The cap is therefore exact per CPU and, per
/// contended instant, lenient by at most one SYN per extra CPU handling that
/// source; a NIC steers one flow to one queue, so only a source spraying
/// many ports across queues sees the slack (at most `ncpus - 1` extra per
/// burst window on this design).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    pub bucket: TokenBucket,
    /// When the kernel first tracked this source.
    pub first_seen_ns: u64,
    /// Connection-opening SYNs seen (admitted or not); the tuner reads
    /// deltas of this to learn real per-source rates without touching them.
    pub syns: u64,
    /// SYNs over the cap (dropped, or would-drop in dry-run).
    pub over_cap: u64,
    /// Start of the current event window; an over-cap source raises one
    /// event per window.
    pub window_start_ns: u64,
    /// Handshakes this source completed toward the protected ports (counted
    /// by the sockops program while the entry exists): the escalation's
    /// evidence that the SYNs it is charged for really came from it.
    pub completed: u64,
}

const _: () = assert!(core::mem::size_of::<SourceState>() == 56);

impl SourceState {
    #[inline(always)]
    pub const fn new(burst: u32, now_ns: u64) -> Self {
        Self {
            bucket: TokenBucket::full(burst, now_ns),
            first_seen_ns: now_ns,
            syns: 0,
            over_cap: 0,
            window_start_ns: 0,
            completed: 0,
        }
    }

    /// Whether an over-cap SYN at `now_ns` opens a new event window (and so
    /// should raise an event). Updates the window when it does.
    #[inline(always)]
    pub fn open_event_window(&mut self, now_ns: u64, interval_ns: u64) -> bool {
        if self.window_start_ns == 0
            || now_ns < self.window_start_ns
            || now_ns - self.window_start_ns >= interval_ns
        {
            self.window_start_ns = if now_ns == 0 { 1 } else { now_ns };
            true
        } else {
            false
        }
    }
}

/// The `SYNACK_DESTS` slot of a destination (its source key): both words
/// through MurmurHash3's 64-bit finalizer, top bits. Not keyed: an attacker
/// who wants a client's slot drained can simply forge SYNs naming the
/// client.
#[inline(always)]
pub const fn synack_slot(key: &crate::addr::AddrWords) -> u32 {
    let h = fmix64(key.0[0] ^ fmix64(key.0[1]));
    (h >> (64 - crate::maps::SYNACK_DEST_SLOT_BITS)) as u32
}

#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Time slots of [`InFlight`]: a charge stays live while its slot is one of
/// the last `IN_FLIGHT_SLOTS`, so it lives between `IN_FLIGHT_SLOTS - 1` and
/// `IN_FLIGHT_SLOTS` slot widths.
pub const IN_FLIGHT_SLOTS: usize = 4;

/// The width of one [`InFlight`] slot for a handshake timeout: a charge
/// lives at least the timeout and at most a third longer.
#[inline(always)]
pub const fn in_flight_slot_ns(handshake_timeout_s: u32) -> u64 {
    let ns = handshake_timeout_s as u64 * 1_000_000_000 / (IN_FLIGHT_SLOTS as u64 - 1);
    if ns == 0 {
        1
    } else {
        ns
    }
}

/// The slot number of `now_ns` (wraps after 2^32 slots, decades at any
/// timeout; a wrap only ends charges early).
#[inline(always)]
pub const fn in_flight_slot(now_ns: u64, handshake_timeout_s: u32) -> u32 {
    (now_ns / in_flight_slot_ns(handshake_timeout_s)) as u32
}

/// Whether a charge made in slot `charged` still counts in slot `now`.
#[inline(always)]
pub const fn in_flight_live(charged: u32, now: u32) -> bool {
    now.wrapping_sub(charged) < IN_FLIGHT_SLOTS as u32
}

/// Handshakes of one source key the program let through that have neither
/// completed nor timed out (value of `IN_FLIGHT`): with the established
/// connections in `CONNS`, what the source holds against `conn_limit`.
///
/// The kernel says nothing when a half-open connection dies (its SYN-ACKs
/// unanswered, a RST, the client giving up), so charges expire by time:
/// each lands in the slot of its moment, and a slot is forgotten once it is
/// [`IN_FLIGHT_SLOTS`] slots old. A completed handshake takes its charge back
/// out of its slot. Counts are changed with atomic adds; a slot being
/// recycled by two CPUs at once can lose a charge (lenient by one, never
/// stuck).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub counts: [u64; IN_FLIGHT_SLOTS],
    /// The slot number each count belongs to.
    pub slots: [u32; IN_FLIGHT_SLOTS],
}

const _: () = assert!(core::mem::size_of::<InFlight>() == 48);

impl InFlight {
    /// Handshakes still in flight in slot `now`.
    #[inline(always)]
    pub fn live(&self, now: u32) -> u64 {
        let mut n = 0u64;
        let mut i = 0;
        while i < IN_FLIGHT_SLOTS {
            if in_flight_live(self.slots[i], now) {
                n += self.counts[i];
            }
            i += 1;
        }
        n
    }

    /// The index slot `slot` uses.
    #[inline(always)]
    pub const fn index(slot: u32) -> usize {
        slot as usize % IN_FLIGHT_SLOTS
    }
}

/// One connection as the datapath sees its opening packet and sockops its
/// socket: the client's and the server's full addresses and ports (host
/// order). Key of `HANDSHAKES`. 8-aligned: the program builds it on its
/// stack with word stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub client: crate::Addr,
    pub server: crate::Addr,
    pub client_port: u16,
    pub server_port: u16,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// A handshake charged to `IN_FLIGHT` (value of `HANDSHAKES`): under which
/// source key and in which slot, so completing it takes back exactly that
/// charge, and a retransmitted SYN of the same flow is not charged twice.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    pub source: crate::Addr,
    pub slot: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Handshake>() == 24);

/// Why a prefix is blocked. Stored as a `u32` in [`BlockEntry::reason`].
pub mod reason {
    pub const OPERATOR: u32 = 1;
    pub const MESSAGE_FLOOD: u32 = 2;
    pub const CONNECTION_FLOOD: u32 = 3;
    pub const INVALID_MESSAGES: u32 = 4;
    pub const RECONNECT_STORM: u32 = 5;
    pub const ESCALATED_OVER_CAP: u32 = 6;
    pub const SLOW_CONNECTIONS: u32 = 7;
    pub const OTHER: u32 = 255;

    pub const fn name(code: u32) -> &'static str {
        match code {
            OPERATOR => "operator",
            MESSAGE_FLOOD => "message_flood",
            CONNECTION_FLOOD => "connection_flood",
            INVALID_MESSAGES => "invalid_messages",
            RECONNECT_STORM => "reconnect_storm",
            ESCALATED_OVER_CAP => "escalated_over_cap",
            SLOW_CONNECTIONS => "slow_connections",
            _ => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<u32> {
        [
            OPERATOR,
            MESSAGE_FLOOD,
            CONNECTION_FLOOD,
            INVALID_MESSAGES,
            RECONNECT_STORM,
            ESCALATED_OVER_CAP,
            SLOW_CONNECTIONS,
            OTHER,
        ]
        .into_iter()
        .find(|code| self::name(*code) == name)
    }
}

/// A blocklist entry (value of the `BLOCK` LPM trie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) after which the block no
    /// longer applies; 0 never expires.
    pub expires_ns: u64,
    /// A [`reason`] code.
    pub reason: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<BlockEntry>() == 16);

impl BlockEntry {
    #[inline(always)]
    pub const fn is_active(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// Allowlist values carry nothing; a u32 keeps the value aligned.
pub type AllowEntry = u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_expiry_edges() {
        let forever = BlockEntry {
            expires_ns: 0,
            ..Default::default()
        };
        assert!(forever.is_active(0));
        assert!(forever.is_active(u64::MAX));
        let e = BlockEntry {
            expires_ns: 100,
            ..Default::default()
        };
        assert!(e.is_active(0));
        assert!(e.is_active(99));
        assert!(!e.is_active(100));
        assert!(!e.is_active(u64::MAX));
    }

    #[test]
    fn one_event_per_window() {
        let mut s = SourceState::new(1, 0);
        assert!(
            s.open_event_window(5000, 1000),
            "the first over-cap opens a window"
        );
        assert!(!s.open_event_window(5500, 1000));
        assert!(!s.open_event_window(5999, 1000));
        assert!(s.open_event_window(6000, 1000));
        assert!(!s.open_event_window(6500, 1000));
        assert!(
            s.open_event_window(10, 1000),
            "a clock that went back reopens"
        );
        let mut z = SourceState::new(1, 0);
        assert!(z.open_event_window(0, 1000), "t=0 still opens a window");
        assert!(!z.open_event_window(1, 1000), "and it is remembered");
    }

    #[test]
    fn in_flight_charges_live_one_timeout_and_at_most_a_third_more() {
        let t = 63;
        let w = in_flight_slot_ns(t);
        assert_eq!(w, 21_000_000_000);
        let start = 1_000 * w;
        let mut f = InFlight::default();
        let s0 = in_flight_slot(start, t);
        f.slots[InFlight::index(s0)] = s0;
        f.counts[InFlight::index(s0)] = 2;
        assert_eq!(f.live(s0), 2);
        // Charged at the very end of its slot: still live a whole timeout later.
        assert_eq!(
            f.live(in_flight_slot(start + w - 1 + t as u64 * 1_000_000_000, t)),
            2
        );
        // Gone once four slots old, whatever moment of its slot it was charged in.
        assert_eq!(f.live(in_flight_slot(start + 4 * w, t)), 0);
        assert_eq!(
            f.live(s0.wrapping_sub(1)),
            0,
            "a slot from the future never counts"
        );
        assert!(in_flight_live(u32::MAX, 2), "slot numbers wrap");
        assert_eq!(
            in_flight_slot_ns(0),
            1,
            "a zero timeout cannot divide by zero"
        );
    }

    #[test]
    fn synack_slots_spread_neighbouring_addresses() {
        use crate::addr::{v4_mapped, AddrWords};
        let slots: std::collections::BTreeSet<u32> = (0..=255u8)
            .flat_map(|c| (0..=255u8).map(move |d| v4_mapped([198, 18, c, d])))
            .map(|a| synack_slot(&AddrWords::from_addr(&a)))
            .collect();
        assert!(slots.len() > 50_000, "a /16 over {} slots", slots.len());
        assert!(slots
            .iter()
            .all(|s| *s < 1 << crate::maps::SYNACK_DEST_SLOT_BITS));
    }

    #[test]
    fn reason_names_round_trip() {
        for code in [1, 2, 3, 4, 5, 6, 7, 255] {
            assert_eq!(reason::from_name(reason::name(code)), Some(code));
        }
        assert_eq!(reason::from_name("nope"), None);
    }
}
