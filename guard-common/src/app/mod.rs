//! The warp side of guard: what a WebSocket/SSE service adds so that no
//! client can exhaust it, and so that abusive sources end up blocked in the
//! kernel by the agent.
//!
//! # In an app
//!
//! ```no_run
//! # async fn app() -> Result<(), Box<dyn std::error::Error>> {
//! use futures_util::StreamExt;
//! use guard_common::app::{self, Guard, GuardedWebSocket, SseSubscription, WsUpgrade};
//! use guard_common::client::{AgentClient, ClientConfig};
//! use warp::Filter;
//!
//! let registry = prometheus::Registry::new();
//! let guard = Guard::builder()
//!     .registry(&registry)
//!     .agent(AgentClient::spawn(ClientConfig::new("/run/guard/control.sock", "chat")))
//!     .build()?;
//!
//! let ws = warp::path("ws").and(guard.websocket()).map(|up: WsUpgrade| {
//!     up.on_upgrade(|mut ws: GuardedWebSocket| async move {
//!         while let Some(msg) = ws.next().await {
//!             let _ = ws.send(msg); // echo
//!         }
//!     })
//! });
//! let events = warp::path("events").and(guard.sse()).map(|sub: SseSubscription| {
//!     let (tx, reply) = sub.channel();
//!     let _ = tx.send(warp::sse::Event::default().data("hello"));
//!     reply
//! });
//! let routes = ws.or(events).recover(app::recover);
//! // guard's own server, not `warp::serve`: deadlines, a budget for
//! // connections that have not sent a request yet, descriptor reserve.
//! guard
//!     .serve(routes)
//!     .graceful(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
//!     .run(([0, 0, 0, 0], 8080))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # What it does
//!
//! * **Admission** ([`Guard::websocket`], [`Guard::sse`], [`Guard::admit`]):
//!   a global cap (503), per-source and per-network (/24, /48) caps and
//!   per-source connect rates (429), always with `Retry-After`. Each admitted connection holds a [`Permit`] that
//!   gives its slot back when dropped, however the connection ends.
//! * **WebSockets** ([`GuardedWebSocket`]): size limits in the codec,
//!   message and byte rate buckets, validation, a [`ViolationPolicy`], an
//!   idle timeout with keep-alive pings, and a bounded outbound queue with a
//!   [`SlowConsumerPolicy`]. A flooding connection is closed with 1008 and
//!   its source reported. Under guard's own server, guard finishes the
//!   upgrade itself: the codec's buffers are sized by [`Limits`] (an idle
//!   WebSocket costs a few KiB instead of tungstenite's 128 KiB read
//!   buffer), and every frame, fragments included, is charged as it
//!   arrives.
//! * **SSE** ([`SseSubscription`]): a bounded queue per subscriber,
//!   keep-alive comments, slow subscribers evicted with a jittered `retry:`,
//!   and reconnect storms per source counted and reported.
//! * **Peers** ([`Peer`]): the socket's address; proxy headers only from
//!   trusted proxies. Loopback, trusted proxies and allow-listed prefixes are
//!   never reported. An app-supplied identity keys limits per user, and a
//!   shared address is reported only when several of its users misbehave.
//! * **Serving** ([`Guard::serve`]): guard's own server instead of
//!   `warp::serve`: a request-head deadline with a real timer, an idle
//!   deadline, a budget for connections that have not sent a request yet
//!   (the longest-waiting closed first), a descriptor reserve so accept
//!   never stalls, HTTP/2 off unless bounded, slow sources reported.
//! * **Metrics**: `guard_app_*`, in the registry the app passes in.
//!
//! All limits and their defaults are in [`Limits`] and [`ServerLimits`].

mod admission;
mod limits;
mod metrics;
mod peer;
mod report;
mod served;
mod server;
mod sse;
mod ws;

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::prelude::rust_2021::*;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future;
use prometheus::Registry;
use tokio::time::Instant;
use warp::filters::ws::Ws;
use warp::http::HeaderMap;
use warp::{Filter, Rejection};

