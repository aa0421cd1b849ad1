//! guard's datapath: caps new TCP connections per source toward the
//! protected ports, drops blocked sources, lets allow-listed prefixes
//! through, and counts every verdict.
//!
//! One decision function serves both attach points (XDP and tc ingress), so
//! the two can never disagree.
#![no_std]
#![no_main]
// Atomic intrinsics for the connection counters (see conns.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// The kfunc call of the cookie check (see cookie.rs).
#![feature(asm_experimental_arch)]

mod packet;

mod clock;
mod conns;
mod cookie;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::{classifier, map, sock_ops, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockOpsContext, TcContext, XdpContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use cookie::{AckVerdict, CookieSyn};
use guard_common::{
    addr::{Addr, AddrWords, MAX_PREFIX_LEN},
    event::{EVENT_AGGREGATE_OVER_CAP, EVENT_SOURCE_OVER_CAP},
    maps as names,
    state::{AllowEntry, FlowKey, Handshake, InFlight},
    stats::{Stat, STAT_SLOTS},
    syncookie::{self, CookieKey, CookieState, Flow, MODE_ALWAYS},
    BlockEntry, LiveConfig, OverCapEvent, SourceState, TokenBucket,
};
use packet::{
    flow_key, parse, Malformed, Packet, Parsed, TcpAt, Transport, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN,
};

// Sizes here are defaults; the agent sets the real ones at load time.
#[map(name = "CONFIG")]
static CONFIG: Array<LiveConfig> = Array::with_max_entries(1, 0);
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);
#[map(name = "PORTS")]
static PORTS: Array<u8> = Array::with_max_entries(names::PORT_SLOTS, 0);
#[map(name = "SOURCES")]
static SOURCES: LruHashMap<Addr, SourceState> =
    LruHashMap::with_max_entries(names::DEFAULT_SOURCES, 0);
#[map(name = "AGGREGATES")]
static AGGREGATES: LruHashMap<Addr, SourceState> =
    LruHashMap::with_max_entries(names::DEFAULT_AGGREGATES, 0);
#[map(name = "ALLOW")]
static ALLOW: LpmTrie<Addr, AllowEntry> = LpmTrie::with_max_entries(names::DEFAULT_ALLOW, 0);
#[map(name = "BLOCK")]
static BLOCK: LpmTrie<Addr, BlockEntry> = LpmTrie::with_max_entries(names::DEFAULT_BLOCK, 0);
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(names::EVENTS_BYTES, 0);
#[map(name = "CONNS")]
static CONNS: HashMap<Addr, u64> = HashMap::with_max_entries(names::DEFAULT_CONNS, 0);
#[map(name = "CONN_SOCKS")]
static CONN_SOCKS: HashMap<u64, Addr> = HashMap::with_max_entries(names::DEFAULT_CONN_SOCKS, 0);
#[map(name = "KNOWN_GOOD")]
static KNOWN_GOOD: LruHashMap<Addr, u64> =
    LruHashMap::with_max_entries(names::DEFAULT_KNOWN_GOOD, 0);
#[map(name = "GLOBAL")]
static GLOBAL: Array<TokenBucket> = Array::with_max_entries(1, 0);
#[map(name = "COOKIE_KEYS")]
static COOKIE_KEYS: Array<CookieKey> = Array::with_max_entries(syncookie::KEY_SLOTS, 0);
#[map(name = "COOKIE_STATE")]
static COOKIE_STATE: Array<CookieState> = Array::with_max_entries(1, 0);
#[map(name = "HANDSHAKES")]
static HANDSHAKES: LruHashMap<FlowKey, Handshake> =
    LruHashMap::with_max_entries(names::DEFAULT_HANDSHAKES, 0);
#[map(name = "IN_FLIGHT")]
static IN_FLIGHT: LruHashMap<Addr, InFlight> =
    LruHashMap::with_max_entries(names::DEFAULT_IN_FLIGHT, 0);
#[map(name = "SYNACK_DESTS")]
static SYNACK_DESTS: Array<TokenBucket> = Array::with_max_entries(names::DEFAULT_SYNACK_DESTS, 0);
#[map(name = "ACK_FAILS")]
static ACK_FAILS: LruHashMap<Addr, TokenBucket> =
    LruHashMap::with_max_entries(names::DEFAULT_ACK_FAILS, 0);
