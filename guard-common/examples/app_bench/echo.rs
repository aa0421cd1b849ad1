//! WebSocket echo throughput of one guarded app (`guard.websocket()` and a
//! `GuardedWebSocket` echo, every check on, none tripped) served two ways:
//! by `warp::serve` (arm "warp-serve", where guard finishes the upgrade with
//! warp's `Ws`) and by `Guard::serve` (one arm "guard-N" per read-buffer size
//! asked for). What differs between them is the server alone. A bare warp
//! echo without any guard code (arm "bare-warp") runs beside them as a
//! reference: it prices guard's filters and socket, not its server. All arms
//! are served by one runtime in this process.
//!
//! For each message size each arm gets one connection, and in every round
//! each arm echoes the same number of pipelined messages; the arms take
//! turns within a round and the order rotates from round to round, so a
//! change in the machine's load falls on all of them alike. The rates of
//! every round are printed; the caller takes medians and ratios.
//!
//! The server runtime (one worker) and the client (a current-thread runtime
//! on this thread) can be pinned to different CPUs, so neither side steals
//! the other's core.
//!
//! Beside the rates, each round records the CPU time the server runtime's
//! threads spent on it (their `schedstat`, user and kernel), per message.
//! On a shared machine the rates of two rounds differ by a third while the
//! CPU each message cost the server barely moves: that is the figure to
//! compare servers by.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use guard_common::app::{Guard, GuardedWebSocket, Limits, SlowConsumerPolicy, WsUpgrade};
use prometheus::Registry;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warp::{Filter, Reply as _};

/// Bound on one round; echoes that never come back fail the run instead of
/// hanging it.
const ROUND_LIMIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// Message size in bytes (repeatable).
    #[arg(long = "size", value_name = "BYTES", default_values_t = [64, 16 * 1024],
          value_parser = clap::value_parser!(u32).range(1..=(1 << 20)))]
    sizes: Vec<u32>,
    /// Rounds per size; every arm runs once per round.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rounds: u32,
    /// Payload bytes each arm echoes per round (at least `--min-messages`
    /// messages).
    #[arg(long, default_value_t = 16 << 20)]
    round_bytes: usize,
    #[arg(long, default_value_t = 2_000)]
    min_messages: usize,
    /// One guard arm per `Limits::ws_read_buffer_size` (repeatable; default:
    /// its default).
    #[arg(long = "guard-read-buffer", value_name = "BYTES")]
    guard_read_buffers: Vec<usize>,
    /// `Limits::ws_write_buffer_size` of every guard arm (default: its
    /// default).
    #[arg(long, value_name = "BYTES")]
    guard_write_buffer: Option<usize>,
    /// CPU for the server runtime's threads.
    #[arg(long)]
    server_cpu: Option<usize>,
    /// CPU for the client (this thread).
    #[arg(long)]
    client_cpu: Option<usize>,
    /// Run only the arm of this name (repeatable; e.g. `warp-serve`,
    /// `guard-4096`): one server per process, to profile it alone.
    #[arg(long = "arm", value_name = "NAME")]
    only: Vec<String>,
}

/// One server under test.
#[derive(Clone, Copy, Debug)]
enum Arm {
    /// warp's own echo, no guard code: the reference.
    BareWarp,
    /// The guarded app, served by `warp::serve`.
    GuardedOnWarp,
    /// The guarded app, served by `Guard::serve` with this WebSocket read
    /// buffer.
    Guard { read_buffer: usize },
}

