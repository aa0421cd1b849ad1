//! Resident memory per idle connection: N idle WebSockets or N idle SSE
//! subscribers against one server, KiB per connection = (RSS after − RSS
//! before) / N.
//!
//! One server and one kind per process: memory freed by a previous
//! measurement stays resident (the allocator keeps it) and would make the
//! next one look free. The clients are blocking sockets on a thread of this
//! process: each is a descriptor and no heap (the one buffer a handshake is
//! read into is freed before the next connects), so what grows is the
//! server side. A warm-up round first grows the allocator's arenas and the
//! runtime, so that the measured round pays for connections only.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use futures_util::StreamExt;
use guard_common::app::{Guard, GuardedWebSocket, Limits, SseSender, SseSubscription, WsUpgrade};
use prometheus::Registry;
use warp::{Filter, Reply as _};

use crate::Server;

/// Connections opened and closed before the measured round.
const WARM_UP: usize = 200;
/// How long the server's tasks get to reach their idle state (first poll,
/// timers armed) once every client has its response head.
const SETTLE: Duration = Duration::from_millis(500);
/// Bound on waiting for the server to count every connection.
const WAIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[arg(long, value_enum)]
    server: Server,
    #[arg(long, value_enum)]
    kind: Kind,
    /// Idle connections measured (each also holds a client descriptor here).
    #[arg(long, default_value_t = 8000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    conns: u32,
    /// guard's `Limits::ws_read_buffer_size` (default: its default).
    #[arg(long, value_name = "BYTES")]
    ws_read_buffer: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    /// WebSockets, upgraded and silent.
    Ws,
    /// SSE subscribers, their response head sent and no event since.
    Sse,
    /// Event streams that never send a byte, through no queue, timer or
    /// filter of guard's: what the server itself holds for a stream in
    /// flight (guard's hands it off from hyper after the head, warp's keeps
    /// it in hyper), the floor under an SSE subscriber.
    Stream,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ws => "ws",
            Kind::Sse => "sse",
            Kind::Stream => "stream",
        }
    }
}

pub fn run(args: &IdleArgs) -> Result<()> {
    ensure!(
        args.server == Server::Guard || args.ws_read_buffer.is_none(),
        "--ws-read-buffer sizes guard's upgrade; warp's Ws has no such setting"
    );
    let n = args.conns as usize;
    // Two descriptors per connection (client and server end) and some slack
    // for the runtime, the listener and guard's descriptor reserve.
    raise_limits(n)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(measure(args, n))
}

fn raise_limits(n: usize) -> Result<()> {
    crate::raise_nofile_limit(2 * (n + WARM_UP) as u64 + 512)
}

/// Connections the server holds open right now, as it counts them.
type Open = Arc<dyn Fn() -> usize + Send + Sync>;

async fn measure(args: &IdleArgs, n: usize) -> Result<()> {
    let (addr, open, senders) = match args.server {
        Server::Guard => serve_guard(n, args.ws_read_buffer).await?,
        Server::Warp => serve_warp().await?,
    };
    let kind = args.kind;

    let warm = open_idle(addr, kind, WARM_UP).await?;
    wait_for(&open, WARM_UP, "the warm-up connections to open").await?;
    drop(warm);
    wait_for(&open, 0, "the warm-up connections to close").await?;
    senders.clear();
    tokio::time::sleep(SETTLE).await;

    let before = resident_bytes()?;
    let conns = open_idle(addr, kind, n).await?;
    wait_for(&open, n, "every connection to open").await?;
    tokio::time::sleep(SETTLE).await;
    let after = resident_bytes()?;
    ensure!(
        open() == n,
        "{} of {n} connections were still open after the measurement",
        open()
    );
    let read_buffer = match (args.server, args.ws_read_buffer) {
        (Server::Guard, Some(b)) => b.to_string(),
        (Server::Guard, None) => Limits::default().ws_read_buffer_size.to_string(),
        (Server::Warp, _) => "null".into(),
    };
    println!(
        "{{\"server\":\"{}\",\"kind\":\"{}\",\"conns\":{n},\"ws_read_buffer\":{read_buffer},\
         \"rss_before_bytes\":{before},\"rss_after_bytes\":{after},\"bytes_per_conn\":{}}}",
        args.server.name(),
        kind.name(),
        crate::json_number((after as f64 - before as f64) / n as f64),
    );
    drop(conns);
    Ok(())
}

/// What the SSE handlers keep of each subscriber (an app keeps a sender per
/// subscriber to publish to), so subscriptions stay open.
#[derive(Clone, Default)]
struct Senders {
    guard: Arc<Mutex<Vec<SseSender>>>,
    warp: Arc<Mutex<Vec<tokio::sync::mpsc::Sender<warp::sse::Event>>>>,
}

