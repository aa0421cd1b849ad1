//! The guarded service inside a lab: the demo app and the agent in the server namespace,
//! well-behaved clients in the legit namespace, attack tools in the attacker namespace, and the
//! measurements around them (kernel counters, agent metrics, audit log, server-core CPU, a
//! timeline of legit connects).
//!
//! `cargo xtask demo` drives it, and so do the end-to-end tests: tests/tests/e2e.rs includes
//! this file by path, so the tests assert on exactly the stack the demo shows. It therefore
//! only uses crates both have (the lab toolkit `guard_tests`, `guard_user`, `guard_common`,
//! `anyhow`, `libc`, `serde_json`).
//!
//! Everything started here is owned by a guard: `Stack` stops the app and the agent, unloads
//! the program and removes its pins, then deletes the namespaces, on every path out (error,
//! panic, Ctrl-C). Only processes it started are ever signalled, by PID.

// Two crates compile this file and each uses its own part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use guard_common::stats::Stat;
use guard_tests::lab::{self, Lab, SERVER_MAC, SERVER_V4};
use guard_tests::measure::{allowed_cpus, proc_cpu_ticks, server_and_attacker_cpus};
use guard_tests::process::run_checked;
use guard_tests::report::{ConnFloodReport, ProbeReport, SseReport, WsChatReport};
use guard_tests::tools::{paced_syn_flood, trafgen_flat_out, Flood, SynFlood, TempDir};
use guard_tests::twons::Cgroup;
use guard_tests::{ChildGuard, ClientRun, CpuSampler, LabClient};
use guard_user::datapath::{self, GuardMaps};
use guard_user::paths::PinLayout;
use serde::de::DeserializeOwned;

/// The port the demo app serves and guard protects.
pub const APP_PORT: u16 = 8080;
/// The agent's metrics, inside the server namespace.
pub const METRICS_PORT: u16 = 9940;
/// Legit sources: the WebSocket chat clients, the SSE subscribers and the SYN-loss probe each
/// get their own address (several "users"); the timeline sampler uses the namespace's main
/// address, 198.18.0.2. Each stays well under the default per-source SYN cap (20/s).
pub const LEGIT_CHAT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
pub const LEGIT_SSE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 13);
pub const LEGIT_PROBE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

/// The switch's end of the server's veth pair (named by the lab toolkit).
const SERVER_PEER: &str = "p-srv";

/// Set by the SIGINT/SIGTERM handler of the demo and the bench; every wait checks it, so an
/// interrupted run unwinds through the guards (floods stopped, guard unloaded, namespaces
/// deleted) instead of waiting for its scenarios to end.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fails once Ctrl-C was pressed; called between steps.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`].
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Sleeps `d` in short slices; fails as soon as the run is interrupted.
pub fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// `lab-client` arguments from string slices.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The workspace root: both xtask and the tests crate sit one level below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("a workspace member lives inside the workspace")
        .to_path_buf()
}

/// The programs the stack runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The agent and its CLI.
    pub guard: PathBuf,
    /// guard-common's demo app (examples/demo.rs).
    pub demo: PathBuf,
    pub lab_client: PathBuf,
}

impl Binaries {
    /// Builds the agent, lab-client and the demo app with cargo and takes their paths from
    /// cargo's own artifact messages, so a custom target dir or profile cannot mislead it.
    pub fn build(release: bool) -> Result<Self> {
        let profile: &[&str] = if release { &["--release"] } else { &[] };
        let mut found = artifacts(
            cargo()
                .args(["build", "-p", "guard-user", "-p", "guard-tests", "--bins"])
                .args(profile),
        )?;
        found.extend(artifacts(
            cargo()
                .args([
                    "build",
                    "-p",
                    "guard-common",
                    "--example",
                    "demo",
                    "--features",
                    "warp",
                ])
                .args(profile),
        )?);
        let take = |name: &str| {
            found
                .get(name)
                .cloned()
                .with_context(|| format!("cargo built no executable named {name}"))
        };
        Ok(Self {
            guard: take("guard")?,
            demo: take("demo")?,
            lab_client: take("lab-client")?,
        })
    }
}

/// Runs a cargo build with JSON messages on stdout (diagnostics still rendered on stderr) and
/// returns executable paths by target name.
pub fn artifacts(cmd: &mut Command) -> Result<BTreeMap<String, PathBuf>> {
    cmd.current_dir(workspace_root())
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let line = guard_tests::process::describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    ensure!(out.status.success(), "`{line}` failed ({})", out.status);
    let mut found = BTreeMap::new();
    for msg in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(msg) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(found)
}

/// Which cores the server side and the attacker use. With at least two usable cores the
/// server (app, agent, its NAPI thread, legit clients) shares one and the attack tools get
/// another, as in shared/LAB.md: otherwise the flood tool itself is the bottleneck and every
/// mode looks alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus {
    pub server: Option<usize>,
    pub attacker: Option<usize>,
}

impl Cpus {
    /// A server core and an attacker core, or no pinning on a one-core machine.
    ///
    /// The attacker gets CPU 0 where it may (`measure::server_and_attacker_cpus`): trafgen
    /// sends from CPU 0 whatever it is pinned to, so the flood tool never lands on the server's
    /// core. Fixed-rate floods use the evenly paced sender (`Stack::syn_flood`): trafgen's
    /// `-b` sends each second's SYNs in one burst at full speed, which from another core
    /// overflowed the server veth's 256-frame ring and lost a third of a 3000/s flood before
    /// XDP saw it.
    pub fn detect() -> Self {
        let allowed = allowed_cpus();
        if let Some((server, attacker)) = server_and_attacker_cpus(&allowed) {
            return Self {
                server: Some(server),
                attacker: Some(attacker),
            };
        }
        match allowed.as_slice() {
            [s, a, ..] => Self {
                server: Some(*s),
                attacker: Some(*a),
            },
            _ => Self {
                server: None,
                attacker: None,
            },
        }
    }

