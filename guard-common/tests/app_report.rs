//! Reporting: what reaches the agent, what never does, and an app that
//! behaves the same whether the agent is there or not.
#![cfg(all(feature = "warp", feature = "test-support"))]

mod common;

use std::time::Duration;

use common::{
    eventually, flood, metric, recv_until, serve, ws_connect, FakeAgent, Mode, SseHub, TestDir,
};
use futures_util::SinkExt;
use guard_common::addr::Prefix;
use guard_common::app::{Guard, Limits};
use guard_common::client::{AgentClient, ClientConfig};
use guard_common::state::reason;
use prometheus::Registry;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

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

/// Two floods from different sources, with a chat going on beside them.
async fn two_floods_beside_a_chat(addr: std::net::SocketAddr, tag: &str) {
    let mut alice = ws_connect(addr, "/chat", "198.18.40.1", None).await;
    alice
        .send(WsMessage::text(format!("{tag} 1")))
        .await
        .unwrap();
    recv_until(&mut alice, &format!("{tag} 1")).await;
    for ip in ["198.18.30.1", "198.18.30.2"] {
        let flooder = ws_connect(addr, "/chat", ip, None).await;
        assert_eq!(flood(flooder, "spam").await.0, Some(CloseCode::Policy));
    }
    alice
        .send(WsMessage::text(format!("{tag} 2")))
        .await
        .unwrap();
    recv_until(&mut alice, &format!("{tag} 2")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_agent_changes_nothing_but_the_failure_count() {
    // Without any agent configured.
    let registry = Registry::new();
    let guard = common::guard(flood_limits(), &registry, None);
    let addr = serve(common::app(&guard, SseHub::default())).await;
    two_floods_beside_a_chat(addr, "no agent").await;
    assert_eq!((guard.reports_sent(), guard.reports_failed()), (0, 0));

    // With an agent configured whose socket is not there (yet): room for
    // one report, so the second is refused and counted.
    let dir = TestDir::new("absent");
    let mut cfg = ClientConfig::new(dir.sock(), "test-app");
    cfg.queue_capacity = 1;
    cfg.backoff_min = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    let registry = Registry::new();
    let guard = common::guard(flood_limits(), &registry, Some(cfg));
    let addr = serve(common::app(&guard, SseHub::default())).await;
    two_floods_beside_a_chat(addr, "absent agent").await;
    assert_eq!(metric(&registry, "guard_app_floods_detected_total"), 2.0);
    assert_eq!(guard.reports_failed(), 1);
    assert_eq!(guard.reports_sent(), 0);
    assert_eq!(metric(&registry, "guard_app_reports_failed_total"), 1.0);
    assert_eq!(metric(&registry, "guard_app_reports_sent_total"), 0.0);

    // The agent comes up: what was queued is delivered.
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let block = agent.next_block().await;
    assert_eq!(block.prefix, "198.18.30.1/32".parse::<Prefix>().unwrap());
    assert_eq!(block.reason, reason::MESSAGE_FLOOD);
    eventually("the delivered report to be counted", || {
        metric(&registry, "guard_app_reports_sent_total") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_trusted_proxies_and_the_allowlist_are_never_reported() {
    let dir = TestDir::new("exempt");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let registry = Registry::new();
    let guard = Guard::builder()
        .limits(flood_limits())
        .registry(&registry)
        .trusted_proxies(["127.0.0.1".parse().unwrap(), "10.9.0.0/16".parse().unwrap()])
        .allowlist(["198.18.31.0/24".parse().unwrap()])
        .agent(AgentClient::spawn(ClientConfig::new(
            dir.sock(),
            "test-app",
        )))
        .build()
        .unwrap();
    let addr = serve(common::app(&guard, SseHub::default())).await;
    for ip in [
        // The trusted proxy itself (no header names anyone else).
        "127.0.0.1",
        // Another trusted proxy further out.
        "10.9.1.1",
        // IPv6 loopback, as a proxy might name it.
        "::1",
        "198.18.31.77",
    ] {
        let flooder = ws_connect(addr, "/chat", ip, None).await;
        assert_eq!(
            flood(flooder, "spam").await.0,
            Some(CloseCode::Policy),
            "{ip}"
        );
    }
    for ip in ["127.0.0.1", "10.9.1.1", "::1", "198.18.31.77"] {
        assert!(guard.is_exempt(ip.parse().unwrap()), "{ip}");
    }
    let reported = ws_connect(addr, "/chat", "198.18.32.1", None).await;
    assert_eq!(flood(reported, "spam").await.0, Some(CloseCode::Policy));
    // Reports go out in order, so the first one is the only one.
    let block = agent.next_block().await;
    assert_eq!(block.prefix, "198.18.32.1/32".parse::<Prefix>().unwrap());
    assert_eq!(metric(&registry, "guard_app_floods_detected_total"), 5.0);
}
