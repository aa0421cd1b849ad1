//! The live configuration: one entry of the `CONFIG` array map. The agent
//! rewrites it whole to tune limits without re-attaching; the program reads
//! it once per packet.

/// Drop verdicts are counted as "would drop" and the packet passes.
pub const FLAG_DRY_RUN: u32 = 1 << 0;
/// Blocked sources lose all their traffic, not only what goes to the
/// protected ports.
pub const FLAG_BLOCK_ALL_TRAFFIC: u32 = 1 << 1;
/// Set by the agent while the allowlist / blocklist trie is empty, so the
/// program skips a lookup that can only miss (an LPM lookup is the most
/// expensive step of the common paths). Unset, the program always looks.
pub const FLAG_ALLOW_EMPTY: u32 = 1 << 2;
pub const FLAG_BLOCK_EMPTY: u32 = 1 << 3;
/// Every flag this build understands; the agent refuses others.
pub const KNOWN_FLAGS: u32 =
    FLAG_DRY_RUN | FLAG_BLOCK_ALL_TRAFFIC | FLAG_ALLOW_EMPTY | FLAG_BLOCK_EMPTY;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveConfig {
    pub flags: u32,
    /// What one "source" is: IPv4 /32 and IPv6 /64 by default.
    pub source_prefix_v4: u8,
    pub source_prefix_v6: u8,
    /// The wider prefix the aggregate cap applies to (/24, /48 by default).
    pub aggregate_prefix_v4: u8,
    pub aggregate_prefix_v6: u8,
    /// New connections (SYN without ACK) per second per source, and how many
    /// may come at once. `syn_burst == 0` turns the per-source cap off;
    /// `syn_rate == 0` with a burst is a budget that never refills.
    pub syn_rate: u32,
    pub syn_burst: u32,
    /// The same per aggregate prefix; off while `aggregate_burst == 0`.
    pub aggregate_rate: u32,
    pub aggregate_burst: u32,
    /// A source over its cap raises at most one event per interval.
    pub event_interval_ms: u32,
    /// Connections one source may hold at once, established or still in
    /// their handshake (see `handshake_timeout_s`); 0 = off.
    pub conn_limit: u32,
    /// New connections per second toward the protected ports from all
    /// sources together before unknown sources are squeezed; 0 burst = off.
    pub global_syn_rate: u32,
    pub global_syn_burst: u32,
    /// How long a source that completed a connection stays "known good".
    pub known_good_ttl_s: u32,
    /// When SYNs from sources that are not known good are answered with a
    /// stateless cookie instead of being judged (`syncookie::MODE_*`).
    pub syn_cookies: u8,
    /// The window-scale shift the cookie SYN-ACK offers: what the server's
    /// own stack would choose for its receive buffer (set by the agent).
    pub cookie_wscale: u8,
    /// Which options the SYN-ACK may offer (`syncookie::OPT_*`), as the
    /// server namespace's sysctls allow (set by the agent).
    pub cookie_opts: u8,
    pub _pad: u8,
    /// Connection tracking (the sockops program) counts only sockets of
    /// this network namespace (`SO_NETNS_COOKIE`); 0 counts every one. A
    /// cgroup can span namespaces; the XDP program sees one interface's.
    pub conn_netns_cookie: u64,
    /// The MSS the cookie SYN-ACK advertises per family: the interface's MTU
    /// less the headers (set by the agent).
    pub cookie_mss_v4: u16,
    pub cookie_mss_v6: u16,
    /// How long a handshake the program let through counts against its
    /// source's `conn_limit` while it has not completed. The kernel keeps a
    /// half-open connection about 63 s (five SYN-ACK retries), and says
    /// nothing when it drops one.
    pub handshake_timeout_s: u32,
    /// Cookie replies that fail the check, per source (rate per second and
    /// burst): a source out of them is refused unchecked, so nobody gets
    /// more guesses at a cookie for one address than this. 0 burst = off.
    pub invalid_ack_rate: u32,
    pub invalid_ack_burst: u32,
    /// The same per aggregate prefix.
    pub invalid_ack_aggregate_rate: u32,
    pub invalid_ack_aggregate_burst: u32,
    /// The same for all sources together; while it is dry, every source or
    /// prefix that failed before is refused unchecked (see
    /// `syncookie`'s module doc for why fresh ones are still checked).
    pub invalid_ack_global_rate: u32,
    pub invalid_ack_global_burst: u32,
    pub _reserved: [u32; 2],
}

