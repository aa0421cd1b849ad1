//! Bounds-checked reads from the packet, parsed by layer.
//!
//! Every header is bounds-checked once, as a whole ([`Packet::header`]:
//! `start + offset + N <= end` right before its fields are read), and its
//! fields are then read at constant offsets inside it. Separate checks per
//! field let the compiler merge them onto a register the verifier cannot
//! relate to the access. Fields are read in place as whole words (the build
//! allows misaligned loads, which the kernel accepts for packet data on
//! architectures with efficient unaligned access); addresses stay in network
//! byte order.

use guard_common::addr::AddrWords;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
/// Up to two tags: 802.1ad outer (or 802.1Q) and 802.1Q inner.
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up. Real traffic carries one or
/// two; a longer chain is treated as hostile (see `Parsed::ExtChainTooLong`).
pub const MAX_EXT_HEADERS: usize = 6;

const TCP_MIN_HLEN: usize = 20;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy)]
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// The `N` bytes at `offset`, if the packet holds them all.
    #[inline(always)]
    fn header<const N: usize>(&self, offset: usize) -> Option<Header<N>> {
        let at = self.start + offset;
        if at + N > self.end {
            return None;
        }
        Some(Header { at })
    }
}

/// `N` bytes of packet, checked to be there.
#[derive(Clone, Copy)]
struct Header<const N: usize> {
    at: usize,
}

impl<const N: usize> Header<N> {
    /// The `T` at byte `OFFSET`, bytes as they are on the wire.
    #[inline(always)]
    fn read<T: Copy, const OFFSET: usize>(&self) -> T {
        const { assert!(OFFSET + core::mem::size_of::<T>() <= N) };
        // SAFETY: [at, at + N) lies inside the packet (checked in
        // `Packet::header`) and the read stays within it (asserted above).
        unsafe { core::ptr::read_unaligned((self.at + OFFSET) as *const T) }
    }

    #[inline(always)]
    fn u8_at<const OFFSET: usize>(&self) -> u8 {
        self.read::<u8, OFFSET>()
    }

    #[inline(always)]
    fn be16_at<const OFFSET: usize>(&self) -> u16 {
        u16::from_be(self.read::<u16, OFFSET>())
    }
}

/// What the transport layer turned out to be.
#[derive(Clone, Copy)]
pub enum Transport {
    /// A complete TCP header (at least 20 bytes, data offset sane).
    Tcp { dst_port: u16, flags: u8 },
    /// A fragment that does not start the datagram: no TCP header in it.
    LaterFragment,
    /// Any other protocol, or TCP that is truncated/inconsistent (the
    /// kernel's own checks discard the latter).
    Other,
}

pub enum Parsed {
    NotIp,
    Ip {
        src: AddrWords,
        transport: Transport,
    },
    /// IPv6 with more extension headers than we walk. Not malformed: the
    /// kernel would still deliver what is behind them.
    ExtChainTooLong {
        src: AddrWords,
    },
}

/// Frames we cannot parse are passed: a frame too short or inconsistent to
/// parse cannot open a connection, because the kernel's IP and TCP input
/// paths validate the same lengths and discard it.
pub struct Malformed;

#[inline(always)]
pub fn parse(pkt: &Packet) -> Result<Parsed, Malformed> {
    let mut ethertype = pkt.header::<ETH_HLEN>(0).ok_or(Malformed)?.be16_at::<12>();
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = pkt.header::<VLAN_HLEN>(offset).ok_or(Malformed)?;
        ethertype = tag.be16_at::<2>();
        offset += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, offset),
        ETH_P_IPV6 => parse_ipv6(pkt, offset),
        _ => Ok(Parsed::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(pkt: &Packet, l3: usize) -> Result<Parsed, Malformed> {
    let hdr = pkt.header::<20>(l3).ok_or(Malformed)?;
    let version_ihl = hdr.u8_at::<0>();
    if version_ihl >> 4 != 4 {
        return Err(Malformed);
    }
    // Masked before multiplying so the verifier knows the range (0..=60).
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Malformed);
    }
    let frag = hdr.be16_at::<6>();
    let src = AddrWords::v4_mapped(hdr.read::<u32, 12>());
    let transport = if frag & 0x1fff != 0 {
        Transport::LaterFragment
    } else if hdr.u8_at::<9>() == IPPROTO_TCP {
        parse_tcp(pkt, l3 + ihl)
    } else {
        Transport::Other
    };
    Ok(Parsed::Ip { src, transport })
}

#[inline(always)]
fn parse_ipv6(pkt: &Packet, l3: usize) -> Result<Parsed, Malformed> {
    let hdr = pkt.header::<IPV6_HLEN>(l3).ok_or(Malformed)?;
    if hdr.u8_at::<0>() >> 4 != 6 {
        return Err(Malformed);
    }
    let mut next = hdr.u8_at::<6>();
    let src = AddrWords([hdr.read::<u64, 8>(), hdr.read::<u64, 16>()]);
    // IPv4-mapped sources are their IPv4 address, which is exactly how the
    // unified key space stores IPv4: nothing to convert.
    let mut offset = l3 + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            // Every extension header is at least 8 bytes: one load each.
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = pkt.header::<8>(offset).ok_or(Malformed)?;
                next = ext.u8_at::<0>();
                offset += (ext.u8_at::<1>() as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = pkt.header::<8>(offset).ok_or(Malformed)?;
                next = ext.u8_at::<0>();
                offset += (ext.u8_at::<1>() as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = pkt.header::<8>(offset).ok_or(Malformed)?;
                let nh = ext.u8_at::<0>();
                let frag = ext.be16_at::<2>();
                if frag >> 3 != 0 {
                    return Ok(Parsed::Ip {
                        src,
                        transport: Transport::LaterFragment,
                    });
                }
                next = nh;
                offset += 8;
            }
            IPPROTO_TCP => {
                return Ok(Parsed::Ip {
                    src,
                    transport: parse_tcp(pkt, offset),
                })
            }
            _ => {
                return Ok(Parsed::Ip {
                    src,
                    transport: Transport::Other,
                })
            }
        }
    }
    match next {
        IPPROTO_TCP => Ok(Parsed::Ip {
            src,
            transport: parse_tcp(pkt, offset),
        }),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            Ok(Parsed::ExtChainTooLong { src })
        }
        _ => Ok(Parsed::Ip {
            src,
            transport: Transport::Other,
        }),
    }
}

#[inline(always)]
fn parse_tcp(pkt: &Packet, l4: usize) -> Transport {
    // Only a whole 20-byte header counts: a truncated one is not a SYN.
    let Some(hdr) = pkt.header::<TCP_MIN_HLEN>(l4) else {
        return Transport::Other;
    };
    let data_offset = (hdr.u8_at::<12>() >> 4) as usize * 4;
    if data_offset < TCP_MIN_HLEN {
        return Transport::Other;
    }
    Transport::Tcp {
        dst_port: hdr.be16_at::<2>(),
        flags: hdr.u8_at::<13>(),
    }
}
