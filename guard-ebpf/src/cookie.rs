//! SYN cookies in the datapath: a SYN from a source that has not proven it
//! receives packets at its address is answered with a SYN-ACK built in
//! place from the SYN itself (XDP_TX, or a redirect back out in tc), and
//! nothing is stored; the ACK that completes the handshake is checked at tc
//! ingress and, when genuine, handed to the listener as a ready request
//! (`bpf_sk_assign_tcp_reqsk`, Linux 6.9+), so the client sees an ordinary
//! one-RTT handshake with its MSS, window scaling, SACK and timestamps.
//!
//! Why the ACK is checked at tc and not in XDP: only an skb can carry a
//! request socket to the listener. The kernel's own cookie check would not
//! do either, since it accepts cookies only while its own SYN queue recently
//! overflowed, which is what this program prevents.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, bpf_sock_tuple, BPF_CSUM_LEVEL_RESET, BPF_F_CURRENT_NETNS},
    helpers::{
        bpf_csum_level, bpf_sk_release, bpf_skb_change_tail, bpf_skc_lookup_tcp,
        bpf_skc_to_tcp_sock, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use guard_common::{
    addr::AddrWords,
    state::FlowKey,
    stats::Stat,
    syncookie::{self, CookieKey, Flow, Negotiated, SynAck, OPT_TIMESTAMPS, SYNACK_TCP_LEN},
    LiveConfig,
};

use crate::{
    conns, count,
    packet::{Packet, TcpAt, ETH_HLEN, TCP_MIN_HLEN},
    COOKIE_KEYS, COOKIE_STATE, OPTION_SCRATCH,
};

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// `BPF_TCP_LISTEN` in `struct bpf_sock`'s state.
const TCP_LISTEN: u32 = 10;
/// Option slots walked in a SYN. Every stack seen puts its options in at
/// most eight (macOS: MSS, NOP, WS, NOP, NOP, TS, SACK, EOL); anything past
/// the limit is simply not honoured (an MSS not seen means 536).
const MAX_OPTION_STEPS: usize = 16;

/// The key for `epoch`, if the agent provisioned one.
#[inline(always)]
pub fn key_for(epoch: u64) -> Option<CookieKey> {
    let key = COOKIE_KEYS.get(syncookie::key_slot(epoch))?;
    if key.is_set() {
        Some(*key)
    } else {
        None
    }
}

/// A SYN the program decided to answer with a cookie.
#[derive(Clone, Copy)]
pub struct CookieSyn {
    pub at: TcpAt,
    pub epoch: u64,
    pub key: CookieKey,
    pub now: u64,
}

#[derive(Clone, Copy, Default)]
struct TcpOptions {
    mss: u16,
    wscale: Option<u8>,
    sack: bool,
    /// (TSval, TSecr)
    timestamps: Option<(u32, u32)>,
}

/// What the SYN-ACK (or the cookie check) needs from a segment.
struct Segment {
    flow: Flow,
    seq: u32,
    ack: u32,
    options: TcpOptions,
    /// IPv4 addresses as they lie in memory (client, server), for the
    /// IPv4 header and pseudo-header.
    v4: (u32, u32),
}

#[inline(always)]
fn read_segment(pkt: &Packet, at: &TcpAt) -> Option<Segment> {
    let tcp = pkt.header::<TCP_MIN_HLEN>(at.l4)?;
    let client_port = u16::from_be(tcp.raw::<u16, 0>());
    let server_port = u16::from_be(tcp.raw::<u16, 2>());
    let seq = tcp.be32_at::<4>();
    let ack = tcp.be32_at::<8>();
    let data_offset = ((tcp.u8_at::<12>() >> 4) as usize) * 4;
    let (client, server, v4) = if at.v6 {
        let ip = pkt.header::<IPV6_HLEN>(at.l3)?;
        (
            AddrWords([ip.raw::<u64, 8>(), ip.raw::<u64, 16>()]),
            AddrWords([ip.raw::<u64, 24>(), ip.raw::<u64, 32>()]),
            (0, 0),
        )
    } else {
        let ip = pkt.header::<IPV4_HLEN>(at.l3)?;
        let (src, dst) = (ip.raw::<u32, 12>(), ip.raw::<u32, 16>());
        (
            AddrWords::v4_mapped(src),
            AddrWords::v4_mapped(dst),
            (src, dst),
        )
    };
    Some(Segment {
        flow: Flow {
            client,
            server,
            client_port,
            server_port,
        },
        seq,
        ack,
        options: read_options(pkt, at.l4, data_offset),
        v4,
    })
}

/// The options area of a TCP header (at most 40 bytes), copied out with
/// one constant-size bounds check: its length is a multiple of four, and
/// the verifier cannot follow a pointer advanced by option lengths read
/// from the packet. Zero bytes past the options read as end-of-list.
#[inline(always)]
fn copy_options(pkt: &Packet, start: usize, len: usize) -> [u8; OPTIONS_BUF_LEN] {
    let mut buf = [0u8; OPTIONS_BUF_LEN];
    macro_rules! take {
        ($n:literal) => {
            if let Some(h) = pkt.header::<$n>(start) {
                let bytes: [u8; $n] = h.raw::<[u8; $n], 0>();
                buf[..$n].copy_from_slice(&bytes);
            }
        };
    }
    match len {
        4 => take!(4),
        8 => take!(8),
        12 => take!(12),
        16 => take!(16),
        20 => take!(20),
        24 => take!(24),
        28 => take!(28),
        32 => take!(32),
        36 => take!(36),
        40 => take!(40),
        _ => {}
    }
    buf
}

const MAX_OPTIONS_LEN: usize = 40;
/// The copy's size: a power of two, so every index is masked into it and
/// each read is in bounds on its own (the verifier checks each access, and
/// the compiler does not keep one checked index per read).
const OPTIONS_BUF_LEN: usize = 64;

/// What the option walk found, kept in map memory rather than on the
/// stack: the verifier does not track map contents, so the walk's state is
/// its position alone, and what follows it is verified once instead of once
/// per combination of options seen (which exceeds the verifier's budget).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct OptionScratch {
    mss: u32,
    /// 0xff: none.
    wscale: u32,
    sack: u32,
    timestamps: u32,
    tsval: u32,
    tsecr: u32,
    /// The walk's position: kept here too, so each step starts from "some
    /// offset below 40" rather than from one exact offset per path.
    at: u32,
}

