//! Admission: caps, rates, `Retry-After`, and permits given back on every
//! way a connection can end.
#![cfg(all(feature = "warp", feature = "test-support"))]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{eventually, within};
use futures_util::StreamExt;
use guard_common::app::{
    self, ConnKind, Guard, GuardedWebSocket, Limits, RejectReason, Rejected, SseSubscription,
    WsUpgrade,
};
use prometheus::Registry;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn guard_with(limits: Limits, registry: &Registry) -> Guard {
    Guard::builder()
        .limits(limits)
        .registry(registry)
        .trusted_proxies(["127.0.0.1".parse().unwrap()])
        .build()
        .unwrap()
}

/// `/events`: a subscription whose stream ends as soon as it has greeted.
fn sse_route(guard: &Guard) -> BoxedFilter<(Response,)> {
    warp::path("events")
        .and(guard.sse())
        .map(|sub: SseSubscription| sub.channel().1.into_response())
        .recover(app::recover)
        .unify()
        .boxed()
}

async fn subscribe(guard: &Guard, from: &str) -> Result<SseSubscription, Rejected> {
    warp::test::request()
        .path("/")
        .remote_addr(addr(from))
        .filter(&guard.sse())
        .await
        .map_err(|rejection| {
            rejection
                .find::<Rejected>()
                .cloned()
                .expect("a guard rejection")
        })
}

fn retry_after(res: &warp::http::Response<bytes::Bytes>) -> u64 {
    res.headers()
        .get("retry-after")
        .expect("Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn per_ip_cap_is_429_with_retry_after_and_a_closed_slot_is_free_again() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            per_ip_max_connections: 2,
            retry_after_cap: Duration::from_secs(7),
            ..Limits::default()
        },
        &registry,
    );
    let a = subscribe(&guard, "198.18.0.1:1000").await.unwrap();
    let _b = subscribe(&guard, "198.18.0.1:1001").await.unwrap();
    let refused = subscribe(&guard, "198.18.0.1:1002").await.unwrap_err();
    assert_eq!(refused.reason, RejectReason::PerIpCap);
    assert_eq!(refused.kind, ConnKind::Sse);

    let res = warp::test::request()
        .path("/events")
        .remote_addr(addr("198.18.0.1:1003"))
        .reply(&sse_route(&guard))
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&res), 7);

    // Another source is not affected.
    let _other = subscribe(&guard, "198.18.0.2:1000").await.unwrap();
    assert_eq!(
        guard.open_connections_from("198.18.0.1".parse().unwrap()),
        2
    );

    drop(a);
    assert_eq!(
        guard.open_connections_from("198.18.0.1".parse().unwrap()),
        1
    );
    let _c = subscribe(&guard, "198.18.0.1:1004").await.unwrap();
    assert_eq!(
        common::metric(
            &registry,
            r#"guard_app_connections_rejected_total{kind="sse",reason="per_ip_cap"}"#
        ),
        2.0
    );
    assert_eq!(
        common::metric(&registry, r#"guard_app_connections_open{kind="sse"}"#),
        3.0
    );
    assert_eq!(
        common::metric(
            &registry,
            r#"guard_app_connections_admitted_total{kind="sse"}"#
        ),
        4.0
    );
}