const _: () = assert!(core::mem::size_of::<LiveConfig>() == 96);

impl LiveConfig {
    pub const DEFAULT: Self = Self {
        flags: 0,
        source_prefix_v4: 32,
        source_prefix_v6: 64,
        aggregate_prefix_v4: 24,
        aggregate_prefix_v6: 48,
        syn_rate: 20,
        syn_burst: 40,
        aggregate_rate: 0,
        aggregate_burst: 0,
        event_interval_ms: 1000,
        conn_limit: 0,
        global_syn_rate: 0,
        global_syn_burst: 0,
        known_good_ttl_s: 600,
        syn_cookies: crate::syncookie::MODE_OFF,
        cookie_wscale: 7,
        cookie_opts: crate::syncookie::OPT_ALL,
        _pad: 0,
        conn_netns_cookie: 0,
        cookie_mss_v4: 1460,
        cookie_mss_v6: 1440,
        handshake_timeout_s: 64,
        invalid_ack_rate: 1,
        invalid_ack_burst: 8,
        invalid_ack_aggregate_rate: 16,
        invalid_ack_aggregate_burst: 64,
        invalid_ack_global_rate: 200,
        invalid_ack_global_burst: 1000,
        _reserved: [0; 2],
    };

    #[inline(always)]
    pub const fn dry_run(&self) -> bool {
        self.flags & FLAG_DRY_RUN != 0
    }

    #[inline(always)]
    pub const fn block_all_traffic(&self) -> bool {
        self.flags & FLAG_BLOCK_ALL_TRAFFIC != 0
    }

    #[inline(always)]
    pub const fn may_allow(&self) -> bool {
        self.flags & FLAG_ALLOW_EMPTY == 0
    }

    #[inline(always)]
    pub const fn may_block(&self) -> bool {
        self.flags & FLAG_BLOCK_EMPTY == 0
    }

    #[inline(always)]
    pub const fn source_cap_enabled(&self) -> bool {
        self.syn_burst != 0
    }

    #[inline(always)]
    pub const fn aggregate_cap_enabled(&self) -> bool {
        self.aggregate_burst != 0
    }

    #[inline(always)]
    pub const fn conn_limit_enabled(&self) -> bool {
        self.conn_limit != 0
    }

    #[inline(always)]
    pub const fn global_budget_enabled(&self) -> bool {
        self.global_syn_burst != 0
    }

    #[inline(always)]
    pub const fn cookies_enabled(&self) -> bool {
        self.syn_cookies != crate::syncookie::MODE_OFF
    }

    /// Whether the program tracks handshakes in flight (only the
    /// connection cap reads them).
    #[inline(always)]
    pub const fn tracks_in_flight(&self) -> bool {
        self.conn_limit != 0
    }

    #[inline(always)]
    pub const fn known_good_ttl_ns(&self) -> u64 {
        self.known_good_ttl_s as u64 * 1_000_000_000
    }

    #[inline(always)]
    pub const fn event_interval_ns(&self) -> u64 {
        self.event_interval_ms as u64 * 1_000_000
    }

