//! Indices of the per-CPU verdict counters (`STATS`).

/// Each packet the program looks at increments `PACKETS` and exactly one
/// verdict counter; SYN accounting (`SYN_SEEN`) and `EVENTS_LOST` are extra.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Packets = 0,
    /// Not TCP toward a protected port (and no block-all rule applied).
    PassUnprotected,
    PassAllowlisted,
    /// TCP toward a protected port that does not open a connection.
    PassNotSyn,
    PassSyn,
    DropBlocked,
    DropSourceRate,
    DropAggregateRate,
    WouldDropBlocked,
    WouldDropSourceRate,
    WouldDropAggregateRate,
    /// Frame too short or inconsistent to parse: passed (fail-open).
    PassMalformed,
    /// IP fragment without a TCP header: passed.
    PassFragment,
    SynSeen,
    EventsLost,
    DropConnLimit,
    WouldDropConnLimit,
    DropGlobalBudget,
    WouldDropGlobalBudget,
    PassKnownGood,
    /// IPv6 whose extension-header chain is longer than the program walks.
    /// The kernel would still deliver a SYN hidden behind it, so this is
    /// treated as a drop verdict, not as malformed.
    DropExtHeaderChain,
    WouldDropExtHeaderChain,
    /// Per-source entries created (the LRU evicts silently, so this bounds
    /// the tracked-source count from above).
    SourcesCreated,
    /// Established connections toward protected ports counted / uncounted
    /// at close; their difference is how many are open.
    ConnOpened,
    ConnClosed,
    /// Established but not counted: the socket table was full.
    ConnUntracked,
    /// A SYN from a source not known good answered with a stateless cookie
    /// SYN-ACK (sent back out of the interface; nothing stored).
    CookieSent,
    WouldCookie,
    /// The SYN could not be turned into a SYN-ACK in place (the frame could
    /// not be resized): dropped; its sender retries.
    DropCookieTx,
    /// A TCP first fragment toward a protected port too short to hold the
    /// whole TCP header (RFC 1858 §3.1): never legitimate, and judging it
    /// would mean judging a SYN by its flags before they arrive.
    DropTinyFragment,
    WouldDropTinyFragment,
    /// An IPv4 fragment at offset 8 bytes (RFC 3128): it can only serve to
    /// overwrite the TCP header of the first.
    DropOverlapFragment,
    WouldDropOverlapFragment,
    /// After the verdict: ACKs toward a listener checked as cookie replies.
    /// Valid ones were handed to the listener as a ready connection.
    CookieAckValid,
    /// Not one of ours (forged, stale, or the kernel's own cookie): left to
    /// the kernel, which resets or accepts it by its own rules.
    CookieAckInvalid,
    /// Valid, but the proven source is over its cap: dropped.
    CookieAckOverCap,
    /// Valid, but the kernel refused to build the connection (listener
    /// gone, feature turned off since the SYN-ACK): left to the kernel.
    CookieAckAssignFailed,
    /// Valid, but its source is blocked: dropped, as its SYN would be.
    CookieAckBlocked,
    /// Valid, but its source already holds `conn_limit` connections
    /// (established or in their handshake): dropped.
    CookieAckConnLimit,
    /// Refused unchecked: its source, its aggregate prefix, or (for one
    /// that failed before) all sources together sent too many invalid
    /// cookie replies. Dropped, a correct guess included: this is what
    /// bounds guessing a cookie.
    CookieAckLimited,
    /// A SYN that would have been answered with a cookie, but its address
    /// (the SYN-ACK's destination) already got its share of SYN-ACKs:
    /// dropped, so guard never reflects a flood at a forged address.
    DropSynAckRate,
    WouldDropSynAckRate,
    /// Handshakes let through (or cookie replies admitted) and charged to
    /// their source as in flight, and those charges taken back when the
    /// handshake completed. Only while `conn_limit` is on.
    HandshakeCharged,
    HandshakeCompleted,
}

pub const STAT_SLOTS: u32 = 48;