/// The option layouts of the common stacks, read at fixed offsets: a SYN
/// flood's cost is mostly here, and the general walk below costs several
/// times more. (Linux: MSS, SACK-permitted, timestamps, NOP, window scale;
/// Windows: MSS, NOP, WS, NOP, NOP, SACK; macOS and iOS: MSS, NOP, WS, NOP,
/// NOP, timestamps, SACK, end.)
#[inline(always)]
fn common_layout(pkt: &Packet, start: usize, len: usize) -> Option<TcpOptions> {
    // Bytes are compared where they lie (no copy of the options on the
    // stack, which the tc program has little of to spare).
    macro_rules! at {
        ($h:expr, $($i:literal = $v:literal),+) => { true $(&& $h.u8_at::<$i>() == $v)+ };
    }
    match len {
        20 => {
            let h = pkt.header::<20>(start)?;
            let linux = at!(
                h,
                0 = 2,
                1 = 4,
                4 = 4,
                5 = 2,
                6 = 8,
                7 = 10,
                16 = 1,
                17 = 3,
                18 = 3
            );
            linux.then(|| TcpOptions {
                mss: h.be16_at::<2>(),
                wscale: Some(h.u8_at::<19>()),
                sack: true,
                timestamps: Some((h.be32_at::<8>(), h.be32_at::<12>())),
            })
        }
        12 => {
            let h = pkt.header::<12>(start)?;
            let windows = at!(
                h,
                0 = 2,
                1 = 4,
                4 = 1,
                5 = 3,
                6 = 3,
                8 = 1,
                9 = 1,
                10 = 4,
                11 = 2
            );
            windows.then(|| TcpOptions {
                mss: h.be16_at::<2>(),
                wscale: Some(h.u8_at::<7>()),
                sack: true,
                timestamps: None,
            })
        }
        24 => {
            let h = pkt.header::<24>(start)?;
            let apple = at!(
                h,
                0 = 2,
                1 = 4,
                4 = 1,
                5 = 3,
                6 = 3,
                8 = 1,
                9 = 1,
                10 = 8,
                11 = 10,
                20 = 4,
                21 = 2,
                22 = 0
            );
            apple.then(|| TcpOptions {
                mss: h.be16_at::<2>(),
                wscale: Some(h.u8_at::<7>()),
                sack: true,
                timestamps: Some((h.be32_at::<12>(), h.be32_at::<16>())),
            })
        }
        _ => None,
    }
}

