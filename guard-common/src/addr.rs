//! Addresses as the kernel and the agent share them.
//!
//! Every address is 16 bytes in **network byte order**. IPv4 is stored
//! IPv4-mapped (`::ffff:a.b.c.d`), so one LPM trie and one hash map serve both
//! families, and a source that reaches us over IPv4-mapped IPv6 is the same
//! source as its IPv4 address. An IPv4 prefix of length `n` is the unified
//! prefix `96 + n`.

pub type Addr = [u8; 16];

/// Bits in front of an IPv4 address inside the unified space.
pub const V4_MAPPED_BITS: u32 = 96;
pub const MAX_PREFIX_LEN: u32 = 128;

#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    AddrWords::from_addr(addr).is_v4_mapped()
}

/// The IPv4 address inside an IPv4-mapped address, if it is one.
#[inline(always)]
pub const fn as_v4(addr: &Addr) -> Option<[u8; 4]> {
    if is_v4_mapped(addr) {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// The unified prefix length for a family-specific one: `v4_len` applies to
/// IPv4-mapped addresses, `v6_len` to the rest. Both are clamped to their
/// family's width so a bad config can never mask beyond the address.
#[inline(always)]
pub const fn unified_prefix_len(addr: &Addr, v4_len: u8, v6_len: u8) -> u32 {
    AddrWords::from_addr(addr).unified_prefix_len(v4_len, v6_len)
}

/// `addr` with every bit past `prefix_len` cleared; lengths past 128 keep
/// everything.
#[inline(always)]
pub const fn mask(addr: &Addr, prefix_len: u32) -> Addr {
    AddrWords::from_addr(addr).masked(prefix_len).to_addr()
}

/// The key of the prefix `addr` belongs to, given the family-specific lengths.
#[inline(always)]
pub const fn prefix_key(addr: &Addr, v4_len: u8, v6_len: u8) -> Addr {
    AddrWords::from_addr(addr)
        .prefix_key(v4_len, v6_len)
        .to_addr()
}

/// A mask of the top `bits` bits of a u64 (0..=64; more saturates).
#[inline(always)]
const fn top_bits(bits: u32) -> u64 {
    if bits == 0 {
        0
    } else if bits >= 64 {
        u64::MAX
    } else {
        !(u64::MAX >> bits)
    }
}

/// The same 16 network-order bytes as an [`Addr`], held as two native words:
/// the form the datapath computes on. Masking, the IPv4-mapped test and key
/// copies are then a few word operations where the byte form costs dozens
/// (the BPF backend assembles and spills byte arrays one byte at a time).
/// Its memory is exactly the `Addr` bytes, so map keys do not change.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrWords(pub [u64; 2]);

const _: () = assert!(core::mem::size_of::<AddrWords>() == core::mem::size_of::<Addr>());

/// Bytes 8..12 of an IPv4-mapped address (`0, 0, 0xff, 0xff`) and the mask
/// selecting them in the second word.
const V4_MAPPED_TAG: u64 = u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0]);
const V4_MAPPED_TAG_MASK: u64 = u64::from_ne_bytes([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);

impl AddrWords {
    #[inline(always)]
    pub const fn from_addr(addr: &Addr) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = *addr;
        Self([
            u64::from_ne_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            u64::from_ne_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
        ])
    }

    #[inline(always)]
    pub const fn to_addr(self) -> Addr {
        let [a0, a1, a2, a3, a4, a5, a6, a7] = self.0[0].to_ne_bytes();
        let [b0, b1, b2, b3, b4, b5, b6, b7] = self.0[1].to_ne_bytes();
        [
            a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7,
        ]
    }

    /// The bytes in place, for map calls that take an `Addr` key.
    #[inline(always)]
    pub const fn as_addr(&self) -> &Addr {
        // SAFETY: same size, `Addr` has alignment 1 and every bit pattern is
        // a valid byte array.
        unsafe { &*(self as *const Self as *const Addr) }
    }

    /// IPv4 `a.b.c.d` given as the word its four network-order bytes make
    /// when read in place (`u32::from_ne_bytes([a, b, c, d])`), as the
    /// datapath reads it straight from the header.
    #[inline(always)]
    pub const fn v4_mapped(v4_word: u32) -> Self {
        let [a, b, c, d] = v4_word.to_ne_bytes();
        Self([0, u64::from_ne_bytes([0, 0, 0xff, 0xff, a, b, c, d])])
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.0[0] == 0 && self.0[1] & V4_MAPPED_TAG_MASK == V4_MAPPED_TAG
    }

    /// See [`unified_prefix_len`].
    #[inline(always)]
    pub const fn unified_prefix_len(&self, v4_len: u8, v6_len: u8) -> u32 {
        if self.is_v4_mapped() {
            let len = if v4_len > 32 { 32 } else { v4_len as u32 };
            V4_MAPPED_BITS + len
        } else if v6_len as u32 > MAX_PREFIX_LEN {
            MAX_PREFIX_LEN
        } else {
            v6_len as u32
        }
    }

    /// See [`mask`]. The masks are big-endian bit masks laid over the bytes
    /// (`to_be`), so no byte of the address itself is ever swapped.
    #[inline(always)]
    pub const fn masked(self, prefix_len: u32) -> Self {
        let (hi, lo) = if prefix_len >= 64 {
            (u64::MAX, top_bits(prefix_len - 64))
        } else {
            (top_bits(prefix_len), 0)
        };
        Self([self.0[0] & hi.to_be(), self.0[1] & lo.to_be()])
    }

    /// See [`prefix_key`].
    #[inline(always)]
    pub const fn prefix_key(self, v4_len: u8, v6_len: u8) -> Self {
        self.masked(self.unified_prefix_len(v4_len, v6_len))
    }
}