    /// Checks what the kernel would otherwise silently clamp.
    pub const fn validate(&self) -> Result<(), ConfigError> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(ConfigError::UnknownFlags(self.flags & !KNOWN_FLAGS));
        }
        if self.source_prefix_v4 == 0 || self.source_prefix_v4 > 32 {
            return Err(ConfigError::PrefixV4(self.source_prefix_v4));
        }
        if self.aggregate_prefix_v4 == 0 || self.aggregate_prefix_v4 > 32 {
            return Err(ConfigError::PrefixV4(self.aggregate_prefix_v4));
        }
        if self.source_prefix_v6 == 0 || self.source_prefix_v6 > 128 {
            return Err(ConfigError::PrefixV6(self.source_prefix_v6));
        }
        if self.aggregate_prefix_v6 == 0 || self.aggregate_prefix_v6 > 128 {
            return Err(ConfigError::PrefixV6(self.aggregate_prefix_v6));
        }
        if self.aggregate_prefix_v4 > self.source_prefix_v4
            || self.aggregate_prefix_v6 > self.source_prefix_v6
        {
            return Err(ConfigError::AggregateNarrowerThanSource);
        }
        if self.event_interval_ms == 0 {
            return Err(ConfigError::EventInterval);
        }
        if self.syn_cookies > crate::syncookie::MODE_ALWAYS {
            return Err(ConfigError::CookieMode(self.syn_cookies));
        }
        if self.syn_cookies == crate::syncookie::MODE_UNDER_ATTACK && !self.global_budget_enabled()
        {
            return Err(ConfigError::CookiesNeedBudget);
        }
        if self.cookie_wscale > crate::syncookie::MAX_WSCALE {
            return Err(ConfigError::CookieWscale(self.cookie_wscale));
        }
        if self.handshake_timeout_s == 0 {
            return Err(ConfigError::HandshakeTimeout);
        }
        Ok(())
    }
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    UnknownFlags(u32),
    PrefixV4(u8),
    PrefixV6(u8),
    AggregateNarrowerThanSource,
    EventInterval,
    CookieMode(u8),
    /// "Under attack" means "while the global budget is exhausted".
    CookiesNeedBudget,
    CookieWscale(u8),
    HandshakeTimeout,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownFlags(bits) => write!(f, "unknown config flags {bits:#x}"),
            Self::PrefixV4(len) => write!(f, "IPv4 prefix length {len} must be 1..=32"),
            Self::PrefixV6(len) => write!(f, "IPv6 prefix length {len} must be 1..=128"),
            Self::AggregateNarrowerThanSource => f.write_str(
                "the aggregate prefix must be as wide as or wider than the source prefix",
            ),
            Self::EventInterval => f.write_str("event_interval_ms must be at least 1"),
            Self::CookieMode(m) => write!(f, "unknown syn_cookies mode {m}"),
            Self::CookiesNeedBudget => f.write_str(
                "syn_cookies = under-attack answers cookies while the global budget is exhausted: set global_syn_rate and global_syn_burst too, or use syn_cookies = always",
            ),
            Self::CookieWscale(w) => write!(f, "cookie window scale {w} must be 0..=14"),
            Self::HandshakeTimeout => f.write_str(
                "handshake_timeout_s must be at least 1: a handshake in flight has to count against conn_limit for some time",
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_caps_sources_only() {
        let c = LiveConfig::default();
        assert!(c.validate().is_ok());
        assert!(c.source_cap_enabled());
        assert!(!c.aggregate_cap_enabled());
        assert!(!c.dry_run());
        assert!(!c.block_all_traffic());
    }

    #[test]
    fn validation_rejects_what_the_kernel_would_clamp() {
        let bad = |f: fn(&mut LiveConfig)| {
            let mut c = LiveConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.flags = 1 << 9), ConfigError::UnknownFlags(1 << 9));
        assert_eq!(bad(|c| c.source_prefix_v4 = 33), ConfigError::PrefixV4(33));
        assert_eq!(bad(|c| c.aggregate_prefix_v6 = 0), ConfigError::PrefixV6(0));
        assert_eq!(
            bad(|c| {
                c.source_prefix_v4 = 24;
                c.aggregate_prefix_v4 = 32;
            }),
            ConfigError::AggregateNarrowerThanSource
        );
        assert_eq!(bad(|c| c.event_interval_ms = 0), ConfigError::EventInterval);
        assert_eq!(
            bad(|c| c.handshake_timeout_s = 0),
            ConfigError::HandshakeTimeout
        );
    }
}
