//! The agent proven end to end: the real `guard` binary run as `guard run` inside throwaway
//! lab namespaces, driven through its CLI, its control socket and real traffic, and checked
//! through `ip link`, bpftool, its pins, its audit log and its `/metrics`.
//!
//! Every test builds its own namespaces and pin root and removes them on drop (RAII), even
//! when an assertion fails. Run as root, one at a time (they share bpffs and the CPU):
//! `cargo test -p guard-tests --test agent -- --test-threads=1`. Without root each test says it
//! was skipped and returns.
//!
//! Assertions are on counts, states and ratios, never on how long something took; waits only
//! bound how long a test may take to settle.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guard_common::addr::Prefix;
use guard_common::client::{ClientError, Connection};
use guard_common::proto::{
    decode_frame, BlockOutcome, BytesMut, ErrorCode, Message, Request, Response, PROTO_VERSION,
};
use guard_common::state::reason;
use guard_common::stats::Stat;
use guard_tests::agent::{
    block_on, connects, host_prefix, hping3_syns, link_exists, pinned_link_ids, prog_exists,
    promtool_check, wait_for, xdp_prog, Agent, AgentHome, Listener, RunOpts, Scrape,
};
use guard_tests::lab::{Lab, ATTACKER_V4, ROLE_IF, SERVER_V4};
use guard_tests::{hping3_syn_flood, require_root, Netns};
use guard_user::paths::AttachKind;

/// The protected port.
const PORT: u16 = 8080;
/// One connect per attempt is enough to tell "dropped" from "answered": the kernel retransmits
/// a lost SYN only after 1 s, and an answered one completes in far less on a veth.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn server() -> SocketAddr {
    SocketAddr::new(SERVER_V4.into(), PORT)
}

fn attacker() -> String {
    host_prefix(ATTACKER_V4.into())
}

/// A namespace with one veth pair (`eth0` ↔ `eth1`), for tests that need an interface to
/// attach to but no traffic.
fn solo() -> Netns {
    let ns = Netns::new("agt").expect("create a namespace");
    ns.ip(&[
        "link", "add", ROLE_IF, "type", "veth", "peer", "name", "eth1",
    ])
    .expect("add a veth pair");
    for dev in [ROLE_IF, "eth1"] {
        ns.ip(&["link", "set", dev, "up"]).expect("set it up");
    }
    ns
}

fn start(home: &AgentHome, ns: &Netns, opts: &RunOpts) -> Agent {
    home.start(ns, opts)
        .unwrap_or_else(|e| panic!("start the agent: {e:#}"))
}

fn stat(home: &AgentHome, s: Stat) -> u64 {
    home.pins()
        .maps()
        .and_then(|m| m.stat(s).map_err(anyhow::Error::from))
        .unwrap_or_else(|e| panic!("read {}: {e:#}", s.name()))
}

fn ctl(home: &AgentHome, args: &[&str]) -> String {
    home.ctl(args)
        .unwrap_or_else(|e| panic!("guard {args:?}: {e:#}"))
}

fn scrape(agent: &Agent) -> Scrape {
    agent
        .scrape()
        .unwrap_or_else(|e| panic!("scrape /metrics: {e:#}"))
}

/// Sends exactly `count` SYNs from the attacker's own address at `rate` per second and checks
/// that hping3 reports them all sent.
fn send_syns(lab: &Lab, count: u32, rate: u32) -> u64 {
    let sent = hping3_syns(&lab.attacker, SERVER_V4.into(), PORT, count, rate)
        .unwrap_or_else(|e| panic!("hping3: {e:#}"));
    assert_eq!(sent, u64::from(count), "hping3 sent {sent} of {count}");
    sent
}

/// Waits until `read()` reaches at least `target`, then lets stragglers arrive and returns the
/// final value. Settling only: the caller asserts on the count.
fn settle(what: &str, target: u64, mut read: impl FnMut() -> u64) -> u64 {
    let _ = wait_for(what, Duration::from_secs(15), || {
        Ok((read() >= target).then_some(()))
    });
    std::thread::sleep(Duration::from_millis(500));
    read()
}

fn blocked_prefixes(home: &AgentHome) -> String {
    ctl(home, &["blocks"])
}

