//! The bench's lab: the lab topology of [`crate::lab`] with a real TCP server (lab-client
//! `serve-echo`, listen backlog 4096) inside a cgroup of its own, its receive path in one
//! pinned NAPI thread, and the protections under comparison switched on and off one at a time.
//!
//! CPU pinning: the server, its NAPI thread, the agent and the legit probes
//! share one core (the "server core", whose busy share is the cost measured); the attack tools
//! get the other. Without it the flood tool itself is the bottleneck and every mode looks
//! alike.
//!
//! Everything is owned by a guard and removed on every way out: the server is stopped, the
//! agent stopped and its program unloaded (pins removed), then the cgroup and the namespaces
//! (taking nftables and iptables rules with them) are deleted.
//!
//! `cargo xtask bench` drives it (its flood and global-budget sections); [`wire`] is its
//! "NIC", the redirect that hands the attacker's frames to the server as raw frames;
//! `baselines` the nftables and iptables rules compared with guard; `cpu` the server side's
//! CPU accounting.

mod baselines;
mod cpu;
pub mod wire;

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use guard_common::stats::Stat;
use guard_user::datapath::GuardMaps;
use guard_user::paths::PinLayout;
use serde::Serialize;

use crate::binaries::Binaries;
use crate::cgroup::Cgroup;
use crate::lab::{fmt_mac, Lab, ATTACKER_MAC, ATTACKER_PORT, ROLE_IF, SERVER_V4};
use crate::launch::GuardRun;
use crate::measure::{allowed_cpus, server_and_attacker_cpus, spawn_syn_loss_probe};
use crate::pins::Pins;
use crate::process::{pin_to_cpu, run_checked};
use crate::report::ProbeReport;
use crate::stack::check_interrupted;
use crate::tools::TempDir;
use crate::{ChildGuard, ClientRun, LabClient};
use baselines::{ipt_counter, ipt_rule, iptables, nft_counter, nft_ruleset};
use cpu::{process_cpu, thread_runtime};
pub use cpu::{CpuShares, CpuSnapshot};
use wire::{disable_checksum_offload, Wire};

/// The port the server listens on and every protection guards.
pub const PORT: u16 = 8080;
/// guard's default per-source cap, which the nftables and iptables baselines copy.
pub const SYN_RATE: u32 = 20;
pub const SYN_BURST: u32 = 40;
/// The switch's end of the server's veth (named by the lab toolkit).
const SERVER_PEER: &str = "p-srv";

/// The legit namespace's extra addresses 198.18.0.10–.17, eight "users". Probing from all of
/// them in parallel keeps each one under the per-source cap while the total stays high (8 x 50
/// connects make the 400 that lost SYNs are counted in).
pub fn legit_sources() -> Vec<Ipv4Addr> {
    crate::lab::legit_extra_v4()
}

/// A protection under comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    None,
    Nftables,
    Iptables,
    XdpNative,
    XdpGeneric,
    Tc,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::None,
        Mode::Nftables,
        Mode::Iptables,
        Mode::XdpNative,
        Mode::XdpGeneric,
        Mode::Tc,
    ];

    /// The name `--mode` takes.
    pub fn key(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::XdpNative => "xdp-native",
            Mode::XdpGeneric => "xdp-generic",
            Mode::Tc => "tc",
        }
    }

    /// Modes named on the command line, in the canonical order; all when none is named.
    pub fn parse_list(names: &[String]) -> Result<Vec<Mode>> {
        for name in names {
            ensure!(
                Mode::ALL.iter().any(|m| m.key() == name),
                "unknown mode `{name}` (expected one of: {})",
                Mode::ALL.map(Mode::key).join(", ")
            );
        }
        Ok(Mode::ALL
            .into_iter()
            .filter(|m| names.is_empty() || names.iter().any(|n| n == m.key()))
            .collect())
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::None => "no protection",
            Mode::Nftables => "nftables meter",
            Mode::Iptables => "iptables hashlimit",
            Mode::XdpNative => "guard XDP native",
            Mode::XdpGeneric => "guard XDP generic",
            Mode::Tc => "guard tc",
        }
    }

    fn attach(self) -> Option<&'static str> {
        match self {
            Mode::XdpNative => Some("xdp-native"),
            Mode::XdpGeneric => Some("xdp-generic"),
            Mode::Tc => Some("tc"),
            _ => None,
        }
    }
}

