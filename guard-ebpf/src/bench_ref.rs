//! Reference programs for the datapath bench (`cargo xtask bench --datapath`): the cheapest
//! program that takes each of guard's actions, measured in the same run and through the same
//! `BPF_PROG_TEST_RUN` harness as guard, so guard's cost can be read as a ratio that travels
//! between machines instead of nanoseconds that do not.
//!
//! A second binary of this crate, so the one aya-build step that builds guard builds these
//! too, with the same toolchain, flags and verifier: hand-assembled instructions
//! (`tests/src/raw_xdp.rs`) would do for the empty programs, but the SYN-ACK rewrite and the
//! kernel-helper cookie are too long to keep correct by hand. Nothing here is loaded by the
//! agent; only the bench uses this object.
//!
//! Per hook (XDP and tc):
//! - `*_empty_pass`, `*_empty_drop`: return the action and nothing else; the harness's own
//!   cost per run, shown for reading.
//! - `*_pass`, `*_drop`: read what any per-source SYN filter must read before it can decide
//!   (the ethertype, the IP version, protocol and source, the TCP port and flags), then take
//!   the action. The verdict depends on those fields (a martian source or port is treated as
//!   a real filter would), so the compiler keeps every read. These are the references the
//!   pass and drop paths are gated against.
//! - `*_pass_lookup`, `*_drop_lookup`: the same, plus the one hash lookup keyed by the source
//!   that any per-source verdict needs (`REF_SOURCES`, an exact-match table the bench fills):
//!   the references of the paths whose verdict depends on the source.
//! - `*_tx`: the same reads, then a SYN turned into a SYN-ACK in place (addresses and ports
//!   swapped, sequence numbers and flags set, the checksum updated incrementally) with a fixed
//!   sequence number: sending a SYN-ACK and nothing more.
//! - `ref_xdp_cookie`: a SYN answered with a SYN cookie from the kernel's own
//!   `bpf_tcp_raw_gen_syncookie_ipv4/ipv6` (natively compiled SipHash): the reference of
//!   guard's cookie path. Its SYN-ACK carries the MSS option only, which is all the kernel's
//!   cookie encodes without timestamps.
//! - `ref_xdp_sipcookie`: the same answer with guard's own cookie (`syncookie::make`, its
//!   SipHash-1-3 compiled to BPF) in place of the helper's: guard's MAC against the kernel's,
//!   everything else equal.
//! - `ref_xdp_kcookie_calc`, `ref_xdp_gcookie_calc`: the cookie computed (the kernel's, and
//!   guard's) and the frame left alone, so the two can be repeated many times per call and
//!   read finer than the single runs an answered frame allows.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{iphdr, ipv6hdr, tcphdr, xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_tcp_raw_gen_syncookie_ipv4,
        bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap},
    programs::{TcContext, XdpContext},
};
use guard_common::{
    addr::AddrWords,
    syncookie::{self, CookieKey, Flow, Negotiated},
};

/// Sources the lookup references know, with a mark: [`DROP_MARK`] for `*_drop_lookup`,
/// [`DENY_MARK`] for `*_pass_lookup`.
#[map(name = "REF_SOURCES")]
static REF_SOURCES: HashMap<[u64; 2], u32> = HashMap::with_max_entries(1024, 0);
/// The key `ref_xdp_sipcookie` makes its cookies with.
#[map(name = "REF_COOKIE_KEY")]
static REF_COOKIE_KEY: Array<CookieKey> = Array::with_max_entries(1, 0);

// Only the bounds-checked accessor is used here; guard's full parser (VLAN tags, extension
// headers) is exactly what these references leave out.
#[allow(dead_code)]
mod packet;

use packet::{Packet, ETH_HLEN};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_SYN_ACK: u8 = 0x12;
const DROP_MARK: u32 = 1;
/// Never written by the bench: `*_pass_lookup` passes everything, yet must look to know.
const DENY_MARK: u32 = 2;
/// The TX reference's stand-in for a cookie.
const FIXED_ISN: u32 = 0x0bad_cafe;

/// What the minimal filter read.
struct Seen {
    /// The source address, folded to one word (zero: unspecified, a martian).
    src: u64,
    /// `(l3, l4, v6)` when the frame is TCP with a whole header.
    tcp: Option<(usize, usize, bool)>,
    dst_port: u16,
    flags: u8,
}

