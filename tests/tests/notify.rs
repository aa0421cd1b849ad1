//! systemd readiness (`Type=notify`) proven with the real agent: the test plays the service
//! manager, binds the datagram socket `$NOTIFY_SOCKET` names and checks what arrives and when.
//!
//! "When" is made observable without timing: the moment READY=1 arrives the test freezes the
//! agent (SIGSTOP) and only then looks at the pins and the control socket, so what it sees is
//! at most what the agent had done when it sent READY=1 plus the few instructions before the
//! stop; an agent that said READY before attaching (which takes the verifier hundreds of
//! milliseconds) would be caught not attached.
//!
//! Run as root: `cargo test -p guard-tests --test notify -- --test-threads=1`.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use guard_tests::agent::{AgentHome, RunOpts};
use guard_tests::lab::ROLE_IF;
use guard_tests::{require_root, Netns};

const PORT: u16 = 8080;

/// A namespace with one veth pair to attach to (no traffic needed).
fn solo() -> Netns {
    let ns = Netns::new("ntf").expect("create a namespace");
    ns.ip(&[
        "link", "add", ROLE_IF, "type", "veth", "peer", "name", "eth1",
    ])
    .expect("add a veth pair");
    for dev in [ROLE_IF, "eth1"] {
        ns.ip(&["link", "set", dev, "up"]).expect("set it up");
    }
    ns
}

fn recv(sock: &UnixDatagram, waiting_for: &str) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification while waiting for {waiting_for}: {e}"));
    String::from_utf8(buf[..n].to_vec()).expect("notifications are UTF-8")
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: the PID of our own child, not reaped yet (the agent guard reaps it), so it cannot
    // have been recycled for another process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

#[test]
fn ready_only_once_attached_and_listening_then_reloading_and_stopping() {
    if !require_root("ready_only_once_attached_and_listening_then_reloading_and_stopping") {
        return;
    }
    let ns = solo();
    let home = AgentHome::new().expect("agent home");
    let notify_path = home.dir().join("notify.sock");
    let manager = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("a read timeout");
    let config = home.dir().join("guard.toml");
    let opts = RunOpts::new(ROLE_IF, PORT)
        .config("[limits]\nsyn_rate = 20\n")
        .env("NOTIFY_SOCKET", notify_path.to_str().expect("UTF-8 path"));
    let mut agent = home.spawn(&ns, &opts).expect("spawn the agent");

    let ready = recv(&manager, "READY=1");
    signal(agent.pid(), libc::SIGSTOP);
    // While frozen: the pins say where it is attached; the control socket, if it listens,
    // completes a connect from its backlog without the agent running.
    let status = home.status();
    let connect = UnixStream::connect(home.socket());
    signal(agent.pid(), libc::SIGCONT);
    let status = status.unwrap_or_else(|e| panic!("guard status: {e:#}"));
    assert!(
        status.contains(&format!("attached: {ROLE_IF} (")),
        "READY=1 came before the program was attached:\n{status}"
    );
    assert!(
        connect.is_ok(),
        "READY=1 came before the control socket listened: {connect:?}"
    );
    assert!(
        ready.starts_with("READY=1\nSTATUS=protecting ports [8080] on eth0 ("),
        "the first notification: {ready:?}"
    );
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("the agent logs that it runs");

    // SIGHUP: RELOADING=1 first, READY=1 again once the file's values are live.
    std::fs::write(&config, "[limits]\nsyn_rate = 33\n").expect("rewrite the config");
    signal(agent.pid(), libc::SIGHUP);
    let reloading = recv(&manager, "RELOADING=1");
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let again = recv(&manager, "READY=1 after the reload");
    signal(agent.pid(), libc::SIGSTOP);
    let status = home.status();
    signal(agent.pid(), libc::SIGCONT);
    assert!(again.starts_with("READY=1\n"), "{again:?}");
    let status = status.unwrap_or_else(|e| panic!("guard status: {e:#}"));
    assert!(
        status.contains("syn_rate = 33"),
        "READY=1 after the reload came before the reloaded limit was live:\n{status}"
    );

    let finished = agent.stop().expect("stop the agent");
    assert_eq!(recv(&manager, "STOPPING=1"), "STOPPING=1");
    finished
        .ensure_success("guard run")
        .expect("a clean exit after SIGINT");
    // Nothing after STOPPING=1.
    manager
        .set_nonblocking(true)
        .expect("a non-blocking socket");
    let mut buf = [0u8; 64];
    assert!(
        manager.recv(&mut buf).is_err(),
        "a notification after STOPPING=1"
    );
}
