//! The two sockets a [`GuardedWebSocket`](super::GuardedWebSocket) can
//! drive, behind one type: warp's own (an app still on `warp::serve`, with
//! tungstenite's default 128 KiB buffers) and the one guard builds itself
//! when guard's server handed it the upgrade (buffers sized by
//! [`Limits`](crate::app::Limits), frames metered as they arrive).

use std::error::Error as _;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Sink, Stream};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use warp::filters::ws::{Message, WebSocket};

use super::frames::{Arrived, Metered};

/// The upgraded connection guard's server hands over, as the codec reads it.
pub(crate) type SizedIo = Metered<TokioIo<Upgraded>>;

pub(super) enum Socket {
    /// Through warp's `Ws`: buffers as tungstenite's defaults, frames not
    /// seen (messages are charged instead).
    Warp(WebSocket),
    /// Through guard's own upgrade.
    Sized(WebSocketStream<SizedIo>),
}

/// A read or write failure of either socket.
#[derive(Debug)]
pub(super) enum SocketError {
    Warp(warp::Error),
    Ws(WsError),
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Warp(e) => e.fmt(f),
            Self::Ws(e) => e.fmt(f),
        }
    }
}

impl SocketError {
    /// The codec's error underneath, to tell what went wrong.
    pub(super) fn ws(&self) -> Option<&WsError> {
        match self {
            Self::Warp(e) => e.source().and_then(|s| s.downcast_ref::<WsError>()),
            Self::Ws(e) => Some(e),
        }
    }
}

impl Socket {
    /// Frames and payload bytes read since the last call; `None` when this
    /// socket cannot see frames (warp's).
    pub(super) fn take_arrived(&mut self) -> Option<Arrived> {
        match self {
            Self::Warp(_) => None,
            Self::Sized(s) => Some(s.get_mut().take()),
        }
    }

    /// Whether the last read stopped only so that its frames get charged
    /// (see `Metered::take_paused`); never for warp's socket.
    pub(super) fn take_paused(&mut self) -> bool {
        match self {
            Self::Warp(_) => false,
            Self::Sized(s) => s.get_mut().take_paused(),
        }
    }
}

/// warp's message as the codec's. warp keeps the codec's message private,
/// so it goes through its public parts: payloads are shared, not copied.
fn into_codec(msg: Message) -> WsMessage {
    if msg.is_close() {
        return WsMessage::Close(msg.close_frame().map(|(code, reason)| CloseFrame {
            code: code.into(),
            reason: Utf8Bytes::from(reason),
        }));
    }
    let (text, ping, pong) = (msg.is_text(), msg.is_ping(), msg.is_pong());
    let data = msg.into_bytes();
    if text {
        // warp built it from a `String`, so the check cannot fail; if it
        // ever did, the bytes still go out, as binary. Checked in place
        // rather than by `Utf8Bytes::try_from`, which takes the bytes: a
        // clone to keep them for that case made every echo allocate.
        return if std::str::from_utf8(&data).is_ok() {
            // SAFETY: checked just above.
            WsMessage::Text(unsafe { Utf8Bytes::from_bytes_unchecked(data) })
        } else {
            WsMessage::Binary(data)
        };
    }
    if ping {
        WsMessage::Ping(data)
    } else if pong {
        WsMessage::Pong(data)
    } else {
        WsMessage::Binary(data)
    }
}

/// The codec's message as warp's. Text is copied once (warp's constructor
/// takes a `String`); everything else is shared.
fn from_codec(msg: WsMessage) -> Message {
    match msg {
        WsMessage::Text(t) => Message::text(t.as_str()),
        WsMessage::Binary(b) => Message::binary(b),
        WsMessage::Ping(b) => Message::ping(b),
        WsMessage::Pong(b) => Message::pong(b),
        WsMessage::Close(Some(f)) => Message::close_with(f.code, f.reason.as_str().to_owned()),
        WsMessage::Close(None) => Message::close(),
        // Only ever written, never read; passed on as its payload.
        WsMessage::Frame(f) => Message::binary(f.into_payload()),
    }
}

impl Stream for Socket {
    type Item = Result<Message, SocketError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Warp(s) => Pin::new(s)
                .poll_next(cx)
                .map(|o| o.map(|r| r.map_err(SocketError::Warp))),
            Self::Sized(s) => Pin::new(s)
                .poll_next(cx)
                .map(|o| o.map(|r| r.map(from_codec).map_err(SocketError::Ws))),
        }
    }
}

impl Sink<Message> for Socket {
    type Error = SocketError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SocketError>> {
        match self.get_mut() {
            Self::Warp(s) => Pin::new(s).poll_ready(cx).map_err(SocketError::Warp),
            Self::Sized(s) => Pin::new(s).poll_ready(cx).map_err(SocketError::Ws),
        }
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), SocketError> {
        match self.get_mut() {
            Self::Warp(s) => Pin::new(s).start_send(msg).map_err(SocketError::Warp),
            Self::Sized(s) => Pin::new(s)
                .start_send(into_codec(msg))
                .map_err(SocketError::Ws),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SocketError>> {
        match self.get_mut() {
            Self::Warp(s) => Pin::new(s).poll_flush(cx).map_err(SocketError::Warp),
            Self::Sized(s) => Pin::new(s).poll_flush(cx).map_err(SocketError::Ws),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), SocketError>> {
        match self.get_mut() {
            Self::Warp(s) => Pin::new(s).poll_close(cx).map_err(SocketError::Warp),
            Self::Sized(s) => Pin::new(s).poll_close(cx).map_err(SocketError::Ws),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_both_ways_unchanged() {
        let cases = [
            Message::text("héllo"),
            Message::binary(vec![0u8, 1, 2]),
            Message::ping(vec![9u8]),
            Message::pong(vec![8u8]),
            Message::close(),
            Message::close_with(1008u16, "message flood"),
        ];
        for msg in cases {
            assert_eq!(from_codec(into_codec(msg.clone())), msg);
        }
    }
}