/// The options guard honours; malformed or unknown ones end the walk or are
/// skipped, as a receiving stack would.
#[inline(always)]
fn read_options(pkt: &Packet, l4: usize, data_offset: usize) -> TcpOptions {
    if data_offset > TCP_MIN_HLEN {
        let len = data_offset - TCP_MIN_HLEN;
        if let Some(o) = common_layout(pkt, l4 + TCP_MIN_HLEN, len) {
            return o;
        }
    }
    walk_options(pkt, l4, data_offset)
}

/// Any other layout, walked option by option. A function of its own in the
/// object: its copy of the options then never shares a stack frame with the
/// SYN-ACK being built (the verifier allows 512 bytes per call chain).
#[inline(never)]
fn walk_options(pkt: &Packet, l4: usize, data_offset: usize) -> TcpOptions {
    let Some(found) = OPTION_SCRATCH.get_ptr_mut(0) else {
        return TcpOptions::default();
    };
    let put = |f: fn(&mut OptionScratch) -> &mut u32, v: u32| {
        // SAFETY: this CPU's scratch slot, used by one program run at a time.
        unsafe { core::ptr::write_volatile(f(&mut *found), v) }
    };
    put(|s| &mut s.mss, 0);
    put(|s| &mut s.wscale, 0xff);
    put(|s| &mut s.sack, 0);
    put(|s| &mut s.timestamps, 0);
    if data_offset > TCP_MIN_HLEN {
        let len = data_offset - TCP_MIN_HLEN;
        let buf = copy_options(pkt, l4 + TCP_MIN_HLEN, len);
        // One load per byte: merged loads at a variable stack offset would
        // be misaligned, which the verifier refuses for the stack.
        // SAFETY: the index is masked into the buffer.
        let byte = |i: usize| unsafe {
            core::ptr::read_volatile(buf.as_ptr().add(i & (OPTIONS_BUF_LEN - 1)))
        };
        let be16 = |i: usize| u16::from_be_bytes([byte(i), byte(i + 1)]) as u32;
        let be32 = |i: usize| u32::from_be_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
        put(|s| &mut s.at, 0);
        for _ in 0..MAX_OPTION_STEPS {
            // SAFETY: as above.
            let i = unsafe { core::ptr::read_volatile(&(*found).at) } as usize;
            if i >= len || i >= MAX_OPTIONS_LEN {
                break;
            }
            let kind = byte(i);
            if kind == 0 {
                break;
            }
            if kind == 1 {
                put(|s| &mut s.at, (i + 1) as u32);
                continue;
            }
            let opt_len = byte(i + 1) as usize;
            if opt_len < 2 || i + opt_len > len {
                break;
            }
            match (kind, opt_len) {
                (2, 4) => put(|s| &mut s.mss, be16(i + 2)),
                (3, 3) => put(|s| &mut s.wscale, byte(i + 2) as u32),
                (4, 2) => put(|s| &mut s.sack, 1),
                (8, 10) => {
                    put(|s| &mut s.timestamps, 1);
                    put(|s| &mut s.tsval, be32(i + 2));
                    put(|s| &mut s.tsecr, be32(i + 6));
                }
                _ => {}
            }
            put(|s| &mut s.at, (i + opt_len) as u32);
        }
    }
    // SAFETY: as above.
    let f = unsafe { core::ptr::read_volatile(found) };
    TcpOptions {
        mss: f.mss as u16,
        wscale: if f.wscale == 0xff {
            None
        } else {
            Some(f.wscale as u8)
        },
        sack: f.sack != 0,
        timestamps: if f.timestamps != 0 {
            Some((f.tsval, f.tsecr))
        } else {
            None
        },
    }
}

