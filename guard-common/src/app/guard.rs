//! The [`Guard`] of one app, and all of its methods but [`Guard::serve`],
//! which is in `server/` beside the server it starts. The decisions belong
//! to the state these methods lock or own: [`Tables`] (admission),
//! [`Reporter`] (reports) and [`ProxyConfig`] (peers).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future;
use tokio::time::Instant;
use warp::filters::ws::Ws;
use warp::http::HeaderMap;
use warp::{Filter, Rejection};

use super::admission::{self, Keys, Permit, Rejected, Tables};
use super::metrics::{ConnKind, Metrics};
use super::peer::{Peer, ProxyConfig};
use super::report::{ReportCounters, Reporter};
use super::served::{self, Served};
use super::server::ServerShared;
use super::sse::SseSubscription;
use super::ws::{Handshake, WsUpgrade};
use super::{GuardBuilder, Limits};
use crate::addr::Prefix;
use crate::state::reason;

/// The guard of one app: its limits, per-source state, metrics and agent
/// client. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Guard {
    pub(super) inner: Arc<Inner>,
}

/// What every clone of a [`Guard`] shares; built by [`GuardBuilder`].
pub(super) struct Inner {
    pub(super) limits: Limits,
    pub(super) proxy: ProxyConfig,
    pub(super) tables: Mutex<Tables>,
    pub(super) metrics: Metrics,
    pub(super) reporter: Reporter,
    pub(super) report_counters: Arc<ReportCounters>,
    /// guard's own server: its limits, waiting budget and metrics.
    pub(super) server: ServerShared,
    /// Zero of the guard's monotonic clock (tokio's, so tests can pause it).
    pub(super) epoch: Instant,
    /// Keys identities without storing them; random per process so no one
    /// can aim collisions at a bucket.
    pub(super) hasher: RandomState,
}

impl Inner {
    pub(super) fn lock_tables(&self) -> MutexGuard<'_, Tables> {
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
    /// `trusted_proxies`). Rejects with [`UnknownPeer`](super::UnknownPeer)
    /// when the server has no socket address to give, and with
    /// [`UnreadableProxyHeader`](super::UnreadableProxyHeader) when a
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

    /// Admits one connection of `kind` from `peer`, or says why not. The
    /// [`Permit`] holds the slot until it is dropped.
    ///
    /// [`Guard::websocket`] and [`Guard::sse`] call this; call it directly
    /// for a connection type of your own.
    pub fn admit(&self, kind: ConnKind, peer: &Peer) -> Result<Permit, Rejected> {
        let inner = &self.inner;
        let limits = &inner.limits;
        let now = self.now_ns();
        let keys = Keys {
            source: Prefix::of(peer.ip(), limits.source_prefix_v4, limits.source_prefix_v6),
            aggregate: Prefix::of(
                peer.ip(),
                limits.aggregate_prefix_v4,
                limits.aggregate_prefix_v6,
            ),
            identity: peer.identity().map(|id| inner.hasher.hash_one(id)),
        };
        let attempt = inner.lock_tables().admit(keys, limits, now);
        let verdict = attempt.verdict.map_err(|refused| {
            inner.metrics.rejected(kind, refused.reason).inc();
            Rejected {
                kind,
                reason: refused.reason,
                retry_after: refused.retry_after,
            }
        });

        if let Some(storm) = attempt.storm {
            inner.metrics.storms.inc();
            let (code, what) = match kind {
                ConnKind::Sse => (reason::RECONNECT_STORM, "reconnect storm"),
                ConnKind::WebSocket => (reason::CONNECTION_FLOOD, "connection flood"),
            };
            log::warn!(
                "{what} from {peer}: {} {} attempts within {:?}",
                storm.attempts,
                kind.label(),
                limits.storm_window
            );
            self.report_source(
                peer.ip(),
                code,
                format!(
                    "{} {} connection attempts within {:?}",
                    storm.attempts,
                    kind.label(),
                    limits.storm_window
                ),
            );
        }

        verdict?;
        inner.metrics.admitted(kind).inc();
        inner.metrics.open(kind).inc();
        Ok(Permit::new(self.clone(), kind, peer.clone(), keys))
    }

    /// Records that `peer` misbehaved badly enough to be closed, and reports
    /// its address when the abuse is the address's: always without an
    /// identity, and with identities once enough distinct ones from the same
    /// source misbehaved.
    pub(crate) fn offense(&self, peer: &Peer, code: u32, detail: String) {
        let Some(id) = peer.identity() else {
            self.report_source(peer.ip(), code, detail);
            return;
        };
        let inner = &self.inner;
        let limits = &inner.limits;
        let id = inner.hasher.hash_one(id);
        let now = self.now_ns();
        let source = Prefix::of(peer.ip(), limits.source_prefix_v4, limits.source_prefix_v6);
        let offenders = inner.lock_tables().note_offender(source, id, limits, now);
        if offenders >= limits.identity_offenders_to_report as usize {
            self.report_source(
                peer.ip(),
                code,
                format!("{offenders} distinct identities misbehaved; last: {detail}"),
            );
        } else {
            log::info!(
                "not reporting {}: only identity {:?} misbehaved ({offenders} of {} needed)",
                peer.ip(),
                peer.identity().unwrap_or_default(),
                limits.identity_offenders_to_report
            );
        }
    }

    /// Sources and identities currently tracked (bounded; see
    /// [`Limits::max_tracked_sources`]).
    pub fn tracked_sources(&self) -> usize {
        let t = self.inner.lock_tables();
        t.sources.len() + t.identities.len()
    }

    /// Open guarded connections, all kinds.
    pub fn open_connections(&self) -> u32 {
        self.inner.lock_tables().open_total
    }

    /// Open guarded connections of one source address.
    pub fn open_connections_from(&self, ip: IpAddr) -> u32 {
        let limits = &self.inner.limits;
        let key = Prefix::of(ip, limits.source_prefix_v4, limits.source_prefix_v6);
        self.inner
            .lock_tables()
            .sources
            .get(&key)
            .map_or(0, |s| s.open)
    }

    /// Forgets idle sources now instead of at the next admission.
    pub fn retain_recent(&self) {
        let limits = &self.inner.limits;
        let now = self.now_ns();
        self.inner.lock_tables().retain(now, limits);
    }

    /// Whether `ip` may never be reported: loopback, a trusted proxy (it
    /// speaks for many clients) or an allow-listed prefix.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback()
            || ip.is_unspecified()
            || self.inner.proxy.is_trusted(ip)
            || self.inner.reporter.allowlist.iter().any(|p| p.contains(ip))
    }

    /// Asks the agent to block the source `ip` belongs to, unless it is
    /// exempt. Never waits; the detection time is now.
    pub(crate) fn report_source(&self, ip: IpAddr, code: u32, detail: String) {
        if self.is_exempt(ip) {
            let why = reason::name(code);
            log::info!("not reporting {ip} ({why}): loopback, trusted proxy or allow-listed");
            return;
        }
        self.inner
            .reporter
            .report(ip, code, detail, &self.inner.limits);
    }

    /// Reports the agent answered so far (0 without an agent).
    pub fn reports_sent(&self) -> u64 {
        self.inner.report_counters.sent()
    }

    /// Reports that could not be delivered so far.
    pub fn reports_failed(&self) -> u64 {
        self.inner.report_counters.failed()
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
