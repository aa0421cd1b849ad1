//! WebSocket echo throughput through the guard (its filters and its own
//! server) vs plain `warp::serve`: same process, same client, same
//! runtime, one run, side by side.
//!
//! Each iteration pipelines `MESSAGES` small text messages over one
//! connection and reads every echo back. After criterion's two runs, the
//! same rounds alternate between the two servers and the medians are
//! compared, which is the fairer ratio on a shared machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{future, SinkExt, StreamExt};
use guard_common::app::{Guard, GuardedWebSocket, Limits, WsUpgrade};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use warp::Filter;

const MESSAGES: usize = 1000;
const PAYLOAD: usize = 64;
/// Pairs of rounds for the interleaved comparison.
const INTERLEAVED_ROUNDS: usize = 2000;

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// warp's own echo: forward the stream into the sink.
async fn plain() -> SocketAddr {
    let route = warp::ws().map(|ws: warp::ws::Ws| {
        ws.on_upgrade(|socket| async move {
            let (tx, rx) = socket.split();
            let _ = rx.forward(tx).await;
        })
    });
    let (l, addr) = listener().await;
    tokio::spawn(warp::serve(route).incoming(l).run());
    addr
}

/// The same echo through the guard and guard's server, every check on,
/// none tripped.
async fn guarded() -> SocketAddr {
    let guard = Guard::builder()
        .limits(Limits {
            message_rate: 10_000_000,
            message_burst: 10_000_000,
            byte_rate: 1 << 31,
            byte_burst: 1 << 31,
            ..Limits::default()
        })
        .registry(&prometheus::Registry::new())
        .build()
        .unwrap();
    let route = guard.websocket().map(|up: WsUpgrade| {
        up.on_upgrade(|mut ws: GuardedWebSocket| async move {
            while let Some(msg) = ws.next().await {
                if ws.send(msg).is_err() {
                    break;
                }
            }
        })
    });
    let (l, addr) = listener().await;
    tokio::spawn(
        guard
            .serve(route.recover(guard_common::app::recover))
            .incoming(l),
    );
    addr
}

async fn connect(addr: SocketAddr) -> (SplitSink<Client, Message>, SplitStream<Client>) {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap();
    ws.split()
}

async fn round(tx: &mut SplitSink<Client, Message>, rx: &mut SplitStream<Client>, payload: &str) {
    let send = async {
        for _ in 0..MESSAGES {
            tx.feed(Message::text(payload)).await.unwrap();
        }
        tx.flush().await.unwrap();
    };
    let recv = async {
        let mut n = 0;
        while n < MESSAGES {
            match rx.next().await {
                Some(Ok(Message::Text(_))) => n += 1,
                Some(Ok(_)) => {}
                other => panic!("echo ended: {other:?}"),
            }
        }
    };
    future::join(send, recv).await;
}

fn ws_echo(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = "x".repeat(PAYLOAD);
    let (mut plain_tx, mut plain_rx) = rt.block_on(async { connect(plain().await).await });
    let (mut guard_tx, mut guard_rx) = rt.block_on(async { connect(guarded().await).await });

    let mut group = c.benchmark_group("ws_echo");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("plain_warp", |b| {
        b.iter(|| rt.block_on(round(&mut plain_tx, &mut plain_rx, &payload)))
    });
    group.bench_function("guarded", |b| {
        b.iter(|| rt.block_on(round(&mut guard_tx, &mut guard_rx, &payload)))
    });
    group.finish();

    // Others may be using the machine: criterion measures one side after
    // the other, so a change in load between them skews the ratio. Rounds
    // taken in alternation see the same load.
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..INTERLEAVED_ROUNDS {
        for side in [i % 2, 1 - i % 2] {
            let start = Instant::now();
            match side {
                0 => rt.block_on(round(&mut plain_tx, &mut plain_rx, &payload)),
                _ => rt.block_on(round(&mut guard_tx, &mut guard_rx, &payload)),
            }
            times[side].push(start.elapsed());
        }
    }
    let [plain, guarded] = times.map(|mut t| {
        t.sort();
        t[t.len() / 2]
    });
    println!(
        "ws_echo interleaved medians over {INTERLEAVED_ROUNDS} rounds: plain_warp {plain:?}, \
         guarded {guarded:?}; guarded throughput = {:.1}% of plain",
        100.0 * plain.as_secs_f64() / guarded.as_secs_f64()
    );
}

criterion_group!(benches, ws_echo);
criterion_main!(benches);
