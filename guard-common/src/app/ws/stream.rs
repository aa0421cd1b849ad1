//! The [`Stream`] that drives a [`GuardedWebSocket`]: each poll writes out
//! what is queued, reads and checks what came in, runs the timers and,
//! once closing, the close handshake.

use std::future::Future;
use std::pin::Pin;
use std::prelude::rust_2021::*;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_util::{Sink, Stream};
use warp::filters::ws::Message;

use super::socket::SocketError;
use super::{GuardedWebSocket, Phase, CLOSE_NORMAL, CLOSE_POLICY};
use crate::app::metrics::CloseReason;

/// Inbound messages handled in one poll before yielding, so a client
/// whose messages are all being dropped cannot hog its worker thread.
const DROPS_PER_POLL: u32 = 64;

impl GuardedWebSocket {
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
