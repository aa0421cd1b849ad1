//! Every knob of guard's server, with its default and why, in one place.

use std::time::Duration;

use super::super::GuardError;

/// The limits of guard's own server ([`Guard::serve`](crate::app::Guard::serve)):
/// how long a connection may take to say what it wants, how many may sit
/// waiting, and what happens when descriptors run short. The WebSocket and
/// SSE limits of admitted connections are in [`Limits`](crate::app::Limits).
///
/// A connection is *waiting* from accept until its first complete request
/// head, and again between keep-alive requests. Waiting connections cost a
/// descriptor and a read buffer each while nothing has vouched for them, so
/// they are bounded in time (the deadlines) and in number (the budget); a
/// connection stops waiting for good once it is upgraded (a WebSocket), and
/// while a request is in flight (an SSE stream stays in flight).
///
/// Start from `ServerLimits::default()` and override fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    // --- Deadlines ---
    /// A new connection must deliver a complete request head (TLS handshake
    /// included) within this, or it is closed. Browsers send theirs in
    /// milliseconds; 10 s leaves room for a slow mobile link while making a
    /// slow-head attacker pay a reconnect every 10 s. Also set as hyper's
    /// `header_read_timeout` (with a timer, so it is really on), a second
    /// later and never before `keep_alive_idle`, as a backstop. Default
    /// 10 s.
    pub head_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after
    /// this long. A WS/SSE service gains little from long keep-alive (its
    /// clients upgrade or stream at once) and each idle connection holds a
    /// descriptor. Default 30 s.
    pub keep_alive_idle: Duration,
    /// Largest request head (and read buffer) of an HTTP/1 connection; a
    /// bigger head is answered 431. Bounds what a waiting connection can
    /// make the server hold. hyper's floor is 8 KiB. Default 32 KiB.
    pub max_head_size: usize,
    /// Most header fields in one HTTP/1 request head. Default 64.
    pub max_headers: usize,

    // --- The not-yet-admitted budget ---
    /// Waiting connections from all sources. When full, the one that has
    /// waited longest is closed to make room, so a client that sends its
    /// request promptly always gets in however many slow ones there are.
    /// Default 1 024.
    pub max_waiting: usize,
    /// Waiting connections per source: an IPv4 /32 or an IPv6 /64 (the
    /// source prefixes of [`Limits`](crate::app::Limits)). A browser opens at
    /// most six connections to one host. When full, that source's oldest is
    /// closed. Default 8.
    pub max_waiting_per_source: usize,
    /// Waiting connections per network: an IPv4 /24, an IPv6 /48 (see
    /// `network_prefix_v4`/`_v6`), so a handful of networks cannot fill the
    /// global budget and evict everyone else's. Default 64.
    pub max_waiting_per_network: usize,
    pub network_prefix_v4: u8,
    pub network_prefix_v6: u8,

    // --- Descriptors ---
    /// Raise the process's soft open-files limit to its hard limit when the
    /// first server starts (logged once). A systemd service starts at a
    /// soft 1 024 with a hard 524 288; 1 024 is gone at the first thousand
    /// slow connections. Default true.
    pub raise_nofile_limit: bool,
    /// When fewer descriptors than this are left (soft limit minus open
    /// ones), the oldest waiting connections are closed on each accept so
    /// that admitted connections and prompt clients keep the rest. One more
    /// descriptor is always held in reserve so that a full table still lets
    /// the accept loop take and close a connection instead of stalling.
    /// Default 64.
    pub fd_low_water: u32,

    // --- HTTP/2 ---
    /// HTTP/2 (h2c prior knowledge, or h2 over TLS through ALPN), off by
    /// default. Why: a WebSocket over HTTP/2 needs extended CONNECT (RFC
    /// 8441), which warp's filters do not speak, so browsers open WebSockets
    /// over HTTP/1.1 anyway; SSE works over both, but browsers only use h2
    /// over TLS, where most deployments terminate at a proxy. Off, each
    /// stream is a connection the kernel's per-source cap sees; on, one
    /// connection multiplexes up to `max_concurrent_streams` of them behind
    /// one descriptor, each still admitted per request by the same filters.
    /// Off really is off: hyper-util's `auto::Builder::http1_only` is
    /// ignored once upgrades are on (it served h2c prior knowledge in this
    /// server's test), so HTTP/1-only runs hyper's HTTP/1 builder itself.
    /// Turn it on with [`Http2Limits::default`] for direct h2 clients.
    pub http2: Option<Http2Limits>,

    // --- Shutdown ---
    /// After the graceful signal, how long requests in flight may take to
    /// finish before their connections are closed. An SSE stream never
    /// finishes by itself, so without it a graceful shutdown would wait
    /// forever (as `warp::serve`'s does). Default 10 s.
    pub shutdown_grace: Duration,

    // --- Offenders ---
    /// A source (as [`Limits`](crate::app::Limits) defines it) whose
    /// connections are closed this many times within `offender_window` while
    /// holding a partial request head (by a deadline, the budget or a
    /// descriptor shed) is reported to the agent as `slow_connections`,
    /// once per window. A connection that never sent a byte (a browser's
    /// preconnect) or that idled out between requests is not held against
    /// it. Defaults 5 in 60 s.
    pub offender_threshold: u32,
    pub offender_window: Duration,
    /// Most sources whose strikes are counted at once; past it new sources
    /// are not counted until a window expires, so the table stays bounded
    /// under a spread-out attack. Default 65 536.
    pub max_tracked_offenders: usize,
}

