//! lab-client: the traffic generator the lab runs inside network namespaces.
//!
//! Every subcommand is bounded in count and in time (`--secs`), stops early and still reports
//! on SIGINT, refuses targets outside the lab ranges, and prints exactly one JSON line on
//! stdout (the structs in `guard_tests::report`). Diagnostics go to stderr.
//!
//! It runs on a single-threaded runtime: one core's worth of load that a bench can pin with
//! taskset, and shared counters that need no locking.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::stream::StreamExt;
use futures_util::SinkExt;
use guard_tests::netns::parse_mac;
use guard_tests::paced_syn::{self, SynSpec};
use guard_tests::report::{
    ConnFloodReport, EchoReport, ProbeReport, SseReport, StormReport, WsChatReport, WsFloodReport,
};
use guard_tests::wire::{
    ensure_lab_ip, parse_response_head, parse_target_url, parse_v4_net, ChunkedDecoder, Pacer,
    ResponseHead, SseParser, Target,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

#[derive(Parser)]
#[command(
    name = "lab-client",
    about = "Bounded lab traffic: probes, legit WS/SSE clients, floods and storms (one JSON line out)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
}

/// Where connections come from; the address must belong to the namespace it runs in.
#[derive(Args, Clone, Copy)]
struct Source {
    /// Source address to bind (default: chosen by the kernel).
    #[arg(long)]
    bind: Option<IpAddr>,
}

#[derive(Args)]
struct ProbeArgs {
    /// Server address, e.g. 198.18.0.1:8080.
    #[arg(long)]
    target: SocketAddr,
    #[command(flatten)]
    src: Source,
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    /// Spacing between connect starts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    interval_ms: u64,
    /// Give up on one connect after this long (3000 allows one SYN retransmission at ~1 s).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    connect_timeout_ms: u64,
    /// Hard bound on the whole run.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// Wait this long before the first connect, so that starting this process (exec, loading,
    /// the runtime's threads) is over before any connect is counted.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    start_delay_ms: u64,
}

#[derive(Args)]
struct WsChatArgs {
    /// e.g. ws://198.18.0.1:8080/ws
    #[arg(long)]
    url: String,
    #[command(flatten)]
    src: Source,
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    clients: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// Messages per second per client.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rate: u64,
    /// Connect + handshake timeout.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
    /// Text of each message; `{client}` and `{n}` are replaced by the client number and the
    /// message count (the app may expect its own format, e.g. JSON).
    #[arg(long, default_value = "lab-client {client} message {n}")]
    message: String,
}

#[derive(Args)]
struct SseArgs {
    /// e.g. http://198.18.0.1:8080/events
    #[arg(long)]
    url: String,
    #[command(flatten)]
    src: Source,
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    clients: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// Connect + response head timeout.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
}

#[derive(Args)]
struct WsFloodArgs {
    #[arg(long)]
    url: String,
    #[command(flatten)]
    src: Source,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// Frames per second.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rate: u64,
    /// Bytes per text frame.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    size: u64,
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
}

#[derive(Args)]
struct SynFloodArgs {
    /// Interface to send from (inside this namespace).
    #[arg(long)]
    iface: String,
    /// Sources: one address (/32) or random ones in a network inside 198.18.0.0/15.
    #[arg(long, value_parser = parse_v4_net)]
    src_net: (Ipv4Addr, u8),
    #[arg(long)]
    dst: Ipv4Addr,
    /// MAC addresses as aa:bb:cc:dd:ee:ff.
    #[arg(long, value_parser = parse_mac)]
    src_mac: [u8; 6],
    #[arg(long, value_parser = parse_mac)]
    dst_mac: [u8; 6],
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// SYNs per second.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    rate: u32,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3600))]
    secs: u32,
}

/// Set by SIGINT: the synchronous sender stops and still reports.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The paced sender spins rather than awaits, so it runs outside the runtime.
fn syn_flood(a: SynFloodArgs) -> Result<String> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let spec = SynSpec {
        src_net: a.src_net,
        dst: a.dst,
        src_mac: a.src_mac,
        dst_mac: a.dst_mac,
        port: a.port,
    };
    let report = paced_syn::send(&a.iface, &spec, a.rate, a.secs, &INTERRUPTED)?;
    serde_json::to_string(&report).context("cannot encode the report")
}

