//! Every limit of the warp side, with its default, in one place.

use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::GuardError;

/// What happens to a message that breaks a limit (rate, size, validation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationPolicy {
    /// Deliver it anyway; count and log. Nothing is closed or reported, so
    /// the metrics show what `Close` would do before it is switched on.
    Warn,
    /// Discard it and count it; the connection stays open.
    Drop,
    /// Discard it, and close the connection (1008) once it reaches
    /// [`Limits::violation_threshold`] violations within
    /// [`Limits::violation_window`]; the source is then reported.
    Close,
}

/// What happens when a client does not read what the server sends fast
/// enough and its bounded outbound queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Drop the oldest queued message to make room: for feeds where only
    /// recent data matters.
    DropOldest,
    /// Close the connection: WebSockets with 1008, SSE subscribers with an
    /// eviction event that tells the client when to come back.
    Close,
}

/// The limits a [`super::Guard`] enforces.
///
/// Start from `Limits::default()` and override fields:
/// `Limits { per_ip_max_connections: 4, ..Limits::default() }`. The
/// defaults suit a chat-like service where one browser tab holds one or two
/// connections and sends a few messages a second; raise the per-IP limits
/// for clients behind large NATs, or key limits by identity instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    // --- Admission (WebSocket upgrades and SSE subscriptions together) ---
    /// Open connections of all kinds from all sources. Default 10 000.
    pub max_connections: u32,
    /// Open connections per source address. Default 32.
    pub per_ip_max_connections: u32,
    /// New connections per second per source address, refilling a bucket of
    /// `per_ip_connect_burst`. Defaults 5/s, burst 20.
    pub per_ip_connect_rate: u32,
    pub per_ip_connect_burst: u32,
    /// The same per app-supplied identity, when there is one. Defaults 8
    /// open, 2/s, burst 10.
    pub per_identity_max_connections: u32,
    pub per_identity_connect_rate: u32,
    pub per_identity_connect_burst: u32,
    /// `Retry-After` for a source at its concurrency cap. Default 10 s.
    pub retry_after_cap: Duration,
    /// `Retry-After` when the whole service is full, before jitter (up to
    /// as much again is added so clients do not return together). Default
    /// 15 s.
    pub retry_after_global: Duration,
    /// What one "source" is: an IPv4 /32 and an IPv6 /64 by default, as in
    /// the kernel's cap, so one host cannot spread over its /64.
    pub source_prefix_v4: u8,
    pub source_prefix_v6: u8,
    /// Open connections per aggregate prefix (an IPv4 /24 and an IPv6 /48
    /// by default, `aggregate_prefix_v4`/`_v6`), refused with 429 like the
    /// per-source cap. Without it, sources of one network add up: a /48 is
    /// what one customer is routinely given, 65 536 /64s, so a single site
    /// could take every global slot 32 at a time. Defaults 1 024 each: a
    /// tenth of `max_connections`, so no one network fills the service,
    /// while a NAT or office behind a few addresses of a /24 keeps 30 times
    /// what one source may hold. Raise it for big carrier-grade NAT pools.
    pub per_prefix_max_connections_v4: u32,
    pub per_prefix_max_connections_v6: u32,
    pub aggregate_prefix_v4: u8,
    pub aggregate_prefix_v6: u8,
    /// Most sources (and identities) tracked; past it, an eighth of them is
    /// forgotten early: those with the least at stake (a refilled bucket, no
    /// attempts in the storm window) first, then the longest unseen, never
    /// one with a connection open. A rate-limited source keeps its state
    /// however many others churn through. Must be at least
    /// `max_connections`. Default 65 536.
    pub max_tracked_sources: usize,
    /// How long an idle source's state (rate bucket, storm window) is kept.
    /// Default 120 s.
    pub source_idle_ttl: Duration,

    // --- WebSocket buffers (when guard's server did the upgrade) ---
    /// What tungstenite allocates up front for reading, for the life of the
    /// connection; longer messages are read in pieces of this size into a
    /// buffer that grows to the message. Default 4 KiB: an idle connection
    /// holds it forever (tungstenite's own default, 128 KiB, made an idle
    /// WebSocket cost 138 KiB). While a peer keeps the socket full, guard's
    /// frame meter below the codec reads 64 KiB at a time and hands it out
    /// in these pieces, so a busy connection costs no more reads of the
    /// socket than with a large buffer; that buffer is freed as soon as the
    /// socket runs dry.
    pub ws_read_buffer_size: usize,
    /// Outbound frames gather up to this much before they are written (a
    /// flush writes them anyway); the buffer keeps what it grew to. Default
    /// 4 KiB.
    pub ws_write_buffer_size: usize,
    /// The most the outbound buffer may hold while the socket refuses
    /// writes (the bounded queue in front of it holds the rest). A single
    /// outbound message bigger than this fails the connection. Must exceed
    /// `ws_write_buffer_size`. Default 4 MiB. Below the codec, guard's frame
    /// meter gathers up to 64 KiB more for one write (freed once the socket
    /// has taken it), so a peer that stops reading holds at most this plus
    /// 64 KiB of a connection's memory before its send queue starts filling.
    pub ws_max_write_buffer_size: usize,

    // --- WebSocket messages ---
    /// Largest message and frame, enforced by the WebSocket codec itself so
    /// nothing bigger is ever buffered; a bigger one closes the connection
    /// with 1009. Defaults 64 KiB each.
    pub max_message_size: usize,
    pub max_frame_size: usize,
    /// Messages per second per connection (control frames included), and
    /// the burst. When guard's server did the upgrade every frame counts,
    /// as it arrives: a message sent in ten fragments costs ten, so empty
    /// continuation frames are a flood like any other. A rate of 0 makes
    /// the burst a budget for the connection's lifetime. Per connection even with an identity: an identity's total
    /// is bounded by `per_identity_max_connections` times this. Defaults
    /// 50/s, burst 100.
    pub message_rate: u32,
    pub message_burst: u32,
    /// Bytes per second per connection, and the burst (at least
    /// `max_message_size`); payload bytes, charged per frame as they arrive
    /// when guard's server did the upgrade. Defaults 256 KiB/s, burst 1 MiB.
    pub byte_rate: u32,
    pub byte_burst: u32,
    /// Default [`ViolationPolicy::Close`].
    pub violation_policy: ViolationPolicy,
    /// Violations within `violation_window` that make a connection abusive.
    /// When most of them are rate violations it is a flood. Defaults 20 in
    /// 10 s.
    pub violation_threshold: u32,
    pub violation_window: Duration,
    /// Close a connection the peer has sent nothing on (pongs count) for
    /// this long. Default 60 s; `None` never.
    pub idle_timeout: Option<Duration>,
    /// Ping the peer this often so that a quiet but live client answers
    /// with pongs and a dead one is found. Default 20 s; `None` never.
    pub ping_interval: Option<Duration>,
    /// How long a close frame may take to go out before the socket is just
    /// dropped (a slow consumer may never read it). Default 2 s.
    pub close_timeout: Duration,

    // --- Outbound (both kinds) ---
    /// Messages queued toward one WebSocket client. Default 256.
    pub outbound_queue: usize,
    /// Events queued toward one SSE subscriber. Default 64.
    pub sse_buffer: usize,
    /// Default [`SlowConsumerPolicy::Close`].
    pub slow_consumer_policy: SlowConsumerPolicy,

    // --- SSE ---
    /// A comment line is sent after this much silence. Default 15 s.
    pub sse_keep_alive: Duration,
    /// The `retry:` a subscriber is given (first event and eviction): the
    /// base plus up to `sse_retry_jitter`, so reconnects spread out.
    /// Defaults 3 s + up to 7 s.
    pub sse_retry_base: Duration,
    pub sse_retry_jitter: Duration,

    // --- Abuse detection and reporting ---
    /// Connection attempts (admitted or not) from one source within
    /// `storm_window` that make a reconnect storm. Defaults 60 in 10 s.
    pub storm_threshold: u32,
    pub storm_window: Duration,
    /// With identities: distinct identities from one source that must be
    /// closed for abuse within `source_idle_ttl` before the source itself
    /// is reported (one bad user behind a NAT is not the NAT's fault; its
    /// connections are closed all the same). Default 3.
    pub identity_offenders_to_report: u32,
    /// How long the agent should block a reported source. Default 10 min.
    pub report_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        const KIB: usize = 1024;
        Self {
            max_connections: 10_000,
            per_ip_max_connections: 32,
            per_ip_connect_rate: 5,
            per_ip_connect_burst: 20,
            per_identity_max_connections: 8,
            per_identity_connect_rate: 2,
            per_identity_connect_burst: 10,
            retry_after_cap: Duration::from_secs(10),
            retry_after_global: Duration::from_secs(15),
            source_prefix_v4: 32,
            source_prefix_v6: 64,
            per_prefix_max_connections_v4: 1024,
            per_prefix_max_connections_v6: 1024,
            aggregate_prefix_v4: 24,
            aggregate_prefix_v6: 48,
            max_tracked_sources: 65_536,
            source_idle_ttl: Duration::from_secs(120),

            ws_read_buffer_size: 4 * KIB,
            ws_write_buffer_size: 4 * KIB,
            ws_max_write_buffer_size: 4096 * KIB,

            max_message_size: 64 * KIB,
            max_frame_size: 64 * KIB,
            message_rate: 50,
            message_burst: 100,
            byte_rate: 256 * KIB as u32,
            byte_burst: 1024 * KIB as u32,
            violation_policy: ViolationPolicy::Close,
            violation_threshold: 20,
            violation_window: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(60)),
            ping_interval: Some(Duration::from_secs(20)),
            close_timeout: Duration::from_secs(2),

            outbound_queue: 256,
            sse_buffer: 64,
            slow_consumer_policy: SlowConsumerPolicy::Close,

            sse_keep_alive: Duration::from_secs(15),
            sse_retry_base: Duration::from_secs(3),
            sse_retry_jitter: Duration::from_secs(7),

            storm_threshold: 60,
            storm_window: Duration::from_secs(10),
            identity_offenders_to_report: 3,
            report_ttl: Duration::from_secs(600),
        }
    }
}