/// A running agent; dropping it stops the agent, then unloads its program and pins.
pub struct Agent {
    child: Option<ChildGuard>,
    pins: Pins,
}

impl Agent {
    pub fn layout(&self) -> PinLayout {
        self.pins.layout()
    }

    pub fn maps(&self) -> Result<GuardMaps> {
        GuardMaps::open_pinned(&self.layout()).context("open the agent's pinned maps")
    }

    /// Sum of every drop verdict counter.
    pub fn drops(&self) -> Result<u64> {
        let totals = self.maps()?.stat_totals()?;
        Ok(Stat::ALL
            .into_iter()
            .filter(|s| matches!(s.labels(), Some(("drop", _))))
            .map(|s| totals[s.index() as usize])
            .sum())
    }

    pub fn stat(&self, stat: Stat) -> Result<u64> {
        Ok(self.maps()?.stat(stat)?)
    }

    /// Stops the agent (SIGINT) and checks that it exited cleanly; the program stays attached
    /// until the pins are unloaded on drop.
    pub fn stop(mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            let done = child.stop()?;
            ensure!(
                done.status.success(),
                "the agent exited with {}: {}",
                done.status,
                done.stderr.trim()
            );
        }
        Ok(())
    }
}

/// What is switched on in the server namespace right now.
pub enum Protection {
    None,
    Nftables,
    Iptables,
    Guard(Agent),
}

/// Kernel counters read around one measurement.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// Packets the protection itself dropped (guard's drop verdicts, the nft/iptables rule's
    /// counter); None without protection.
    pub filter_drops: Option<u64>,
    /// Frames the server's veth could not queue (its NAPI ring was full): drops the kernel
    /// makes on its own when receive processing falls behind.
    pub ring_drops: u64,
    /// The server's TCP counters.
    pub syncookies_sent: u64,
    pub listen_drops: u64,
}

impl Counters {
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            filter_drops: match (self.filter_drops, before.filter_drops) {
                (Some(a), Some(b)) => Some(a.saturating_sub(b)),
                _ => None,
            },
            ring_drops: self.ring_drops.saturating_sub(before.ring_drops),
            syncookies_sent: self.syncookies_sent.saturating_sub(before.syncookies_sent),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
        }
    }
}

/// The sum of parallel probes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Probes {
    pub attempted: u64,
    pub connected: u64,
    /// Connects whose first SYN did not make it (resent, failed or timed out).
    pub lost_syn: u64,
    pub timed_out: u64,
    pub failed: u64,
}

impl Probes {
    fn add(&mut self, r: &ProbeReport) {
        self.attempted += r.attempted;
        self.connected += r.connected;
        self.lost_syn += r.lost_syn;
        self.timed_out += r.timed_out;
        self.failed += r.failed;
    }

    /// Lost SYNs scaled to 400 connects, the unit every lab report uses so runs of different
    /// lengths compare.
    pub fn lost_per_400(&self) -> f64 {
        if self.attempted == 0 {
            return f64::NAN;
        }
        self.lost_syn as f64 * 400.0 / self.attempted as f64
    }

    pub fn success_pct(&self) -> f64 {
        if self.attempted == 0 {
            return f64::NAN;
        }
        self.connected as f64 * 100.0 / self.attempted as f64
    }
}

/// How frames reach the server in the flood bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RxModel {
    /// As a NIC delivers them (the default): the attacker's frames arrive as raw frames, not
    /// socket buffers, and with interrupt coalescing. See [`Rig::new`].
    Nic,
    /// The plain veth: every frame wakes the server's NAPI thread, and frames arrive as the
    /// sender's socket buffers, which veth copies into a page before XDP can look at them.
    Veth,
}

impl RxModel {
    pub fn describe(self) -> String {
        match self {
            RxModel::Nic => format!(
                "NIC-like receive (flood frames arrive as raw frames, socket buffers built on the server's core; coalescing {} µs x {})",
                NIC_COALESCE.as_micros(),
                NIC_COALESCE_POLLS
            ),
            RxModel::Veth => "plain veth receive (a wake-up and a copy per frame)".into(),
        }
    }
}

/// Server rx coalescing in the NIC model: polls 100 µs apart while frames keep coming, about
/// what adaptive NIC interrupt moderation settles at under a flood.
const NIC_COALESCE: Duration = Duration::from_micros(100);
const NIC_COALESCE_POLLS: u32 = 2;