    /// The core whose busy share is "server CPU" (cpu0 when nothing is pinned).
    pub fn measured(&self) -> usize {
        self.server.unwrap_or(0)
    }
}

/// Pins the calling thread to `cpu`.
fn pin_this_thread(cpu: usize) -> Result<()> {
    // SAFETY: as above; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot pin a thread to cpu {cpu}"));
        }
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot enter {}", path.display()));
    }
    Ok(())
}

/// A pin folder of its own under bpffs, unloaded and removed on drop, so a failed run never
/// leaves a program attached or maps pinned.
#[derive(Debug)]
struct PinDir {
    path: PathBuf,
}

impl PinDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        // "gd-" like the namespaces: leftovers are easy to spot and tell apart by PID.
        Self {
            path: PathBuf::from(guard_user::paths::BPFFS_ROOT).join(format!(
                "gd-stack-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )),
        }
    }

    /// Detaches whatever this folder's pins hold and removes them.
    fn unload(&self) -> Result<()> {
        datapath::unload(&PinLayout::new(&self.path))
            .with_context(|| format!("cannot unload the pins under {}", self.path.display()))?;
        Ok(())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = self.unload() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Kernel verdict counters, by their `guard status` names.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters(pub BTreeMap<String, u64>);

impl Counters {
    pub fn get(&self, stat: Stat) -> u64 {
        self.0.get(stat.name()).copied().unwrap_or(0)
    }

    /// What grew since `before`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(before.0.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        )
    }

    /// Every packet the program dropped, whatever the reason.
    pub fn drops(&self) -> u64 {
        Stat::ALL
            .iter()
            .filter(|s| matches!(s.labels(), Some(("drop", _))))
            .map(|s| self.get(*s))
            .sum()
    }

    /// The non-zero drop reasons, e.g. "source_rate 81234, blocked 12".
    pub fn drop_breakdown(&self) -> String {
        let parts: Vec<String> = Stat::ALL
            .iter()
            .filter_map(|s| match s.labels() {
                Some(("drop", reason)) if self.get(*s) > 0 => {
                    Some(format!("{reason} {}", self.get(*s)))
                }
                _ => None,
            })
            .collect();
        parts.join(", ")
    }
}

/// A value of an unlabelled series in Prometheus text, e.g. `guard_block_latency_seconds_sum`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// A plain HTTP/1.0 GET from inside `ns`; returns the body of a 200 answer.
pub fn http_get_in(ns: &guard_tests::Netns, addr: SocketAddr, path: &str) -> Result<String> {
    let text = ns.run_in(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("cannot connect to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .with_context(|| format!("reading http://{addr}{path}"))?;
        Ok(text)
    })??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("http://{addr}{path}: no HTTP response"))?;
    ensure!(
        head.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "http://{addr}{path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_string())
}

/// How the demo app runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AppOptions {
    /// Its listen backlog: connections the kernel completes and queues until the app accepts
    /// them. Once it is full the server's kernel drops every new SYN (`ListenOverflows`).
    pub backlog: u32,
    /// The app's connection slots: how many more sockets it may open than it holds once it
    /// serves. Every server has such a ceiling (here its open-files limit, lowered to its
    /// open files plus this); past it warp cannot accept, and connections wait in the backlog.
    /// `None` keeps the limit it inherits.
    pub slots: Option<u32>,
}

impl AppOptions {
    /// A roomy server: nothing but an attack on the kernel can fill it in a demo run.
    pub const ROOMY: Self = Self {
        backlog: 4096,
        slots: None,
    };
}

/// The agent's adaptive mode (`--adaptive` and the config file's `[adaptive]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Adaptive {
    pub floor_syn_rate: u32,
    pub floor_syn_burst: u32,
    pub step_percent: u32,
    pub calm_secs: u32,
}

/// The lab with the demo app and (when switched on) guard.
///
/// Fields drop in order: the app and agent first (`Drop` below), then the pins (unload), the
/// app's cgroup (empty by then), the namespaces, and the run folder with the control socket
/// and audit log.
pub struct Stack {
    app: Option<ChildGuard>,
    agent: Option<ChildGuard>,
    pins: PinDir,
    /// The app runs in a cgroup of its own and the agent counts connections (sockops) there:
    /// exactly the app's sockets, as on a host where the app has its own systemd unit.
    cgroup: Cgroup,
    pub lab: Lab,
    dir: TempDir,
    /// Blocks last at most this long (the agent's config file says so).
    block_ttl_secs: u64,
    pub bins: Binaries,
    pub cpus: Cpus,
    pub client: LabClient,
    /// The kernel thread that receives the server's packets, pinned to the server core.
    napi_pid: Option<u32>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Stop the app before the agent: nothing reports into a vanishing socket.
        drop(self.app.take());
        drop(self.agent.take());
    }
}

