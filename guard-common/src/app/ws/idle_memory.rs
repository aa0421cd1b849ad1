//! Resident memory per idle connection, measured in this process: N idle
//! WebSockets and N idle SSE subscribers against the same guarded app,
//! once through `warp::serve` (warp's `Ws`, warp's hyper settings) and once
//! through guard's server ([`Guard::serve`]: guard's upgrade, its hyper
//! settings).
//!
//! Ignored by default (it opens thousands of sockets and reads the whole
//! process's RSS, which other tests running beside it would disturb):
//!
//! ```text
//! cargo test -p guard-common --features warp,test-support --lib \
//!     idle_memory -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `GUARD_IDLE_CONNS` sets N (default 2 000; each costs two descriptors).
//! The clients are plain blocking sockets on their own thread: a few bytes
//! each, so what grows is the server side. Each figure is measured in a
//! fresh process (the test runs itself once per server and kind): memory
//! freed by one measurement stays resident and would make the next look
//! free.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::prelude::rust_2021::*;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::Registry;
use warp::reply::Reply;
use warp::{Filter, Rejection};

use super::tests::{guard, serve_guarded};
use crate::app::{Guard, GuardedWebSocket, Limits, SseSubscription, WsUpgrade};
use crate::test_support::wait_until;

/// The budget issue 23 sets for one idle connection of either kind.
const BUDGET: f64 = 16.0 * 1024.0;

fn resident_bytes() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages in statm");
    pages * 4096.0
}

/// `/ws`: reads until the client goes; `/events`: a subscription kept
/// open (its sender held) and silent.
fn idle_app(
    guard: &Guard,
    senders: std::sync::Arc<std::sync::Mutex<Vec<crate::app::SseSender>>>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
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
            senders.lock().unwrap().push(tx);
            reply.into_response()
        });
    ws.or(events).unify().recover(crate::app::recover).unify()
}

/// Opens `n` connections to `path` (each from its own address behind the
/// trusted proxy, so no per-source cap applies) and reads each response up
/// to `until`.
fn open_idle(addr: SocketAddr, path: &str, n: usize, until: &str) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let ip = format!("198.18.{}.{}", 100 + i / 250, 1 + i % 250);
            let upgrade = if path == "/ws" {
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            } else {
                "Accept: text/event-stream\r\n"
            };
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{upgrade}X-Forwarded-For: {ip}\r\n\r\n"
            )
            .unwrap();
            let mut r = BufReader::new(&mut s);
            let mut line = String::new();
            loop {
                line.clear();
                assert!(r.read_line(&mut line).unwrap() > 0, "EOF before {until:?}");
                if line.starts_with(until) {
                    break;
                }
            }
            s
        })
        .collect()
}

/// Per-connection resident bytes of `n` idle connections to `path`.
async fn per_connection(
    guard: &Guard,
    addr: SocketAddr,
    path: &'static str,
    until: &'static str,
    n: usize,
) -> f64 {
    // A first round warms up the allocator's arenas and the runtime, so
    // that the measured one pays for connections only.
    let warm = tokio::task::spawn_blocking(move || open_idle(addr, path, 200, until))
        .await
        .unwrap();
    wait_until("the warm-up connections", || {
        guard.open_connections() == 200
    })
    .await;
    drop(warm);
    wait_until("the warm-up connections to go", || {
        guard.open_connections() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before = resident_bytes();
    let conns = tokio::task::spawn_blocking(move || open_idle(addr, path, n, until))
        .await
        .unwrap();
    let n32 = u32::try_from(n).unwrap();
    wait_until("every connection admitted", || {
        guard.open_connections() == n32
    })
    .await;
    // Let the tasks reach their idle state (first poll, timers armed).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = resident_bytes();
    drop(conns);
    wait_until("every connection gone", || guard.open_connections() == 0).await;
    (after - before) / n as f64
}

fn limits(n: usize) -> Limits {
    let n = u32::try_from(n).unwrap();
    Limits {
        max_connections: n + 1_000,
        max_tracked_sources: (n as usize + 1_000) * 2,
        per_ip_connect_burst: 1_000,
        per_prefix_max_connections_v4: n + 1_000,
        storm_threshold: 1_000_000,
        ..Limits::default()
    }
}

/// Set in the child processes: which server and path to measure.
const ONE_ENV: &str = "GUARD_IDLE_ONE";
const RESULT: &str = "idle-bytes-per-connection:";

/// Measures one server and kind in this process and prints the figure.
async fn measure_one(n: usize, handed_over: bool, path: &'static str) {
    let registry = Registry::new();
    let guard = guard(limits(n), &registry, None);
    let senders = std::sync::Arc::default();
    let app = idle_app(&guard, std::sync::Arc::clone(&senders));
    let addr = if handed_over {
        serve_guarded(&guard, app).await
    } else {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(app).incoming(listener).run());
        addr
    };
    let until = if path == "/ws" { "\r\n" } else { "retry:" };
    let bytes = per_connection(&guard, addr, path, until, n).await;
    println!("{RESULT}{bytes}");
}

/// Runs this test in a child process to measure one server and kind.
fn measure_in_child(n: usize, handed_over: bool, path: &str) -> f64 {
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "app::ws::idle_memory::idle_memory_per_connection",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ONE_ENV,
            format!("{} {path}", if handed_over { "guard" } else { "warp" }),
        )
        .env("GUARD_IDLE_CONNS", n.to_string())
        .output()
        .expect("run the measurement");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "measurement failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| {
            l.split_once(RESULT)
                .and_then(|(_, v)| v.trim().parse().ok())
        })
        .unwrap_or_else(|| std::panic!("no figure in: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opens thousands of sockets and measures the whole process; run alone"]
async fn idle_memory_per_connection() {
    let n: usize = std::env::var("GUARD_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    if let Ok(one) = std::env::var(ONE_ENV) {
        let (server, path) = one.split_once(' ').expect("server and path");
        let path = match path {
            "/ws" => "/ws",
            "/events" => "/events",
            other => std::panic!("nothing to measure at {other}"),
        };
        measure_one(n, server == "guard", path).await;
        return;
    }
    let mut figures = Vec::new();
    for handed_over in [false, true] {
        let (ws, sse) = tokio::task::spawn_blocking(move || {
            (
                measure_in_child(n, handed_over, "/ws"),
                measure_in_child(n, handed_over, "/events"),
            )
        })
        .await
        .unwrap();
        let server = if handed_over {
            "guard's server (guard's upgrade)"
        } else {
            "warp::serve (warp's Ws)"
        };
        println!(
            "idle memory, {n} connections, {server}: WebSocket {:.1} KiB, SSE {:.1} KiB",
            ws / 1024.0,
            sse / 1024.0
        );
        figures.push((ws, sse));
    }
    let (ws, sse) = figures[1];
    assert!(
        ws <= BUDGET,
        "an idle WebSocket costs {:.1} KiB with guard's upgrade",
        ws / 1024.0
    );
    assert!(
        sse <= BUDGET,
        "an idle SSE subscriber costs {:.1} KiB",
        sse / 1024.0
    );
}
