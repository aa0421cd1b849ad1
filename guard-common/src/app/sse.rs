//! An SSE subscription under guard: a bounded queue per subscriber,
//! keep-alive, and eviction of subscribers that do not keep up.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::prelude::rust_2021::*;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use warp::reply::Reply;
use warp::sse::Event;

use super::admission::Permit;
use super::metrics::{CloseReason, DropReason};
use super::{Guard, Peer, SendError, SlowConsumerPolicy};

/// An admitted SSE subscription, from [`Guard::sse`].
#[derive(Debug)]
pub struct SseSubscription {
    permit: Permit,
}

impl SseSubscription {
    pub(crate) fn new(permit: Permit) -> Self {
        Self { permit }
    }

    pub fn peer(&self) -> &Peer {
        self.permit.peer()
    }

    /// The subscriber's bounded queue, and the reply that streams it (with
    /// keep-alive comments). The subscription ends, and its slot is given
    /// back, when the client goes away, when every [`SseSender`] is
    /// dropped, or when the subscriber is evicted for not keeping up.
    pub fn channel(self) -> (SseSender, impl Reply) {
        let guard = self.permit.guard().clone();
        let limits = guard.limits();
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed: false,
                evicted: false,
                senders: 1,
            }),
            waker: AtomicWaker::new(),
            capacity: limits.sse_buffer,
            policy: limits.slow_consumer_policy,
            guard: guard.clone(),
        });
        let stream = Subscriber {
            queue: queue.clone(),
            permit: self.permit,
            greeted: false,
            ended: false,
            close_reason: CloseReason::Normal,
        };
        let stream = warp::sse::keep_alive()
            .interval(limits.sse_keep_alive)
            .stream(stream);
        (SseSender { queue }, warp::sse::reply(stream))
    }
}

struct Queue {
    state: Mutex<QueueState>,
    waker: AtomicWaker,
    capacity: usize,
    policy: SlowConsumerPolicy,
    guard: Guard,
}

struct QueueState {
    items: VecDeque<Event>,
    /// The subscriber is gone.
    closed: bool,
    /// Full under [`SlowConsumerPolicy::Close`]: tell the client to come
    /// back later, then end.
    evicted: bool,
    senders: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues events toward one subscriber without waiting. Cloneable; the
/// subscription ends when the last clone is dropped.
pub struct SseSender {
    queue: Arc<Queue>,
}

impl fmt::Debug for SseSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseSender")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Clone for SseSender {
    fn clone(&self) -> Self {
        self.queue.lock().senders += 1;
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl Drop for SseSender {
    fn drop(&mut self) {
        let last = {
            let mut s = self.queue.lock();
            s.senders -= 1;
            s.senders == 0
        };
        if last {
            self.queue.waker.wake();
        }
    }
}

impl SseSender {
    /// Queues `event`. When the queue is full the slow-consumer policy
    /// applies: the oldest event is dropped, or the subscriber is evicted
    /// (and this returns [`SendError::SlowConsumer`]).
    pub fn send(&self, event: Event) -> Result<(), SendError> {
        let q = &self.queue;
        let mut s = q.lock();
        if s.closed {
            return Err(SendError::Closed);
        }
        if s.evicted {
            return Err(SendError::SlowConsumer);
        }
        if s.items.len() >= q.capacity {
            q.guard
                .inner
                .metrics
                .dropped(DropReason::SlowConsumer)
                .inc();
            match q.policy {
                SlowConsumerPolicy::DropOldest => {
                    s.items.pop_front();
                }
                SlowConsumerPolicy::Close => {
                    s.evicted = true;
                    s.items.clear();
                    drop(s);
                    q.waker.wake();
                    return Err(SendError::SlowConsumer);
                }
            }
        }
        s.items.push_back(event);
        drop(s);
        q.waker.wake();
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        let s = self.queue.lock();
        s.closed || s.evicted
    }
}

/// The response body's event stream.
struct Subscriber {
    queue: Arc<Queue>,
    permit: Permit,
    /// The first event, a jittered `retry:`, has gone out.
    greeted: bool,
    ended: bool,
    close_reason: CloseReason,
}

impl Subscriber {
    /// A reconnect delay spread over `sse_retry_base + 0..=sse_retry_jitter`.
    fn retry(&self) -> std::time::Duration {
        let limits = self.permit.guard().limits();
        limits.sse_retry_base + super::jitter(limits.sse_retry_jitter)
    }
}

impl Stream for Subscriber {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.greeted {
            // Spreads the reconnects of every client after a restart or a
            // network blip, not only of evicted ones.
            this.greeted = true;
            return Poll::Ready(Some(Ok(Event::default().retry(this.retry()))));
        }
        this.queue.waker.register(cx.waker());
        let mut s = this.queue.lock();
        if s.evicted {
            drop(s);
            this.ended = true;
            this.close_reason = CloseReason::SlowConsumer;
            this.permit.guard().inner.metrics.sse_evictions.inc();
            log::info!(
                "{}: SSE subscriber not keeping up; evicted",
                this.permit.peer()
            );
            let evict = Event::default()
                .event("evicted")
                .data("not keeping up; reconnect later")
                .retry(this.retry());
            return Poll::Ready(Some(Ok(evict)));
        }
        if let Some(event) = s.items.pop_front() {
            return Poll::Ready(Some(Ok(event)));
        }
        if s.senders == 0 {
            drop(s);
            this.ended = true;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        {
            let mut s = self.queue.lock();
            s.closed = true;
            s.items.clear();
        }
        self.permit.close_reason = self.close_reason;
    }
}
