//! The bounded queue toward one client, filled by the socket's own task
//! and by [`WsSender`]s from any other, drained by the socket's stream.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::task::AtomicWaker;
use warp::filters::ws::Message;

use crate::app::metrics::DropReason;
use crate::app::{Guard, SlowConsumerPolicy};

/// Why a message could not be queued toward the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the connection is closed")]
    Closed,
    #[error("the client is not reading fast enough; the connection is being closed")]
    SlowConsumer,
}

/// The bounded queue toward one client.
pub(super) struct Outbound {
    state: Mutex<OutState>,
    /// The socket's task, to wake when something is queued from elsewhere.
    pub(super) waker: AtomicWaker,
    capacity: usize,
    policy: SlowConsumerPolicy,
    guard: Guard,
    /// `items.len()`, readable without the lock: the socket's task looks
    /// at the queue on every poll and it is almost always empty.
    pub(super) queued: AtomicUsize,
    /// Full under [`SlowConsumerPolicy::Close`]: the socket closes itself.
    pub(super) overflowed: AtomicBool,
}

struct OutState {
    items: VecDeque<Message>,
    closed: bool,
}

impl Outbound {
    pub(super) fn new(capacity: usize, policy: SlowConsumerPolicy, guard: Guard) -> Self {
        Self {
            state: Mutex::new(OutState {
                items: VecDeque::new(),
                closed: false,
            }),
            waker: AtomicWaker::new(),
            capacity,
            policy,
            guard,
            queued: AtomicUsize::new(0),
            overflowed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn push(&self, msg: Message, wake: bool) -> Result<(), SendError> {
        let dropped = self.guard.inner.metrics.dropped(DropReason::SlowConsumer);
        let mut s = self.lock();
        if s.closed {
            return Err(SendError::Closed);
        }
        if self.overflowed.load(Ordering::Relaxed) {
            return Err(SendError::SlowConsumer);
        }
        if s.items.len() >= self.capacity {
            dropped.inc();
            match self.policy {
                SlowConsumerPolicy::DropOldest => {
                    s.items.pop_front();
                }
                SlowConsumerPolicy::Close => {
                    self.overflowed.store(true, Ordering::Relaxed);
                    s.items.clear();
                    self.queued.store(0, Ordering::Release);
                    drop(s);
                    self.waker.wake();
                    return Err(SendError::SlowConsumer);
                }
            }
        }
        s.items.push_back(msg);
        self.queued.store(s.items.len(), Ordering::Release);
        drop(s);
        if wake {
            self.waker.wake();
        }
        Ok(())
    }

    pub(super) fn pop(&self) -> Option<Message> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut s = self.lock();
        let msg = s.items.pop_front();
        crate::app::sse::shrink_drained(&mut s.items);
        self.queued.store(s.items.len(), Ordering::Release);
        msg
    }

    pub(super) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.items.clear();
        self.queued.store(0, Ordering::Release);
    }

    /// Takes no more, but keeps what is queued.
    pub(super) fn seal(&self) {
        self.lock().closed = true;
    }
}

/// A cloneable handle that queues messages toward one client, from any
/// task, without waiting. Keep it in a broadcast hub; drop it when
/// [`WsSender::send`] says the connection is closed.
#[derive(Clone)]
pub struct WsSender {
    pub(super) out: Arc<Outbound>,
}

impl fmt::Debug for WsSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsSender")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl WsSender {
    /// Queues `msg`. When the queue is full the slow-consumer policy
    /// applies: the oldest message is dropped, or the connection is closed.
    pub fn send(&self, msg: Message) -> Result<(), SendError> {
        self.out.push(msg, true)
    }

    pub fn is_closed(&self) -> bool {
        self.out.overflowed.load(Ordering::Relaxed) || self.out.lock().closed
    }
}