impl Limits {
    /// Rejects combinations that could never work, with what to change.
    pub fn validate(&self) -> Result<(), GuardError> {
        let bad = |what: &str| Err(GuardError::Limits(what.to_owned()));
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1");
        }
        if self.max_tracked_sources < self.max_connections as usize {
            return bad("max_tracked_sources must be at least max_connections, or open connections could not all be tracked");
        }
        if self.source_prefix_v4 == 0 || self.source_prefix_v4 > 32 {
            return bad("source_prefix_v4 must be 1..=32");
        }
        if self.source_prefix_v6 == 0 || self.source_prefix_v6 > 128 {
            return bad("source_prefix_v6 must be 1..=128");
        }
        if self.aggregate_prefix_v4 == 0 || self.aggregate_prefix_v4 > self.source_prefix_v4 {
            return bad(
                "aggregate_prefix_v4 must be 1..=source_prefix_v4 (an aggregate holds sources)",
            );
        }
        if self.aggregate_prefix_v6 == 0 || self.aggregate_prefix_v6 > self.source_prefix_v6 {
            return bad(
                "aggregate_prefix_v6 must be 1..=source_prefix_v6 (an aggregate holds sources)",
            );
        }
        if self.per_prefix_max_connections_v4 < self.per_ip_max_connections
            || self.per_prefix_max_connections_v6 < self.per_ip_max_connections
        {
            return bad("per_prefix_max_connections_v4 and _v6 must be at least per_ip_max_connections, or a lone source could never reach its own cap");
        }
        if self.ws_read_buffer_size < 64 {
            return bad("ws_read_buffer_size must be at least 64 bytes");
        }
        if self.ws_max_write_buffer_size <= self.ws_write_buffer_size {
            return bad("ws_max_write_buffer_size must exceed ws_write_buffer_size");
        }
        if self.max_message_size == 0 || self.max_frame_size == 0 {
            return bad("max_message_size and max_frame_size must be at least 1");
        }
        if self.max_frame_size > self.max_message_size {
            return bad("max_frame_size must not exceed max_message_size");
        }
        if (self.byte_burst as usize) < self.max_message_size {
            return bad("byte_burst must be at least max_message_size, or the largest allowed message could never pass");
        }
        if self.message_burst == 0 {
            return bad("message_burst must be at least 1");
        }
        if self.violation_threshold == 0 {
            return bad("violation_threshold must be at least 1");
        }
        if self.violation_window.is_zero() || self.storm_window.is_zero() {
            return bad("violation_window and storm_window must be longer than zero");
        }
        if self.outbound_queue == 0 || self.sse_buffer == 0 {
            return bad("outbound_queue and sse_buffer must be at least 1");
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero())
            || self.ping_interval.is_some_and(|d| d.is_zero())
        {
            return bad(
                "idle_timeout and ping_interval must be longer than zero (None turns them off)",
            );
        }
        if self.sse_keep_alive.is_zero() {
            return bad("sse_keep_alive must be longer than zero");
        }
        if self.storm_threshold == 0 || self.identity_offenders_to_report == 0 {
            return bad("storm_threshold and identity_offenders_to_report must be at least 1");
        }
        Ok(())
    }

    /// The codec's settings for a WebSocket guard upgraded itself.
    pub(crate) fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.ws_read_buffer_size)
            .write_buffer_size(self.ws_write_buffer_size)
            .max_write_buffer_size(self.ws_max_write_buffer_size)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let cases = [
            Limits {
                max_frame_size: 2,
                max_message_size: 1,
                ..Limits::default()
            },
            Limits {
                byte_burst: 10,
                ..Limits::default()
            },
            Limits {
                max_tracked_sources: 5,
                ..Limits::default()
            },
            Limits {
                source_prefix_v4: 33,
                ..Limits::default()
            },
            Limits {
                idle_timeout: Some(Duration::ZERO),
                ..Limits::default()
            },
            Limits {
                outbound_queue: 0,
                ..Limits::default()
            },
            Limits {
                ws_max_write_buffer_size: 4096,
                ws_write_buffer_size: 4096,
                ..Limits::default()
            },
            Limits {
                ws_read_buffer_size: 0,
                ..Limits::default()
            },
            Limits {
                aggregate_prefix_v6: 80,
                ..Limits::default()
            },
            Limits {
                per_prefix_max_connections_v4: 4,
                ..Limits::default()
            },
        ];
        for limits in cases {
            assert!(limits.validate().is_err(), "{limits:?}");
        }
    }
}
