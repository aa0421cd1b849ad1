use std::path::Path;
use std::string::ToString;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};
use std::vec::Vec;
use std::{format, vec};

use super::reporter::MAX_ATTEMPTS;
use super::*;
use crate::addr::Prefix;
use crate::proto::{BlockRequest, ErrorCode, Request, Response, MAX_DETAIL_LEN, PROTO_VERSION};
use crate::state::reason;
use crate::test_support::{wait_until, within, Event, FakeAgent, Mode, TestDir};

fn fast_cfg(path: &Path) -> ClientConfig {
    let mut cfg = ClientConfig::new(path, "test-app");
    cfg.backoff_min = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(40);
    cfg.request_timeout = Duration::from_millis(500);
    cfg
}

fn report(prefix: &str, ttl_secs: u64) -> BlockReport {
    BlockReport::new(
        prefix.parse().unwrap(),
        Duration::from_secs(ttl_secs),
        reason::MESSAGE_FLOOD,
        format!("flood from {prefix}"),
    )
}

fn block_prefix(r: &Request) -> Prefix {
    match r {
        Request::Block(block) => block.prefix,
        other => panic!("expected a block request, got {other:?}"),
    }
}

#[tokio::test]
async fn reports_arrive_with_their_fields() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let client = AgentClient::spawn(fast_cfg(&dir.sock()));

    let detected = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_123);
    let mut first = report("198.18.0.1", 0);
    first.ttl = Duration::from_millis(1500);
    first.detected_at = detected;
    client.report(first).unwrap();
    client.report(report("198.18.0.2", 60)).unwrap();
    client.report(report("2001:2::/64", 60)).unwrap();

    assert_eq!(agent.next_event().await, Event::Hello("test-app".into()));
    assert_eq!(
        agent.next_block().await,
        BlockRequest {
            prefix: "198.18.0.1".parse().unwrap(),
            ttl_secs: 2,
            reason: reason::MESSAGE_FLOOD,
            detected_at_unix_ns: 1_700_000_000_000_000_123,
            detail: "flood from 198.18.0.1".into(),
        }
    );
    assert_eq!(
        block_prefix(&agent.next_request().await),
        "198.18.0.2".parse().unwrap()
    );
    assert_eq!(
        block_prefix(&agent.next_request().await),
        "2001:2::/64".parse().unwrap()
    );
    wait_until("3 reports acknowledged", || client.stats().sent == 3).await;
    let stats = client.stats();
    assert!(stats.connected);
    assert_eq!((stats.failed, stats.dropped, stats.queued), (0, 0, 0));
    agent.stop().await;
}

#[tokio::test]
async fn with_no_agent_reports_queue_then_count_as_dropped() {
    let dir = TestDir::new("client");
    let mut cfg = fast_cfg(&dir.sock());
    cfg.queue_capacity = 4;
    let client = AgentClient::spawn(cfg);
    for i in 0..4 {
        client.report(report(&format!("198.18.0.{i}"), 60)).unwrap();
    }
    assert_eq!(
        client.report(report("198.18.1.1", 60)),
        Err(ReportError::QueueFull)
    );
    // Let the background task fail to connect a few times; the client keeps
    // answering and counting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        client.report(report("198.18.1.2", 60)),
        Err(ReportError::QueueFull)
    );
    let stats = client.stats();
    assert_eq!(stats.dropped, 2);
    assert_eq!(stats.queued, 4);
    assert_eq!(stats.sent, 0);
    assert!(!stats.connected);
}