#[inline(always)]
/// The SYN-ACK's TCP header for `seg` (checksum included) and its length in
/// words.
fn synack_words(
    seg: &Segment,
    c: &CookieSyn,
    cfg: &LiveConfig,
) -> ([u32; SYNACK_TCP_LEN / 4], usize) {
    let o = &seg.options;
    let negotiated = Negotiated::from_syn(c.at.v6, o.mss, o.sack, o.wscale, cfg.cookie_opts);
    let cookie = syncookie::make(&c.key, &seg.flow, seg.seq, c.epoch, &negotiated);
    let timestamps = match o.timestamps {
        // Our TSval is a millisecond clock; the kernel offsets the
        // connection's own timestamps from what the client echoes.
        Some((tsval, _)) if cfg.cookie_opts & OPT_TIMESTAMPS != 0 => {
            Some(((c.now / 1_000_000) as u32, tsval))
        }
        _ => None,
    };
    let synack = SynAck {
        server_port: seg.flow.server_port,
        client_port: seg.flow.client_port,
        cookie,
        client_isn: seg.seq,
        mss: if c.at.v6 {
            cfg.cookie_mss_v6
        } else {
            cfg.cookie_mss_v4
        },
        sack: negotiated.sack,
        wscale: if negotiated.wscale_ok() {
            Some(cfg.cookie_wscale)
        } else {
            None
        },
        timestamps,
    };
    let (mut words, n) = synack.words();
    let tcp_len = (n * 4) as u16;
    let pseudo = if c.at.v6 {
        syncookie::pseudo_v6(&seg.flow.server, &seg.flow.client, tcp_len)
    } else {
        syncookie::pseudo_v4(seg.v4.1, seg.v4.0, tcp_len)
    };
    syncookie::set_tcp_checksum(&mut words, pseudo);
    (words, n)
}

#[inline(always)]
const fn synack_len(at: &TcpAt, words: usize) -> usize {
    at.l3 + if at.v6 { IPV6_HLEN } else { IPV4_HLEN } + words * 4
}

