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
//!
//! # Where things are
//!
//! Each type's methods live in one file: [`Guard`]'s in `guard.rs`, except
//! `serve`, in `server/`; [`GuardBuilder`]'s in `builder.rs`;
//! [`GuardedWebSocket`]'s in `ws/guarded.rs` and [`WsUpgrade`]'s in
//! `ws/upgrade.rs`. The decisions belong to the state they concern:
//! admission to the tables in `admission.rs`, reports to the reporter in
//! `report.rs`, peers to the proxy settings in `peer.rs`.

mod admission;
mod builder;
mod guard;
#[cfg(test)]
mod idle_memory;
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
use std::hash::BuildHasher;
use std::time::Duration;

pub use admission::{recover, Permit, Rejected, UnknownPeer};
pub use builder::{GuardBuilder, GuardError};
pub use guard::Guard;
pub use limits::{Limits, SlowConsumerPolicy, ViolationPolicy};
pub use metrics::{CloseReason, ConnKind, DropReason, RejectReason, Violation};
pub use peer::{Peer, ProxyHeader, UnreadableProxyHeader};
#[cfg(feature = "tls")]
pub use server::rustls;
pub use server::{Http2Limits, ServeError, Server, ServerClose, ServerLimits};
pub use sse::{SseSender, SseSubscription};
pub use ws::{GuardedWebSocket, Invalid, SendError, WsSender, WsUpgrade};

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
}