#[tokio::test]
async fn queued_reports_are_delivered_once_the_agent_appears() {
    let dir = TestDir::new("client");
    let client = AgentClient::spawn(fast_cfg(&dir.sock()));
    for i in 0..5 {
        client.report(report(&format!("198.18.0.{i}"), 60)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(client.stats().sent, 0);

    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    for i in 0..5 {
        assert_eq!(
            block_prefix(&agent.next_request().await),
            format!("198.18.0.{i}").parse().unwrap(),
            "reports arrive in the order they were made"
        );
    }
    wait_until("5 reports acknowledged", || client.stats().sent == 5).await;
    agent.stop().await;
}

#[tokio::test]
async fn the_client_reconnects_when_the_agent_restarts() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let client = AgentClient::spawn(fast_cfg(&dir.sock()));
    client.report(report("198.18.0.1", 60)).unwrap();
    agent.next_request().await;
    // Stopping before the answer is read would have the report resent.
    wait_until("the first report acknowledged", || client.stats().sent == 1).await;

    agent.stop().await;
    wait_until("disconnect noticed", || !client.stats().connected).await;
    client.report(report("198.18.0.2", 60)).unwrap();

    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    assert_eq!(agent.next_event().await, Event::Hello("test-app".into()));
    assert_eq!(
        block_prefix(&agent.next_request().await),
        "198.18.0.2".parse().unwrap()
    );
    wait_until("both acknowledged", || client.stats().sent == 2).await;
    assert!(client.stats().connected);
    agent.stop().await;
}

#[tokio::test]
async fn an_agent_that_never_reads_cannot_block_report() {
    let dir = TestDir::new("client");
    let agent = FakeAgent::start(&dir.sock(), Mode::NeverRead);
    let mut cfg = fast_cfg(&dir.sock());
    cfg.queue_capacity = 4;
    cfg.request_timeout = Duration::from_millis(20);
    let client = AgentClient::spawn(cfg);
    let results: Vec<_> = (0..10)
        .map(|i| client.report(report(&format!("198.18.0.{i}"), 60)))
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
    assert!(results[4..]
        .iter()
        .all(|r| *r == Err(ReportError::QueueFull)));

    // The client gives up on each stuck handshake and tries again.
    let accepted = agent.accepted_counter();
    wait_until("a second connection attempt", || {
        accepted.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(
        client.report(report("198.18.1.1", 60)),
        Err(ReportError::QueueFull)
    );
    let stats = client.stats();
    assert_eq!((stats.sent, stats.dropped, stats.queued), (0, 7, 4));
    assert!(!stats.connected);
    agent.stop().await;
}

#[tokio::test]
async fn a_report_the_agent_never_answers_is_retried_then_counted_failed() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::StallAfterHello);
    let mut cfg = fast_cfg(&dir.sock());
    cfg.request_timeout = Duration::from_millis(20);
    let client = AgentClient::spawn(cfg);
    client.report(report("198.18.0.1", 60)).unwrap();
    for _ in 0..MAX_ATTEMPTS {
        assert_eq!(
            block_prefix(&agent.next_request().await),
            "198.18.0.1".parse().unwrap()
        );
    }
    wait_until("the report counted as failed", || {
        client.stats().failed == 1
    })
    .await;
    let stats = client.stats();
    assert_eq!((stats.sent, stats.queued), (0, 0));
    agent.stop().await;
}

#[tokio::test]
async fn an_agent_closing_an_idle_session_is_no_outage_and_the_next_report_reconnects_at_once() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::CloseFirstAfterHello);
    let mut cfg = fast_cfg(&dir.sock());
    // An outage's backoff would outlast the test's patience many times.
    cfg.backoff_min = Duration::from_secs(3600);
    cfg.backoff_max = Duration::from_secs(3600);
    let client = AgentClient::spawn(cfg);
    assert_eq!(agent.next_event().await, Event::Hello("test-app".into()));
    assert_eq!(agent.next_event().await, Event::Closed);
    wait_until("the client to see the idle close", || {
        client.stats().idle_closes == 1
    })
    .await;
    assert!(!client.stats().connected);
    assert_eq!(agent.accepted(), 1, "no reconnect while idle");
    client.report(report("198.18.0.3", 60)).unwrap();
    assert_eq!(
        block_prefix(&agent.next_request().await),
        "198.18.0.3".parse().unwrap()
    );
    wait_until("the report to count as sent", || client.stats().sent == 1).await;
    assert_eq!(client.stats().failed, 0);
    agent.stop().await;
}