/// Rewrites the frame (already `synack_len` long) into the SYN-ACK: MACs
/// swapped, VLAN tags kept, a fresh IP header, the cookie TCP header.
#[inline(always)]
fn write_synack(
    pkt: &Packet,
    at: &TcpAt,
    seg: &Segment,
    (tcp, words): &([u32; SYNACK_TCP_LEN / 4], usize),
) -> bool {
    let tcp_len = *words * 4;
    let Some(eth) = pkt.header::<ETH_HLEN>(0) else {
        return false;
    };
    let dst_hi = eth.raw::<u32, 0>();
    let dst_lo = eth.raw::<u16, 4>();
    let src_hi = eth.raw::<u32, 6>();
    let src_lo = eth.raw::<u16, 10>();
    eth.write::<u32, 0>(src_hi);
    eth.write::<u16, 4>(src_lo);
    eth.write::<u32, 6>(dst_hi);
    eth.write::<u16, 10>(dst_lo);
    let l4 = if at.v6 {
        let Some(ip) = pkt.header::<IPV6_HLEN>(at.l3) else {
            return false;
        };
        let [w0, w1] = syncookie::ipv6_first_words(tcp_len as u16);
        ip.write::<u32, 0>(w0);
        ip.write::<u32, 4>(w1);
        ip.write::<u64, 8>(seg.flow.server.0[0]);
        ip.write::<u64, 16>(seg.flow.server.0[1]);
        ip.write::<u64, 24>(seg.flow.client.0[0]);
        ip.write::<u64, 32>(seg.flow.client.0[1]);
        at.l3 + IPV6_HLEN
    } else {
        let Some(ip) = pkt.header::<IPV4_HLEN>(at.l3) else {
            return false;
        };
        let words = syncookie::ipv4_header(seg.v4.1, seg.v4.0, (IPV4_HLEN + tcp_len) as u16);
        ip.write::<[u32; 5], 0>(words);
        at.l3 + IPV4_HLEN
    };
    // The fixed part, then each option word the header has, one bounds
    // check each at a constant offset (no copy of the header on the stack).
    let Some(fixed) = pkt.header::<24>(l4) else {
        return false;
    };
    fixed.write::<u32, 0>(tcp[0]);
    fixed.write::<u32, 4>(tcp[1]);
    fixed.write::<u32, 8>(tcp[2]);
    fixed.write::<u32, 12>(tcp[3]);
    fixed.write::<u32, 16>(tcp[4]);
    fixed.write::<u32, 20>(tcp[5]);
    for (i, value) in tcp.iter().enumerate().take(SYNACK_TCP_LEN / 4).skip(6) {
        if i >= *words {
            break;
        }
        let Some(word) = pkt.header::<4>(l4 + i * 4) else {
            return false;
        };
        word.write::<u32, 0>(*value);
    }
    true
}

/// Notes that a cookie may be outstanding (read by the ACK check's gate).
/// Written once per epoch, so CPUs do not bounce the line per SYN.
#[inline(always)]
fn mark_sent(epoch: u64) {
    if let Some(state) = COOKIE_STATE.get_ptr_mut(0) {
        // SAFETY: the one array slot; a racing write stores the same epoch.
        unsafe {
            if (*state).last_sent_epoch != epoch {
                (*state).last_sent_epoch = epoch;
            }
        }
    }
}

/// Turns the SYN into its SYN-ACK for XDP_TX; false if it could not (the
/// caller drops the SYN).
#[inline(always)]
pub fn answer_xdp(ctx: &XdpContext, c: &CookieSyn, cfg: &LiveConfig) -> bool {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let Some(seg) = read_segment(&pkt, &c.at) else {
        return false;
    };
    let tcp = synack_words(&seg, c, cfg);
    let delta = synack_len(&c.at, tcp.1) as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper on our own context; it moves data_end only.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return false;
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    if !write_synack(&pkt, &c.at, &seg, &tcp) {
        return false;
    }
    mark_sent(c.epoch);
    true
}

/// The same at tc ingress: the skb is resized, rewritten and redirected out
/// of the interface it came in on. Returns the interface to redirect to.
#[inline(always)]
pub fn answer_tc(ctx: &TcContext, c: &CookieSyn, cfg: &LiveConfig) -> Option<u32> {
    let skb = ctx.skb.skb;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let seg = read_segment(&pkt, &c.at)?;
    let tcp = synack_words(&seg, c, cfg);
    let len = synack_len(&c.at, tcp.1) as u32;
    // SAFETY: helpers on our own skb.
    unsafe {
        if bpf_skb_change_tail(skb, len, 0) != 0 {
            return None;
        }
    }
    // A grown tail may sit outside the linear part.
    ctx.pull_data(len).ok()?;
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    if !write_synack(&pkt, &c.at, &seg, &tcp) {
        return None;
    }
    // SAFETY: helper on our own skb; the frame now carries full checksums,
    // so nothing may trust a checksum state computed for the SYN.
    unsafe { bpf_csum_level(skb, BPF_CSUM_LEVEL_RESET as u64) };
    mark_sent(c.epoch);
    // SAFETY: a field read of our own context.
    Some(unsafe { (*skb).ifindex })
}

