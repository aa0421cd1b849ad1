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

pub const TCP_MIN_HLEN: usize = 20;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

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
    pub fn header<const N: usize>(&self, offset: usize) -> Option<Header<N>> {
        let at = self.start + offset;
        if at + N > self.end {
            return None;
        }
        Some(Header { at })
    }
}

impl Packet {
    /// Whether the frame holds its first `len` bytes. Written as a length
    /// comparison, not as the pointer bound `header` checks: otherwise the
    /// compiler derives one bound from the other and drops a check the
    /// verifier needs to see.
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        len <= self.end.wrapping_sub(self.start)
    }
}

/// `N` bytes of packet, checked to be there.
#[derive(Clone, Copy)]
pub struct Header<const N: usize> {
    at: usize,
}

impl<const N: usize> Header<N> {
    /// The header's address, for a helper that reads it in place (the bench's kernel-cookie
    /// reference, `bench_ref.rs`); guard itself reads fields only.
    #[allow(dead_code)]
    #[inline(always)]
    pub fn ptr(&self) -> usize {
        self.at
    }

    /// The `T` at byte `OFFSET`, bytes as they are on the wire.
    #[inline(always)]
    fn read<T: Copy, const OFFSET: usize>(&self) -> T {
        const { assert!(OFFSET + core::mem::size_of::<T>() <= N) };
        // SAFETY: [at, at + N) lies inside the packet (checked in
        // `Packet::header`) and the read stays within it (asserted above).
        unsafe { core::ptr::read_unaligned((self.at + OFFSET) as *const T) }
    }

    #[inline(always)]
    pub fn u8_at<const OFFSET: usize>(&self) -> u8 {
        self.read::<u8, OFFSET>()
    }

    #[inline(always)]
    pub fn be16_at<const OFFSET: usize>(&self) -> u16 {
        u16::from_be(self.read::<u16, OFFSET>())
    }

    #[inline(always)]
    pub fn be32_at<const OFFSET: usize>(&self) -> u32 {
        u32::from_be(self.read::<u32, OFFSET>())
    }

    /// The `T` at byte `OFFSET`, in memory (wire) order.
    #[inline(always)]
    pub fn raw<T: Copy, const OFFSET: usize>(&self) -> T {
        self.read::<T, OFFSET>()
    }

    /// Writes `value` at byte `OFFSET`, bytes as they lie in memory.
    #[inline(always)]
    pub fn write<T: Copy, const OFFSET: usize>(&self, value: T) {
        const { assert!(OFFSET + core::mem::size_of::<T>() <= N) };
        // SAFETY: as for `read`; the program owns the frame it rewrites.
        unsafe { core::ptr::write_unaligned((self.at + OFFSET) as *mut T, value) }
    }
}

/// Where a TCP segment's headers are, for the steps that read or rewrite
/// more of it (SYN cookies).
#[derive(Clone, Copy)]
pub struct TcpAt {
    /// Offsets of the IP and TCP headers from the frame's start.
    pub l3: usize,
    pub l4: usize,
    pub v6: bool,
    /// IPv4 without options or IPv6 without extension headers, not a
    /// fragment: the only shape a cookie SYN-ACK is built from.
    pub plain: bool,
}

