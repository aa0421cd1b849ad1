//! guard's own server: what an app runs instead of `warp::serve`, so that
//! slow, idle and multiplexed connections cannot exhaust it.
//!
//! `warp::serve` (0.4.3) runs hyper without a timer, so hyper's
//! `header_read_timeout` is silently off; nothing bounds connections that
//! never finish a request or idle between requests; and its accept loop
//! sleeps a second on every EMFILE. This server owns the accept loop and
//! hyper's settings instead:
//!
//! * **Deadlines** with a real timer, and a sweeper of its own that closes
//!   waiting connections past their deadline whatever hyper does.
//! * **A budget of waiting connections** (accepted and no request in
//!   flight), global, per source and per network; when full, the one that
//!   has waited longest goes, so a prompt client always gets in.
//! * **Descriptors**: the soft limit raised to the hard one, waiting
//!   connections shed first when few are left, and a reserve descriptor so
//!   that a full table never stops the accept loop.
//! * **HTTP/2** off unless asked for, with explicit bounds when on.
//! * **Offenders**: sources whose half-sent heads keep being closed are
//!   reported to the agent (`slow_connections`).
//!
//! Every request is handed to the app's filter with a [`Served`] in its
//! extensions (the peer's address and the connection's upgrade), which the
//! guard's filters read. All knobs are in [`ServerLimits`].

mod fd;
mod handoff;
mod limits;
mod metrics;
mod offenders;
#[cfg(feature = "tls")]
mod tls;
mod waiting;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
// Not the std prelude: its `panic` would be ambiguous with core's inside
// tokio::select! in this no_std crate.
use std::boxed::Box;
use std::format;
#[cfg(feature = "tls")]
use std::string::String;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use std::vec::Vec;

use futures_util::future::{self, BoxFuture};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower_service::Service as _;
use warp::reply::Reply;
use warp::Filter;

pub use limits::{Http2Limits, ServerLimits};
pub use metrics::ServerClose;
#[cfg(feature = "tls")]
pub use tokio_rustls::rustls;

use super::served::Served;
use super::{Guard, GuardError};
use crate::addr::Prefix;
use crate::state::reason;
use handoff::{HandOff, Parked};
use metrics::{AcceptError, ServerMetrics};
use offenders::Offenders;
use waiting::{Caps, Eviction, Phase, Waiting};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another process on that port?)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot read the listener's own address: {0}")]
    LocalAddr(io::Error),
    #[cfg(feature = "tls")]
    #[error("cannot read the TLS {what} from {}: {reason}", path.display())]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[cfg(feature = "tls")]
    #[error("the TLS certificate and key do not make a server configuration: {0}")]
    Tls(String),
}

/// The body type of warp's responses, which warp does not name.
trait BodyOf {
    type Body;
}

impl<B> BodyOf for Response<B> {
    type Body = B;
}

type WarpBody = <warp::reply::Response as BodyOf>::Body;

/// The app's filter as one request handler, so the server is not generic.
type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, warp::reply::Response> + Send + Sync>;

/// How often the sweeper recounts descriptors and forgets old offenders.
const FD_RECOUNT: Duration = Duration::from_secs(1);
/// Waiting connections closed at once when `accept` runs out of
/// descriptors.
const EMFILE_SHED_BATCH: usize = 16;
/// Waiting connections closed per accept while headroom is under the low
/// water mark: more than one, so headroom grows back under a steady stream.
const LOW_WATER_SHED_BATCH: usize = 2;
/// How long the accept loop waits for shed connections to give their
/// descriptors back before it tries `accept` again.
const FREED_WAIT: Duration = Duration::from_millis(100);
/// A pause after an accept error that is not about descriptors or one
/// connection (ENOBUFS, ENOMEM), so the loop does not spin on it.
const OTHER_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How much later than the sweeper's deadlines hyper's own header timer
/// fires.
const HYPER_HEAD_BACKSTOP: Duration = Duration::from_secs(1);
/// At most one warning per this long for descriptor exhaustion.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The server state one [`Guard`] shares between all its servers: the
/// waiting budget is one budget however many listeners feed it.
pub(crate) struct ServerShared {
    limits: ServerLimits,
    metrics: ServerMetrics,
    waiting: Mutex<Waiting<Arc<Conn>>>,
    offenders: Mutex<Offenders>,
    /// Connection descriptors open now (sockets accepted and not dropped,
    /// upgraded ones included).
    live: AtomicU64,
    /// Other descriptors of the process, as of the sweeper's last count.
    baseline: AtomicU64,
    soft_limit: AtomicU64,
    /// A connection's descriptor was closed.
    freed: Notify,
    last_fd_warning_ns: AtomicU64,
}