pub use admission::{recover, Permit, Rejected, UnknownPeer};
pub use limits::{Limits, SlowConsumerPolicy, ViolationPolicy};
pub use metrics::{CloseReason, ConnKind, DropReason, RejectReason, Violation};
pub use peer::{Peer, ProxyHeader, UnreadableProxyHeader};
#[cfg(feature = "tls")]
pub use server::rustls;
pub use server::{Http2Limits, ServeError, Server, ServerClose, ServerLimits};
pub use sse::{SseSender, SseSubscription};
pub use ws::{GuardedWebSocket, Invalid, SendError, WsSender, WsUpgrade};

use crate::addr::Prefix;
use crate::client::AgentClient;
use admission::Tables;
use metrics::Metrics;
use peer::ProxyConfig;
use report::{ReportCollector, ReportCounters, Reporter};
use served::Served;
use server::ServerShared;
use ws::Handshake;

/// Why a [`Guard`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("invalid guard limits: {0}")]
    Limits(String),
    #[error("cannot register the guard's metrics (already registered in this registry?): {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The guard of one app: its limits, per-source state, metrics and agent
/// client. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    proxy: ProxyConfig,
    tables: Mutex<Tables>,
    metrics: Metrics,
    reporter: Reporter,
    report_counters: Arc<ReportCounters>,
    /// guard's own server: its limits, waiting budget and metrics.
    server: ServerShared,
    /// Zero of the guard's monotonic clock (tokio's, so tests can pause it).
    epoch: Instant,
    /// Keys identities without storing them; random per process so no one
    /// can aim collisions at a bucket.
    hasher: RandomState,
}