#[cfg(feature = "std")]
mod std_conv {
    use super::*;
    use core::fmt;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::string::{String, ToString};

    /// An address as std sees it; IPv4-mapped addresses come back as IPv4.
    pub fn to_ip(addr: &Addr) -> IpAddr {
        match as_v4(addr) {
            Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            None => IpAddr::V6(Ipv6Addr::from(*addr)),
        }
    }

    /// The unified form of a std address (IPv4 and IPv4-mapped IPv6 meet).
    pub fn from_ip(ip: IpAddr) -> Addr {
        match ip {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// A network prefix in the unified space: the address is always masked.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct Prefix {
        addr: Addr,
        len: u32,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct PrefixParseError(String);

    impl fmt::Display for PrefixParseError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for PrefixParseError {}

    impl Prefix {
        /// A prefix in the unified space (`len` 0..=128).
        pub fn new(addr: Addr, len: u32) -> Self {
            let len = len.min(MAX_PREFIX_LEN);
            Self {
                addr: mask(&addr, len),
                len,
            }
        }

        /// The host prefix of one address (/32 or /128).
        pub fn host(ip: IpAddr) -> Self {
            Self::new(from_ip(ip), MAX_PREFIX_LEN)
        }

        /// The prefix `ip` falls in with family-specific lengths.
        pub fn of(ip: IpAddr, v4_len: u8, v6_len: u8) -> Self {
            let addr = from_ip(ip);
            Self::new(addr, unified_prefix_len(&addr, v4_len, v6_len))
        }

        pub fn addr(&self) -> Addr {
            self.addr
        }

        /// Length in the unified (128-bit) space.
        pub fn prefix_len(&self) -> u32 {
            self.len
        }

        pub fn is_v4(&self) -> bool {
            is_v4_mapped(&self.addr) && self.len >= V4_MAPPED_BITS
        }

        pub fn contains(&self, ip: IpAddr) -> bool {
            mask(&from_ip(ip), self.len) == self.addr
        }

        pub fn contains_prefix(&self, other: &Prefix) -> bool {
            other.len >= self.len && mask(&other.addr, self.len) == self.addr
        }
    }

    impl fmt::Display for Prefix {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.is_v4() {
                write!(f, "{}/{}", to_ip(&self.addr), self.len - V4_MAPPED_BITS)
            } else {
                write!(f, "{}/{}", Ipv6Addr::from(self.addr), self.len)
            }
        }
    }

    impl core::str::FromStr for Prefix {
        type Err = PrefixParseError;

        /// `a.b.c.d`, `a.b.c.d/n`, `v6`, `v6/n`; a bare address is a host.
        fn from_str(s: &str) -> Result<Self, Self::Err> {
            let s = s.trim();
            let (ip, len) = match s.split_once('/') {
                Some((ip, len)) => (ip, Some(len)),
                None => (s, None),
            };
            let ip: IpAddr = ip.parse().map_err(|_| {
                PrefixParseError(std::format!(
                    "`{s}` is not an IP address or prefix (expected e.g. 198.18.0.0/24 or 2001:2::/48)"
                ))
            })?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u32 = match len {
                None => max,
                Some(len) => len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
                    PrefixParseError(std::format!(
                        "`{s}` has a bad prefix length (0..={max} for {})",
                        if ip.is_ipv4() { "IPv4" } else { "IPv6" }
                    ))
                })?,
            };
            let unified = match ip {
                IpAddr::V4(_) => V4_MAPPED_BITS + len,
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && len >= V4_MAPPED_BITS => len,
                IpAddr::V6(_) => len,
            };
            Ok(Self::new(from_ip(ip), unified))
        }
    }

    impl From<IpAddr> for Prefix {
        fn from(ip: IpAddr) -> Self {
            Self::host(ip)
        }
    }

    // For serde-free text round trips (config files, CLI, audit log).
    impl Prefix {
        pub fn to_text(&self) -> String {
            self.to_string()
        }
    }
}

