//! WebSocket echo throughput through `warp::serve` (warp's `Ws`) and
//! through guard's server (guard's own upgrade), in one process: the sized buffers (4 KiB instead of 128 KiB),
//! the frame meter and the message conversion must not cost throughput.
//!
//! Ignored by default (a measurement: it fails only if echoes are lost;
//! numbers from a debug build say little on their own, the ratio is the
//! point):
//!
//! ```text
//! cargo test -p guard-common --features warp,test-support --lib \
//!     echo_throughput -- --ignored --nocapture --test-threads=1
//! ```

use std::prelude::rust_2021::*;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use prometheus::Registry;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use warp::reply::Reply;
use warp::Filter;

use super::tests::{guard, serve_guarded};
use crate::app::{GuardedWebSocket, Limits, SlowConsumerPolicy, WsUpgrade};
use crate::test_support::within;

/// Messages per run, and rounds per server (the best round counts: the
/// machine is shared).
const MESSAGES: usize = 20_000;
const ROUNDS: usize = 3;
/// A chat line, and a message four read buffers long.
const SIZES: [usize; 2] = [64, 16 * 1024];

fn unlimited() -> Limits {
    Limits {
        message_rate: u32::MAX,
        message_burst: u32::MAX,
        byte_rate: u32::MAX,
        byte_burst: u32::MAX,
        outbound_queue: MESSAGES,
        slow_consumer_policy: SlowConsumerPolicy::DropOldest,
        ping_interval: None,
        ..Limits::default()
    }
}

/// Echoes of `MESSAGES` texts of `size` bytes, pipelined; messages per
/// second.
async fn echo_rate(addr: std::net::SocketAddr, size: usize) -> f64 {
    let (ws, _) = within(
        "the handshake",
        tokio_tungstenite::connect_async(format!("ws://{addr}/echo")),
    )
    .await
    .unwrap();
    let (mut tx, mut rx) = ws.split();
    let payload = "x".repeat(size);
    let start = Instant::now();
    let writer = async {
        for _ in 0..MESSAGES {
            tx.feed(WsMessage::text(payload.as_str())).await.unwrap();
        }
        tx.flush().await.unwrap();
    };
    let reader = async {
        let mut got = 0;
        while got < MESSAGES {
            match rx.next().await {
                Some(Ok(WsMessage::Text(_))) => got += 1,
                Some(Ok(_)) => {}
                other => std::panic!("echo ended after {got}: {other:?}"),
            }
        }
    };
    within("the echoes", futures_util::future::join(writer, reader)).await;
    MESSAGES as f64 / start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run alone"]
async fn echo_throughput() {
    let mut rates = Vec::new();
    for handed_over in [false, true] {
        let registry = Registry::new();
        let guard = guard(unlimited(), &registry, None);
        let app = warp::path("echo")
            .and(guard.websocket())
            .map(|up: WsUpgrade| {
                up.on_upgrade(|mut ws: GuardedWebSocket| async move {
                    while let Some(msg) = ws.next().await {
                        let _ = ws.send(msg);
                    }
                })
                .into_response()
            })
            .recover(crate::app::recover);
        let addr = if handed_over {
            serve_guarded(&guard, app).await
        } else {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(warp::serve(app).incoming(listener).run());
            addr
        };
        for size in SIZES {
            let mut best: f64 = 0.0;
            for _ in 0..ROUNDS {
                best = best.max(echo_rate(addr, size).await);
            }
            let server = if handed_over {
                "guard's upgrade"
            } else {
                "warp's Ws"
            };
            println!("echo of {size} B, {server}: {best:.0} messages/s");
            rates.push(best);
        }
    }
    for (i, size) in SIZES.iter().enumerate() {
        let ratio = rates[SIZES.len() + i] / rates[i];
        // Printed, not asserted: on a machine shared with other builds
        // the same run varies by ±15 %.
        println!("echo of {size} B, guard's upgrade / warp's Ws: {ratio:.3}");
    }
}
