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

mod accept;
mod conn;
mod connection;
mod fd;
mod handoff;
mod limits;
mod metrics;
mod offenders;
mod respond;
mod shared;
#[cfg(feature = "tls")]
mod tls;
mod waiting;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tower_service::Service as _;
use warp::reply::Reply;
use warp::Filter;

pub use limits::{Http2Limits, ServerLimits};
pub use metrics::ServerClose;
#[cfg(feature = "tls")]
pub use tokio_rustls::rustls;

use super::Guard;
pub(crate) use shared::ServerShared;

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
        accept::serve_listener(self, listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
