//! One accepted connection's task: hyper's settings, serving it, a
//! graceful end, and the hand-off of an event stream.

use std::future::Future;
use std::pin::Pin;
#[cfg(feature = "tls")]
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{Conn, CountingIo, FdTicket};
use super::respond::respond;
use super::{handoff, Handler, ServerLimits};
use crate::app::Guard;
use futures_util::future::BoxFuture;
use http_body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// How much later than the sweeper's deadlines hyper's own header timer
/// fires.
pub(super) const HYPER_HEAD_BACKSTOP: Duration = Duration::from_secs(1);

/// hyper's connection settings. Without HTTP/2, hyper's HTTP/1 builder
/// itself: hyper-util's `auto::Builder::http1_only` does nothing once
/// upgrades are on (its own docs say so), so it would still serve h2c.
pub(super) enum Protocols {
    Http1(hyper::server::conn::http1::Builder),
    Auto(auto::Builder<TokioExecutor>),
}

impl Protocols {
    /// Whether event streams leave hyper after their head: only hyper's
    /// HTTP/1 connection gives its socket back (`into_parts`).
    pub(super) fn hands_off(&self) -> bool {
        matches!(self, Self::Http1(_))
    }

    pub(super) fn new(limits: &ServerLimits) -> Self {
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
pub(super) trait Serving: Future<Output = Result<(), Self::Error>> {
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

/// One accepted connection's task.
pub(super) struct Connection {
    pub(super) guard: Guard,
    pub(super) conn: Arc<Conn>,
    pub(super) handler: Handler,
    pub(super) protocols: Arc<Protocols>,
    pub(super) stop: watch::Receiver<Stop>,
}

impl Connection {
    #[cfg(feature = "tls")]
    pub(super) async fn run_tls(
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

    pub(super) async fn run(self, stream: tokio::net::TcpStream, ticket: FdTicket) {
        let counted = CountingIo {
            io: stream,
            conn: self.conn.clone(),
            _ticket: ticket,
        };
        self.serve(counted).await;
    }

    pub(super) async fn serve<I>(self, io: I)
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
pub(super) enum Stop {
    Running,
    /// No new requests; those in flight finish.
    Draining,
    /// `shutdown_grace` is over: whatever is left is closed.
    Now,
}

/// [`drive`] for a connection that is boxed already (one that is not
/// `Unpin`), whose socket is never taken back.
pub(super) async fn drive_boxed<C: Serving>(
    mut serving: Pin<Box<C>>,
    conn: &Conn,
    stop: &mut watch::Receiver<Stop>,
) {
    drive(serving.as_mut(), conn, stop).await;
}

/// How [`drive`] let go of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Driven {
    /// It ended, was closed, or the grace period is over.
    Ended,
    /// The head of an event stream is out: the stream leaves hyper.
    HandOff,
}

/// Serves one connection until it ends, the server closes it, or an event
/// stream's head is out (when the connection hands off); once the server
/// stops, finishes gracefully (requests in flight first), and lets go when
/// the grace period is over.
pub(super) async fn drive<C: Serving>(
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