#[map(name = "ACK_FAILS_AGG")]
static ACK_FAILS_AGG: LruHashMap<Addr, TokenBucket> =
    LruHashMap::with_max_entries(names::DEFAULT_ACK_FAILS_AGG, 0);
#[map(name = "ACK_FAILS_ALL")]
static ACK_FAILS_ALL: Array<TokenBucket> = Array::with_max_entries(1, 0);
/// Per-CPU scratch holding the flow of the SYN being judged: the tc
/// program's stack has no room for it. Not pinned.
#[map(name = "FLOW_SCRATCH")]
static FLOW_SCRATCH: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU scratch of the SYN option walk (see cookie.rs); not pinned.
#[map(name = "OPT_SCRATCH")]
static OPTION_SCRATCH: PerCpuArray<cookie::OptionScratch> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Drop,
    /// Answer the SYN with a cookie SYN-ACK (counted once it is built).
    Cookie(CookieSyn),
}

#[xdp]
pub fn guard_xdp(ctx: XdpContext) -> u32 {
    match decide(&ctx, Packet::new(ctx.data(), ctx.data_end())) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Cookie(c) => match CONFIG.get(0) {
            Some(cfg) if cookie::answer_xdp(&ctx, &c, cfg) => {
                count(Stat::CookieSent);
                xdp_action::XDP_TX
            }
            _ => {
                count(Stat::DropCookieTx);
                xdp_action::XDP_DROP
            }
        },
    }
}

/// "Continue with the next program" in a tcx chain (TC_ACT_UNSPEC); at the
/// end of the chain, or under a classic tc filter, it passes the packet.
const TCX_NEXT: i32 = -1;

/// Headers we may need: two VLAN tags, IPv6 with a chain of extension
/// headers, and TCP. Pulled into the linear area only when they are not
/// there already.
const TC_PULL_LEN: u32 = 256;

#[classifier]
pub fn guard_tc(ctx: TcContext) -> i32 {
    let linear = ctx.data_end() - ctx.data();
    if (linear as u32) < TC_PULL_LEN && ctx.len() > linear as u32 {
        // A failed pull leaves the linear part as it was; parsing then sees
        // a short frame and fails open like any truncated one.
        let _ = ctx.pull_data(ctx.len().min(TC_PULL_LEN));
    }
    match decide(&ctx, Packet::new(ctx.data(), ctx.data_end())) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Cookie(c) => match CONFIG
            .get(0)
            .and_then(|cfg| cookie::answer_tc(&ctx, &c, cfg))
        {
            Some(ifindex) => {
                count(Stat::CookieSent);
                // SAFETY: helper with no preconditions; out of the
                // interface the SYN came in on.
                unsafe { bpf_redirect(ifindex, 0) as i32 }
            }
            None => {
                count(Stat::DropCookieTx);
                TC_ACT_SHOT
            }
        },
    }
}

/// Checks the replies to cookies at tc ingress, behind either attach (only
/// an skb can carry a connection to its listener): the XDP or tc program
/// answered the SYNs and gave every packet its verdict, so this counts
/// nothing but the check's own outcomes. A program of its own rather than
/// part of `guard_tc`: together they exceed what the verifier allows one
/// program's stack.
#[classifier]
pub fn guard_cookie_ack(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TCX_NEXT;
    };
    if !cfg.cookies_enabled() {
        return TCX_NEXT;
    }
    let linear = ctx.data_end() - ctx.data();
    if (linear as u32) < TC_PULL_LEN && ctx.len() > linear as u32 {
        let _ = ctx.pull_data(ctx.len().min(TC_PULL_LEN));
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    let Ok(Parsed::Ip {
        transport:
            Transport::Tcp {
                dst_port,
                flags,
                at,
            },
        ..
    }) = parse(&pkt)
    else {
        return TCX_NEXT;
    };
    if !is_cookie_ack_candidate(flags) || !is_protected(dst_port) {
        return TCX_NEXT;
    }
    let now = clock::coarse_now_ns();
    if !cookie::may_answer_cookie(now) {
        return TCX_NEXT;
    }
    cookie_ack(&ctx, &at, now)
}

#[inline(always)]
fn is_cookie_ack_candidate(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
}