#[derive(Args)]
struct ConnFloodArgs {
    #[arg(long)]
    target: SocketAddr,
    #[command(flatten)]
    src: Source,
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    parallel: u64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// How long each established connection is held before closing.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    hold_ms: u64,
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    connect_timeout_ms: u64,
}

#[derive(Args)]
struct StormArgs {
    /// ws:// for ws-storm, http:// for sse-storm.
    #[arg(long)]
    url: String,
    #[command(flatten)]
    src: Source,
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    count: u64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    parallel: u64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
    /// How long an accepted connection is held (so concurrency caps can bite).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    hold_ms: u64,
    /// Connect + handshake/response timeout.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    timeout_ms: u64,
}

#[derive(Args)]
struct EchoArgs {
    /// Address to listen on, e.g. 198.18.0.1:9000.
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    backlog: u32,
    /// Stop serving after this long.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::SynFlood(a) = cli.cmd {
        return finish(syn_flood(a));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lab-client: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    finish(runtime.block_on(run(cli.cmd)))
}

fn finish(outcome: Result<String>) -> ExitCode {
    match outcome {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lab-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<String> {
    raise_fd_limit();
    let started = Instant::now();
    let ms = || started.elapsed().as_millis() as u64;
    let json = match cmd {
        Cmd::Probe(a) => {
            let stop = Stop::after(a.secs);
            let mut r = probe(a, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::WsChat(a) => {
            let stop = Stop::after(a.secs);
            let mut r = ws_chat(a, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::Sse(a) => {
            let stop = Stop::after(a.secs);
            let mut r = sse(a, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::WsFlood(a) => {
            let stop = Stop::after(a.secs);
            let mut r = ws_flood(a, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::ConnFlood(a) => {
            let stop = Stop::after(a.secs);
            let mut r = conn_flood(a, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::WsStorm(a) => {
            let stop = Stop::after(a.secs);
            let mut r = storm(a, StormKind::Ws, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::SseStorm(a) => {
            let stop = Stop::after(a.secs);
            let mut r = storm(a, StormKind::Sse, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::ServeEcho(a) => {
            let stop = Stop::after(a.secs);
            let mut r = serve_echo(a, &stop).await?;
            r.elapsed_ms = ms();
            serde_json::to_string(&r)
        }
        Cmd::SynFlood(_) => unreachable!("handled before the runtime starts"),
    };
    json.context("cannot encode the report")
}

/// Floods and storms hold many sockets; the default soft limit (1024) would turn a
/// `--parallel 2000` run into EMFILE failures that look like server rejections. Raising the
/// soft limit to the hard one only affects this process.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The end of a run: `--secs` elapsed or SIGINT (ChildGuard stops us that way and still wants
/// the report).
#[derive(Clone)]
struct Stop {
    deadline: tokio::time::Instant,
    signalled: watch::Receiver<bool>,
}

impl Stop {
    fn after(secs: u64) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(true);
            }
            // Keep the sender alive: a dropped sender must not read as "stop now".
            std::future::pending::<()>().await;
        });
        Self {
            deadline: tokio::time::Instant::now() + Duration::from_secs(secs),
            signalled: rx,
        }
    }

    fn is_over(&self) -> bool {
        tokio::time::Instant::now() >= self.deadline || *self.signalled.borrow()
    }

    async fn wait(&self) {
        let mut rx = self.signalled.clone();
        tokio::select! {
            _ = sleep_until(self.deadline) => {}
            _ = rx.wait_for(|s| *s) => {}
        }
    }

    /// Sleeps `d` unless the run ends first; returns false if it ended.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = sleep(d) => !self.is_over(),
            _ = self.wait() => false,
        }
    }
}

/// Runs `work` until it finishes or the run ends; returns whether it finished.
async fn until_stopped<F: Future>(stop: &Stop, work: F) -> bool {
    tokio::select! {
        _ = work => true,
        _ = stop.wait() => false,
    }
}

/// A TCP socket of the target's family, bound to `bind` if given.
fn socket_for(bind: Option<IpAddr>, target: SocketAddr) -> Result<TcpSocket> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a TCP socket")?;
    if let Some(ip) = bind {
        ensure!(
            ip.is_ipv4() == target.is_ipv4(),
            "--bind {ip} and target {target} are of different IP families"
        );
        // Defer the port choice to connect(): with a plain bind(ip:0) every socket would
        // reserve a port for all destinations, and a flood would run out after ~28k.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a local c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("setsockopt IP_BIND_ADDRESS_NO_PORT");
        }
        sock.bind(SocketAddr::new(ip, 0)).with_context(|| {
            format!("cannot bind to {ip}: is it an address of this network namespace?")
        })?;
    }
    Ok(sock)
}

enum ConnectError {
    TimedOut,
    Refused,
    Other(io::Error),
}

/// One connect attempt. Socket setup problems are errors of the run (bad `--bind`); what the
/// network does to the attempt is a `ConnectError` to count.
async fn connect(
    bind: Option<IpAddr>,
    target: SocketAddr,
    limit: Duration,
) -> Result<std::result::Result<TcpStream, ConnectError>> {
    let sock = socket_for(bind, target)?;
    Ok(match timeout(limit, sock.connect(target)).await {
        Err(_) => Err(ConnectError::TimedOut),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ConnectError::Refused),
        Ok(Err(e)) => Err(ConnectError::Other(e)),
    })
}

/// Retransmissions so far on `stream`; right after connect these can only be SYNs.
fn total_retrans(stream: &TcpStream) -> Result<u32> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, writing at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getsockopt TCP_INFO");
    }
    Ok(info.tcpi_total_retrans)
}

/// Prints the first few errors of a kind to stderr: enough to diagnose, bounded under floods.
struct ErrorLog {
    left: Cell<u32>,
}

impl ErrorLog {
    fn new() -> Self {
        Self { left: Cell::new(5) }
    }

    fn note(&self, what: &str, err: &dyn std::fmt::Display) {
        let left = self.left.get();
        if left > 0 {
            self.left.set(left - 1);
            eprintln!("lab-client: {what}: {err}");
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn probe(a: ProbeArgs, stop: &Stop) -> Result<ProbeReport> {
    ensure_lab_ip(a.target.ip())?;
    // Fail on a bad --bind before counting anything.
    socket_for(a.src.bind, a.target)?;
    let limit = Duration::from_millis(a.connect_timeout_ms);
    let mut r = ProbeReport {
        cmd: "probe".into(),
        ..Default::default()
    };
    let errors = ErrorLog::new();
    let mut times = Vec::new();
    if !until_stopped(
        stop,
        tokio::time::sleep(Duration::from_millis(a.start_delay_ms)),
    )
    .await
    {
        return Ok(r);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(a.interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for _ in 0..a.count {
        if !until_stopped(stop, tick.tick()).await {
            break;
        }
        let t0 = Instant::now();
        let attempt = tokio::select! {
            res = connect(a.src.bind, a.target, limit) => res?,
            _ = stop.wait() => break,
        };
        r.attempted += 1;
        match attempt {
            Ok(stream) => {
                times.push(t0.elapsed().as_secs_f64() * 1000.0);
                r.connected += 1;
                if total_retrans(&stream)? > 0 {
                    r.retransmitted += 1;
                }
            }
            Err(ConnectError::TimedOut) => r.timed_out += 1,
            Err(ConnectError::Refused) => {
                errors.note("connect", &"connection refused");
                r.failed += 1;
            }
            Err(ConnectError::Other(e)) => {
                errors.note("connect", &e);
                r.failed += 1;
            }
        }
    }
    r.lost_syn = r.retransmitted + r.failed + r.timed_out;
    times.sort_by(f64::total_cmp);
    r.connect_ms_p50 = percentile(&times, 0.50);
    r.connect_ms_p99 = percentile(&times, 0.99);
    Ok(r)
}

enum HandshakeError {
    Status(u16),
    TimedOut,
    Failed(String),
}

/// TCP connect from `bind`, then the WebSocket handshake over that socket.
async fn ws_connect(
    bind: Option<IpAddr>,
    target: &Target,
    limit: Duration,
) -> Result<std::result::Result<WebSocketStream<TcpStream>, HandshakeError>> {
    let stream = match connect(bind, target.addr, limit).await? {
        Ok(s) => s,
        Err(ConnectError::TimedOut) => return Ok(Err(HandshakeError::TimedOut)),
        Err(ConnectError::Refused) => {
            return Ok(Err(HandshakeError::Failed("connection refused".into())))
        }
        Err(ConnectError::Other(e)) => return Ok(Err(HandshakeError::Failed(e.to_string()))),
    };
    let url = format!("ws://{}{}", target.host_header, target.path);
    Ok(
        match timeout(limit, tokio_tungstenite::client_async(url, stream)).await {
            Err(_) => Err(HandshakeError::TimedOut),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(WsError::Http(resp))) => Err(HandshakeError::Status(resp.status().as_u16())),
            Ok(Err(e)) => Err(HandshakeError::Failed(e.to_string())),
        },
    )
}

/// The close code of a close frame; 1005 ("no status received") for a bare close.
fn close_code(frame: &Option<CloseFrame>) -> u16 {
    frame.as_ref().map_or(1005, |f| u16::from(f.code))
}

async fn ws_chat(a: WsChatArgs, stop: &Stop) -> Result<WsChatReport> {
    let target = parse_target_url(&a.url, &["ws"])?;
    socket_for(a.src.bind, target.addr)?;
    let limit = Duration::from_millis(a.timeout_ms);
    let r = RefCell::new(WsChatReport {
        cmd: "ws-chat".into(),
        clients: a.clients,
        ..Default::default()
    });
    let errors = ErrorLog::new();
    let period = Duration::from_micros(1_000_000 / a.rate);
    let (bind, message) = (a.src.bind, a.message.as_str());
    let client = |id: u64| {
        let (r, errors, target) = (&r, &errors, &target);
        async move {
            loop {
                let ws = tokio::select! {
                    ws = ws_connect(bind, target, limit) => ws?,
                    _ = stop.wait() => break,
                };
                match ws {
                    Ok(ws) => {
                        r.borrow_mut().connects += 1;
                        chat_session(id, ws, message, period, stop, r, errors).await;
                    }
                    Err(HandshakeError::Status(code)) => {
                        *r.borrow_mut().rejected.entry(code).or_default() += 1;
                    }
                    Err(HandshakeError::TimedOut) => {
                        errors.note("handshake", &"timed out");
                        r.borrow_mut().errors += 1;
                    }
                    Err(HandshakeError::Failed(e)) => {
                        errors.note("handshake", &e);
                        r.borrow_mut().errors += 1;
                    }
                }
                // A legit client comes back after a pause, not in a tight loop.
                if !stop.pause(Duration::from_millis(500)).await {
                    break;
                }
            }
            anyhow::Ok(())
        }
    };
    let results = futures_util::future::join_all((0..a.clients).map(client)).await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(r.into_inner())
}

/// A chat message from `--message`: `{client}` and `{n}` filled in.
fn render_message(template: &str, client: u64, n: u64) -> String {
    template
        .replace("{client}", &client.to_string())
        .replace("{n}", &n.to_string())
}

/// One connected chat client: a message every `period`, counting what comes back, until the
/// server closes or the run ends (then a normal close, waiting briefly for the reply).
async fn chat_session(
    id: u64,
    ws: WebSocketStream<TcpStream>,
    template: &str,
    period: Duration,
    stop: &Stop,
    r: &RefCell<WsChatReport>,
    errors: &ErrorLog,
) {
    let (mut tx, mut rx) = ws.split();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let text = render_message(template, id, n);
                match tx.send(Message::text(text)).await {
                    Ok(()) => r.borrow_mut().sent += 1,
                    Err(e) => {
                        errors.note("send", &e);
                        r.borrow_mut().errors += 1;
                        return;
                    }
                }
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => r.borrow_mut().received += 1,
                Some(Ok(Message::Close(frame))) => {
                    *r.borrow_mut().close_codes.entry(close_code(&frame)).or_default() += 1;
                    // Keep reading: tungstenite answers the close, then the stream ends.
                }
                Some(Ok(_)) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => return,
                Some(Err(e)) => {
                    errors.note("receive", &e);
                    r.borrow_mut().errors += 1;
                    return;
                }
            },
            _ = stop.wait() => {
                let bye = Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "lab-client done".into(),
                }));
                if tx.send(bye).await.is_ok() {
                    // Wait (bounded) for the server's close reply so it sees a clean close;
                    // replies to messages sent just before still count.
                    let _ = timeout(Duration::from_secs(1), async {
                        while let Some(Ok(msg)) = rx.next().await {
                            if matches!(msg, Message::Text(_) | Message::Binary(_)) {
                                r.borrow_mut().received += 1;
                            }
                        }
                    })
                    .await;
                }
                return;
            }
        }
    }
}

/// An HTTP/1.1 GET over a fresh connection from `bind`; returns the response head and any body
/// bytes that arrived with it.
async fn http_get(
    bind: Option<IpAddr>,
    target: &Target,
    accept: &str,
    limit: Duration,
) -> Result<std::result::Result<(TcpStream, ResponseHead, Vec<u8>), HandshakeError>> {
    let mut stream = match connect(bind, target.addr, limit).await? {
        Ok(s) => s,
        Err(ConnectError::TimedOut) => return Ok(Err(HandshakeError::TimedOut)),
        Err(ConnectError::Refused) => {
            return Ok(Err(HandshakeError::Failed("connection refused".into())))
        }
        Err(ConnectError::Other(e)) => return Ok(Err(HandshakeError::Failed(e.to_string()))),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\nCache-Control: no-cache\r\n\
         User-Agent: guard-lab-client\r\n\r\n",
        target.path, target.host_header
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a response",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            match parse_response_head(&buf) {
                Ok(Some((head, body_at))) => return Ok((head, buf.split_off(body_at))),
                Ok(None) if buf.len() > 65_536 => {
                    return Err(io::Error::other("response head over 64 KiB"))
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::other(format!("{e:#}"))),
            }
        }
    };
    Ok(match timeout(limit, exchange).await {
        Err(_) => Err(HandshakeError::TimedOut),
        Ok(Err(e)) => Err(HandshakeError::Failed(e.to_string())),
        Ok(Ok((head, body))) => Ok((stream, head, body)),
    })
}

async fn sse(a: SseArgs, stop: &Stop) -> Result<SseReport> {
    let target = parse_target_url(&a.url, &["http"])?;
    socket_for(a.src.bind, target.addr)?;
    let limit = Duration::from_millis(a.timeout_ms);
    let r = RefCell::new(SseReport {
        cmd: "sse".into(),
        clients: a.clients,
        ..Default::default()
    });
    let errors = ErrorLog::new();
    let client = |_id: u64| {
        let (r, errors, target) = (&r, &errors, &target);
        async move {
            let mut subscribed_before = false;
            let mut backoff = Duration::from_millis(500);
            loop {
                let got = tokio::select! {
                    got = http_get(a.src.bind, target, "text/event-stream", limit) => got?,
                    _ = stop.wait() => break,
                };
                match got {
                    Ok((stream, head, body)) if head.status == 200 => {
                        {
                            let mut r = r.borrow_mut();
                            r.subscriptions += 1;
                            if subscribed_before {
                                r.reconnects += 1;
                            }
                        }
                        subscribed_before = true;
                        if let Some(ms) = read_events(stream, &head, body, stop, r, errors).await {
                            // Honour the server's retry hint, within reason.
                            backoff = Duration::from_millis(ms.clamp(100, 5_000));
                        }
                    }
                    Ok((_, head, _)) => {
                        *r.borrow_mut().rejected.entry(head.status).or_default() += 1;
                    }
                    Err(HandshakeError::Status(code)) => {
                        *r.borrow_mut().rejected.entry(code).or_default() += 1;
                    }
                    Err(HandshakeError::TimedOut) => {
                        errors.note("subscribe", &"timed out");
                        r.borrow_mut().errors += 1;
                    }
                    Err(HandshakeError::Failed(e)) => {
                        errors.note("subscribe", &e);
                        r.borrow_mut().errors += 1;
                    }
                }
                if !stop.pause(backoff).await {
                    break;
                }
            }
            anyhow::Ok(())
        }
    };
    let results = futures_util::future::join_all((0..a.clients).map(client)).await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(r.into_inner())
}

/// Reads one SSE stream until it ends or the run does; returns the server's retry hint.
async fn read_events(
    mut stream: TcpStream,
    head: &ResponseHead,
    first: Vec<u8>,
    stop: &Stop,
    r: &RefCell<SseReport>,
    errors: &ErrorLog,
) -> Option<u64> {
    let mut parser = SseParser::default();
    let mut chunked = head.chunked.then(ChunkedDecoder::default);
    let mut decoded = Vec::new();
    let mut feed = |bytes: &[u8], parser: &mut SseParser| -> Result<()> {
        let before = (parser.events, parser.comments);
        match chunked.as_mut() {
            Some(dec) => {
                decoded.clear();
                dec.feed(bytes, &mut decoded)?;
                parser.feed(&decoded)?;
            }
            None => parser.feed(bytes)?,
        }
        let mut r = r.borrow_mut();
        r.events += parser.events - before.0;
        r.comments += parser.comments - before.1;
        Ok(())
    };
    if let Err(e) = feed(&first, &mut parser) {
        errors.note("event stream", &e);
        r.borrow_mut().errors += 1;
        return parser.retry_ms;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = stream.read(&mut buf) => match n {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = feed(&buf[..n], &mut parser) {
                        errors.note("event stream", &e);
                        r.borrow_mut().errors += 1;
                        break;
                    }
                }
                Err(e) => {
                    errors.note("event stream", &e);
                    r.borrow_mut().errors += 1;
                    break;
                }
            },
            _ = stop.wait() => break,
        }
    }
    parser.retry_ms
}

