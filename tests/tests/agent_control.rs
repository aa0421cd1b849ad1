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
    decode_frame, BlockRequest, BytesMut, ErrorCode, Message, Request, Response, PROTO_VERSION,
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

/// Issue 24, finding 4: a reporter (uid nobody through `allowed_uids`) reporting /24 after /24
/// as fast as the agent answers. It used to fill the whole blocklist, and the operator's next
/// block was refused. Now it is held to its share (half the blocklist by default) and its
/// rate; every refusal is counted, the first of each kind audited; the operator still blocks.
#[test]
fn a_reporter_cannot_fill_the_blocklist_and_the_operator_still_blocks() {
    use guard_tests::agent::reporter::{requests_as, NOBODY};
    if !require_root("a_reporter_cannot_fill_the_blocklist_and_the_operator_still_blocks") {
        return;
    }
    const CAPACITY: u32 = 2000;
    let ns = solo_netns().expect("a namespace with a veth pair");
    let home = AgentHome::new().expect("agent home");
    let agent = home
        .start(
            &ns,
            &RunOpts::new(ROLE_IF, PORT).config(&format!(
                "allowed_uids = [{NOBODY}]\n[blocks]\ncapacity = {CAPACITY}\n"
            )),
        )
        .expect("start the agent");
    // As many /24s as the blocklist holds, a day each (held to max_ttl), from 100.64.0.0/10:
    // map entries only, no traffic goes anywhere.
    let reports: Vec<Request> = (0..CAPACITY)
        .map(|i| {
            Request::Block(BlockRequest {
                prefix: format!("100.{}.{}.0/24", 64 + i / 256, i % 256)
                    .parse()
                    .expect("a /24"),
                ttl_secs: 86_400,
                reason: guard_common::state::reason::MESSAGE_FLOOD,
                detected_at_unix_ns: 0,
                detail: "hostile reporter".into(),
            })
        })
        .collect();
    let replies = requests_as(NOBODY, &home.socket(), &reports).expect("report as nobody");
    assert!(
        matches!(replies[0], Response::HelloOk { .. }),
        "nobody is a permitted reporter: {:?}",
        replies[0]
    );
    assert_eq!(replies.len(), reports.len() + 1, "every report is answered");
    let outcome = |r: &Response| match r {
        Response::BlockResult { outcome, .. } => *outcome,
        other => panic!("a report was answered {other:?}"),
    };
    let added = replies[1..]
        .iter()
        .filter(|r| outcome(r) == guard_common::proto::BlockOutcome::Added)
        .count();
    let refused = replies[1..]
        .iter()
        .filter(|r| outcome(r) == guard_common::proto::BlockOutcome::Refused)
        .count();
    println!("the reporter got {added} blocks in, {refused} refused");
    assert!(
        added <= CAPACITY as usize / 2,
        "a reporter filled {added} of {CAPACITY} entries"
    );
    assert_eq!(added + refused, reports.len());

    // The operator's block still lands.
    let out = home
        .ctl(&[
            "block",
            "198.18.9.9/32",
            "--ttl",
            "10m",
            "--reason",
            "operator",
        ])
        .expect("the operator's block is taken");
    assert!(out.contains("198.18.9.9/32"), "{out}");

    let m = agent.scrape().expect("scrape /metrics");
    let counted: f64 = Refusals::REPORTER
        .iter()
        .map(|why| {
            m.value(
                "guard_block_refusals_total",
                &[("origin", "reporter"), ("reason", why)],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(counted as usize, refused, "every refusal is counted");
    let audited = home.audit().expect("the audit log");
    let refusals: Vec<_> = audited.iter().filter(|r| r["event"] == "refuse").collect();
    assert!(
        !refusals.is_empty()
            && refusals
                .iter()
                .all(|r| r["origin"].as_str().unwrap_or("").contains("uid=65534")),
        "refusals are audited with the reporter's uid: {refusals:?}"
    );
    // One line per kind and ten seconds, not one per refusal.
    assert!(refusals.len() < refused, "{} audit lines", refusals.len());
}

/// The refusal reasons a reporter's flood meets.
struct Refusals;
impl Refusals {
    const REPORTER: [&'static str; 4] = ["rate_limited", "reserved", "quota", "share"];
}

/// Issue 24, finding 5: a reporter that opens every session it can and holds them (a request
/// now and then keeps them from idling out) used to lock root out of `guard block`. Now one
/// uid holds at most `max_sessions_per_uid` (16), slots are kept for operators, and root is
/// served while the reporter holds on.
#[test]
fn a_reporter_holding_sessions_does_not_lock_the_operator_out() {
    use guard_tests::agent::reporter::{HeldSessions, NOBODY};
    if !require_root("a_reporter_holding_sessions_does_not_lock_the_operator_out") {
        return;
    }
    let ns = solo_netns().expect("a namespace with a veth pair");
    let home = AgentHome::new().expect("agent home");
    let agent = home
        .start(
            &ns,
            &RunOpts::new(ROLE_IF, PORT).config(&format!(
                "allowed_uids = [{NOBODY}]\n[control]\nidle_timeout_secs = 600\n"
            )),
        )
        .expect("start the agent");
    const TRIED: usize = 70;
    let held = HeldSessions::open(NOBODY, &home.socket(), TRIED, Duration::from_secs(300))
        .expect("open sessions as nobody");
    let served = held
        .replies
        .iter()
        .filter(|r| matches!(r, Response::HelloOk { .. }))
        .count();
    let busy = held
        .replies
        .iter()
        .filter(|r| {
            matches!(
                r,
                Response::Error {
                    code: ErrorCode::Busy,
                    ..
                }
            )
        })
        .count();
    println!("nobody holds {served} sessions, {busy} turned away");
    assert_eq!(served + busy, TRIED, "{:?}", held.replies);
    assert!(
        served <= 16,
        "one uid holds {served} of the socket's sessions"
    );

    // While they are held, root is served.
    let out = home
        .ctl(&[
            "block",
            "198.18.9.9/32",
            "--ttl",
            "10m",
            "--reason",
            "operator",
        ])
        .expect("root's block is served while nobody holds its sessions");
    assert!(out.contains("198.18.9.9/32"), "{out}");
    let m = agent.scrape().expect("scrape /metrics");
    assert_eq!(
        m.get("guard_control_busy_total", &[("why", "per_uid")])
            .expect("the busy series"),
        busy as f64,
        "every session turned away is counted by why"
    );
    held.close().expect("close the sessions");
}
