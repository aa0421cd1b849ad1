//! What arrives from the client: the rate and size limits, the app's
//! validation, the violation policy and the idle timeout.

use std::borrow::Cow;
use std::future::Future;
use std::prelude::rust_2021::*;
use std::task::Context;

use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use warp::filters::ws::Message;

use super::frames::Arrived;
use super::socket::SocketError;
use super::{
    GuardedWebSocket, Phase, CLOSE_INVALID_PAYLOAD, CLOSE_POLICY, CLOSE_PROTOCOL, CLOSE_TOO_BIG,
};
use crate::app::admission::duration_ns;
use crate::app::metrics::{CloseReason, Violation};
use crate::app::ViolationPolicy;
use crate::bucket::{TokenBucket, NANO_TOKENS};
use crate::state::reason;

/// Messages read on one clock reading at most.
const CLOCK_EVERY: u32 = 16;

/// Charges `len` bytes to a byte bucket (the shared bucket takes one
/// token at a time).
fn take_bytes(bucket: &mut TokenBucket, now: u64, len: u64, rate: u32, burst: u32) -> bool {
    bucket.refill(now, rate, burst);
    let need = len.saturating_mul(NANO_TOKENS);
    if bucket.tokens >= need {
        bucket.tokens -= need;
        true
    } else {
        false
    }
}

/// Violations in the current window.
#[derive(Default)]
pub(super) struct Violations {
    start_ns: u64,
    total: u32,
    rate: u32,
    /// The threshold was crossed in this window (acted on once).
    crossed: bool,
    /// One log line per connection is enough to see what happens.
    logged: bool,
}

impl Violations {
    /// A fresh window starting at `now`.
    pub(super) fn starting(now: u64) -> Self {
        Self {
            start_ns: now,
            ..Self::default()
        }
    }
}

impl GuardedWebSocket {
    /// Applies every inbound limit; `Some` is a message for the app.
    pub(super) fn inspect(&mut self, msg: Message, now: u64) -> Option<Message> {
        let guard = self.permit.guard();
        let limits = guard.limits();
        self.last_activity_ns = now;
        let len = msg.as_bytes().len();
        self.received += 1;
        self.received_bytes += len as u64;
        if msg.is_close() {
            self.peer_closed();
            return None;
        }
        let data = msg.is_text() || msg.is_binary();
        let violation = if len > limits.max_message_size {
            Some((Violation::Size, Cow::Borrowed("message too big")))
        } else if self.metered {
            // Its frames were charged as they arrived (`charge_frames`),
            // and counted as violations there if over a rate.
            if self.frame_debt > 0 {
                self.frame_debt -= 1;
                if data {
                    self.permit
                        .guard()
                        .inner
                        .metrics
                        .dropped(Violation::Rate.dropped())
                        .inc();
                }
                return None;
            }
            match (&self.validator, data) {
                (Some(check), true) => check(&msg).err().map(|e| (Violation::Invalid, e.0)),
                _ => None,
            }
        } else if !self
            .messages
            .try_take(now, limits.message_rate, limits.message_burst)
        {
            Some((Violation::Rate, Cow::Borrowed("over the message rate")))
        } else if !take_bytes(
            &mut self.bytes,
            now,
            len as u64,
            limits.byte_rate,
            limits.byte_burst,
        ) {
            Some((Violation::Rate, Cow::Borrowed("over the byte rate")))
        } else {
            match (&self.validator, data) {
                (Some(check), true) => check(&msg).err().map(|e| (Violation::Invalid, e.0)),
                _ => None,
            }
        };
        if let Some((v, why)) = violation {
            if !self.violate(v, &why, now) {
                return None;
            }
        }
        data.then_some(msg)
    }

    /// Charges frames that just arrived (a metered socket only): one
    /// message token each, control frames and continuation fragments
    /// included, and their payload bytes, before the codec has assembled
    /// anything. Each frame over the message rate is a rate violation, so
    /// a flood of empty fragments closes like any message flood. Under
    /// `Drop` and `Close` the messages those frames belong to are then
    /// discarded: one per frame over (and one for a byte overrun), never
    /// more than the batch touched, starting with the next one delivered.
    /// A message in progress counts as touched by each batch it spans, so
    /// a long fragmented one can cost the message after it too.
    pub(super) fn charge_frames(&mut self, arrived: Arrived, now: u64) {
        if arrived.frames == 0 {
            return;
        }
        let limits = self.permit.guard().limits();
        let (rate, burst) = (limits.message_rate, limits.message_burst);
        let (byte_rate, byte_burst) = (limits.byte_rate, limits.byte_burst);
        let warn = limits.violation_policy == ViolationPolicy::Warn;
        self.last_activity_ns = now;
        let mut over = 0u64;
        for _ in 0..arrived.frames {
            if !self.messages.try_take(now, rate, burst) {
                over += 1;
            }
        }
        let bytes_over = !take_bytes(&mut self.bytes, now, arrived.payload, byte_rate, byte_burst);
        if !warn {
            let touched = arrived.messages.max(1);
            self.frame_debt += (over + u64::from(bytes_over)).min(touched);
        }
        for _ in 0..over {
            if !matches!(self.phase, Phase::Open) {
                break;
            }
            self.violate_counted(Violation::Rate, "over the message rate", now);
        }
        if bytes_over && matches!(self.phase, Phase::Open) {
            self.violate_counted(Violation::Rate, "over the byte rate", now);
        }
        if !matches!(self.phase, Phase::Open) {
            // Closed for it: the messages in debt will never be delivered.
            let discarded = std::mem::take(&mut self.frame_debt);
            let metrics = &self.permit.guard().inner.metrics;
            metrics.dropped(Violation::Rate.dropped()).inc_by(discarded);
        }
    }