impl ServerShared {
    pub fn new(
        limits: ServerLimits,
        source_prefix_v4: u8,
        source_prefix_v6: u8,
        registry: Option<&Registry>,
    ) -> Result<Self, GuardError> {
        limits.validate_with(source_prefix_v4, source_prefix_v6)?;
        let caps = Caps {
            global: limits.max_waiting,
            per_source: limits.max_waiting_per_source,
            per_network: limits.max_waiting_per_network,
            source_v4: source_prefix_v4,
            source_v6: source_prefix_v6,
            network_v4: limits.network_prefix_v4,
            network_v6: limits.network_prefix_v6,
        };
        let offenders = Offenders::new(
            limits.offender_threshold,
            super::admission::duration_ns(limits.offender_window),
            limits.max_tracked_offenders,
        );
        Ok(Self {
            metrics: ServerMetrics::new(registry)?,
            waiting: Mutex::new(Waiting::new(caps)),
            offenders: Mutex::new(offenders),
            live: AtomicU64::new(0),
            baseline: AtomicU64::new(0),
            soft_limit: AtomicU64::new(u64::MAX),
            freed: Notify::new(),
            last_fd_warning_ns: AtomicU64::new(0),
            limits,
        })
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    fn lock_waiting(&self) -> MutexGuard<'_, Waiting<Arc<Conn>>> {
        // Every update leaves the table consistent and nothing panics under
        // the lock, so a poisoned lock is still good.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deadline(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Head => self.limits.head_timeout,
            Phase::Idle => self.limits.keep_alive_idle,
        }
    }

    /// Puts `conn` in the budget (unless it is busy, done or closing),
    /// closing whoever must go to make room.
    fn enter(&self, guard: &Guard, conn: &Arc<Conn>, phase: Phase) {
        let deadline = guard.now_ns() + super::admission::duration_ns(self.deadline(phase));
        let mut evicted = Vec::new();
        {
            let mut table = self.lock_waiting();
            if conn.in_flight.load(Ordering::Relaxed) > 0
                || conn.done.load(Ordering::Relaxed)
                || conn.closing.load(Ordering::Relaxed) != 0
            {
                return;
            }
            conn.bytes_at_wait
                .store(conn.bytes_read.load(Ordering::Relaxed), Ordering::Relaxed);
            let seq = table.enter(
                conn.remote.ip(),
                phase,
                deadline,
                conn.clone(),
                &mut evicted,
            );
            conn.seq.store(seq, Ordering::Relaxed);
            self.metrics.waiting.set(table.len() as i64);
        }
        for (victim, why) in evicted {
            let reason = match why {
                Eviction::Prefix => ServerClose::BudgetPrefix,
                Eviction::Global => ServerClose::BudgetGlobal,
            };
            self.close_by_server(guard, &victim, reason);
        }
    }

    /// `conn` has a request in flight: it no longer waits.
    fn begin_request(&self, conn: &Conn) {
        let mut table = self.lock_waiting();
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let seq = conn.seq.swap(0, Ordering::Relaxed);
        if seq != 0 {
            table.leave(seq);
            self.metrics.waiting.set(table.len() as i64);
        }
    }

    /// A response of `conn` is done (sent, or abandoned); with none left in
    /// flight it waits again, under the idle deadline.
    fn end_request(&self, guard: &Guard, conn: &Arc<Conn>) {
        let idle = {
            let _table = self.lock_waiting();
            conn.in_flight.fetch_sub(1, Ordering::Relaxed) == 1
        };
        if idle {
            self.enter(guard, conn, Phase::Idle);
        }
    }

    /// `conn` ended; it leaves the budget if it was in it.
    fn leave(&self, conn: &Conn) {
        let seq = conn.seq.swap(0, Ordering::Relaxed);
        if seq != 0 {
            let mut table = self.lock_waiting();
            table.leave(seq);
            self.metrics.waiting.set(table.len() as i64);
        }
    }

    /// Closes waiting connections past their deadline.
    fn sweep(&self, guard: &Guard) {
        let mut expired = Vec::new();
        {
            let mut table = self.lock_waiting();
            table.expire(guard.now_ns(), &mut expired);
            self.metrics.waiting.set(table.len() as i64);
        }
        for (conn, phase) in expired {
            let reason = match phase {
                Phase::Head => ServerClose::HeadDeadline,
                Phase::Idle => ServerClose::IdleDeadline,
            };
            self.close_by_server(guard, &conn, reason);
        }
    }

    /// Closes the `n` longest-waiting connections to free descriptors;
    /// how many there were.
    fn shed(&self, guard: &Guard, n: usize) -> usize {
        let mut shed = Vec::new();
        {
            let mut table = self.lock_waiting();
            table.shed_oldest(n, &mut shed);
            self.metrics.waiting.set(table.len() as i64);
        }
        for conn in &shed {
            self.close_by_server(guard, conn, ServerClose::FdShed);
        }
        shed.len()
    }

    fn close_by_server(&self, guard: &Guard, conn: &Conn, reason: ServerClose) {
        if !conn.close(reason) {
            return;
        }
        self.metrics.closed(reason).inc();
        log::debug!("closed {} ({})", conn.remote, reason.label());
        if conn.sent_partial_head() {
            self.strike(guard, conn.remote.ip(), reason);
        }
    }

    fn strike(&self, guard: &Guard, ip: IpAddr, reason: ServerClose) {
        let limits = guard.limits();
        let source = Prefix::of(
            ip.to_canonical(),
            limits.source_prefix_v4,
            limits.source_prefix_v6,
        );
        let offender = self
            .offenders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .strike(source, guard.now_ns());
        if offender {
            let detail = format!(
                "{} connections closed with a partial request head within {:?} (last: {})",
                self.limits.offender_threshold,
                self.limits.offender_window,
                reason.label()
            );
            guard.report_source(ip, reason::SLOW_CONNECTIONS, detail);
        }
    }

    /// Descriptors left before the soft limit, by the server's own count.
    fn headroom(&self) -> i64 {
        let soft = self.soft_limit.load(Ordering::Relaxed);
        let open = self
            .baseline
            .load(Ordering::Relaxed)
            .saturating_add(self.live.load(Ordering::Relaxed));
        let headroom = i128::from(soft) - i128::from(open);
        i64::try_from(headroom).unwrap_or(if headroom < 0 { i64::MIN } else { i64::MAX })
    }

    /// Recounts the process's descriptors and re-reads the limit.
    fn recount_fds(&self) {
        self.soft_limit.store(fd::soft_limit(), Ordering::Relaxed);
        if let Some(open) = fd::count_open() {
            let live = self.live.load(Ordering::Relaxed);
            self.baseline
                .store(open.saturating_sub(live), Ordering::Relaxed);
        }
        self.metrics.fd_headroom.set(self.headroom());
    }

    fn warn_fds(&self, guard: &Guard, what: &str) {
        let now = guard.now_ns();
        let last = self.last_fd_warning_ns.load(Ordering::Relaxed);
        let every = super::admission::duration_ns(WARN_EVERY);
        if (last == 0 || now.saturating_sub(last) >= every)
            && self
                .last_fd_warning_ns
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "{what}: shedding waiting connections (soft limit {}, see guard_app_server_fd_headroom)",
                self.soft_limit.load(Ordering::Relaxed)
            );
        }
    }
}

