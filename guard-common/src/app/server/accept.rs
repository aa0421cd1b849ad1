//! The accept loop, what it does when `accept` fails, and the sweeper it
//! runs beside it.

use std::io;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use super::conn::{Conn, FdTicket};
use super::connection::{Connection, Protocols, Stop};
use super::metrics::{AcceptError, ServerClose};
#[cfg(feature = "tls")]
use super::tls;
use super::waiting::Phase;
use super::{fd, Server};
use crate::app::Guard;
use futures_util::future::{self};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often the sweeper recounts descriptors and forgets old offenders.
pub(super) const FD_RECOUNT: Duration = Duration::from_secs(1);
/// Waiting connections closed at once when `accept` runs out of
/// descriptors.
pub(super) const EMFILE_SHED_BATCH: usize = 16;
/// Waiting connections closed per accept while headroom is under the low
/// water mark: more than one, so headroom grows back under a steady stream.
pub(super) const LOW_WATER_SHED_BATCH: usize = 2;
/// How long the accept loop waits for shed connections to give their
/// descriptors back before it tries `accept` again.
pub(super) const FREED_WAIT: Duration = Duration::from_millis(100);
/// A pause after an accept error that is not about descriptors or one
/// connection (ENOBUFS, ENOMEM), so the loop does not spin on it.
pub(super) const OTHER_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Aborts the sweeper when the server stops.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves connections accepted on `listener` until the graceful signal,
/// then drains them.
pub(super) async fn serve_listener(server: Server, listener: TcpListener) {
    let Server {
        guard,
        handler,
        #[cfg(feature = "tls")]
        tls,
        shutdown,
    } = server;
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

/// What the accept loop does when `accept` fails: never sleep on a full
/// descriptor table; free descriptors instead.
pub(super) async fn accept_failed(
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
pub(super) fn accept_now(listener: &TcpListener) -> bool {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    matches!(listener.poll_accept(&mut cx), Poll::Ready(Ok(_)))
}

/// Closes waiting connections past their deadline, keeps the descriptor
/// count honest and forgets old offenders.
pub(super) async fn sweep(guard: Guard) {
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
