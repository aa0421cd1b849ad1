//! The real agent (`guard run`) as a child process inside a lab namespace, for the agent's
//! end-to-end tests and measurements.
//!
//! Everything an agent touches lives in throwaway places removed on drop: its pins under a
//! unique `/sys/fs/bpf/gd-test-<pid>-<n>` (unloaded through the agent's own `unload`, so the
//! links are detached too), and its control socket, audit log and config file in a temp dir.
//! Each agent runs in a namespace of its own, so all of them can serve metrics on the same
//! loopback address without colliding.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use guard_common::client::Connection;
use guard_common::proto::{Request, Response};
use guard_user::datapath::{self, GuardMaps};
use guard_user::paths::PinLayout;

use crate::netns::Netns;
use crate::process::{describe, run_checked, ChildGuard, Finished};
use crate::tools::TempDir;

/// Where every agent serves metrics, inside its own namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:9940";

/// What `guard run` logs once its control socket and metrics listener are up.
pub const READY_LINE: &str = "guard running on";

/// Environment variable that overrides where the `guard` binary is looked for.
pub const GUARD_BIN_ENV: &str = "GUARD_BIN";

/// The `guard` binary of this workspace: `$GUARD_BIN`, else `target/<profile>/guard` beside
/// the running test executable. It is (re)built with `cargo build -p guard-user` when missing
/// or older than the test executable, which links the same guard-user library: an older binary
/// would test yesterday's agent. Built at most once per process.
pub fn guard_bin() -> Result<PathBuf> {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    if let Some(bin) = BIN.get() {
        return Ok(bin.clone());
    }
    let bin = locate_guard_bin()?;
    Ok(BIN.get_or_init(|| bin).clone())
}

fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn locate_guard_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(GUARD_BIN_ENV) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "${GUARD_BIN_ENV} points to {}, which is not a file",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    // Test binaries live in target/<profile>/deps/, binaries in target/<profile>/.
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().context("deps/ has no parent")?
    } else {
        dir
    };
    let bin = profile_dir.join("guard");
    let fresh = match (mtime(&bin), mtime(&exe)) {
        (Some(b), Some(e)) => b >= e,
        _ => false,
    };
    if !fresh {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "guard-user",
            "--bin",
            "guard",
            "--manifest-path",
        ])
        .arg(&manifest);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        run_checked(&mut cmd).context("cannot build the guard binary")?;
    }
    ensure!(
        bin.is_file(),
        "{} is missing after `cargo build -p guard-user`; set ${GUARD_BIN_ENV}",
        bin.display()
    );
    Ok(bin)
}

/// A unique pin root under bpffs, unloaded (links detached, pins removed) on drop.
#[derive(Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = Path::new(guard_user::paths::BPFFS_ROOT).join(format!(
            "gd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        ensure!(
            !root.exists(),
            "{} already exists: a leftover of an earlier run; remove it with `guard unload \
             --pin-dir {0}`",
            root.display()
        );
        datapath::check_bpffs(&root).context("the agent tests pin under bpffs")?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> PinLayout {
        PinLayout::new(&self.root)
    }

    /// The pinned maps, opened the way `guard status` opens them.
    pub fn maps(&self) -> Result<GuardMaps> {
        GuardMaps::open_pinned(&self.layout())
            .with_context(|| format!("open the maps pinned under {}", self.root.display()))
    }

    /// Every file and folder under the root (the root itself excluded); empty when the
    /// root does not exist.
    pub fn entries(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.filter_map(Result::ok) {
                let p = e.path();
                out.push(p.clone());
                if p.is_dir() {
                    walk(&p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = datapath::unload(&self.layout()) {
            eprintln!("warning: cannot unload {}: {e}", self.root.display());
        }
        // Whatever unload did not know about (a half-written layout) goes too.
        if self.root.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.root) {
                eprintln!("warning: cannot remove {}: {e}", self.root.display());
            }
        }
    }
}

/// How to start `guard run`.
#[derive(Debug, Clone)]
pub struct RunOpts {
    pub iface: String,
    pub port: u16,
    /// `--attach`: xdp, xdp-native, xdp-generic or tc; `None` is the agent's default.
    pub attach: Option<String>,
    /// `--set key=value` live-config changes.
    pub sets: Vec<String>,
    /// A TOML config file's text, written into the agent's temp dir.
    pub config: Option<String>,
    /// `RUST_LOG` for the agent; `None` is its default (info).
    pub log: Option<String>,
    /// Leave `RUST_LOG` unset, so guard.toml's `log_level` decides (`log` is then ignored).
    pub no_rust_log: bool,
    /// Audit log path; `None` is the agent's temp dir.
    pub audit_log: Option<PathBuf>,
    /// Extra environment for the agent (`NOTIFY_SOCKET`, a stripped `PATH`), set last.
    pub envs: Vec<(String, String)>,
}

