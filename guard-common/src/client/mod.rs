//! The async client of the agent's control socket.
//!
//! Two ways in:
//!
//! * [`AgentClient`] for the app's hot path: [`AgentClient::report`] never
//!   waits. Reports go into a bounded queue that a background task drains
//!   into the agent, reconnecting with backoff when the agent is absent or
//!   restarting. Blocking is best effort by design: the app must keep
//!   serving whether or not the agent is there.
//! * [`Connection`] for request/response tools (the `guard` CLI, `cargo
//!   xtask tune`): one call at a time, each with a timeout, errors that say
//!   what to do.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;

use crate::addr::Prefix;
use crate::proto::{
    cap_str, ErrorCode, FrameDecoder, Message, ProtoError, Request, Response, MAX_DETAIL_LEN,
    MAX_NAME_LEN, PROTO_VERSION,
};

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
        Request::Block {
            prefix: self.prefix,
            ttl_secs,
            reason: self.reason,
            detected_at_unix_ns,
            detail: cap_str(&self.detail, MAX_DETAIL_LEN).to_string(),
        }
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
const MAX_ATTEMPTS: u8 = 3;

struct Pending {
    report: BlockReport,
    attempts: u8,
}

/// Reports in arrival order; `pending` holds each queued prefix once so a
/// duplicate merges instead of taking a slot.
struct Queue {
    order: VecDeque<Prefix>,
    pending: HashMap<Prefix, Pending>,
    capacity: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the background task: a report was queued or the last handle
    /// went away.
    wake: Notify,
    sent: AtomicU64,
    failed: AtomicU64,
    merged: AtomicU64,
    dropped: AtomicU64,
    idle_closes: AtomicU64,
    connected: AtomicBool,
    /// The background task has ended (or its runtime dropped it).
    task_gone: AtomicBool,
    /// Every [`AgentClient`] handle is gone.
    handles_gone: AtomicBool,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock, and the queue is consistent
        // between statements, so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pop(&self) -> Option<Pending> {
        let mut q = self.queue();
        let prefix = q.order.pop_front()?;
        q.pending.remove(&prefix)
    }

    /// Puts an in-flight report back at the front, or folds it into a
    /// duplicate queued meanwhile. Returns false when it has used up its
    /// attempts.
    fn requeue(&self, mut p: Pending) -> bool {
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

/// Reconnect delays: doubling from `min` to `max`, each drawn uniformly
/// from the upper half of the current step so many apps restarted together
/// do not reconnect in lockstep.
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration, seed: u64) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            step: min,
            // xorshift never leaves zero.
            rng: seed | 1,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng % spread.saturating_add(1))
    }

    fn reset(&mut self) {
        self.step = self.min;
    }
}

/// Tracks outages so each one is logged once, not per reconnect attempt.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    attempts: u64,
}

impl Outage {
    /// A failed connect or a lost session; true when this starts an outage
    /// (and so should be logged).
    fn failed(&mut self) -> bool {
        self.attempts += 1;
        if self.since.is_none() {
            self.since = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// A session is up; how long the outage that ended lasted and how many
    /// attempts it took, if there was one.
    fn recovered(&mut self) -> Option<(Duration, u64)> {
        let since = self.since.take()?;
        let attempts = core::mem::take(&mut self.attempts);
        Some((since.elapsed(), attempts))
    }
}

fn random_seed() -> u64 {
    // RandomState is seeded per process from the OS; no extra crate needed
    // for jitter.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// How a session ended.
enum SessionEnd {
    /// Every handle is gone and the queue is drained.
    Finished,
    /// The agent closed the session while nothing was in flight, as it
    /// does after its idle timeout (or when it stops).
    Idle,
    Lost(ClientError),
}

async fn run(shared: &Shared, cfg: &ClientConfig) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max, random_seed());
    let mut outage = Outage::default();
    let path = cfg.socket_path.display();
    loop {
        if shared.handles_gone.load(Ordering::Acquire) {
            return;
        }
        let err = match Connection::connect_with_timeout(
            &cfg.socket_path,
            &cfg.client_name,
            cfg.request_timeout,
        )
        .await
        {
            Ok(conn) => {
                match outage.recovered() {
                    Some((took, attempts)) => log::info!(
                        "guard agent at {path} reachable again after {took:.1?} ({attempts} attempts); \
                         sending {} queued reports",
                        shared.queue().order.len()
                    ),
                    None => log::debug!("connected to the guard agent at {path}"),
                }
                backoff.reset();
                shared.connected.store(true, Ordering::Relaxed);
                let end = session(shared, conn).await;
                shared.connected.store(false, Ordering::Relaxed);
                match end {
                    SessionEnd::Finished => return,
                    SessionEnd::Idle => {
                        shared.idle_closes.fetch_add(1, Ordering::Relaxed);
                        log::debug!(
                            "the guard agent at {path} closed an idle session; reconnecting \
                             with the next report"
                        );
                        // Not an outage: no backoff, no warning. Should the
                        // agent be gone, the next connect says so.
                        if !wait_for_report(shared).await {
                            return;
                        }
                        continue;
                    }
                    SessionEnd::Lost(e) => e,
                }
            }
            Err(e) => e,
        };
        if outage.failed() {
            log::warn!(
                "guard agent unavailable: {err}; block reports are queued (up to {}) and \
                 retried in the background",
                cfg.queue_capacity
            );
        } else {
            log::debug!("guard agent still unavailable: {err}");
        }
        if !sleep_unless_dropped(shared, backoff.next_delay()).await {
            return;
        }
    }
}

/// Waits until a report is queued; false if every handle went away with
/// nothing queued.
async fn wait_for_report(shared: &Shared) -> bool {
    loop {
        if !shared.queue().order.is_empty() {
            return true;
        }
        if shared.handles_gone.load(Ordering::Acquire) {
            return false;
        }
        shared.wake.notified().await;
    }
}

/// Sleeps for `delay`; false if every handle went away meanwhile. New
/// reports do not cut the sleep short, or a busy app would defeat the
/// backoff.
async fn sleep_unless_dropped(shared: &Shared, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            () = shared.wake.notified() => {
                if shared.handles_gone.load(Ordering::Acquire) {
                    return false;
                }
            }
        }
    }
}