// Field order is drop order: the server leaves its cgroup before the cgroup is removed, and
// both before the namespaces go.
pub struct Rig {
    /// The NIC model's redirect on the switch's attacker port (see `Rig::new`).
    _wire: Option<Wire>,
    server: Option<ChildGuard>,
    cgroup: Cgroup,
    dir: TempDir,
    pub lab: Lab,
    pub bins: Binaries,
    pub client: LabClient,
    pub server_cpu: usize,
    pub attacker_cpu: usize,
    napi: u32,
    /// Whether the NAPI thread gets real-time priority (`--napi-rt`, see `pin_napi`).
    napi_rt: bool,
}

impl Rig {
    /// Builds the lab, threads and pins the server's NAPI context and starts the server.
    ///
    /// With [`RxModel::Nic`], frames reach the server as a NIC would deliver them, so that
    /// filters are compared by what they cost, not by what veth costs around them:
    /// - a NIC writes frames into driver-owned pages, and native XDP runs on those before any
    ///   socket buffer exists; a dropped frame's page is simply reused. A veth instead
    ///   receives the sender's socket buffers: XDP on it must free one per dropped frame, and
    ///   a frame without headroom is first copied into a page (`veth_convert_skb_to_xdp_buff`),
    ///   both on the server's core, while the filters after XDP get their socket buffer built
    ///   for free on the sender's core. A redirect on the switch's attacker port
    ///   ([`wire::Wire`]) hands the attacker's frames to the server's veth as raw
    ///   frames instead, so the server's core does what a NIC driver's poll does: run XDP on
    ///   the frame, and build a socket buffer only for what passes;
    /// - interrupt coalescing ([`Lab::coalesce_server_rx`]), applied to every mode alike.
    pub fn new(bins: Binaries, napi_rt: bool, rx: RxModel) -> Result<Self> {
        let cpus = allowed_cpus();
        let Some((server_cpu, attacker_cpu)) = server_and_attacker_cpus(&cpus) else {
            bail!("the flood bench needs two CPUs, one of them CPU 0 (trafgen sends from it): one for the server, one for the attacker; this process may use {cpus:?}");
        };
        let lab = Lab::new()?;
        let cgroup = Cgroup::new("bench")?;
        let dir = TempDir::new("bench")?;
        std::fs::write(
            dir.path().join("guard.toml"),
            // The bench compares per-source caps with per-source caps: the agent's escalation
            // to kernel blocks would turn guard's drops into a different mechanism mid-run.
            "[escalation]\nenabled = false\n",
        )?;
        let client = LabClient::at(&bins.lab_client);
        let wire = match rx {
            RxModel::Veth => None,
            RxModel::Nic => {
                lab.coalesce_server_rx(NIC_COALESCE, NIC_COALESCE_POLLS)?;
                // The attacker's frames bypass the bridge from now on, so its learned entry
                // would age out and every SYN-ACK to the attacker be flooded to all ports.
                lab.switch
                    .exec(&[
                        "bridge",
                        "fdb",
                        "replace",
                        &fmt_mac(ATTACKER_MAC),
                        "dev",
                        ATTACKER_PORT,
                        "master",
                        "static",
                    ])
                    .context("add the attacker's MAC to the switch's forwarding table")?;
                disable_checksum_offload(&lab.attacker, ROLE_IF)?;
                Some(Wire::attach(&lab.switch, ATTACKER_PORT, SERVER_PEER)?)
            }
        };
        let mut rig = Self {
            _wire: wire,
            server: None,
            cgroup,
            dir,
            lab,
            bins,
            client,
            server_cpu,
            attacker_cpu,
            napi: 0,
            napi_rt,
        };
        rig.napi = rig.lab.thread_server_napi()?;
        rig.start_server()?;
        Ok(rig)
    }

    /// The echo server inside the cgroup (joined before its listening socket exists, so every
    /// accepted socket belongs to it) and on the server core.
    fn start_server(&mut self) -> Result<()> {
        let script = format!(
            "echo $$ > {cg}/cgroup.procs && exec nsenter --net={ns} -- taskset -c {cpu} {bin} \
             serve-echo --listen {SERVER_V4}:{PORT} --backlog 4096 --secs 3600",
            cg = self.cgroup.0.display(),
            ns = self.lab.server.path().display(),
            cpu = self.server_cpu,
            bin = self.bins.lab_client.display(),
        );
        let mut server =
            ChildGuard::spawn("echo server", Command::new("sh").args(["-c", &script]))?;
        server.wait_for_stderr("listening on", Duration::from_secs(10))?;
        self.server = Some(server);
        Ok(())
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup.0
    }

