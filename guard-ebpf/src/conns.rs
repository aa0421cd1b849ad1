//! Exact counts of established connections per source, from the kernel's
//! own TCP state machine (sockops), and the "known good" set.
//!
//! A connection is counted when the server completes its handshake
//! (passive established) and uncounted when that socket reaches TCP_CLOSE,
//! which every end passes through: FIN/TIME_WAIT, RST, timeouts, the server
//! closing, the listener going away. The socket cookie remembers which key
//! a socket was counted under, so each close undoes exactly its own
//! increment even if the source prefix lengths changed in between, and a
//! socket that could not be remembered is never counted at all.
//!
//! What a source holds against `conn_limit` is more than that: a handshake
//! the program let through (or a cookie reply it admitted) is charged to its
//! source as *in flight* until sockops sees it complete, where the charge
//! moves into the established count; one that never completes expires
//! after `handshake_timeout_s` (see `state::InFlight`). Without it, one
//! address could hold back its ACKs and release them all at once, getting
//! any number of connections past the cap.

use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockOpsContext,
    EbpfContext as _,
};
use guard_common::{
    addr::{prefix_key, v4_mapped, Addr},
    state::{in_flight_live, in_flight_slot, FlowKey, Handshake, InFlight},
    stats::Stat,
    LiveConfig,
};

use crate::{count, is_protected, CONNS, CONN_SOCKS, HANDSHAKES, IN_FLIGHT, KNOWN_GOOD, SOURCES};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// BPF_NOEXIST.
const NOEXIST: u64 = 1;

// core's atomic types need CAS, which the BPF target spec does not declare;
// the add intrinsic lowers to BPF's atomic add, which every BPF CPU has.

#[inline(always)]
fn counter(key: &Addr) -> Option<*mut u64> {
    CONNS.get_ptr_mut(key)
}

/// Open connections of a source key right now. The counter is read as
/// signed: the agent's pruning of idle (zero) entries can race a new
/// connection and leave one decrement without its increment, which reads
/// as -1, i.e. none open, instead of wrapping to "always over the limit".
#[inline(always)]
pub fn open_connections(key: &Addr) -> u64 {
    // SAFETY: a live, aligned hash value. An aligned 8-byte load is single
    // copy atomic on BPF; volatile keeps it one load (LLVM's BPF backend
    // cannot select an atomic load on the generic CPU).
    let v = counter(key).map_or(0, |c| unsafe { core::ptr::read_volatile(c) }) as i64;
    if v < 0 {
        0
    } else {
        v as u64
    }
}

/// Handshakes of a source key in flight right now.
#[inline(always)]
pub fn in_flight(key: &Addr, now: u64, cfg: &LiveConfig) -> u64 {
    // SAFETY: a read-only look at a map value; a concurrent charge can only
    // make the sum one off.
    match unsafe { IN_FLIGHT.get(key) } {
        Some(f) => f.live(in_flight_slot(now, cfg.handshake_timeout_s)),
        None => 0,
    }
}

/// What a source key holds against `conn_limit`: established connections
/// and handshakes in flight.
#[inline(always)]
pub fn held(key: &Addr, now: u64, cfg: &LiveConfig) -> u64 {
    open_connections(key) + in_flight(key, now, cfg)
}

/// Whether `flow` is a handshake already charged and still in flight: its
/// SYN again (a retransmission) is not a new connection.
#[inline(always)]
pub fn is_in_flight(flow: &FlowKey, now: u64, cfg: &LiveConfig) -> bool {
    // SAFETY: read-only copy of a map value.
    match unsafe { HANDSHAKES.get(flow) } {
        Some(h) => in_flight_live(h.slot, in_flight_slot(now, cfg.handshake_timeout_s)),
        None => false,
    }
}

/// Charges `flow` to source key `key` as a handshake in flight, once per
/// flow while the charge lives. (A BPF function of its own: inlined, its
/// values would not fit the tc program's stack.)
#[inline(never)]
pub fn charge_handshake(flow: &FlowKey, key: &Addr, now: u64, cfg: &LiveConfig) {
    let slot = in_flight_slot(now, cfg.handshake_timeout_s);
    if is_in_flight(flow, now, cfg) {
        return;
    }
    if IN_FLIGHT.get_ptr_mut(key).is_none() {
        let _ = IN_FLIGHT.insert(key, InFlight::default(), NOEXIST);
    }
    let Some(f) = IN_FLIGHT.get_ptr_mut(key) else {
        return;
    };
    let i = InFlight::index(slot);
    // SAFETY: an LRU value in the map's preallocated pool (see `tracked`
    // in main.rs); the index is below IN_FLIGHT_SLOTS.
    unsafe {
        if (*f).slots[i] != slot {
            // The slot's old charges are past the timeout: recycle it.
            (*f).slots[i] = slot;
            (*f).counts[i] = 0;
        }
        atomic_xadd::<u64, u64, { Relaxed }>(&mut (*f).counts[i], 1);
    }
    let entry = Handshake {
        source: *key,
        slot,
        _pad: 0,
    };
    let _ = HANDSHAKES.insert(flow, entry, 0);
    count(Stat::HandshakeCharged);
}

/// Takes back the in-flight charge of `flow`, if it has one: the handshake
/// completed (or the kernel refused to build it).
#[inline(never)]
pub fn release_handshake(flow: &FlowKey) -> bool {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(h) = (unsafe { HANDSHAKES.get(flow) }).copied() else {
        return false;
    };
    let _ = HANDSHAKES.remove(flow);
    if let Some(f) = IN_FLIGHT.get_ptr_mut(h.source) {
        let i = InFlight::index(h.slot);
        // SAFETY: as in charge_handshake. A slot recycled since holds
        // other charges: leave them.
        unsafe {
            if (*f).slots[i] == h.slot && core::ptr::read_volatile(&(*f).counts[i]) > 0 {
                atomic_xadd::<u64, u64, { Relaxed }>(&mut (*f).counts[i], u64::MAX);
            }
        }
    }
    true
}