#[tokio::test]
async fn duplicates_merge_while_queued() {
    let dir = TestDir::new("client");
    let client = AgentClient::spawn(fast_cfg(&dir.sock()));
    let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut a = report("198.18.0.9", 10);
    a.detected_at = t0 + Duration::from_secs(5);
    let mut b = report("198.18.0.9", 60);
    b.detected_at = t0 + Duration::from_secs(10);
    b.detail = "second".into();
    let mut c = report("198.18.0.9", 30);
    c.detected_at = t0;
    for r in [a, b, c] {
        client.report(r).unwrap();
    }
    let stats = client.stats();
    assert_eq!((stats.merged, stats.queued), (2, 1));

    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let merged = agent.next_block().await;
    assert_eq!(merged.ttl_secs, 60, "the longest TTL wins");
    assert_eq!(merged.detected_at_unix_ns, 1_700_000_000 * 1_000_000_000);
    assert_eq!(
        merged.detail, "flood from 198.18.0.9",
        "the first detail stays"
    );
    // Nothing else was queued for that prefix: the next request is the next
    // report.
    client.report(report("198.18.0.10", 60)).unwrap();
    assert_eq!(
        block_prefix(&agent.next_request().await),
        "198.18.0.10".parse().unwrap()
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_long_detail_is_cut_to_the_protocol_limit() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let client = AgentClient::spawn(fast_cfg(&dir.sock()));
    let mut r = report("198.18.0.1", 60);
    r.detail = "ü".repeat(MAX_DETAIL_LEN);
    client.report(r).unwrap();
    let detail = agent.next_block().await.detail;
    assert_eq!(detail.len(), MAX_DETAIL_LEN);
    assert!(detail.chars().all(|c| c == 'ü'));
    agent.stop().await;
}

#[tokio::test]
async fn dropping_every_handle_ends_the_session() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let client = AgentClient::spawn(fast_cfg(&dir.sock()));
    let clone = client.clone();
    client.report(report("198.18.0.1", 60)).unwrap();
    agent.next_request().await;
    drop(client);
    clone.report(report("198.18.0.2", 60)).unwrap();
    agent.next_request().await;
    drop(clone);
    within("the session to close", async {
        while agent.next_event().await != Event::Closed {}
    })
    .await;
    agent.stop().await;
}

#[test]
fn a_client_whose_runtime_is_gone_reports_closed() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = TestDir::new("client");
    let client = rt.block_on(async { AgentClient::spawn(fast_cfg(&dir.sock())) });
    client.report(report("198.18.0.1", 60)).unwrap();
    drop(rt);
    assert_eq!(
        client.report(report("198.18.0.2", 60)),
        Err(ReportError::Closed)
    );
    let stats = client.stats();
    assert_eq!(stats.dropped, 1);
    assert!(!stats.connected);
}

#[test]
fn spawning_outside_a_runtime_is_an_error() {
    let err = AgentClient::try_spawn(ClientConfig::new("/nonexistent", "x")).unwrap_err();
    assert!(matches!(err, ClientError::NoRuntime), "{err}");
}

#[tokio::test]
async fn a_connection_calls_and_maps_error_replies() {
    let dir = TestDir::new("client");
    let mut agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let mut conn = Connection::connect(dir.sock(), "guard-cli").await.unwrap();
    assert_eq!(conn.agent_version(), "fake-1");
    assert_eq!(agent.next_event().await, Event::Hello("guard-cli".into()));
    assert_eq!(
        conn.call(Request::Stats).await.unwrap(),
        Response::Stats {
            counters: vec![("packets".into(), 7)]
        }
    );
    let err = conn
        .call(Request::Unblock {
            prefix: "198.18.0.1".parse().unwrap(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{err}"
    );
    // An error reply leaves the session usable.
    assert_eq!(conn.call(Request::GetConfig).await.unwrap(), Response::Ok);
    agent.stop().await;
}

#[tokio::test]
async fn a_missing_agent_says_what_to_check() {
    let dir = TestDir::new("client");
    let err = Connection::connect(dir.sock(), "guard-cli")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::NoAgent { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&dir.sock().display().to_string()), "{text}");
    assert!(text.contains("is `guard run` running?"), "{text}");
}

#[tokio::test]
async fn an_agent_closing_at_the_handshake_hints_at_permissions() {
    let dir = TestDir::new("client");
    let agent = FakeAgent::start(&dir.sock(), Mode::CloseAtOnce);
    let err = Connection::connect(dir.sock(), "guard-cli")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            ClientError::Closed {
                during_handshake: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("uid/gid"), "{err}");
    agent.stop().await;
}

#[tokio::test]
async fn a_version_mismatch_is_refused() {
    let dir = TestDir::new("client");
    let agent = FakeAgent::start(&dir.sock(), Mode::WrongVersion);
    let err = Connection::connect(dir.sock(), "guard-cli")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::VersionMismatch { agent: v, .. } if v == PROTO_VERSION + 1),
        "{err}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_timed_out_call_breaks_the_connection() {
    let dir = TestDir::new("client");
    let agent = FakeAgent::start(&dir.sock(), Mode::Answer);
    let mut conn = Connection::connect(dir.sock(), "guard-cli").await.unwrap();
    conn.set_timeout(Duration::from_millis(20));
    // The fake never answers ListAllows.
    let err = conn.call(Request::ListAllows).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    let err = conn.call(Request::Stats).await.unwrap_err();
    assert!(matches!(err, ClientError::Broken { .. }), "{err}");
    agent.stop().await;
}
