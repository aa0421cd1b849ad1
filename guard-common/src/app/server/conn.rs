//! One accepted connection as the budget, the sweeper and its task see it,
//! and what holds it: its socket, its descriptor ticket, its requests in
//! flight.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use super::handoff::HandOff;
use super::metrics::ServerClose;
use crate::app::Guard;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// One accepted connection, as the budget, the sweeper and its own task
/// see it.
pub(super) struct Conn {
    pub(super) remote: SocketAddr,
    /// Its place in the waiting table, 0 when not waiting. Changed under
    /// the table's lock.
    pub(super) seq: AtomicU64,
    /// Requests whose response is not done yet. Changed under the table's
    /// lock.
    pub(super) in_flight: AtomicU32,
    /// Never waits again: it switched protocols (a WebSocket, governed by
    /// its admission permit from now on), or its last response closes it.
    pub(super) done: AtomicBool,
    /// Why the server is closing it (a [`ServerClose`] code), 0 if not.
    pub(super) closing: AtomicU8,
    pub(super) close: Notify,
    /// Bytes the peer sent, and how many it had sent when it last started
    /// waiting: more since means a request head is half sent.
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_at_wait: AtomicU64,
    /// Its event streams may leave hyper after their head (HTTP/1 only).
    pub(super) hands_off: bool,
    pub(super) handoff: HandOff,
}

impl Conn {
    pub(super) fn new(remote: SocketAddr, hands_off: bool) -> Self {
        Self {
            remote,
            hands_off,
            handoff: HandOff::new(),
            seq: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            done: AtomicBool::new(false),
            closing: AtomicU8::new(0),
            close: Notify::new(),
            bytes_read: AtomicU64::new(0),
            bytes_at_wait: AtomicU64::new(0),
        }
    }

    /// Asks its task to drop it; false if it was already closing.
    pub(super) fn close(&self, reason: ServerClose) -> bool {
        let first = self
            .closing
            .compare_exchange(0, reason.code(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first {
            // notify_one keeps a permit if the task is not listening yet.
            self.close.notify_one();
        }
        first
    }

    pub(super) fn sent_partial_head(&self) -> bool {
        self.bytes_read.load(Ordering::Relaxed) > self.bytes_at_wait.load(Ordering::Relaxed)
    }
}

/// Holds a request of a connection in flight until its response is done,
/// however it ends (sent, failed, or the connection dropped).
pub(super) struct InFlight {
    pub(super) guard: Guard,
    pub(super) conn: Arc<Conn>,
}

impl InFlight {
    pub(super) fn begin(guard: Guard, conn: Arc<Conn>) -> Self {
        guard.inner.server.begin_request(&conn);
        Self { guard, conn }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.guard.inner.server.end_request(&self.guard, &self.conn);
    }
}

/// The socket (under TLS, if any): counts what the peer sends, and gives
/// the descriptor back to the server's count when dropped (for an upgraded
/// connection, when the WebSocket ends).
pub(super) struct CountingIo<I> {
    pub(super) io: I,
    pub(super) conn: Arc<Conn>,
    pub(super) _ticket: FdTicket,
}

impl<I: AsyncRead + Unpin> AsyncRead for CountingIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.conn
                .bytes_read
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CountingIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.conn.handoff.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// One connection descriptor in the server's count.
pub(super) struct FdTicket(Guard);

impl FdTicket {
    pub(super) fn new(guard: Guard) -> Self {
        guard.inner.server.live.fetch_add(1, Ordering::Relaxed);
        Self(guard)
    }
}

impl Drop for FdTicket {
    fn drop(&mut self) {
        let shared = &self.0.inner.server;
        shared.live.fetch_sub(1, Ordering::Relaxed);
        shared.freed.notify_waiters();
    }
}
