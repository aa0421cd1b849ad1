//! The command line: one subcommand per workload, each bounded in count and in time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::{Args, Parser, Subcommand};
use guard_tests::netns::parse_mac;
use guard_tests::wire::parse_v4_net;

#[derive(Parser)]
#[command(
    name = "lab-client",
    about = "Bounded lab traffic: probes, legit WS/SSE clients, floods and storms (one JSON line out)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Sequential TCP connects; counts SYNs lost (retransmitted per TCP_INFO, failed, timed out).
    Probe(ProbeArgs),
    /// Well-behaved WebSocket clients sending small messages at a low rate.
    WsChat(WsChatArgs),
    /// Well-behaved SSE subscribers that reconnect when their stream ends.
    Sse(SseArgs),
    /// One WebSocket client spamming frames; reports the close code it got.
    WsFlood(WsFloodArgs),
    /// Many real TCP handshakes, each held briefly then closed.
    ConnFlood(ConnFloodArgs),
    /// Raw SYNs at a fixed pace (one every 1/rate s), from one source or random ones in a
    /// network; spins on its core between frames.
    SynFlood(SynFloodArgs),
    /// A storm of WebSocket handshakes from one source.
    WsStorm(StormArgs),
    /// A storm of SSE subscriptions from one source.
    SseStorm(StormArgs),
    /// A TCP echo server with a real listen backlog (for lab plumbing tests).
    ServeEcho(EchoArgs),
    /// One never-ending request head per source, from many sources; reopened when closed.
    SlowHeads(SlowHeadsArgs),
}

impl Cmd {
    /// `--secs`: every subcommand has one.
    pub(crate) fn secs(&self) -> u64 {
        match self {
            Cmd::Probe(a) => a.secs,
            Cmd::WsChat(a) => a.crowd.secs,
            Cmd::Sse(a) => a.crowd.secs,
            Cmd::WsFlood(a) => a.secs,
            Cmd::ConnFlood(a) => a.secs,
            Cmd::SynFlood(a) => u64::from(a.secs),
            Cmd::WsStorm(a) | Cmd::SseStorm(a) => a.secs,
            Cmd::ServeEcho(a) => a.secs,
            Cmd::SlowHeads(a) => a.secs,
        }
    }
}

/// Where connections come from; the address must belong to the namespace it runs in.
#[derive(Args, Clone, Copy)]
pub(crate) struct Source {
    /// Source address to bind (default: chosen by the kernel).
    #[arg(long)]
    pub(crate) bind: Option<IpAddr>,
}

#[derive(Args)]
pub(crate) struct ProbeArgs {
    /// Server address, e.g. 198.18.0.1:8080.
    #[arg(long)]
    pub(crate) target: SocketAddr,
    #[command(flatten)]
    pub(crate) src: Source,
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) count: u64,
    /// Spacing between connect starts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) interval_ms: u64,
    /// Give up on one connect after this long (3000 allows one SYN retransmission at ~1 s).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) connect_timeout_ms: u64,
    /// Hard bound on the whole run.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
    /// Wait this long before the first connect, so that starting this process (exec, loading,
    /// the runtime's threads) is over before any connect is counted.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub(crate) start_delay_ms: u64,
}

/// The well-behaved clients of ws-chat and sse: how many, from where, for how long.
#[derive(Args)]
pub(crate) struct Crowd {
    #[command(flatten)]
    pub(crate) src: Source,
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub(crate) clients: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
}

#[derive(Args)]
pub(crate) struct WsChatArgs {
    /// e.g. ws://198.18.0.1:8080/ws
    #[arg(long)]
    pub(crate) url: String,
    #[command(flatten)]
    pub(crate) crowd: Crowd,
    /// Messages per second per client.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub(crate) rate: u64,
    /// Connect + handshake timeout.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) timeout_ms: u64,
    /// Text of each message; `{client}` and `{n}` are replaced by the client number and the
    /// message count (the app may expect its own format, e.g. JSON).
    #[arg(long, default_value = "lab-client {client} message {n}")]
    pub(crate) message: String,
}