/// Sends queued reports one at a time until the connection fails or every
/// handle is gone and the queue is empty.
async fn session(shared: &Shared, mut conn: Connection) -> SessionEnd {
    let mut warned = false;
    loop {
        let Some(p) = shared.pop() else {
            if shared.handles_gone.load(Ordering::Acquire) {
                return SessionEnd::Finished;
            }
            tokio::select! {
                () = shared.wake.notified() => continue,
                e = conn.wait_for_close() => return match e {
                    ClientError::Closed { .. } => SessionEnd::Idle,
                    e => SessionEnd::Lost(e),
                },
            }
        };
        match conn.call(p.report.to_request()).await {
            Ok(Response::BlockResult {
                outcome,
                reason_text,
                ..
            }) => {
                shared.sent.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "agent {outcome} block of {}: {reason_text}",
                    p.report.prefix
                );
            }
            Ok(other) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                return SessionEnd::Lost(ClientError::Unexpected {
                    path: conn.path.clone(),
                    got: other.name(),
                });
            }
            Err(ClientError::Agent { code, message }) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                // One warning per session: an agent that refuses this client
                // refuses every report, and the count says how many.
                if !warned {
                    warned = true;
                    log::warn!(
                        "guard agent refused a block report for {} ({code}): {message}",
                        p.report.prefix
                    );
                }
            }
            Err(e) => {
                if !shared.requeue(p) {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
                return SessionEnd::Lost(e);
            }
        }
    }
}

/// What went wrong talking to the agent, phrased as what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent listening at {}: is `guard run` running? ({source})",
        .path.display()
    )]
    NoAgent { path: PathBuf, source: io::Error },
    #[error(
        "permission denied opening {}: your uid/gid is not allowed on the agent's control \
         socket (run as root or as a member of the socket's group)",
        .path.display()
    )]
    PermissionDenied { path: PathBuf, source: io::Error },
    #[error("connecting to the agent at {} failed: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("the agent at {} closed the connection{}", .path.display(), closed_hint(*.during_handshake))]
    Closed {
        path: PathBuf,
        during_handshake: bool,
    },
    #[error(
        "talking to the agent at {} failed: {source}; it may have restarted, try again",
        .path.display()
    )]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "the agent at {} did not answer within {timeout:?}; it may be overloaded or stuck \
         (see its log)",
        .path.display()
    )]
    Timeout { path: PathBuf, timeout: Duration },
    #[error(
        "the agent at {} sent a malformed frame: {source}; are the agent and this client the \
         same version?",
        .path.display()
    )]
    Protocol { path: PathBuf, source: ProtoError },
    #[error(
        "the agent at {} answered with an unexpected `{got}` message; are the agent and this \
         client the same version?",
        .path.display()
    )]
    Unexpected { path: PathBuf, got: &'static str },
    #[error(
        "the agent at {} speaks protocol version {agent}, this client speaks {PROTO_VERSION}: \
         upgrade the older side",
        .path.display()
    )]
    VersionMismatch { path: PathBuf, agent: u16 },
    #[error("the agent refused the request ({code}): {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("cannot encode the request: {0}")]
    Encode(ProtoError),
    #[error(
        "the connection to {} is unusable after an earlier failure; connect again",
        .path.display()
    )]
    Broken { path: PathBuf },
    #[error("AgentClient::spawn needs a tokio runtime; call it from within one")]
    NoRuntime,
}

