//! Guarded WebSockets against real clients over real sockets.
#![cfg(all(feature = "warp", feature = "test-support"))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    close_frame, eventually, flood, metric, recv_until, serve, unix_ns_now, within, ws_connect,
    FakeAgent, Mode, SseHub, TestDir,
};
use futures_util::{SinkExt, StreamExt};
use guard_common::addr::Prefix;
use guard_common::app::{
    GuardedWebSocket, Limits, SendError, SlowConsumerPolicy, ViolationPolicy, WsUpgrade,
};
use guard_common::client::ClientConfig;
use guard_common::state::reason;
use prometheus::Registry;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use warp::reply::Reply;
use warp::Filter;

/// Limits that make a flood quick to provoke: 5 messages, then 1/s.
fn flood_limits() -> Limits {
    Limits {
        message_rate: 1,
        message_burst: 5,
        violation_threshold: 10,
        violation_window: Duration::from_secs(3600),
        ping_interval: None,
        ..Limits::default()
    }
}

/// An app still on `warp::serve`: warp finishes the upgrade (no sized
/// buffers, messages charged as assembled), and the limits hold the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_still_on_warp_serve_keeps_its_limits() {
    let registry = Registry::new();
    let guard = common::guard(flood_limits(), &registry, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = common::app(&guard, SseHub::default());
    tokio::spawn(warp::serve(app).incoming(listener).run());

    let mut alice = ws_connect(addr, "/chat", "198.18.19.1", None).await;
    alice.send(WsMessage::text("alice here")).await.unwrap();
    recv_until(&mut alice, "alice here").await;
    let flooder = ws_connect(addr, "/chat", "198.18.19.66", None).await;
    let (code, sent) = flood(flooder, "spam").await;
    assert_eq!(code, Some(CloseCode::Policy), "after {sent} messages");
    eventually("the flooder's close to be counted", || {
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="flood"}"#,
        ) == 1.0
    })
    .await;
    alice.send(WsMessage::text("still here")).await.unwrap();
    recv_until(&mut alice, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_closed_with_1008_and_reported_while_others_keep_chatting() {
    let dir = TestDir::new("flood");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let registry = Registry::new();
    let guard = common::guard(
        flood_limits(),
        &registry,
        Some(ClientConfig::new(dir.sock(), "test-app")),
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;

    let mut alice = ws_connect(addr, "/chat", "198.18.10.1", None).await;
    let mut bob = ws_connect(addr, "/chat", "198.18.10.2", None).await;
    // Seeing its own broadcast means a member has joined the hub.
    alice.send(WsMessage::text("alice here")).await.unwrap();
    recv_until(&mut alice, "alice here").await;
    bob.send(WsMessage::text("bob here")).await.unwrap();
    recv_until(&mut bob, "bob here").await;

    let before = unix_ns_now();
    let flooder = ws_connect(addr, "/chat", "198.18.10.66", None).await;
    let (code, sent) = flood(flooder, "spam").await;
    assert_eq!(code, Some(CloseCode::Policy), "after {sent} messages");

    let block = agent.next_block().await;
    let after = unix_ns_now();
    assert_eq!(block.prefix, "198.18.10.66/32".parse::<Prefix>().unwrap());
    assert_eq!(block.reason, reason::MESSAGE_FLOOD);
    assert_eq!(block.ttl_secs, 600);
    assert!(
        (before..=after).contains(&block.detected_at_unix_ns),
        "detected at {} outside {before}..={after}",
        block.detected_at_unix_ns
    );
    assert!(block.detail.contains("violations"), "{}", block.detail);

    // The others never noticed.
    alice
        .send(WsMessage::text("after the flood"))
        .await
        .unwrap();
    recv_until(&mut bob, "after the flood").await;
    recv_until(&mut alice, "after the flood").await;

    assert_eq!(metric(&registry, "guard_app_floods_detected_total"), 1.0);
    eventually("the flooder's close to be counted", || {
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="flood"}"#,
        ) == 1.0
    })
    .await;
    assert!(metric(&registry, r#"guard_app_violations_total{reason="rate"}"#) >= 10.0);
    assert!(
        metric(
            &registry,
            r#"guard_app_messages_dropped_total{reason="rate"}"#
        ) >= 10.0
    );
    assert_eq!(guard.open_connections(), 2);
    eventually("the report to be acknowledged", || {
        guard.reports_sent() == 1
    })
    .await;
    assert_eq!(guard.reports_failed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_closes_with_1009() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            max_message_size: 1024,
            max_frame_size: 1024,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let mut c = ws_connect(addr, "/echo", "198.18.11.1", None).await;
    let fits = "a".repeat(1024);
    c.send(WsMessage::text(fits.clone())).await.unwrap();
    recv_until(&mut c, &fits).await;
    c.send(WsMessage::text("b".repeat(1025))).await.unwrap();
    let (code, why) = close_frame(&mut c).await.expect("a close frame");
    assert_eq!(code, CloseCode::Size);
    assert_eq!(why, "message too big");
    assert_eq!(
        metric(&registry, r#"guard_app_violations_total{reason="size"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            r#"guard_app_messages_dropped_total{reason="size"}"#
        ),
        1.0
    );
    eventually("the close to be counted", || {
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="violations"}"#,
        ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_with_1007() {
    let registry = Registry::new();
    let guard = common::guard(Limits::default(), &registry, None);
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let mut c = ws_connect(addr, "/echo", "198.18.12.1", None).await;
    let bad = Frame::message(vec![b'o', b'k', 0xff, 0xfe], OpCode::Data(Data::Text), true);
    c.send(WsMessage::Frame(bad)).await.unwrap();
    let (code, _) = close_frame(&mut c).await.expect("a close frame");
    assert_eq!(code, CloseCode::Invalid);
    assert_eq!(
        metric(&registry, r#"guard_app_violations_total{reason="invalid"}"#),
        1.0
    );
}

async fn send_all(c: &mut common::Client, msgs: &[&str]) {
    for m in msgs {
        c.send(WsMessage::text(*m)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_check_with_each_violation_policy() {
    let dir = TestDir::new("invalid");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    for policy in [
        ViolationPolicy::Warn,
        ViolationPolicy::Drop,
        ViolationPolicy::Close,
    ] {
        let registry = Registry::new();
        let guard = common::guard(
            Limits {
                violation_policy: policy,
                violation_threshold: 3,
                ..Limits::default()
            },
            &registry,
            Some(ClientConfig::new(dir.sock(), "test-app")),
        );
        let addr = serve(common::app(&guard, SseHub::default())).await;
        let mut c = ws_connect(addr, "/json", "198.18.13.1", None).await;
        send_all(&mut c, &["{1}", "bad 1", "bad 2", "{2}", "bad 3", "{3}"]).await;
        match policy {
            ViolationPolicy::Warn => {
                // Everything is delivered, and counted.
                for m in ["{1}", "bad 1", "bad 2", "{2}", "bad 3", "{3}"] {
                    recv_until(&mut c, m).await;
                }
            }
            ViolationPolicy::Drop => {
                let mut got = Vec::new();
                while got.len() < 3 {
                    match within("an echo", c.next()).await {
                        Some(Ok(WsMessage::Text(t))) => got.push(t.as_str().to_owned()),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert_eq!(got, ["{1}", "{2}", "{3}"]);
            }
            ViolationPolicy::Close => {
                recv_until(&mut c, "{1}").await;
                recv_until(&mut c, "{2}").await;
                let (code, why) = close_frame(&mut c).await.expect("a close frame");
                assert_eq!(code, CloseCode::Policy);
                assert_eq!(why, "too many invalid messages");
                let block = agent.next_block().await;
                assert_eq!(block.reason, reason::INVALID_MESSAGES);
                assert_eq!(block.prefix, "198.18.13.1/32".parse::<Prefix>().unwrap());
            }
        }
        assert_eq!(
            metric(&registry, r#"guard_app_violations_total{reason="invalid"}"#),
            3.0,
            "{policy:?}"
        );
        let dropped = metric(
            &registry,
            r#"guard_app_messages_dropped_total{reason="invalid"}"#,
        );
        assert_eq!(
            dropped,
            if policy == ViolationPolicy::Warn {
                0.0
            } else {
                3.0
            },
            "{policy:?}"
        );
        // Invalid messages are not a flood.
        assert_eq!(metric(&registry, "guard_app_floods_detected_total"), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_live_one_kept_by_pongs() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            idle_timeout: Some(Duration::from_millis(300)),
            ping_interval: None,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let mut silent = ws_connect(addr, "/echo", "198.18.14.1", None).await;
    let (code, why) = close_frame(&mut silent).await.expect("a close frame");
    assert_eq!((code, why.as_str()), (CloseCode::Normal, "idle timeout"));
    eventually("the idle close to be counted", || {
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="idle"}"#,
        ) == 1.0
    })
    .await;

    // With pings ten times as often as the timeout, a client that only
    // answers them (automatically, by reading) stays through many timeouts.
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            idle_timeout: Some(Duration::from_millis(300)),
            ping_interval: Some(Duration::from_millis(30)),
            ..Limits::default()
        },
        &registry,
        None,
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let mut quiet = ws_connect(addr, "/echo", "198.18.14.2", None).await;
    let mut pings = 0;
    while pings < 40 {
        match within("a ping", quiet.next()).await {
            Some(Ok(WsMessage::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    quiet.send(WsMessage::text("still open")).await.unwrap();
    recv_until(&mut quiet, "still open").await;
    assert_eq!(
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="idle"}"#
        ),
        0.0
    );
}

/// `/firehose`: pushes `count` numbered 16 KiB messages through a
/// `WsSender` (then "last"), recording the first send error.
fn firehose(
    guard: &guard_common::app::Guard,
    count: usize,
    done: Arc<AtomicBool>,
    error: Arc<Mutex<Option<SendError>>>,
) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    warp::path("firehose")
        .and(guard.websocket())
        .map(move |up: WsUpgrade| {
            let (done, error) = (done.clone(), error.clone());
            up.on_upgrade(move |mut ws: GuardedWebSocket| async move {
                let tx = ws.sender();
                tokio::spawn(async move {
                    let pad = "x".repeat(16 * 1024);
                    for i in 0..=count {
                        let msg = if i == count {
                            "last".to_owned()
                        } else {
                            format!("{i:08} {pad}")
                        };
                        if let Err(e) = tx.send(warp::ws::Message::text(msg)) {
                            *error.lock().unwrap() = Some(e);
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    done.store(true, Ordering::SeqCst);
                });
                while ws.next().await.is_some() {}
            })
            .into_response()
        })
        .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            outbound_queue: 8,
            slow_consumer_policy: SlowConsumerPolicy::Close,
            close_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
        &registry,
        None,
    );
    let done = Arc::new(AtomicBool::new(false));
    let error = Arc::new(Mutex::new(None));
    let addr = serve(firehose(&guard, 100_000, done.clone(), error.clone())).await;
    // Connects and never reads.
    let _c = ws_connect(addr, "/firehose", "198.18.15.1", None).await;
    eventually("the producer to be refused", || done.load(Ordering::SeqCst)).await;
    assert_eq!(*error.lock().unwrap(), Some(SendError::SlowConsumer));
    eventually("the slow consumer's slot to be freed", || {
        guard.open_connections() == 0
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_loses_old_messages_but_gets_the_newest() {
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            outbound_queue: 8,
            slow_consumer_policy: SlowConsumerPolicy::DropOldest,
            ..Limits::default()
        },
        &registry,
        None,
    );
    let done = Arc::new(AtomicBool::new(false));
    let error = Arc::new(Mutex::new(None));
    // Far more than socket buffers hold.
    let count = 3000;
    let addr = serve(firehose(&guard, count, done.clone(), error.clone())).await;
    let mut c = ws_connect(addr, "/firehose", "198.18.16.1", None).await;
    eventually("the producer to finish", || done.load(Ordering::SeqCst)).await;
    assert_eq!(*error.lock().unwrap(), None);

    // Now read: numbers only go up, some are missing, "last" arrives.
    let mut seen = 0usize;
    let mut prev: Option<usize> = None;
    within("every message up to the last", async {
        loop {
            match c.next().await {
                Some(Ok(WsMessage::Text(t))) if t.as_str() == "last" => break,
                Some(Ok(WsMessage::Text(t))) => {
                    let n: usize = t.as_str()[..8].parse().unwrap();
                    assert!(prev.is_none_or(|p| n > p), "{n} after {prev:?}");
                    prev = Some(n);
                    seen += 1;
                }
                Some(Ok(_)) => {}
                other => panic!("connection ended early: {other:?}"),
            }
        }
    })
    .await;
    let dropped = metric(
        &registry,
        r#"guard_app_messages_dropped_total{reason="slow_consumer"}"#,
    );
    assert!(dropped > 0.0);
    assert_eq!(
        seen + dropped as usize,
        count,
        "every message was delivered or counted dropped"
    );
    assert_eq!(guard.open_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_identity_behind_a_shared_address_does_not_get_it_reported() {
    let dir = TestDir::new("ident");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let registry = Registry::new();
    let guard = common::guard(
        Limits {
            identity_offenders_to_report: 2,
            ..flood_limits()
        },
        &registry,
        Some(ClientConfig::new(dir.sock(), "test-app")),
    );
    let addr = serve(common::app(&guard, SseHub::default())).await;
    let nat = "198.18.17.1";

    let mut alice = ws_connect(addr, "/ident", nat, Some("alice")).await;
    let mallory = ws_connect(addr, "/ident", nat, Some("mallory")).await;
    assert_eq!(flood(mallory, "spam").await.0, Some(CloseCode::Policy));
    // Alice, at the same address, carries on.
    alice.send(WsMessage::text("hi")).await.unwrap();
    recv_until(&mut alice, "hi").await;

    // A flood from elsewhere is reported at once; it being the first
    // report proves the shared address was not.
    let loner = ws_connect(addr, "/ident", "198.18.17.99", None).await;
    assert_eq!(flood(loner, "spam").await.0, Some(CloseCode::Policy));
    let first = agent.next_block().await;
    assert_eq!(first.prefix, "198.18.17.99/32".parse::<Prefix>().unwrap());

    // A second identity misbehaving from the shared address: now it is the
    // address.
    let eve = ws_connect(addr, "/ident", nat, Some("eve")).await;
    assert_eq!(flood(eve, "spam").await.0, Some(CloseCode::Policy));
    let second = agent.next_block().await;
    assert_eq!(second.prefix, "198.18.17.1/32".parse::<Prefix>().unwrap());
    assert_eq!(second.reason, reason::MESSAGE_FLOOD);
    assert!(
        second.detail.contains("2 distinct identities"),
        "{}",
        second.detail
    );
    assert_eq!(metric(&registry, "guard_app_floods_detected_total"), 3.0);
    alice.send(WsMessage::text("still here")).await.unwrap();
    recv_until(&mut alice, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_close_sends_what_was_queued_first() {
    let registry = Registry::new();
    let guard = common::guard(Limits::default(), &registry, None);
    let route = warp::path("bye")
        .and(guard.websocket())
        .map(|up: WsUpgrade| {
            up.on_upgrade(|mut ws: GuardedWebSocket| async move {
                if ws.next().await.is_some() {
                    // Through the queue, as another task would.
                    let tx = ws.sender();
                    for i in 0..50 {
                        tx.send(warp::ws::Message::text(format!("{i}"))).unwrap();
                    }
                    ws.close_with(4000, "bye").await;
                }
            })
            .into_response()
        })
        .boxed();
    let addr = serve(route).await;
    let mut c = ws_connect(addr, "/bye", "198.18.18.1", None).await;
    c.send(WsMessage::text("go")).await.unwrap();
    for i in 0..50 {
        match within("a queued message", c.next()).await {
            Some(Ok(WsMessage::Text(t))) => assert_eq!(t.as_str(), i.to_string()),
            other => panic!("expected message {i}, got {other:?}"),
        }
    }
    let (code, why) = close_frame(&mut c).await.expect("a close frame");
    assert_eq!((u16::from(code), why.as_str()), (4000, "bye"));
    eventually("the slot", || guard.open_connections() == 0).await;
    assert_eq!(
        metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="normal"}"#
        ),
        1.0
    );
}