impl Stat {
    pub const ALL: [Stat; 44] = [
        Stat::Packets,
        Stat::PassUnprotected,
        Stat::PassAllowlisted,
        Stat::PassNotSyn,
        Stat::PassSyn,
        Stat::DropBlocked,
        Stat::DropSourceRate,
        Stat::DropAggregateRate,
        Stat::WouldDropBlocked,
        Stat::WouldDropSourceRate,
        Stat::WouldDropAggregateRate,
        Stat::PassMalformed,
        Stat::PassFragment,
        Stat::SynSeen,
        Stat::EventsLost,
        Stat::DropConnLimit,
        Stat::WouldDropConnLimit,
        Stat::DropGlobalBudget,
        Stat::WouldDropGlobalBudget,
        Stat::PassKnownGood,
        Stat::DropExtHeaderChain,
        Stat::WouldDropExtHeaderChain,
        Stat::SourcesCreated,
        Stat::ConnOpened,
        Stat::ConnClosed,
        Stat::ConnUntracked,
        Stat::CookieSent,
        Stat::WouldCookie,
        Stat::DropCookieTx,
        Stat::DropTinyFragment,
        Stat::WouldDropTinyFragment,
        Stat::DropOverlapFragment,
        Stat::WouldDropOverlapFragment,
        Stat::CookieAckValid,
        Stat::CookieAckInvalid,
        Stat::CookieAckOverCap,
        Stat::CookieAckAssignFailed,
        Stat::CookieAckBlocked,
        Stat::CookieAckConnLimit,
        Stat::CookieAckLimited,
        Stat::DropSynAckRate,
        Stat::WouldDropSynAckRate,
        Stat::HandshakeCharged,
        Stat::HandshakeCompleted,
    ];

    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// `(verdict, reason)` labels for metrics; `None` for counters that are
    /// not verdicts.
    pub const fn labels(self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            Stat::PassUnprotected => ("pass", "unprotected"),
            Stat::PassAllowlisted => ("pass", "allowlisted"),
            Stat::PassNotSyn => ("pass", "not_syn"),
            Stat::PassSyn => ("pass", "syn_admitted"),
            Stat::PassMalformed => ("pass", "malformed"),
            Stat::PassFragment => ("pass", "fragment"),
            Stat::PassKnownGood => ("pass", "known_good"),
            Stat::DropBlocked => ("drop", "blocked"),
            Stat::DropSourceRate => ("drop", "source_rate"),
            Stat::DropAggregateRate => ("drop", "aggregate_rate"),
            Stat::DropConnLimit => ("drop", "conn_limit"),
            Stat::DropGlobalBudget => ("drop", "global_budget"),
            Stat::WouldDropBlocked => ("would_drop", "blocked"),
            Stat::WouldDropSourceRate => ("would_drop", "source_rate"),
            Stat::WouldDropAggregateRate => ("would_drop", "aggregate_rate"),
            Stat::WouldDropConnLimit => ("would_drop", "conn_limit"),
            Stat::WouldDropGlobalBudget => ("would_drop", "global_budget"),
            Stat::DropExtHeaderChain => ("drop", "ext_header_chain"),
            Stat::WouldDropExtHeaderChain => ("would_drop", "ext_header_chain"),
            Stat::CookieSent => ("cookie", "unproven_source"),
            Stat::WouldCookie => ("would_cookie", "unproven_source"),
            Stat::DropCookieTx => ("drop", "cookie_tx_failed"),
            Stat::DropTinyFragment => ("drop", "tiny_fragment"),
            Stat::WouldDropTinyFragment => ("would_drop", "tiny_fragment"),
            Stat::DropOverlapFragment => ("drop", "overlap_fragment"),
            Stat::WouldDropOverlapFragment => ("would_drop", "overlap_fragment"),
            Stat::DropSynAckRate => ("drop", "synack_rate"),
            Stat::WouldDropSynAckRate => ("would_drop", "synack_rate"),
            Stat::CookieAckValid
            | Stat::CookieAckInvalid
            | Stat::CookieAckOverCap
            | Stat::CookieAckAssignFailed
            | Stat::CookieAckBlocked
            | Stat::CookieAckConnLimit
            | Stat::CookieAckLimited
            | Stat::HandshakeCharged
            | Stat::HandshakeCompleted
            | Stat::Packets
            | Stat::SynSeen
            | Stat::EventsLost
            | Stat::SourcesCreated
            | Stat::ConnOpened
            | Stat::ConnClosed
            | Stat::ConnUntracked => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Packets => "packets",
            Stat::PassUnprotected => "pass_unprotected",
            Stat::PassAllowlisted => "pass_allowlisted",
            Stat::PassNotSyn => "pass_not_syn",
            Stat::PassSyn => "pass_syn",
            Stat::DropBlocked => "drop_blocked",
            Stat::DropSourceRate => "drop_source_rate",
            Stat::DropAggregateRate => "drop_aggregate_rate",
            Stat::WouldDropBlocked => "would_drop_blocked",
            Stat::WouldDropSourceRate => "would_drop_source_rate",
            Stat::WouldDropAggregateRate => "would_drop_aggregate_rate",
            Stat::PassMalformed => "pass_malformed",
            Stat::PassFragment => "pass_fragment",
            Stat::SynSeen => "syn_seen",
            Stat::EventsLost => "events_lost",
            Stat::DropConnLimit => "drop_conn_limit",
            Stat::WouldDropConnLimit => "would_drop_conn_limit",
            Stat::DropGlobalBudget => "drop_global_budget",
            Stat::WouldDropGlobalBudget => "would_drop_global_budget",
            Stat::PassKnownGood => "pass_known_good",
            Stat::DropExtHeaderChain => "drop_ext_header_chain",
            Stat::WouldDropExtHeaderChain => "would_drop_ext_header_chain",
            Stat::SourcesCreated => "sources_created",
            Stat::ConnOpened => "conn_opened",
            Stat::ConnClosed => "conn_closed",
            Stat::ConnUntracked => "conn_untracked",
            Stat::CookieSent => "cookie_sent",
            Stat::WouldCookie => "would_cookie",
            Stat::DropCookieTx => "drop_cookie_tx",
            Stat::DropTinyFragment => "drop_tiny_fragment",
            Stat::WouldDropTinyFragment => "would_drop_tiny_fragment",
            Stat::DropOverlapFragment => "drop_overlap_fragment",
            Stat::WouldDropOverlapFragment => "would_drop_overlap_fragment",
            Stat::CookieAckValid => "cookie_ack_valid",
            Stat::CookieAckInvalid => "cookie_ack_invalid",
            Stat::CookieAckOverCap => "cookie_ack_over_cap",
            Stat::CookieAckAssignFailed => "cookie_ack_assign_failed",
            Stat::CookieAckBlocked => "cookie_ack_blocked",
            Stat::CookieAckConnLimit => "cookie_ack_conn_limit",
            Stat::CookieAckLimited => "cookie_ack_limited",
            Stat::DropSynAckRate => "drop_synack_rate",
            Stat::WouldDropSynAckRate => "would_drop_synack_rate",
            Stat::HandshakeCharged => "handshake_charged",
            Stat::HandshakeCompleted => "handshake_completed",
        }
    }
}

const _: () = assert!((Stat::HandshakeCompleted as u32) < STAT_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_stat_once_in_index_order() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(s.index() as usize, i);
        }
    }
}
