//! One request handed to the app, and the body hyper writes for its
//! response.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::conn::{Conn, InFlight};
use super::handoff::{self, Parked};
use super::{Handler, WarpBody};
use crate::app::served::Served;
use crate::app::Guard;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Version};

/// A response body that keeps its request in flight until it ends, so an
/// SSE stream (a response that never ends) never counts as waiting.
pub(super) struct Tracked<B> {
    pub(super) body: B,
    pub(super) in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.in_flight = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What hyper writes for a response: the app's body, or a stand-in for an
/// event stream that leaves hyper once its head is out (see [`handoff`]).
pub(super) enum Outgoing {
    Body(Tracked<WarpBody>),
    /// Never yields a frame; its first poll says hyper has queued the head.
    HandedOff(Arc<Conn>),
}

impl Body for Outgoing {
    type Data = bytes::Bytes;
    type Error = warp::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            Self::Body(body) => Pin::new(body).poll_frame(cx),
            Self::HandedOff(conn) => {
                conn.handoff.head_queued();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Body(body) => body.is_end_stream(),
            Self::HandedOff(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Body(body) => body.size_hint(),
            // Unknown, so that hyper's head announces chunked framing.
            Self::HandedOff(_) => SizeHint::default(),
        }
    }
}

/// Hands one request to the app with its [`Served`], and keeps it in flight
/// until its response is done.
pub(super) fn respond(
    guard: &Guard,
    conn: &Arc<Conn>,
    handler: &Handler,
    mut req: Request<Incoming>,
) -> BoxFuture<'static, Result<Response<Outgoing>, Infallible>> {
    let upgrade = (req.version() < Version::HTTP_2).then(|| hyper::upgrade::on(&mut req));
    req.extensions_mut()
        .insert(Served::new(conn.remote, upgrade));
    let last_request = closes_after(req.version(), req.headers());
    let (method, version) = (req.method().clone(), req.version());
    let in_flight = InFlight::begin(guard.clone(), conn.clone());
    let response = handler(req);
    Box::pin(async move {
        let response = response.await;
        // A connection that ends with this response must not take a place
        // in the budget (evicting someone) on its way out.
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            || last_request
            || closes_after(Version::HTTP_11, response.headers())
        {
            in_flight.conn.done.store(true, Ordering::Relaxed);
        }
        if in_flight.conn.hands_off && handoff::wants_hand_off(&method, version, &response) {
            let conn = in_flight.conn.clone();
            let (mut head, body) = response.into_parts();
            // The socket is the stream's from now on: when the stream ends,
            // so does the connection, and the client must know not to send
            // another request on it (guard's own SSE replies say so already).
            head.headers.insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            conn.done.store(true, Ordering::Relaxed);
            conn.handoff.park(Parked { body, in_flight });
            return Ok(Response::from_parts(head, Outgoing::HandedOff(conn)));
        }
        Ok(response.map(|body| {
            Outgoing::Body(Tracked {
                body,
                in_flight: Some(in_flight),
            })
        }))
    })
}

/// Whether an HTTP/1 message with these headers ends its connection: a
/// `Connection: close`, or HTTP/1.0 without `keep-alive`.
pub(super) fn closes_after(version: Version, headers: &hyper::HeaderMap) -> bool {
    if version >= Version::HTTP_2 {
        return false;
    }
    let has = |token: &str| {
        headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has("close") || (version < Version::HTTP_11 && !has("keep-alive"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderValue, CONNECTION};

    fn headers(connection: Option<&'static str>) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        if let Some(v) = connection {
            h.insert(CONNECTION, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn which_messages_end_their_connection() {
        assert!(!closes_after(Version::HTTP_11, &headers(None)));
        assert!(closes_after(Version::HTTP_11, &headers(Some("close"))));
        assert!(closes_after(
            Version::HTTP_11,
            &headers(Some("Upgrade, Close"))
        ));
        assert!(closes_after(Version::HTTP_10, &headers(None)));
        assert!(!closes_after(
            Version::HTTP_10,
            &headers(Some("keep-alive"))
        ));
        assert!(!closes_after(Version::HTTP_2, &headers(Some("close"))));
    }
}
