//! Guarded SSE against real HTTP clients (raw sockets reading the event
//! stream).
#![cfg(all(feature = "warp", feature = "test-support"))]

mod common;

use std::time::Duration;

use common::{
    contains, eventually, head, metric, read_until, serve, serve_with, sse_connect, within,
    FakeAgent, Mode, SseHub, TestDir,
};
use guard_common::addr::Prefix;
use guard_common::app::{Limits, SlowConsumerPolicy};
use guard_common::client::ClientConfig;
use guard_common::state::reason;
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every `retry:` value (ms) in `buf`.
fn retries(buf: &[u8]) -> Vec<u64> {
    let text = String::from_utf8_lossy(buf);
    text.match_indices("retry:")
        .map(|(i, _)| {
            let digits: String = text[i + 6..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_a_jittered_retry_events_and_keep_alives() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            sse_retry_base: Duration::from_secs(1),
            sse_retry_jitter: Duration::from_secs(2),
            sse_keep_alive: Duration::from_millis(50),
            ..Limits::default()
        },
        &registry,
        None,
    );
    let hub = SseHub::default();
    let addr = serve_with(&guard, common::app(&guard, hub.clone())).await;
    let mut s = sse_connect(addr, "198.18.20.1").await;
    let mut buf = Vec::new();
    assert!(read_until(&mut s, &mut buf, "retry:").await);
    let h = head(&buf).to_ascii_lowercase();
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert!(h.contains("content-type: text/event-stream"), "{h}");
    eventually("the subscriber to join", || hub.len() == 1).await;
    assert_eq!(hub.send("hello"), 1);
    assert!(read_until(&mut s, &mut buf, "data:hello\n").await);
    // An empty comment after 50 ms of silence.
    assert!(read_until(&mut s, &mut buf, "\r\n:\n\n\r\n").await);
    let r = retries(&buf);
    assert_eq!(r.len(), 1, "one greeting");
    assert!((1000..=3000).contains(&r[0]), "retry {}", r[0]);
    assert_eq!(
        metric(&registry, r#"guard_app_connections_open{kind="sse"}"#),
        1.0
    );
    // Streamed outside hyper: the events above came through the hand-off.
    assert_eq!(
        metric(&registry, "guard_app_server_streams_handed_off_total"),
        1.0
    );

    // Gone clients are found (at the latest by the next keep-alive) and
    // their slots freed.
    drop(s);
    eventually("the slot of a gone subscriber", || {
        guard.open_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_service_or_source_is_refused_over_http() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            per_ip_max_connections: 1,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let mut first = sse_connect(addr, "198.18.21.1").await;
    let mut buf = Vec::new();
    assert!(read_until(&mut first, &mut buf, "retry:").await);
    let mut second = sse_connect(addr, "198.18.21.1").await;
    let mut buf = Vec::new();
    assert!(read_until(&mut second, &mut buf, "\r\n\r\n").await);
    let h = head(&buf).to_ascii_lowercase();
    assert!(h.starts_with("http/1.1 429"), "{h}");
    assert!(h.contains("retry-after: 10"), "{h}");
}

/// Pushes numbered 16 KiB events until the hub has no subscriber left or
/// `count` went out; then "last" if anyone is still there.
async fn firehose(hub: &SseHub, count: usize) {
    let pad = "x".repeat(16 * 1024);
    for i in 0..count {
        if hub.send(&format!("{i:08} {pad}")) == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    hub.send("last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_evicted_and_told_when_to_come_back() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            sse_buffer: 4,
            slow_consumer_policy: SlowConsumerPolicy::Close,
            sse_retry_base: Duration::from_secs(5),
            sse_retry_jitter: Duration::from_secs(5),
            ..Limits::default()
        },
        &registry,
        None,
    );
    let hub = SseHub::default();
    let addr = serve(common::app(&guard, hub.clone())).await;
    // Subscribes and does not read.
    let mut s = sse_connect(addr, "198.18.22.1").await;
    eventually("the subscriber to join", || hub.len() == 1).await;
    firehose(&hub, 100_000).await;
    assert_eq!(hub.len(), 0, "the evicted subscriber refuses events");
    eventually("the eviction to be counted", || {
        metric(&registry, "guard_app_sse_evictions_total") == 1.0
    })
    .await;
    eventually("the evicted subscriber's slot", || {
        guard.open_connections() == 0
    })
    .await;

    // What the client finally reads ends with the eviction and the end of
    // the response.
    let mut buf = Vec::new();
    assert!(read_until(&mut s, &mut buf, "event:evicted\n").await);
    assert!(read_until(&mut s, &mut buf, "\r\n0\r\n\r\n").await);
    let tail = &buf[buf.len() - 200..];
    assert!(contains(tail, "event:evicted"));
    let r = retries(&buf);
    assert_eq!(r.len(), 2, "greeting and eviction");
    assert!(r.iter().all(|ms| (5000..=10_000).contains(ms)), "{r:?}");
    assert_eq!(
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="slow_consumer"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            r#"guard_app_messages_dropped_total{reason="slow_consumer"}"#
        ),
        1.0
    );
}

/// Issue 23: the evicted subscriber's slot was given back but its
/// connection stayed open, kept alive for a next request that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_subscriber_s_connection_is_closed() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            sse_buffer: 4,
            slow_consumer_policy: SlowConsumerPolicy::Close,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let hub = SseHub::default();
    let addr = serve_with(&guard, common::app(&guard, hub.clone())).await;
    let mut s = sse_connect(addr, "198.18.23.1").await;
    eventually("the subscriber to join", || hub.len() == 1).await;
    firehose(&hub, 100_000).await;
    assert_eq!(hub.len(), 0, "evicted");
    // Everything up to the server's FIN: the eviction, the end of the
    // body, then the end of the connection.
    let mut buf = Vec::new();
    within(
        "the server to close the connection",
        s.read_to_end(&mut buf),
    )
    .await
    .unwrap();
    assert!(contains(&buf, "event:evicted"));
    assert!(buf.ends_with(b"\r\n0\r\n\r\n"), "the body ended cleanly");
    assert_eq!(
        metric(&registry, "guard_app_server_streams_handed_off_total"),
        1.0
    );
    assert!(
        head(&buf)
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        head(&buf)
    );
}

/// An SSE subscription, through the trusted proxy for `ip`, by a client
/// that reads nothing, with a receive buffer so small that the server's
/// writes soon stop going anywhere.
async fn stalled_subscriber(addr: std::net::SocketAddr, ip: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = within("the SSE connect", socket.connect(addr))
        .await
        .unwrap();
    let req = format!(
        "GET /events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nX-Forwarded-For: {ip}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Issue 17: eviction only set a flag, and the slot was given back when
/// the response body was next polled, which never happens while the
/// client's socket is full: the evicted subscriber held its slot forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_gives_its_slot_back_when_evicted() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            sse_buffer: 4,
            slow_consumer_policy: SlowConsumerPolicy::Close,
            per_ip_max_connections: 1,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let hub = SseHub::default();
    let addr = serve(common::app(&guard, hub.clone())).await;
    let ip = "198.18.25.1";
    let stalled = stalled_subscriber(addr, ip).await;
    eventually("the subscriber to join", || hub.len() == 1).await;
    assert_eq!(guard.open_connections_from(ip.parse().unwrap()), 1);

    // Paced so that the server keeps up for as long as the socket takes
    // data: what fills the queue, and evicts, is the stall itself.
    let pad = "x".repeat(16 * 1024);
    let sent = within("the stalled subscriber's eviction", async {
        let mut sent = 0usize;
        while hub.send(&pad) == 1 {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sent
    })
    .await;
    assert!(sent > 4, "evicted after {sent} events: it never stalled");

    // The connection is still up and unread, its slot is free.
    eventually("the stalled subscriber's slot", || {
        guard.open_connections() == 0
    })
    .await;
    assert_eq!(guard.open_connections_from(ip.parse().unwrap()), 0);
    assert_eq!(
        metric(&registry, "guard_app_sse_evictions_total"),
        1.0,
        "counted when decided"
    );
    assert_eq!(
        metric(&registry, r#"guard_app_connections_open{kind="sse"}"#),
        0.0
    );
    assert_eq!(
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="slow_consumer"}"#
        ),
        1.0
    );
    // The same address (at most one slot) is admitted again beside it.
    let mut again = sse_connect(addr, ip).await;
    let mut buf = Vec::new();
    assert!(read_until(&mut again, &mut buf, "retry:").await);
    assert!(head(&buf).to_ascii_lowercase().starts_with("http/1.1 200"));
    assert_eq!(guard.open_connections(), 1);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_can_lose_old_events_instead() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            sse_buffer: 4,
            slow_consumer_policy: SlowConsumerPolicy::DropOldest,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let hub = SseHub::default();
    let addr = serve(common::app(&guard, hub.clone())).await;
    let mut s = sse_connect(addr, "198.18.23.1").await;
    eventually("the subscriber to join", || hub.len() == 1).await;
    let count = 3000;
    firehose(&hub, count).await;
    assert_eq!(hub.len(), 1, "still subscribed");

    let mut buf = Vec::new();
    assert!(read_until(&mut s, &mut buf, "data:last\n").await);
    let text = String::from_utf8_lossy(&buf);
    let numbers: Vec<usize> = text
        .match_indices("data:")
        .filter_map(|(i, _)| text.get(i + 5..i + 13)?.parse().ok())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    let dropped = metric(
        &registry,
        r#"guard_app_messages_dropped_total{reason="slow_consumer"}"#,
    );
    assert!(dropped > 0.0);
    assert_eq!(numbers.len() + dropped as usize, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_counted_and_reported_once() {
    let dir = TestDir::new("storm");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            storm_threshold: 5,
            storm_window: Duration::from_secs(3600),
            per_ip_connect_burst: 1000,
            ..Limits::default()
        },
        &registry,
        Some(ClientConfig::new(dir.sock(), "test-app")),
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let before = common::unix_ns_now();
    for _ in 0..12 {
        let mut s = sse_connect(addr, "198.18.24.7").await;
        let mut buf = Vec::new();
        assert!(read_until(&mut s, &mut buf, "retry:").await);
    }
    let block = agent.next_block().await;
    assert_eq!(block.prefix, "198.18.24.7/32".parse::<Prefix>().unwrap());
    assert_eq!(block.reason, reason::RECONNECT_STORM);
    assert!(block.detected_at_unix_ns >= before);
    assert_eq!(metric(&registry, "guard_app_reconnect_storms_total"), 1.0);
    eventually("the report to be acknowledged", || {
        guard.reports_sent() == 1
    })
    .await;
}