#[derive(Args)]
pub(crate) struct SseArgs {
    /// e.g. http://198.18.0.1:8080/events
    #[arg(long)]
    pub(crate) url: String,
    #[command(flatten)]
    pub(crate) crowd: Crowd,
    /// Connect + response head timeout.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) timeout_ms: u64,
}

#[derive(Args)]
pub(crate) struct WsFloodArgs {
    #[arg(long)]
    pub(crate) url: String,
    #[command(flatten)]
    pub(crate) src: Source,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
    /// Frames per second.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) rate: u64,
    /// Bytes per text frame.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub(crate) size: u64,
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) timeout_ms: u64,
}

#[derive(Args)]
pub(crate) struct SynFloodArgs {
    /// Interface to send from (inside this namespace).
    #[arg(long)]
    pub(crate) iface: String,
    /// Sources: one address (/32) or random ones in a network inside 198.18.0.0/15.
    #[arg(long, value_parser = parse_v4_net)]
    pub(crate) src_net: (Ipv4Addr, u8),
    #[arg(long)]
    pub(crate) dst: Ipv4Addr,
    /// MAC addresses as aa:bb:cc:dd:ee:ff.
    #[arg(long, value_parser = parse_mac)]
    pub(crate) src_mac: [u8; 6],
    #[arg(long, value_parser = parse_mac)]
    pub(crate) dst_mac: [u8; 6],
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) port: u16,
    /// SYNs per second.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    pub(crate) rate: u32,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub(crate) secs: u32,
}

#[derive(Args)]
pub(crate) struct ConnFloodArgs {
    #[arg(long)]
    pub(crate) target: SocketAddr,
    #[command(flatten)]
    pub(crate) src: Source,
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) count: u64,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub(crate) parallel: u64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
    /// How long each established connection is held before closing.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub(crate) hold_ms: u64,
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) connect_timeout_ms: u64,
}

#[derive(Args)]
pub(crate) struct StormArgs {
    /// ws:// for ws-storm, http:// for sse-storm.
    #[arg(long)]
    pub(crate) url: String,
    #[command(flatten)]
    pub(crate) src: Source,
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) count: u64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub(crate) parallel: u64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
    /// How long an accepted connection is held (so concurrency caps can bite).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub(crate) hold_ms: u64,
    /// Connect + handshake/response timeout.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) timeout_ms: u64,
}

#[derive(Args)]
pub(crate) struct EchoArgs {
    /// Address to listen on, e.g. 198.18.0.1:9000.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub(crate) backlog: u32,
    /// Stop serving after this long.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_bounds_are_enforced() {
        let ok = Cli::try_parse_from([
            "lab-client",
            "probe",
            "--target",
            "198.18.0.1:8080",
            "--bind",
            "198.18.0.2",
            "--count",
            "400",
            "--interval-ms",
            "10",
        ]);
        assert!(ok.is_ok());
        for bad in [
            &[
                "lab-client",
                "probe",
                "--target",
                "198.18.0.1:8080",
                "--count",
                "0",
            ][..],
            &[
                "lab-client",
                "conn-flood",
                "--target",
                "198.18.0.1:80",
                "--secs",
                "0",
            ],
            &[
                "lab-client",
                "ws-flood",
                "--url",
                "ws://198.18.0.1/ws",
                "--rate",
                "0",
            ],
            &["lab-client", "probe", "--target", "not-an-address"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }
}

#[derive(Args)]
pub(crate) struct SlowHeadsArgs {
    #[arg(long)]
    pub(crate) target: SocketAddr,
    /// The sources: the first `--sources` host addresses of this network, which the namespace
    /// must own (e.g. a `local` route for it).
    #[arg(long, value_parser = parse_v4_net)]
    pub(crate) src_net: (Ipv4Addr, u8),
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) sources: u64,
    /// One more header line per connection this often.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub(crate) interval_ms: u64,
    /// Wait this long after the server closed a connection before opening the next.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub(crate) reconnect_ms: u64,
    /// Spread the sources' first connects over this long.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub(crate) ramp_ms: u64,
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) connect_timeout_ms: u64,
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) secs: u64,
}