async fn ws_flood(a: WsFloodArgs, stop: &Stop) -> Result<WsFloodReport> {
    let target = parse_target_url(&a.url, &["ws"])?;
    let limit = Duration::from_millis(a.timeout_ms);
    let mut r = WsFloodReport {
        cmd: "ws-flood".into(),
        ..Default::default()
    };
    let ws = tokio::select! {
        ws = ws_connect(a.src.bind, &target, limit) => ws?,
        _ = stop.wait() => return Ok(r),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(HandshakeError::Status(code)) => {
            r.handshake_status = Some(code);
            return Ok(r);
        }
        Err(HandshakeError::TimedOut) => {
            r.error = Some("handshake timed out".into());
            return Ok(r);
        }
        Err(HandshakeError::Failed(e)) => {
            r.error = Some(format!("handshake failed: {e}"));
            return Ok(r);
        }
    };
    r.connected = true;
    let (mut tx, mut rx) = ws.split();
    let sent = Cell::new(0u64);
    let payload = "x".repeat(a.size as usize);

    // The writer paces frames and hands the sink back when the run ends, so a normal close
    // can be sent; a send error (the server closed or reset) ends it early.
    let writer = async {
        let mut pacer = Pacer::new(a.rate, Instant::now());
        let mut tick = tokio::time::interval(pacer.tick());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if !until_stopped(stop, tick.tick()).await {
                return Ok(tx);
            }
            for _ in 0..pacer.due(Instant::now()) {
                tx.feed(Message::text(payload.as_str())).await?;
                sent.set(sent.get() + 1);
            }
            // Under backpressure flush blocks; the run's end must still win.
            if !until_stopped(stop, tx.flush()).await {
                return Ok(tx);
            }
        }
    };
    let mut close: Option<CloseFrame> = None;
    let mut got_close = false;
    let mut received = 0u64;
    let mut read_error: Option<String> = None;
    let reader = async {
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Text(_) | Message::Binary(_)) => received += 1,
                Ok(Message::Close(frame)) => {
                    got_close = true;
                    close = frame;
                }
                Ok(_) => {}
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => break,
                Err(e) => {
                    read_error = Some(e.to_string());
                    break;
                }
            }
        }
    };
    tokio::pin!(writer, reader);
    tokio::select! {
        () = &mut reader => {}
        w = &mut writer => {
            match w {
                Ok(mut tx) => {
                    let bye = Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "lab-client done".into(),
                    }));
                    let _ = timeout(Duration::from_secs(1), tx.send(bye)).await;
                }
                Err(e) => {
                    let e: WsError = e;
                    if !matches!(e, WsError::ConnectionClosed | WsError::AlreadyClosed) {
                        r.error = Some(format!("send: {e}"));
                    }
                }
            }
            // Collect the server's close frame (or reset) after our last write, bounded.
            let _ = timeout(Duration::from_secs(2), &mut reader).await;
        }
    }
    r.sent = sent.get();
    r.received = received;
    if got_close {
        r.close_code = Some(close_code(&close));
        r.close_reason = close
            .map(|f| f.reason.to_string())
            .filter(|s| !s.is_empty());
    }
    if r.error.is_none() {
        r.error = read_error;
    }
    Ok(r)
}