impl Senders {
    fn clear(&self) {
        self.guard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.warp.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn guard_limits(n: usize, ws_read_buffer: Option<usize>) -> Limits {
    let capacity = u32::try_from(n + WARM_UP + 1_000).unwrap_or(u32::MAX);
    let defaults = Limits::default();
    Limits {
        // Room for every measured connection; per source the defaults hold,
        // as every client comes from its own address (X-Forwarded-For from
        // loopback, a trusted proxy).
        max_connections: capacity,
        max_tracked_sources: capacity as usize * 2,
        storm_threshold: u32::MAX,
        ws_read_buffer_size: ws_read_buffer.unwrap_or(defaults.ws_read_buffer_size),
        ..defaults
    }
}

async fn serve_guard(
    n: usize,
    ws_read_buffer: Option<usize>,
) -> Result<(SocketAddr, Open, Senders)> {
    let guard = Guard::builder()
        .limits(guard_limits(n, ws_read_buffer))
        .registry(&Registry::new())
        .trusted_proxies(["127.0.0.1".parse().context("loopback as a prefix")?])
        .build()
        .context("cannot build the guard")?;
    let senders = Senders::default();
    let kept = Arc::clone(&senders.guard);
    // Endless bodies hold no admission permit, so guard does not count them.
    let endless = Arc::new(AtomicUsize::new(0));
    let ws = warp::path("ws")
        .and(guard.websocket())
        .map(|up: WsUpgrade| {
            up.on_upgrade(
                |mut ws: GuardedWebSocket| async move { while ws.next().await.is_some() {} },
            )
            .into_response()
        });
    let events = warp::path("events")
        .and(guard.sse())
        .map(move |sub: SseSubscription| {
            let (tx, reply) = sub.channel();
            kept.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
            reply.into_response()
        });
    let app = ws
        .or(events)
        .unify()
        .or(endless_body(Arc::clone(&endless)))
        .unify()
        .recover(guard_common::app::recover)
        .unify();
    let (addr, serving) = guard
        .serve(app)
        .bind(([127, 0, 0, 1], 0))
        .await
        .context("cannot bind guard's server")?;
    tokio::spawn(serving);
    let open: Open =
        Arc::new(move || guard.open_connections() as usize + endless.load(Ordering::SeqCst));
    Ok((addr, open, senders))
}

/// Counts a connection's handler while it lives.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_warp() -> Result<(SocketAddr, Open, Senders)> {
    let live = Arc::new(AtomicUsize::new(0));
    let senders = Senders::default();
    let kept = Arc::clone(&senders.warp);
    let ws_live = Arc::clone(&live);
    let ws = warp::path("ws")
        .and(warp::ws())
        .map(move |ws: warp::ws::Ws| {
            let live = Arc::clone(&ws_live);
            ws.on_upgrade(move |mut socket| async move {
                let _live = Live::new(&live);
                while socket.next().await.is_some() {}
            })
            .into_response()
        });
    let sse_live = Arc::clone(&live);
    let events = warp::path("events").and(warp::get()).map(move || {
        // The same bounded queue per subscriber guard gives (its default
        // depth), streamed with warp's keep-alive.
        let (tx, rx) = tokio::sync::mpsc::channel(Limits::default().sse_buffer);
        kept.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        let live = Live::new(&sse_live);
        let events = futures_util::stream::unfold((rx, live), |(mut rx, live)| async move {
            let event = rx.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(event), (rx, live)))
        });
        warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response()
    });
    let app = ws
        .or(events)
        .unify()
        .or(endless_body(Arc::clone(&live)))
        .unify();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind warp's server")?;
    let addr = listener.local_addr().context("the bound address")?;
    tokio::spawn(warp::serve(app).incoming(listener).run());
    let open: Open = Arc::new(move || live.load(Ordering::SeqCst));
    Ok((addr, open, senders))
}

/// `GET /stream`: a 200 whose body never ends and never sends anything
/// (counted in `live` while it lasts).
fn endless_body(
    live: Arc<AtomicUsize>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path("stream").and(warp::get()).map(move || {
        let live = Live::new(&live);
        let silence = futures_util::stream::unfold(live, |live| async move {
            // Held for as long as hyper keeps the body.
            let _held = live;
            futures_util::future::pending::<()>().await;
            None::<(Result<warp::sse::Event, std::convert::Infallible>, _)>
        });
        warp::sse::reply(silence).into_response()
    })
}

async fn wait_for(open: &Open, want: usize, what: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while open() != want {
        if Instant::now() >= deadline {
            bail!(
                "timed out waiting for {what}: the server counts {} of {want}",
                open()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Opens `n` idle connections of `kind`, one after the other, each from its
/// own address behind the trusted proxy, and reads each response head.
async fn open_idle(addr: SocketAddr, kind: Kind, n: usize) -> Result<Vec<TcpStream>> {
    tokio::task::spawn_blocking(move || (0..n).map(|i| open_one(addr, kind, i)).collect())
        .await
        .context("the client thread panicked")?
}

fn open_one(addr: SocketAddr, kind: Kind, i: usize) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connection {i}: connect"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    // 198.18.100.1 onwards, 250 per /24: under every per-source and
    // per-network default.
    let third = 100 + i / 250;
    ensure!(
        third < 256,
        "too many connections for the client address plan"
    );
    let ip = format!("198.18.{third}.{}", 1 + i % 250);
    let (path, headers, status) = match kind {
        Kind::Ws => (
            "/ws",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "HTTP/1.1 101",
        ),
        Kind::Sse => ("/events", "Accept: text/event-stream\r\n", "HTTP/1.1 200"),
        Kind::Stream => ("/stream", "", "HTTP/1.1 200"),
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}X-Forwarded-For: {ip}\r\n\r\n"
    )
    .with_context(|| format!("connection {i}: send the request"))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let got = s
            .read(&mut chunk)
            .with_context(|| format!("connection {i}: read the response head"))?;
        ensure!(got > 0, "connection {i}: closed before its response head");
        head.extend_from_slice(&chunk[..got]);
    }
    ensure!(
        head.starts_with(status.as_bytes()),
        "connection {i}: expected {status}, got {:?}",
        String::from_utf8_lossy(&head)
    );
    Ok(s)
}

fn resident_bytes() -> Result<u64> {
    let statm =
        std::fs::read_to_string("/proc/self/statm").context("cannot read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("no resident page count in /proc/self/statm")?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).context("the page size")?;
    Ok(pages * page)
}