impl RunOpts {
    pub fn new(iface: &str, port: u16) -> Self {
        Self {
            iface: iface.to_string(),
            port,
            attach: None,
            sets: Vec::new(),
            config: None,
            log: None,
            no_rust_log: false,
            audit_log: None,
            envs: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn attach(mut self, mode: &str) -> Self {
        self.attach = Some(mode.to_string());
        self
    }

    pub fn set(mut self, assignment: &str) -> Self {
        self.sets.push(assignment.to_string());
        self
    }

    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    pub fn log(mut self, filter: &str) -> Self {
        self.log = Some(filter.to_string());
        self
    }

    pub fn audit_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit_log = Some(path.into());
        self
    }
}

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
            pins: Pins::new()?,
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
        let mut cmd = ns.command(&self.bin);
        cmd.args(["run", "-i", &opts.iface, "-p", &opts.port.to_string()])
            .arg("--pin-dir")
            .arg(self.pins.root())
            .arg("--control-socket")
            .arg(self.socket())
            .args(["--metrics-addr", METRICS_ADDR])
            .arg("--audit-log")
            .arg(opts.audit_log.clone().unwrap_or_else(|| self.audit_log()));
        if let Some(mode) = &opts.attach {
            cmd.args(["--attach", mode]);
        }
        for s in &opts.sets {
            cmd.args(["--set", s]);
        }
        if let Some(toml) = &opts.config {
            let path = self.dir.path().join("guard.toml");
            std::fs::write(&path, toml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            cmd.arg("--config").arg(path);
        }
        // The agent reads only its own options: keep a developer's GUARD_* settings out.
        crate::process::without_guard_env(&mut cmd);
        if opts.no_rust_log {
            cmd.env_remove("RUST_LOG");
        } else {
            cmd.env("RUST_LOG", opts.log.as_deref().unwrap_or("info"));
        }
        // A NOTIFY_SOCKET of the developer's session (or of a unit running the tests) is not
        // the test's to receive; a test that wants one passes it in `envs`.
        cmd.env_remove("NOTIFY_SOCKET");
        for (key, value) in &opts.envs {
            cmd.env(key, value);
        }
        // `nsenter --net` execs the agent in place (no fork without --pid), so the child's
        // PID is the agent's own: signals and /proc/PID reach the agent itself.
        let child = ChildGuard::spawn("guard run", &mut cmd)?.with_grace(Duration::from_secs(10));
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

/// Splits an HTTP/1.x response into its status code and body, checking the body against
/// `Content-Length` when there is one.
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = std::str::from_utf8(raw).context("the response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                let want: usize = value.trim().parse().context("bad Content-Length")?;
                ensure!(
                    body.len() == want,
                    "body of {} bytes, Content-Length {want}",
                    body.len()
                );
            }
        }
    }
    Ok((status, body.to_string()))
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Sorted by label name.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` page: the families it declares (`# TYPE`) and its samples.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Family name → type.
    pub families: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format (what the prometheus crate writes: no timestamps, label values
    /// without embedded `}`), enough to compare counters.
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest
                    .split_once(' ')
                    .with_context(|| format!("bad TYPE line {line:?}"))?;
                out.families.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad sample line {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .with_context(|| format!("bad value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .with_context(|| format!("unclosed labels in {line:?}"))?;
                    (name.to_string(), parse_labels(body)?)
                }
            };
            out.samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Ok(out)
    }

    /// The sample `name{labels}` (labels in any order, all of them given).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like `value`, but a missing series is an error naming it.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.value(name, labels)
            .with_context(|| format!("no series {name}{labels:?} in the scrape"))
    }

    /// The `q` quantile of histogram `name`, interpolated within its bucket the way PromQL's
    /// `histogram_quantile` does. `None` without observations.
    pub fn histogram_quantile(&self, name: &str, q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.name == bucket)
            .filter_map(|s| {
                let le = s.labels.iter().find(|(k, _)| k == "le")?;
                let le = if le.1 == "+Inf" {
                    f64::INFINITY
                } else {
                    le.1.parse().ok()?
                };
                Some((le, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (le, count) in &buckets {
            if *count >= rank {
                if le.is_infinite() {
                    // Past the last finite bound: that bound is all that can be said.
                    return Some(lower);
                }
                let inside = count - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            lower = *le;
            below = *count;
        }
        None
    }
}

fn parse_labels(body: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .with_context(|| format!("bad labels {body:?}"))?;
        // The value ends at the first quote not escaped by a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.with_context(|| format!("unterminated label value in {body:?}"))?;
        out.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    out.sort();
    Ok(out)
}

/// `promtool check metrics` on `text` (stdin): the exposition must parse and pass its lint.
pub fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start promtool (install the prometheus package)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())
        .context("write to promtool")?;
    let out = child.wait_with_output().context("wait for promtool")?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The link and program ids of a pinned link (`bpftool link show pinned PATH`).
pub fn pinned_link_ids(path: &Path) -> Result<(u64, u64)> {
    let out = run_checked(
        Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(path),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bpftool printed {out:?}"))?;
    let id = v["id"]
        .as_u64()
        .with_context(|| format!("no link id in {out}"))?;
    let prog = v["prog_id"]
        .as_u64()
        .with_context(|| format!("no prog id in {out}"))?;
    Ok((id, prog))
}

/// Whether a BPF link with this id still exists anywhere in the kernel.
pub fn link_exists(id: u64) -> bool {
    bpf_object_exists("link", id)
}

/// Whether a BPF program with this id is still loaded. The kernel frees a program after its
/// last reference is gone, with a short deferral: poll this rather than asserting at once.
pub fn prog_exists(id: u64) -> bool {
    bpf_object_exists("prog", id)
}

fn bpf_object_exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The XDP program `ip link` reports on `iface` in `ns`: `Some((mode, prog id))` with mode
/// `xdp` (native), `xdpgeneric` or `xdpoffload`, `None` when there is none.
pub fn xdp_prog(ns: &Netns, iface: &str) -> Result<Option<(String, u64)>> {
    let out = ns.ip(&["link", "show", "dev", iface])?;
    Ok(parse_xdp_prog(&out))
}

/// Reads the XDP mode and program id out of `ip link show` output: the mode is the flag word
/// right after `mtu N` on the first line (the `prog/xdp` line says `xdp` in every mode), the
/// id follows `prog/xdp id`.
pub fn parse_xdp_prog(ip_link: &str) -> Option<(String, u64)> {
    let words: Vec<&str> = ip_link.split_whitespace().collect();
    let mode = words
        .windows(3)
        .find(|w| w[0] == "mtu")
        .map(|w| w[2])
        .filter(|m| m.starts_with("xdp"))?;
    let id = words
        .windows(3)
        .find(|w| w[0].starts_with("prog/xdp") && w[1] == "id")
        .and_then(|w| w[2].parse().ok())?;
    Some((mode.to_string(), id))
}

/// A TCP listener inside a namespace that accepts and closes connections on a thread until
/// dropped, so a connect succeeds exactly when its SYN got through and the backlog never
/// fills.
pub struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn new(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        crate::wire::ensure_lab_ip(addr.ip())?;
        let listener = ns
            .run_in(|| TcpListener::bind(addr))?
            .with_context(|| format!("listen on {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections in all were accepted and every one of them is closed on
    /// the server side of `ns` (nothing but the listener and TIME-WAIT left on its port). A test
    /// that blocks a client right after connecting must wait for this: the server's FIN would
    /// otherwise go out after the block, and each retransmission of it draws an ACK from the
    /// client that the block drops and counts.
    pub fn wait_closed(&self, ns: &Netns, n: u32) -> Result<()> {
        let port = self.addr.port();
        wait_for(
            "accepted connections to close",
            Duration::from_secs(15),
            || {
                if self.accepted() < n {
                    return Ok(None);
                }
                let filter = format!("( sport = :{port} )");
                let open = ns.exec(&["ss", "-Htan", "state", "all", &filter])?;
                let busy = open
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    // TIME-WAIT: both FINs were acknowledged; nothing more comes from the client.
                    .any(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"));
                Ok((!busy).then_some(()))
            },
        )
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends exactly `count` TCP SYNs with hping3 from `ns`'s own address to `dst:port`, `rate`
/// per second, and waits for it to finish; returns how many hping3 says it sent. Bounded by the
/// count and by a timeout of the nominal duration plus slack: unlike `hping3_syn_flood`, whose
/// timeout is the nominal duration itself, a late start cannot cut off the last SYNs, so a
/// test can count every one of them.
pub fn hping3_syns(ns: &Netns, dst: IpAddr, port: u16, count: u32, rate: u32) -> Result<u64> {
    crate::wire::ensure_lab_ip(dst)?;
    ensure!(dst.is_ipv4(), "hping3 has no IPv6 support: {dst}");
    ensure!(port != 0, "port 0 is not a target");
    ensure!(
        (1..=100_000).contains(&count) && (1..=100_000).contains(&rate),
        "count {count} and rate {rate}/s must be 1..=100000"
    );
    let secs = count.div_ceil(rate) + 5;
    let mut cmd = ns.command("timeout");
    cmd.args(["-s", "INT", "-k", "2", &secs.to_string()])
        .args(["hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-i", &format!("u{}", 1_000_000 / rate)])
        .args(["-c", &count.to_string(), &dst.to_string()]);
    let done = ChildGuard::spawn("hping3", &mut cmd)?
        .wait_timeout(Duration::from_secs(u64::from(secs) + 5))?;
    // hping3 exits 1 when nothing answered, which is the point when SYNs are dropped: its
    // statistics line is what tells whether it ran.
    let output = format!("{}{}", done.stdout, done.stderr);
    crate::tools::parse_hping3_sent(&output)
        .with_context(|| format!("hping3 reported no statistics ({}): {output}", done.status))
}

/// How many of `n` sequential TCP connects from `ns` to `to` completed, each given
/// `timeout` (a dropped SYN shows up as a timeout: the kernel's first retransmission comes
/// after 1 s, so a timeout of 1 s or less means "the first SYN was lost").
pub fn connects(ns: &Netns, to: SocketAddr, n: u32, timeout: Duration) -> Result<u32> {
    crate::wire::ensure_lab_ip(to.ip())?;
    ns.run_in(|| {
        (0..n)
            .filter(|_| TcpStream::connect_timeout(&to, timeout).is_ok())
            .count() as u32
    })
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`; `what` names the wait
/// in the error. For settling, never for asserting how long something took.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up waiting for {what} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Convenience: the unified address of an IP as the agent's prefixes print it.
pub fn host_prefix(ip: IpAddr) -> String {
    guard_common::addr::Prefix::host(ip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_parsing() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n\
                    a_total{verdict=\"drop\",reason=\"blocked\"} 7\n\
                    a_total{reason=\"x\",verdict=\"pass\"} 1\n\
                    # TYPE h histogram\n\
                    h_bucket{le=\"0.001\"} 2\nh_bucket{le=\"0.01\"} 4\nh_bucket{le=\"+Inf\"} 4\n\
                    h_sum 0.01\nh_count 4\nplain 3.5\nesc{v=\"a\\\"b\"} 1\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.families["a_total"], "counter");
        assert_eq!(s.families["h"], "histogram");
        assert_eq!(
            s.value("a_total", &[("reason", "blocked"), ("verdict", "drop")]),
            Some(7.0)
        );
        assert_eq!(s.value("a_total", &[("verdict", "drop")]), None);
        assert_eq!(s.value("plain", &[]), Some(3.5));
        assert_eq!(s.value("esc", &[("v", "a\"b")]), Some(1.0));
        // Half the observations are in the first bucket: the median is its upper bound.
        assert!((s.histogram_quantile("h", 0.5).unwrap() - 0.001).abs() < 1e-12);
        // 3 of 4: halfway into the second bucket.
        let q75 = s.histogram_quantile("h", 0.75).unwrap();
        assert!((q75 - 0.0055).abs() < 1e-12, "{q75}");
        assert_eq!(s.histogram_quantile("nothing", 0.5), None);
        assert!(Scrape::parse("bad{x=\"1\" 2").is_err());
        assert!(Scrape::parse("novalue").is_err());
    }

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello";
        assert_eq!(parse_http_response(ok).unwrap(), (200, "hello".to_string()));
        let close_delimited = b"HTTP/1.0 404 Not Found\r\n\r\n";
        assert_eq!(
            parse_http_response(close_delimited).unwrap(),
            (404, String::new())
        );
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_http_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn ip_link_xdp_parsing() {
        let native = "3: eth0@eth1: <BROADCAST,UP> mtu 1500 xdp qdisc noqueue\n    \
                      link/ether 2e:c2:6e:13:8e:00 brd ff:ff:ff:ff:ff:ff\n    \
                      prog/xdp id 195 name guard_xdp tag 47a3ffb65560fff3 jited\n";
        assert_eq!(parse_xdp_prog(native), Some(("xdp".into(), 195)));
        let generic = "3: eth0@eth1: <UP> mtu 1500 xdpgeneric qdisc noqueue state UP\n    \
                       prog/xdp id 12 name guard_xdp";
        assert_eq!(parse_xdp_prog(generic), Some(("xdpgeneric".into(), 12)));
        assert_eq!(parse_xdp_prog("3: eth0: <UP> mtu 1500 qdisc noqueue"), None);
        // A flag without a program line (or the reverse) is not an attachment.
        assert_eq!(
            parse_xdp_prog("3: eth0: <UP> mtu 1500 xdp qdisc noqueue"),
            None
        );
    }
}
