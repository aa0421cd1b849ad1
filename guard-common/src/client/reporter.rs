//! The app's side of reporting: a handle that queues block reports without
//! waiting, and the queue and counters it shares with the background task
//! (`super::task`) that sends them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::string::{String, ToString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::task::run;
use super::ClientError;
use crate::addr::Prefix;
use crate::proto::{cap_str, BlockRequest, Request, MAX_DETAIL_LEN};

/// How an [`AgentClient`] reaches the agent.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub socket_path: PathBuf,
    /// Sent in the handshake; the agent records it as the origin of blocks.
    pub client_name: String,
    /// Reports waiting for the agent; beyond this `report` refuses.
    pub queue_capacity: usize,
    /// Reconnect delays grow from `backoff_min` to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest wait for a connect, the handshake or one answer.
    pub request_timeout: Duration,
}

impl ClientConfig {
    pub fn new(socket_path: impl Into<PathBuf>, client_name: impl Into<String>) -> Self {
        Self {
            socket_path: socket_path.into(),
            client_name: client_name.into(),
            queue_capacity: 1024,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            request_timeout: Duration::from_secs(2),
        }
    }
}

/// A request to block a prefix, as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockReport {
    pub prefix: Prefix,
    /// How long the block should last; zero leaves it to the agent's
    /// default. Rounded up to whole seconds.
    pub ttl: Duration,
    /// A code from [`crate::state::reason`].
    pub reason: u32,
    /// When the abuse was seen; a time before the epoch reads as unknown.
    pub detected_at: SystemTime,
    /// Free text for the audit log; cut to [`MAX_DETAIL_LEN`] bytes.
    pub detail: String,
}

impl BlockReport {
    /// A report detected now.
    pub fn new(prefix: Prefix, ttl: Duration, reason: u32, detail: impl Into<String>) -> Self {
        Self {
            prefix,
            ttl,
            reason,
            detected_at: SystemTime::now(),
            detail: detail.into(),
        }
    }

    /// The wire request for this report.
    pub fn to_request(&self) -> Request {
        let ttl_secs = if self.ttl.is_zero() {
            0
        } else {
            // Rounded up so a sub-second TTL does not turn into "default".
            let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        };
        let detected_at_unix_ns = self
            .detected_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Request::Block(BlockRequest {
            prefix: self.prefix,
            ttl_secs,
            reason: self.reason,
            detected_at_unix_ns,
            detail: cap_str(&self.detail, MAX_DETAIL_LEN).to_string(),
        })
    }

    /// Folds a duplicate into this report: the longest TTL (zero, the
    /// agent's default, loses to any explicit TTL) and the earliest
    /// detection win; the reason and detail of the first report stay.
    fn merge(&mut self, other: BlockReport) {
        self.ttl = self.ttl.max(other.ttl);
        self.detected_at = self.detected_at.min(other.detected_at);
    }
}

/// Why [`AgentClient::report`] did not queue a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the agent report queue is full (the agent is absent or slow); report dropped")]
    QueueFull,
    #[error("the agent client has shut down (its runtime is gone); report dropped")]
    Closed,
}

/// A snapshot of an [`AgentClient`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Reports the agent answered (added, merged or refused by its policy).
    pub sent: u64,
    /// Reports the agent answered with an error, or that were lost after
    /// repeated connection failures while in flight.
    pub failed: u64,
    /// Reports folded into one already queued for the same prefix.
    pub merged: u64,
    /// Reports refused by `report` (queue full or client shut down).
    pub dropped: u64,
    /// Sessions the agent closed while they were idle (its idle timeout):
    /// not an outage; the client reconnects when it next has a report.
    pub idle_closes: u64,
    /// Whether a session with the agent is up right now.
    pub connected: bool,
    /// Reports waiting in the queue.
    pub queued: usize,
}

/// How often an in-flight report is retried over fresh connections before
/// it counts as failed; stops one report that kills the agent from doing so
/// forever.
pub(super) const MAX_ATTEMPTS: u8 = 3;

pub(super) struct Pending {
    pub(super) report: BlockReport,
    attempts: u8,
}

/// Reports in arrival order; `pending` holds each queued prefix once so a
/// duplicate merges instead of taking a slot.
pub(super) struct Queue {
    pub(super) order: VecDeque<Prefix>,
    pending: HashMap<Prefix, Pending>,
    capacity: usize,
}

pub(super) struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the background task: a report was queued or the last handle
    /// went away.
    pub(super) wake: Notify,
    pub(super) sent: AtomicU64,
    pub(super) failed: AtomicU64,
    merged: AtomicU64,
    dropped: AtomicU64,
    pub(super) idle_closes: AtomicU64,
    pub(super) connected: AtomicBool,
    /// The background task has ended (or its runtime dropped it).
    task_gone: AtomicBool,
    /// Every [`AgentClient`] handle is gone.
    pub(super) handles_gone: AtomicBool,
}

