//! Counters of control requests and refusals, for the metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use guard_common::proto::{Request, Response};

/// Counters the agent exports as metrics.
#[derive(Debug, Default)]
pub struct ControlStats {
    pub(super) accepted: AtomicU64,
    pub(super) refused_peer: AtomicU64,
    pub(super) not_permitted: AtomicU64,
    pub(super) busy: AtomicU64,
    /// Per [`super::Busy::ALL`], in that order.
    pub(super) busy_by: [AtomicU64; 3],
    pub(super) bad_frames: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) idle_closed: AtomicU64,
    pub(super) handshake_failed: AtomicU64,
    pub(super) handler_panics: AtomicU64,
    pub(super) accept_errors: AtomicU64,
    pub(super) active: AtomicU64,
    pub(super) reads_waiting: AtomicU64,
    pub(super) requests_ok: [AtomicU64; Request::KINDS.len()],
    pub(super) requests_error: [AtomicU64; Request::KINDS.len()],
}

/// Requests of one kind answered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestCount {
    /// One of [`Request::KINDS`].
    pub kind: &'static str,
    pub ok: u64,
    /// Answered with an `Error`.
    pub error: u64,
}

/// A copy of [`ControlStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlStatsSnapshot {
    /// Connections accepted by the kernel, before any check.
    pub accepted: u64,
    /// Closed unread because of their peer credentials.
    pub refused_peer: u64,
    /// Requests refused for the peer's role (answered `NotPermitted`).
    pub not_permitted: u64,
    /// Closed because the connection limit was reached.
    pub busy: u64,
    /// `busy` by why, in [`super::Busy::ALL`] order: every slot taken, the rest kept for
    /// operators, or the uid's cap.
    pub busy_by: Vec<(super::Busy, u64)>,
    /// Malformed, oversized or out-of-order frames (each closes its
    /// connection).
    pub bad_frames: u64,
    /// Clients dropped for being too slow to send or to read.
    pub timeouts: u64,
    /// Sessions closed for sending no request within the idle timeout.
    pub idle_closed: u64,
    /// Clients whose protocol version differs from the agent's.
    pub handshake_failed: u64,
    /// Requests whose handler panicked (answered `Internal`).
    pub handler_panics: u64,
    pub accept_errors: u64,
    /// Connections being served now.
    pub active: u64,
    /// `list_blocks` and `history` requests waiting for the one running
    /// (they walk the blocklist or the audit log, so they take turns).
    pub reads_waiting: u64,
    /// Per request kind, in [`Request::KINDS`] order.
    pub requests: Vec<RequestCount>,
}

impl ControlStats {
    pub fn snapshot(&self) -> ControlStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ControlStatsSnapshot {
            accepted: get(&self.accepted),
            refused_peer: get(&self.refused_peer),
            not_permitted: get(&self.not_permitted),
            busy: get(&self.busy),
            busy_by: super::Busy::ALL
                .iter()
                .zip(&self.busy_by)
                .map(|(why, n)| (*why, get(n)))
                .collect(),
            bad_frames: get(&self.bad_frames),
            timeouts: get(&self.timeouts),
            idle_closed: get(&self.idle_closed),
            handshake_failed: get(&self.handshake_failed),
            handler_panics: get(&self.handler_panics),
            accept_errors: get(&self.accept_errors),
            active: get(&self.active),
            reads_waiting: get(&self.reads_waiting),
            requests: Request::KINDS
                .iter()
                .enumerate()
                .map(|(i, kind)| RequestCount {
                    kind,
                    ok: get(&self.requests_ok[i]),
                    error: get(&self.requests_error[i]),
                })
                .collect(),
        }
    }

    pub(super) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_busy(&self, why: super::Busy) {
        Self::bump(&self.busy);
        let i = super::Busy::ALL
            .iter()
            .position(|b| *b == why)
            .expect("every Busy is in ALL");
        Self::bump(&self.busy_by[i]);
    }

    pub(super) fn count_request(&self, kind: usize, resp: &Response) {
        let slot = if matches!(resp, Response::Error { .. }) {
            &self.requests_error
        } else {
            &self.requests_ok
        };
        Self::bump(&slot[kind]);
    }
}
