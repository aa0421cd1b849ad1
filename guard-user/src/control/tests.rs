use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use guard_common::addr::Prefix;
use guard_common::client::{ClientError, Connection};
use guard_common::proto::{
    BlockOutcome, BlockRequest, BytesMut, ErrorCode, FrameDecoder, Message, MAX_FRAME,
    MAX_LIST_ENTRIES, PROTO_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

/// Tells the helper test which socket to try when run as another user.
const CHILD_SOCKET_ENV: &str = "GUARD_CONTROL_TEST_SOCKET";

use guard_common::test_support::{wait_until, within, TestDir, PATIENCE};

fn sock(dir: &TestDir) -> PathBuf {
    dir.path().join("run").join("control.sock")
}

#[derive(Default)]
struct Mock {
    seen: Mutex<Vec<(PeerInfo, Request)>>,
}

impl Mock {
    fn seen(&self) -> Vec<(PeerInfo, Request)> {
        self.seen.lock().unwrap().clone()
    }
}

impl ControlHandler for Mock {
    fn handle(&self, peer: &PeerInfo, req: Request) -> Response {
        self.seen.lock().unwrap().push((peer.clone(), req.clone()));
        match req {
            Request::Stats => Response::Stats {
                counters: vec![("packets".into(), 42)],
            },
            Request::Block(block) => Response::BlockResult {
                outcome: BlockOutcome::Added,
                reason_text: "blocked".into(),
                expires_in_secs: block.ttl_secs,
            },
            Request::Unblock { .. } => Response::error(ErrorCode::NotFound, "not blocked"),
            Request::ListAllows => panic!("the mock handler fails on list_allows"),
            // More than anyone asks for, each line as long as a real one.
            Request::History { .. } => Response::History {
                lines: (0..1000).map(history_line).collect(),
            },
            _ => Response::Ok,
        }
    }
}

struct Running {
    dir: TestDir,
    path: PathBuf,
    stats: Arc<ControlStats>,
    mock: Arc<Mock>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ControlError>>,
}

/// The `i`th of the mock's audit lines, 300 bytes long.
fn history_line(i: usize) -> String {
    format!("{i:04}{}", "x".repeat(296))
}

impl Running {
    fn start(tweak: impl FnOnce(&mut ControlServerConfig)) -> Self {
        let mock = Arc::new(Mock::default());
        Self::start_with(mock.clone(), mock, tweak)
    }

    /// Serves `handler`; `mock` is only for the test to look at.
    fn start_with(
        handler: Arc<dyn ControlHandler>,
        mock: Arc<Mock>,
        tweak: impl FnOnce(&mut ControlServerConfig),
    ) -> Self {
        let dir = TestDir::new("control");
        let path = sock(&dir);
        let mut cfg = ControlServerConfig::new(&path);
        cfg.agent_version = "test-agent".into();
        tweak(&mut cfg);
        let server = ControlServer::bind(cfg).unwrap();
        let stats = server.stats();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.serve(handler, async {
            let _ = stopped.await;
        }));
        Self {
            dir,
            path,
            stats,
            mock,
            stop,
            task,
        }
    }

    fn snapshot(&self) -> ControlStatsSnapshot {
        self.stats.snapshot()
    }

    fn requests(&self, kind: &str) -> (u64, u64) {
        let c = self
            .snapshot()
            .requests
            .into_iter()
            .find(|c| c.kind == kind)
            .unwrap();
        (c.ok, c.error)
    }

    async fn stop(self) -> TestDir {
        let _ = self.stop.send(());
        within("the server to stop", self.task)
            .await
            .unwrap()
            .unwrap();
        self.dir
    }
}

fn frame(msg: impl Into<Message>) -> Vec<u8> {
    let mut out = BytesMut::new();
    guard_common::proto::encode(&msg.into(), &mut out).unwrap();
    out.to_vec()
}

fn hello(version: u16) -> Vec<u8> {
    frame(Request::Hello {
        version,
        client_name: "raw".into(),
    })
}

/// A raw connection that has completed the handshake.
async fn raw_session(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(&hello(PROTO_VERSION)).await.unwrap();
    match next_reply(&mut s).await {
        Some(Response::HelloOk { .. }) => s,
        other => panic!("handshake failed: {other:?}"),
    }
}

/// The next reply, or `None` once the server has closed.
async fn next_reply(s: &mut UnixStream) -> Option<Response> {
    within("a reply", async {
        let mut dec = FrameDecoder::new();
        let mut buf = [0u8; 1024];
        loop {
            match dec.decode().unwrap() {
                Some(Message::Response(r)) => return Some(r),
                Some(Message::Request(r)) => panic!("the server sent a request: {r:?}"),
                None => {}
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => dec.feed(&buf[..n]),
            }
        }
    })
    .await
}

