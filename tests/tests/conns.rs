//! In-kernel connection tracking end to end: the agent in a server
//! namespace, a real TCP server in a cgroup of its own, a client namespace
//! opening and ending thousands of connections in every way TCP ends them.
//! Root only; run serially (`cargo xtask test`).

use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{Context as _, Result};
use guard_common::stats::Stat;
use guard_tests::raw_xdp::{pass_program, RawXdp};
use guard_tests::twons::{guard_bin, Setup, PORT};

/// Ends `n` connections per mode: server FIN, server RST, client FIN,
/// client RST, and connect-then-close without data. Prints how many
/// connections completed their handshake.
const CLIENT_CHURN: &str = r#"
import socket, struct, sys
n = int(sys.argv[1]); port = int(sys.argv[2])
made = 0
for mode in ["c", "r", "h", "x", "n"]:
    for _ in range(n):
        c = socket.create_connection(("198.18.0.1", port), timeout=5)
        made += 1
        try:
            if mode in "cr":
                c.sendall(mode.encode())
                try:
                    while c.recv(1024):
                        pass
                except OSError:
                    pass
            elif mode == "h":
                c.sendall(b"h")
            elif mode == "x":
                c.sendall(b"h")
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            c.close()
print(made, flush=True)
"#;

/// Opens `n` connections, holds them until stdin closes, then closes them.
const CLIENT_HOLD: &str = r#"
import socket, sys
n = int(sys.argv[1]); port = int(sys.argv[2])
held = [socket.create_connection(("198.18.0.1", port), timeout=5) for _ in range(n)]
for c in held:
    c.sendall(b"h")
print("held", len(held), flush=True)
sys.stdin.read()
"#;

/// One connection attempt with a short timeout: prints ok or failed.
const CLIENT_TRY: &str = r#"
import socket, sys
try:
    c = socket.create_connection(("198.18.0.1", int(sys.argv[1])), timeout=float(sys.argv[2]))
    c.sendall(b"h"); c.close(); print("ok")
except OSError:
    print("failed")
"#;

/// Opens `n` connections with every pure ACK it sends held back (an iptables rule in its
/// own namespace drops them), prints how many its kernel considers connected, then lifts
/// the rule and sends a byte on each: all their ACKs reach the server at once. Holds them
/// until stdin closes.
const CLIENT_WITHHELD: &str = r#"
import select, socket, subprocess, sys, time
n = int(sys.argv[1]); port = int(sys.argv[2])
rule = ["OUTPUT", "-p", "tcp", "--dport", str(port),
        "--tcp-flags", "SYN,ACK,FIN,RST,PSH", "ACK", "-j", "DROP"]