#[tokio::test]
async fn a_network_is_capped_as_a_whole_per_24_and_per_48() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            per_ip_max_connections: 2,
            per_prefix_max_connections_v4: 3,
            per_prefix_max_connections_v6: 4,
            retry_after_cap: Duration::from_secs(7),
            ..Limits::default()
        },
        &registry,
    );
    // Three sources of one /24, each under its own cap, fill the network's.
    let a = subscribe(&guard, "198.18.50.1:1000").await.unwrap();
    let _b = subscribe(&guard, "198.18.50.2:1000").await.unwrap();
    let _c = subscribe(&guard, "198.18.50.3:1000").await.unwrap();
    let refused = subscribe(&guard, "198.18.50.4:1000").await.unwrap_err();
    assert_eq!(refused.reason, RejectReason::PerPrefixCap);
    let res = warp::test::request()
        .path("/events")
        .remote_addr(addr("198.18.50.200:1000"))
        .reply(&sse_route(&guard))
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry_after(&res), 7);
    // The next /24 is another network.
    let _d = subscribe(&guard, "198.18.51.1:1000").await.unwrap();
    // A slot given back in the network is free for any of its sources.
    drop(a);
    let _e = subscribe(&guard, "198.18.50.4:1001").await.unwrap();

    // IPv6: /64s are sources (two each), a /48 holds four.
    let mut held = Vec::new();
    for sub in ["1", "2"] {
        for port in [1000, 1001] {
            let from = format!("[2001:2:0:{sub}::1]:{port}");
            held.push(subscribe(&guard, &from).await.unwrap());
        }
    }
    let refused = subscribe(&guard, "[2001:2:0:3::1]:1000").await.unwrap_err();
    assert_eq!(refused.reason, RejectReason::PerPrefixCap);
    let _other_48 = subscribe(&guard, "[2001:2:1:1::1]:1000").await.unwrap();

    assert_eq!(
        common::metric(
            &registry,
            r#"guard_app_connections_rejected_total{kind="sse",reason="per_prefix_cap"}"#
        ),
        3.0
    );
}

#[tokio::test]
async fn global_cap_is_503_with_a_jittered_retry_after() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            max_connections: 3,
            retry_after_global: Duration::from_secs(2),
            ..Limits::default()
        },
        &registry,
    );
    let mut held = Vec::new();
    for i in 1..=3 {
        held.push(
            subscribe(&guard, &format!("198.18.1.{i}:1000"))
                .await
                .unwrap(),
        );
    }
    let route = sse_route(&guard);
    for _ in 0..20 {
        let res = warp::test::request()
            .path("/events")
            .remote_addr(addr("198.18.1.9:1000"))
            .reply(&route)
            .await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let secs = retry_after(&res);
        assert!((2..=4).contains(&secs), "Retry-After {secs}");
    }
    held.pop();
    subscribe(&guard, "198.18.1.9:1000").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn per_ip_rate_refills_over_time() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            per_ip_connect_rate: 1,
            per_ip_connect_burst: 3,
            ..Limits::default()
        },
        &registry,
    );
    for _ in 0..3 {
        drop(subscribe(&guard, "198.18.2.1:1000").await.unwrap());
    }
    let refused = subscribe(&guard, "198.18.2.1:1000").await.unwrap_err();
    assert_eq!(refused.reason, RejectReason::PerIpRate);
    assert_eq!(refused.retry_after_secs(), 1);
    // The refusal did not spend the next token.
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(subscribe(&guard, "198.18.2.1:1000").await.unwrap());
    assert_eq!(
        subscribe(&guard, "198.18.2.1:1000")
            .await
            .unwrap_err()
            .reason,
        RejectReason::PerIpRate
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    drop(subscribe(&guard, "198.18.2.1:1000").await.unwrap());
    drop(subscribe(&guard, "198.18.2.1:1000").await.unwrap());
    assert!(subscribe(&guard, "198.18.2.1:1000").await.is_err());
}

#[tokio::test]
async fn identities_are_limited_apart_from_their_address() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            per_identity_max_connections: 1,
            ..Limits::default()
        },
        &registry,
    );
    let filter = guard.sse_with_identity(warp::header::optional::<String>("x-user"));
    let as_user = |user: &'static str| {
        warp::test::request()
            .header("x-user", user)
            .remote_addr(addr("198.18.3.1:1000"))
    };
    let _alice = as_user("alice").filter(&filter).await.unwrap();
    let again = as_user("alice").filter(&filter).await.unwrap_err();
    assert_eq!(
        again.find::<Rejected>().unwrap().reason,
        RejectReason::PerIdentityCap
    );
    let bob = as_user("bob").filter(&filter).await.unwrap();
    assert_eq!(bob.peer().identity(), Some("bob"));
    assert_eq!(
        guard.open_connections_from("198.18.3.1".parse().unwrap()),
        2
    );
}