#[test]
fn run_attaches_in_each_mode_and_its_verdicts_apply() {
    if !require_root("run_attaches_in_each_mode_and_its_verdicts_apply") {
        return;
    }
    // (--attach, what `ip link` shows, what `guard status` says, the pinned link's kind)
    let modes = [
        ("xdp-native", Some("xdp"), "xdp", AttachKind::XdpNative),
        (
            "xdp-generic",
            Some("xdpgeneric"),
            "xdp_generic",
            AttachKind::XdpGeneric,
        ),
        ("tc", None, "tc", AttachKind::Tc),
    ];
    for (mode, ip_mode, label, kind) in modes {
        let lab = Lab::new().expect("build the lab");
        let home = AgentHome::new().expect("agent home");
        let agent = start(
            &home,
            &lab.server,
            &RunOpts::new(ROLE_IF, PORT).attach(mode),
        );

        let status = home.status().expect("guard status");
        assert!(
            status.contains(&format!("attached: {ROLE_IF} ({label})")),
            "{mode}: {status}"
        );
        assert!(status.contains("protected ports: [8080]"), "{status}");
        let link = home.pins().layout().link(kind, ROLE_IF);
        let (_, prog) = pinned_link_ids(&link).expect("the pinned link");
        let xdp = xdp_prog(&lab.server, ROLE_IF).expect("ip link");
        match ip_mode {
            // The program the interface runs is the one behind the pinned link.
            Some(m) => assert_eq!(xdp, Some((m.to_string(), prog)), "{mode}"),
            None => assert_eq!(xdp, None, "{mode}: tc must not leave an XDP program"),
        }

        // The verdicts happen on this hook: a blocked source loses every SYN to the port,
        // counted once each, while another source still connects.
        let listener = Listener::new(&lab.server, server()).expect("listener");
        assert_eq!(
            connects(&lab.attacker, server(), 3, CONNECT_TIMEOUT).unwrap(),
            3,
            "{mode}: before the block"
        );
        listener
            .wait_closed(&lab.server, 3)
            .expect("connections closed");
        let out = ctl(&home, &["block", &attacker(), "--ttl", "10m"]);
        assert!(out.starts_with("added"), "{out}");
        let before = stat(&home, Stat::DropBlocked);
        let sent = send_syns(&lab, 100, 50);
        let after = settle("blocked drops", before + sent, || {
            stat(&home, Stat::DropBlocked)
        });
        assert_eq!(after - before, sent, "{mode}: one blocked drop per SYN");
        assert_eq!(
            connects(&lab.attacker, server(), 2, CONNECT_TIMEOUT).unwrap(),
            0,
            "{mode}"
        );
        assert_eq!(
            connects(&lab.legit, server(), 3, CONNECT_TIMEOUT).unwrap(),
            3,
            "{mode}"
        );
        drop(agent);
    }
}

