//! The guarded service inside a lab: the demo app and the agent in the server namespace,
//! well-behaved clients in the legit namespace, attack tools in the attacker namespace, and the
//! measurements around them (kernel counters, agent metrics, audit log, server-core CPU, a
//! timeline of legit connects).
//!
//! `cargo xtask demo` drives it, and so do the end-to-end tests (tests/tests/e2e.rs), so the
//! tests assert on exactly the stack the demo shows. This file holds [`Stack`] itself (its
//! processes and their lifecycle); the rest is split by concern:
//! - [`cpus`]: the server and attacker cores, thread pinning, entering a namespace;
//! - [`interrupt`]: Ctrl-C handling and the bounded waits that honour it;
//! - [`legit`]: the legitimate load of a phase and its timeline;
//! - [`observe`]: what it reads while it runs (kernel counters, blocks, metrics, audit log);
//! - [`attacks`]: the slot hoarder and the flat-out random-source flood;
//! - [`clients`]: the lab-client attacks (connection floods, storms, message floods, probes)
//!   that a demo scenario and its end-to-end test both start.
//!
//! Everything started here is owned by a guard: `Stack` stops the app and the agent, unloads
//! the program and removes its pins, then deletes the namespaces, on every path out (error,
//! panic, Ctrl-C). Only processes it started are ever signalled, by PID.

pub mod attacks;
pub mod clients;
pub mod cpus;
pub mod interrupt;
pub mod legit;
pub mod observe;

use std::ffi::CString;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use serde::de::DeserializeOwned;

pub use attacks::{attacker_ip, FlatOutFlood, HoardReport, SlotHoarder};
pub use clients::{ConnFlood, SlowHeads, Storm, StormKind, SLOW_NET};
pub use cpus::Cpus;
pub use interrupt::{
    check_interrupted, install_signal_handlers, interrupted, pause, wait_until, INTERRUPTED,
};
pub use legit::{LegitLoad, LegitOutcome, Sample, SLICE_SECS};
pub use observe::{audit_ts_unix, http_get_in, metric, Counters};

use crate::binaries::Binaries;
use crate::cgroup::Cgroup;
use crate::lab::{self, Lab, SERVER_MAC, SERVER_V4};
use crate::launch::GuardRun;
use crate::pins::Pins;
use crate::process::{run_checked, without_guard_env};
use crate::report::ProbeReport;
use crate::tools::{paced_syn_flood, Flood, SynFlood, TempDir};
use crate::{ChildGuard, ClientRun, LabClient};

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

/// `lab-client` arguments from string slices.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
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
    /// The open-files soft limit the app starts with (the hard limit stays), e.g. the 1 024
    /// a systemd service gets; `None` inherits it. Set before exec, so the app sees it from
    /// its first instruction (guard's server raises it to the hard limit, plain warp does not).
    pub start_nofile: Option<u64>,
    /// When the app runs on plain `warp::serve` (`--server warp`) instead of guard's server.
    pub warp_server: WarpServer,
}

/// Which runs of the app use plain `warp::serve` rather than guard's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum WarpServer {
    /// Guard's server always: the app as guard ships it.
    Never,
    /// Plain warp when guard is off: guard's server (request deadlines, the waiting budget,
    /// the descriptor reserve) is part of guard, so the run without guard runs without it.
    WithoutGuard,
    /// Plain warp in every run: for attacks aimed at the kernel's caps, which guard's server
    /// would otherwise meet first (it closes connections that never send a request), so that
    /// what is measured is the kernel's part alone.
    Always,
}

impl AppOptions {
    /// A roomy server: nothing but an attack on the kernel can fill it in a demo run.
    pub const ROOMY: Self = Self {
        backlog: 4096,
        slots: None,
        start_nofile: None,
        warp_server: WarpServer::Never,
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
    pins: Pins,
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
            pins: Pins::new("stack")?,
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
        self.pins.root()
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
    fn command_in(&self, ns: &crate::Netns, cpu: Option<usize>, program: &Path) -> Command {
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = ns.command("taskset");
                c.args(["-c", &cpu.to_string()]).arg(program);
                c
            }
            None => ns.command(program),
        };
        without_guard_env(&mut cmd);
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
        let mut run = GuardRun::new(
            Lab::server_if(),
            APP_PORT,
            self.pin_dir(),
            &self.control_socket(),
        )
        .audit_log(self.audit_log())
        .config(&config)
        .cgroup(&self.cgroup.0)
        .metrics_addr(self.metrics_addr())
        .sets(sets);
        if adaptive.is_some() {
            run = run.args(["--adaptive"]);
        }
        let cmd = self.command_in(&self.lab.server, self.cpus.server, &self.bins.guard);
        let agent = run.start("guard agent", cmd, Duration::from_secs(30))?;
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
        let demo =
            self.bins.demo.as_deref().context(
                "the stack's binaries were built without the demo app (Binaries::build)",
            )?;
        let mut cmd = self.command_in(&self.lab.server, self.cpus.server, demo);
        cmd.args([
            "--listen",
            &self.app_addr().to_string(),
            "--backlog",
            &opts.backlog.to_string(),
        ]);
        if report {
            cmd.arg("--agent-socket").arg(self.control_socket());
        }
        let plain_warp = match opts.warp_server {
            WarpServer::Never => false,
            WarpServer::WithoutGuard => !report,
            WarpServer::Always => true,
        };
        if plain_warp {
            cmd.args(["--server", "warp"]);
        }
        if let Some(soft) = opts.start_nofile {
            // SAFETY: the hook only calls getrlimit/setrlimit on this process's own limits.
            unsafe {
                cmd.pre_exec(move || lower_soft_nofile(soft));
            }
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
        without_guard_env(&mut cmd);
        run_checked(&mut cmd)
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

/// Lowers the calling process's soft open-files limit to `soft` (never above the hard one).
/// Runs between fork and exec: async-signal-safe calls only.
fn lower_soft_nofile(soft: u64) -> std::io::Result<()> {
    // SAFETY: getrlimit/setrlimit with a pointer to a local rlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = soft.min(lim.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Adds 198.18.0.`first`.. (`n` addresses, /24 like the rest of the lab's segment) to the role
/// interface of `ns`; `replace` makes a second call with the same range a no-op.
fn add_addresses(ns: &crate::Netns, first: u8, n: u8) -> Result<Vec<Ipv4Addr>> {
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