/// The bounds of HTTP/2 when it is on: each is a hyper default made
/// explicit or lowered for a service whose streams are long-lived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams one connection may have open at once. hyper allows 200 by
    /// default, which would let one descriptor hold 200 SSE subscriptions
    /// past the kernel's per-source connection cap; admission still counts
    /// each against the source's caps. Default 16.
    pub max_concurrent_streams: u32,
    /// Largest decoded header list of one request. Default 16 KiB.
    pub max_header_list_size: u32,
    /// Streams reset by the client before the server accepted them that may
    /// be pending at once (the "rapid reset" attack, CVE-2023-44487).
    /// Default 20.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for protocol errors before it closes
    /// the connection (CVE-2024-27316 style floods). Default 32.
    pub max_local_error_reset_streams: usize,
    /// Ping an open connection this often, and close it when a ping goes
    /// unanswered for `keep_alive_timeout`, so dead peers do not hold
    /// streams. Defaults 20 s and 10 s.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 16,
            max_header_list_size: 16 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 32,
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            head_timeout: Duration::from_secs(10),
            keep_alive_idle: Duration::from_secs(30),
            max_head_size: 32 * 1024,
            max_headers: 64,
            max_waiting: 1024,
            max_waiting_per_source: 8,
            max_waiting_per_network: 64,
            network_prefix_v4: 24,
            network_prefix_v6: 48,
            raise_nofile_limit: true,
            fd_low_water: 64,
            http2: None,
            shutdown_grace: Duration::from_secs(10),
            offender_threshold: 5,
            offender_window: Duration::from_secs(60),
            max_tracked_offenders: 65_536,
        }
    }
}

/// hyper refuses (panics on) a smaller HTTP/1 read buffer.
const HYPER_MIN_BUF: usize = 8192;

impl ServerLimits {
    /// Rejects combinations that could never work, with what to change.
    pub fn validate(&self) -> Result<(), GuardError> {
        let bad = |what: &str| Err(GuardError::Limits(what.to_owned()));
        if self.head_timeout.is_zero() || self.keep_alive_idle.is_zero() {
            return bad("head_timeout and keep_alive_idle must be longer than zero");
        }
        if self.max_head_size < HYPER_MIN_BUF {
            return bad("max_head_size must be at least 8192 (hyper's smallest HTTP/1 buffer)");
        }
        if self.max_headers == 0 {
            return bad("max_headers must be at least 1");
        }
        if self.max_waiting == 0
            || self.max_waiting_per_source == 0
            || self.max_waiting_per_network == 0
        {
            return bad("max_waiting, max_waiting_per_source and max_waiting_per_network must be at least 1, or no request could ever arrive");
        }
        if self.max_waiting_per_source > self.max_waiting_per_network
            || self.max_waiting_per_network > self.max_waiting
        {
            return bad("the waiting budgets must nest: max_waiting_per_source <= max_waiting_per_network <= max_waiting");
        }
        if self.network_prefix_v4 == 0 || self.network_prefix_v4 > 32 {
            return bad("network_prefix_v4 must be 1..=32");
        }
        if self.network_prefix_v6 == 0 || self.network_prefix_v6 > 128 {
            return bad("network_prefix_v6 must be 1..=128");
        }
        if self.offender_threshold == 0 || self.offender_window.is_zero() {
            return bad(
                "offender_threshold must be at least 1 and offender_window longer than zero",
            );
        }
        if self.max_tracked_offenders == 0 {
            return bad("max_tracked_offenders must be at least 1");
        }
        if let Some(h2) = &self.http2 {
            if h2.max_concurrent_streams == 0 {
                return bad("http2.max_concurrent_streams must be at least 1 (turn HTTP/2 off with http2: None)");
            }
            if h2.max_header_list_size == 0 {
                return bad("http2.max_header_list_size must be at least 1");
            }
            if h2.keep_alive_interval.is_zero() || h2.keep_alive_timeout.is_zero() {
                return bad(
                    "http2.keep_alive_interval and keep_alive_timeout must be longer than zero",
                );
            }
        }
        Ok(())
    }

    /// Checks the network prefixes against the source prefixes they must
    /// contain.
    pub(crate) fn validate_with(&self, source_v4: u8, source_v6: u8) -> Result<(), GuardError> {
        self.validate()?;
        if self.network_prefix_v4 > source_v4 || self.network_prefix_v6 > source_v6 {
            return Err(GuardError::Limits(
                "network_prefix_v4/_v6 must not be longer than Limits::source_prefix_v4/_v6 (a network holds sources)"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ServerLimits::default().validate_with(32, 64).unwrap();
        assert!(ServerLimits::default().head_timeout <= Duration::from_secs(10));
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let cases = [
            ServerLimits {
                head_timeout: Duration::ZERO,
                ..ServerLimits::default()
            },
            ServerLimits {
                max_head_size: 4096,
                ..ServerLimits::default()
            },
            ServerLimits {
                max_waiting: 0,
                ..ServerLimits::default()
            },
            ServerLimits {
                max_waiting_per_source: 100,
                ..ServerLimits::default()
            },
            ServerLimits {
                network_prefix_v6: 0,
                ..ServerLimits::default()
            },
            ServerLimits {
                offender_threshold: 0,
                ..ServerLimits::default()
            },
            ServerLimits {
                http2: Some(Http2Limits {
                    max_concurrent_streams: 0,
                    ..Http2Limits::default()
                }),
                ..ServerLimits::default()
            },
        ];
        for limits in cases {
            let err = limits.validate().unwrap_err();
            assert!(matches!(err, GuardError::Limits(_)), "{limits:?}");
        }
        let err = ServerLimits {
            network_prefix_v4: 28,
            ..ServerLimits::default()
        }
        .validate_with(24, 64)
        .unwrap_err();
        assert!(err.to_string().contains("network_prefix"), "{err}");
    }
}
