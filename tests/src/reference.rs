//! What Linux's receive path makes of a frame, written from the kernel's rules and not from
//! guard's parser: the reference the parser fuzz run (`tests/tests/fuzz.rs`) holds the
//! datapath to. It answers one question — could this frame open a TCP connection, or help
//! reassemble a datagram that does — and errs toward "yes" (checksums are assumed right, AH
//! is assumed to verify), so the datapath is held to at least what the kernel would accept.
//!
//! The contract it encodes, beyond the kernel's own rules: up to two VLAN tags are looked
//! through (a frame with more reaches no listener unless nested VLAN devices exist); an IPv6
//! jumbogram (payload length 0) is not accepted (Linux takes those only from its own GSO).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The reference's reading of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judged {
    /// A connection-opening SYN (whole, or starting a datagram that reassembles into one).
    Syn { src: IpAddr, dst_port: u16 },
    /// A first fragment of TCP too short to show the flags: it reassembles into whatever the
    /// later fragments spell (`dst_port` if it holds that much).
    TinyFirstFragment { src: IpAddr, dst_port: Option<u16> },
    /// A TCP fragment at offset 8: only useful to rewrite a first fragment's header.
    OverlapFragment { src: IpAddr },
    /// Nothing that can open a connection on its own.
    Other,
}

/// Judges an Ethernet frame.
pub fn judge(frame: &[u8]) -> Judged {
    let mut at = 12;
    let mut ethertype = be16(frame, at);
    let mut tags = 0;
    while matches!(ethertype, Some(0x8100) | Some(0x88a8)) {
        tags += 1;
        if tags > 2 {
            return Judged::Other;
        }
        at += 4;
        ethertype = be16(frame, at);
    }
    let l3 = at + 2;
    match ethertype {
        Some(0x0800) => ipv4(frame, l3),
        Some(0x86dd) => ipv6(frame, l3),
        _ => Judged::Other,
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn ipv4(frame: &[u8], l3: usize) -> Judged {
    let Some(ip) = frame.get(l3..l3 + 20) else {
        return Judged::Other;
    };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // ip_rcv_core: version, header length, total length within the frame.
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || frame.len() < l3 + total {
        return Judged::Other;
    }
    if ip[9] != 6 {
        return Judged::Other;
    }
    let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    let field = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = field & 0x1fff;
    let more = field & 0x2000 != 0;
    if offset == 1 {
        return Judged::OverlapFragment { src };
    }
    if offset != 0 {
        return Judged::Other;
    }
    tcp(src, &frame[l3 + ihl..l3 + total], more)
}

fn ipv6(frame: &[u8], l3: usize) -> Judged {
    let Some(ip) = frame.get(l3..l3 + 40) else {
        return Judged::Other;
    };
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ip[0] >> 4 != 6 || payload == 0 || frame.len() < l3 + 40 + payload {
        return Judged::Other;
    }
    let src = IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"),
    ));
    let end = l3 + 40 + payload;
    let mut next = ip[6];
    let mut at = l3 + 40;
    let mut first_fragment = false;
    let mut first_header = true;
    loop {
        let ext_len = match next {
            0 | 43 | 60 | 51 | 44 => {
                let Some(h) = frame.get(at..at + 8).filter(|_| at + 8 <= end) else {
                    // The chain runs out before its upper layer: a first fragment hides
                    // it in a later one; anything else is truncated and discarded.
                    return if first_fragment {
                        Judged::TinyFirstFragment {
                            src,
                            dst_port: None,
                        }
                    } else {
                        Judged::Other
                    };
                };
                match next {
                    // ipv6_parse_hopopts: hop-by-hop only right after the fixed header.
                    0 if !first_header => return Judged::Other,
                    // A routing header with segments left sends the packet on, not up.
                    43 if h[3] != 0 => return Judged::Other,
                    44 => {
                        let field = u16::from_be_bytes([h[2], h[3]]);
                        let offset = field >> 3;
                        if offset == 1 && h[0] == 6 {
                            return Judged::OverlapFragment { src };
                        }
                        if offset != 0 {
                            return Judged::Other;
                        }
                        first_fragment |= field & 1 != 0;
                    }
                    _ => {}
                }
                let len = match next {
                    51 => (usize::from(h[1]) + 2) * 4,
                    44 => 8,
                    _ => (usize::from(h[1]) + 1) * 8,
                };
                next = h[0];
                len
            }
            6 => return tcp(src, &frame[at.min(end)..end], first_fragment),
            _ => return Judged::Other,
        };
        first_header = false;
        at += ext_len;
    }
}

