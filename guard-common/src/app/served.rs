//! What guard's server ([`Guard::serve`](super::Guard)) attaches to every
//! request it hands to the app's filters.
//!
//! `warp::addr::remote()` is filled only by `warp::serve`, and warp keeps the
//! connection's upgrade handle to itself, so a server of guard's own passes
//! both here: the peer filters read the address, and the WebSocket filter
//! takes the upgrade to finish the handshake with buffers sized by
//! [`Limits`](super::Limits) instead of tungstenite's 128 KiB defaults.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::upgrade::OnUpgrade;
use warp::Filter;

/// One request's view of the connection guard's server accepted.
#[derive(Clone)]
pub(crate) struct Served {
    /// The socket's peer (before any proxy header is considered).
    pub remote: SocketAddr,
    /// The connection's upgrade, taken at most once (by the WebSocket
    /// filter); absent for HTTP/2 requests, which cannot upgrade.
    upgrade: Arc<Mutex<Option<OnUpgrade>>>,
}

impl Served {
    pub fn new(remote: SocketAddr, upgrade: Option<OnUpgrade>) -> Self {
        Self {
            remote,
            upgrade: Arc::new(Mutex::new(upgrade)),
        }
    }

    // Read by the WebSocket upgrade, which lands on its own branch.
    #[allow(dead_code)]
    /// The upgrade handle, once; `None` if already taken or never there.
    pub fn take_upgrade(&self) -> Option<OnUpgrade> {
        self.upgrade
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The request's [`Served`], when guard's server is serving it.
pub(crate) fn served(
) -> impl Filter<Extract = (Option<Served>,), Error = Infallible> + Clone + Send + Sync + 'static {
    warp::ext::optional::<Served>()
}

/// The peer's socket address from guard's server, or from `warp::serve`.
pub(crate) fn remote_addr(
) -> impl Filter<Extract = (Option<SocketAddr>,), Error = Infallible> + Clone + Send + Sync + 'static
{
    served().and(warp::addr::remote()).map(
        |served: Option<Served>, warp_remote: Option<SocketAddr>| {
            served.map(|s| s.remote).or(warp_remote)
        },
    )
}