impl Stack {
    /// Builds the lab and prepares the run folder; guard is off and the app is not running.
    /// `block_ttl` caps every block the agent places (the app asks for 10 minutes), so tests
    /// can watch blocks expire.
    pub fn new(bins: Binaries, cpus: Cpus, block_ttl: Duration) -> Result<Self> {
        let lab = Lab::new().context("cannot build the lab")?;
        let dir = TempDir::new("stack")?;
        // Unique within this process too: a test binary builds one stack after another.
        static N: AtomicU32 = AtomicU32::new(0);
        let cgroup = Cgroup::new(&format!("app{}", N.fetch_add(1, Ordering::Relaxed)))?;
        let client = LabClient::at(&bins.lab_client);
        let mut stack = Self {
            app: None,
            agent: None,
            pins: PinDir::new(),
            cgroup,
            lab,
            dir,
            block_ttl_secs: block_ttl.as_secs().max(1),
            bins,
            cpus,
            client,
            napi_pid: None,
        };
        if let Some(cpu) = cpus.server {
            match stack.pin_server_napi(cpu) {
                Ok(pid) => stack.napi_pid = Some(pid),
                // Measuring still works, only less sharply: say so and go on.
                Err(e) => eprintln!("note: server packet thread not pinned: {e:#}"),
            }
        }
        Ok(stack)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.path
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(SERVER_V4.into(), METRICS_PORT)
    }