/// `segment`: the TCP bytes this datagram (or first fragment) carries.
fn tcp(src: IpAddr, segment: &[u8], first_fragment: bool) -> Judged {
    if segment.len() < 20 {
        if !first_fragment {
            return Judged::Other;
        }
        let dst_port = be16(segment, 2);
        return Judged::TinyFirstFragment { src, dst_port };
    }
    let data_offset = usize::from(segment[12] >> 4) * 4;
    // tcp_v4_rcv/tcp_v6_rcv: a header shorter than 20 bytes or longer than the segment is
    // discarded; a first fragment's options may continue in the next one.
    if data_offset < 20 || (!first_fragment && data_offset > segment.len()) {
        return Judged::Other;
    }
    let flags = segment[13];
    // A listener discards RST, answers ACK with a reset, and drops SYN+FIN.
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return Judged::Other;
    }
    Judged::Syn {
        src,
        dst_port: u16::from_be_bytes([segment[2], segment[3]]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{v4, v6, Ext, Frame, TCP_ACK, TCP_FIN};

    #[test]
    fn reads_what_the_kernel_would() {
        let a4 = v4(198, 18, 0, 3);
        let a6 = v6("2001:2::3");
        let syn4 = Judged::Syn {
            src: a4,
            dst_port: 8080,
        };
        assert_eq!(judge(&Frame::syn(a4, 8080).bytes()), syn4);
        assert_eq!(
            judge(&Frame::syn(a4, 8080).vlan(true).vlan(false).bytes()),
            syn4
        );
        assert_eq!(
            judge(
                &Frame::syn(a4, 8080)
                    .vlan(true)
                    .vlan(false)
                    .vlan(false)
                    .bytes()
            ),
            Judged::Other
        );
        assert_eq!(
            judge(&Frame::syn(a4, 8080).tcp_flags(TCP_SYN | TCP_ACK).bytes()),
            Judged::Other
        );
        assert_eq!(
            judge(&Frame::syn(a4, 8080).tcp_flags(TCP_SYN | TCP_FIN).bytes()),
            Judged::Other
        );
        assert_eq!(
            judge(&Frame::syn(a4, 8080).ipv4_fragment(1, false).bytes()),
            Judged::OverlapFragment { src: a4 }
        );
        assert_eq!(
            judge(&Frame::syn(a4, 8080).ipv4_fragment(3, false).bytes()),
            Judged::Other
        );
        let mut tiny = Frame::syn(a4, 8080).ipv4_fragment(0, true).bytes();
        tiny[16..18].copy_from_slice(&28u16.to_be_bytes());
        tiny.truncate(14 + 28);
        assert_eq!(
            judge(&tiny),
            Judged::TinyFirstFragment {
                src: a4,
                dst_port: Some(8080)
            }
        );
        let syn6 = Judged::Syn {
            src: a6,
            dst_port: 8080,
        };
        let chain = Frame::syn(a6, 8080)
            .ext(Ext::HopByHop)
            .ext(Ext::Routing)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .ext(Ext::DestOpts)
            .ext(Ext::Auth)
            .bytes();
        assert_eq!(judge(&chain), syn6);
        // Hop-by-hop anywhere but first is refused.
        let late_hop = Frame::syn(a6, 8080)
            .ext(Ext::DestOpts)
            .ext(Ext::HopByHop)
            .bytes();
        assert_eq!(judge(&late_hop), Judged::Other);
        // A first fragment ending inside its chain.
        let mut cut = Frame::syn(a6, 8080)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .ext(Ext::DestOpts)
            .ext(Ext::DestOpts)
            .bytes();
        cut[18..20].copy_from_slice(&16u16.to_be_bytes());
        cut.truncate(14 + 40 + 16);
        assert_eq!(
            judge(&cut),
            Judged::TinyFirstFragment {
                src: a6,
                dst_port: None
            }
        );
        // Truncated below its IP length: the kernel discards it.
        let mut short = Frame::syn(a4, 8080).bytes();
        short.truncate(short.len() - 1);
        assert_eq!(judge(&short), Judged::Other);
    }
}
