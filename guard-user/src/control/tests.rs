use std::os::unix::process::CommandExt;
use std::sync::Mutex;

use guard_common::client::{ClientError, Connection};
use guard_common::proto::{BlockOutcome, MAX_FRAME};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

/// Bound on waits for things that should take milliseconds; only a broken
/// server runs into it.
const PATIENCE: Duration = Duration::from_secs(20);

/// Tells the helper test which socket to try when run as another user.
const CHILD_SOCKET_ENV: &str = "GUARD_CONTROL_TEST_SOCKET";

use crate::test_support::TestDir;

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
            Request::Block { ttl_secs, .. } => Response::BlockResult {
                outcome: BlockOutcome::Added,
                reason_text: "blocked".into(),
                expires_in_secs: ttl_secs,
            },
            Request::Unblock { .. } => Response::error(ErrorCode::NotFound, "not blocked"),
            Request::ListAllows => panic!("the mock handler fails on list_allows"),
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

impl Running {
    fn start(tweak: impl FnOnce(&mut ControlServerConfig)) -> Self {
        let dir = TestDir::new("control");
        let path = sock(&dir);
        let mut cfg = ControlServerConfig::new(&path);
        cfg.agent_version = "test-agent".into();
        tweak(&mut cfg);
        let server = ControlServer::bind(cfg).unwrap();
        let stats = server.stats();
        let mock = Arc::new(Mock::default());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.serve(mock.clone(), async {
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

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {PATIENCE:?}"))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
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
    }
}

#[test]
fn peer_policy() {
    let policy = Policy {
        agent_uid: 990,
        socket_gid: Some(990),
        allowed_uids: vec![1000],
        allowed_gids: vec![2000],
    };
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

    let strict = Policy {
        agent_uid: 0,
        socket_gid: None,
        allowed_uids: vec![],
        allowed_gids: vec![],
    };
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
async fn an_idle_session_stays_open() {
    let srv = Running::start(|c| {
        c.frame_timeout = Duration::from_millis(20);
    });
    let mut conn = Connection::connect(&srv.path, "app").await.unwrap();
    // Quiet for longer than a frame may take: the app's reporting session
    // is idle most of the time and must survive it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.call(Request::Stats).await.unwrap();
    assert_eq!(srv.snapshot().timeouts, 0);
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
        c.group = Some("65534".into());
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
    assert_eq!(resolve_group("root").unwrap(), 0);
    assert_eq!(resolve_group("4242").unwrap(), 4242);
    let err = resolve_group("no-such-group-guard-test").unwrap_err();
    assert!(matches!(err, ControlError::UnknownGroup(_)), "{err}");
    assert!(err.to_string().contains("groupadd"), "{err}");
    let err = resolve_group("nul\0byte").unwrap_err();
    assert!(matches!(err, ControlError::UnknownGroup(_)), "{err}");
}

#[tokio::test]
async fn an_unknown_group_fails_bind_with_a_hint() {
    let dir = TestDir::new("control");
    let mut cfg = ControlServerConfig::new(sock(&dir));
    cfg.group = Some("no-such-group-guard-test".into());
    let err = ControlServer::bind(cfg).err().unwrap();
    assert!(matches!(err, ControlError::UnknownGroup(_)), "{err}");
    assert!(!sock(&dir).exists(), "no socket is left behind");
}

#[tokio::test]
async fn a_peer_with_another_uid_is_refused_before_a_byte_is_read() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: running a client as uid 65534 needs root");
        return;
    }
    // World-writable, so only the credential check stands in the way.
    let srv = Running::start(|c| c.mode = 0o666);
    std::fs::set_permissions(srv.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let path = srv.path.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args([
                "control::tests::refused_peer_child",
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
        // E.g. a target directory under a home that other users cannot
        // enter.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: uid 65534 cannot execute the test binary: {e}");
            return;
        }
        Err(e) => panic!("cannot run the child: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("refused_peer_child ... ok"),
        "the child run failed:\n{stdout}\n{stderr}"
    );
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
