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