/// What the transport layer turned out to be.
#[derive(Clone, Copy)]
pub enum Transport {
    /// A complete TCP header (at least 20 bytes, data offset sane).
    Tcp { dst_port: u16, flags: u8, at: TcpAt },
    /// A fragment that does not start the datagram: no TCP header in it.
    LaterFragment,
    /// A first fragment of TCP that does not hold the whole TCP header
    /// (`dst_port` if it holds that much). The kernel reassembles such a
    /// SYN, so it cannot be judged and cannot be legitimate (RFC 1858).
    TinyFragment { dst_port: Option<u16> },
    /// A TCP fragment at offset 8 bytes: only useful to overwrite the first
    /// fragment's TCP header (RFC 3128).
    OverlapFragment,
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
    // The datagram ends where its total length says, not where the frame
    // does: Ethernet pads short frames, and the kernel trims the padding
    // before TCP looks at it, so bytes past it must not count as header.
    let total_len = hdr.be16_at::<2>() as usize;
    if total_len < ihl {
        return Err(Malformed);
    }
    let ip_end = l3 + (total_len & 0xffff);
    let frag = hdr.be16_at::<6>();
    let src = AddrWords::v4_mapped(hdr.read::<u32, 12>());
    let offset = frag & IPV4_OFFSET_MASK;
    let first_fragment = offset == 0 && frag & IPV4_MORE_FRAGMENTS != 0;
    let transport = if hdr.u8_at::<9>() != IPPROTO_TCP {
        if offset != 0 {
            Transport::LaterFragment
        } else {
            Transport::Other
        }
    } else if offset == 1 {
        Transport::OverlapFragment
    } else if offset != 0 {
        Transport::LaterFragment
    } else {
        let at = TcpAt {
            l3,
            l4: l3 + ihl,
            v6: false,
            plain: ihl == 20 && !first_fragment,
        };
        parse_tcp(pkt, at, ip_end, first_fragment)
    };
    Ok(Parsed::Ip { src, transport })
}

#[inline(always)]
fn parse_ipv6(pkt: &Packet, l3: usize) -> Result<Parsed, Malformed> {
    let hdr = pkt.header::<IPV6_HLEN>(l3).ok_or(Malformed)?;
    if hdr.u8_at::<0>() >> 4 != 6 {
        return Err(Malformed);
    }
    let payload_len = hdr.be16_at::<4>() as usize;
    // 0 is a jumbogram's (its length is in a hop-by-hop option): bounded
    // by the frame alone.
    let ip_end = if payload_len == 0 {
        usize::MAX
    } else {
        l3 + IPV6_HLEN + payload_len
    };
    let mut next = hdr.u8_at::<6>();
    let src = AddrWords([hdr.read::<u64, 8>(), hdr.read::<u64, 16>()]);
    // IPv4-mapped sources are their IPv4 address, which is exactly how the
    // unified key space stores IPv4: nothing to convert.
    let mut offset = l3 + IPV6_HLEN;
    let mut first_fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            // Every extension header is at least 8 bytes: one load each.
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Some(ext) = ext_header(pkt, offset, ip_end) else {
                    return chain_cut_short(pkt, src, ip_end, first_fragment);
                };
                next = ext.u8_at::<0>();
                offset += (ext.u8_at::<1>() as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let Some(ext) = ext_header(pkt, offset, ip_end) else {
                    return chain_cut_short(pkt, src, ip_end, first_fragment);
                };
                next = ext.u8_at::<0>();
                offset += (ext.u8_at::<1>() as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let Some(ext) = ext_header(pkt, offset, ip_end) else {
                    return chain_cut_short(pkt, src, ip_end, first_fragment);
                };
                let nh = ext.u8_at::<0>();
                let frag = ext.be16_at::<2>();
                let frag_offset = frag >> 3;
                if frag_offset == 1 && nh == IPPROTO_TCP {
                    return Ok(Parsed::Ip {
                        src,
                        transport: Transport::OverlapFragment,
                    });
                }
                if frag_offset != 0 {
                    return Ok(Parsed::Ip {
                        src,
                        transport: Transport::LaterFragment,
                    });
                }
                // Offset 0 with "more" set starts a datagram; without it the
                // header is an atomic fragment (RFC 6946), a whole packet. An
                // atomic header nested inside a first fragment leaves it a first
                // fragment (the parser fuzz found the overwrite hiding a SYN).
                first_fragment |= frag & 1 != 0;
                next = nh;
                offset += 8;
            }
            IPPROTO_TCP => {
                let at = TcpAt {
                    l3,
                    l4: offset,
                    v6: true,
                    plain: offset == l3 + IPV6_HLEN,
                };
                return Ok(Parsed::Ip {
                    src,
                    transport: parse_tcp(pkt, at, ip_end, first_fragment),
                });
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
        IPPROTO_TCP => {
            let at = TcpAt {
                l3,
                l4: offset,
                v6: true,
                plain: false,
            };
            Ok(Parsed::Ip {
                src,
                transport: parse_tcp(pkt, at, ip_end, first_fragment),
            })
        }
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            Ok(Parsed::ExtChainTooLong { src })
        }
        _ => Ok(Parsed::Ip {
            src,
            transport: Transport::Other,
        }),
    }
}

