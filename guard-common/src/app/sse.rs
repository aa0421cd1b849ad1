//! An SSE subscription under guard: a bounded queue per subscriber,
//! keep-alive, and eviction of subscribers that do not keep up.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
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
    ///
    /// The last two give the slot back at once, from the side that ends the
    /// subscription, not when the response body is next polled: a client
    /// that stops reading fills its socket, and then the body is not polled
    /// again for as long as the client likes. What was queued (or the
    /// eviction event) still goes out if the client reads again.
    ///
    /// When the stream ends, so does the connection (`Connection: close`):
    /// an evicted subscriber must not keep its socket as an idle keep-alive
    /// one, and a client whose event stream ended reconnects anyway. (Over
    /// HTTP/2, where the header has no place, hyper drops it and only the
    /// stream ends.)
    pub fn channel(self) -> (SseSender, impl Reply) {
        let keep_alive = self.permit.guard().limits().sse_keep_alive;
        let (sender, stream) = self.split();
        let stream = warp::sse::keep_alive().interval(keep_alive).stream(stream);
        let reply = warp::reply::with_header(
            warp::sse::reply(stream),
            warp::http::header::CONNECTION,
            "close",
        );
        (sender, reply)
    }

    fn split(self) -> (SseSender, Subscriber) {
        let guard = self.permit.guard().clone();
        let limits = guard.limits();
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed: false,
                evicted: false,
                senders: 1,
                permit: Some(self.permit),
            }),
            waker: AtomicWaker::new(),
            capacity: limits.sse_buffer,
            policy: limits.slow_consumer_policy,
            guard: guard.clone(),
        });
        let stream = Subscriber {
            queue: queue.clone(),
            guard,
            greeted: false,
            ended: false,
        };
        (SseSender { queue }, stream)
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
    /// The subscription's slot until whichever side ends the subscription
    /// first takes it; taken under the lock, so given back exactly once.
    permit: Option<Permit>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queues this long or shorter keep their room when they drain.
const KEPT_CAPACITY: usize = 4;

/// Gives back the room a burst made a queue grow to once it has drained:
/// a subscriber spends most of its life idle, and a full queue's worth of
/// events (up to `sse_buffer`) kept for each would be paid by every idle
/// one. One reallocation per burst.
pub(crate) fn shrink_drained<T>(items: &mut VecDeque<T>) {
    if items.is_empty() && items.capacity() > KEPT_CAPACITY {
        items.shrink_to(KEPT_CAPACITY);
    }
}

