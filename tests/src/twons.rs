//! Two namespaces joined by a veth, a guard agent protecting port 9000 in
//! the server one, and a real Python TCP server inside a cgroup of its own:
//! the rig for tests of kernel-driven limits (connection tracking, adaptive
//! limits). Everything it creates is removed on drop.

use std::{ffi::OsStr, path::PathBuf, process::Command, thread::sleep, time::Duration};

use anyhow::{bail, Context as _, Result};
use guard_common::stats::Stat;
use guard_user::datapath::{cgroup2_mount, GuardMaps};

pub use crate::binaries::guard_bin;
pub use crate::cgroup::Cgroup;
use crate::launch::GuardRun;
use crate::pins::Pins;
use crate::tools::TempDir;
use crate::{ChildGuard, Netns};

pub const PORT: u16 = 9000;

/// The agent's audit log, in the set-up's temp dir.
const AUDIT_LOG: &str = "audit.jsonl";

/// A pod's cgroups as a container runtime lays them out: the pod's folder with one child per
/// container. The app's server runs in `app`, the agent in `sidecar`, in a cgroup namespace
/// rooted there (what a container sees).
pub struct PodCgroups {
    pub sidecar: Cgroup,
    // Dropped after its children.
    pub pod: Cgroup,
    /// Where the agent's mount namespace shows the host's cgroup2 root.
    pub host_mount: PathBuf,
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        // Only ever a mount point inside the agent's own mount namespace: empty here.
        let _ = std::fs::remove_dir(&self.host_mount);
    }
}

/// How the agent of a [`Setup`] sees cgroups.
pub enum AgentCgroup {
    /// `--cgroup` with the server's folder, as on a host.
    Server,
    /// Inside a pod sidecar: its own cgroup namespace (rooted at the sidecar's container
    /// cgroup) and mount namespace; with `--host-cgroup-mount` pointing at the host's tree
    /// when true, with the defaults when false (what a sidecar got before that option).
    Sidecar(bool),
}

const SERVER: &str = r#"
import socket, struct, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.0.1", int(sys.argv[1])))
s.listen(int(sys.argv[2]))
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

pub struct Setup {
    pub server_ns: Netns,
    pub client_ns: Netns,
    pub cgroup: Cgroup,
    pub pins: Pins,
    pub socket: PathBuf,
    pub agent: ChildGuard,
    /// The control socket and the audit log.
    pub dir: TempDir,
    /// Last: the agent lives in the sidecar's cgroup until it is gone.
    pub pod: Option<PodCgroups>,
}

impl Setup {
    /// Starts the agent with `extra` arguments and waits until it serves.
    pub fn new(tag: &str, extra: &[&str]) -> Result<Self> {
        Self::with(tag, extra, AgentCgroup::Server)
    }

    /// A pod layout: the server in the pod's `app` container cgroup, the agent in its
    /// `sidecar` one, seeing only its own cgroup namespace at /sys/fs/cgroup and the host's
    /// cgroup2 root at [`PodCgroups::host_mount`].
    pub fn in_pod(tag: &str, host_cgroup_mount: bool) -> Result<Self> {
        Self::with(tag, &[], AgentCgroup::Sidecar(host_cgroup_mount))
    }

