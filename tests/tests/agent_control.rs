//! The agent's control socket under hostile use: a uid that is not permitted is refused even
//! with the file open to everyone, and garbage of every kind is answered with an error or a
//! close while the agent keeps serving. Needs root; one at a time
//! (`cargo test -p guard-tests --test agent_control -- --test-threads=1`).

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use guard_common::client::{ClientError, Connection};
use guard_common::proto::{
    decode_frame, BytesMut, ErrorCode, Message, Request, Response, PROTO_VERSION,
};
use guard_tests::agent::{block_on, solo_netns, AgentHome, RunOpts, Scrape};
use guard_tests::lab::ROLE_IF;
use guard_tests::require_root;

/// The protected port.
const PORT: u16 = 8080;

#[test]
fn a_uid_that_is_not_permitted_is_refused() {
    if !require_root("a_uid_that_is_not_permitted_is_refused") {
        return;
    }
    let ns = solo_netns().expect("a namespace with a veth pair");
    let home = AgentHome::new().expect("agent home");
    let agent = home
        .start(&ns, &RunOpts::new(ROLE_IF, PORT))
        .expect("start the agent");
    // Open the file to everyone: the peer-credential check must still refuse.
    std::fs::set_permissions(home.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = |m: &Scrape| m.get("guard_control_refused_total", &[]).unwrap();
    let before = refused(&agent.scrape().expect("scrape /metrics"));

    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(home.bin())
        .arg("blocks")
        .arg("--control-socket")
        .arg(home.socket())
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "uid 65534 was served: {stderr}");
    assert!(stderr.starts_with("guard:"), "the CLI itself ran: {stderr}");
    assert_eq!(
        refused(&agent.scrape().expect("scrape /metrics")),
        before + 1.0
    );
    assert!(
        agent.log().contains("control socket refused"),
        "{}",
        agent.log()
    );
    // Root still is served.
    assert!(home
        .ctl(&["blocks"])
        .expect("guard blocks")
        .contains("0 blocked"));
}

/// Connects, sends `bytes`, closes the sending side and returns every frame the agent sent
/// before closing. Everything it sent must decode as responses.
fn raw_session(socket: &Path, bytes: &[u8]) -> Vec<Response> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The agent may close before reading everything (an oversized header): EPIPE is fine.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the agent neither answered nor closed: {e} (sent {bytes:02x?})"),
    }
    let mut out = Vec::new();
    let mut rest = &got[..];
    while !rest.is_empty() {
        match decode_frame(rest) {
            Ok(Some((Message::Response(r), used))) => {
                out.push(r);
                rest = &rest[used..];
            }
            other => panic!("the agent sent {got:02x?}, not responses: {other:?}"),
        }
    }
    out
}

fn hello_frame() -> Vec<u8> {
    let mut b = BytesMut::new();
    Request::Hello {
        version: PROTO_VERSION,
        client_name: "garbage".into(),
    }
    .encode(&mut b)
    .unwrap();
    b.to_vec()
}

fn error_code(resp: &Response) -> ErrorCode {
    match resp {
        Response::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A crafted input: what it is, its bytes, and the answers expected (`None` for `HelloOk`,
/// else the error's code).
type Case = (&'static str, Vec<u8>, Vec<Option<ErrorCode>>);

/// A small deterministic generator, so a failure replays.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn garbage_on_the_socket_is_answered_or_closed_and_the_agent_keeps_serving() {
    if !require_root("garbage_on_the_socket_is_answered_or_closed_and_the_agent_keeps_serving") {
        return;
    }
    let ns = solo_netns().expect("a namespace with a veth pair");
    let home = AgentHome::new().expect("agent home");
    let mut agent = home
        .start(&ns, &RunOpts::new(ROLE_IF, PORT))
        .expect("start the agent");
    let sock = home.socket();
    let hello = hello_frame();
    let with_hello = |tail: &[u8]| [hello.as_slice(), tail].concat();

    // A well-formed client stays connected throughout and must be served after every blow.
    block_on(async {
        let mut good = Connection::connect(&sock, "well-formed").await.unwrap();
        let check = |good_ok: Result<Response, ClientError>| match good_ok {
            Ok(Response::Stats { counters }) => assert!(!counters.is_empty()),
            other => panic!("the well-formed client was not served: {other:?}"),
        };

        // Crafted cases with a known answer: an error naming the fault, then the close.
        let cases: Vec<Case> = vec![
            (
                "oversized length before hello",
                [&[0x7f, 0xff, 0xff, 0xff][..], &[0u8; 64]].concat(),
                vec![Some(ErrorCode::TooLarge)],
            ),
            (
                "oversized length after hello",
                with_hello(&[0x00, 0x01, 0x00, 0x01, 0x08]),
                vec![None, Some(ErrorCode::TooLarge)],
            ),
            (
                "zero length",
                vec![0, 0, 0, 0],
                vec![Some(ErrorCode::BadFrame)],
            ),
            (
                "unknown type",
                vec![0, 0, 0, 1, 0x7e],
                vec![Some(ErrorCode::UnknownType)],
            ),
            (
                "a request before hello",
                vec![0, 0, 0, 1, 0x08],
                vec![Some(ErrorCode::Unexpected)],
            ),
            (
                "a response from the client",
                with_hello(&[0, 0, 0, 1, 0x82]),
                vec![None, Some(ErrorCode::Unexpected)],
            ),
            (
                "truncated body",
                with_hello(&[0, 0, 0, 3, 0x03, 0x01, 0x02]),
                vec![None, Some(ErrorCode::BadFrame)],
            ),
            // A frame that never completes: the client's EOF ends it without an answer.
            (
                "cut short",
                with_hello(&[0, 0, 0x10, 0, 0x02, 1, 2, 3]),
                vec![None],
            ),
        ];
        for (what, bytes, want) in &cases {
            let got = raw_session(&sock, bytes);
            let codes: Vec<Option<ErrorCode>> = got
                .iter()
                .map(|r| match r {
                    Response::HelloOk { .. } => None,
                    other => Some(error_code(other)),
                })
                .collect();
            assert_eq!(&codes, want, "{what}: {got:?}");
            check(good.call(Request::Stats).await);
        }

        // Random bytes, raw and behind a valid hello and a plausible header: every reply is a
        // well-formed response (at most a hello answer and one more) and then the agent
        // closes.
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for i in 0..300 {
            let len = 1 + (rng.next() % 300) as usize;
            let body = rng.bytes(len);
            let bytes = match i % 3 {
                0 => body,
                1 => with_hello(&body),
                _ => {
                    let mut framed = (len as u32).to_be_bytes().to_vec();
                    framed.extend(body);
                    with_hello(&framed)
                }
            };
            let got = raw_session(&sock, &bytes);
            assert!(got.len() <= 2, "case {i}: {got:?}");
            if i % 3 == 0 {
                assert!(
                    got.iter()
                        .all(|r| matches!(r, Response::Error { .. } | Response::HelloOk { .. })),
                    "case {i}: {got:?}"
                );
            }
            if i % 50 == 0 {
                check(good.call(Request::Stats).await);
            }
        }
        check(good.call(Request::Stats).await);
        // And a brand-new client still gets in.
        let mut fresh = Connection::connect(&sock, "after-garbage").await.unwrap();
        check(fresh.call(Request::Stats).await);
    });
    assert!(
        agent.is_running().unwrap(),
        "the agent died: {}",
        agent.log()
    );
}
