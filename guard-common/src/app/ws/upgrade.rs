//! [`WsUpgrade`]: an admitted upgrade, finished by warp or, under guard's
//! server, by guard itself with sized buffers and metered frames.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use warp::filters::ws::Message;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::{Reply, Response};

use super::frames::Metered;
use super::socket::Socket;
use super::{GuardedWebSocket, Handshake, Invalid, Validator};
use crate::app::admission::Permit;
use crate::app::Peer;

/// An admitted WebSocket upgrade, from [`Guard::websocket`](crate::app::Guard::websocket).
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