impl Shared {
    pub(super) fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock, and the queue is consistent
        // between statements, so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn pop(&self) -> Option<Pending> {
        let mut q = self.queue();
        let prefix = q.order.pop_front()?;
        q.pending.remove(&prefix)
    }

    /// Puts an in-flight report back at the front, or folds it into a
    /// duplicate queued meanwhile. Returns false when it has used up its
    /// attempts.
    pub(super) fn requeue(&self, mut p: Pending) -> bool {
        p.attempts += 1;
        if p.attempts >= MAX_ATTEMPTS {
            return false;
        }
        let mut q = self.queue();
        let prefix = p.report.prefix;
        if let Some(queued) = q.pending.get_mut(&prefix) {
            queued.report.merge(p.report);
        } else {
            q.order.push_front(prefix);
            q.pending.insert(prefix, p);
        }
        true
    }
}

/// Marks the task gone however it ends, including when its runtime shuts
/// down and drops it mid-await.
struct TaskAlive(Arc<Shared>);

impl Drop for TaskAlive {
    fn drop(&mut self) {
        self.0.connected.store(false, Ordering::Relaxed);
        self.0.task_gone.store(true, Ordering::Release);
    }
}

/// Shared by every clone of an [`AgentClient`]; the last one to go tells
/// the background task to finish.
struct HandleGuard(Arc<Shared>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.0.handles_gone.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }
}

/// The app's handle on the agent: cheap to clone, never blocks.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
    _guard: Arc<HandleGuard>,
}

impl AgentClient {
    /// Starts the background task on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`; [`AgentClient::try_spawn`]
    /// returns an error instead.
    pub fn spawn(cfg: ClientConfig) -> AgentClient {
        match Self::try_spawn(cfg) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`AgentClient::spawn`], or an error outside a tokio runtime.
    pub fn try_spawn(cfg: ClientConfig) -> Result<AgentClient, ClientError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                order: VecDeque::new(),
                pending: HashMap::new(),
                capacity: cfg.queue_capacity,
            }),
            wake: Notify::new(),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            merged: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            idle_closes: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            task_gone: AtomicBool::new(false),
            handles_gone: AtomicBool::new(false),
        });
        let alive = TaskAlive(shared.clone());
        rt.spawn(async move { run(&alive.0, &cfg).await });
        Ok(AgentClient {
            _guard: Arc::new(HandleGuard(shared.clone())),
            shared,
        })
    }

    /// Queues a report for the agent without waiting. A report for a prefix
    /// that is already queued merges into it (see [`BlockReport`]'s fields)
    /// and takes no slot.
    pub fn report(&self, mut r: BlockReport) -> Result<(), ReportError> {
        let s = &self.shared;
        if s.task_gone.load(Ordering::Acquire) {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ReportError::Closed);
        }
        let cut = cap_str(&r.detail, MAX_DETAIL_LEN).len();
        r.detail.truncate(cut);
        {
            let mut q = s.queue();
            if let Some(queued) = q.pending.get_mut(&r.prefix) {
                queued.report.merge(r);
                s.merged.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            if q.order.len() >= q.capacity {
                s.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(ReportError::QueueFull);
            }
            let prefix = r.prefix;
            q.order.push_back(prefix);
            q.pending.insert(
                prefix,
                Pending {
                    report: r,
                    attempts: 0,
                },
            );
        }
        s.wake.notify_one();
        Ok(())
    }

    pub fn stats(&self) -> ClientStats {
        let s = &self.shared;
        ClientStats {
            sent: s.sent.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            merged: s.merged.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            idle_closes: s.idle_closes.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed),
            queued: s.queue().order.len(),
        }
    }
}

impl core::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AgentClient")
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::reason;

    #[test]
    fn report_to_request_rounds_and_clamps() {
        let p: Prefix = "198.18.0.1".parse().unwrap();
        let secs = |ttl: Duration| {
            let mut r = BlockReport::new(p, ttl, reason::OPERATOR, "");
            r.detected_at = UNIX_EPOCH - Duration::from_secs(1);
            match r.to_request() {
                Request::Block(block) => {
                    assert_eq!(
                        block.detected_at_unix_ns, 0,
                        "before the epoch reads as unknown"
                    );
                    block.ttl_secs
                }
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(secs(Duration::ZERO), 0);
        assert_eq!(secs(Duration::from_nanos(1)), 1);
        assert_eq!(secs(Duration::from_secs(59)), 59);
        assert_eq!(secs(Duration::from_secs(u64::MAX)), u32::MAX);
    }
}