    pub fn app_addr(&self) -> SocketAddr {
        SocketAddr::new(SERVER_V4.into(), APP_PORT)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.app_addr())
    }

    pub fn sse_url(&self) -> String {
        format!("http://{}/events", self.app_addr())
    }

    pub fn napi_pid(&self) -> Option<u32> {
        self.napi_pid
    }

    /// A command in `ns`, pinned to `cpu` when given, with no `GUARD_*` variable of the
    /// caller's environment leaking in (clap reads them as defaults).
    fn command_in(&self, ns: &guard_tests::Netns, cpu: Option<usize>, program: &Path) -> Command {
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = ns.command("taskset");
                c.args(["-c", &cpu.to_string()]).arg(program);
                c
            }
            None => ns.command(program),
        };
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GUARD_") {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    /// Makes the server's receive path run in one kernel thread on `cpu`, with and without
    /// guard alike. A veth hands packets to its NAPI context only when GRO is on and the
    /// sending peer (the switch's `p-srv`) does no TSO; otherwise they are processed on the
    /// sender's core, so a flood would cost the attacker's core, not the server's. `threaded`
    /// then moves that NAPI context into a `napi/eth0-<id>` kthread; the id comes from a real
    /// connection's SO_INCOMING_NAPI_ID, so no other lab's thread is ever touched. The thread
    /// goes away with the namespace.
    fn pin_server_napi(&self, cpu: usize) -> Result<u32> {
        let pid = self.lab.thread_server_napi()?;
        let name = format!("napi thread {pid}");
        run_checked(Command::new("taskset").args([
            "-p",
            "-c",
            &cpu.to_string(),
            &pid.to_string(),
        ]))?;
        // On real hardware this work runs in softirq context, ahead of every task. As a
        // plain thread it would queue behind whatever else shares the core (on a shared
        // machine: compilers), and the veth's 256-slot ring would overflow at a few thousand
        // packets a second before guard's program saw them. The lowest real-time priority
        // restores softirq's precedence; the kernel's RT throttling still leaves the core 5 %.
        let param = libc::sched_param { sched_priority: 1 };
        let tid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: sched_setscheduler on the NAPI kthread of this lab's own interface, with a
        // valid parameter block.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot give {name} (pid {pid}) softirq-like priority"));
        }
        Ok(pid)
    }

    /// Starts the agent: loads and attaches guard on the server's interface with this stack's
    /// pins, control socket, audit log and metrics address, plus `sets` (`key=value`).
    pub fn start_agent(&mut self, sets: &[&str]) -> Result<()> {
        self.start_agent_with(sets, None)
    }

    /// `start_agent`, in adaptive mode when `adaptive` is given.
    pub fn start_agent_with(&mut self, sets: &[&str], adaptive: Option<&Adaptive>) -> Result<()> {
        ensure!(self.agent.is_none(), "the agent is already running");
        let ttl = self.block_ttl_secs;
        let mut toml = format!(
            "# Written by the lab stack: blocks last at most {ttl}s.\n\
             [blocks]\ndefault_ttl_secs = {ttl}\nmax_ttl_secs = {ttl}\n"
        );
        if let Some(a) = adaptive {
            toml.push_str(&format!(
                "\n[adaptive]\nfloor_syn_rate = {}\nfloor_syn_burst = {}\nstep_percent = {}\n\
                 calm_secs = {}\n",
                a.floor_syn_rate, a.floor_syn_burst, a.step_percent, a.calm_secs
            ));
        }
        let config = self.dir.path().join("guard.toml");
        std::fs::write(&config, toml).context("cannot write the agent's config file")?;
        let mut cmd = self.command_in(&self.lab.server, self.cpus.server, &self.bins.guard);
        cmd.args(["run", "-i", Lab::server_if(), "-p", &APP_PORT.to_string()])
            .arg("--pin-dir")
            .arg(self.pin_dir())
            .arg("--control-socket")
            .arg(self.control_socket())
            .arg("--audit-log")
            .arg(self.audit_log())
            .arg("--config")
            .arg(&config)
            .arg("--cgroup")
            .arg(&self.cgroup.0)
            .args(["--metrics-addr", &self.metrics_addr().to_string()]);
        if adaptive.is_some() {
            cmd.arg("--adaptive");
        }
        for set in sets {
            cmd.args(["--set", set]);
        }
        let mut agent = ChildGuard::spawn("guard agent", &mut cmd)?;
        agent.wait_for_stderr("guard running on", Duration::from_secs(30))?;
        self.agent = Some(agent);
        self.check_napi_pin();
        Ok(())
    }

    /// Stops the agent and unloads the program: truly no guard afterwards.
    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.take() {
            let done = agent.stop()?;
            ensure!(
                done.status.success(),
                "the agent exited with {}: {}",
                done.status,
                done.stderr.trim()
            );
        }
        self.pins.unload()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(ChildGuard::pid)
    }

    /// What the agent has logged so far.
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(ChildGuard::stderr_so_far)
            .unwrap_or_default()
    }

    /// Starts the demo app on 198.18.0.1:8080; `report` connects it to the agent's socket.
    pub fn start_app(&mut self, report: bool) -> Result<()> {
        self.start_app_with(report, AppOptions::ROOMY)
    }

    /// `start_app` with a given backlog and number of connection slots.
    pub fn start_app_with(&mut self, report: bool, opts: AppOptions) -> Result<()> {
        ensure!(self.app.is_none(), "the app is already running");
        let mut cmd = self.command_in(&self.lab.server, self.cpus.server, &self.bins.demo);
        cmd.args([
            "--listen",
            &self.app_addr().to_string(),
            "--backlog",
            &opts.backlog.to_string(),
        ]);
        if report {
            cmd.arg("--agent-socket").arg(self.control_socket());
        }
        // Into the cgroup before exec, so the listening socket and every socket accepted from
        // it belong to the cgroup the agent's connection tracking watches.
        let procs = CString::new(self.cgroup.0.join("cgroup.procs").as_os_str().as_bytes())
            .context("cgroup path with a NUL byte")?;
        // SAFETY: the hook only makes async-signal-safe calls (open, write, close).
        unsafe {
            cmd.pre_exec(move || join_cgroup(&procs));
        }
        let mut app = ChildGuard::spawn("demo app", &mut cmd)?;
        app.wait_for_stderr("serving on", Duration::from_secs(30))?;
        if let Some(slots) = opts.slots {
            limit_open_files(app.pid(), slots)?;
        }
        self.app = Some(app);
        Ok(())
    }

    pub fn stop_app(&mut self) -> Result<()> {
        if let Some(app) = self.app.take() {
            app.stop()?;
        }
        Ok(())
    }

    pub fn app_pid(&self) -> Option<u32> {
        self.app.as_ref().map(ChildGuard::pid)
    }

    /// What the app has logged so far (its reports to the agent among it).
    pub fn app_log(&self) -> String {
        self.app
            .as_ref()
            .map(ChildGuard::stderr_so_far)
            .unwrap_or_default()
    }

    /// The XDP attach can rebuild the interface's NAPI context; if the pinned thread is gone,
    /// find and pin the new one.
    fn check_napi_pin(&mut self) {
        let (Some(cpu), Some(pid)) = (self.cpus.server, self.napi_pid) else {
            return;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        self.napi_pid = self.pin_server_napi(cpu).ok();
    }

    /// What "the server" is when counting its CPU: the packet thread, the app and the agent.
    pub fn server_pids(&self) -> Vec<u32> {
        [self.napi_pid, self.app_pid(), self.agent_pid()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// `guard ARGS... --control-socket SOCK`: the operator's CLI against this stack's agent.
    pub fn guard(&self, cli_args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bins.guard);
        cmd.args(cli_args)
            .arg("--control-socket")
            .arg(self.control_socket());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GUARD_") {
                cmd.env_remove(key);
            }
        }
        run_checked(&mut cmd)
    }

    /// The kernel's counters, read from the pinned maps; `None` while guard is not loaded.
    pub fn counters(&self) -> Result<Option<Counters>> {
        let layout = PinLayout::new(self.pin_dir());
        if !layout.map(guard_common::maps::CONFIG).exists() {
            return Ok(None);
        }
        let maps = GuardMaps::open_pinned(&layout).context("cannot open the pinned maps")?;
        let totals = maps
            .stat_totals()
            .context("cannot read the kernel counters")?;
        Ok(Some(Counters(
            Stat::ALL
                .iter()
                .map(|s| (s.name().to_string(), totals[s.index() as usize]))
                .collect(),
        )))
    }

    /// Prefixes blocked in the kernel right now.
    pub fn kernel_blocks(&self) -> Result<Vec<String>> {
        let layout = PinLayout::new(self.pin_dir());
        let maps = GuardMaps::open_pinned(&layout).context("cannot open the pinned maps")?;
        Ok(maps
            .blocks()
            .context("cannot read the blocklist")?
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect())
    }

    /// The agent's Prometheus text.
    pub fn agent_metrics(&self) -> Result<String> {
        http_get_in(&self.lab.server, self.metrics_addr(), "/metrics")
    }

    /// Blocks placed on a report with a detection time, and their mean detection-to-kernel
    /// time in milliseconds (`guard_block_latency_seconds`).
    pub fn block_latency(&self) -> Result<Option<(u64, f64)>> {
        let text = self.agent_metrics()?;
        let count = metric(&text, "guard_block_latency_seconds_count").unwrap_or(0.0);
        let sum = metric(&text, "guard_block_latency_seconds_sum").unwrap_or(0.0);
        Ok((count > 0.0).then(|| (count as u64, sum / count * 1000.0)))
    }

    /// The audit log's records (empty before the agent wrote any).
    pub fn audit(&self) -> Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(self.audit_log()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context("cannot read the audit log"),
        };
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad audit line {l:?}")))
            .collect()
    }

    /// Established connections the kernel counts for `source` right now (conn_limit's view).
    pub fn tracked_connections(&self, source: Ipv4Addr) -> Result<u64> {
        let layout = PinLayout::new(self.pin_dir());
        let maps = GuardMaps::open_pinned(&layout).context("cannot open the pinned maps")?;
        let want = source.to_ipv6_mapped().octets();
        Ok(maps
            .connections()
            .context("cannot read the connection counts")?
            .into_iter()
            .filter(|(addr, _)| *addr == want)
            .map(|(_, n)| n)
            .sum())
    }

    /// The per-source SYN rate the kernel runs with now (adaptive mode changes it).
    pub fn live_syn_rate(&self) -> Result<u32> {
        let layout = PinLayout::new(self.pin_dir());
        let maps = GuardMaps::open_pinned(&layout).context("cannot open the pinned maps")?;
        Ok(maps
            .config()
            .context("cannot read the live config")?
            .syn_rate)
    }

    /// Handshakes the server's own kernel lost because a queue was full: accept-queue
    /// overflows (each also counts as a listen drop, so only this one is read) and SYN-queue
    /// drops. The same signal the adaptive mode watches.
    pub fn server_handshake_losses(&self) -> Result<u64> {
        Ok(self.lab.server.counter("TcpExt", "ListenOverflows")?
            + self.lab.server.counter("TcpExt", "TCPReqQFullDrop")?)
    }

    /// Gives the attacker namespace the addresses 198.18.0.`first`.. (`n` of them) next to its
    /// own, and returns them: many real sources, each completing real handshakes. The
    /// namespace's own 198.18.0.3 stays its primary (default source) address.
    pub fn attacker_sources(&self, first: u8, n: u8) -> Result<Vec<Ipv4Addr>> {
        add_addresses(&self.lab.attacker, first, n)
    }

    /// The same in the legit namespace: sources that have never talked to the server.
    pub fn fresh_legit_sources(&self, first: u8, n: u8) -> Result<Vec<Ipv4Addr>> {
        add_addresses(&self.lab.legit, first, n)
    }

    /// Many real sources at once: one `lab-client conn-flood` per address of `sources` (see
    /// `attacker_sources`), each keeping `parallel` connections in flight and holding each
    /// for `hold_ms` before it closes it and opens the next, for `secs` seconds. A connect
    /// the server does not answer within a second is given up (so every failed attempt costs
    /// about one SYN, and a source never exceeds `parallel * 1000 / hold_ms` connects a
    /// second).
    pub fn conn_floods(
        &self,
        sources: &[Ipv4Addr],
        parallel: u32,
        hold_ms: u32,
        secs: u32,
    ) -> Result<Vec<ClientRun<ConnFloodReport>>> {
        let (app, secs_text) = (self.app_addr().to_string(), secs.to_string());
        sources
            .iter()
            .map(|ip| {
                self.attacker(
                    args(&[
                        "conn-flood",
                        "--target",
                        &app,
                        "--bind",
                        &ip.to_string(),
                        "--count",
                        "1000000",
                        "--parallel",
                        &parallel.to_string(),
                        "--hold-ms",
                        &hold_ms.to_string(),
                        "--connect-timeout-ms",
                        "1000",
                        "--secs",
                        &secs_text,
                    ]),
                    Duration::from_secs(u64::from(secs) + 10),
                )
            })
            .collect()
    }

    /// One connect to the app from the legit address `source`, given `timeout` (TCP resends
    /// an unanswered SYN after 1 s, 3 s, 7 s, ...), on the server's core like the other legit
    /// clients.
    pub fn one_connect(
        &self,
        source: Ipv4Addr,
        timeout: Duration,
    ) -> Result<ClientRun<ProbeReport>> {
        let secs = timeout.as_secs() + 2;
        self.client.spawn(
            &self.lab.legit,
            &args(&[
                "probe",
                "--target",
                &self.app_addr().to_string(),
                "--bind",
                &source.to_string(),
                "--count",
                "1",
                "--connect-timeout-ms",
                &timeout.as_millis().max(1).to_string(),
                "--secs",
                &secs.to_string(),
            ]),
            self.cpus.server,
            Duration::from_secs(secs + 5),
        )
    }

    /// A SYN flood at `pps`, evenly paced, from random sources in `src_subnet` (a /32 is
    /// one spoofed source) to the app's port, for `secs` seconds, on the attacker's core.
    pub fn syn_flood(&self, src_subnet: &str, pps: u32, secs: u32) -> Result<Flood> {
        let flood = SynFlood {
            ns: &self.lab.attacker,
            iface: Lab::attacker_if(),
            src_subnet,
            dst: SERVER_V4,
            dst_mac: SERVER_MAC,
            port: APP_PORT,
            pps,
            secs,
            cpu: self.cpus.attacker,
        };
        paced_syn_flood(&self.client, &flood)
    }

    /// Starts `lab-client ARGS` in the attacker namespace, pinned to the attacker's core.
    pub fn attacker<T: DeserializeOwned>(
        &self,
        client_args: Vec<String>,
        budget: Duration,
    ) -> Result<ClientRun<T>> {
        self.client
            .spawn(&self.lab.attacker, &client_args, self.cpus.attacker, budget)
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. Runs between
/// fork and exec, so it makes only async-signal-safe calls and allocates nothing.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // "0" is the writing process itself.
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// Lowers the open-files limit of the running process `pid` to the files it has open now plus
/// `slots`; returns the new limit.
fn limit_open_files(pid: u32, slots: u32) -> Result<u64> {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list the open files of pid {pid}"))?
        .count() as u64;
    let limit = open + u64::from(slots);
    let tid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: rlimit is plain data; prlimit reads `new` and writes `old`, both ours.
    unsafe {
        let mut old: libc::rlimit = std::mem::zeroed();
        if libc::prlimit(tid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) != 0 {
            return Err(std::io::Error::last_os_error()).context("prlimit (read)");
        }
        // Only the soft limit: the hard one stays, so nothing is lost for good.
        let new = libc::rlimit {
            rlim_cur: limit.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        if libc::prlimit(tid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot limit the open files of pid {pid}"));
        }
    }
    Ok(limit)
}

/// Adds 198.18.0.`first`.. (`n` addresses, /24 like the rest of the lab's segment) to the role
/// interface of `ns`; `replace` makes a second call with the same range a no-op.
fn add_addresses(ns: &guard_tests::Netns, first: u8, n: u8) -> Result<Vec<Ipv4Addr>> {
    let last = first.checked_add(n).context("address range past .255")?;
    ensure!(
        first > 17 && last < 255,
        "198.18.0.{first}-{last} would overlap the lab's own addresses"
    );
    let mut out = Vec::new();
    for host in first..last {
        let addr = Ipv4Addr::new(198, 18, 0, host);
        ns.ip(&[
            "addr",
            "replace",
            &format!("{addr}/{}", lab::LAB_V4_PREFIX),
            "dev",
            lab::ROLE_IF,
        ])?;
        out.push(addr);
    }
    Ok(out)
}

/// The timeline's resolution.
pub const SLICE_SECS: u64 = 1;

/// One slice of a phase's timeline.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Seconds since the legit load started (end of the slice).
    pub t: f64,
    /// CPU the server side itself used in this slice (its packet thread, the app and the
    /// agent), in percent of one core. Read per process, so other work on a shared machine
    /// does not count.
    pub server_cpu: f64,
    /// Busy share of the whole server core in this slice, 0–100, whoever used it.
    pub core_busy: f64,
    /// Timeline probe connects started in this slice (ten a second, open loop), and how many
    /// completed within a second (a lost SYN is resent after ~1 s, so a slower one means its
    /// first SYN died).
    pub connects: u32,
    pub connects_ok: u32,
}

/// A sampler thread and the readings it returns.
type Worker<T> = JoinHandle<Result<Vec<T>>>;

/// (seconds, server-side CPU percent, core busy percent) per slice.
type CpuReading = (f64, f64, f64);

/// Background measurement: the server side's CPU and the server core's busy share per slice,
/// and a steady trickle of
/// TCP connects from the legit namespace's main address to the app.
struct Sampler {
    stop: Arc<AtomicBool>,
    cpu: Option<Worker<CpuReading>>,
    /// (seconds, completed within a second) per connect.
    conn: Option<Worker<(f64, bool)>>,
    slice: Duration,
}

impl Sampler {
    const SLICE: Duration = Duration::from_secs(SLICE_SECS);
    const CONNECT_EVERY: Duration = Duration::from_millis(100);

    fn start(stack: &Stack, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_no = stack.cpus.measured();
        let slice = Self::SLICE;
        let pids = stack.server_pids();
        let cpu = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<Vec<CpuReading>> {
                let mut core = CpuSampler::new(cpu_no)?;
                let mut server = ProcessCpu::new(pids);
                let mut out = Vec::new();
                let mut next = t0 + slice;
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(20)));
                        continue;
                    }
                    out.push((
                        (next - t0).as_secs_f64(),
                        server.percent(),
                        core.busy_percent()?,
                    ));
                    next += slice;
                }
                Ok(out)
            })
        };
        let conn = {
            let stop = Arc::clone(&stop);
            let ns = stack.lab.legit.path().to_path_buf();
            let to = stack.app_addr();
            let pin = stack.cpus.server;
            std::thread::spawn(move || -> Result<Vec<(f64, bool)>> {
                enter_netns(&ns)?;
                if let Some(cpu) = pin {
                    pin_this_thread(cpu)?;
                }
                // Open loop: a connect starts every 100 ms whether or not the previous one
                // finished, each on a short-lived thread (which inherits this thread's
                // namespace and core). A client that waited for each answer would make one
                // attempt a second while the server ignores it, and an outage would shrink
                // to a handful of failures in the timeline.
                let mut pending = Vec::new();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(20)));
                        continue;
                    }
                    let at = (now - t0).as_secs_f64();
                    pending.push(std::thread::spawn(move || {
                        (
                            at,
                            TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok(),
                        )
                    }));
                    // Keep the pace; after a stall, skip rather than catch up in a burst.
                    next = (next + Self::CONNECT_EVERY).max(Instant::now());
                }
                // Each connect gives up after a second, so this wait is bounded.
                pending
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("a timeline connect panicked"))
                    })
                    .collect()
            })
        };
        Self {
            stop,
            cpu: Some(cpu),
            conn: Some(conn),
            slice,
        }
    }

    fn finish(mut self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        let cpu = join(self.cpu.take())?;
        let conns = join(self.conn.take())?;
        let slice = self.slice.as_secs_f64();
        Ok(cpu
            .iter()
            .map(|&(t, server_cpu, core_busy)| {
                let inside = conns.iter().filter(|(ct, _)| *ct >= t - slice && *ct < t);
                let (mut n, mut ok) = (0, 0);
                for (_, good) in inside {
                    n += 1;
                    ok += u32::from(*good);
                }
                Sample {
                    t,
                    server_cpu,
                    core_busy,
                    connects: n,
                    connects_ok: ok,
                }
            })
            .collect())
    }
}

