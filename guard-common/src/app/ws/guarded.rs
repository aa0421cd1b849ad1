//! [`GuardedWebSocket`]: its public API, the [`Stream`] that drives it
//! (each poll writes out what is queued, reads and checks what came in,
//! runs the timers and, once closing, the close handshake), and the
//! inbound checks: rate and size limits, the app's validation, the
//! violation policy and the idle timeout.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Sink, Stream};
use tokio::time::{Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use warp::filters::ws::Message;

use super::frames::Arrived;
use super::inbound::{take_bytes, Tally, Violations};
use super::outbound::{Outbound, SendError, WsSender};
use super::socket::{Socket, SocketError};
use super::{
    Validator, CLOSE_INVALID_PAYLOAD, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_PROTOCOL, CLOSE_TOO_BIG,
};
use crate::app::admission::{duration_ns, Permit};
use crate::app::metrics::{CloseReason, Violation};
use crate::app::{Guard, Peer, ViolationPolicy};
use crate::bucket::TokenBucket;
use crate::state::reason;

/// Inbound messages handled in one poll before yielding, so a client
/// whose messages are all being dropped cannot hog its worker thread.
const DROPS_PER_POLL: u32 = 64;

/// Messages read on one clock reading at most.
const CLOCK_EVERY: u32 = 16;

enum Phase {
    Open,
    /// Our close frame (if any) still to go out, then the peer's reply or
    /// EOF awaited, all within `close_timeout`.
    Closing {
        /// What the app queued goes out first (its own close only).
        drain: bool,
        frame: Option<Message>,
        sent: bool,
        deadline: Pin<Box<Sleep>>,
    },
    Done,
}

/// An admitted, upgraded WebSocket.
///
/// Read it as a [`Stream`](futures_util::Stream) of text and binary
/// messages that passed every limit (pings, pongs and close frames are
/// handled inside); it ends when the connection does, for whatever reason
/// ([`GuardedWebSocket::close_reason`]).
/// Write with [`GuardedWebSocket::send`] or a [`WsSender`] (for other
/// tasks): neither waits, both are bounded, and what they send reaches the
/// socket **while the stream is being polled**, so keep awaiting `next()`
/// (a `select!` with other work is fine). One task drives everything, so
/// the guard adds no task hop or channel per message.
pub struct GuardedWebSocket {
    socket: Socket,
    /// The socket counts frames as they arrive: the rate buckets are
    /// charged per frame there, not per message here.
    pub(super) metered: bool,
    /// Messages still to discard because frames of theirs went over a rate
    /// (under `Drop` and `Close`); see `charge_frames`.
    frame_debt: u64,
    out: Arc<Outbound>,
    permit: Permit,
    validator: Option<Validator>,
    messages: TokenBucket,
    bytes: TokenBucket,
    violations: Violations,
    last_activity_ns: u64,
    idle: Option<Pin<Box<Sleep>>>,
    ping: Option<Interval>,
    ping_due: bool,
    /// Taken from the queue, waiting for the socket to accept it.
    pending: Option<Message>,
    unflushed: bool,
    /// The cached clock (see [`GuardedWebSocket::clock`]).
    now_ns: u64,
    clock_reads: u32,
    /// Received counts not yet added to the shared counters (once per
    /// burst, not per message: they are shared by every connection).
    received: u64,
    received_bytes: u64,
    phase: Phase,
    close_reason: CloseReason,
}

impl fmt::Debug for GuardedWebSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedWebSocket")
            .field("peer", self.permit.peer())
            .field("close_reason", &self.close_reason)
            .finish_non_exhaustive()
    }
}