#[cfg(feature = "std")]
pub use std_conv::{from_ip, to_ip, Prefix, PrefixParseError};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_edges() {
        let all = [0xffu8; 16];
        assert_eq!(mask(&all, 0), [0; 16]);
        assert_eq!(mask(&all, 128), all);
        assert_eq!(mask(&all, 200), all, "lengths past 128 keep everything");
        let m = mask(&all, 64);
        assert_eq!(&m[..8], &[0xff; 8]);
        assert_eq!(&m[8..], &[0; 8]);
        let m = mask(&all, 65);
        assert_eq!(m[8], 0x80);
        assert_eq!(&m[9..], &[0; 7]);
        let m = mask(&all, 1);
        assert_eq!(m[0], 0x80);
        assert_eq!(&m[1..], &[0; 15]);
        let m = mask(&all, 127);
        assert_eq!(m[15], 0xfe);
        let m = mask(&all, 63);
        assert_eq!(m[7], 0xfe);
        assert_eq!(&m[8..], &[0; 8]);
    }

    #[test]
    fn mask_every_length_keeps_exactly_that_many_bits() {
        let all = [0xffu8; 16];
        for len in 0..=128u32 {
            let m = mask(&all, len);
            let ones: u32 = m.iter().map(|b| b.count_ones()).sum();
            assert_eq!(ones, len, "len {len}");
        }
    }

    #[test]
    fn v4_mapping_and_prefix_lengths() {
        let a = v4_mapped([198, 18, 0, 7]);
        assert!(is_v4_mapped(&a));
        assert_eq!(as_v4(&a), Some([198, 18, 0, 7]));
        assert_eq!(unified_prefix_len(&a, 32, 64), 128);
        assert_eq!(unified_prefix_len(&a, 24, 64), 120);
        assert_eq!(unified_prefix_len(&a, 99, 64), 128, "clamped to /32");
        assert_eq!(prefix_key(&a, 24, 64), v4_mapped([198, 18, 0, 0]));
        let v6 = [0x20, 0x01, 0, 2, 0, 0, 0xab, 0xcd, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(!is_v4_mapped(&v6));
        assert_eq!(unified_prefix_len(&v6, 32, 64), 64);
        assert_eq!(unified_prefix_len(&v6, 32, 255), 128);
        assert_eq!(
            &prefix_key(&v6, 32, 48)[..],
            &[0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // A v6 address that merely starts with zeros is not mapped.
        let mut almost = a;
        almost[10] = 0xfe;
        assert!(!is_v4_mapped(&almost));
    }

    /// Bit `i` (0 = most significant) of the address, read byte by byte.
    fn bit(addr: &Addr, i: u32) -> bool {
        addr[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    #[test]
    fn word_mask_matches_a_bitwise_reference_at_every_length() {
        // A cheap deterministic spread of addresses, plus the edges.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut addrs = [[0u8; 16]; 67];
        addrs[1] = [0xff; 16];
        addrs[2] = v4_mapped([198, 18, 0, 7]);
        for a in addrs[3..].iter_mut() {
            for b in a.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        for a in &addrs {
            for len in 0..=130u32 {
                let m = mask(a, len);
                for i in 0..128 {
                    assert_eq!(bit(&m, i), i < len && bit(a, i), "{a:?}/{len} bit {i}");
                }
            }
        }
    }

    #[test]
    fn words_hold_the_same_bytes() {
        let a = [0x20, 0x01, 0, 2, 0, 0, 0xab, 0xcd, 1, 2, 3, 4, 5, 6, 7, 8];
        let w = AddrWords::from_addr(&a);
        assert_eq!(w.as_addr(), &a);
        assert_eq!(w.to_addr(), a);
        let v4 = AddrWords::v4_mapped(u32::from_ne_bytes([198, 18, 0, 7]));
        assert_eq!(v4.as_addr(), &v4_mapped([198, 18, 0, 7]));
        assert!(v4.is_v4_mapped());
        assert!(!w.is_v4_mapped());
        assert_eq!(v4.prefix_key(24, 64).as_addr(), &v4_mapped([198, 18, 0, 0]));
    }

    #[cfg(feature = "std")]
    #[test]
    fn prefix_parse_and_display() {
        use std::string::ToString;
        let p: Prefix = "198.18.0.9/24".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.0.0/24");
        assert!(p.contains("198.18.0.200".parse().unwrap()));
        assert!(p.contains("::ffff:198.18.0.200".parse().unwrap()));
        assert!(!p.contains("198.18.1.1".parse().unwrap()));
        let h: Prefix = "198.18.0.3".parse().unwrap();
        assert_eq!(h.to_string(), "198.18.0.3/32");
        let v6: Prefix = "2001:2::1/48".parse().unwrap();
        assert_eq!(v6.to_string(), "2001:2::/48");
        assert!("198.18.0.0/33".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        assert!("::/129".parse::<Prefix>().is_err());
        let mapped: Prefix = "::ffff:198.18.0.3".parse().unwrap();
        assert_eq!(mapped, h);
        assert!(p.contains_prefix(&h));
        assert!(!h.contains_prefix(&p));
    }
}