/// CPU time of a set of processes (or kernel threads), from /proc/PID/stat.
struct ProcessCpu {
    /// pid → last utime + stime in clock ticks.
    last: Vec<(u32, u64)>,
    at: Instant,
    ticks_per_sec: f64,
}

impl ProcessCpu {
    fn new(pids: Vec<u32>) -> Self {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            last: pids
                .into_iter()
                .map(|p| (p, proc_cpu_ticks(p).unwrap_or(0)))
                .collect(),
            at: Instant::now(),
            ticks_per_sec: if hz > 0 { hz as f64 } else { 100.0 },
        }
    }

    /// Percent of one core the processes used since the previous call. A process that is
    /// gone adds nothing (its last reading stays).
    fn percent(&mut self) -> f64 {
        let mut used = 0u64;
        for (pid, last) in &mut self.last {
            if let Some(now) = proc_cpu_ticks(*pid) {
                used += now.saturating_sub(*last);
                *last = now;
            }
        }
        let secs = self.at.elapsed().as_secs_f64();
        self.at = Instant::now();
        if secs <= 0.0 {
            return 0.0;
        }
        used as f64 / self.ticks_per_sec / secs * 100.0
    }
}

fn join<T>(handle: Option<JoinHandle<Result<T>>>) -> Result<T> {
    handle
        .context("sampler already finished")?
        .join()
        .map_err(|_| anyhow::anyhow!("a sampler thread panicked"))?
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.cpu.take() {
            let _ = h.join();
        }
        if let Some(h) = self.conn.take() {
            let _ = h.join();
        }
    }
}