#[inline(always)]
pub fn is_known_good(key: &Addr, now: u64, cfg: &LiveConfig) -> bool {
    // SAFETY: read-only copy of a u64 value.
    match unsafe { KNOWN_GOOD.get(key) } {
        Some(last) => now.saturating_sub(*last) < cfg.known_good_ttl_ns(),
        None => false,
    }
}

/// Reads a context word at a constant offset. The verifier only accepts
/// context loads of the form `ctx + constant`; going through aya's array
/// accessor let LLVM keep a pointer into the middle of the context, which
/// it rejects. Volatile keeps each load separate.
macro_rules! ctx_word {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: a field of the live bpf_sock_ops the kernel handed us.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ctx.ops).$($field)+)) }
    };
}

/// The connection as the datapath keyed its handshake: the remote end is
/// the client. Ports: `remote_port` holds the network-order port in its
/// upper half (little-endian hosts), `local_port` the host-order one.
#[inline(always)]
fn flow_of(ctx: &SockOpsContext, client: Addr) -> Option<FlowKey> {
    let family = ctx_word!(ctx, family);
    let v4 = ctx_word!(ctx, local_ip4).to_ne_bytes();
    let a = ctx_word!(ctx, local_ip6[0]).to_ne_bytes();
    let b = ctx_word!(ctx, local_ip6[1]).to_ne_bytes();
    let c = ctx_word!(ctx, local_ip6[2]).to_ne_bytes();
    let d = ctx_word!(ctx, local_ip6[3]).to_ne_bytes();
    let remote_port = ctx_word!(ctx, remote_port);
    let local_port = ctx_word!(ctx, local_port);
    let server = match family {
        AF_INET => v4_mapped(v4),
        AF_INET6 => [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ],
        _ => return None,
    };
    Some(FlowKey {
        client,
        server,
        client_port: u16::from_be((remote_port >> 16) as u16),
        server_port: local_port as u16,
        _pad: 0,
    })
}

#[inline(always)]
fn remote_addr(ctx: &SockOpsContext) -> Option<Addr> {
    // Every word is read up front, unconditionally: loads in separate
    // branches get merged by LLVM into one load through a selected pointer,
    // which the verifier rejects for the context.
    let family = ctx_word!(ctx, family);
    let v4 = ctx_word!(ctx, remote_ip4).to_ne_bytes();
    let a = ctx_word!(ctx, remote_ip6[0]).to_ne_bytes();
    let b = ctx_word!(ctx, remote_ip6[1]).to_ne_bytes();
    let c = ctx_word!(ctx, remote_ip6[2]).to_ne_bytes();
    let d = ctx_word!(ctx, remote_ip6[3]).to_ne_bytes();
    // The context stores addresses in network order: native-endian bytes
    // of the u32 words are the wire bytes.
    match family {
        AF_INET => Some(v4_mapped(v4)),
        AF_INET6 => Some([
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]),
        _ => None,
    }
}

#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext, cfg: &LiveConfig) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(ctx, cfg),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            on_close(ctx);
        }
        _ => {}
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, cfg: &LiveConfig) {
    if cfg.conn_netns_cookie != 0 {
        // SAFETY: a sock_ops context is a valid argument for this helper.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if netns != cfg.conn_netns_cookie {
            return;
        }
    }
    if ctx.local_port() > u16::MAX as u32 || !is_protected(ctx.local_port() as u16) {
        return;
    }
    let Some(src) = remote_addr(ctx) else {
        return;
    };
    let key = prefix_key(&src, cfg.source_prefix_v4, cfg.source_prefix_v6);
    // SAFETY: helper with no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = KNOWN_GOOD.insert(key, now, 0);
    if let Some(flow) = flow_of(ctx, src) {
        if release_handshake(&flow) {
            count(Stat::HandshakeCompleted);
        }
    }
    // The escalation's evidence: this source's SYNs turn into connections.
    if let Some(state) = SOURCES.get_ptr_mut(key) {
        // SAFETY: an LRU value in the map's preallocated pool.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&mut (*state).completed, 1) };
    }

    // SAFETY: a sock_ops context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if CONN_SOCKS.insert(cookie, key, NOEXIST).is_err() {
        count(Stat::ConnUntracked);
        return;
    }
    if counter(&key).is_none() {
        let _ = CONNS.insert(key, 0u64, NOEXIST);
    }
    let Some(c) = counter(&key) else {
        // The count table is full: forget the socket so its close does not
        // decrement what was never incremented.
        let _ = CONN_SOCKS.remove(cookie);
        count(Stat::ConnUntracked);
        return;
    };
    // Ask for state changes so the close is seen; without them the
    // connection must not stay counted.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        let _ = CONN_SOCKS.remove(cookie);
        count(Stat::ConnUntracked);
        return;
    }
    // SAFETY: as in open_connections.
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(c, 1) };
    count(Stat::ConnOpened);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: a sock_ops context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(key) = (unsafe { CONN_SOCKS.get(cookie) }).copied() else {
        return;
    };
    let _ = CONN_SOCKS.remove(cookie);
    if let Some(c) = counter(&key) {
        // SAFETY: as in open_connections. Adding u64::MAX is subtracting one.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(c, u64::MAX) };
    }
    count(Stat::ConnClosed);
}
