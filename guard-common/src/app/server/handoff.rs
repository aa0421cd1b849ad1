//! SSE streams served outside hyper once their response head is out.
//!
//! Under hyper, an idle SSE subscriber keeps hyper's read and write
//! buffers for as long as it is subscribed (8 KiB each, the least hyper
//! allows), which is most of what the subscriber costs. A subscription
//! needs neither after its head: its request is read, and its body is a
//! trickle of small events. So once hyper has written the head of an
//! HTTP/1.1 `text/event-stream` reply, the connection's task takes the
//! socket back from hyper (`into_parts`), drops hyper's connection and its
//! buffers, and writes the body itself, in the chunked framing hyper's
//! head announced.
//!
//! The hand-off, in order: [`respond`](super::respond) parks the real body
//! here and gives hyper a stand-in that never yields a frame; hyper writes
//! the head and polls the stand-in ([`HandOff::head_queued`]); the socket
//! sees hyper's flush of the head ([`HandOff::flushed`]); the connection's
//! task then takes the socket and the parked body and [`stream`]s it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::Body;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

use super::conn::{Conn, InFlight};
use super::connection::Stop;
use super::WarpBody;

/// A body parked for its connection's task while hyper writes its head.
pub(super) struct Parked {
    pub body: WarpBody,
    /// The request stays in flight until the stream ends.
    pub in_flight: InFlight,
}

/// Where a connection's hand-off is (one per connection; mostly `NONE`).
const NONE: u8 = 0;
const PARKED: u8 = 1;
/// hyper has encoded the head (it polled the stand-in body).
const HEAD_QUEUED: u8 = 2;
/// hyper flushed its buffer after queueing the head: the head is out.
const HEAD_SENT: u8 = 3;

/// A connection's hand-off state, shared by the stand-in body, the socket
/// and the connection's task.
pub(super) struct HandOff {
    state: AtomicU8,
    parked: Mutex<Option<Parked>>,
    ready: Notify,
}

impl HandOff {
    pub fn new() -> Self {
        Self {
            state: AtomicU8::new(NONE),
            parked: Mutex::new(None),
            ready: Notify::new(),
        }
    }

    pub fn park(&self, parked: Parked) {
        *self.parked.lock().unwrap_or_else(PoisonError::into_inner) = Some(parked);
        self.state.store(PARKED, Ordering::Release);
    }

    /// Takes the parked body back. The connection's task always does, when
    /// it hands off and when it ends otherwise: a parked body holds its
    /// connection (through its request in flight), so leaving it here would
    /// keep both alive.
    pub fn take(&self) -> Option<Parked> {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// hyper polled the stand-in body: the head is in hyper's buffer.
    pub fn head_queued(&self) {
        if self
            .state
            .compare_exchange(PARKED, HEAD_QUEUED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.ready.notify_one();
        }
    }

    /// The socket was flushed. hyper flushes the socket only once its own
    /// buffer is empty, so after [`head_queued`](Self::head_queued) this
    /// means the head is out.
    pub fn flushed(&self) {
        if self.state.load(Ordering::Acquire) == HEAD_QUEUED
            && self
                .state
                .compare_exchange(HEAD_QUEUED, HEAD_SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.ready.notify_one();
        }
    }

    /// Completes when the hand-off may have moved; check [`head_sent`](Self::head_sent).
    pub fn changed(&self) -> impl Future<Output = ()> + '_ {
        self.ready.notified()
    }

    pub fn head_sent(&self) -> bool {
        self.state.load(Ordering::Acquire) == HEAD_SENT
    }
}

/// Whether this response to this request is streamed outside hyper: an
/// event stream answering an HTTP/1.1 GET, whose body hyper frames as
/// chunked (no length, no framing of the app's own).
pub(super) fn wants_hand_off(
    method: &Method,
    version: Version,
    response: &warp::reply::Response,
) -> bool {
    let headers = response.headers();
    method == Method::GET
        && version == Version::HTTP_11
        && response.status() == StatusCode::OK
        && !headers.contains_key(CONTENT_LENGTH)
        && !headers.contains_key(TRANSFER_ENCODING)
        && headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .get(..17)
                    .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
            })
}

/// How a handed-off stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The body ended and its last chunk went out.
    Finished,
    /// The peer closed its side or the socket failed.
    PeerGone,
    /// The body failed.
    BodyFailed,
}

/// Streams `parked`'s body on `io` as HTTP/1.1 chunks until it ends, the
/// peer goes, the server closes the connection, or a shutdown's grace runs
/// out (as hyper would have: a graceful shutdown lets responses in flight
/// finish, and an event stream never does).
pub(super) async fn stream<I>(io: I, parked: Parked, conn: &Conn, stop: &mut watch::Receiver<Stop>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Parked { body, in_flight } = parked;
    let pump = Pump {
        io,
        body,
        out: Vec::new(),
        written: 0,
        unflushed: false,
        last: false,
    };
    tokio::select! {
        ended = pump => {
            log::debug!("event stream to {} ended: {ended:?}", conn.remote);
        }
        () = conn.close.notified() => {}
        () = stopped_now(stop) => {}
    }
    drop(in_flight);
}

