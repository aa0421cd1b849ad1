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
    stats::Stat,
    LiveConfig,
};

use crate::{count, is_protected, CONNS, CONN_SOCKS, KNOWN_GOOD};

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
