//! In-kernel connection tracking end to end: the agent in a server
//! namespace, a real TCP server in a cgroup of its own, a client namespace
//! opening and ending thousands of connections in every way TCP ends them.
//! Root only; run serially (`cargo xtask test`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use guard_common::stats::Stat;
use guard_tests::{ChildGuard, Netns};
use guard_user::{
    datapath::{cgroup2_mount, GuardMaps},
    paths::PinLayout,
};

const PORT: u16 = 9000;

/// A cgroup v2 folder for the test's server, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(tag: &str) -> Result<Self> {
        let root = cgroup2_mount().context("no cgroup2 mount on this machine")?;
        let path = root.join(format!("gd-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The server is gone by now (its guard drops first); rmdir fails
        // while a process is still inside, so retry briefly.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
    }
}

/// Pins of the agent under test, unloaded on drop even if the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = guard_user::datapath::unload(&PinLayout::new(&self.0));
    }
}

fn guard_bin() -> PathBuf {
    // tests run from target/<profile>/deps/
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("guard")
}

const SERVER: &str = r#"
import socket, struct, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.0.1", int(sys.argv[1])))
s.listen(4096)
print("ready", file=sys.stderr, flush=True)
def handle(c):
    try:
        m = c.recv(1)
        if m == b"c":
            c.close()
        elif m == b"r":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        else:
            while c.recv(1024):
                pass
            c.close()
    except OSError:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

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

struct Setup {
    server_ns: Netns,
    client_ns: Netns,
    cgroup: Cgroup,
    pins: Pins,
    socket: PathBuf,
    _agent: ChildGuard,
}

impl Setup {
    fn new(tag: &str, extra: &[&str]) -> Result<Self> {
        let server_ns = Netns::new("csrv")?;
        let client_ns = Netns::new("ccli")?;
        server_ns.ip(&["link", "set", "lo", "up"])?;
        client_ns.ip(&["link", "set", "lo", "up"])?;
        server_ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client_ns.name(),
        ])?;
        server_ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
        client_ns.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"])?;
        server_ns.ip(&["link", "set", "eth0", "up"])?;
        client_ns.ip(&["link", "set", "eth0", "up"])?;
        let cgroup = Cgroup::new(tag)?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/gd-{tag}-{}", std::process::id()));
        let pins = Pins(pin_dir.clone());
        let socket = std::env::temp_dir().join(format!("gd-{tag}-{}.sock", std::process::id()));
        let mut cmd = server_ns.command(guard_bin());
        cmd.args([
            "run",
            "-i",
            "eth0",
            "-p",
            &PORT.to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--control-socket")
        .arg(&socket)
        .arg("--cgroup")
        .arg(&cgroup.0)
        .args(extra);
        let agent = ChildGuard::spawn("guard agent", &mut cmd)?;
        for _ in 0..100 {
            if socket.exists() && PinLayout::new(&pin_dir).sockops_link().exists() {
                return Ok(Self {
                    server_ns,
                    client_ns,
                    cgroup,
                    pins,
                    socket,
                    _agent: agent,
                });
            }
            sleep(Duration::from_millis(100));
        }
        bail!("the agent did not come up (no control socket or sockops link after 10 s)")
    }

    fn maps(&self) -> GuardMaps {
        GuardMaps::open_pinned(&PinLayout::new(&self.pins.0)).expect("open the agent's pins")
    }

    /// Starts the Python server inside the cgroup (joined before the
    /// listening socket exists, so every accepted socket belongs to it).
    fn server(&self) -> Result<ChildGuard> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} python3 -u -c '{}' {PORT}",
            self.cgroup.0.display(),
            self.server_ns.path().display(),
            SERVER.replace('\'', "'\"'\"'")
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let mut guard = ChildGuard::spawn("python server", &mut cmd)?;
        guard.wait_for_stderr("ready", Duration::from_secs(10))?;
        Ok(guard)
    }

    fn python(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = self.client_ns.command("python3");
        cmd.arg("-u").arg("-c").arg(script).args(args);
        cmd
    }

    fn stat(&self, stat: Stat) -> u64 {
        self.maps().stat(stat).expect("read a counter")
    }

    fn open_tracked(&self) -> u64 {
        self.maps()
            .connections()
            .expect("read CONNS")
            .iter()
            .map(|(_, n)| n)
            .sum()
    }
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
    let mut hold = setup
        .python(CLIENT_HOLD, &["50", &PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.take().context("stdout")?),
        &mut line,
    )?;
    assert_eq!(line.trim(), "held 50");
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
    let mut hold = setup
        .python(CLIENT_HOLD, &["5", &PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.take().context("stdout")?),
        &mut line,
    )?;
    assert_eq!(line.trim(), "held 5");
    sleep(Duration::from_millis(300));
    assert_eq!(setup.open_tracked(), 5);
    assert_eq!(
        try_one()?,
        "failed",
        "the sixth connection's SYNs die in XDP"
    );
    assert!(setup.stat(Stat::DropConnLimit) >= 1);

    // Raising the limit live lets it in without restarting anything.
    let status = Command::new(guard_bin())
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