/// Ethernet, IPv4 (options skipped by IHL) or the fixed IPv6 header, and the TCP header:
/// nothing more (no VLAN tags, no extension headers, no fragments).
#[inline(always)]
fn read_min(pkt: &Packet) -> Option<Seen> {
    let ethertype = pkt.header::<ETH_HLEN>(0)?.be16_at::<12>();
    let l3 = ETH_HLEN;
    let (src, proto, l4, v6) = match ethertype {
        ETH_P_IP => {
            let ip = pkt.header::<IPV4_HLEN>(l3)?;
            let ihl = ((ip.u8_at::<0>() & 0x0f) as usize) * 4;
            (
                u64::from(ip.raw::<u32, 12>()),
                ip.u8_at::<9>(),
                l3 + ihl,
                false,
            )
        }
        ETH_P_IPV6 => {
            let ip = pkt.header::<IPV6_HLEN>(l3)?;
            (
                ip.raw::<u64, 8>() | ip.raw::<u64, 16>(),
                ip.u8_at::<6>(),
                l3 + IPV6_HLEN,
                true,
            )
        }
        _ => return None,
    };
    if proto != IPPROTO_TCP {
        return Some(Seen {
            src,
            tcp: None,
            dst_port: 0,
            flags: 0,
        });
    }
    let tcp = pkt.header::<TCP_HLEN>(l4)?;
    Some(Seen {
        src,
        tcp: Some((l3, l4, v6)),
        dst_port: tcp.be16_at::<2>(),
        flags: tcp.u8_at::<13>(),
    })
}

/// Pass, unless the frame is one no filter would let through: unparseable, or TCP from an
/// unspecified source or to port 0.
#[inline(always)]
fn min_pass(pkt: &Packet) -> bool {
    match read_min(pkt) {
        Some(s) if s.tcp.is_some() => s.src != 0 && s.dst_port != 0,
        Some(s) => s.src != 0,
        None => false,
    }
}

/// The source as the lookup table keys it (IPv4 mapped into IPv6, as guard keys it).
#[inline(always)]
fn source_key(pkt: &Packet, l3: usize, v6: bool) -> Option<[u64; 2]> {
    if v6 {
        let ip = pkt.header::<IPV6_HLEN>(l3)?;
        Some([ip.raw::<u64, 8>(), ip.raw::<u64, 16>()])
    } else {
        Some(AddrWords::v4_mapped(pkt.header::<IPV4_HLEN>(l3)?.raw::<u32, 12>()).0)
    }
}

/// Whether the lookup table holds this TCP segment's source with `mark`.
#[inline(always)]
fn listed_as(pkt: &Packet, mark: u32) -> Option<bool> {
    let Seen {
        tcp: Some((l3, _, v6)),
        ..
    } = read_min(pkt)?
    else {
        return Some(false);
    };
    let key = source_key(pkt, l3, v6)?;
    // SAFETY: a plain-data value read once.
    Some(unsafe { REF_SOURCES.get(key) }.is_some_and(|v| *v == mark))
}

/// Drop a connection-opening TCP segment from a real source; pass anything else.
#[inline(always)]
fn min_drop(pkt: &Packet) -> bool {
    matches!(read_min(pkt), Some(s) if s.tcp.is_some() && s.src != 0 && s.flags & TCP_SYN != 0)
}

/// RFC 1624: the checksum after a 32-bit word changed from `old` to `new`.
#[inline(always)]
fn csum_replace(csum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!csum);
    sum += (!old >> 16) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns a SYN into a SYN-ACK in place with a fixed ISN; false if the frame is no SYN.