async fn conn_flood(a: ConnFloodArgs, stop: &Stop) -> Result<ConnFloodReport> {
    ensure_lab_ip(a.target.ip())?;
    socket_for(a.src.bind, a.target)?;
    let limit = Duration::from_millis(a.connect_timeout_ms);
    let hold = Duration::from_millis(a.hold_ms);
    let r = RefCell::new(ConnFloodReport {
        cmd: "conn-flood".into(),
        ..Default::default()
    });
    let in_flight = Cell::new(0u64);
    let errors = ErrorLog::new();
    let one = |_| async {
        r.borrow_mut().attempted += 1;
        in_flight.set(in_flight.get() + 1);
        match connect(a.src.bind, a.target, limit).await {
            Ok(Ok(stream)) => {
                r.borrow_mut().connected += 1;
                sleep(hold).await;
                drop(stream);
            }
            Ok(Err(ConnectError::TimedOut)) => r.borrow_mut().timed_out += 1,
            Ok(Err(ConnectError::Refused)) => r.borrow_mut().refused += 1,
            Ok(Err(ConnectError::Other(e))) => {
                errors.note("connect", &e);
                r.borrow_mut().failed += 1;
            }
            Err(e) => {
                errors.note("socket", &format!("{e:#}"));
                r.borrow_mut().failed += 1;
            }
        }
        in_flight.set(in_flight.get() - 1);
    };
    let work = futures_util::stream::iter(0..a.count).for_each_concurrent(a.parallel as usize, one);
    until_stopped(stop, work).await;
    let mut r = r.into_inner();
    r.unfinished = in_flight.get();
    r.not_started = a.count - r.attempted;
    Ok(r)
}