/// The legit clients of one phase: WebSocket chatters, SSE subscribers, the SYN-loss probe
/// (all pinned with the server, as in shared/LAB.md) and the timeline sampler.
pub struct LegitLoad {
    chat: ClientRun<WsChatReport>,
    sse: ClientRun<SseReport>,
    probe: ClientRun<ProbeReport>,
    sampler: Sampler,
    t0: Instant,
    /// `t0` on the wall clock (Unix seconds), to place audit records on the timeline.
    t0_unix: f64,
    secs: u32,
}

/// What the legit clients got.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LegitOutcome {
    pub chat: WsChatReport,
    pub sse: SseReport,
    pub probe: ProbeReport,
    pub timeline: Vec<Sample>,
    /// When the timeline's 0 was, in Unix seconds.
    pub started_unix: f64,
}

impl LegitOutcome {
    /// (succeeded, attempted) over every legit connection attempt: probe connects, WebSocket
    /// handshakes, SSE subscriptions and the timeline's connects.
    pub fn connections(&self) -> (u64, u64) {
        let rejected = |m: &BTreeMap<u16, u64>| m.values().sum::<u64>();
        let chat_tries = self.chat.connects + rejected(&self.chat.rejected) + self.chat.errors;
        let sse_tries = self.sse.subscriptions + rejected(&self.sse.rejected) + self.sse.errors;
        let (tl_ok, tl_all) = self.timeline.iter().fold((0u64, 0u64), |(ok, all), s| {
            (ok + u64::from(s.connects_ok), all + u64::from(s.connects))
        });
        (
            self.probe.connected + self.chat.connects + self.sse.subscriptions + tl_ok,
            self.probe.attempted + chat_tries + sse_tries + tl_all,
        )
    }