#[inline(always)]
fn cookie_ack(ctx: &TcContext, at: &TcpAt, now: u64) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TCX_NEXT;
    };
    let limits = |client: &AddrWords, failed: bool| invalid_ack_limits(client, failed, now, cfg);
    let admit = |flow: &Flow| admit_cookie_ack(ctx, flow, now, cfg);
    match cookie::check_ack(ctx, at, cfg, now, limits, admit) {
        AckVerdict::Pass => TCX_NEXT,
        AckVerdict::Drop => TC_ACT_SHOT,
    }
}

/// Whether a proven source's connection may be built: what its SYN would
/// have met (the blocklist, its connection cap, its rate caps), in the
/// program's order. `None` admits it, charged as a handshake in flight
/// until sockops sees it established; otherwise the counter that refuses
/// it. A refused reply is dropped rather than reset: the client's TCP
/// retransmits it, and it is admitted once the source is under its caps
/// again while its cookie is valid, as a dropped SYN is retried; and
/// nothing is sent toward an address on the strength of one packet.
#[inline(always)]
fn admit_cookie_ack(ctx: &TcContext, flow: &Flow, now: u64, cfg: &LiveConfig) -> Option<Stat> {
    let client = &flow.client;
    if cfg.may_block() {
        if let Some(entry) = BLOCK.get(HostKey::new(client).as_key()) {
            // SAFETY: helper with no preconditions.
            if entry.is_active(unsafe { bpf_ktime_get_ns() }) {
                return Some(Stat::CookieAckBlocked);
            }
        }
    }
    let key = client.prefix_key(cfg.source_prefix_v4, cfg.source_prefix_v6);
    if cfg.conn_limit_enabled() && conns::held(key.as_addr(), now, cfg) >= cfg.conn_limit as u64 {
        return Some(Stat::CookieAckConnLimit);
    }
    if charge_caps(ctx, client, &key, now, cfg).is_some() {
        return Some(Stat::CookieAckOverCap);
    }
    if cfg.tracks_in_flight() {
        conns::charge_handshake(&cookie::flow_key_of(flow), key.as_addr(), now, cfg);
    }
    None
}

