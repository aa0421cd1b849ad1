//! Map and program names shared by the kernel object and the agent, and
//! their default sizes. Names stay under 16 bytes (the kernel's object name
//! limit) so what `bpftool` shows is what the code says.

pub const CONFIG: &str = "CONFIG";
pub const STATS: &str = "STATS";
pub const PORTS: &str = "PORTS";
pub const SOURCES: &str = "SOURCES";
pub const AGGREGATES: &str = "AGGREGATES";
pub const ALLOW: &str = "ALLOW";
pub const BLOCK: &str = "BLOCK";
pub const EVENTS: &str = "EVENTS";
/// Established connections per source key (sockops keeps it exact).
pub const CONNS: &str = "CONNS";
/// Socket cookie -> the source key it was counted under, so a close always
/// decrements what its establishment incremented, whatever the config says
/// by then.
pub const CONN_SOCKS: &str = "CONN_SOCKS";
/// Source key -> last time it completed a handshake (ns, monotonic).
pub const KNOWN_GOOD: &str = "KNOWN_GOOD";
/// The global new-connection budget's bucket (one entry).
pub const GLOBAL: &str = "GLOBAL";
/// SYN cookie keys, one per epoch slot (`syncookie::KEY_SLOTS`), rotated by
/// the agent.
pub const COOKIE_KEYS: &str = "COOKIE_KEYS";
/// When a cookie was last sent (`syncookie::CookieState`, one entry).
pub const COOKIE_STATE: &str = "COOKIE_STATE";

/// Flow -> the in-flight charge of a handshake the program let through
/// (`state::Handshake`), until sockops sees it complete.
pub const HANDSHAKES: &str = "HANDSHAKES";
/// Source key -> its handshakes in flight (`state::InFlight`).
pub const IN_FLIGHT: &str = "IN_FLIGHT";
/// The buckets of cookie SYN-ACKs, one slot per hash of the destination's
/// source key (`state::synack_slot`).
pub const SYNACK_DESTS: &str = "SYNACK_DESTS";
/// Source key / aggregate key -> the bucket of its invalid cookie replies,
/// and the one bucket of all sources together.
pub const ACK_FAILS: &str = "ACK_FAILS";
pub const ACK_FAILS_AGG: &str = "ACK_FAILS_AGG";
pub const ACK_FAILS_ALL: &str = "ACK_FAILS_ALL";

pub const PROG_XDP: &str = "guard_xdp";
pub const PROG_TC: &str = "guard_tc";
pub const PROG_SOCKOPS: &str = "guard_sockops";
/// The tc ingress companion of the XDP program: XDP cannot hand a
/// connection to a listener, so the replies to its SYN cookies are checked
/// here.
pub const PROG_COOKIE_ACK: &str = "guard_cookie_ack";

/// Every map the agent pins, in the order `guard status` shows them.
pub const PINNED_MAPS: [&str; 20] = [
    CONFIG,
    STATS,
    PORTS,
    SOURCES,
    AGGREGATES,
    ALLOW,
    BLOCK,
    EVENTS,
    CONNS,
    CONN_SOCKS,
    KNOWN_GOOD,
    GLOBAL,
    COOKIE_KEYS,
    COOKIE_STATE,
    HANDSHAKES,
    IN_FLIGHT,
    SYNACK_DESTS,
    ACK_FAILS,
    ACK_FAILS_AGG,
    ACK_FAILS_ALL,
];

/// One bit per TCP port, as bytes: `PORTS[port] != 0` means protected.
pub const PORT_SLOTS: u32 = 65536;
/// LRU hashes are preallocated: ~150 bytes of kernel memory per slot.
pub const DEFAULT_SOURCES: u32 = 1 << 18;
pub const DEFAULT_AGGREGATES: u32 = 1 << 16;
pub const DEFAULT_ALLOW: u32 = 4096;
pub const DEFAULT_BLOCK: u32 = 1 << 20;
pub const EVENTS_BYTES: u32 = 1 << 18;
pub const DEFAULT_CONNS: u32 = 1 << 16;
pub const DEFAULT_CONN_SOCKS: u32 = 1 << 18;
pub const DEFAULT_KNOWN_GOOD: u32 = 1 << 16;
/// LRU: a flow evicted before it completes keeps its charge until the
/// charge expires (a source over-counted for at most the timeout, never
/// under-counted). The agent sizes it like `SOURCES`, and `IN_FLIGHT` and
/// `ACK_FAILS_AGG` like `AGGREGATES`, `ACK_FAILS` like `SOURCES`; these are
/// the defaults.
pub const DEFAULT_HANDSHAKES: u32 = 1 << 18;
/// LRU: an evicted source forgets its in-flight charges (lenient).
pub const DEFAULT_IN_FLIGHT: u32 = 1 << 16;
/// Slots of `SYNACK_DESTS` (a power of two; 16 bytes each). An array, not
/// an LRU hash: answering a never-seen source then costs a lookup, not an
/// insert (measured: ~30 ns against ~200 ns added to a cookie answer), and floods
/// cannot churn a destination's bucket back to full. Destinations sharing a
/// slot share its budget; a flood of forged sources spread over every slot
/// drains none until it exceeds `syn_rate` x slots (5.2 M SYN/s at 20/s).
pub const DEFAULT_SYNACK_DESTS: u32 = 1 << 18;
pub const SYNACK_DEST_SLOT_BITS: u32 = 18;
/// LRU, sized so that pushing one address out costs a flood (see the
/// arithmetic in `syncookie`'s module doc).
pub const DEFAULT_ACK_FAILS: u32 = 1 << 18;
pub const DEFAULT_ACK_FAILS_AGG: u32 = 1 << 16;