impl GuardedWebSocket {
    pub(super) fn new(socket: Socket, permit: Permit, validator: Option<Validator>) -> Self {
        let guard = permit.guard().clone();
        let limits = guard.limits();
        let now = guard.now_ns();
        let idle = limits
            .idle_timeout
            .map(|d| Box::pin(tokio::time::sleep_until(guard.instant_at(now) + d)));
        let ping = limits.ping_interval.map(|period| {
            let mut i = tokio::time::interval_at(guard.instant_at(now) + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        let out = Arc::new(Outbound::new(
            limits.outbound_queue,
            limits.slow_consumer_policy,
            guard.clone(),
        ));
        Self {
            messages: TokenBucket::full(limits.message_burst, now),
            bytes: TokenBucket::full(limits.byte_burst, now),
            metered: matches!(socket, Socket::Sized(_)),
            frame_debt: 0,
            socket,
            out,
            permit,
            validator,
            violations: Violations::starting(now),
            last_activity_ns: now,
            idle,
            ping,
            ping_due: false,
            pending: None,
            unflushed: false,
            now_ns: now,
            clock_reads: 0,
            received: 0,
            received_bytes: 0,
            phase: Phase::Open,
            close_reason: CloseReason::Normal,
        }
    }

    pub fn peer(&self) -> &Peer {
        self.permit.peer()
    }

    /// A handle for other tasks to send to this client.
    pub fn sender(&self) -> WsSender {
        WsSender {
            out: self.out.clone(),
        }
    }

    /// Sends `msg` toward the client: straight into the codec's buffer
    /// when nothing is waiting ahead of it, otherwise through the bounded
    /// queue (see [`WsSender::send`]). Either way it reaches the socket the
    /// next time the stream is polled.
    pub fn send(&mut self, msg: Message) -> Result<(), SendError> {
        if !matches!(self.phase, Phase::Open) {
            return Err(SendError::Closed);
        }
        if self.pending.is_none() && !self.ping_due && self.out.queued.load(Ordering::Acquire) == 0
        {
            // A ready codec takes the message without I/O, so a waker is not
            // needed; when it is not ready, the next poll registers the real
            // one.
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            if let Poll::Ready(Ok(())) = Pin::new(&mut self.socket).poll_ready(&mut cx) {
                if Pin::new(&mut self.socket).start_send(msg).is_err() {
                    self.phase = Phase::Done;
                    return Err(SendError::Closed);
                }
                self.unflushed = true;
                return Ok(());
            }
        }
        // The owner is about to poll again anyway; waking it would only
        // cost a spurious poll.
        self.out.push(msg, false)
    }

    /// Why the connection ended (or is ending); `Normal` while it is open.
    pub fn close_reason(&self) -> CloseReason {
        self.close_reason
    }

    /// Closes with `code` and `reason`, waiting (at most `close_timeout`)
    /// for the close handshake. Messages still arriving are discarded.
    /// What was sent before is written first.
    pub async fn close_with(mut self, code: u16, reason: &'static str) {
        if matches!(self.phase, Phase::Open) {
            self.out.seal();
            self.close_reason = CloseReason::Normal;
            self.phase = Phase::Closing {
                drain: true,
                frame: Some(Message::close_with(code, reason)),
                sent: false,
                deadline: Box::pin(tokio::time::sleep(self.guard().limits().close_timeout)),
            };
        }
        while futures_util::StreamExt::next(&mut self).await.is_some() {}
    }

    /// Closes normally (1000).
    pub async fn close(self) {
        self.close_with(CLOSE_NORMAL, "").await;
    }

    fn guard(&self) -> &Guard {
        self.permit.guard()
    }

    fn start_close(&mut self, why: CloseReason, code: u16, text: &'static str) {
        if !matches!(self.phase, Phase::Open) {
            return;
        }
        self.close_reason = why;
        self.out.close();
        self.pending = None;
        self.phase = Phase::Closing {
            drain: false,
            frame: Some(Message::close_with(code, text)),
            sent: false,
            deadline: Box::pin(tokio::time::sleep(self.guard().limits().close_timeout)),
        };
    }

    /// The peer closed: its close reply is queued by the codec; flush it.
    fn peer_closed(&mut self) {
        if matches!(self.phase, Phase::Open) {
            self.out.close();
            self.pending = None;
            self.phase = Phase::Closing {
                drain: false,
                frame: None,
                sent: false,
                deadline: Box::pin(tokio::time::sleep(self.guard().limits().close_timeout)),
            };
        }
    }

    /// Hands what is queued to the codec, and flushes it to the socket if
    /// `flush`. Pending means the socket is not taking more right now (it
    /// wakes the task when it does); reading goes on regardless.
    fn poll_write(&mut self, cx: &mut Context<'_>, flush: bool) -> Poll<Result<(), SocketError>> {
        loop {
            if self.pending.is_none() {
                self.pending = if std::mem::take(&mut self.ping_due) {
                    Some(Message::ping(Vec::new()))
                } else {
                    self.out.pop()
                };
            }
            if self.pending.is_none() {
                break;
            }
            match Pin::new(&mut self.socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(msg) = self.pending.take() {
                Pin::new(&mut self.socket).start_send(msg)?;
                self.unflushed = true;
            }
        }
        if self.unflushed && flush {
            match Pin::new(&mut self.socket).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drives the close: our frame out, then the peer's reply or EOF.
    /// Ready when the connection is over.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Phase::Closing {
            deadline, drain, ..
        } = &mut self.phase
        else {
            return Poll::Ready(());
        };
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if *drain {
            match self.poll_write(cx, false) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
            if let Phase::Closing { drain, .. } = &mut self.phase {
                *drain = false;
            }
        }
        let Phase::Closing { frame, sent, .. } = &mut self.phase else {
            return Poll::Ready(());
        };
        if let Some(msg) = frame.take() {
            let mut socket = Pin::new(&mut self.socket);
            match socket.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if socket.start_send(msg).is_err() {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {
                    *frame = Some(msg);
                    return Poll::Pending;
                }
            }
        }
        if !*sent {
            match Pin::new(&mut self.socket).poll_close(cx) {
                Poll::Ready(Ok(())) => *sent = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Read until the peer's close reply (the codec then ends the
        // stream) so that dropping the socket is a clean FIN: closing with
        // unread data would send a RST that can destroy our close frame
        // before the client reads it.
        for _ in 0..DROPS_PER_POLL {
            match Pin::new(&mut self.socket).poll_next(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Applies every inbound limit; `Some` is a message for the app.
    fn inspect(&mut self, msg: Message, now: u64) -> Option<Message> {
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
    fn charge_frames(&mut self, arrived: Arrived, now: u64) {
        if arrived.frames == 0 {
            return;
        }
        let limits = self.permit.guard().limits();
        let (rate, burst) = (limits.message_rate, limits.message_burst);
        let (byte_rate, byte_burst) = (limits.byte_rate, limits.byte_burst);
        let warn = limits.violation_policy == ViolationPolicy::Warn;
        self.last_activity_ns = now;
        self.messages.refill(now, rate, burst);
        let over = arrived.frames - self.messages.take_up_to(arrived.frames);
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
        let tally = w.count(
            v == Violation::Rate,
            now,
            duration_ns(limits.violation_window),
            limits.violation_threshold,
        );
        if w.first_to_log() {
            log::info!(
                "{}: {why} ({policy:?} policy; further violations are only counted)",
                self.permit.peer()
            );
        }
        let Tally::Crossed { total, rate } = tally else {
            return deliver;
        };
        let flood = rate * 2 > total;
        let detail = format!(
            "{total} violations ({rate} rate) within {:?}; last: {why}",
            limits.violation_window
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
    fn read_failed(&mut self, e: &SocketError) {
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
    fn clock(&mut self) -> u64 {
        if self.clock_reads == 0 {
            self.now_ns = self.guard().now_ns();
        }
        self.clock_reads = (self.clock_reads + 1) % CLOCK_EVERY;
        self.now_ns
    }

    fn flush_counts(&mut self) {
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
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> bool {
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

impl Stream for GuardedWebSocket {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let this = &mut *self;
        let mut handled = 0;
        loop {
            match this.phase {
                Phase::Open => {}
                Phase::Closing { .. } => {
                    return match this.poll_closing(cx) {
                        Poll::Ready(()) => {
                            this.phase = Phase::Done;
                            Poll::Ready(None)
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Phase::Done => return Poll::Ready(None),
            }

            if this.out.overflowed.load(Ordering::Relaxed) {
                log::info!("{}: not reading fast enough; closing", this.permit.peer());
                this.start_close(CloseReason::SlowConsumer, CLOSE_POLICY, "slow consumer");
                continue;
            }
            // Like `forward`, flush only once nothing more is coming in:
            // flushing mid-burst makes small TCP segments, which Nagle holds
            // until the peer's (delayed) ACK, up to 40 ms each. Meanwhile the
            // codec still writes out whenever its buffer fills, so nothing
            // piles up.
            if let Poll::Ready(Err(_)) = this.poll_write(cx, false) {
                // The socket is broken; nothing more will go through it.
                this.phase = Phase::Done;
                continue;
            }

            let polled = Pin::new(&mut this.socket).poll_next(cx);
            let paused = this.socket.take_paused();
            if let Some(arrived) = this.socket.take_arrived() {
                if arrived.frames > 0 {
                    let now = this.clock();
                    this.charge_frames(arrived, now);
                    if !matches!(this.phase, Phase::Open) {
                        // A flood: what it sent is not for the app.
                        continue;
                    }
                }
            }
            match polled {
                Poll::Ready(Some(Ok(msg))) => {
                    let now = this.clock();
                    if let Some(msg) = this.inspect(msg, now) {
                        return Poll::Ready(Some(msg));
                    }
                    handled += 1;
                    if handled >= DROPS_PER_POLL {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.read_failed(&e);
                    continue;
                }
                Poll::Ready(None) => {
                    this.phase = Phase::Done;
                    continue;
                }
                // Stopped to have its frames charged (done above), not for
                // want of bytes: read on. The loop ends when the socket runs
                // dry or tokio's budget for the task is spent.
                Poll::Pending if paused => continue,
                Poll::Pending => {}
            }

            // The peer is quiet for now: the next message comes after a
            // wait, and timers and counters get their turn.
            this.clock_reads = 0;
            this.flush_counts();
            if let Some(ping) = &mut this.ping {
                while ping.poll_tick(cx).is_ready() {
                    this.ping_due = true;
                }
            }
            let write = this.poll_write(cx, true);
            if let Poll::Ready(Err(_)) = write {
                this.phase = Phase::Done;
                continue;
            }
            if this.poll_idle(cx) {
                log::info!("{}: idle; closing", this.permit.peer());
                this.start_close(CloseReason::Idle, CLOSE_NORMAL, "idle timeout");
                continue;
            }
            // Registered only now, then the queue checked once more, so a
            // message queued from another task meanwhile is not missed.
            this.out.waker.register(cx.waker());
            let queued = write.is_ready() && this.out.queued.load(Ordering::Acquire) > 0;
            if queued || this.out.overflowed.load(Ordering::Relaxed) {
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl Drop for GuardedWebSocket {
    fn drop(&mut self) {
        self.out.close();
        self.flush_counts();
        self.permit.close_reason = self.close_reason;
    }
}

// Warp runs the handler on a spawned task, so the socket must be Send.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<GuardedWebSocket>();
    assert_send::<WsSender>();
};