/// The invalid-reply limits of `client`: with `failed` false, whether its
/// reply may be checked at all; with `failed` true, charges a failed check
/// to its source, its aggregate prefix and everyone together.
///
/// A source or prefix out of tokens is refused unchecked, a correct guess
/// included: that is what bounds the guesses at one address's cookies. The
/// global bucket refuses only sources or prefixes that failed before, so a
/// flood of forged replies cannot shut out clients that never sent one;
/// the cost of that choice is written down in `syncookie`'s module doc.
#[inline(always)]
fn invalid_ack_limits(client: &AddrWords, failed: bool, now: u64, cfg: &LiveConfig) -> bool {
    let source = client.prefix_key(cfg.source_prefix_v4, cfg.source_prefix_v6);
    let aggregate = client.prefix_key(cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
    let levels = [
        (
            &ACK_FAILS,
            source,
            cfg.invalid_ack_rate,
            cfg.invalid_ack_burst,
        ),
        (
            &ACK_FAILS_AGG,
            aggregate,
            cfg.invalid_ack_aggregate_rate,
            cfg.invalid_ack_aggregate_burst,
        ),
    ];
    let mut failed_before = false;
    for (map, key, rate, burst) in levels {
        if failed {
            if burst != 0 {
                if let Some(b) = bucket(map, key.as_addr(), burst, now) {
                    b.try_take(now, rate, burst);
                }
            }
        } else if let Some(b) = map.get_ptr_mut(key.as_addr()) {
            failed_before = true;
            if burst != 0 {
                // SAFETY: an LRU value (see `tracked`).
                let b = unsafe { &mut *b };
                b.refill(now, rate, burst);
                if !b.has_token() {
                    return false;
                }
            }
        }
    }
    let (rate, burst) = (cfg.invalid_ack_global_rate, cfg.invalid_ack_global_burst);
    if burst == 0 {
        return true;
    }
    let Some(all) = ACK_FAILS_ALL.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: the one array slot; racing CPUs can only mis-count a charge.
    let all = unsafe { &mut *all };
    if failed {
        all.try_take(now, rate, burst);
        return true;
    }
    if failed_before {
        all.refill(now, rate, burst);
        return all.has_token();
    }
    true
}

/// Counts established connections toward the protected ports per source
/// and remembers sources that completed a handshake ("known good").
#[sock_ops]
pub fn guard_sockops(ctx: SockOpsContext) -> u32 {
    if let Some(cfg) = CONFIG.get(0) {
        conns::on_sock_op(&ctx, cfg);
    }
    1
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

/// A drop verdict, or in dry-run mode the matching "would drop" and a pass.
#[inline(always)]
fn drop_or_dry_run(cfg: &LiveConfig, drop: Stat, would_drop: Stat) -> Verdict {
    if cfg.dry_run() {
        count(would_drop);
        Verdict::Pass
    } else {
        count(drop);
        Verdict::Drop
    }
}

/// Judges one frame.
#[inline(always)]
fn decide<C: EbpfContext>(ctx: &C, pkt: Packet) -> Verdict {
    count(Stat::Packets);
    let Some(cfg) = CONFIG.get(0) else {
        // Unreachable once loaded (array slots always exist); fail open.
        count(Stat::PassMalformed);
        return Verdict::Pass;
    };
    let (src, transport) = match parse(&pkt) {
        Err(Malformed) => {
            count(Stat::PassMalformed);
            return Verdict::Pass;
        }
        Ok(Parsed::NotIp) => {
            count(Stat::PassUnprotected);
            return Verdict::Pass;
        }
        Ok(Parsed::ExtChainTooLong { src }) => {
            if cfg.may_allow() && is_allowed(&src) {
                count(Stat::PassAllowlisted);
                return Verdict::Pass;
            }
            return drop_or_dry_run(cfg, Stat::DropExtHeaderChain, Stat::WouldDropExtHeaderChain);
        }
        Ok(Parsed::Ip { src, transport }) => (src, transport),
    };

    let protected = match transport {
        Transport::Tcp {
            dst_port,
            flags,
            at,
        } if is_protected(dst_port) => Some((flags, at)),
        _ => None,
    };
    // Fragments that could only serve to slip a SYN past its verdict: a
    // first fragment too short to show the TCP flags (toward a protected
    // port, or one it is too short to name), and one overlapping the TCP
    // header. The kernel would reassemble them into whatever they spell.
    let evasive = match transport {
        Transport::TinyFragment { dst_port } if dst_port.is_none_or(is_protected) => {
            Some((Stat::DropTinyFragment, Stat::WouldDropTinyFragment))
        }
        Transport::OverlapFragment => {
            Some((Stat::DropOverlapFragment, Stat::WouldDropOverlapFragment))
        }
        _ => None,
    };
    let unprotected_stat = match transport {
        Transport::LaterFragment => Stat::PassFragment,
        _ => Stat::PassUnprotected,
    };
    if protected.is_none() && evasive.is_none() && !cfg.block_all_traffic() {
        count(unprotected_stat);
        return Verdict::Pass;
    }

    if cfg.may_allow() && is_allowed(&src) {
        count(Stat::PassAllowlisted);
        return Verdict::Pass;
    }
    if cfg.may_block() {
        if let Some(entry) = BLOCK.get(HostKey::new(&src).as_key()) {
            // SAFETY: helper with no preconditions.
            if entry.is_active(unsafe { bpf_ktime_get_ns() }) {
                return drop_or_dry_run(cfg, Stat::DropBlocked, Stat::WouldDropBlocked);
            }
        }
    }
    if let Some((drop, would_drop)) = evasive {
        return drop_or_dry_run(cfg, drop, would_drop);
    }
    let Some((flags, at)) = protected else {
        count(unprotected_stat);
        return Verdict::Pass;
    };
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        count(Stat::PassNotSyn);
        return Verdict::Pass;
    }
    // The clock is read once, and only for connection-opening SYNs (and
    // for a matching block entry above): the common paths skip it. Tick
    // resolution is enough for the buckets: refills telescope, so a stale
    // reading only delays a token by at most a tick and never loses or
    // invents one (see clock.rs for why it is cached per tick).
    let now = clock::coarse_now_ns();

    count(Stat::SynSeen);
    let source_key = src.prefix_key(cfg.source_prefix_v4, cfg.source_prefix_v6);
    // What the source holds counts its handshakes in flight too, or it
    // could withhold its ACKs and open any number at once. Its own SYN
    // again (a retransmission) is not a new connection.
    let flow = if cfg.tracks_in_flight() {
        scratch_flow(&pkt, &at)
    } else {
        None
    };
    if cfg.conn_limit_enabled()
        && conns::held(source_key.as_addr(), now, cfg) >= cfg.conn_limit as u64
        && !flow.is_some_and(|f| conns::is_in_flight(f, now, cfg))
    {
        return drop_or_dry_run(cfg, Stat::DropConnLimit, Stat::WouldDropConnLimit);
    }
    // A source that never completed a handshake is answered statelessly
    // while cookies are on: it is neither tracked nor charged until its ACK
    // proves its address, so spoofed floods leave no state and drain no
    // budget. SYN+FIN and SYN+RST are left to the path below (the kernel
    // discards both); so are IP options, IPv6 extension headers and
    // fragments, which a SYN-ACK built in place cannot mirror.
    let cookie = if cfg.cookies_enabled() && flags & (TCP_FIN | TCP_RST) == 0 && at.plain {
        let epoch = syncookie::epoch_of(now);
        cookie::key_for(epoch).map(|key| CookieSyn {
            at,
            epoch,
            key,
            now,
        })
    } else {
        None
    };
    let known_good = match cookie {
        Some(_) => conns::is_known_good(source_key.as_addr(), now, cfg),
        None => false,
    };
    if let Some(c) = cookie {
        if !known_good && (cfg.syn_cookies == MODE_ALWAYS || global_budget_dry(now, cfg)) {
            return cookie_or_dry_run(cfg, c, &source_key);
        }
    }
    if let Some((drop, would_drop)) = charge_caps(ctx, &src, &source_key, now, cfg) {
        return drop_or_dry_run(cfg, drop, would_drop);
    }
    if cfg.global_budget_enabled() {
        // Everyone draws on the global budget; when it runs dry only sources
        // that recently completed a handshake (which a spoofed source cannot)
        // still pass, at their own per-source rate.
        let has_budget = match GLOBAL.get_ptr_mut(0) {
            // SAFETY: the one array slot; concurrent CPUs may lose a charge
            // (as for SourceState), never corrupt it.
            Some(bucket) => unsafe {
                (*bucket).try_take(now, cfg.global_syn_rate, cfg.global_syn_burst)
            },
            None => true,
        };
        if !has_budget {
            if known_good || conns::is_known_good(source_key.as_addr(), now, cfg) {
                count(Stat::PassKnownGood);
                charge_in_flight(flow, &source_key, now, cfg);
                return Verdict::Pass;
            }
            // The budget ran dry between the look above and this take.
            if let Some(c) = cookie {
                return cookie_or_dry_run(cfg, c, &source_key);
            }
            return drop_or_dry_run(cfg, Stat::DropGlobalBudget, Stat::WouldDropGlobalBudget);
        }
    }
    count(Stat::PassSyn);
    charge_in_flight(flow, &source_key, now, cfg);
    Verdict::Pass
}

/// Charges an admitted SYN's handshake to its source as in flight.
#[inline(always)]
fn charge_in_flight(flow: Option<&FlowKey>, source_key: &AddrWords, now: u64, cfg: &LiveConfig) {
    if let Some(f) = flow {
        conns::charge_handshake(f, source_key.as_addr(), now, cfg);
    }
}

/// The flow of the segment at `at`, written into this CPU's scratch slot.
#[inline(always)]
fn scratch_flow(pkt: &Packet, at: &TcpAt) -> Option<&'static FlowKey> {
    let slot = FLOW_SCRATCH.get_ptr_mut(0)?;
    let flow = flow_key(pkt, at)?;
    // SAFETY: this CPU's slot, used by this run alone until it returns.
    unsafe {
        *slot = flow;
        Some(&*slot)
    }
}

