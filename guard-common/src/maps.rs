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

pub const PROG_XDP: &str = "guard_xdp";
pub const PROG_TC: &str = "guard_tc";
pub const PROG_SOCKOPS: &str = "guard_sockops";
/// The tc ingress companion of the XDP program: XDP cannot hand a
/// connection to a listener, so the replies to its SYN cookies are checked
/// here.
pub const PROG_COOKIE_ACK: &str = "guard_cookie_ack";

/// Every map the agent pins, in the order `guard status` shows them.
pub const PINNED_MAPS: [&str; 14] = [
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