impl Arm {
    fn name(self) -> String {
        match self {
            Arm::BareWarp => "bare-warp".into(),
            Arm::GuardedOnWarp => "warp-serve".into(),
            Arm::Guard { read_buffer } => format!("guard-{read_buffer}"),
        }
    }
}

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The server runtime's threads, as the kernel numbers them.
static SERVER_THREADS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Nanoseconds the server runtime's threads have run so far.
fn server_cpu_ns() -> Result<u64> {
    let threads = SERVER_THREADS.lock().unwrap_or_else(|e| e.into_inner());
    let mut total = 0;
    for tid in threads.iter() {
        let path = format!("/proc/self/task/{tid}/schedstat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("{path} says {text:?}"))?;
    }
    Ok(total)
}

pub fn run(args: &EchoArgs) -> Result<()> {
    let mut arms = vec![Arm::BareWarp, Arm::GuardedOnWarp];
    let mut buffers = args.guard_read_buffers.clone();
    if buffers.is_empty() {
        buffers.push(Limits::default().ws_read_buffer_size);
    }
    arms.extend(
        buffers
            .into_iter()
            .map(|read_buffer| Arm::Guard { read_buffer }),
    );
    if !args.only.is_empty() {
        arms.retain(|arm| args.only.contains(&arm.name()));
        ensure!(!arms.is_empty(), "no arm is named {:?}", args.only);
    }

    let server_cpu = args.server_cpu;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            SERVER_THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tid);
            if let Some(cpu) = server_cpu {
                // A thread that cannot be pinned still serves; the pinning
                // of the main thread below reports the error.
                let _ = crate::pin_thread(cpu);
            }
        })
        .build()
        .context("cannot start the server runtime")?;
    if let Some(cpu) = args.client_cpu {
        crate::pin_thread(cpu).with_context(|| format!("cannot pin the client to cpu {cpu}"))?;
    }
    if let Some(cpu) = args.server_cpu {
        // Check on this thread that the server's CPU exists: on_thread_start
        // cannot report it.
        ensure!(
            cpu < std::thread::available_parallelism().map_or(1, |n| n.get()),
            "no cpu {cpu} here"
        );
    }
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;

    let mut sizes_json = Vec::new();
    for &size in &args.sizes {
        let size = size as usize;
        let messages = (args.round_bytes / size).max(args.min_messages);
        let mut addrs = Vec::new();
        for &arm in &arms {
            addrs.push(server_rt.block_on(serve(arm, size, messages, args.guard_write_buffer))?);
        }
        let measured = client_rt.block_on(measure(&addrs, size, messages, args.rounds as usize))?;
        let per_arm = |of: &[Vec<f64>]| -> String {
            arms.iter()
                .zip(of)
                .map(|(arm, r)| format!("\"{}\":{}", arm.name(), crate::json_numbers(r)))
                .collect::<Vec<_>>()
                .join(",")
        };
        sizes_json.push(format!(
            "{{\"size\":{size},\"messages\":{messages},\"messages_per_s\":{{{}}},\
             \"server_cpu_ns_per_message\":{{{}}}}}",
            per_arm(&measured.rates),
            per_arm(&measured.server_ns)
        ));
    }
    println!(
        "{{\"server_cpu\":{},\"client_cpu\":{},\"rounds\":{},\"sizes\":[{}]}}",
        args.server_cpu.map_or("null".into(), |c| c.to_string()),
        args.client_cpu.map_or("null".into(), |c| c.to_string()),
        args.rounds,
        sizes_json.join(",")
    );
    drop(server_rt);
    Ok(())
}

