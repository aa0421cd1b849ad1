//! The real agent (`guard run`) as a child process inside a lab namespace, for the agent's
//! end-to-end tests and measurements.
//!
//! Everything an agent touches lives in throwaway places removed on drop: its pins under a
//! unique `/sys/fs/bpf/gd-test-<pid>-<n>` (unloaded through the agent's own `unload`, so the
//! links are detached too), and its control socket, audit log and config file in a temp dir.
//! Each agent runs in a namespace of its own, so all of them can serve metrics on the same
//! loopback address without colliding.
//!
//! Here: the home and the running agent; [`opts`] what a test asks for; [`metrics`] the
//! `/metrics` page; [`kernel`] what the kernel says of the agent's objects; [`traffic`]
//! connects and SYNs toward the protected port; [`reporter`] a control client running as
//! another uid.

mod kernel;
mod metrics;
mod opts;
pub mod reporter;
mod traffic;

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use guard_common::client::Connection;
use guard_common::proto::{Request, Response};

pub use crate::binaries::{guard_bin, GUARD_BIN_ENV};
pub use crate::launch::READY_LINE;
pub use crate::pins::Pins;
pub use kernel::{link_exists, parse_xdp_prog, pinned_link_ids, prog_exists, xdp_prog};
pub use metrics::{parse_http_response, promtool_check, Sample, Scrape};
pub use opts::RunOpts;
pub use traffic::{
    connects, host_prefix, hping3_syns, send_syns, settle, solo_netns, wait_for, Listener,
};

use crate::launch::GuardRun;
use crate::netns::Netns;
use crate::process::{describe, run_checked, ChildGuard, Finished};
use crate::tools::TempDir;

/// Where every agent serves metrics, inside its own namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9940";

/// What outlives one agent process: its pins and its files. Several agents can run one after
/// the other on the same home (a restart adopts the pins).
#[derive(Debug)]
pub struct AgentHome {
    // Field order is drop order: pins are unloaded before the files go.
    pins: Pins,
    dir: TempDir,
    bin: PathBuf,
}

impl AgentHome {
    pub fn new() -> Result<Self> {
        Self::with_bin(guard_bin()?)
    }

    /// A home whose agent and CLI are `bin` (e.g. the one unpacked from a dist tarball).
    pub fn with_bin(bin: PathBuf) -> Result<Self> {
        ensure!(bin.is_file(), "{} is not a file", bin.display());
        Ok(Self {
            bin,
            pins: Pins::new("test")?,
            dir: TempDir::new("agent")?,
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The audit log's records.
    pub fn audit(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.audit_log();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}")))
            .collect()
    }

    /// Audit records of `event` about `prefix`.
    pub fn audit_events(&self, event: &str, prefix: &str) -> Result<Vec<serde_json::Value>> {
        Ok(self
            .audit()?
            .into_iter()
            .filter(|r| r["event"] == event && r["prefix"] == prefix)
            .collect())
    }

    /// `guard ARGS...` on the host (pins and the socket are host paths), whatever its exit.
    pub fn cli_output(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).stdin(Stdio::null());
        let line = describe(&cmd);
        cmd.output().with_context(|| format!("cannot run `{line}`"))
    }

    /// `guard ARGS...`, which must succeed; its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new(&self.bin).args(args))
    }