impl Inner {
    fn lock_tables(&self) -> MutexGuard<'_, Tables> {
        // Nothing panics while holding the lock and every update leaves the
        // tables consistent, so a poisoned lock is still good.
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("limits", &self.inner.limits)
            .field("agent", &self.inner.reporter.client.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Guard`]; every setting has a default.
#[derive(Default)]
#[must_use]
pub struct GuardBuilder {
    limits: Limits,
    server_limits: ServerLimits,
    agent: Option<AgentClient>,
    registry: Option<Registry>,
    trusted_proxies: Vec<Prefix>,
    proxy_header: ProxyHeader,
    allowlist: Vec<Prefix>,
}

impl GuardBuilder {
    /// The limits to enforce (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The limits of guard's own server, [`Guard::serve`] (default
    /// [`ServerLimits::default`]).
    pub fn server_limits(mut self, limits: ServerLimits) -> Self {
        self.server_limits = limits;
        self
    }

    /// Where abusive sources are reported; without one nothing is reported
    /// and everything else works the same.
    pub fn agent(mut self, client: AgentClient) -> Self {
        self.agent = Some(client);
        self
    }

    /// Where the `guard_app_*` metrics are registered.
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Proxies whose [`ProxyHeader`] is believed; they are never reported.
    pub fn trusted_proxies(mut self, proxies: impl IntoIterator<Item = Prefix>) -> Self {
        self.trusted_proxies.extend(proxies);
        self
    }

    /// Which header trusted proxies name clients in (default
    /// `X-Forwarded-For`).
    pub fn proxy_header(mut self, header: ProxyHeader) -> Self {
        self.proxy_header = header;
        self
    }

    /// Prefixes that are limited like everyone but never reported.
    pub fn allowlist(mut self, prefixes: impl IntoIterator<Item = Prefix>) -> Self {
        self.allowlist.extend(prefixes);
        self
    }

    pub fn build(self) -> Result<Guard, GuardError> {
        self.limits.validate()?;
        let metrics = Metrics::new(self.registry.as_ref())?;
        let server = ServerShared::new(
            self.server_limits,
            self.limits.source_prefix_v4,
            self.limits.source_prefix_v6,
            self.registry.as_ref(),
        )?;
        let report_counters = Arc::new(ReportCounters::new(self.agent.clone())?);
        if let Some(registry) = &self.registry {
            registry.register(Box::new(ReportCollector(report_counters.clone())))?;
        }
        Ok(Guard {
            inner: Arc::new(Inner {
                limits: self.limits,
                proxy: ProxyConfig {
                    trusted: self.trusted_proxies,
                    header: self.proxy_header,
                },
                tables: Mutex::new(Tables::default()),
                metrics,
                reporter: Reporter {
                    client: self.agent,
                    allowlist: self.allowlist,
                    refusing: AtomicBool::new(false),
                },
                report_counters,
                server,
                epoch: Instant::now(),
                hasher: RandomState::new(),
            }),
        })
    }
}

impl Guard {
    pub fn builder() -> GuardBuilder {
        GuardBuilder::default()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Nanoseconds on the guard's monotonic clock.
    pub(crate) fn now_ns(&self) -> u64 {
        admission::duration_ns(self.inner.epoch.elapsed())
    }

    /// The instant `ns` on the guard's clock stands for.
    pub(crate) fn instant_at(&self, ns: u64) -> Instant {
        self.inner.epoch + Duration::from_nanos(ns)
    }

    /// Extracts the request's [`Peer`] (see [`Guard::builder`]'s
    /// `trusted_proxies`). Rejects with [`UnknownPeer`] when the server has
    /// no socket address to give, and with [`UnreadableProxyHeader`] when a
    /// trusted proxy's header does not name the client.
    pub fn peer(
        &self,
    ) -> impl Filter<Extract = (Peer,), Error = Rejection> + Clone + Send + Sync + 'static {
        let guard = self.clone();
        served::remote_addr()
            .and(warp::header::headers_cloned())
            .and_then(move |remote, headers: HeaderMap| {
                let peer = admission::require_remote(remote).and_then(|addr| {
                    guard
                        .inner
                        .proxy
                        .resolve(addr, &headers)
                        .map_err(warp::reject::custom)
                });
                future::ready(peer)
            })
    }

    /// A WebSocket upgrade that passed admission; finish it with
    /// [`WsUpgrade::on_upgrade`]. Refused upgrades reject with [`Rejected`].
    ///
    /// Served by guard's server, guard finishes the upgrade itself, with
    /// the codec's buffers sized by [`Limits`] and every frame charged as
    /// it arrives; under `warp::serve`, warp finishes it (tungstenite's
    /// 128 KiB buffers, messages charged as they are assembled).
    pub fn websocket(
        &self,
    ) -> impl Filter<Extract = (WsUpgrade,), Error = Rejection> + Clone + Send + Sync + 'static
    {
        let guard = self.clone();
        upgrade_request().and(self.peer()).and_then(
            move |ws: Ws, served: Option<Served>, key: String, peer: Peer| {
                future::ready(guard.admit_ws((ws, served, key), peer))
            },
        )
    }

    /// [`Guard::websocket`] with limits also keyed by the identity the
    /// `identity` filter extracts (e.g. from a session cookie).
    pub fn websocket_with_identity<I>(
        &self,
        identity: I,
    ) -> impl Filter<Extract = (WsUpgrade,), Error = Rejection> + Clone + Send + Sync + 'static
    where
        I: Filter<Extract = (Option<String>,), Error = Rejection> + Clone + Send + Sync + 'static,
    {
        let guard = self.clone();
        upgrade_request().and(self.peer()).and(identity).and_then(
            move |ws: Ws, served: Option<Served>, key: String, peer: Peer, id: Option<String>| {
                future::ready(guard.admit_ws((ws, served, key), with_identity(peer, id)))
            },
        )
    }

    /// An SSE subscription that passed admission; turn it into a reply with
    /// [`SseSubscription::channel`]. Refused ones reject with [`Rejected`].
    pub fn sse(
        &self,
    ) -> impl Filter<Extract = (SseSubscription,), Error = Rejection> + Clone + Send + Sync + 'static
    {
        let guard = self.clone();
        warp::get()
            .and(self.peer())
            .and_then(move |peer: Peer| future::ready(guard.admit_sse(peer)))
    }

    /// [`Guard::sse`] with limits also keyed by an identity.
    pub fn sse_with_identity<I>(
        &self,
        identity: I,
    ) -> impl Filter<Extract = (SseSubscription,), Error = Rejection> + Clone + Send + Sync + 'static
    where
        I: Filter<Extract = (Option<String>,), Error = Rejection> + Clone + Send + Sync + 'static,
    {
        let guard = self.clone();
        warp::get().and(self.peer()).and(identity).and_then(
            move |peer: Peer, id: Option<String>| {
                future::ready(guard.admit_sse(with_identity(peer, id)))
            },
        )
    }

    fn admit_ws(
        &self,
        (ws, served, key): (Ws, Option<Served>, String),
        peer: Peer,
    ) -> Result<WsUpgrade, Rejection> {
        self.admit(ConnKind::WebSocket, &peer)
            .map(|permit| WsUpgrade::new(handshake(ws, served, key), permit))
            .map_err(warp::reject::custom)
    }

    fn admit_sse(&self, peer: Peer) -> Result<SseSubscription, Rejection> {
        self.admit(ConnKind::Sse, &peer)
            .map(SseSubscription::new)
            .map_err(warp::reject::custom)
    }
}

/// A valid WebSocket upgrade request: warp's `ws()` checks the method and
/// headers, and finishes the upgrade unless guard's server handed the
/// connection over ([`Served`]), in which case the key is all guard needs.
fn upgrade_request(
) -> impl Filter<Extract = (Ws, Option<Served>, String), Error = Rejection> + Clone + Send + Sync + 'static
{
    warp::ws()
        .and(served::served())
        .and(warp::header::<String>("sec-websocket-key"))
}

/// Who finishes the upgrade: guard, when its server handed the connection
/// over, else warp. Decided only once the request is admitted, so a
/// refused one leaves the upgrade where it was.
fn handshake(ws: Ws, served: Option<Served>, key: String) -> Handshake {
    match served.and_then(|s| s.take_upgrade()) {
        Some(upgrade) => Handshake::Sized { upgrade, key },
        None => Handshake::Warp(ws),
    }
}

fn with_identity(peer: Peer, id: Option<String>) -> Peer {
    match id {
        Some(id) => peer.with_identity(id),
        None => peer,
    }
}

/// A uniformly random duration in `0..=max`, so clients told to come back
/// later do not all come back at once.
pub(crate) fn jitter(max: Duration) -> Duration {
    thread_local! {
        static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(0x5eed_u64) | 1);
    }
    let max_ns = admission::duration_ns(max);
    if max_ns == 0 {
        return Duration::ZERO;
    }
    let x = RNG.with(|rng| {
        // xorshift64: plenty for spreading retries, and never zero.
        let mut x = rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rng.set(x);
        x
    });
    Duration::from_nanos(x % max_ns.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let max = Duration::from_millis(500);
        let draws: Vec<Duration> = (0..1000).map(|_| jitter(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(
            distinct.len() > 900,
            "only {} distinct draws",
            distinct.len()
        );
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn bad_limits_fail_the_build_with_a_reason() {
        let err = Guard::builder()
            .limits(Limits {
                outbound_queue: 0,
                ..Limits::default()
            })
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("outbound_queue"), "{err}");
    }

    #[test]
    fn metrics_register_once_per_registry() {
        let registry = Registry::new();
        Guard::builder().registry(&registry).build().unwrap();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for expected in [
            "guard_app_connections_open",
            "guard_app_connections_admitted_total",
            "guard_app_connections_rejected_total",
            "guard_app_messages_received_total",
            "guard_app_messages_received_bytes_total",
            "guard_app_messages_dropped_total",
            "guard_app_violations_total",
            "guard_app_floods_detected_total",
            "guard_app_connections_closed_total",
            "guard_app_sse_evictions_total",
            "guard_app_reconnect_storms_total",
            "guard_app_reports_sent_total",
            "guard_app_reports_failed_total",
            "guard_app_server_connections_waiting",
            "guard_app_server_connections_total",
            "guard_app_server_closed_total",
            "guard_app_server_fd_headroom",
            "guard_app_server_accept_errors_total",
            "guard_app_server_tls_handshake_failures_total",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        let again = Guard::builder().registry(&registry).build();
        assert!(matches!(again, Err(GuardError::Metrics(_))));
    }
}