#[inline(always)]
fn rewrite_synack(pkt: &Packet) -> bool {
    let Some(Seen {
        tcp: Some((l3, l4, v6)),
        flags,
        ..
    }) = read_min(pkt)
    else {
        return false;
    };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    let Some(eth) = pkt.header::<ETH_HLEN>(0) else {
        return false;
    };
    let (d0, d1) = (eth.raw::<u32, 0>(), eth.raw::<u16, 4>());
    eth.write::<u32, 0>(eth.raw::<u32, 6>());
    eth.write::<u16, 4>(eth.raw::<u16, 10>());
    eth.write::<u32, 6>(d0);
    eth.write::<u16, 10>(d1);
    // Swapped addresses and ports leave both checksums as they were.
    if v6 {
        let Some(ip) = pkt.header::<IPV6_HLEN>(l3) else {
            return false;
        };
        let (s0, s1) = (ip.raw::<u64, 8>(), ip.raw::<u64, 16>());
        ip.write::<u64, 8>(ip.raw::<u64, 24>());
        ip.write::<u64, 16>(ip.raw::<u64, 32>());
        ip.write::<u64, 24>(s0);
        ip.write::<u64, 32>(s1);
    } else {
        let Some(ip) = pkt.header::<IPV4_HLEN>(l3) else {
            return false;
        };
        let s = ip.raw::<u32, 12>();
        ip.write::<u32, 12>(ip.raw::<u32, 16>());
        ip.write::<u32, 16>(s);
    }
    let Some(tcp) = pkt.header::<TCP_HLEN>(l4) else {
        return false;
    };
    let ports = tcp.raw::<u32, 0>();
    tcp.write::<u32, 0>(ports.rotate_left(16));
    let (seq, ack, word3) = (
        tcp.raw::<u32, 4>(),
        tcp.raw::<u32, 8>(),
        tcp.raw::<u32, 12>(),
    );
    let new_ack = (u32::from_be(seq).wrapping_add(1)).to_be();
    let new_seq = FIXED_ISN.to_be();
    // Byte 13 (flags) is the second byte of word 3 in memory.
    let mut w3 = word3.to_ne_bytes();
    w3[1] = TCP_SYN_ACK;
    let new_word3 = u32::from_ne_bytes(w3);
    let mut csum = tcp.raw::<u16, 16>();
    csum = csum_replace(csum, seq, new_seq);
    csum = csum_replace(csum, ack, new_ack);
    csum = csum_replace(csum, word3, new_word3);
    tcp.write::<u32, 4>(new_seq);
    tcp.write::<u32, 8>(new_ack);
    tcp.write::<u32, 12>(new_word3);
    tcp.write::<u16, 16>(csum);
    true
}