#[tokio::test]
async fn proxy_headers_count_only_from_trusted_proxies() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            per_ip_max_connections: 1,
            ..Limits::default()
        },
        &registry,
    );
    let via = |from: &str, xff: &str| {
        warp::test::request()
            .remote_addr(addr(from))
            .header("x-forwarded-for", xff)
    };
    let filter = guard.sse();
    // Through the trusted proxy, each named client is its own source.
    let a = via("127.0.0.1:5000", "198.18.4.1")
        .filter(&filter)
        .await
        .unwrap();
    let _b = via("127.0.0.1:5001", "198.18.4.2")
        .filter(&filter)
        .await
        .unwrap();
    assert_eq!(
        a.peer().ip(),
        "198.18.4.1".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(a.peer().proxy(), Some("127.0.0.1".parse().unwrap()));
    // An untrusted peer cannot pick its own key.
    let _c = via("198.18.4.9:5000", "198.18.4.3")
        .filter(&filter)
        .await
        .unwrap();
    assert!(via("198.18.4.9:5001", "198.18.4.4")
        .filter(&filter)
        .await
        .is_err());
}

/// Issue 17: a non-ASCII byte anywhere in the header made the whole header
/// unreadable, and the client was taken for the trusted proxy itself: it
/// then shared the proxy's limits and its exemption from reports.
#[tokio::test]
async fn a_non_ascii_forwarded_for_never_stands_for_the_proxy() {
    let registry = Registry::new();
    let guard = guard_with(Limits::default(), &registry);
    let via_proxy = |xff: &[u8]| {
        warp::test::request()
            .path("/events")
            .remote_addr(addr("127.0.0.1:5000"))
            .header(
                "x-forwarded-for",
                warp::http::HeaderValue::from_bytes(xff).unwrap(),
            )
    };
    // The client wrote junk; the proxy appended the address it saw.
    let peer = via_proxy(b"\xc3\xa9vil, 198.18.14.7")
        .filter(&guard.peer())
        .await
        .unwrap();
    assert_eq!(
        peer.ip(),
        "198.18.14.7".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(peer.proxy(), Some("127.0.0.1".parse().unwrap()));
    // The same on separate header lines.
    let peer = warp::test::request()
        .remote_addr(addr("127.0.0.1:5000"))
        .header(
            "x-forwarded-for",
            warp::http::HeaderValue::from_bytes(b"6.6.6.6\xff").unwrap(),
        )
        .header("x-forwarded-for", "198.18.14.8")
        .filter(&guard.peer())
        .await
        .unwrap();
    assert_eq!(
        peer.ip(),
        "198.18.14.8".parse::<std::net::IpAddr>().unwrap()
    );

    // The hop the proxy vouches for is unreadable: there is no client to
    // name, and the proxy is not it. Refused, counted nowhere.
    let res = via_proxy(b"198.18.14.9, 198.18.14.\xff")
        .reply(&sse_route(&guard))
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(via_proxy(b"\xff").filter(&guard.peer()).await.is_err());
    assert_eq!(guard.open_connections(), 0);
    assert_eq!(guard.tracked_sources(), 0);
}

/// Issue 17: reaching `max_tracked_sources` forgot every source with
/// nothing open, so one-shot sources (or refused attempts) churning through
/// the table gave a rate-limited source its whole burst back.
#[tokio::test(start_paused = true)]
async fn a_full_table_keeps_the_state_of_a_rate_limited_source() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            max_connections: 8,
            max_tracked_sources: 16,
            per_ip_connect_rate: 1,
            per_ip_connect_burst: 3,
            ..Limits::default()
        },
        &registry,
    );
    let limited = "198.18.10.1:1";
    for _ in 0..3 {
        drop(subscribe(&guard, limited).await.unwrap());
    }
    let refused = subscribe(&guard, limited).await.unwrap_err();
    assert_eq!(refused.reason, RejectReason::PerIpRate);
    let still_limited = |guard: &Guard| {
        let guard = guard.clone();
        async move {
            let r = subscribe(&guard, limited).await.map(drop);
            assert_eq!(
                r.map_err(|r| r.reason),
                Err(RejectReason::PerIpRate),
                "the limited source got its burst back"
            );
        }
    };

    // The clock stands still: nothing refills, nothing expires. Many times
    // the table's size of one-shot sources come and go...
    for i in 0..100u8 {
        drop(
            subscribe(&guard, &format!("198.18.11.{i}:1"))
                .await
                .unwrap(),
        );
        assert!(guard.tracked_sources() <= 16, "{}", guard.tracked_sources());
    }
    still_limited(&guard).await;

    // ...and, with the service full, as many refused ones.
    let mut held = Vec::new();
    for i in 0..8u8 {
        held.push(
            subscribe(&guard, &format!("198.18.12.{i}:1"))
                .await
                .unwrap(),
        );
    }
    for i in 0..100u8 {
        let r = subscribe(&guard, &format!("198.18.13.{i}:1")).await;
        assert_eq!(r.unwrap_err().reason, RejectReason::GlobalCap);
        assert!(guard.tracked_sources() <= 16, "{}", guard.tracked_sources());
    }
    drop(held.pop());
    still_limited(&guard).await;
    // Those holding slots kept theirs throughout.
    for i in 0..7u8 {
        assert_eq!(
            guard.open_connections_from(format!("198.18.12.{i}").parse().unwrap()),
            1
        );
    }

    // Once its bucket has refilled, the source is admitted again.
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(subscribe(&guard, limited).await.unwrap());
}