/// `struct bpf_tcp_req_attrs` (include/linux/bpf.h of the kernel).
#[repr(C)]
struct ReqAttrs {
    rcv_tsval: u32,
    rcv_tsecr: u32,
    mss: u16,
    rcv_wscale: u8,
    snd_wscale: u8,
    ecn_ok: u8,
    wscale_ok: u8,
    sack_ok: u8,
    tstamp_ok: u8,
    usec_ts_ok: u8,
    reserved: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<ReqAttrs>() == 20);

/// `bpf_sk_assign_tcp_reqsk(skb, sk, attrs, sizeof(attrs))`.
///
/// # Safety
/// `skb` must be the program's context and `sk` a listener from
/// `bpf_skc_to_tcp_sock` whose lookup reference is still held.
#[inline(always)]
unsafe fn assign_tcp_reqsk(
    skb: *mut __sk_buff,
    sk: *mut core::ffi::c_void,
    attrs: &mut ReqAttrs,
) -> i64 {
    let ret: i64;
    // SAFETY: the caller's contract; the call clobbers r1-r5 like any call.
    // The instruction is a `call` with `src_reg = BPF_PSEUDO_KFUNC_CALL`
    // whose immediate the agent replaces with the kfunc's BTF id before
    // loading (aya 0.14 cannot relocate kfunc calls itself).
    unsafe {
        core::arch::asm!(
            ".byte 0x85, 0x20, 0x00, 0x00",
            ".long {id}",
            id = const syncookie::KFUNC_ASSIGN_REQSK_PLACEHOLDER,
            inlateout("r1") skb => _,
            inlateout("r2") sk => _,
            inlateout("r3") attrs as *mut ReqAttrs => _,
            inlateout("r4") core::mem::size_of::<ReqAttrs>() as u64 => _,
            lateout("r0") ret,
            lateout("r5") _,
        );
    }
    ret
}

/// Whether an ACK toward a protected port may answer a cookie: only while
/// one can be outstanding.
#[inline(always)]
pub fn may_answer_cookie(now: u64) -> bool {
    match COOKIE_STATE.get(0) {
        Some(state) => {
            syncookie::may_be_outstanding(state.last_sent_epoch, syncookie::epoch_of(now))
        }
        None => false,
    }
}

/// What the ACK check decided.
pub enum AckVerdict {
    /// Not ours or handed over: the kernel goes on with it.
    Pass,
    /// Refused: a proven source that may not connect, or a source out of
    /// guesses.
    Drop,
}

/// `HANDSHAKES`' key for a cookie's flow.
#[inline(always)]
pub fn flow_key_of(flow: &Flow) -> FlowKey {
    FlowKey {
        client: flow.client.to_addr(),
        server: flow.server.to_addr(),
        client_port: flow.client_port,
        server_port: flow.server_port,
        _pad: 0,
    }
}

/// Checks an ACK toward a protected port as a cookie reply. `limits` says
/// whether the source may have its reply checked at all (and is told of
/// each failed check); a genuine reply proves its source, `admit` applies
/// what its SYN would have met (`Some(counter)`: refused, dropped) and the
/// connection is handed to the listener. (The policies stay closures: the
/// compiler then keeps them separate BPF functions, which the verifier
/// needs to stay within its budget.)
#[inline(always)]
pub fn check_ack(
    ctx: &TcContext,
    at: &TcpAt,
    cfg: &LiveConfig,
    now: u64,
    limits: impl Fn(&AddrWords, bool) -> bool,
    admit: impl FnOnce(&Flow) -> Option<Stat>,
) -> AckVerdict {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let Some(seg) = read_segment(&pkt, at) else {
        return AckVerdict::Pass;
    };
    let skc = lookup(ctx, &seg, at.v6);
    if skc.is_null() {
        return AckVerdict::Pass;
    }
    // SAFETY: a non-null socket from the lookup, released below.
    let listening = unsafe { (*skc).state } == TCP_LISTEN;
    let verdict = if listening {
        to_listener(ctx, skc, &seg, at, cfg, now, limits, admit)
    } else {
        // An established (or half-open) connection's ACK: not a cookie.
        AckVerdict::Pass
    };
    // SAFETY: the reference the lookup took.
    unsafe { bpf_sk_release(skc as *mut core::ffi::c_void) };
    verdict
}