/// Clears a flag when dropped, also while unwinding from a failed assertion.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[test]
fn kill_9_during_a_flood_keeps_dropping_and_a_restart_adopts_the_pins() {
    if !require_root("kill_9_during_a_flood_keeps_dropping_and_a_restart_adopts_the_pins") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let opts = RunOpts::new(ROLE_IF, PORT).attach("xdp-native");
    let agent = start(&home, &lab.server, &opts);
    let link = home.pins().layout().link(AttachKind::XdpNative, ROLE_IF);
    let (link_id, prog_before) = pinned_link_ids(&link).expect("the pinned link");
    let carried = "198.19.9.0/24";
    assert!(ctl(&home, &["block", carried, "--ttl", "10m"]).starts_with("added"));

    // Far over the default per-source cap (20/s, burst 40): most SYNs are dropped.
    let flood = hping3_syn_flood(
        &lab.attacker,
        SERVER_V4.into(),
        PORT,
        None,
        30,
        Some(1000),
        None,
    )
    .expect("start hping3");
    // Escalation may move the attacker from the cap to the blocklist mid-test; both are drops.
    let drops = || stat(&home, Stat::DropSourceRate) + stat(&home, Stat::DropBlocked);
    wait_for("the first drops", Duration::from_secs(15), || {
        Ok((drops() > 0).then_some(()))
    })
    .unwrap();

    // Sample the interface from before the kill until the new agent serves: it must never be
    // without the program, and the program must change exactly once (the atomic update).
    let sampling = AtomicBool::new(true);
    let (samples, agent2, dead_drops) = std::thread::scope(|s| {
        // Ends the sampler however this closure ends, or the scope would wait for it forever.
        let _stop = StopOnDrop(&sampling);
        let sampler = s.spawn(|| {
            let mut seen = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                seen.push(xdp_prog(&lab.server, ROLE_IF).expect("ip link"));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        let alive = drops();
        let killed = agent.kill9().expect("kill -9 the agent");
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(killed.status.signal(), Some(libc::SIGKILL));
        // Nobody runs in user space now; the kernel keeps enforcing.
        let mut dead = vec![drops()];
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            dead.push(drops());
        }
        assert!(dead[0] >= alive, "{alive} then {dead:?}");
        assert!(
            dead.windows(2).all(|w| w[1] > w[0]),
            "drops must keep growing while the agent is dead: {dead:?}"
        );
        let kernel_blocks = home.pins().maps().unwrap().blocks().unwrap();
        assert!(
            kernel_blocks.iter().any(|(p, _)| p.to_string() == carried),
            "{kernel_blocks:?}"
        );
        let agent2 = start(&home, &lab.server, &opts);
        sampling.store(false, Ordering::Relaxed);
        (
            sampler.join().expect("sampler"),
            agent2,
            *dead.last().unwrap(),
        )
    });

    let log = agent2.log();
    assert!(log.contains("adopting pinned maps"), "{log}");
    assert!(
        log.contains("updated the pinned xdpdrv link to the new program"),
        "{log}"
    );
    let (link_after, prog_after) = pinned_link_ids(&link).expect("the pinned link");
    assert_eq!(link_after, link_id, "the same link, updated in place");
    assert_ne!(prog_after, prog_before, "the new agent's program runs");
    assert_eq!(
        xdp_prog(&lab.server, ROLE_IF).unwrap(),
        Some(("xdp".to_string(), prog_after)),
        "the interface runs the program behind the pinned link"
    );
    assert!(samples.len() >= 10, "only {} samples", samples.len());
    assert!(
        samples
            .iter()
            .all(|s| s.as_ref().is_some_and(|(m, _)| m == "xdp")),
        "XDP must stay attached throughout: {samples:?}"
    );
    let mut progs: Vec<u64> = samples.iter().flatten().map(|(_, id)| *id).collect();
    progs.dedup();
    assert!(
        progs == [prog_before, prog_after] || progs == [prog_before],
        "the program changes once, old to new: {progs:?}"
    );

    // Counters continue from the kernel's totals instead of starting over.
    let m = scrape(&agent2);
    let exported = m
        .get(
            "guard_packets_total",
            &[("verdict", "drop"), ("reason", "source_rate")],
        )
        .unwrap()
        + m.value(
            "guard_packets_total",
            &[("verdict", "drop"), ("reason", "blocked")],
        )
        .unwrap_or(0.0);
    assert!(exported as u64 >= dead_drops, "{exported} < {dead_drops}");
    wait_for(
        "drops under the new program",
        Duration::from_secs(10),
        || Ok((drops() > exported as u64).then_some(())),
    )
    .unwrap();
    let blocks = blocked_prefixes(&home);
    assert!(
        blocks.contains(carried) && blocks.contains("adopted"),
        "{blocks}"
    );
    flood.stop().expect("stop hping3");
}

#[test]
fn unload_leaves_nothing_behind() {
    if !require_root("unload_leaves_nothing_behind") {
        return;
    }
    for (mode, kind) in [
        ("xdp-native", AttachKind::XdpNative),
        ("tc", AttachKind::Tc),
    ] {
        let ns = solo();
        let home = AgentHome::new().expect("agent home");
        let agent = start(&home, &ns, &RunOpts::new(ROLE_IF, PORT).attach(mode));
        let (link_id, prog_id) =
            pinned_link_ids(&home.pins().layout().link(kind, ROLE_IF)).expect("pinned link");
        let done = agent.stop().expect("stop the agent");
        done.ensure_success("guard run").unwrap();
        assert!(
            done.stderr.contains("stays attached and pinned"),
            "{}",
            done.stderr
        );
        // Stopping the agent is not unloading: protection stays.
        assert!(link_exists(link_id), "{mode}: link gone with the agent");
        if kind.is_xdp() {
            assert_eq!(
                xdp_prog(&ns, ROLE_IF).unwrap(),
                Some(("xdp".to_string(), prog_id))
            );
        }

        let out = home.unload().expect("guard unload");
        assert!(out.contains(&format!("detached from {ROLE_IF}")), "{out}");
        assert!(
            home.pins().entries().is_empty() && !home.pins().root().exists(),
            "{mode}: left {:?}",
            home.pins().entries()
        );
        assert_eq!(xdp_prog(&ns, ROLE_IF).unwrap(), None, "{mode}");
        assert!(!link_exists(link_id), "{mode}: link {link_id} still exists");
        wait_for("the program to be freed", Duration::from_secs(10), || {
            Ok((!prog_exists(prog_id)).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{mode}: program {prog_id} still loaded: {e:#}"));
        let root = home.pins().root().to_str().expect("UTF-8").to_string();
        let status = home
            .cli_output(&["status", "--pin-dir", &root])
            .expect("guard status");
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(text.contains("not loaded"), "{text}");
        assert_eq!(status.status.code(), Some(3), "not loaded exits 3");
    }
}

#[test]
fn blocks_through_the_socket_drop_syns_until_unblocked_or_expired() {
    if !require_root("blocks_through_the_socket_drop_syns_until_unblocked_or_expired") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let agent = start(&home, &lab.server, &RunOpts::new(ROLE_IF, PORT));
    let listener = Listener::new(&lab.server, server()).expect("listener");
    let atk = attacker();
    let n_connects = |ns: &Netns, n| connects(ns, server(), n, CONNECT_TIMEOUT).unwrap();
    let closed = |n| {
        listener
            .wait_closed(&lab.server, n)
            .expect("connections closed")
    };

    assert_eq!(n_connects(&lab.attacker, 3), 3, "before any block");
    closed(3);
    // Block with the CLI...
    let out = ctl(&home, &["block", &atk, "--ttl", "10m"]);
    assert!(out.starts_with("added"), "{out}");
    let before = stat(&home, Stat::DropBlocked);
    assert_eq!(n_connects(&lab.attacker, 3), 0, "blocked");
    assert_eq!(n_connects(&lab.legit, 3), 3, "others still connect");
    assert!(stat(&home, Stat::DropBlocked) >= before + 3);
    assert!(blocked_prefixes(&home).contains(&atk));

    // ...unblock with the client library.
    let resp = home
        .call(Request::Unblock {
            prefix: Prefix::host(ATTACKER_V4.into()),
        })
        .expect("unblock");
    assert_eq!(resp, Response::Ok);
    assert_eq!(n_connects(&lab.attacker, 3), 3, "unblocked");
    assert!(!blocked_prefixes(&home).contains(&atk));
    closed(9);

    // A short block expires by itself: the kernel stops matching it, the agent sweeps it.
    let out = ctl(&home, &["block", &atk, "--ttl", "3s"]);
    assert!(out.contains("expires in 3s"), "{out}");
    assert_eq!(n_connects(&lab.attacker, 1), 0, "blocked until expiry");
    wait_for("the block to expire", Duration::from_secs(20), || {
        Ok((!blocked_prefixes(&home).contains(&atk)).then_some(()))
    })
    .unwrap();
    assert_eq!(n_connects(&lab.attacker, 3), 3, "expired");

    let count = |event| home.audit_events(event, &atk).unwrap().len();
    assert_eq!(
        (count("block"), count("unblock"), count("expire")),
        (2, 1, 1),
        "{:#?}",
        home.audit().unwrap()
    );
    let m = scrape(&agent);
    assert_eq!(m.get("guard_blocks_expired_total", &[]).unwrap(), 1.0);
    assert_eq!(m.get("guard_unblocks_total", &[]).unwrap(), 1.0);
    assert_eq!(m.get("guard_blocklist_entries", &[]).unwrap(), 0.0);
}

#[test]
fn a_uid_that_is_not_permitted_is_refused() {
    if !require_root("a_uid_that_is_not_permitted_is_refused") {
        return;
    }
    let ns = solo();
    let home = AgentHome::new().expect("agent home");
    let agent = start(&home, &ns, &RunOpts::new(ROLE_IF, PORT));
    // Open the file to everyone: the peer-credential check must still refuse.
    std::fs::set_permissions(home.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = |m: &Scrape| m.get("guard_control_refused_total", &[]).unwrap();
    let before = refused(&scrape(&agent));

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
    assert_eq!(refused(&scrape(&agent)), before + 1.0);
    assert!(
        agent.log().contains("control socket refused"),
        "{}",
        agent.log()
    );
    // Root still is served.
    assert!(ctl(&home, &["blocks"]).contains("0 blocked"));
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
    let ns = solo();
    let home = AgentHome::new().expect("agent home");
    let mut agent = start(&home, &ns, &RunOpts::new(ROLE_IF, PORT));
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

#[test]
fn metrics_pass_promtool_and_count_exactly_what_was_sent() {
    if !require_root("metrics_pass_promtool_and_count_exactly_what_was_sent") {
        return;
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let agent = start(&home, &lab.server, &RunOpts::new(ROLE_IF, PORT));
    assert_eq!(
        agent.http_get("/healthz").expect("GET /healthz"),
        (200, "ok\n".to_string())
    );
    let text = agent.scrape_text().expect("scrape");
    promtool_check(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));

    let packets = |m: &Scrape, verdict: &str, reason: &str| {
        m.value(
            "guard_packets_total",
            &[("verdict", verdict), ("reason", reason)],
        )
        .unwrap_or_else(|| panic!("no guard_packets_total{{{verdict},{reason}}}"))
    };
    let syn_seen = |m: &Scrape| m.get("guard_syn_seen_total", &[]).unwrap();

    // Under the cap (burst 40): every SYN is seen and admitted.
    let m0 = scrape(&agent);
    let sent = send_syns(&lab, 20, 10);
    let admitted = settle(
        "admitted SYNs",
        (packets(&m0, "pass", "syn_admitted") as u64) + sent,
        || packets(&scrape(&agent), "pass", "syn_admitted") as u64,
    );
    let m1 = scrape(&agent);
    assert_eq!(admitted - packets(&m0, "pass", "syn_admitted") as u64, sent);
    assert_eq!(syn_seen(&m1) - syn_seen(&m0), sent as f64);

    // Blocked: every SYN is a blocked drop, and a blocked SYN is not counted as seen.
    let resp = home
        .call(Request::Block {
            prefix: Prefix::host(ATTACKER_V4.into()),
            ttl_secs: 600,
            reason: reason::OPERATOR,
            detected_at_unix_ns: 0,
            detail: "metrics test".into(),
        })
        .expect("block");
    assert!(
        matches!(
            resp,
            Response::BlockResult {
                outcome: BlockOutcome::Added,
                ..
            }
        ),
        "{resp:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let m2 = scrape(&agent);
    let sent = send_syns(&lab, 200, 100);
    let target = packets(&m2, "drop", "blocked") as u64 + sent;
    settle("blocked drops", target, || {
        packets(&scrape(&agent), "drop", "blocked") as u64
    });
    let text = agent.scrape_text().expect("scrape");
    promtool_check(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    let m3 = Scrape::parse(&text).unwrap();
    assert_eq!(
        packets(&m3, "drop", "blocked") - packets(&m2, "drop", "blocked"),
        sent as f64
    );
    assert_eq!(syn_seen(&m3), syn_seen(&m2), "blocked SYNs are not seen");
    assert_eq!(
        packets(&m3, "pass", "syn_admitted"),
        packets(&m2, "pass", "syn_admitted")
    );
    // The agent's own gauges and counters agree with what it was asked.
    let get = |name, labels: &[(&str, &str)]| m3.get(name, labels).unwrap();
    assert_eq!(get("guard_blocklist_entries", &[]), 1.0);
    assert_eq!(
        get("guard_block_reports_total", &[("result", "added")]),
        1.0
    );
    assert_eq!(
        get(
            "guard_control_requests_total",
            &[("request", "block"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "guard_attach_info",
            &[("interface", ROLE_IF), ("mode", "xdp")]
        ),
        1.0
    );
    assert_eq!(get("guard_config", &[("key", "syn_rate")]), 20.0);
    // Kernel-side totals and the exported ones are the same numbers.
    assert_eq!(
        stat(&home, Stat::DropBlocked) as f64,
        packets(&m3, "drop", "blocked")
    );
    assert_eq!(
        stat(&home, Stat::SourcesCreated) as f64,
        get("guard_sources_created_total", &[])
    );
    assert!(
        get("guard_sources_created_total", &[]) >= 1.0,
        "the admitted sources count"
    );
}

/// Metric names the deploy files query but nothing exports yet, each with the feature that
/// will export it. The test fails if one of them appears (remove it here) or if a new
/// queried name is exported by neither side. Adaptive limits (`guard_adaptive_level`,
/// `guard_adaptive_changes_total`) and concurrent connection tracking
/// (`guard_concurrent_connections_tracked`) were listed here until the agent exported them.
const KNOWN_MISSING: &[(&str, &str)] = &[];

/// Made by Prometheus itself for every scrape target.
const SCRAPER_MADE: &[&str] = &["up"];

/// Series an agent registers only with `[fleet]` on; the fleet tests check them against a
/// fleet agent's scrape.
const FLEET_ONLY_PREFIX: &str = "guard_fleet_";

#[test]
fn every_metric_the_deploy_files_query_is_exported() {
    if !require_root("every_metric_the_deploy_files_query_is_exported") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guard-user/deploy/metric_names.py");
    let out = Command::new("python3")
        .arg(&script)
        .output()
        .expect("run metric_names.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queried: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(queried.len() > 10, "{queried:?}");

    // The agent: a fresh one, so every series must exist before anything happened.
    let ns = solo();
    let home = AgentHome::new().expect("agent home");
    let agent = start(&home, &ns, &RunOpts::new(ROLE_IF, PORT));
    let agent_names: BTreeSet<String> = scrape(&agent).families.into_keys().collect();

    // The app: the registry a warp app hands to the guard.
    let registry = prometheus::Registry::new();
    let _guard = guard_common::app::Guard::builder()
        .registry(&registry)
        .build()
        .expect("build the app guard");
    let app_text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    promtool_check(&app_text).unwrap_or_else(|e| panic!("{e:#}\n{app_text}"));
    let app_names: BTreeSet<String> = Scrape::parse(&app_text)
        .unwrap()
        .families
        .into_keys()
        .collect();

    let exported: BTreeSet<&String> = agent_names.union(&app_names).collect();
    let known: BTreeSet<&str> = KNOWN_MISSING.iter().map(|(n, _)| *n).collect();
    let missing: Vec<&String> = queried
        .iter()
        .filter(|n| !exported.contains(n))
        .filter(|n| !known.contains(n.as_str()) && !SCRAPER_MADE.contains(&n.as_str()))
        .filter(|n| !n.starts_with(FLEET_ONLY_PREFIX))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by alerts.yml/dashboard.json but exported by neither the agent nor the app: \
         {missing:?}"
    );
    for (name, feature) in KNOWN_MISSING {
        assert!(
            queried.contains(*name),
            "{name} is no longer queried: drop it from KNOWN_MISSING"
        );
        assert!(
            !exported.iter().any(|n| n == name),
            "{name} ({feature}) is exported now: drop it from KNOWN_MISSING"
        );
    }
    // The two sides never claim the same name.
    let both: Vec<&String> = agent_names.intersection(&app_names).collect();
    assert!(both.is_empty(), "{both:?}");
}

/// A lab and an agent with a cap of 5 SYN/s that escalates after 3 s over it.
fn escalation_lab() -> (Lab, AgentHome, Agent) {
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::new().expect("agent home");
    let config = "[limits]\nsyn_rate = 5\nsyn_burst = 5\n\n\
                  [escalation]\nover_cap_secs = 3\nttl_secs = 60\n";
    let agent = start(
        &home,
        &lab.server,
        &RunOpts::new(ROLE_IF, PORT).config(config),
    );
    (lab, home, agent)
}

#[test]
fn a_source_over_its_cap_for_long_enough_is_escalated_to_a_block() {
    if !require_root("a_source_over_its_cap_for_long_enough_is_escalated_to_a_block") {
        return;
    }
    let (lab, home, agent) = escalation_lab();
    // The source proves its address first: one real connection.
    let listener =
        Listener::new(&lab.server, SocketAddr::new(SERVER_V4.into(), PORT)).expect("listen");
    let to = SocketAddr::new(SERVER_V4.into(), PORT);
    assert_eq!(
        connects(&lab.attacker, to, 1, Duration::from_secs(3)).unwrap(),
        1
    );
    listener
        .wait_closed(&lab.server, 1)
        .expect("the connection closed");
    // 100 SYN/s against a cap of 5/s for 8 s: over the cap all along.
    let sent = send_syns(&lab, 800, 100) + 1;
    let atk = attacker();
    let blocks = wait_for("the escalation", Duration::from_secs(10), || {
        let b = blocked_prefixes(&home);
        Ok(b.contains(&atk).then_some(b))
    })
    .unwrap();
    let line = blocks
        .lines()
        .find(|l| l.contains(&atk))
        .unwrap()
        .to_string();
    assert!(
        line.contains(reason::name(reason::ESCALATED_OVER_CAP)) && line.contains("kernel:over_cap"),
        "{blocks}"
    );
    let esc = home.audit_events("escalate", &atk).unwrap();
    assert_eq!(esc.len(), 1, "{:#?}", home.audit().unwrap());
    assert_eq!(esc[0]["reason"], "escalated_over_cap");
    assert_eq!(esc[0]["ttl_secs"], 60);
    let m = scrape(&agent);
    assert_eq!(m.get("guard_escalations_total", &[]).unwrap(), 1.0);
    assert!(
        m.get("guard_over_cap_events_total", &[("kind", "source")])
            .unwrap()
            >= 3.0
    );
    // Once blocked, the rest of the flood died as blocked drops; before, the cap dropped it.
    let blocked = stat(&home, Stat::DropBlocked);
    let capped = stat(&home, Stat::DropSourceRate);
    let admitted = stat(&home, Stat::PassSyn);
    assert!(
        blocked > 0 && capped > 0,
        "blocked {blocked}, capped {capped}"
    );
    assert_eq!(blocked + capped + admitted, sent, "each SYN judged once");
    assert!(agent.log().contains("escalated"), "{}", agent.log());
    // `guard explain` tells the same story: blocked by the escalation, one strike.
    let root = home.pins().root().to_str().unwrap().to_string();
    let out = ctl(
        &home,
        &[
            "-o",
            "json",
            "explain",
            &ATTACKER_V4.to_string(),
            "--pin-dir",
            &root,
        ],
    );
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["blocked_by"]["prefix"], atk, "{e}");
    assert_eq!(e["blocked_by"]["reason"], "escalated_over_cap", "{e}");
    assert_eq!(e["blocked_by"]["origin"], "kernel:over_cap", "{e}");
    assert_eq!(e["escalation"][0]["prefix"], atk, "{e}");
    assert_eq!(e["escalation"][0]["tracked"], true, "{e}");
    assert_eq!(e["escalation"][0]["strikes"], 1, "{e}");
    assert!(e["source"]["over_cap"].as_u64().unwrap() >= capped, "{e}");
    assert_eq!(e["next_syn"]["cause"], "blocked", "{e}");
}

#[test]
fn an_over_cap_streak_from_a_source_that_never_completed_a_handshake_blocks_nothing() {
    if !require_root(
        "an_over_cap_streak_from_a_source_that_never_completed_a_handshake_blocks_nothing",
    ) {
        return;
    }
    let (lab, home, agent) = escalation_lab();
    // The same flood as above, but its source never answers a SYN-ACK (as a spoofed one
    // cannot): it carries a victim's address as far as the agent can tell.
    send_syns(&lab, 800, 100);
    let skipped = wait_for("the skipped escalations", Duration::from_secs(5), || {
        let m = scrape(&agent);
        let n = m
            .value(
                "guard_escalations_skipped_total",
                &[("reason", "unproven_source")],
            )
            .unwrap_or(0.0);
        Ok((n >= 3.0).then_some(n))
    })
    .unwrap();
    assert!(skipped >= 3.0, "{skipped}");
    let m = scrape(&agent);
    assert_eq!(m.get("guard_escalations_total", &[]).unwrap(), 0.0);
    assert!(!blocked_prefixes(&home).contains(&attacker()));
    assert!(home
        .audit_events("escalate", &attacker())
        .unwrap()
        .is_empty());
    assert!(
        stat(&home, Stat::DropSourceRate) > 0,
        "the cap still dropped the flood"
    );
}

/// Percentile of sorted samples (nearest rank).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Not a test: the numbers for the agent's report. RSS at idle and with a million blocks
/// (inserted over one control connection, as an app would), `/metrics` scrape time with them,
/// and detection-to-block latency from `guard_block_latency_seconds`.
/// `GUARD_MEASURE_BLOCKS` overrides the million.
#[test]
#[ignore = "measurement, minutes long: run with --ignored --nocapture"]
fn measure_agent_memory_scrape_and_block_latency() {
    if !require_root("measure_agent_memory_scrape_and_block_latency") {
        return;
    }
    let n: u32 = std::env::var("GUARD_MEASURE_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ns = solo();
    let home = AgentHome::new().expect("agent home");
    // Audit records would be a million log lines and file lines: measure the agent, not them.
    let opts = RunOpts::new(ROLE_IF, PORT)
        .log("info,guard::audit=warn")
        .audit_log("/dev/null");
    let agent = start(&home, &ns, &opts);
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = agent.rss_kib().unwrap();

    let sock = home.socket();
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let block = |i: u32, detected: u64| Request::Block {
        // Lab addresses only (2001:2::/48), one /128 each.
        prefix: Prefix::host(IpAddr::V6(Ipv6Addr::from(
            0x2001_0002_0000_0000_0000_0000_0000_0000u128 + u128::from(i),
        ))),
        ttl_secs: 3600,
        reason: reason::OPERATOR,
        detected_at_unix_ns: detected,
        detail: String::new(),
    };
    let (rtts, inserted, insert_time) = block_on(async {
        let mut conn = Connection::connect(&sock, "measure").await.unwrap();
        let mut rtts = Vec::new();
        for i in 0..300 {
            let t = Instant::now();
            conn.call(block(n + i, now_ns())).await.unwrap();
            rtts.push(t.elapsed());
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1200);
        let mut inserted = 0u32;
        for i in 0..n {
            if Instant::now() >= deadline {
                break;
            }
            match conn.call(block(i, 0)).await {
                Ok(_) => inserted += 1,
                Err(e) => {
                    eprintln!("stopped at {i}: {e}");
                    break;
                }
            }
            if i % 100_000 == 0 && i > 0 {
                eprintln!("{i} blocks after {:?}", start.elapsed());
            }
        }
        (rtts, inserted, start.elapsed())
    });
    let m = scrape(&agent);
    let p50 = m.histogram_quantile("guard_block_latency_seconds", 0.5);
    let p99 = m.histogram_quantile("guard_block_latency_seconds", 0.99);
    let mut rtts = rtts;
    rtts.sort();
    let rss_full = agent.rss_kib().unwrap();
    let mut scrapes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let text = agent.scrape_text().unwrap();
        scrapes.push(t.elapsed());
        assert!(text.contains("guard_blocklist_entries"));
    }
    scrapes.sort();
    let entries = scrape(&agent).get("guard_blocklist_entries", &[]).unwrap();
    println!("MEASURE rss idle: {rss_idle} KiB");
    println!(
        "MEASURE blocks inserted: {inserted} in {insert_time:?} ({:.0}/s), blocklist_entries {entries}",
        f64::from(inserted) / insert_time.as_secs_f64()
    );
    println!("MEASURE rss with blocks: {rss_full} KiB");
    println!(
        "MEASURE scrape time: min {:?} median {:?} max {:?}",
        scrapes[0], scrapes[2], scrapes[4]
    );
    println!("MEASURE block latency (histogram): p50 {p50:?} s, p99 {p99:?} s");
    println!(
        "MEASURE block round trip (client): p50 {:?} p99 {:?}",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    );
    println!(
        "MEASURE {}",
        m.samples
            .iter()
            .filter(|s| s.name.starts_with("guard_block_latency_seconds"))
            .map(|s| format!("{:?}={}", s.labels, s.value))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