    fn with(tag: &str, extra: &[&str], how: AgentCgroup) -> Result<Self> {
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
        let pins = Pins::new(tag)?;
        let dir = TempDir::new(tag)?;
        let socket = dir.path().join("control.sock");
        let mut run =
            GuardRun::new("eth0", PORT, pins.root(), &socket).audit_log(dir.path().join(AUDIT_LOG));
        let guard = guard_bin()?;
        let (cgroup, pod, cmd) = match how {
            AgentCgroup::Server => {
                let cgroup = Cgroup::new(tag)?;
                run = run.cgroup(cgroup.path()).args(extra.iter().copied());
                (cgroup, None, server_ns.command(&guard))
            }
            AgentCgroup::Sidecar(pass_host_mount) => {
                let pod = Cgroup::new(tag)?;
                let app = Cgroup::under(&pod.0, "app")?;
                let sidecar = Cgroup::under(&pod.0, "sidecar")?;
                let host_mount =
                    std::env::temp_dir().join(format!("gd-{tag}-hostcg-{}", std::process::id()));
                std::fs::create_dir_all(&host_mount)?;
                if pass_host_mount {
                    run = run.args([OsStr::new("--host-cgroup-mount"), host_mount.as_os_str()]);
                }
                // Join the sidecar's cgroup, then take a cgroup namespace rooted there and a
                // private mount namespace: the host's tree stays visible only where a pod
                // spec would mount it, and the cgroup2 mount point shows the container's own
                // root (the host's mount is lifted first: the kernel refuses the same
                // filesystem twice on one mount point).
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(
                        r#"echo $$ > "$1/cgroup.procs" && shift && exec unshare --cgroup --mount --propagation private sh -c '{ [ "$2" = - ] || mount --bind "$1" "$2"; } && umount -l "$1" && mount -t cgroup2 none "$1" && shift 2 && exec "$@"' sh "$@""#,
                    )
                    .arg("sh")
                    .arg(&sidecar.0)
                    .arg(cgroup2_mount().context("no cgroup2 mount on this machine")?)
                    // Without the option the pod spec would not mount the host's tree either.
                    .arg(if pass_host_mount {
                        host_mount.as_os_str()
                    } else {
                        "-".as_ref()
                    })
                    .arg("nsenter")
                    .arg(format!("--net={}", server_ns.path().display()))
                    .arg(&guard);
                let pod = PodCgroups {
                    sidecar,
                    pod,
                    host_mount,
                };
                (app, Some(pod), cmd)
            }
        };
        let agent = run.spawn("guard agent", cmd)?;
        for _ in 0..100 {
            if socket.exists() && pins.layout().sockops_link().exists() {
                return Ok(Self {
                    server_ns,
                    client_ns,
                    cgroup,
                    pins,
                    socket,
                    agent,
                    dir,
                    pod,
                });
            }
            sleep(Duration::from_millis(100));
        }
        bail!(
            "the agent did not come up (no control socket or sockops link after 10 s): {}",
            agent.stderr_so_far().trim()
        )
    }

    /// Where the agent writes its audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join(AUDIT_LOG)
    }

    pub fn maps(&self) -> GuardMaps {
        self.pins.maps().expect("open the agent's pins")
    }

    /// Starts the Python server inside the cgroup (joined before the
    /// listening socket exists, so every accepted socket belongs to it).
    pub fn server(&self) -> Result<ChildGuard> {
        self.server_with_backlog(4096)
    }

    /// The server with a given listen backlog (1 overflows on purpose).
    pub fn server_with_backlog(&self, backlog: u32) -> Result<ChildGuard> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} python3 -u -c '{}' {PORT}",
            self.cgroup.0.display(),
            self.server_ns.path().display(),
            SERVER.replace('\'', "'\"'\"'")
        );
        let script = format!("{script} {backlog}");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let mut guard = ChildGuard::spawn("python server", &mut cmd)?;
        guard.wait_for_stderr("ready", Duration::from_secs(10))?;
        Ok(guard)
    }

    /// python3 running `script` in the client namespace.
    pub fn python(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = self.client_ns.command("python3");
        cmd.arg("-u").arg("-c").arg(script).args(args);
        cmd
    }

    pub fn stat(&self, stat: Stat) -> u64 {
        self.maps().stat(stat).expect("read a counter")
    }

    /// Open connections the kernel counts, all sources together.
    pub fn open_tracked(&self) -> u64 {
        self.maps()
            .connections()
            .expect("read CONNS")
            .iter()
            .map(|(_, n)| n)
            .sum()
    }
}