#[inline(always)]
fn lookup(ctx: &TcContext, seg: &Segment, v6: bool) -> *mut bpf_sock {
    // SAFETY: zeroed plain data.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6 {
        // SAFETY: writing plain fields of the union's IPv6 arm.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            let words = |a: &AddrWords| {
                [
                    a.0[0] as u32,
                    (a.0[0] >> 32) as u32,
                    a.0[1] as u32,
                    (a.0[1] >> 32) as u32,
                ]
            };
            t.saddr = words(&seg.flow.client);
            t.daddr = words(&seg.flow.server);
            t.sport = seg.flow.client_port.to_be();
            t.dport = seg.flow.server_port.to_be();
        }
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        // SAFETY: as above, the IPv4 arm.
        unsafe {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = seg.v4.0;
            t.daddr = seg.v4.1;
            t.sport = seg.flow.client_port.to_be();
            t.dport = seg.flow.server_port.to_be();
        }
        core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    // SAFETY: the helper reads `size` bytes of the tuple on our stack.
    unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut core::ffi::c_void,
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_listener(
    ctx: &TcContext,
    skc: *mut bpf_sock,
    seg: &Segment,
    at: &TcpAt,
    cfg: &LiveConfig,
    now: u64,
    limits: impl Fn(&AddrWords, bool) -> bool,
    admit: impl FnOnce(&Flow) -> Option<Stat>,
) -> AckVerdict {
    if !limits(&seg.flow.client, false) {
        count(Stat::CookieAckLimited);
        return AckVerdict::Drop;
    }
    let (client_isn, cookie) = (seg.seq.wrapping_sub(1), seg.ack.wrapping_sub(1));
    let epoch = syncookie::epoch_for(cookie, syncookie::epoch_of(now));
    let negotiated = match key_for(epoch) {
        Some(key) => syncookie::check(&key, &seg.flow, client_isn, cookie, epoch),
        None => None,
    };
    let Some(n) = negotiated else {
        limits(&seg.flow.client, true);
        count(Stat::CookieAckInvalid);
        return AckVerdict::Pass;
    };
    if let Some(refused) = admit(&seg.flow) {
        count(refused);
        return AckVerdict::Drop;
    }
    let (tsval, tsecr, tstamp_ok) = match seg.options.timestamps {
        Some((tsval, tsecr)) => (tsval, tsecr, 1),
        None => (0, 0, 0),
    };
    let wscale_ok = n.wscale_ok();
    let mut attrs = ReqAttrs {
        rcv_tsval: tsval,
        rcv_tsecr: tsecr,
        mss: n.mss(at.v6),
        rcv_wscale: if wscale_ok { cfg.cookie_wscale } else { 0 },
        snd_wscale: if wscale_ok { n.wscale } else { 0 },
        ecn_ok: 0,
        wscale_ok: wscale_ok as u8,
        sack_ok: n.sack as u8,
        tstamp_ok,
        usec_ts_ok: 0,
        reserved: [0; 3],
    };
    // SAFETY: a listener socket we hold a reference to.
    let tp = unsafe { bpf_skc_to_tcp_sock(skc as *mut core::ffi::c_void) };
    if tp.is_null() {
        count(Stat::CookieAckAssignFailed);
        conns::release_handshake(&flow_key_of(&seg.flow));
        return AckVerdict::Pass;
    }
    // SAFETY: our context and that listener, its reference held by the
    // caller until after this call.
    let rc = unsafe { assign_tcp_reqsk(ctx.skb.skb, tp as *mut core::ffi::c_void, &mut attrs) };
    if rc == 0 {
        count(Stat::CookieAckValid);
    } else {
        count(Stat::CookieAckAssignFailed);
        // It will not be established: its in-flight charge goes now.
        conns::release_handshake(&flow_key_of(&seg.flow));
    }
    AckVerdict::Pass
}