/// One accepted connection, as the budget, the sweeper and its own task
/// see it.
struct Conn {
    remote: SocketAddr,
    /// Its place in the waiting table, 0 when not waiting. Changed under
    /// the table's lock.
    seq: AtomicU64,
    /// Requests whose response is not done yet. Changed under the table's
    /// lock.
    in_flight: AtomicU32,
    /// Never waits again: it switched protocols (a WebSocket, governed by
    /// its admission permit from now on), or its last response closes it.
    done: AtomicBool,
    /// Why the server is closing it (a [`ServerClose`] code), 0 if not.
    closing: AtomicU8,
    close: Notify,
    /// Bytes the peer sent, and how many it had sent when it last started
    /// waiting: more since means a request head is half sent.
    bytes_read: AtomicU64,
    bytes_at_wait: AtomicU64,
    /// Its event streams may leave hyper after their head (HTTP/1 only).
    hands_off: bool,
    handoff: HandOff,
}

impl Conn {
    fn new(remote: SocketAddr, hands_off: bool) -> Self {
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
    fn close(&self, reason: ServerClose) -> bool {
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

    fn sent_partial_head(&self) -> bool {
        self.bytes_read.load(Ordering::Relaxed) > self.bytes_at_wait.load(Ordering::Relaxed)
    }
}

/// Holds a request of a connection in flight until its response is done,
/// however it ends (sent, failed, or the connection dropped).
struct InFlight {
    guard: Guard,
    conn: Arc<Conn>,
}

impl InFlight {
    fn begin(guard: Guard, conn: Arc<Conn>) -> Self {
        guard.inner.server.begin_request(&conn);
        Self { guard, conn }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.guard.inner.server.end_request(&self.guard, &self.conn);
    }
}

/// A response body that keeps its request in flight until it ends, so an
/// SSE stream (a response that never ends) never counts as waiting.
struct Tracked<B> {
    body: B,
    in_flight: Option<InFlight>,
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
enum Outgoing {
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

/// The socket (under TLS, if any): counts what the peer sends, and gives
/// the descriptor back to the server's count when dropped (for an upgraded
/// connection, when the WebSocket ends).
struct CountingIo<I> {
    io: I,
    conn: Arc<Conn>,
    _ticket: FdTicket,
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
struct FdTicket(Guard);

impl FdTicket {
    fn new(guard: Guard) -> Self {
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

/// Aborts the sweeper when the server stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Guard {
    /// Serves `filter` with guard's own server (see [`ServerLimits`]);
    /// the shapes of `warp::serve`: `.run(addr)`, `.bind(addr)`,
    /// `.incoming(listener)`, `.graceful(signal)`, and TLS.
    pub fn serve<F>(&self, filter: F) -> Server
    where
        F: Filter + Clone + Send + Sync + 'static,
        F::Extract: Reply,
    {
        let service = warp::service(filter);
        let handler: Handler = Arc::new(move |req| {
            let mut service = service.clone();
            Box::pin(async move {
                match service.call(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            })
        });
        Server {
            guard: self.clone(),
            handler,
            #[cfg(feature = "tls")]
            tls: None,
            shutdown: None,
        }
    }

    /// The server limits this guard was built with.
    pub fn server_limits(&self) -> &ServerLimits {
        self.inner.server.limits()
    }
}

/// A server for one app filter; built by [`Guard::serve`].
#[must_use = "a server does nothing until it is run"]
pub struct Server {
    guard: Guard,
    handler: Handler,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: Option<BoxFuture<'static, ()>>,
}

impl Server {
    /// Stops accepting when `signal` completes, lets requests in flight
    /// finish for up to [`ServerLimits::shutdown_grace`] (an SSE stream
    /// never finishes by itself), closes what is left, then returns.
    /// Upgraded WebSockets are the app's to end (as with `warp::serve`).
    pub fn graceful(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// Serves TLS with this rustls configuration. When it names no ALPN
    /// protocols, `http/1.1` is advertised (and `h2` first when HTTP/2 is
    /// on).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Serves TLS with a PEM certificate chain and private key.
    #[cfg(feature = "tls")]
    pub fn tls_pem(
        self,
        cert_path: impl AsRef<std::path::Path>,
        key_path: impl AsRef<std::path::Path>,
    ) -> Result<Self, ServeError> {
        let config = tls::config_from_pem(cert_path.as_ref(), key_path.as_ref())?;
        Ok(self.tls(Arc::new(config)))
    }

    /// Binds `addr` and serves until the graceful signal (forever without
    /// one).
    pub async fn run(self, addr: impl Into<SocketAddr>) -> Result<(), ServeError> {
        let (_, serving) = self.bind(addr).await?;
        serving.await;
        Ok(())
    }

    /// Binds `addr`; the address bound (the port, when `addr` asked for
    /// port 0) and the future that serves.
    pub async fn bind(
        self,
        addr: impl Into<SocketAddr>,
    ) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), ServeError> {
        let addr = addr.into();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = listener.local_addr().map_err(ServeError::LocalAddr)?;
        Ok((local, self.incoming(listener)))
    }

    /// Serves connections accepted on `listener`.
    pub fn incoming(self, listener: TcpListener) -> impl Future<Output = ()> + Send + 'static {
        self.serve_listener(listener)
    }

    async fn serve_listener(self, listener: TcpListener) {
        let Server {
            guard,
            handler,
            #[cfg(feature = "tls")]
            tls,
            shutdown,
        } = self;
        let shared = &guard.inner.server;
        let limits = shared.limits.clone();
        if limits.raise_nofile_limit {
            fd::raise_nofile_limit();
        }
        shared.recount_fds();
        #[cfg(feature = "tls")]
        let tls = tls.map(|config| {
            tokio_rustls::TlsAcceptor::from(tls::with_alpn(config, limits.http2.is_some()))
        });
        let protocols = Arc::new(Protocols::new(&limits));
        // Connections hold a receiver; the sender sees them all gone once
        // every connection has ended.
        let (stop, stopped) = watch::channel(Stop::Running);
        let _sweeper = AbortOnDrop(tokio::spawn(sweep(guard.clone())));
        let mut reserve = fd::Reserve::new();
        let mut shutdown = shutdown.unwrap_or_else(|| Box::pin(future::pending()));
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_failed(&guard, &listener, &mut reserve, e).await;
                    continue;
                }
            };
            shared.metrics.connections.inc();
            let ticket = FdTicket::new(guard.clone());
            let headroom = shared.headroom();
            shared.metrics.fd_headroom.set(headroom);
            if headroom < i64::from(limits.fd_low_water) {
                shared.warn_fds(&guard, "few descriptors left");
                shared.shed(&guard, LOW_WATER_SHED_BATCH);
            }
            let conn = Arc::new(Conn::new(remote, protocols.hands_off()));
            shared.enter(&guard, &conn, Phase::Head);
            let task = Connection {
                guard: guard.clone(),
                conn,
                handler: handler.clone(),
                protocols: protocols.clone(),
                stop: stopped.clone(),
            };
            #[cfg(feature = "tls")]
            if let Some(acceptor) = &tls {
                tokio::spawn(task.run_tls(acceptor.clone(), stream, ticket));
                continue;
            }
            tokio::spawn(task.run(stream, ticket));
        }
        drop(listener);
        drop(stopped);
        let _ = stop.send(Stop::Draining);
        if tokio::time::timeout(limits.shutdown_grace, stop.closed())
            .await
            .is_err()
        {
            log::info!(
                "closing the {} connections still open {:?} after the shutdown signal",
                stop.receiver_count(),
                limits.shutdown_grace
            );
            let _ = stop.send(Stop::Now);
            stop.closed().await;
        }
    }
}

/// hyper's connection settings. Without HTTP/2, hyper's HTTP/1 builder
/// itself: hyper-util's `auto::Builder::http1_only` does nothing once
/// upgrades are on (its own docs say so), so it would still serve h2c.
enum Protocols {
    Http1(hyper::server::conn::http1::Builder),
    Auto(auto::Builder<TokioExecutor>),
}

impl Protocols {
    /// Whether event streams leave hyper after their head: only hyper's
    /// HTTP/1 connection gives its socket back (`into_parts`).
    fn hands_off(&self) -> bool {
        matches!(self, Self::Http1(_))
    }

    fn new(limits: &ServerLimits) -> Self {
        // The sweeper closes (and counts, and strikes) slow heads at
        // head_timeout and idle connections at keep_alive_idle; hyper's
        // own timer is a backstop for what it might miss. hyper also runs
        // that timer while a keep-alive connection idles before its next
        // head, so it must not fire before keep_alive_idle either.
        let header_read_timeout =
            limits.head_timeout.max(limits.keep_alive_idle) + HYPER_HEAD_BACKSTOP;
        let Some(h2) = &limits.http2 else {
            let mut http1 = hyper::server::conn::http1::Builder::new();
            http1
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(limits.max_head_size)
                .max_headers(limits.max_headers)
                .keep_alive(true);
            return Self::Http1(http1);
        };
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(limits.max_head_size)
            .max_headers(limits.max_headers)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            .max_header_list_size(h2.max_header_list_size)
            .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(h2.max_local_error_reset_streams)
            .keep_alive_interval(h2.keep_alive_interval)
            .keep_alive_timeout(h2.keep_alive_timeout);
        Self::Auto(auto)
    }
}

/// A connection being served that can be asked to finish gracefully.
trait Serving: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, B> Serving for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;

    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Serving for auto::UpgradeableConnection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What the accept loop does when `accept` fails: never sleep on a full
/// descriptor table; free descriptors instead.
async fn accept_failed(
    guard: &Guard,
    listener: &TcpListener,
    reserve: &mut fd::Reserve,
    e: io::Error,
) {
    let shared = &guard.inner.server;
    let kind = match e.raw_os_error() {
        Some(libc::EMFILE) => AcceptError::ProcessFds,
        Some(libc::ENFILE) => AcceptError::SystemFds,
        _ if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) =>
        {
            AcceptError::Connection
        }
        _ => AcceptError::Other,
    };
    shared.metrics.accept_error(kind).inc();
    match kind {
        AcceptError::ProcessFds | AcceptError::SystemFds => {
            shared.warn_fds(guard, &format!("accept failed: {e}"));
            // Registered before shedding, so no release is missed.
            let freed = shared.freed.notified();
            if shared.shed(guard, EMFILE_SHED_BATCH) > 0 {
                let _ = tokio::time::timeout(FREED_WAIT, freed).await;
                return;
            }
            // Nothing waiting to shed: everything open is admitted. Take the
            // pending connection with the reserve descriptor and close it,
            // so the backlog drains and the loop keeps turning.
            if reserve.is_held() {
                let took = reserve.spend(|| accept_now(listener));
                if took {
                    shared.metrics.connections.inc();
                    shared.metrics.closed(ServerClose::FdShed).inc();
                }
                if took && reserve.is_held() {
                    return;
                }
            }
            // Not even the reserve: wait for any descriptor to come back.
            let _ = tokio::time::timeout(FREED_WAIT, shared.freed.notified()).await;
        }
        AcceptError::Connection => {}
        AcceptError::Other => {
            log::warn!("accept failed: {e}");
            tokio::time::sleep(OTHER_ERROR_PAUSE).await;
        }
    }
}

/// Accepts one pending connection if there is one, and closes it at once.
fn accept_now(listener: &TcpListener) -> bool {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    matches!(listener.poll_accept(&mut cx), Poll::Ready(Ok(_)))
}

/// Closes waiting connections past their deadline, keeps the descriptor
/// count honest and forgets old offenders.
async fn sweep(guard: Guard) {
    let shared = &guard.inner.server;
    let shortest = shared
        .limits
        .head_timeout
        .min(shared.limits.keep_alive_idle);
    let tick = (shortest / 8).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_recount = Duration::ZERO;
    loop {
        ticker.tick().await;
        shared.sweep(&guard);
        since_recount += tick;
        if since_recount >= FD_RECOUNT {
            since_recount = Duration::ZERO;
            shared.recount_fds();
            shared
                .offenders
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .prune(guard.now_ns());
        }
    }
}

/// One accepted connection's task.
struct Connection {
    guard: Guard,
    conn: Arc<Conn>,
    handler: Handler,
    protocols: Arc<Protocols>,
    stop: watch::Receiver<Stop>,
}

impl Connection {
    #[cfg(feature = "tls")]
    async fn run_tls(
        self,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
        ticket: FdTicket,
    ) {
        // Counted below TLS, so a client that stalls inside the handshake
        // has sent a partial head as far as strikes go...
        let counted = CountingIo {
            io: stream,
            conn: self.conn.clone(),
            _ticket: ticket,
        };
        // ...and the handshake is part of the head deadline: such a client
        // is closed like one that stalls in its head.
        let handshake = tokio::select! {
            done = acceptor.accept(counted) => done,
            () = self.conn.close.notified() => {
                self.guard.inner.server.leave(&self.conn);
                return;
            }
        };
        match handshake {
            Ok(stream) => {
                // A finished handshake is not a partial head: a browser's
                // TLS preconnect that sends no request is not held against
                // its source.
                let conn = &self.conn;
                conn.bytes_at_wait
                    .store(conn.bytes_read.load(Ordering::Relaxed), Ordering::Relaxed);
                self.serve(stream).await;
            }
            Err(e) => {
                log::debug!("TLS handshake with {} failed: {e}", self.conn.remote);
                self.guard.inner.server.metrics.tls_failures.inc();
                self.guard.inner.server.leave(&self.conn);
            }
        }
    }

    async fn run(self, stream: tokio::net::TcpStream, ticket: FdTicket) {
        let counted = CountingIo {
            io: stream,
            conn: self.conn.clone(),
            _ticket: ticket,
        };
        self.serve(counted).await;
    }

    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            guard,
            conn,
            handler,
            protocols,
            mut stop,
        } = self;
        let io = TokioIo::new(io);
        let service = {
            let (guard, conn) = (guard.clone(), conn.clone());
            hyper::service::service_fn(move |req| respond(&guard, &conn, &handler, req))
        };
        // Boxed so that the task's Send-ness is proven here, on concrete
        // types, rather than through the generic `drive`.
        let driving: BoxFuture<'_, ()> = match &*protocols {
            Protocols::Http1(http1) => Box::pin(async {
                let mut serving = http1.serve_connection(io, service).with_upgrades();
                let driven = drive(Pin::new(&mut serving), &conn, &mut stop).await;
                let parked = conn.handoff.take();
                if let (Driven::HandOff, Some(parked)) = (driven, parked) {
                    if let Some(parts) = serving.into_parts() {
                        // hyper's buffers go with it; what the peer sent
                        // after its request is of no use to a stream.
                        let io = parts.io.into_inner();
                        drop(parts.read_buf);
                        drop(parts.service);
                        guard.inner.server.metrics.streams_handed_off.inc();
                        handoff::stream(io, parked, &conn, &mut stop).await;
                    }
                }
            }),
            Protocols::Auto(auto) => {
                let serving = Box::pin(auto.serve_connection_with_upgrades(io, service));
                Box::pin(drive_boxed(serving, &conn, &mut stop))
            }
        };
        driving.await;
        conn.handoff.take();
        guard.inner.server.leave(&conn);
    }
}