fn error_code(r: Option<Response>) -> ErrorCode {
    match r {
        Some(Response::Error { code, .. }) => code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerInfo {
    PeerInfo {
        uid,
        gid,
        pid: Some(1),
        groups: groups.to_vec(),
        client_name: String::new(),
        role: Role::Reporter,
    }
}

fn policy(agent_uid: u32, socket_gid: Option<u32>) -> Policy {
    Policy {
        agent_uid,
        socket_gid,
        allowed_uids: vec![],
        allowed_gids: vec![],
        operator_uids: vec![],
        operator_gids: vec![],
        reporter_uids: vec![],
        widest_report: Widest::REPORT,
        widest_block: Widest::BLOCK,
    }
}

fn prefix(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn block(p: &str) -> Request {
    Request::Block(BlockRequest {
        prefix: prefix(p),
        ttl_secs: 86_400,
        reason: guard_common::state::reason::MESSAGE_FLOOD,
        detected_at_unix_ns: 0,
        detail: String::new(),
    })
}

/// Every request kind but `Hello`, with the operator-only ones marked.
fn every_request() -> Vec<(Request, bool)> {
    vec![
        (block("198.18.0.3"), false),
        (
            Request::Unblock {
                prefix: prefix("198.18.0.3"),
            },
            true,
        ),
        (
            Request::ListBlocks {
                offset: 0,
                limit: 10,
            },
            false,
        ),
        (
            Request::Allow {
                prefix: prefix("::/0"),
            },
            true,
        ),
        (
            Request::Disallow {
                prefix: prefix("127.0.0.0/8"),
            },
            true,
        ),
        (Request::ListAllows, false),
        (Request::Stats, false),
        (Request::GetConfig, false),
        (
            Request::SetConfig {
                changes: vec![("dry_run".into(), "true".into())],
            },
            true,
        ),
        (
            Request::History {
                since_unix_secs: 0,
                prefix: None,
                limit: 10,
            },
            false,
        ),
        (
            Request::Escalation {
                prefix: prefix("198.18.0.3"),
            },
            false,
        ),
    ]
}

#[test]
fn roles_come_from_credentials() {
    let mut p = policy(990, Some(990));
    p.allowed_uids = vec![1000];
    p.allowed_gids = vec![2000];
    p.operator_uids = vec![1001];
    p.operator_gids = vec![3000];
    let role = |who: PeerInfo| role_of(&who, &p);
    assert_eq!(role(peer(0, 5, &[])), Role::Operator, "root");
    assert_eq!(role(peer(990, 5, &[])), Role::Operator, "the agent's uid");
    assert_eq!(role(peer(1001, 5, &[])), Role::Operator, "an operator uid");
    assert_eq!(role(peer(7, 3000, &[])), Role::Operator, "operator group");
    assert_eq!(role(peer(7, 5, &[3000])), Role::Operator, "supplementary");
    // Permitted to connect, but not operators: the app's usual standing.
    assert_eq!(role(peer(7, 990, &[])), Role::Reporter, "socket group");
    assert_eq!(role(peer(7, 5, &[990])), Role::Reporter, "socket group");
    assert_eq!(role(peer(1000, 5, &[])), Role::Reporter, "allowed uid");
    assert_eq!(role(peer(7, 2000, &[])), Role::Reporter, "allowed gid");
    // A configured app uid stays a reporter whatever else it is.
    p.reporter_uids = vec![0, 1001];
    let role = |who: PeerInfo| role_of(&who, &p);
    assert_eq!(role(peer(0, 0, &[])), Role::Reporter);
    assert_eq!(role(peer(1001, 3000, &[])), Role::Reporter);
}

#[test]
fn reporters_may_report_and_read_only() {
    let p = policy(990, Some(990));
    let mut reporter = peer(7, 990, &[]);
    reporter.role = Role::Reporter;
    let mut operator = peer(0, 0, &[]);
    operator.role = Role::Operator;
    for (req, operator_only) in every_request() {
        let name = req.name();
        match authorize(&reporter, &req, &p) {
            Ok(()) => assert!(!operator_only, "a reporter may {name}"),
            Err(Response::Error { code, message }) => {
                assert!(operator_only, "a reporter may not {name}: {message}");
                assert_eq!(code, ErrorCode::NotPermitted);
                assert!(message.contains("operator"), "{message}");
            }
            Err(other) => panic!("{other:?}"),
        }
        assert_eq!(
            authorize(&operator, &req, &p),
            Ok(()),
            "an operator may {name}"
        );
    }
}

#[test]
fn blocks_are_bounded_in_width_per_role() {
    let p = policy(990, None);
    let mut reporter = peer(7, 7, &[]);
    reporter.role = Role::Reporter;
    let mut operator = peer(0, 0, &[]);
    operator.role = Role::Operator;
    let allowed = |who: &PeerInfo, p_: &str| match authorize(who, &block(p_), &p) {
        Ok(()) => true,
        Err(Response::Error {
            code: ErrorCode::NotPermitted,
            message,
        }) => {
            assert!(message.contains(&prefix(p_).to_string()), "{message}");
            false
        }
        Err(other) => panic!("{other:?}"),
    };
    for ok in [
        "198.18.0.3",
        "198.18.0.0/24",
        "2001:db8::1",
        "2001:db8:1::/48",
    ] {
        assert!(allowed(&reporter, ok), "a report of {ok}");
    }
    for wide in [
        "198.18.0.0/23",
        "0.0.0.0/2",
        "0.0.0.0/0",
        "2001:db8::/47",
        "2000::/3",
        "::/0",
        // Unified-space prefixes that hold all of IPv4.
        "::ffff:0.0.0.0/96",
        "::/80",
    ] {
        assert!(!allowed(&reporter, wide), "a report of {wide}");
    }
    for ok in ["10.0.0.0/8", "198.18.0.0/15", "2001:db8::/32", "198.18.0.3"] {
        assert!(allowed(&operator, ok), "an operator block of {ok}");
    }
    for wide in [
        "0.0.0.0/2",
        "8.0.0.0/7",
        "2000::/3",
        "2001:d00::/24",
        "::/80",
    ] {
        assert!(!allowed(&operator, wide), "an operator block of {wide}");
    }
    let mut open = policy(990, None);
    open.widest_block = Widest { v4: 0, v6: 0 };
    assert_eq!(authorize(&operator, &block("0.0.0.0/0"), &open), Ok(()));
}

#[test]
fn reports_may_not_claim_the_operators_or_the_kernels_reasons() {
    let p = policy(990, None);
    let mut reporter = peer(7, 7, &[]);
    reporter.role = Role::Reporter;
    for code in [
        guard_common::state::reason::OPERATOR,
        guard_common::state::reason::ESCALATED_OVER_CAP,
    ] {
        let req = Request::Block(BlockRequest {
            prefix: prefix("198.18.0.3"),
            ttl_secs: 0,
            reason: code,
            detected_at_unix_ns: 0,
            detail: String::new(),
        });
        assert!(matches!(
            authorize(&reporter, &req, &p),
            Err(Response::Error {
                code: ErrorCode::NotPermitted,
                ..
            })
        ));
    }
}

/// The uid this test process runs as, configured as the app's.
fn as_the_app(c: &mut ControlServerConfig) {
    // SAFETY: no preconditions.
    c.control.reporter_uids = vec![unsafe { libc::geteuid() }];
}

fn not_permitted(r: Result<Response, ClientError>) -> String {
    match r {
        Err(ClientError::Agent {
            code: ErrorCode::NotPermitted,
            message,
        }) => message,
        other => panic!("expected not_permitted, got {other:?}"),
    }
}

#[tokio::test]
async fn the_apps_credentials_may_report_and_read_but_not_configure() {
    let srv = Running::start(as_the_app);
    let mut conn = Connection::connect(&srv.path, "chat").await.unwrap();
    for (req, operator_only) in every_request() {
        if matches!(req, Request::ListAllows) {
            continue; // the mock panics on it
        }
        let name = req.name();
        let r = conn.call(req).await;
        if operator_only {
            let message = not_permitted(r);
            assert!(message.contains("operator"), "{name}: {message}");
        } else {
            r.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    let message = not_permitted(conn.call(block("0.0.0.0/2")).await);
    assert!(message.contains("/24"), "{message}");
    not_permitted(conn.call(block("2000::/3")).await);
    let seen: Vec<&str> = srv.mock.seen().iter().map(|(_, r)| r.name()).collect();
    assert_eq!(
        seen,
        [
            "block",
            "list_blocks",
            "stats",
            "get_config",
            "history",
            "escalation"
        ],
        "refused requests never reach the agent"
    );
    assert!(srv
        .mock
        .seen()
        .iter()
        .all(|(p, _)| p.role == Role::Reporter));
    assert_eq!(srv.requests("set_config"), (0, 1));
    assert_eq!(srv.requests("block"), (1, 2));
    assert_eq!(srv.snapshot().not_permitted, 6);
    // The session goes on after a refusal.
    conn.call(Request::Stats).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn operators_may_configure_and_block_up_to_their_own_width() {
    // This process is root or the agent's own uid: an operator.
    let srv = Running::start(|_| {});
    let mut conn = Connection::connect(&srv.path, "guard-cli").await.unwrap();
    for (req, _) in every_request() {
        if matches!(req, Request::ListAllows | Request::Unblock { .. }) {
            continue; // the mock panics on one and answers not_found to the other
        }
        let name = req.name();
        conn.call(req)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    conn.call(block("10.0.0.0/8")).await.unwrap();
    let message = not_permitted(conn.call(block("0.0.0.0/2")).await);
    assert!(message.contains("widest_block_v4"), "{message}");
    assert!(srv
        .mock
        .seen()
        .iter()
        .all(|(p, _)| p.role == Role::Operator));
    srv.stop().await;
}

#[test]
fn peer_policy() {
    let mut policy = policy(990, Some(990));
    policy.allowed_uids = vec![1000];
    policy.allowed_gids = vec![2000];
    let allowed = |p: PeerInfo| peer_allowed(&p, &policy);
    assert!(allowed(peer(0, 5, &[])), "root");
    assert!(allowed(peer(990, 5, &[])), "the agent's own uid");
    assert!(allowed(peer(1000, 5, &[])), "an allowed uid");
    assert!(allowed(peer(7, 2000, &[])), "an allowed primary gid");
    assert!(
        allowed(peer(7, 5, &[3, 2000])),
        "an allowed supplementary gid"
    );
    assert!(allowed(peer(7, 990, &[])), "the socket's group, primary");
    assert!(
        allowed(peer(7, 5, &[990])),
        "the socket's group, supplementary"
    );
    assert!(!allowed(peer(7, 5, &[])));
    assert!(
        !allowed(peer(7, 5, &[6, 1000])),
        "a uid in the gid list is not a gid"
    );
    assert!(!allowed(peer(65534, 65534, &[])));

    let strict = self::policy(0, None);
    assert!(peer_allowed(&peer(0, 0, &[]), &strict));
    assert!(!peer_allowed(&peer(1000, 1000, &[990]), &strict));
}

#[tokio::test]
async fn handshake_then_requests_and_replies() {
    let srv = Running::start(|_| {});
    let mut conn = Connection::connect(&srv.path, "test-cli").await.unwrap();
    assert_eq!(conn.agent_version(), "test-agent");
    assert_eq!(
        conn.call(Request::Stats).await.unwrap(),
        Response::Stats {
            counters: vec![("packets".into(), 42)]
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
    assert_eq!(conn.call(Request::GetConfig).await.unwrap(), Response::Ok);

    let seen = srv.mock.seen();
    assert_eq!(seen.len(), 3);
    let (who, _) = &seen[0];
    // SAFETY: no preconditions.
    assert_eq!(who.uid, unsafe { libc::geteuid() });
    assert_eq!(who.pid, Some(std::process::id() as i32));
    assert_eq!(who.client_name, "test-cli");
    assert_eq!(srv.requests("hello"), (1, 0));
    assert_eq!(srv.requests("stats"), (1, 0));
    assert_eq!(srv.requests("unblock"), (0, 1));
    let snap = srv.snapshot();
    assert_eq!(
        (snap.accepted, snap.refused_peer, snap.bad_frames),
        (1, 0, 0)
    );
    srv.stop().await;
}

#[tokio::test]
async fn another_protocol_version_is_refused_with_a_reason() {
    let srv = Running::start(|_| {});
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(&hello(PROTO_VERSION + 1)).await.unwrap();
    match next_reply(&mut s).await {
        Some(Response::Error {
            code: ErrorCode::BadVersion,
            message,
        }) => assert!(message.contains("upgrade"), "{message}"),
        other => panic!("expected bad_version, got {other:?}"),
    }
    assert_eq!(next_reply(&mut s).await, None, "then the server closes");
    assert_eq!(srv.snapshot().handshake_failed, 1);
    assert_eq!(srv.requests("hello"), (0, 1));
    srv.stop().await;
}

#[tokio::test]
async fn a_request_before_hello_is_refused() {
    let srv = Running::start(|_| {});
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(&frame(Request::Stats)).await.unwrap();
    assert_eq!(error_code(next_reply(&mut s).await), ErrorCode::Unexpected);
    assert_eq!(next_reply(&mut s).await, None);
    assert!(srv.mock.seen().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn garbage_gets_an_error_reply_then_the_connection_closes() {
    let srv = Running::start(|_| {});

    // A well-delimited frame of an unknown type, after a good handshake.
    let mut s = raw_session(&srv.path).await;
    s.write_all(&[0, 0, 0, 3, 0x42, 1, 2]).await.unwrap();
    assert_eq!(error_code(next_reply(&mut s).await), ErrorCode::UnknownType);
    assert_eq!(next_reply(&mut s).await, None);

    // Something that is not this protocol at all: its first bytes read as
    // a huge length.
    let mut s = UnixStream::connect(&srv.path).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(error_code(next_reply(&mut s).await), ErrorCode::TooLarge);
    assert_eq!(next_reply(&mut s).await, None);

    // A reply sent to the agent.
    let mut s = raw_session(&srv.path).await;
    s.write_all(&frame(Response::Ok)).await.unwrap();
    assert_eq!(error_code(next_reply(&mut s).await), ErrorCode::Unexpected);
    assert_eq!(next_reply(&mut s).await, None);

    // A second hello.
    let mut s = raw_session(&srv.path).await;
    s.write_all(&hello(PROTO_VERSION)).await.unwrap();
    assert_eq!(error_code(next_reply(&mut s).await), ErrorCode::Unexpected);
    assert_eq!(next_reply(&mut s).await, None);

    assert_eq!(srv.snapshot().bad_frames, 4);
    assert!(srv.mock.seen().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_is_refused_from_its_header() {
    let srv = Running::start(|_| {});
    let mut s = raw_session(&srv.path).await;
    // Only the header: the server must not wait for 64 KiB that never come.
    s.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
        .await
        .unwrap();
    match next_reply(&mut s).await {
        Some(Response::Error {
            code: ErrorCode::TooLarge,
            message,
        }) => assert!(message.contains("65537"), "{message}"),
        other => panic!("expected too_large, got {other:?}"),
    }
    assert_eq!(next_reply(&mut s).await, None);
    srv.stop().await;
}

#[tokio::test]
async fn slow_clients_are_dropped() {
    let srv = Running::start(|c| {
        c.frame_timeout = Duration::from_millis(50);
        c.handshake_timeout = Duration::from_millis(50);
    });
    // Connects and says nothing.
    let mut silent = UnixStream::connect(&srv.path).await.unwrap();
    assert_eq!(next_reply(&mut silent).await, None);

    // Starts a frame and never finishes it.
    let mut s = raw_session(&srv.path).await;
    s.write_all(&[0, 0, 0]).await.unwrap();
    assert_eq!(next_reply(&mut s).await, None);

    assert_eq!(srv.snapshot().timeouts, 2);
    srv.stop().await;
}

#[tokio::test]
async fn a_quiet_session_stays_open_until_its_idle_timeout() {
    let srv = Running::start(|c| {
        c.frame_timeout = Duration::from_millis(20);
    });
    let mut conn = Connection::connect(&srv.path, "app").await.unwrap();
    // Quiet for longer than a frame may take, far less than the default
    // idle timeout.
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.call(Request::Stats).await.unwrap();
    assert_eq!(srv.snapshot().timeouts, 0);
    srv.stop().await;
}

#[test]
fn sessions_idle_out_by_default() {
    let cfg = ControlServerConfig::new("/run/guard/control.sock");
    assert_eq!(cfg.control.idle_timeout, Duration::from_secs(30));
}

#[tokio::test]
async fn an_idle_session_is_closed_and_its_slot_freed() {
    let srv = Running::start(|c| {
        c.max_connections = 1;
        c.control.idle_timeout = Duration::from_millis(50);
    });
    let mut idle = raw_session(&srv.path).await;
    // Holding the only slot: the next one is told busy.
    let mut other = UnixStream::connect(&srv.path).await.unwrap();
    assert_eq!(error_code(next_reply(&mut other).await), ErrorCode::Busy);
    // Says nothing after its handshake: closed without a reply.
    assert_eq!(next_reply(&mut idle).await, None);
    wait_until("the slot to free up", || srv.snapshot().active == 0).await;
    let mut conn = Connection::connect(&srv.path, "app").await.unwrap();
    conn.call(Request::Stats).await.unwrap();
    let snap = srv.snapshot();
    assert_eq!((snap.idle_closed, snap.timeouts), (1, 0));
    srv.stop().await;
}

#[tokio::test]
async fn a_stalled_client_does_not_hold_up_the_others() {
    let srv = Running::start(|_| {});
    let mut stalled = raw_session(&srv.path).await;
    stalled.write_all(&[0, 0, 0, 9, 0x02]).await.unwrap();
    let mut conn = Connection::connect(&srv.path, "other").await.unwrap();
    conn.call(Request::Stats).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_told_busy() {
    let srv = Running::start(|c| c.max_connections = 2);
    let a = raw_session(&srv.path).await;
    let _b = raw_session(&srv.path).await;
    let mut c = UnixStream::connect(&srv.path).await.unwrap();
    assert_eq!(error_code(next_reply(&mut c).await), ErrorCode::Busy);
    assert_eq!(next_reply(&mut c).await, None);
    assert_eq!(srv.snapshot().busy, 1);

    drop(a);
    wait_until("a slot to free up", || srv.snapshot().active == 1).await;
    let mut conn = Connection::connect(&srv.path, "next").await.unwrap();
    conn.call(Request::Stats).await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_is_an_internal_error_and_the_session_goes_on() {
    let srv = Running::start(|_| {});
    let mut conn = Connection::connect(&srv.path, "cli").await.unwrap();
    let err = conn.call(Request::ListAllows).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                code: ErrorCode::Internal,
                ..
            }
        ),
        "{err}"
    );
    conn.call(Request::Stats).await.unwrap();
    assert_eq!(srv.snapshot().handler_panics, 1);
    assert_eq!(srv.requests("list_allows"), (0, 1));
    srv.stop().await;
}

#[tokio::test]
async fn bind_sets_mode_and_group_and_shutdown_removes_the_socket() {
    let srv = Running::start(|c| {
        c.mode = 0o660;
        c.socket.group = Some("65534".into());
    });
    let meta = std::fs::metadata(&srv.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), 65534);
    let path = srv.path.clone();
    let _dir = srv.stop().await;
    assert!(!path.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not() {
    let dir = TestDir::new("control");
    let path = sock(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();

    // A socket file whose listener is gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let live = ControlServer::bind(ControlServerConfig::new(&path)).unwrap();

    // Now someone listens there.
    let err = ControlServer::bind(ControlServerConfig::new(&path))
        .err()
        .unwrap();
    assert!(matches!(err, ControlError::AlreadyRunning { .. }), "{err}");
    drop(live);

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = ControlServer::bind(ControlServerConfig::new(&file))
        .err()
        .unwrap();
    assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn groups_resolve_by_name_or_number() {
    assert_eq!(resolve_group("root", "control_group").unwrap(), 0);
    assert_eq!(resolve_group("4242", "control_group").unwrap(), 4242);
    let err = resolve_group("no-such-group-guard-test", "control_group").unwrap_err();
    assert!(matches!(err, ControlError::UnknownGroup { .. }), "{err}");
    assert!(err.to_string().contains("groupadd"), "{err}");
    let err = resolve_group("nul\0byte", "control_group").unwrap_err();
    assert!(matches!(err, ControlError::UnknownGroup { .. }), "{err}");
}

#[tokio::test]
async fn an_unknown_group_fails_bind_with_a_hint() {
    let dir = TestDir::new("control");
    let mut cfg = ControlServerConfig::new(sock(&dir));
    cfg.socket.group = Some("no-such-group-guard-test".into());
    let err = ControlServer::bind(cfg).err().unwrap();
    assert!(matches!(err, ControlError::UnknownGroup { .. }), "{err}");
    assert!(!sock(&dir).exists(), "no socket is left behind");
}

#[tokio::test]
async fn a_peer_with_another_uid_is_refused_before_a_byte_is_read() {
    // World-writable, so only the credential check stands in the way.
    let srv = Running::start(|c| c.mode = 0o666);
    std::fs::set_permissions(srv.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    if !run_as_nobody("control::tests::refused_peer_child", &srv.path).await {
        return;
    }
    wait_until("the refusal counted", || srv.snapshot().refused_peer == 1).await;
    assert!(srv.mock.seen().is_empty());
    assert_eq!(srv.requests("hello"), (0, 0));
    srv.stop().await;
}

/// Run by `a_peer_with_another_uid_is_refused_before_a_byte_is_read` in a
/// child process as uid 65534; fails if run any other way.
#[test]
#[ignore = "helper: run as another uid by a_peer_with_another_uid_is_refused_before_a_byte_is_read"]
fn refused_peer_child() {
    use std::io::{Read, Write};
    let path = std::env::var_os(CHILD_SOCKET_ENV)
        .unwrap_or_else(|| panic!("{CHILD_SOCKET_ENV} is not set: this runs as a child only"));
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        65534,
        "not running as the child"
    );
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    // The write may already fail: the server closes without reading.
    let _ = s.write_all(&hello(PROTO_VERSION));
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "a refused peer got {got:?}"),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// Runs `test` of this binary as uid/gid 65534 with `CHILD_SOCKET_ENV`
/// set to `path`; false (after saying why) where that cannot be done.
async fn run_as_nobody(test: &'static str, path: &Path) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: running a client as uid 65534 needs root");
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let path = path.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_SOCKET_ENV, &path)
            .uid(65534)
            .gid(65534)
            .output()
    })
    .await
    .unwrap();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: uid 65534 cannot execute the test binary: {e}");
            return false;
        }
        Err(e) => panic!("cannot run the child: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = test.rsplit("::").next().unwrap();
    assert!(
        out.status.success() && stdout.contains(&format!("{name} ... ok")),
        "the child run failed:\n{stdout}\n{stderr}"
    );
    true
}

#[tokio::test]
async fn a_permitted_peer_that_is_no_operator_is_a_reporter() {
    let srv = Running::start(|c| {
        c.mode = 0o666;
        c.socket.allowed_uids = vec![65534];
    });
    std::fs::set_permissions(srv.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    if !run_as_nobody("control::tests::reporter_child", &srv.path).await {
        return;
    }
    let seen = srv.mock.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].0.uid, seen[0].0.role), (65534, Role::Reporter));
    assert_eq!(seen[0].1.name(), "stats");
    assert_eq!(srv.requests("set_config"), (0, 1));
    srv.stop().await;
}

/// Run by `a_permitted_peer_that_is_no_operator_is_a_reporter` as uid 65534.
#[test]
#[ignore = "helper: run as another uid by a_permitted_peer_that_is_no_operator_is_a_reporter"]
fn reporter_child() {
    use std::io::{Read, Write};
    let path = std::env::var_os(CHILD_SOCKET_ENV)
        .unwrap_or_else(|| panic!("{CHILD_SOCKET_ENV} is not set: this runs as a child only"));
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        65534,
        "not running as the child"
    );
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut dec = FrameDecoder::new();
    let mut ask = |s: &mut std::os::unix::net::UnixStream, bytes: Vec<u8>| {
        s.write_all(&bytes).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            if let Some(Message::Response(r)) = dec.decode().unwrap() {
                return r;
            }
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the agent closed the session");
            dec.feed(&buf[..n]);
        }
    };
    assert!(matches!(
        ask(&mut s, hello(PROTO_VERSION)),
        Response::HelloOk { .. }
    ));
    let set = frame(Request::SetConfig {
        changes: vec![("block_all_traffic".into(), "true".into())],
    });
    match ask(&mut s, set) {
        Response::Error {
            code: ErrorCode::NotPermitted,
            ..
        } => {}
        other => panic!("a reporter changed the config: {other:?}"),
    }
    assert!(matches!(
        ask(&mut s, frame(Request::Stats)),
        Response::Stats { .. }
    ));
}

#[test]
fn the_settings_reach_the_server_config() {
    let file: crate::settings::FileConfig = toml::from_str(
        "interfaces = [\"eth0\"]\nports = [80]\ncontrol_socket = \"/run/x/c.sock\"\n\
         control_group = \"guard\"\nallowed_uids = [998]\nallowed_gids = [997]\n\
         [control]\noperator_group = \"ops\"\noperator_uids = [1001]\nreporter_uids = [998]\n\
         widest_report_v4 = 28\nwidest_report_v6 = 56\nwidest_block_v4 = 16\n\
         widest_block_v6 = 40\nidle_timeout_secs = 7\n",
    )
    .unwrap();
    let s = crate::settings::Settings::merge(&Default::default(), file).unwrap();
    let c = ControlServerConfig::from_settings(&s);
    assert_eq!(c.socket, s.control_socket);
    let socket = c.socket;
    assert_eq!(socket.path, Path::new("/run/x/c.sock"));
    assert_eq!(socket.group.as_deref(), Some("guard"));
    assert_eq!(
        (socket.allowed_uids, socket.allowed_gids),
        (vec![998], vec![997])
    );
    assert_eq!(c.control, s.control);
    let c = c.control;
    assert_eq!(c.operator_group.as_deref(), Some("ops"));
    assert_eq!((c.operator_uids, c.reporter_uids), (vec![1001], vec![998]));
    assert_eq!(c.widest_report, Widest { v4: 28, v6: 56 });
    assert_eq!(c.widest_block, Widest { v4: 16, v6: 40 });
    assert_eq!(c.idle_timeout, Duration::from_secs(7));
}

#[tokio::test]
async fn an_unknown_operator_group_fails_bind_with_a_hint() {
    let dir = TestDir::new("control");
    let mut cfg = ControlServerConfig::new(sock(&dir));
    cfg.control.operator_group = Some("no-such-group-guard-test".into());
    let err = ControlServer::bind(cfg).err().unwrap();
    assert!(matches!(err, ControlError::UnknownGroup { .. }), "{err}");
    assert!(err.to_string().contains("operator_group"), "{err}");
    assert!(!sock(&dir).exists(), "no socket is left behind");
}

fn history(limit: u32) -> Request {
    Request::History {
        since_unix_secs: 0,
        prefix: None,
        limit,
    }
}

#[tokio::test]
async fn history_replies_hold_at_most_the_limit_and_fit_a_frame() {
    let srv = Running::start(|_| {});
    let mut conn = Connection::connect(&srv.path, "guard-cli").await.unwrap();
    let lines = |r: Response| match r {
        Response::History { lines } => lines,
        other => panic!("{other:?}"),
    };
    let newest = |n: usize| (1000 - n..1000).map(history_line).collect::<Vec<_>>();
    assert_eq!(lines(conn.call(history(10)).await.unwrap()), newest(10));
    // 500 such lines are 150 KB: as many of the newest as fit 64 KiB.
    let got = lines(conn.call(history(500)).await.unwrap());
    assert!(got.len() > 200 && got.len() < 500, "{}", got.len());
    assert_eq!(got, newest(got.len()));
    let got = lines(conn.call(history(u32::MAX)).await.unwrap());
    assert_eq!(got, newest(got.len()));
    assert!(lines(conn.call(history(0)).await.unwrap()).is_empty());
    let asked: Vec<u32> = srv
        .mock
        .seen()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Request::History { limit, .. } => Some(limit),
            _ => None,
        })
        .collect();
    assert_eq!(
        asked,
        [10, 500, MAX_LIST_ENTRIES],
        "the handler is asked for the capped limit, and not at all for none"
    );
    srv.stop().await;
}

/// Holds every list_blocks and history request until released, counting
/// how many run at once.
#[derive(Default)]
struct SlowReads {
    running: AtomicU64,
    most: AtomicU64,
    released: Mutex<bool>,
    wake: std::sync::Condvar,
}

impl SlowReads {
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.wake.notify_all();
    }
}

impl ControlHandler for SlowReads {
    fn handle(&self, _: &PeerInfo, req: Request) -> Response {
        if !matches!(req, Request::History { .. } | Request::ListBlocks { .. }) {
            return Response::Ok;
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let released = self.released.lock().unwrap();
        drop(self.wake.wait_while(released, |r| !*r).unwrap());
        self.running.fetch_sub(1, Ordering::SeqCst);
        match req {
            Request::History { .. } => Response::History { lines: vec![] },
            _ => Response::Blocks {
                total: 0,
                entries: vec![],
            },
        }
    }
}

/// Releases the handler however the test ends: the runtime waits for its
/// blocking threads before the test can finish.
struct ReleaseOnDrop(Arc<SlowReads>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[tokio::test]
async fn heavy_reads_run_one_at_a_time() {
    let slow = Arc::new(SlowReads::default());
    let _release = ReleaseOnDrop(slow.clone());
    let srv = Running::start_with(slow.clone(), Arc::default(), |_| {});
    let call = |req: Request| {
        let path = srv.path.clone();
        tokio::spawn(async move {
            let mut conn = Connection::connect(&path, "reader").await.unwrap();
            conn.set_timeout(PATIENCE);
            conn.call(req).await.unwrap()
        })
    };
    let first = call(history(10));
    wait_until("the first read to run", || {
        slow.running.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = call(Request::ListBlocks {
        offset: 0,
        limit: 10,
    });
    wait_until("the second read to queue", || {
        srv.snapshot().reads_waiting == 1
    })
    .await;
    assert_eq!(slow.running.load(Ordering::SeqCst), 1);
    // Everything else is answered meanwhile.
    let mut conn = Connection::connect(&srv.path, "cli").await.unwrap();
    conn.call(Request::Stats).await.unwrap();
    slow.release();
    within("the reads", async {
        first.await.unwrap();
        second.await.unwrap();
    })
    .await;
    assert_eq!(slow.most.load(Ordering::SeqCst), 1);
    assert_eq!(srv.snapshot().reads_waiting, 0);
    srv.stop().await;
}

fn bind_in(dir: &Path) -> Result<ControlServer, ControlError> {
    ControlServer::bind(ControlServerConfig::new(dir.join("control.sock")))
}

#[tokio::test]
async fn a_parent_anyone_may_write_to_without_the_sticky_bit_is_refused() {
    let tmp = TestDir::new("control");
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = bind_in(&open).err().expect("refused");
    assert!(matches!(err, ControlError::UnsafeDirMode { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("sticky") && text.contains("open"), "{text}");
    assert!(!open.join("control.sock").exists(), "nothing bound");
    // Below it, in a folder the agent creates itself, the open one still
    // lets anyone swap that folder.
    let err = bind_in(&open.join("sub")).err().expect("refused");
    assert!(matches!(err, ControlError::UnsafeDirMode { .. }), "{err}");
    // With the sticky bit (like /tmp) only owners may remove or rename.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    drop(bind_in(&open).expect("a sticky parent is fine"));
}

#[tokio::test]
async fn a_parent_owned_by_another_user_is_refused() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving a folder to uid 65534 needs root");
        return;
    }
    let tmp = TestDir::new("control");
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = bind_in(&theirs).err().expect("refused");
    assert!(
        matches!(err, ControlError::UnsafeDirOwner { uid: 65534, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("65534"), "{err}");
    assert!(!theirs.join("control.sock").exists(), "nothing bound");
}

#[test]
fn owner_and_mode_are_never_applied_through_a_symlink() {
    let tmp = TestDir::new("control");
    let target = tmp.path().join("precious");
    std::fs::write(&target, b"keep").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::metadata(&target).unwrap();
    // Where the socket was bound, something swapped in a symlink.
    let link = tmp.path().join("control.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(tmp.path().join("elsewhere.sock")).unwrap();
    let err = restrict(&link, 0o666, Some(65534), &listener).expect_err("refused");
    assert!(matches!(err, ControlError::Replaced { .. }), "{err}");
    let after = std::fs::metadata(&target).unwrap();
    assert_eq!(after.permissions().mode() & 0o7777, 0o600);
    assert_eq!(after.gid(), before.gid());
}
