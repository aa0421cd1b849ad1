//! `lab-client`'s WebSocket and SSE subcommands against a small warp server on loopback.
//! Unprivileged: the same binary the lab runs in namespaces, checked without a lab.
//!
//! The server stands in for the demo app with behaviour that makes every count predictable:
//! `/ws` echoes text and closes a client with 1008 after `WS_LIMIT` messages (like guard's
//! per-connection message cap), `/events` sends `SSE_EVENTS` events then ends the stream,
//! `/limited` always answers 429 and `/busy` 503.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use guard_tests::report::{SseReport, StormReport, WsChatReport, WsFloodReport};
use warp::http::StatusCode;
use warp::Filter;

const WS_LIMIT: usize = 200;
const SSE_EVENTS: u64 = 5;

/// Starts the server on an ephemeral loopback port in a background runtime. The thread
/// exits with the test process; the listener is loopback-only.
fn start_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let ws = warp::path("ws").and(warp::ws()).map(|ws: warp::ws::Ws| {
                ws.on_upgrade(|socket| async move {
                    let (mut tx, mut rx) = socket.split();
                    let mut seen = 0;
                    while let Some(Ok(msg)) = rx.next().await {
                        if msg.is_close() {
                            break;
                        }
                        if !msg.is_text() {
                            continue;
                        }
                        seen += 1;
                        if seen > WS_LIMIT {
                            let _ = tx
                                .send(warp::ws::Message::close_with(1008u16, "too many messages"))
                                .await;
                            // Wait for the client's close (RFC 6455 7.1.1), discarding what it
                            // still sends: dropping the socket with unread data resets the
                            // connection, and the reset can reach the client before the
                            // close frame does.
                            let drain = async {
                                while let Some(Ok(m)) = rx.next().await {
                                    if m.is_close() {
                                        break;
                                    }
                                }
                            };
                            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                            break;
                        }
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            });
            let events = warp::path("events").map(|| {
                let stream = futures_util::stream::iter(0..SSE_EVENTS).then(|n| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, Infallible>(
                        warp::sse::Event::default()
                            .data(format!("event {n}"))
                            .retry(Duration::from_millis(100)),
                    )
                });
                warp::sse::reply(warp::sse::keep_alive().stream(stream))
            });
            let limited = warp::path("limited")
                .map(|| warp::reply::with_status("slow down", StatusCode::TOO_MANY_REQUESTS));
            let busy = warp::path("busy")
                .map(|| warp::reply::with_status("busy", StatusCode::SERVICE_UNAVAILABLE));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            warp::serve(ws.or(events).or(limited).or(busy))
                .incoming(listener)
                .run()
                .await;
        });
    });
    rx.recv().expect("server address")
}

/// Runs lab-client on the host (no namespace) and parses its report.
fn run<T: serde::de::DeserializeOwned>(args: &[&str]) -> T {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lab-client"))
        .args(args)
        .output()
        .expect("run lab-client");
    assert!(
        out.status.success(),
        "lab-client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    guard_tests::measure::parse_report_line(&String::from_utf8_lossy(&out.stdout)).expect("report")
}

#[test]
fn ws_chat_counts_echoes() {
    let addr = start_server();
    let url = format!("ws://{addr}/ws");
    let r: WsChatReport = run(&[
        "ws-chat",
        "--url",
        &url,
        "--bind",
        "127.0.0.1",
        "--clients",
        "3",
        "--secs",
        "2",
        "--rate",
        "10",
    ]);
    assert_eq!(r.cmd, "ws-chat");
    assert_eq!((r.clients, r.connects, r.errors), (3, 3, 0), "{r:?}");
    assert!(r.sent >= 3, "{r:?}");
    // Every message is echoed, including the last ones (read while closing).
    assert_eq!(r.received, r.sent, "{r:?}");
    assert!(r.close_codes.is_empty() && r.rejected.is_empty(), "{r:?}");
}

#[test]
fn ws_flood_reports_the_policy_close() {
    let addr = start_server();
    let r: WsFloodReport = run(&[
        "ws-flood",
        "--url",
        &format!("ws://{addr}/ws"),
        "--secs",
        "10",
        "--rate",
        "5000",
    ]);
    assert!(r.connected, "{r:?}");
    assert_eq!(r.close_code, Some(1008), "{r:?}");
    assert_eq!(r.close_reason.as_deref(), Some("too many messages"));
    assert!(r.sent > WS_LIMIT as u64, "{r:?}");
    assert!(r.received <= WS_LIMIT as u64, "{r:?}");
}

#[test]
fn sse_counts_events_and_reconnects() {
    let addr = start_server();
    let r: SseReport = run(&[
        "sse",
        "--url",
        &format!("http://{addr}/events"),
        "--bind",
        "127.0.0.1",
        "--clients",
        "2",
        "--secs",
        "3",
    ]);
    assert_eq!(r.errors, 0, "{r:?}");
    // Each stream ends after SSE_EVENTS, so the clients come back (after the 100 ms the
    // server asks for); only the streams cut by the deadline may be short.
    assert!(
        r.subscriptions >= 2 && r.reconnects == r.subscriptions - 2,
        "{r:?}"
    );
    assert!(
        r.events <= SSE_EVENTS * r.subscriptions && r.events >= SSE_EVENTS * (r.subscriptions - 2),
        "{r:?}"
    );
}

#[test]
fn storms_sort_outcomes_by_status() {
    let addr = start_server();
    let storm = |cmd: &str, url: String| -> StormReport {
        run(&[
            cmd,
            "--url",
            &url,
            "--count",
            "20",
            "--parallel",
            "5",
            "--hold-ms",
            "10",
            "--secs",
            "20",
        ])
    };
    let ws = storm("ws-storm", format!("ws://{addr}/ws"));
    assert_eq!(
        (ws.attempted, ws.accepted, ws.failed),
        (20, 20, 0),
        "{ws:?}"
    );
    let ws = storm("ws-storm", format!("ws://{addr}/limited"));
    assert_eq!((ws.rejected_429, ws.accepted), (20, 0), "{ws:?}");
    let sse = storm("sse-storm", format!("http://{addr}/events"));
    assert_eq!((sse.accepted, sse.not_started), (20, 0), "{sse:?}");
    let sse = storm("sse-storm", format!("http://{addr}/busy"));
    assert_eq!(sse.rejected_503, 20, "{sse:?}");
    let sse = storm("sse-storm", format!("http://{addr}/nope"));
    assert_eq!(sse.other_status.get(&404), Some(&20), "{sse:?}");
}

#[test]
fn bad_input_is_a_clear_error() {
    for (args, expect) in [
        (
            &["ws-chat", "--url", "ws://8.8.8.8/ws"][..],
            "outside the lab",
        ),
        (&["sse", "--url", "https://127.0.0.1/events"], "no TLS"),
        (
            &["ws-storm", "--url", "http://127.0.0.1:1/ws"],
            "not supported",
        ),
        (
            &["probe", "--target", "127.0.0.1:1", "--bind", "::1"],
            "different IP families",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lab-client"))
            .args(args)
            .output()
            .expect("run lab-client");
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
    }
}