subprocess.check_call(["iptables", "-w", "-I"] + rule)
connected = []
try:
    pending = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("198.18.0.1", port))
        pending.append(s)
    deadline = time.time() + 4
    while pending and time.time() < deadline:
        _, ready, _ = select.select([], pending, [], 0.2)
        for s in ready:
            pending.remove(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected.append(s)
    print("connected", len(connected), flush=True)
    time.sleep(1)
finally:
    subprocess.check_call(["iptables", "-w", "-D"] + rule)
for s in connected:
    try:
        s.send(b"h")
    except OSError:
        pass
print("released", flush=True)
sys.stdin.read()
"#;

/// Starts a client holding `n` established connections until its stdin
/// closes; returns once they are all up.
fn hold_connections(setup: &Setup, n: usize) -> Result<std::process::Child> {
    let mut hold = setup
        .python(CLIENT_HOLD, &[&n.to_string(), &PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.take().context("stdout")?),
        &mut line,
    )?;
    anyhow::ensure!(line.trim() == format!("held {n}"), "client said {line:?}");
    Ok(hold)
}

#[test]
fn connection_counts_never_drift_under_churn() -> Result<()> {
    if !guard_tests::require_root("connection_counts_never_drift_under_churn") {
        return Ok(());
    }
    // The per-source SYN cap would throttle one client opening 2000
    // connections; this test is about counting, so it is off.
    let setup = Setup::new("churn", &["--set", "syn_burst=0"])?;
    let server = setup.server()?;
    let out = setup
        .python(CLIENT_CHURN, &["400", &PORT.to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    assert_eq!(made, 2000);

    // And connections that end because the server process dies with them
    // open: the kernel closes every socket of the process.
    let mut hold = hold_connections(&setup, 50)?;
    sleep(Duration::from_millis(500));
    assert_eq!(setup.open_tracked(), 50, "the held connections are counted");
    server.stop()?;
    drop(hold.stdin.take());
    hold.wait()?;

    // Closes are synchronous in the kernel; a short settle covers the
    // client side finishing its own closes.
    let mut open = u64::MAX;
    for _ in 0..50 {
        open = setup.open_tracked();
        if open == 0 && setup.stat(Stat::ConnOpened) == setup.stat(Stat::ConnClosed) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let opened = setup.stat(Stat::ConnOpened);
    let closed = setup.stat(Stat::ConnClosed);
    assert_eq!(open, 0, "no source keeps a count");
    assert_eq!(
        opened, closed,
        "every counted connection was uncounted exactly once"
    );
    assert_eq!(opened, 2050, "every connection was counted");
    assert_eq!(setup.stat(Stat::ConnUntracked), 0);
    Ok(())
}

#[test]
fn conn_limit_drops_syns_while_a_source_holds_its_maximum() -> Result<()> {
    if !guard_tests::require_root("conn_limit_drops_syns_while_a_source_holds_its_maximum") {
        return Ok(());
    }
    let setup = Setup::new("climit", &["--set", "conn_limit=5"])?;
    let _server = setup.server()?;
    let try_one = || -> Result<String> {
        let out = setup
            .python(CLIENT_TRY, &[&PORT.to_string(), "1.5"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(try_one()?, "ok", "under the limit");
    let mut hold = hold_connections(&setup, 5)?;
    sleep(Duration::from_millis(300));
    assert_eq!(setup.open_tracked(), 5);
    assert_eq!(
        try_one()?,
        "failed",
        "the sixth connection's SYNs die in XDP"
    );
    assert!(setup.stat(Stat::DropConnLimit) >= 1);

    // Raising the limit live lets it in without restarting anything.
    let status = Command::new(guard_bin().unwrap())
        .args(["config", "--set", "conn_limit=6", "--control-socket"])
        .arg(&setup.socket)
        .stdout(Stdio::null())
        .status()?;
    assert!(status.success());
    assert_eq!(try_one()?, "ok");

    // Closing the held ones frees the slots.
    drop(hold.stdin.take());
    hold.wait()?;
    for _ in 0..30 {
        if setup.open_tracked() == 0 {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert_eq!(setup.open_tracked(), 0);
    Ok(())
}

/// Established connections on the server's port, as the server's own kernel lists them.
fn established_at_server(setup: &Setup) -> Result<usize> {
    let filter = format!("( sport = :{PORT} )");
    let out = setup
        .server_ns
        .exec(&["ss", "-Htn", "state", "established", &filter])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Issue 24, finding 1: one address that withheld its ACKs and then released them got 30
/// connections with conn_limit = 5, cookies on or off. What a source holds now counts its
/// handshakes in flight (SYNs let through) and the replies to cookies it got admitted.
#[test]
fn withheld_acks_get_one_address_no_more_than_conn_limit_with_cookies_off_or_on() -> Result<()> {
    if !guard_tests::require_root(
        "withheld_acks_get_one_address_no_more_than_conn_limit_with_cookies_off_or_on",
    ) {
        return Ok(());
    }
    let modes: [(&str, &[&str]); 3] = [
        ("off", &[]),
        (
            "under-attack",
            // A budget of one: the first SYN takes it, the rest are answered with cookies.
            &[
                "--set",
                "syn_cookies=under-attack",
                "--set",
                "global_syn_rate=1",
                "--set",
                "global_syn_burst=1",
            ],
        ),
        ("always", &["--set", "syn_cookies=always"]),
    ];
    for (mode, extra) in modes {
        let mut args = vec!["--set", "conn_limit=5"];
        args.extend_from_slice(extra);
        let setup = Setup::new(&format!("withheld-{mode}"), &args)?;
        // A veth delivers the frames XDP sends back (the cookie SYN-ACKs) only to a peer
        // that runs XDP itself.
        let _peer_xdp = RawXdp::attach(&setup.client_ns, "eth0", "gd_pass", &pass_program())?;
        let _server = setup.server()?;
        let mut client = setup
            .python(CLIENT_WITHHELD, &["30", &PORT.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = std::io::BufReader::new(client.stdout.take().context("stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        let connected: usize = line
            .trim()
            .strip_prefix("connected ")
            .with_context(|| format!("{mode}: client said {line:?}"))?
            .parse()?;
        if mode == "off" {
            assert_eq!(connected, 5, "{mode}: only conn_limit SYNs were answered");
        }
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        anyhow::ensure!(line.trim() == "released", "{mode}: client said {line:?}");

        // Every admitted handshake completes (its charge taken back as it does); then the
        // refused ones keep retrying (SYNs, or data re-sent on a cookie) and get nowhere.
        let mut established = 0;
        for _ in 0..100 {
            established = established_at_server(&setup)?;
            if established >= 5 && setup.stat(Stat::HandshakeCompleted) >= 5 {
                break;
            }
            sleep(Duration::from_millis(100));
        }
        sleep(Duration::from_secs(3));
        established = established.max(established_at_server(&setup)?);
        assert_eq!(
            established, 5,
            "{mode}: one address, conn_limit connections"
        );
        assert_eq!(setup.open_tracked(), 5, "{mode}");
        assert_eq!(
            (
                setup.stat(Stat::HandshakeCharged),
                setup.stat(Stat::HandshakeCompleted)
            ),
            (5, 5),
            "{mode}: each admitted handshake charged once and taken back at establishment"
        );
        if mode == "off" {
            assert!(setup.stat(Stat::DropConnLimit) >= 25, "{mode}");
        } else {
            let seen: Vec<(&str, u64)> = Stat::ALL
                .iter()
                .map(|s| (s.name(), setup.stat(*s)))
                .filter(|(_, n)| *n != 0)
                .collect();
            assert!(
                setup.stat(Stat::CookieAckConnLimit) >= 25,
                "{mode}: {seen:?}"
            );
            assert_eq!(
                setup.stat(Stat::CookieAckValid),
                if mode == "always" { 5 } else { 4 },
                "{mode}: the first connection of under-attack took the budget, not a cookie"
            );
        }
        drop(client.stdin.take());
        client.wait()?;
    }
    Ok(())
}

/// Holds `n` connections from the client to the server in the pod's app container and
/// returns what the kernel counted for them.
fn counted_in_pod(setup: &Setup, n: usize) -> Result<u64> {
    let _server = setup.server()?;
    let mut hold = hold_connections(setup, n)?;
    sleep(Duration::from_millis(300));
    let counted = setup.open_tracked();
    drop(hold.stdin.take());
    hold.wait()?;
    Ok(counted)
}

#[test]
fn in_a_pod_sidecar_the_app_containers_connections_are_counted() -> Result<()> {
    if !guard_tests::require_root("in_a_pod_sidecar_the_app_containers_connections_are_counted") {
        return Ok(());
    }
    let setup = Setup::in_pod("podcg", true)?;
    assert_eq!(
        counted_in_pod(&setup, 7)?,
        7,
        "attached to the pod's cgroup, the sidecar counts the app container's sockets"
    );
    assert_eq!(setup.stat(Stat::ConnOpened), 7);
    Ok(())
}

/// What a sidecar counted before `host_cgroup_mount`: its cgroup namespace's root is its own
/// container, which holds none of the app's sockets. Kept as the control for the test above.
#[test]
fn in_a_pod_sidecar_its_own_cgroup_root_counts_nothing_of_the_app() -> Result<()> {
    if !guard_tests::require_root("in_a_pod_sidecar_its_own_cgroup_root_counts_nothing_of_the_app")
    {
        return Ok(());
    }
    let setup = Setup::in_pod("podcg0", false)?;
    assert_eq!(counted_in_pod(&setup, 7)?, 0);
    assert_eq!(setup.stat(Stat::ConnOpened), 0);
    Ok(())
}