    /// Pins the server's NAPI thread to the server core, with real-time priority under
    /// `--napi-rt`, finding it again if attaching or detaching a program replaced it.
    ///
    /// At normal priority (the default) the thread shares the core with
    /// the server and the legit clients, as receive work does on a host under a flood (the
    /// kernel defers it to ksoftirqd, a normal thread), and the veth's 256-frame ring overflows
    /// while it waits. Real-time priority stands in for softirq on a lightly loaded host,
    /// running ahead of every task. The thread belongs to this lab's interface and goes with
    /// it.
    pub fn pin_napi(&mut self) -> Result<()> {
        let alive = std::fs::read_to_string(format!("/proc/{}/comm", self.napi))
            .is_ok_and(|c| c.starts_with("napi/"));
        if !alive {
            self.napi = self.lab.thread_server_napi()?;
        }
        pin_to_cpu(self.napi, self.server_cpu)?;
        if !self.napi_rt {
            return Ok(());
        }
        let param = libc::sched_param { sched_priority: 50 };
        // SAFETY: sched_setscheduler reads a valid sched_param; the PID is our lab's thread.
        let rc =
            unsafe { libc::sched_setscheduler(self.napi as libc::pid_t, libc::SCHED_FIFO, &param) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!("cannot give NAPI thread {} real-time priority", self.napi)
            });
        }
        Ok(())
    }

    /// CPU time used so far by what serves the flood: the NAPI thread (the whole receive path:
    /// veth ring, XDP, GRO, tc, netfilter, TCP, and the SYN-ACKs it sends), the server and the
    /// agent. The kernel charges interrupts to whichever task they hit, so interrupts that hit
    /// other tasks are left out; so is everything other people run on the core, which keeps
    /// the number readable on a busy machine.
    pub fn cpu_snapshot(&self, p: &Protection) -> Result<CpuSnapshot> {
        let agent = match p {
            Protection::Guard(agent) => match &agent.child {
                Some(child) => process_cpu(child.pid())?,
                None => Duration::ZERO,
            },
            _ => Duration::ZERO,
        };
        let server = match &self.server {
            Some(child) => process_cpu(child.pid())?,
            None => Duration::ZERO,
        };
        Ok(CpuSnapshot {
            at: Instant::now(),
            napi: thread_runtime(self.napi)?,
            processes: server + agent,
        })
    }

    /// Switches `mode` on, with `sets` (`key=value`) for the agent.
    pub fn protect(&mut self, mode: Mode, sets: &[String]) -> Result<Protection> {
        let ns = &self.lab.server;
        let p = match mode {
            Mode::None => Protection::None,
            Mode::Nftables => {
                let mut child = ns
                    .command("nft")
                    .args(["-f", "-"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .context("cannot run nft")?;
                child
                    .stdin
                    .take()
                    .context("nft stdin")?
                    .write_all(nft_ruleset().as_bytes())?;
                let status = child.wait()?;
                ensure!(status.success(), "nft refused the meter ruleset ({status})");
                Protection::Nftables
            }
            Mode::Iptables => {
                run_checked(ns.command(iptables()).args(ipt_rule()))
                    .context("add the hashlimit rule")?;
                Protection::Iptables
            }
            Mode::XdpNative | Mode::XdpGeneric | Mode::Tc => {
                Protection::Guard(self.start_agent(mode.attach().expect("a guard mode"), sets)?)
            }
        };
        self.pin_napi()?;
        Ok(p)
    }

    /// Switches a protection off again.
    pub fn unprotect(&mut self, p: Protection) -> Result<()> {
        let ns = &self.lab.server;
        match p {
            Protection::None => {}
            Protection::Nftables => {
                ns.exec(&["nft", "delete", "table", "inet", "gdbench"])?;
            }
            Protection::Iptables => {
                let mut rule = ipt_rule();
                rule[2] = "-D".into();
                run_checked(ns.command(iptables()).args(rule))
                    .context("remove the hashlimit rule")?;
            }
            Protection::Guard(agent) => {
                agent.stop()?;
            }
        }
        Ok(())
    }

    fn start_agent(&self, attach: &str, sets: &[String]) -> Result<Agent> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pins = Pins::new("bench")?;
        let mut cmd = self.lab.server.command("taskset");
        cmd.args(["-c", &self.server_cpu.to_string()])
            .arg(&self.bins.guard);
        let child = GuardRun::new(
            Lab::server_if(),
            PORT,
            pins.root(),
            &self.dir.path().join(format!("control-{n}.sock")),
        )
        .attach(attach)
        .audit_log(self.dir.path().join(format!("audit-{n}.jsonl")))
        .config(self.dir.path().join("guard.toml"))
        .cgroup(self.cgroup())
        .sets([
            format!("syn_rate={SYN_RATE}"),
            format!("syn_burst={SYN_BURST}"),
        ])
        .sets(sets)
        .start("guard agent", cmd, Duration::from_secs(30))
        .context("the agent did not come up")?;
        Ok(Agent {
            child: Some(child),
            pins,
        })
    }

    /// The counters a measurement reports, as they stand now.
    pub fn counters(&self, p: &Protection) -> Result<Counters> {
        let ns = &self.lab.server;
        let filter_drops = match p {
            Protection::None => None,
            Protection::Guard(agent) => Some(agent.drops()?),
            Protection::Nftables => {
                let out = ns.exec(&["nft", "-j", "list", "chain", "inet", "gdbench", "pre"])?;
                Some(nft_counter(&out)?)
            }
            Protection::Iptables => {
                let out = run_checked(ns.command(iptables()).args([
                    "-t",
                    "raw",
                    "-L",
                    "PREROUTING",
                    "-v",
                    "-x",
                    "-n",
                ]))?;
                Some(ipt_counter(&out)?)
            }
        };
        Ok(Counters {
            filter_drops,
            ring_drops: self.ring_drops()?,
            syncookies_sent: ns.counter("TcpExt", "SyncookiesSent")?,
            listen_drops: ns.counter("TcpExt", "ListenDrops")?,
        })
    }

    /// Frames the switch's `p-srv` could not hand to the server's veth.
    fn ring_drops(&self) -> Result<u64> {
        let out = self
            .lab
            .switch
            .ip(&["-s", "-j", "link", "show", "dev", SERVER_PEER])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
        v[0]["stats64"]["tx"]["dropped"]
            .as_u64()
            .with_context(|| format!("no tx drop count in {out}"))
    }

    /// `per_source` sequential connects from each source in parallel, `interval_ms` apart
    /// (each source stays under the per-source cap), all pinned to the server core, the first
    /// after `start_delay`. Each connect gets 3 s: one SYN retransmission (~1 s) still
    /// connects, and counts as lost.
    ///
    /// Starting eight processes costs the server core some 20 ms of CPU each; a delay lets
    /// that pass before anything is counted, as it would on a client's own machine.
    pub fn start_probes(
        &self,
        sources: &[Ipv4Addr],
        per_source: u32,
        interval_ms: u32,
        start_delay: Duration,
    ) -> Result<ProbeRun> {
        let mut runs = Vec::new();
        for src in sources {
            runs.push(spawn_syn_loss_probe(
                &self.client,
                &self.lab.legit,
                (*src).into(),
                SocketAddr::from((SERVER_V4, PORT)),
                per_source,
                interval_ms,
                Some(self.server_cpu),
                start_delay,
            )?);
        }
        Ok(ProbeRun { runs })
    }
}

/// Probes running in parallel.
pub struct ProbeRun {
    runs: Vec<ClientRun<ProbeReport>>,
}

impl ProbeRun {
    pub fn wait(self) -> Result<Probes> {
        let mut total = Probes::default();
        for run in self.runs {
            // Each is bounded by its own --secs; Ctrl-C stops the rest via their guards.
            check_interrupted()?;
            total.add(&run.wait()?);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_totals() {
        let mut p = Probes::default();
        p.add(&ProbeReport {
            attempted: 200,
            connected: 199,
            lost_syn: 3,
            ..Default::default()
        });
        assert_eq!(p.lost_per_400(), 6.0);
        assert!((p.success_pct() - 99.5).abs() < 1e-9);
        assert!(Probes::default().lost_per_400().is_nan());
    }
}
