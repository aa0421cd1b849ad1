//! The one-line JSON reports `lab-client` prints, shared with the toolkit that parses them so
//! the schema has a single definition.
//!
//! Every report has `cmd` (the subcommand) and `elapsed_ms` (informational only: gate on the
//! counts, never on times). Latencies are reported for humans reading bench output.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `lab-client probe`: sequential TCP connects from one source, the lost-SYN signal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub cmd: String,
    pub attempted: u64,
    /// Handshakes that completed.
    pub connected: u64,
    /// Completed handshakes whose SYN had to be resent (TCP_INFO `tcpi_total_retrans > 0`).
    pub retransmitted: u64,
    /// Connects refused or failed with another error.
    pub failed: u64,
    /// Connects that did not finish within `--connect-timeout-ms`.
    pub timed_out: u64,
    /// `retransmitted + failed + timed_out`: attempts whose first SYN did not make it.
    pub lost_syn: u64,
    /// Informational; bimodal under loss (~RTT or ~1 s for a resent SYN).
    pub connect_ms_p50: f64,
    pub connect_ms_p99: f64,
    pub elapsed_ms: u64,
}

/// `lab-client syn-flood`: SYNs at a fixed pace from a raw socket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SynFloodReport {
    pub cmd: String,
    pub sent: u64,
    /// Frames the device had no room for (not sent, not counted in `sent`).
    pub no_room: u64,
    /// The latest any frame left after its due time, in µs: how far the pace ever slipped.
    pub late_max_us: u64,
    /// Frames that left more than 1 ms late (sent in a catch-up burst).
    pub late_frames: u64,
    pub elapsed_ms: u64,
}

/// The name `syn_loss_probe` callers use for a probe's outcome.
pub type ProbeResult = ProbeReport;

/// `lab-client ws-chat`: well-behaved WebSocket clients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WsChatReport {
    pub cmd: String,
    pub clients: u64,
    /// Successful handshakes, reconnects included.
    pub connects: u64,
    /// Handshakes answered with an HTTP status instead of 101, by status.
    pub rejected: BTreeMap<u16, u64>,
    pub sent: u64,
    pub received: u64,
    /// Connect, handshake, send or receive errors (not counting clean closes).
    pub errors: u64,
    /// Close codes the server sent, by code.
    pub close_codes: BTreeMap<u16, u64>,
    pub elapsed_ms: u64,
}

/// `lab-client sse`: well-behaved SSE subscribers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SseReport {
    pub cmd: String,
    pub clients: u64,
    /// Responses with status 200.
    pub subscriptions: u64,
    /// Subscriptions after a client's first (the stream ended or failed and it came back).
    pub reconnects: u64,
    /// Non-200 responses, by status.
    pub rejected: BTreeMap<u16, u64>,
    pub events: u64,
    /// Comment lines (keep-alives).
    pub comments: u64,
    pub errors: u64,
    pub elapsed_ms: u64,
}

/// `lab-client ws-flood`: one admitted client spamming frames.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WsFloodReport {
    pub cmd: String,
    /// Whether the handshake succeeded at all.
    pub connected: bool,
    /// HTTP status if the handshake was refused.
    pub handshake_status: Option<u16>,
    /// Frames written into the socket.
    pub sent: u64,
    pub received: u64,
    /// The close code the server sent (1008 = policy violation), if it closed.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// Set when the connection ended without a close frame (reset, protocol error).
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

/// `lab-client conn-flood`: many real TCP handshakes, held briefly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnFloodReport {
    pub cmd: String,
    /// Connects started.
    pub attempted: u64,
    pub connected: u64,
    /// Answered with RST.
    pub refused: u64,
    /// Other connect errors.
    pub failed: u64,
    pub timed_out: u64,
    /// Started but cut off by `--secs` or SIGINT.
    pub unfinished: u64,
    /// Never started because time ran out.
    pub not_started: u64,
    pub elapsed_ms: u64,
}

/// `lab-client slow-heads`: one never-ending request head per source, reopened when closed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlowHeadsReport {
    pub cmd: String,
    pub sources: u64,
    /// Connects started, first ones and reconnects.
    pub connects: u64,
    pub connected: u64,
    /// Answered with RST (or dropped and then refused): a block or a full backlog.
    pub refused: u64,
    pub timed_out: u64,
    pub failed: u64,
    /// Connections the server ended (a close, a reset or an answer to the unfinished head).
    pub closed_by_server: u64,
    /// Most slow connections open at once.
    pub peak_open: u64,
    pub open_at_end: u64,
    pub elapsed_ms: u64,
}

/// `lab-client ws-storm` / `sse-storm`: handshake or subscription storms from one source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    pub cmd: String,
    pub attempted: u64,
    /// 101 for WebSocket, 200 for SSE.
    pub accepted: u64,
    pub rejected_429: u64,
    pub rejected_503: u64,
    /// Any other HTTP status, by status.
    pub other_status: BTreeMap<u16, u64>,
    /// TCP or protocol errors (including the server closing before answering).
    pub failed: u64,
    pub timed_out: u64,
    pub unfinished: u64,
    pub not_started: u64,
    pub elapsed_ms: u64,
}

/// `lab-client serve-echo`: a TCP echo server with a real backlog, for lab plumbing tests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EchoReport {
    pub cmd: String,
    pub accepted: u64,
    pub bytes_echoed: u64,
    pub elapsed_ms: u64,
}