    /// [`Self::violate`] for a violation whose message is not at hand: the
    /// drop is counted when the message is discarded, not here.
    fn violate_counted(&mut self, v: Violation, why: &str, now: u64) {
        self.violate_inner(v, why, now, false);
    }

    /// Counts a violation and applies the policy; true when the message is
    /// still delivered.
    fn violate(&mut self, v: Violation, why: &str, now: u64) -> bool {
        self.violate_inner(v, why, now, true)
    }

    fn violate_inner(&mut self, v: Violation, why: &str, now: u64, count_drop: bool) -> bool {
        let guard = self.permit.guard().clone();
        let limits = guard.limits();
        let metrics = &guard.inner.metrics;
        metrics.violation(v).inc();
        let policy = limits.violation_policy;
        let deliver = policy == ViolationPolicy::Warn;
        if !deliver && count_drop {
            metrics.dropped(v.dropped()).inc();
        }
        let w = &mut self.violations;
        if now.saturating_sub(w.start_ns) >= duration_ns(limits.violation_window) {
            *w = Violations {
                start_ns: now,
                logged: w.logged,
                ..Violations::default()
            };
        }
        w.total += 1;
        if v == Violation::Rate {
            w.rate += 1;
        }
        if !w.logged {
            w.logged = true;
            log::info!(
                "{}: {why} ({policy:?} policy; further violations are only counted)",
                self.permit.peer()
            );
        }
        if w.total < limits.violation_threshold || w.crossed {
            return deliver;
        }
        w.crossed = true;
        let flood = w.rate * 2 > w.total;
        let detail = format!(
            "{} violations ({} rate) within {:?}; last: {why}",
            w.total, w.rate, limits.violation_window
        );
        if flood {
            metrics.floods.inc();
        }
        let peer = self.permit.peer().clone();
        if policy != ViolationPolicy::Close {
            log::warn!("{peer}: {detail}; left open ({policy:?} policy)");
            return deliver;
        }
        let (close, code, text) = if flood {
            (CloseReason::Flood, reason::MESSAGE_FLOOD, "message flood")
        } else {
            (
                CloseReason::Violations,
                reason::INVALID_MESSAGES,
                "too many invalid messages",
            )
        };
        log::warn!("{peer}: {detail}; closing");
        self.start_close(close, CLOSE_POLICY, text);
        guard.offense(&peer, code, detail);
        false
    }

    /// A read error: the codec has ended the stream. Oversized and invalid
    /// messages still get a close frame saying why.
    pub(super) fn read_failed(&mut self, e: &SocketError) {
        let (v, code, text) = match e.ws() {
            Some(WsError::Capacity(_)) => (Violation::Size, CLOSE_TOO_BIG, "message too big"),
            Some(WsError::Utf8(_)) => (Violation::Invalid, CLOSE_INVALID_PAYLOAD, "invalid UTF-8"),
            Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) | None => {
                // The client just went away.
                self.phase = Phase::Done;
                return;
            }
            Some(WsError::Protocol(_)) => (Violation::Invalid, CLOSE_PROTOCOL, "protocol error"),
            Some(_) => {
                self.phase = Phase::Done;
                return;
            }
        };
        let metrics = &self.permit.guard().inner.metrics;
        metrics.violation(v).inc();
        metrics.dropped(v.dropped()).inc();
        log::info!("{}: {text} ({e}); closing with {code}", self.permit.peer());
        self.start_close(CloseReason::Violations, code, text);
    }

    /// The guard's clock, read once per burst of messages (a read costs
    /// about as much as everything else done per message). A stale time
    /// only makes the buckets stricter, and a burst is read back to back,
    /// so it is stale by microseconds; `CLOCK_EVERY` bounds it when the app
    /// is slow and input keeps waiting.
    pub(super) fn clock(&mut self) -> u64 {
        if self.clock_reads == 0 {
            self.now_ns = self.guard().now_ns();
        }
        self.clock_reads = (self.clock_reads + 1) % CLOCK_EVERY;
        self.now_ns
    }

    pub(super) fn flush_counts(&mut self) {
        if self.received > 0 {
            let metrics = &self.permit.guard().inner.metrics;
            metrics.received.inc_by(std::mem::take(&mut self.received));
            metrics
                .received_bytes
                .inc_by(std::mem::take(&mut self.received_bytes));
        }
    }

    /// Whether the idle timer says the connection is idle; re-arms it when
    /// there was activity since it was set (cheaper than resetting a timer
    /// on every message).
    pub(super) fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.guard().limits().idle_timeout else {
            return false;
        };
        let deadline = self.guard().instant_at(self.last_activity_ns) + timeout;
        let Some(idle) = &mut self.idle else {
            return false;
        };
        loop {
            if idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            if idle.deadline() >= deadline {
                return true;
            }
            idle.as_mut().reset(deadline);
        }
    }
}