/// A cookie SYN-ACK for `c`, if its destination (the SYN's source, maybe
/// forged) has not had its share: SYN-ACKs per destination are capped like
/// SYNs per source (`syn_rate`, `syn_burst`), in a table of their own so
/// unproven sources never churn the per-source one. Without it, forged SYNs
/// would have guard reflect one SYN-ACK each at whoever they name.
#[inline(always)]
fn cookie_or_dry_run(cfg: &LiveConfig, c: CookieSyn, destination: &AddrWords) -> Verdict {
    if cfg.source_cap_enabled() {
        if let Some(b) = SYNACK_DESTS.get_ptr_mut(guard_common::state::synack_slot(destination)) {
            // SAFETY: an array slot; racing CPUs can only mis-count a charge.
            let b = unsafe { &mut *b };
            if b.last_ns == 0 {
                // Never used: a full burst, as a new source gets.
                *b = TokenBucket::full(cfg.syn_burst, c.now);
            }
            if !b.try_take(c.now, cfg.syn_rate, cfg.syn_burst) {
                return drop_or_dry_run(cfg, Stat::DropSynAckRate, Stat::WouldDropSynAckRate);
            }
        }
    }
    if cfg.dry_run() {
        count(Stat::WouldCookie);
        Verdict::Pass
    } else {
        Verdict::Cookie(c)
    }
}