#[tokio::test]
async fn other_rejections_pass_through_recover() {
    let registry = Registry::new();
    let guard = guard_with(Limits::default(), &registry);
    let res = warp::test::request()
        .path("/nope")
        .remote_addr(addr("198.18.5.1:1"))
        .reply(&sse_route(&guard))
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sse_slots_come_back_however_the_subscription_ends() {
    let registry = Registry::new();
    let guard = guard_with(Limits::default(), &registry);
    // The handler never made a reply.
    drop(subscribe(&guard, "198.18.6.1:1").await.unwrap());
    assert_eq!(guard.open_connections(), 0);
    // The reply was made but never sent (the client left first).
    let (tx, reply) = subscribe(&guard, "198.18.6.1:1").await.unwrap().channel();
    assert_eq!(guard.open_connections(), 1);
    drop(reply);
    assert_eq!(guard.open_connections(), 0);
    assert!(tx.is_closed(), "the sender sees the subscriber is gone");
    // The app dropped its sender: the stream ends and the slot is freed.
    let res = warp::test::request()
        .path("/events")
        .remote_addr(addr("198.18.6.1:1"))
        .reply(&sse_route(&guard))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(common::contains(res.body(), "retry:"));
    assert_eq!(guard.open_connections(), 0);
    assert_eq!(
        common::metric(
            &registry,
            r#"guard_app_connections_closed_total{reason="normal"}"#
        ),
        3.0
    );
}

/// `/ws`: a handler that does what `behaviour` says with the first message.
fn ws_route(guard: &Guard) -> BoxedFilter<(Response,)> {
    warp::path("ws")
        .and(guard.websocket())
        .map(|up: WsUpgrade| {
            up.on_upgrade(|mut ws: GuardedWebSocket| async move {
                while let Some(msg) = ws.next().await {
                    match msg.to_str() {
                        Ok("panic") => panic!("the handler panics (on purpose)"),
                        Ok("return") => return,
                        _ => {
                            let _ = ws.send(msg);
                        }
                    }
                }
            })
            .into_response()
        })
        .recover(app::recover)
        .unify()
        .boxed()
}

#[tokio::test]
async fn websocket_slots_come_back_however_the_connection_ends() {
    let registry = Registry::new();
    let guard = guard_with(Limits::default(), &registry);
    let route = ws_route(&guard);
    let open = || guard.open_connections();

    // Admitted, then the app never upgraded.
    let up = warp::test::request()
        .remote_addr(addr("198.18.7.1:1"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .filter(&guard.websocket())
        .await
        .unwrap();
    assert_eq!(open(), 1);
    drop(up);
    assert_eq!(open(), 0);

    // 101 sent, but the connection never became a WebSocket.
    let res = warp::test::request()
        .path("/ws")
        .remote_addr(addr("198.18.7.1:1"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .reply(&route)
        .await;
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(open(), 0);

    // The handler returns.
    let mut c = within(
        "handshake",
        warp::test::ws().path("/ws").handshake(route.clone()),
    )
    .await
    .unwrap();
    c.send_text("echo").await;
    assert_eq!(within("echo", c.recv()).await.unwrap().to_str(), Ok("echo"));
    assert_eq!(open(), 1);
    c.send_text("return").await;
    eventually("the slot after the handler returned", || open() == 0).await;

    // The handler panics.
    let mut c = within(
        "handshake",
        warp::test::ws().path("/ws").handshake(route.clone()),
    )
    .await
    .unwrap();
    c.send_text("panic").await;
    eventually("the slot after the handler panicked", || open() == 0).await;

    // The client vanishes.
    let c = within(
        "handshake",
        warp::test::ws().path("/ws").handshake(route.clone()),
    )
    .await
    .unwrap();
    eventually("the connection to be admitted", || open() == 1).await;
    drop(c);
    eventually("the slot after the client vanished", || open() == 0).await;

    // Nothing was left behind: the guard still admits.
    let mut c = within("handshake", warp::test::ws().path("/ws").handshake(route))
        .await
        .unwrap();
    c.send_text("still here").await;
    assert_eq!(
        within("echo", c.recv()).await.unwrap().to_str(),
        Ok("still here")
    );
}

#[tokio::test]
async fn refused_attempts_count_toward_a_storm_once_per_window() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            per_ip_max_connections: 1,
            storm_threshold: 4,
            storm_window: Duration::from_secs(3600),
            ..Limits::default()
        },
        &registry,
    );
    let _held = subscribe(&guard, "198.18.8.1:1").await.unwrap();
    for _ in 0..10 {
        assert!(subscribe(&guard, "198.18.8.1:1").await.is_err());
    }
    assert_eq!(
        common::metric(&registry, "guard_app_reconnect_storms_total"),
        1.0
    );
}

#[tokio::test]
async fn per_source_state_stays_bounded() {
    let registry = Registry::new();
    let guard = guard_with(
        Limits {
            max_connections: 8,
            max_tracked_sources: 16,
            ..Limits::default()
        },
        &registry,
    );
    let mut held = Vec::new();
    for i in 0..=255u8 {
        let sub = subscribe(&guard, &format!("198.18.9.{i}:1")).await;
        // A few stay open: they must survive every cleanup.
        if i % 64 == 0 {
            held.push(sub.unwrap());
        }
        assert!(
            guard.tracked_sources() <= 17,
            "{} tracked",
            guard.tracked_sources()
        );
    }
    assert_eq!(guard.open_connections(), 4);
    for i in [0u8, 64, 128, 192] {
        assert_eq!(
            guard.open_connections_from(format!("198.18.9.{i}").parse().unwrap()),
            1
        );
    }
    drop(held);
    assert_eq!(guard.open_connections(), 0);
}

#[tokio::test]
async fn a_request_without_a_socket_address_is_a_clear_500() {
    let registry = Registry::new();
    let guard = guard_with(Limits::default(), &registry);
    let res = warp::test::request()
        .path("/events")
        .reply(&sse_route(&guard))
        .await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(common::contains(res.body(), "who the client is"));
    assert_eq!(guard.open_connections(), 0);
}