/// The first 8 bytes of the extension header at `offset` (every one is at
/// least that long), if the datagram, or this fragment of it, holds them.
#[inline(always)]
fn ext_header(pkt: &Packet, offset: usize, ip_end: usize) -> Option<Header<8>> {
    if offset + 8 > ip_end {
        return None;
    }
    pkt.header::<8>(offset)
}

/// An IPv6 header chain that ends before its upper-layer header does. In a
/// first fragment that is the IPv6 form of a tiny fragment: the TCP header,
/// and with it whether this is a SYN, comes only with a later fragment. RFC
/// 7112 forbids such first fragments, but Linux reassembles them (the
/// evasion corpus found a SYN behind two destination-options headers split
/// this way reaching the listener). Anything else cut short is truncated,
/// and the kernel discards it.
#[inline(always)]
fn chain_cut_short(
    pkt: &Packet,
    src: AddrWords,
    ip_end: usize,
    first_fragment: bool,
) -> Result<Parsed, Malformed> {
    if first_fragment && pkt.holds(ip_end) {
        return Ok(Parsed::Ip {
            src,
            transport: Transport::TinyFragment { dst_port: None },
        });
    }
    Err(Malformed)
}

/// `ip_end`: where the datagram (or this fragment of it) ends by its IP
/// length; `first_fragment`: more fragments follow this one.
#[inline(always)]
fn parse_tcp(pkt: &Packet, at: TcpAt, ip_end: usize, first_fragment: bool) -> Transport {
    // Only a whole 20-byte header counts as TCP: a truncated one is not a
    // SYN, and the kernel drops it — unless more fragments follow, which
    // the kernel reassembles into whatever they spell.
    let whole = at.l4 + TCP_MIN_HLEN <= ip_end;
    let hdr = if whole {
        pkt.header::<TCP_MIN_HLEN>(at.l4)
    } else {
        None
    };
    let Some(hdr) = hdr else {
        // A frame shorter than its IP length is malformed (the kernel drops
        // it); only a fragment that is short by its own length is tiny.
        if !first_fragment || !pkt.holds(ip_end) {
            return Transport::Other;
        }
        let port_held = at.l4 + 4 <= ip_end;
        let dst_port = match pkt.header::<4>(at.l4) {
            Some(ports) if port_held => Some(ports.be16_at::<2>()),
            _ => None,
        };
        return Transport::TinyFragment { dst_port };
    };
    let data_offset = (hdr.u8_at::<12>() >> 4) as usize * 4;
    if data_offset < TCP_MIN_HLEN {
        return Transport::Other;
    }
    Transport::Tcp {
        dst_port: hdr.be16_at::<2>(),
        flags: hdr.u8_at::<13>(),
        at,
    }
}

/// The connection a TCP segment belongs to, as `HANDSHAKES` keys it: the
/// sender is the client, the destination the server (ports in host order).
/// `None` if the headers are not where `at` says (they are: `parse` checked
/// them; the bounds are checked again for the verifier).
#[inline(always)]
pub fn flow_key(pkt: &Packet, at: &TcpAt) -> Option<guard_common::state::FlowKey> {
    let tcp = pkt.header::<TCP_MIN_HLEN>(at.l4)?;
    let client_port = tcp.be16_at::<0>();
    let server_port = tcp.be16_at::<2>();
    let (client, server) = if at.v6 {
        let ip = pkt.header::<IPV6_HLEN>(at.l3)?;
        (
            AddrWords([ip.raw::<u64, 8>(), ip.raw::<u64, 16>()]),
            AddrWords([ip.raw::<u64, 24>(), ip.raw::<u64, 32>()]),
        )
    } else {
        let ip = pkt.header::<20>(at.l3)?;
        (
            AddrWords::v4_mapped(ip.raw::<u32, 12>()),
            AddrWords::v4_mapped(ip.raw::<u32, 16>()),
        )
    };
    Some(guard_common::state::FlowKey {
        client: client.to_addr(),
        server: server.to_addr(),
        client_port,
        server_port,
        _pad: 0,
    })
}