/// Whether the global budget is exhausted right now, without taking from
/// it (that happens once the SYN has passed every other cap).
#[inline(always)]
fn global_budget_dry(now: u64, cfg: &LiveConfig) -> bool {
    if !cfg.global_budget_enabled() {
        return false;
    }
    match GLOBAL.get_ptr_mut(0) {
        // SAFETY: as for the take in `decide`.
        Some(bucket) => unsafe {
            (*bucket).refill(now, cfg.global_syn_rate, cfg.global_syn_burst);
            !(*bucket).has_token()
        },
        None => false,
    }
}

/// Charges a new connection of `src` to its aggregate prefix and to its own
/// cap; the (drop, would-drop) counters of the cap it is over, if any.
///
/// The aggregate is looked at before the source is tracked, so spoofed
/// sources flooding a saturated prefix cost one lookup each and never churn
/// the per-source table (where they would evict real sources). Its token is
/// taken only once the source's own cap admitted the SYN, so a single
/// source flooding past its own cap never drains the budget its neighbours
/// share.
#[inline(always)]
fn charge_caps<C: EbpfContext>(
    ctx: &C,
    src: &AddrWords,
    source_key: &AddrWords,
    now: u64,
    cfg: &LiveConfig,
) -> Option<(Stat, Stat)> {
    let aggregate_over = (Stat::DropAggregateRate, Stat::WouldDropAggregateRate);
    let aggregate = if cfg.aggregate_cap_enabled() {
        let key = src.prefix_key(cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
        match tracked(&AGGREGATES, key.as_addr(), cfg.aggregate_burst, now, None) {
            Some(state) => {
                state.syns += 1;
                state
                    .bucket
                    .refill(now, cfg.aggregate_rate, cfg.aggregate_burst);
                if !state.bucket.has_token() {
                    let len =
                        src.unified_prefix_len(cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
                    over_cap(ctx, state, &key, len, now, cfg, EVENT_AGGREGATE_OVER_CAP);
                    return Some(aggregate_over);
                }
                Some((state, key))
            }
            None => None,
        }
    } else {
        None
    };
    if cfg.source_cap_enabled() {
        let created = Some(Stat::SourcesCreated);
        if let Some(state) = tracked(&SOURCES, source_key.as_addr(), cfg.syn_burst, now, created) {
            state.syns += 1;
            if !state.bucket.try_take(now, cfg.syn_rate, cfg.syn_burst) {
                let len = src.unified_prefix_len(cfg.source_prefix_v4, cfg.source_prefix_v6);
                over_cap(ctx, state, source_key, len, now, cfg, EVENT_SOURCE_OVER_CAP);
                return Some((Stat::DropSourceRate, Stat::WouldDropSourceRate));
            }
        }
    }
    if let Some((state, key)) = aggregate {
        // Another CPU may have taken the last token since the look above.
        if !state.bucket.take() {
            let len = src.unified_prefix_len(cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
            over_cap(ctx, state, &key, len, now, cfg, EVENT_AGGREGATE_OVER_CAP);
            return Some(aggregate_over);
        }
    }
    None
}

#[inline(always)]
fn is_protected(port: u16) -> bool {
    matches!(PORTS.get(port as u32), Some(v) if *v != 0)
}

#[inline(always)]
fn is_allowed(src: &AddrWords) -> bool {
    ALLOW.get(HostKey::new(src).as_key()).is_some()
}

/// The LPM key that looks up one whole address. An LPM key puts the address
/// at offset 4, where the word stores of the address would be misaligned
/// stack accesses (which the verifier refuses); starting the key 4 bytes into
/// an 8-aligned buffer puts the address on an 8-byte boundary.
#[repr(C, align(8))]
struct HostKey {
    _align: u32,
    prefix_len: u32,
    addr: AddrWords,
}

impl HostKey {
    #[inline(always)]
    fn new(addr: &AddrWords) -> Self {
        Self {
            _align: 0,
            prefix_len: MAX_PREFIX_LEN,
            addr: *addr,
        }
    }

    #[inline(always)]
    fn as_key(&self) -> &Key<Addr> {
        // SAFETY: `Key<Addr>` is packed (alignment 1): a u32 prefix length
        // followed by the 16 address bytes, which is `prefix_len` and `addr`
        // here, adjacent (offsets 4 and 8) and inside `self`.
        unsafe { &*((self as *const Self as *const u8).add(4) as *const Key<Addr>) }
    }
}

/// The state tracked for `key`, created (with a full bucket) if it is new;
/// `created` counts creations. `None` when it cannot be tracked: a source we
/// cannot track is not one we can judge, so callers admit.
#[inline(always)]
fn tracked(
    map: &LruHashMap<Addr, SourceState>,
    key: &Addr,
    burst: u32,
    now: u64,
    created: Option<Stat>,
) -> Option<&'static mut SourceState> {
    let state = match map.get_ptr_mut(key) {
        Some(state) => state,
        None => {
            // BPF_NOEXIST: if another CPU created it meanwhile, use theirs.
            if map.insert(key, SourceState::new(burst, now), 1).is_ok() {
                if let Some(stat) = created {
                    count(stat);
                }
            }
            // None only if evicted in between, under extreme churn.
            map.get_ptr_mut(key)?
        }
    };
    // SAFETY: LRU values live in the map's preallocated pool, valid memory
    // for as long as the map exists (longer than this run). An entry
    // evicted meanwhile may be reused for another key, and concurrent CPUs
    // may interleave (documented on SourceState): either can only mis-count
    // a charge, never corrupt memory.
    Some(unsafe { &mut *state })
}

/// The token bucket of `key`, created full if it is new; `None` only if it
/// was evicted between its creation and the look (callers then admit).
#[inline(always)]
fn bucket(
    map: &LruHashMap<Addr, TokenBucket>,
    key: &Addr,
    burst: u32,
    now: u64,
) -> Option<&'static mut TokenBucket> {
    if map.get_ptr_mut(key).is_none() {
        let _ = map.insert(key, TokenBucket::full(burst, now), 1);
    }
    // SAFETY: as in `tracked`.
    map.get_ptr_mut(key).map(|b| unsafe { &mut *b })
}

/// Records a SYN over `key`'s cap; the first of an event window raises one
/// event.
#[inline(always)]
fn over_cap<C: EbpfContext>(
    ctx: &C,
    state: &mut SourceState,
    key: &AddrWords,
    prefix_len: u32,
    now: u64,
    cfg: &LiveConfig,
    kind: u8,
) {
    state.over_cap += 1;
    if state.open_event_window(now, cfg.event_interval_ns()) {
        raise_event(
            ctx,
            key.as_addr(),
            prefix_len,
            now,
            state,
            kind,
            cfg.dry_run(),
        );
    }
}

#[inline(always)]
fn raise_event<C: EbpfContext>(
    ctx: &C,
    key: &Addr,
    prefix_len: u32,
    now: u64,
    state: &SourceState,
    kind: u8,
    dry_run: bool,
) {
    match EVENTS.reserve::<OverCapEvent>(0) {
        Some(mut slot) => {
            slot.write(OverCapEvent {
                addr: *key,
                ts_ns: now,
                syns: state.syns,
                over_cap: state.over_cap,
                prefix_len: prefix_len as u8,
                kind,
                dry_run: dry_run as u8,
                _pad: 0,
                completed: state.completed as u32,
            });
            slot.submit(0);
        }
        None => {
            count(Stat::EventsLost);
            // Slow path only: at most once per source per event window.
            warn!(ctx, "event ring full: the agent is not draining events");
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