async fn stopped_now(stop: &mut watch::Receiver<Stop>) {
    loop {
        if *stop.borrow_and_update() == Stop::Now {
            return;
        }
        if stop.changed().await.is_err() {
            // The server future is gone: streams run on, as with warp::serve.
            std::future::pending::<()>().await;
        }
    }
}

/// Reads at most this many times per poll, so a peer that keeps sending
/// cannot keep the task from its writes.
const READS_PER_POLL: usize = 8;
/// The read size for what a peer sends after its request, which is
/// discarded: nothing it says matters to an event stream but its end.
const DISCARD_CHUNK: usize = 256;
/// The chunked body's last chunk (no trailers).
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Writes a body as HTTP/1.1 chunks, one event at a time, holding nothing
/// between events but the socket and the body.
struct Pump<I> {
    io: I,
    body: WarpBody,
    /// The chunk being written (empty, without capacity, between events).
    out: Vec<u8>,
    written: usize,
    unflushed: bool,
    /// `out` holds the last chunk.
    last: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Pump<I> {
    /// Notices the peer closing (or resetting) its side. What it sends is
    /// discarded, as hyper does once its response says `Connection: close`.
    fn poll_peer(&mut self, cx: &mut Context<'_>) -> Poll<Ended> {
        let mut scratch = [0u8; DISCARD_CHUNK];
        for _ in 0..READS_PER_POLL {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Ended::PeerGone)
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Ended::PeerGone),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes what `out` holds; Ready(Ok) once it is all out.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Between events, an idle subscriber holds no buffer.
        self.out = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Future for Pump<I> {
    type Output = Ended;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = &mut *self;
        if let Poll::Ready(ended) = this.poll_peer(cx) {
            return Poll::Ready(ended);
        }
        loop {
            match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Ended::PeerGone),
                Poll::Pending => return Poll::Pending,
            }
            if this.last {
                // Flushed and shut down (a FIN, or TLS's close_notify) so
                // the client reads the end of the stream before EOF.
                return match Pin::new(&mut this.io).poll_flush(cx).map(|r| r.and(Ok(()))) {
                    Poll::Ready(Ok(())) => Pin::new(&mut this.io)
                        .poll_shutdown(cx)
                        .map(|_| Ended::Finished),
                    Poll::Ready(Err(_)) => Poll::Ready(Ended::PeerGone),
                    Poll::Pending => Poll::Pending,
                };
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    if data.has_remaining() {
                        this.out = chunk(&mut data);
                        this.unflushed = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    log::debug!("event stream body failed: {e}");
                    return Poll::Ready(Ended::BodyFailed);
                }
                Poll::Ready(None) => {
                    this.out = LAST_CHUNK.to_vec();
                    this.last = true;
                }
                Poll::Pending => {
                    if this.unflushed {
                        match Pin::new(&mut this.io).poll_flush(cx) {
                            Poll::Ready(Ok(())) => this.unflushed = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(Ended::PeerGone),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// One HTTP/1.1 chunk: the size in hex, the data, each line ended by CRLF.
fn chunk(data: &mut impl Buf) -> Vec<u8> {
    let len = data.remaining();
    let size = std::format!("{len:x}\r\n");
    let mut out = Vec::with_capacity(size.len() + len + 2);
    out.extend_from_slice(size.as_bytes());
    while data.has_remaining() {
        let part = data.chunk();
        out.extend_from_slice(part);
        let n = part.len();
        data.advance(n);
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(content_type: &str) -> warp::reply::Response {
        let mut r = warp::reply::Reply::into_response(warp::reply());
        r.headers_mut()
            .insert(CONTENT_TYPE, content_type.parse().unwrap());
        r
    }

    #[test]
    fn only_http11_get_event_streams_are_handed_off() {
        let sse = reply("text/event-stream");
        assert!(wants_hand_off(&Method::GET, Version::HTTP_11, &sse));
        assert!(wants_hand_off(
            &Method::GET,
            Version::HTTP_11,
            &reply("Text/Event-Stream; charset=utf-8")
        ));
        assert!(!wants_hand_off(&Method::HEAD, Version::HTTP_11, &sse));
        assert!(!wants_hand_off(&Method::GET, Version::HTTP_10, &sse));
        assert!(!wants_hand_off(&Method::GET, Version::HTTP_2, &sse));
        assert!(!wants_hand_off(
            &Method::GET,
            Version::HTTP_11,
            &reply("text/plain")
        ));
        let mut rejected = reply("text/event-stream");
        *rejected.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        assert!(!wants_hand_off(&Method::GET, Version::HTTP_11, &rejected));
        let mut sized = reply("text/event-stream");
        sized
            .headers_mut()
            .insert(CONTENT_LENGTH, "0".parse().unwrap());
        assert!(!wants_hand_off(&Method::GET, Version::HTTP_11, &sized));
    }

    #[test]
    fn chunks_carry_their_size_in_hex() {
        let mut data = bytes::Bytes::from_static(b"data: hello, world\n\n");
        assert_eq!(chunk(&mut data), b"14\r\ndata: hello, world\n\n\r\n");
    }
}