    /// Succeeded share of legit connection attempts, 0–100.
    pub fn success_pct(&self) -> f64 {
        let (ok, all) = self.connections();
        if all == 0 {
            return 0.0;
        }
        ok as f64 * 100.0 / all as f64
    }

    /// Chat messages and feed events that reached legit clients.
    pub fn delivered(&self) -> u64 {
        self.chat.received + self.sse.events
    }
}

impl LegitLoad {
    /// Starts the legit clients for `secs` seconds.
    pub fn start(stack: &Stack, secs: u32) -> Result<Self> {
        let s = secs.to_string();
        let budget = Duration::from_secs(u64::from(secs) + 15);
        let cpu = stack.cpus.server;
        let ns = &stack.lab.legit;
        let t0 = Instant::now();
        let t0_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let chat = stack.client.spawn(
            ns,
            &args(&[
                "ws-chat",
                "--url",
                &stack.ws_url(),
                "--bind",
                &LEGIT_CHAT.to_string(),
                "--clients",
                "4",
                "--rate",
                "2",
                "--secs",
                &s,
            ]),
            cpu,
            budget,
        )?;
        let sse = stack.client.spawn(
            ns,
            &args(&[
                "sse",
                "--url",
                &stack.sse_url(),
                "--bind",
                &LEGIT_SSE.to_string(),
                "--clients",
                "4",
                "--secs",
                &s,
            ]),
            cpu,
            budget,
        )?;
        // 10 connects a second: half the kernel's default per-source cap, so only an attack
        // can make this source lose a SYN.
        let probe = stack.client.spawn(
            ns,
            &args(&[
                "probe",
                "--target",
                &stack.app_addr().to_string(),
                "--bind",
                &LEGIT_PROBE.to_string(),
                "--count",
                "100000",
                "--interval-ms",
                "100",
                "--connect-timeout-ms",
                "3000",
                "--secs",
                &s,
            ]),
            cpu,
            budget,
        )?;
        let sampler = Sampler::start(stack, t0);
        Ok(Self {
            chat,
            sse,
            probe,
            sampler,
            t0,
            t0_unix,
            secs,
        })
    }

    /// Seconds since the load started.
    pub fn elapsed(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Waits for the clients' own end and collects what they saw.
    pub fn finish(self) -> Result<LegitOutcome> {
        let end = self.t0 + Duration::from_secs(u64::from(self.secs));
        pause(end.saturating_duration_since(Instant::now()))?;
        let timeline = self.sampler.finish()?;
        Ok(LegitOutcome {
            chat: self.chat.wait()?,
            sse: self.sse.wait()?,
            probe: self.probe.wait()?,
            timeline,
            started_unix: self.t0_unix,
        })
    }
}

/// Polls `check` every 100 ms until it returns true or `limit` passes; the bound keeps a
/// broken run from hanging, and the answer is a yes/no, never a time.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<bool> {
    let end = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(true);
        }
        if Instant::now() >= end {
            return Ok(false);
        }
        pause(Duration::from_millis(100))?;
    }
}

/// An audit record's `ts` (RFC 3339 in UTC with milliseconds, as the agent writes it, e.g.
/// `2026-11-28T11:37:36.102Z`) in Unix seconds.
pub fn audit_ts_unix(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 in the proleptic Gregorian calendar, counting years from March
    // so the leap day is the last day of its year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + min * 60) as f64 + sec)
}