#[derive(Clone, Copy)]
enum StormKind {
    Ws,
    Sse,
}

async fn storm(a: StormArgs, kind: StormKind, stop: &Stop) -> Result<StormReport> {
    let (cmd, scheme) = match kind {
        StormKind::Ws => ("ws-storm", "ws"),
        StormKind::Sse => ("sse-storm", "http"),
    };
    let target = parse_target_url(&a.url, &[scheme])?;
    socket_for(a.src.bind, target.addr)?;
    let limit = Duration::from_millis(a.timeout_ms);
    let hold = Duration::from_millis(a.hold_ms);
    let r = RefCell::new(StormReport {
        cmd: cmd.into(),
        ..Default::default()
    });
    let in_flight = Cell::new(0u64);
    let errors = ErrorLog::new();
    let one = |_| async {
        r.borrow_mut().attempted += 1;
        in_flight.set(in_flight.get() + 1);
        let outcome = match kind {
            StormKind::Ws => match ws_connect(a.src.bind, &target, limit).await {
                Ok(Ok(mut ws)) => {
                    r.borrow_mut().accepted += 1;
                    sleep(hold).await;
                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(e) => Some(HandshakeError::Failed(format!("{e:#}"))),
            },
            StormKind::Sse => match http_get(a.src.bind, &target, "text/event-stream", limit).await
            {
                Ok(Ok((stream, head, _))) if head.status == 200 => {
                    r.borrow_mut().accepted += 1;
                    sleep(hold).await;
                    drop(stream);
                    None
                }
                Ok(Ok((_, head, _))) => Some(HandshakeError::Status(head.status)),
                Ok(Err(e)) => Some(e),
                Err(e) => Some(HandshakeError::Failed(format!("{e:#}"))),
            },
        };
        let mut r = r.borrow_mut();
        match outcome {
            None => {}
            Some(HandshakeError::Status(429)) => r.rejected_429 += 1,
            Some(HandshakeError::Status(503)) => r.rejected_503 += 1,
            Some(HandshakeError::Status(s)) => *r.other_status.entry(s).or_default() += 1,
            Some(HandshakeError::TimedOut) => r.timed_out += 1,
            Some(HandshakeError::Failed(e)) => {
                errors.note(cmd, &e);
                r.failed += 1;
            }
        }
        in_flight.set(in_flight.get() - 1);
    };
    let work = futures_util::stream::iter(0..a.count).for_each_concurrent(a.parallel as usize, one);
    until_stopped(stop, work).await;
    let mut r = r.into_inner();
    r.unfinished = in_flight.get();
    r.not_started = a.count - r.attempted;
    Ok(r)
}

async fn serve_echo(a: EchoArgs, stop: &Stop) -> Result<EchoReport> {
    let sock = if a.listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a TCP socket")?;
    sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
    sock.bind(a.listen)
        .with_context(|| format!("cannot bind {}", a.listen))?;
    let listener = sock
        .listen(a.backlog)
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    // The readiness line ChildGuard::wait_for_stderr looks for.
    eprintln!("listening on {}", listener.local_addr()?);
    let accepted = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = stop.wait() => break,
        };
        match conn {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let echoed = Arc::clone(&echoed);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = stream.into_split();
                    if let Ok(n) = tokio::io::copy(&mut rd, &mut wr).await {
                        echoed.fetch_add(n, Ordering::Relaxed);
                    }
                });
            }
            // EMFILE and friends: keep serving, but do not spin.
            Err(e) => {
                eprintln!("lab-client: accept: {e}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
    Ok(EchoReport {
        cmd: "serve-echo".into(),
        accepted: accepted.load(Ordering::Relaxed),
        bytes_echoed: echoed.load(Ordering::Relaxed),
        elapsed_ms: 0,
    })
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

    #[test]
    fn message_templates() {
        assert_eq!(
            render_message(r#"{"text":"hi {n}","from":{client}}"#, 3, 7),
            r#"{"text":"hi 7","from":3}"#
        );
        assert_eq!(render_message("plain", 1, 1), "plain");
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        let v = [1.0, 2.0, 3.0, 4.0, 1000.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 1000.0);
    }

    /// Loopback end-to-end: serve-echo's pieces and the probe path, no privileges needed.
    #[test]
    fn probe_and_flood_against_a_loopback_listener() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    drop(s);
                }
            });
            let stop = Stop::after(30);
            let started = Instant::now();
            let p = probe(
                ProbeArgs {
                    target: addr,
                    src: Source {
                        bind: Some("127.0.0.1".parse().unwrap()),
                    },
                    count: 5,
                    interval_ms: 1,
                    connect_timeout_ms: 3000,
                    secs: 30,
                    start_delay_ms: 200,
                },
                &stop,
            )
            .await
            .unwrap();
            assert_eq!((p.attempted, p.connected, p.lost_syn), (5, 5, 0));
            // A lower bound only: a sleep never ends early, however busy the machine.
            assert!(started.elapsed() >= Duration::from_millis(200));
            let f = conn_flood(
                ConnFloodArgs {
                    target: addr,
                    src: Source { bind: None },
                    count: 50,
                    parallel: 10,
                    secs: 30,
                    hold_ms: 1,
                    connect_timeout_ms: 3000,
                },
                &stop,
            )
            .await
            .unwrap();
            assert_eq!((f.attempted, f.connected, f.not_started), (50, 50, 0));
            // A port nobody listens on: refused, counted, not an error of the run.
            let closed = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            };
            let p = probe(
                ProbeArgs {
                    target: closed,
                    src: Source { bind: None },
                    count: 2,
                    interval_ms: 1,
                    connect_timeout_ms: 3000,
                    secs: 30,
                    start_delay_ms: 0,
                },
                &stop,
            )
            .await
            .unwrap();
            assert_eq!((p.failed, p.lost_syn), (2, 2));
            // Outside the lab: refused before any packet.
            let err = probe(
                ProbeArgs {
                    target: "10.1.2.3:80".parse().unwrap(),
                    src: Source { bind: None },
                    count: 1,
                    interval_ms: 1,
                    connect_timeout_ms: 10,
                    secs: 1,
                    start_delay_ms: 0,
                },
                &stop,
            )
            .await
            .unwrap_err();
            assert!(err.to_string().contains("outside the lab"), "{err}");
        });
    }
}