    /// `guard SUBCOMMAND ARGS... --control-socket SOCK`.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--control-socket", path_str(&socket)?]);
        self.cli(&all)
    }

    /// A kernel verdict counter, summed over CPUs, from the pinned maps.
    pub fn stat(&self, stat: guard_common::stats::Stat) -> Result<u64> {
        Ok(self.pins.maps()?.stat(stat)?)
    }

    /// `guard status --pin-dir ROOT`.
    pub fn status(&self) -> Result<String> {
        self.cli(&["status", "--pin-dir", path_str(self.pins.root())?])
    }

    /// `guard unload --pin-dir ROOT`.
    pub fn unload(&self) -> Result<String> {
        self.cli(&["unload", "--pin-dir", path_str(self.pins.root())?])
    }

    /// Starts `guard run` inside `ns` and waits until it serves.
    pub fn start(&self, ns: &Netns, opts: &RunOpts) -> Result<Agent> {
        let mut agent = self.spawn(ns, opts)?;
        agent.wait_ready(Duration::from_secs(60))?;
        Ok(agent)
    }

    /// Starts `guard run` inside `ns` without waiting for it (for tests that watch the start
    /// itself); `Agent::wait_ready` waits.
    pub fn spawn(&self, ns: &Netns, opts: &RunOpts) -> Result<Agent> {
        let mut run = GuardRun::new(&opts.iface, opts.port, self.pins.root(), &self.socket())
            .metrics_addr(METRICS_ADDR)
            .audit_log(opts.audit_log.clone().unwrap_or_else(|| self.audit_log()))
            .sets(&opts.sets)
            .log(opts.log.clone());
        run.attach.clone_from(&opts.attach);
        run.envs.clone_from(&opts.envs);
        if let Some(toml) = &opts.config {
            let path = self.dir.path().join("guard.toml");
            std::fs::write(&path, toml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            run = run.config(path);
        }
        // `nsenter --net` execs the agent in place (no fork without --pid), so the child's
        // PID is the agent's own: signals and /proc/PID reach the agent itself.
        let child = run
            .spawn("guard run", ns.command(&self.bin))?
            .with_grace(Duration::from_secs(10));
        Ok(Agent {
            child: Some(child),
            ns: ns.path().to_path_buf(),
        })
    }

    /// One request over a fresh control connection.
    pub fn call(&self, req: Request) -> Result<Response> {
        block_on(async {
            let mut conn = Connection::connect(self.socket(), "guard-tests")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            conn.call(req).await.map_err(|e| anyhow::anyhow!("{e}"))
        })
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Runs a future on a fresh current-thread runtime (the tests themselves are synchronous).
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(fut)
}

/// A running `guard run`; dropping it stops it (SIGINT, then SIGKILL). Stopping leaves the
/// program attached and pinned, as the real agent does: the `AgentHome` unloads.
pub struct Agent {
    child: Option<ChildGuard>,
    ns: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::pid)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.child
            .as_ref()
            .map(ChildGuard::stderr_so_far)
            .unwrap_or_default()
    }

    /// Waits until it logs that it serves (`READY_LINE`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.child
            .as_mut()
            .context("agent already stopped")?
            .wait_for_stderr(READY_LINE, timeout)
    }

    pub fn is_running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            Some(c) => c.is_running(),
            None => Ok(false),
        }
    }

    /// `kill -9`: no chance to clean anything up, as after a crash or an OOM kill.
    pub fn kill9(mut self) -> Result<Finished> {
        let child = self.child.take().context("agent already stopped")?;
        let pid = libc::pid_t::try_from(child.pid()).context("pid out of range")?;
        // SAFETY: the PID of our own child, not reaped yet (the guard reaps it below), so it
        // cannot have been recycled for another process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        child.wait_timeout(Duration::from_secs(10))
    }

    /// SIGHUP: re-read the config file, reopen the audit log.
    pub fn hup(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        ensure!(pid > 0, "agent already stopped");
        // SAFETY: the PID of our own running child, not reaped yet (the guard reaps it), so
        // it cannot have been recycled for another process.
        let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
        ensure!(
            rc == 0,
            "kill -HUP {pid}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// A graceful stop (SIGINT, as SIGTERM would be).
    pub fn stop(mut self) -> Result<Finished> {
        self.child.take().context("agent already stopped")?.stop()
    }

    /// Resident memory in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))
    }

    /// The text of `/metrics`, fetched from inside the agent's namespace.
    pub fn scrape_text(&self) -> Result<String> {
        let (status, body) = self.http_get("/metrics")?;
        ensure!(status == 200, "GET /metrics answered {status}: {body}");
        Ok(body)
    }

    /// `GET path` on the agent's metrics listener, from a thread inside its namespace (no
    /// HTTP client needed on the machine); the status code and the body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let file =
            std::fs::File::open(&self.ns).with_context(|| format!("open {}", self.ns.display()))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {METRICS_ADDR}\r\n\r\n");
        let raw = std::thread::scope(|s| {
            s.spawn(|| -> Result<Vec<u8>> {
                use std::io::Read as _;
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on a valid namespace fd; it moves only this thread, which ends
                // with the request.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("enter the namespace");
                }
                let addr: SocketAddr = METRICS_ADDR.parse().expect("a literal address");
                let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .with_context(|| format!("connect to {addr}"))?;
                conn.set_read_timeout(Some(Duration::from_secs(60)))?;
                conn.write_all(request.as_bytes())?;
                // HTTP/1.0: the agent closes after the response, so EOF ends the body.
                let mut raw = Vec::new();
                conn.read_to_end(&mut raw).context("read the response")?;
                Ok(raw)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
        })?;
        parse_http_response(&raw)
    }

    /// `/metrics`, parsed.
    pub fn scrape(&self) -> Result<Scrape> {
        Scrape::parse(&self.scrape_text()?)
    }
}