/// The attacker's own address as a lab address, for assertions and commands.
pub fn attacker_ip() -> IpAddr {
    lab::ATTACKER_V4.into()
}

/// What a slot hoarder did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HoardReport {
    pub attempted: u64,
    /// Connections it got and kept open to the end.
    pub connected: u64,
    /// Connects whose SYN went unanswered for `SlotHoarder::CONNECT_TIMEOUT`: one SYN each.
    pub timed_out: u64,
    /// Refused or failed otherwise.
    pub failed: u64,
}

/// One source that opens TCP connections to the app at a steady pace, under any per-source
/// rate cap, and closes none of them until it is finished: the slot hoarder. It never sends a
/// byte, so the app's own admission (which judges requests) never sees it; only the count of
/// connections it holds gives it away. It is a thread in the attacker namespace (source: the
/// namespace's own 198.18.0.3), pinned to the attacker's core.
pub struct SlotHoarder {
    stop: Arc<AtomicBool>,
    held: Arc<AtomicU64>,
    worker: Option<JoinHandle<Result<HoardReport>>>,
}

impl SlotHoarder {
    /// Shorter than the first SYN retransmission (1 s), so an attempt the server ignores costs
    /// exactly one SYN and the drop counters can be compared with the attempts one to one.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(900);

    /// Opens up to `per_sec` connections a second for `open_secs`, then keeps them until
    /// `finish`. Connects are sequential: a slow one delays the next instead of piling up.
    pub fn start(stack: &Stack, per_sec: u32, open_secs: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let ns = stack.lab.attacker.path().to_path_buf();
        let to = stack.app_addr();
        let pin = stack.cpus.attacker;
        let every = Duration::from_secs(1) / per_sec.max(1);
        let open_for = Duration::from_secs(u64::from(open_secs));
        let worker = {
            let (stop, held) = (Arc::clone(&stop), Arc::clone(&held));
            std::thread::spawn(move || -> Result<HoardReport> {
                enter_netns(&ns)?;
                if let Some(cpu) = pin {
                    pin_this_thread(cpu)?;
                }
                let mut r = HoardReport::default();
                let mut kept = Vec::new();
                let start = Instant::now();
                let mut next = start;
                while !stop.load(Ordering::Relaxed) && start.elapsed() < open_for {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(20)));
                        continue;
                    }
                    r.attempted += 1;
                    match TcpStream::connect_timeout(&to, Self::CONNECT_TIMEOUT) {
                        Ok(s) => {
                            kept.push(s);
                            r.connected += 1;
                            held.store(r.connected, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => r.timed_out += 1,
                        Err(_) => r.failed += 1,
                    }
                    next = (next + every).max(Instant::now());
                }
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(kept);
                Ok(r)
            })
        };
        Self {
            stop,
            held,
            worker: Some(worker),
        }
    }

    /// Connections it holds right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Closes every connection and reports.
    pub fn finish(mut self) -> Result<HoardReport> {
        self.stop.store(true, Ordering::Relaxed);
        join(self.worker.take())
    }
}

impl Drop for SlotHoarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

/// A SYN flood from random sources as fast as the attacker core sends (see
/// `guard_tests::tools::trafgen_flat_out`).
pub struct FlatOutFlood(Flood);

impl FlatOutFlood {
    pub fn start(stack: &Stack, subnet: &str, secs: u32) -> Result<Self> {
        Ok(Self(trafgen_flat_out(
            &stack.lab.attacker,
            Lab::attacker_if(),
            subnet,
            SERVER_V4,
            SERVER_MAC,
            APP_PORT,
            secs,
            stack.cpus.attacker,
        )?))
    }

    /// Waits for it to end by itself; returns the packets it reports sent.
    pub fn wait(self) -> Result<u64> {
        let report = self.0.wait()?;
        report
            .sent
            .with_context(|| format!("trafgen did not say what it sent: {}", report.output.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_timestamps() {
        assert_eq!(audit_ts_unix("1970-01-01T00:00:00.000Z"), Some(0.0));
        assert_eq!(audit_ts_unix("2000-03-01T00:00:01Z"), Some(951_868_801.0));
        let t = audit_ts_unix("2026-11-28T11:37:36.102Z").unwrap();
        assert!((t - 1_795_865_856.102).abs() < 1e-3, "{t}");
        assert_eq!(audit_ts_unix("2026-11-28 11:37:36Z"), None);
        assert_eq!(audit_ts_unix("2026-13-28T11:37:36Z"), None);
    }

    #[test]
    fn metric_lines() {
        let text = "# HELP x y\nguard_block_latency_seconds_sum 0.25\n\
                    guard_block_latency_seconds_count 2\nguard_packets_total{verdict=\"drop\"} 9\n";
        assert_eq!(metric(text, "guard_block_latency_seconds_sum"), Some(0.25));
        assert_eq!(metric(text, "guard_block_latency_seconds_count"), Some(2.0));
        assert_eq!(metric(text, "guard_packets_total"), None);
    }

    #[test]
    fn counters_deltas_and_drops() {
        let c = |pairs: &[(&str, u64)]| {
            Counters(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        };
        let before = c(&[
            ("drop_blocked", 5),
            ("pass_syn", 10),
            ("drop_source_rate", 1),
        ]);
        let after = c(&[
            ("drop_blocked", 12),
            ("pass_syn", 11),
            ("drop_source_rate", 1),
        ]);
        let d = after.since(&before);
        assert_eq!(d.get(Stat::DropBlocked), 7);
        assert_eq!(d.drops(), 7);
        assert_eq!(d.drop_breakdown(), "blocked 7");
        assert_eq!(after.drops(), 13);
    }
}