#[xdp]
pub fn ref_xdp_empty_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn ref_xdp_empty_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn ref_xdp_pass(ctx: XdpContext) -> u32 {
    if min_pass(&Packet::new(ctx.data(), ctx.data_end())) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[xdp]
pub fn ref_xdp_drop(ctx: XdpContext) -> u32 {
    if min_drop(&Packet::new(ctx.data(), ctx.data_end())) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[xdp]
pub fn ref_xdp_pass_lookup(ctx: XdpContext) -> u32 {
    match listed_as(&Packet::new(ctx.data(), ctx.data_end()), DENY_MARK) {
        Some(false) => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

#[xdp]
pub fn ref_xdp_drop_lookup(ctx: XdpContext) -> u32 {
    match listed_as(&Packet::new(ctx.data(), ctx.data_end()), DROP_MARK) {
        Some(true) => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[xdp]
pub fn ref_xdp_tx(ctx: XdpContext) -> u32 {
    if rewrite_synack(&Packet::new(ctx.data(), ctx.data_end())) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

#[classifier]
pub fn ref_tc_empty_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[classifier]
pub fn ref_tc_empty_drop(_ctx: TcContext) -> i32 {
    TC_ACT_SHOT
}

#[classifier]
pub fn ref_tc_pass(ctx: TcContext) -> i32 {
    if min_pass(&Packet::new(ctx.data(), ctx.data_end())) {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[classifier]
pub fn ref_tc_drop(ctx: TcContext) -> i32 {
    if min_drop(&Packet::new(ctx.data(), ctx.data_end())) {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[classifier]
pub fn ref_tc_pass_lookup(ctx: TcContext) -> i32 {
    match listed_as(&Packet::new(ctx.data(), ctx.data_end()), DENY_MARK) {
        Some(false) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

#[classifier]
pub fn ref_tc_drop_lookup(ctx: TcContext) -> i32 {
    match listed_as(&Packet::new(ctx.data(), ctx.data_end()), DROP_MARK) {
        Some(true) => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

#[classifier]
pub fn ref_tc_tx(ctx: TcContext) -> i32 {
    if rewrite_synack(&Packet::new(ctx.data(), ctx.data_end())) {
        // SAFETY: a field read of our own context, then a helper without preconditions.
        unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
    } else {
        TC_ACT_OK
    }
}

/// The kernel's cookie for a SYN whose TCP header is `len` bytes at `l4`: `(cookie, mss)`.
/// The helper wants the header's exact length as a constant the verifier can check against
/// the packet, hence one arm per data offset.
#[inline(always)]
fn kernel_cookie(pkt: &Packet, l3: usize, l4: usize, v6: bool, len: usize) -> Option<(u32, u16)> {
    macro_rules! gen {
        ($n:literal) => {{
            let tcp = pkt.header::<$n>(l4)?;
            let th = tcp.ptr() as *mut tcphdr;
            // SAFETY: the IP header and `$n` bytes of TCP header lie inside the packet
            // (checked here and by the caller); the helper only reads them.
            unsafe {
                if v6 {
                    let ip = pkt.header::<IPV6_HLEN>(l3)?;
                    bpf_tcp_raw_gen_syncookie_ipv6(ip.ptr() as *mut ipv6hdr, th, $n)
                } else {
                    let ip = pkt.header::<IPV4_HLEN>(l3)?;
                    bpf_tcp_raw_gen_syncookie_ipv4(ip.ptr() as *mut iphdr, th, $n)
                }
            }
        }};
    }
    let r = match len {
        20 => gen!(20),
        24 => gen!(24),
        28 => gen!(28),
        32 => gen!(32),
        36 => gen!(36),
        40 => gen!(40),
        44 => gen!(44),
        48 => gen!(48),
        52 => gen!(52),
        56 => gen!(56),
        60 => gen!(60),
        _ => return None,
    };
    (r >= 0).then_some((r as u32, (r >> 32) as u16))
}

#[xdp]
pub fn ref_xdp_cookie(ctx: XdpContext) -> u32 {
    if answer_with_cookie(&ctx, CookieSource::Kernel) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_DROP
    }
}

#[xdp]
pub fn ref_xdp_sipcookie(ctx: XdpContext) -> u32 {
    if answer_with_cookie(&ctx, CookieSource::Guard) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_DROP
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CookieSource {
    /// `bpf_tcp_raw_gen_syncookie_*`.
    Kernel,
    /// `syncookie::make` with `REF_COOKIE_KEY`.
    Guard,
}

/// The MSS a SYN asks for, the way the kernel's helper finds it: the first option when it
/// is one (every common stack sends it first), else the RFC default.
#[inline(always)]
fn syn_mss(pkt: &Packet, l4: usize, doff: usize) -> u16 {
    if doff >= TCP_HLEN + 4 {
        if let Some(o) = pkt.header::<4>(l4 + TCP_HLEN) {
            if o.u8_at::<0>() == 2 && o.u8_at::<1>() == 4 {
                return o.be16_at::<2>();
            }
        }
    }
    536
}

/// Guard's cookie for the SYN, with guard's MSS table: `(cookie, mss)`.
#[inline(always)]
fn guard_cookie(flow: &Flow, client_isn: u32, v6: bool, asked_mss: u16) -> Option<(u32, u16)> {
    let key = REF_COOKIE_KEY.get(0)?;
    // SAFETY: helper without preconditions.
    let epoch = syncookie::epoch_of(unsafe { bpf_ktime_get_coarse_ns() });
    let n = Negotiated::from_syn(v6, asked_mss, false, None, 0);
    Some((syncookie::make(key, flow, client_isn, epoch, &n), n.mss(v6)))
}

/// A plain IPv4 or IPv6 SYN, read, and its cookie from `source`.
struct SynCookie {
    l3: usize,
    v6: bool,
    client: AddrWords,
    server: AddrWords,
    /// IPv4 addresses as they lie in memory (client, server).
    v4: (u32, u32),
    client_port: u16,
    server_port: u16,
    client_isn: u32,
    cookie: u32,
    mss: u16,
}

#[inline(always)]
fn syn_cookie(pkt: &Packet, source: CookieSource) -> Option<SynCookie> {
    let Seen {
        tcp: Some((l3, l4, v6)),
        flags,
        ..
    } = read_min(pkt)?
    else {
        return None;
    };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN || (!v6 && l4 != l3 + IPV4_HLEN) {
        return None;
    }
    let tcp = pkt.header::<TCP_HLEN>(l4)?;
    let client_port = tcp.be16_at::<0>();
    let server_port = tcp.be16_at::<2>();
    let client_isn = tcp.be32_at::<4>();
    let doff = ((tcp.u8_at::<12>() >> 4) as usize) * 4;
    let (client, server, v4) = if v6 {
        let ip = pkt.header::<IPV6_HLEN>(l3)?;
        (
            AddrWords([ip.raw::<u64, 8>(), ip.raw::<u64, 16>()]),
            AddrWords([ip.raw::<u64, 24>(), ip.raw::<u64, 32>()]),
            (0, 0),
        )
    } else {
        let ip = pkt.header::<IPV4_HLEN>(l3)?;
        let (s, d) = (ip.raw::<u32, 12>(), ip.raw::<u32, 16>());
        (AddrWords::v4_mapped(s), AddrWords::v4_mapped(d), (s, d))
    };
    let (cookie, mss) = match source {
        CookieSource::Kernel => kernel_cookie(pkt, l3, l4, v6, doff),
        CookieSource::Guard => {
            let flow = Flow {
                client,
                server,
                client_port,
                server_port,
            };
            guard_cookie(&flow, client_isn, v6, syn_mss(pkt, l4, doff))
        }
    }?;
    Some(SynCookie {
        l3,
        v6,
        client,
        server,
        v4,
        client_port,
        server_port,
        client_isn,
        cookie,
        mss,
    })
}

/// The cookie computation alone, the frame left as it is (so it can be repeated): pass
/// when a cookie was made. Comparing the cookie with a value keeps the compiler from
/// dropping guard's MAC, whose result nothing else reads.
#[inline(always)]
fn cookie_only(ctx: &XdpContext, source: CookieSource) -> u32 {
    match syn_cookie(&Packet::new(ctx.data(), ctx.data_end()), source) {
        Some(c) if c.cookie != CALC_SENTINEL => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// Any value: a cookie equal to it (one in 2^32) only turns that run's pass into a drop.
const CALC_SENTINEL: u32 = 0x5eed_5eed;

#[xdp]
pub fn ref_xdp_kcookie_calc(ctx: XdpContext) -> u32 {
    cookie_only(&ctx, CookieSource::Kernel)
}

#[xdp]
pub fn ref_xdp_gcookie_calc(ctx: XdpContext) -> u32 {
    cookie_only(&ctx, CookieSource::Guard)
}

/// A SYN (plain IPv4 or IPv6) answered like guard answers it, with the MSS option only and
/// the cookie from `source`.
#[inline(always)]
fn answer_with_cookie(ctx: &XdpContext, source: CookieSource) -> bool {
    let Some(SynCookie {
        l3,
        v6,
        client,
        server,
        v4,
        client_port,
        server_port,
        client_isn,
        cookie,
        mss,
    }) = syn_cookie(&Packet::new(ctx.data(), ctx.data_end()), source)
    else {
        return false;
    };
    let synack = syncookie::SynAck {
        server_port,
        client_port,
        cookie,
        client_isn,
        mss,
        sack: false,
        wscale: None,
        timestamps: None,
    };
    let (mut words, n) = synack.words();
    let tcp_len = (n * 4) as u16;
    let pseudo = if v6 {
        syncookie::pseudo_v6(&server, &client, tcp_len)
    } else {
        syncookie::pseudo_v4(v4.1, v4.0, tcp_len)
    };
    syncookie::set_tcp_checksum(&mut words, pseudo);
    let ip_len = if v6 { IPV6_HLEN } else { IPV4_HLEN };
    let delta = (l3 + ip_len + n * 4) as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper on our own context; it moves data_end only.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return false;
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let Some(eth) = pkt.header::<ETH_HLEN>(0) else {
        return false;
    };
    let (d0, d1) = (eth.raw::<u32, 0>(), eth.raw::<u16, 4>());
    eth.write::<u32, 0>(eth.raw::<u32, 6>());
    eth.write::<u16, 4>(eth.raw::<u16, 10>());
    eth.write::<u32, 6>(d0);
    eth.write::<u16, 10>(d1);
    if v6 {
        let Some(ip) = pkt.header::<IPV6_HLEN>(l3) else {
            return false;
        };
        let [w0, w1] = syncookie::ipv6_first_words(tcp_len);
        ip.write::<u32, 0>(w0);
        ip.write::<u32, 4>(w1);
        ip.write::<u64, 8>(server.0[0]);
        ip.write::<u64, 16>(server.0[1]);
        ip.write::<u64, 24>(client.0[0]);
        ip.write::<u64, 32>(client.0[1]);
    } else {
        let Some(ip) = pkt.header::<IPV4_HLEN>(l3) else {
            return false;
        };
        ip.write::<[u32; 5], 0>(syncookie::ipv4_header(
            v4.1,
            v4.0,
            IPV4_HLEN as u16 + tcp_len,
        ));
    }
    let l4 = l3 + ip_len;
    let Some(tcp) = pkt.header::<24>(l4) else {
        return false;
    };
    tcp.write::<[u32; 6], 0>([words[0], words[1], words[2], words[3], words[4], words[5]]);
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