/// Starts `arm`'s echo server for messages of `size`, `messages` of them in
/// flight at most.
async fn serve(
    arm: Arm,
    size: usize,
    messages: usize,
    write_buffer: Option<usize>,
) -> Result<SocketAddr> {
    let read_buffer = match arm {
        Arm::BareWarp => {
            // warp's own echo, as its example writes it.
            let route = warp::ws().map(|ws: warp::ws::Ws| {
                ws.on_upgrade(|socket| async move {
                    let (tx, rx) = socket.split();
                    let _ = rx.forward(tx).await;
                })
            });
            return serve_with_warp(route).await;
        }
        // warp's `Ws` sizes this side's buffers itself.
        Arm::GuardedOnWarp => Limits::default().ws_read_buffer_size,
        Arm::Guard { read_buffer } => read_buffer,
    };
    let defaults = Limits::default();
    let guard = Guard::builder()
        .limits(Limits {
            // Rates that a bench's flood of echoes never trips, a queue that
            // holds a whole round, and sizes that fit the message: what is
            // measured is the cost of the checks, not their verdicts.
            message_rate: u32::MAX,
            message_burst: u32::MAX,
            byte_rate: u32::MAX,
            byte_burst: u32::MAX,
            max_message_size: defaults.max_message_size.max(size),
            max_frame_size: defaults.max_frame_size.max(size),
            outbound_queue: messages,
            // A lost echo fails the run loudly (the connection closes)
            // rather than making a round wait forever.
            slow_consumer_policy: SlowConsumerPolicy::Close,
            ws_read_buffer_size: read_buffer,
            ws_write_buffer_size: write_buffer.unwrap_or(defaults.ws_write_buffer_size),
            ws_max_write_buffer_size: defaults
                .ws_max_write_buffer_size
                .max(write_buffer.unwrap_or(0).saturating_mul(2)),
            ..defaults
        })
        .registry(&Registry::new())
        .build()
        .context("cannot build the guard")?;
    let route = guard
        .websocket()
        .map(|up: WsUpgrade| {
            up.on_upgrade(|mut ws: GuardedWebSocket| async move {
                while let Some(msg) = ws.next().await {
                    if ws.send(msg).is_err() {
                        break;
                    }
                }
            })
            .into_response()
        })
        .recover(guard_common::app::recover);
    if let Arm::GuardedOnWarp = arm {
        return serve_with_warp(route).await;
    }
    let (addr, serving) = guard
        .serve(route)
        .bind(([127, 0, 0, 1], 0))
        .await
        .context("cannot bind guard's server")?;
    tokio::spawn(serving);
    Ok(addr)
}

/// Serves `route` with plain `warp::serve` on a loopback port.
async fn serve_with_warp<F>(route: F) -> Result<SocketAddr>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind warp's server")?;
    let addr = listener.local_addr().context("the bound address")?;
    tokio::spawn(warp::serve(route).incoming(listener).run());
    Ok(addr)
}

/// What every arm did in every round (`[arm][round]`).
struct Measured {
    /// Messages per second.
    rates: Vec<Vec<f64>>,
    /// Nanoseconds of the server's CPU per message.
    server_ns: Vec<Vec<f64>>,
}

async fn measure(
    addrs: &[SocketAddr],
    size: usize,
    messages: usize,
    rounds: usize,
) -> Result<Measured> {
    let mut clients = Vec::new();
    for addr in addrs {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        clients.push(ws.split());
    }
    let payload = "x".repeat(size);
    // One unmeasured round each: connections and buffers at their working
    // size before anything is timed.
    for (tx, rx) in &mut clients {
        round(tx, rx, &payload, messages).await?;
    }
    let mut rates = vec![Vec::with_capacity(rounds); addrs.len()];
    let mut server_ns = rates.clone();
    for r in 0..rounds {
        for k in 0..addrs.len() {
            let arm = (r + k) % addrs.len();
            let (tx, rx) = &mut clients[arm];
            let (start, cpu_start) = (Instant::now(), server_cpu_ns()?);
            round(tx, rx, &payload, messages).await?;
            rates[arm].push(messages as f64 / start.elapsed().as_secs_f64());
            server_ns[arm].push((server_cpu_ns()? - cpu_start) as f64 / messages as f64);
        }
    }
    Ok(Measured { rates, server_ns })
}

/// Sends `messages` texts pipelined and reads every echo back.
async fn round(
    tx: &mut SplitSink<Client, Message>,
    rx: &mut SplitStream<Client>,
    payload: &str,
    messages: usize,
) -> Result<()> {
    let send = async {
        for _ in 0..messages {
            tx.feed(Message::text(payload)).await?;
        }
        tx.flush().await
    };
    let recv = async {
        let mut got = 0;
        while got < messages {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => {
                    ensure!(
                        t.len() == payload.len(),
                        "echo of {} bytes, sent {}",
                        t.len(),
                        payload.len()
                    );
                    got += 1;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("echo failed after {got} of {messages}: {e}"),
                None => bail!("echo ended after {got} of {messages}"),
            }
        }
        Ok(())
    };
    let (sent, received) =
        tokio::time::timeout(ROUND_LIMIT, futures_util::future::join(send, recv))
            .await
            .with_context(|| format!("a round of {messages} echoes took over {ROUND_LIMIT:?}"))?;
    sent.context("cannot send")?;
    received
}