fn closed_hint(during_handshake: bool) -> &'static str {
    if during_handshake {
        " during the handshake: your uid/gid is probably not allowed on the control socket, \
         or the agent is at its connection limit (see the agent's log)"
    } else {
        "; it may have restarted, try again"
    }
}

/// A request/response session with the agent.
pub struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder,
    out: BytesMut,
    path: PathBuf,
    timeout: Duration,
    agent_version: String,
    /// A call failed part-way; the stream may hold a late answer, so the
    /// next call could read the wrong one.
    broken: bool,
}

impl Connection {
    /// Connects and shakes hands, allowing 2 s for each step.
    pub async fn connect(
        path: impl AsRef<Path>,
        client_name: &str,
    ) -> Result<Connection, ClientError> {
        Self::connect_with_timeout(path, client_name, Duration::from_secs(2)).await
    }

    /// Connects and shakes hands; `timeout` also applies to every later
    /// [`Connection::call`].
    pub async fn connect_with_timeout(
        path: impl AsRef<Path>,
        client_name: &str,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(&path)).await {
            Err(_) => return Err(ClientError::Timeout { path, timeout }),
            Ok(Err(source)) => {
                return Err(match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        ClientError::NoAgent { path, source }
                    }
                    io::ErrorKind::PermissionDenied => {
                        ClientError::PermissionDenied { path, source }
                    }
                    _ => ClientError::Connect { path, source },
                })
            }
            Ok(Ok(s)) => s,
        };
        let mut conn = Connection {
            stream,
            decoder: FrameDecoder::new(),
            out: BytesMut::new(),
            path,
            timeout,
            agent_version: String::new(),
            broken: false,
        };
        let hello = Request::Hello {
            version: PROTO_VERSION,
            client_name: cap_str(client_name, MAX_NAME_LEN).to_string(),
        };
        match conn.exchange(hello, true).await? {
            Response::HelloOk {
                version,
                agent_version,
            } => {
                if version != PROTO_VERSION {
                    return Err(ClientError::VersionMismatch {
                        path: conn.path,
                        agent: version,
                    });
                }
                conn.agent_version = agent_version;
                Ok(conn)
            }
            other => Err(ClientError::Unexpected {
                path: conn.path,
                got: other.name(),
            }),
        }
    }

    /// The agent's version string from the handshake.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one request and returns its answer. An `Error` answer comes
    /// back as [`ClientError::Agent`] and leaves the connection usable; any
    /// other failure leaves it [`ClientError::Broken`].
    pub async fn call(&mut self, req: Request) -> Result<Response, ClientError> {
        self.exchange(req, false).await
    }

    async fn exchange(&mut self, req: Request, handshake: bool) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Broken {
                path: self.path.clone(),
            });
        }
        self.out.clear();
        req.encode(&mut self.out).map_err(ClientError::Encode)?;
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, self.send_and_read(handshake)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                path: self.path.clone(),
                timeout,
            }),
        };
        match result {
            Ok(Response::Error { code, message }) => Err(ClientError::Agent { code, message }),
            Ok(r) => Ok(r),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    async fn send_and_read(&mut self, handshake: bool) -> Result<Response, ClientError> {
        if let Err(source) = self.stream.write_all(&self.out).await {
            return Err(self.io_error(source, handshake));
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.decoder.decode() {
                Ok(Some(Message::Response(r))) => return Ok(r),
                Ok(Some(Message::Request(r))) => {
                    return Err(ClientError::Unexpected {
                        path: self.path.clone(),
                        got: r.name(),
                    })
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
            match self.stream.read(&mut buf).await {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        path: self.path.clone(),
                        during_handshake: handshake,
                    })
                }
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(source) => return Err(self.io_error(source, handshake)),
            }
        }
    }

    fn io_error(&self, source: io::Error, handshake: bool) -> ClientError {
        // A peer the agent refused is closed before it reads a byte, so the
        // handshake can fail on the write as well as on the read.
        if matches!(
            source.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return ClientError::Closed {
                path: self.path.clone(),
                during_handshake: handshake,
            };
        }
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Resolves when the agent closes an idle session (or sends something
    /// unasked, which this protocol never does). Cancel-safe: nothing is
    /// lost if a report arrives first and this is dropped.
    async fn wait_for_close(&mut self) -> ClientError {
        let mut buf = [0u8; 64];
        let read = self.stream.read(&mut buf).await;
        self.broken = true;
        match read {
            Ok(0) => ClientError::Closed {
                path: self.path.clone(),
                during_handshake: false,
            },
            Ok(_) => ClientError::Unexpected {
                path: self.path.clone(),
                got: "unsolicited",
            },
            Err(source) => self.io_error(source, false),
        }
    }
}

#[cfg(test)]
mod tests;
