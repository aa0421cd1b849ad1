//! A WebSocket under guard: inbound limits, validation, idle timeout and a
//! bounded outbound queue, all driven from the one task that owns the
//! socket (no extra task or channel hop per message).
//!
//! The socket and its public API are here; what arrives is checked in
//! `inbound`, what goes out waits in `outbound`, and `stream` drives both.
//! `socket` is the connection underneath: warp's, or one guard upgraded
//! itself with sized buffers and frames metered by `frames`.

mod frames;
#[cfg(test)]
mod idle_memory;
mod inbound;
mod outbound;
mod socket;
mod stream;
#[cfg(test)]
pub(crate) mod tests;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::prelude::rust_2021::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Sink;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::{Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use warp::filters::ws::{Message, Ws};
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::{Reply, Response};

use super::admission::Permit;
use super::metrics::CloseReason;
use super::{Guard, Peer};
use crate::bucket::TokenBucket;
use frames::Metered;
use inbound::Violations;
use outbound::Outbound;
use socket::Socket;

pub use outbound::{SendError, WsSender};

/// Close codes (RFC 6455, 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Why the app's check refused a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub Cow<'static, str>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&'static str> for Invalid {
    fn from(s: &'static str) -> Self {
        Self(Cow::Borrowed(s))
    }
}

impl From<String> for Invalid {
    fn from(s: String) -> Self {
        Self(Cow::Owned(s))
    }
}

type Validator = Arc<dyn Fn(&Message) -> Result<(), Invalid> + Send + Sync>;

/// How the upgrade is finished.
pub(crate) enum Handshake {
    /// By warp (the app is served by `warp::serve`).
    Warp(Ws),
    /// By guard, on the connection guard's server handed over: the
    /// request's `Sec-WebSocket-Key` (already checked by warp's `ws()`
    /// filter) answers with the accept key.
    Sized { upgrade: OnUpgrade, key: String },
}

/// An admitted WebSocket upgrade, from [`Guard::websocket`].
pub struct WsUpgrade {
    ws: Handshake,
    permit: Permit,
    validator: Option<Validator>,
}

impl fmt::Debug for WsUpgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsUpgrade")
            .field("peer", self.permit.peer())
            .finish_non_exhaustive()
    }
}

impl WsUpgrade {
    pub(crate) fn new(ws: Handshake, permit: Permit) -> Self {
        Self {
            ws,
            permit,
            validator: None,
        }
    }

    pub fn peer(&self) -> &Peer {
        self.permit.peer()
    }

    /// Checks every text and binary message (after UTF-8 and size, which
    /// the codec enforces); a refused one is an invalid-message violation.
    pub fn validate<F>(mut self, check: F) -> Self
    where
        F: Fn(&Message) -> Result<(), Invalid> + Send + Sync + 'static,
    {
        self.validator = Some(Arc::new(check));
        self
    }

    /// Finishes the upgrade and runs `handler` on the guarded socket. The
    /// slot is held until the socket is dropped (or the upgrade fails).
    pub fn on_upgrade<F, U>(self, handler: F) -> impl Reply
    where
        F: FnOnce(GuardedWebSocket) -> U + Send + 'static,
        U: Future<Output = ()> + Send + 'static,
    {
        let limits = self.permit.guard().limits();
        let config = limits.websocket_config();
        let (max_message, max_frame) = (limits.max_message_size, limits.max_frame_size);
        let (permit, validator) = (self.permit, self.validator);
        match self.ws {
            Handshake::Warp(ws) => {
                // The codec refuses bigger messages before buffering them;
                // warp offers no way to size its buffers.
                let ws = ws.max_message_size(max_message).max_frame_size(max_frame);
                ws.on_upgrade(move |socket| {
                    handler(GuardedWebSocket::new(
                        Socket::Warp(socket),
                        permit,
                        validator,
                    ))
                })
                .into_response()
            }
            Handshake::Sized { upgrade, key } => {
                // The connection is handed over once the 101 below has gone
                // out; until then (and if it never does) the task only
                // holds the permit, which a failed upgrade gives back.
                tokio::spawn(async move {
                    let upgraded = match upgrade.await {
                        Ok(upgraded) => upgraded,
                        Err(e) => {
                            log::debug!("{}: WebSocket upgrade failed: {e}", permit.peer());
                            return;
                        }
                    };
                    let io = Metered::new(TokioIo::new(upgraded));
                    let stream =
                        WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                    handler(GuardedWebSocket::new(
                        Socket::Sized(stream),
                        permit,
                        validator,
                    ))
                    .await;
                });
                switching_protocols(&key)
            }
        }
    }
}

/// The 101 that completes a handshake (RFC 6455, 4.2.2).
fn switching_protocols(key: &str) -> Response {
    let mut res = Response::default();
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // Base64 is always a valid header value.
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    res
}

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
    metered: bool,
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
    fn new(socket: Socket, permit: Permit, validator: Option<Validator>) -> Self {
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