/// Where a graceful shutdown is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Running,
    /// No new requests; those in flight finish.
    Draining,
    /// `shutdown_grace` is over: whatever is left is closed.
    Now,
}

/// [`drive`] for a connection that is boxed already (one that is not
/// `Unpin`), whose socket is never taken back.
async fn drive_boxed<C: Serving>(
    mut serving: Pin<Box<C>>,
    conn: &Conn,
    stop: &mut watch::Receiver<Stop>,
) {
    drive(serving.as_mut(), conn, stop).await;
}

/// How [`drive`] let go of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driven {
    /// It ended, was closed, or the grace period is over.
    Ended,
    /// The head of an event stream is out: the stream leaves hyper.
    HandOff,
}

/// Serves one connection until it ends, the server closes it, or an event
/// stream's head is out (when the connection hands off); once the server
/// stops, finishes gracefully (requests in flight first), and lets go when
/// the grace period is over.
async fn drive<C: Serving>(
    mut serving: Pin<&mut C>,
    conn: &Conn,
    stop: &mut watch::Receiver<Stop>,
) -> Driven {
    let mut draining = false;
    // Without a sender (the server future was dropped) connections run on,
    // as with warp::serve.
    let mut watching = true;
    loop {
        match *stop.borrow_and_update() {
            Stop::Running => {}
            Stop::Draining if !draining => {
                draining = true;
                serving.as_mut().shut_down();
            }
            Stop::Draining => {}
            Stop::Now => return Driven::Ended,
        }
        tokio::select! {
            served = serving.as_mut() => {
                if let Err(e) = served {
                    log::debug!("connection from {} ended: {e}", conn.remote);
                }
                return Driven::Ended;
            }
            // Dropping the connection closes the socket (unless it was
            // upgraded, which never waits and so is never closed here).
            () = conn.close.notified() => return Driven::Ended,
            () = conn.handoff.changed(), if conn.hands_off => {
                if conn.handoff.head_sent() {
                    return Driven::HandOff;
                }
            }
            changed = stop.changed(), if watching => watching = changed.is_ok(),
        }
    }
}

/// Hands one request to the app with its [`Served`], and keeps it in flight
/// until its response is done.
fn respond(
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
            let (head, body) = response.into_parts();
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
fn closes_after(version: Version, headers: &hyper::HeaderMap) -> bool {
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
    use std::prelude::rust_2021::*;

    fn headers(connection: Option<&'static str>) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        if let Some(v) = connection {
            h.insert(CONNECTION, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_builder_refuses_bad_server_limits() {
        let bad = Guard::builder()
            .server_limits(ServerLimits {
                max_waiting: 0,
                ..ServerLimits::default()
            })
            .build()
            .unwrap_err();
        assert!(bad.to_string().contains("max_waiting"), "{bad}");
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