/// Gives a slot back, counted closed for `reason`. Called with the queue's
/// lock released: dropping a permit takes the admission tables' lock.
fn release(permit: Option<Permit>, reason: CloseReason) {
    if let Some(mut permit) = permit {
        permit.close_reason = reason;
        drop(permit);
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
        let permit = {
            let mut s = self.queue.lock();
            s.senders -= 1;
            if s.senders > 0 {
                return;
            }
            // The app is done with the subscription: its slot is free now,
            // whether or not the client ever reads the rest.
            s.permit.take()
        };
        self.queue.waker.wake();
        release(permit, CloseReason::Normal);
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
                    // Given back here: the body that would otherwise see the
                    // eviction is not polled while the client is not reading.
                    let permit = s.permit.take();
                    drop(s);
                    q.waker.wake();
                    if let Some(p) = &permit {
                        q.guard.inner.metrics.sse_evictions.inc();
                        log::info!("{}: SSE subscriber not keeping up; evicted", p.peer());
                    }
                    release(permit, CloseReason::SlowConsumer);
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
    guard: Guard,
    /// The first event, a jittered `retry:`, has gone out.
    greeted: bool,
    ended: bool,
}

impl Subscriber {
    /// A reconnect delay spread over `sse_retry_base + 0..=sse_retry_jitter`.
    fn retry(&self) -> std::time::Duration {
        let limits = self.guard.limits();
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
            // Counted, and the slot given back, by the sender that evicted.
            drop(s);
            this.ended = true;
            let evict = Event::default()
                .event("evicted")
                .data("not keeping up; reconnect later")
                .retry(this.retry());
            return Poll::Ready(Some(Ok(evict)));
        }
        if let Some(event) = s.items.pop_front() {
            shrink_drained(&mut s.items);
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
        let permit = {
            let mut s = self.queue.lock();
            s.closed = true;
            s.items.clear();
            s.permit.take()
        };
        release(permit, CloseReason::Normal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{ConnKind, Limits};
    use futures_util::task::noop_waker_ref;

    fn guard(policy: SlowConsumerPolicy) -> (Guard, prometheus::Registry) {
        let registry = prometheus::Registry::new();
        let guard = Guard::builder()
            .limits(Limits {
                sse_buffer: 2,
                slow_consumer_policy: policy,
                ..Limits::default()
            })
            .registry(&registry)
            .build()
            .unwrap();
        (guard, registry)
    }

    fn subscribe(guard: &Guard, ip: [u8; 4]) -> (SseSender, Subscriber) {
        let permit = guard.admit(ConnKind::Sse, &Peer::new(ip.into())).unwrap();
        SseSubscription::new(permit).split()
    }

    fn poll(sub: &mut Subscriber) -> Poll<Option<Result<Event, Infallible>>> {
        Pin::new(sub).poll_next(&mut Context::from_waker(noop_waker_ref()))
    }

    fn closed(registry: &prometheus::Registry, reason: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "guard_app_connections_closed_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| m.get_label().iter().any(|l| l.value() == reason))
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    #[test]
    fn eviction_gives_the_slot_back_once_without_the_body_being_polled() {
        let (guard, registry) = guard(SlowConsumerPolicy::Close);
        let (_other_tx, _other) = subscribe(&guard, [198, 18, 30, 2]);
        let (tx, mut sub) = subscribe(&guard, [198, 18, 30, 1]);
        assert_eq!(guard.open_connections(), 2);
        // Never polled: a client whose socket is full.
        tx.send(Event::default().data("1")).unwrap();
        tx.send(Event::default().data("2")).unwrap();
        assert_eq!(
            tx.send(Event::default().data("3")),
            Err(SendError::SlowConsumer)
        );
        assert_eq!(guard.open_connections(), 1);
        assert_eq!(closed(&registry, "slow_consumer"), 1);
        // Later sends, the body finally polled, every sender and the body
        // dropped: none of it gives the slot back again.
        assert_eq!(
            tx.send(Event::default().data("4")),
            Err(SendError::SlowConsumer)
        );
        assert!(matches!(poll(&mut sub), Poll::Ready(Some(Ok(_)))), "retry");
        assert!(
            matches!(poll(&mut sub), Poll::Ready(Some(Ok(_)))),
            "eviction"
        );
        assert!(matches!(poll(&mut sub), Poll::Ready(None)));
        let tx2 = tx.clone();
        drop(tx);
        drop(tx2);
        drop(sub);
        assert_eq!(guard.open_connections(), 1);
        assert_eq!(closed(&registry, "slow_consumer"), 1);
        assert_eq!(closed(&registry, "normal"), 0);
    }

    #[test]
    fn a_drained_queue_gives_back_the_room_a_burst_took() {
        let guard = Guard::builder().build().unwrap();
        let (tx, mut sub) = subscribe(&guard, [198, 18, 32, 1]);
        assert_eq!(sub.queue.lock().items.capacity(), 0, "nothing up front");
        assert!(matches!(poll(&mut sub), Poll::Ready(Some(Ok(_)))), "retry");
        for i in 0..32 {
            tx.send(Event::default().data(i.to_string())).unwrap();
        }
        assert!(sub.queue.lock().items.capacity() >= 32);
        while let Poll::Ready(Some(Ok(_))) = poll(&mut sub) {}
        assert!(sub.queue.lock().items.capacity() <= KEPT_CAPACITY);
    }

    #[test]
    fn the_last_sender_gives_the_slot_back_even_if_the_rest_is_never_read() {
        let (guard, registry) = guard(SlowConsumerPolicy::DropOldest);
        let (tx, mut sub) = subscribe(&guard, [198, 18, 31, 1]);
        tx.send(Event::default().data("last words")).unwrap();
        let tx2 = tx.clone();
        drop(tx);
        assert_eq!(guard.open_connections(), 1, "a sender is left");
        drop(tx2);
        assert_eq!(guard.open_connections(), 0);
        assert_eq!(closed(&registry, "normal"), 1);
        // What was queued still goes out to a client that reads again.
        assert!(matches!(poll(&mut sub), Poll::Ready(Some(Ok(_)))), "retry");
        assert!(matches!(poll(&mut sub), Poll::Ready(Some(Ok(_)))), "queued");
        assert!(matches!(poll(&mut sub), Poll::Ready(None)));
        drop(sub);
        assert_eq!(closed(&registry, "normal"), 1);
    }
}
