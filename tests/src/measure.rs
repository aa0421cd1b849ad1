//! Measurement: per-core CPU busy share, and running `lab-client` inside namespaces.

use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;

use crate::netns::Netns;
use crate::process::ChildGuard;
use crate::report::ProbeResult;

/// Cumulative times of one CPU from /proc/stat, in clock ticks (`USER_HZ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Everything but idle and iowait (user, nice, system, irq, softirq, steal). softirq is
    /// where XDP and the TCP stack run for veth traffic, so it must count as busy.
    pub busy: u64,
    /// Idle and iowait.
    pub idle: u64,
}

/// Reads `cpuN`'s line from /proc/stat text.
pub fn parse_proc_stat(text: &str, cpu: usize) -> Result<CpuTimes> {
    let label = format!("cpu{cpu}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("/proc/stat has no {label} line (no such CPU?)"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| {
            f.parse()
                .with_context(|| format!("bad /proc/stat field {f:?}"))
        })
        .collect::<Result<_>>()?;
    ensure!(fields.len() >= 8, "short /proc/stat line: {line:?}");
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
    // already inside user/nice, so it is not added again.
    let total: u64 = fields[..8].iter().sum();
    let idle = fields[3] + fields[4];
    Ok(CpuTimes {
        busy: total - idle,
        idle,
    })
}

/// Busy share of one core between two readings of /proc/stat: the share of wall-clock time
/// the core was not idle.
///
/// Only idle time is taken from /proc/stat: on a tickless kernel it is measured at every idle
/// entry and exit, while the busy fields are sampled once per scheduler tick (unless the kernel
/// has IRQ time accounting), which undercounts work done in bursts shorter than a tick — the
/// way a packet thread works — and scatters the rest (a 4 s window at 5 % busy is some 50
/// samples at HZ=250).
///
/// /proc/stat is system-wide (not per network namespace), so a sampler measures everything on
/// that core: the server, its softirqs, and anything else pinned there.
#[derive(Debug, Clone)]
pub struct CpuSampler {
    cpu: usize,
    last: CpuTimes,
    at: Instant,
}

impl CpuSampler {
    /// Starts measuring `cpu` now.
    pub fn new(cpu: usize) -> Result<Self> {
        Ok(Self {
            cpu,
            last: read_cpu(cpu)?,
            at: Instant::now(),
        })
    }

    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Busy percent (0–100) since `new` or the previous call; restarts the interval.
    pub fn busy_percent(&mut self) -> Result<f64> {
        let now = read_cpu(self.cpu)?;
        let at = Instant::now();
        let pct = busy_between(self.last, now, at - self.at, clock_ticks()?);
        self.last = now;
        self.at = at;
        Ok(pct)
    }

    /// Sleeps `interval` and returns the busy percent over it.
    pub fn measure(cpu: usize, interval: Duration) -> Result<f64> {
        let mut s = Self::new(cpu)?;
        std::thread::sleep(interval);
        s.busy_percent()
    }
}

/// Busy percent between two readings `wall` apart, /proc/stat counting `ticks_per_s`; 0 when
/// no time passed.
pub fn busy_between(before: CpuTimes, after: CpuTimes, wall: Duration, ticks_per_s: f64) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    let idle_s = after.idle.saturating_sub(before.idle) as f64 / ticks_per_s;
    (100.0 * (1.0 - idle_s / wall.as_secs_f64())).clamp(0.0, 100.0)
}

/// The unit of /proc/stat and of /proc/<pid>/stat's CPU times (`USER_HZ`).
pub fn clock_ticks() -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "cannot read the clock tick rate");
    Ok(hz as f64)
}

fn read_cpu(cpu: usize) -> Result<CpuTimes> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    parse_proc_stat(&text, cpu)
}

/// Where `lab-client` is and how to run it in a namespace.
#[derive(Debug, Clone)]
pub struct LabClient {
    bin: PathBuf,
}

impl LabClient {
    /// Environment variable that overrides where `lab-client` is looked for.
    pub const ENV: &'static str = "GUARD_LAB_CLIENT";

    /// A `lab-client` at a known path (integration tests: `env!("CARGO_BIN_EXE_lab-client")`).
    pub fn at(bin: impl Into<PathBuf>) -> Self {
        Self { bin: bin.into() }
    }

    /// Finds `lab-client`: `$GUARD_LAB_CLIENT`, else next to the running executable or one
    /// directory up (cargo puts test binaries in `target/<profile>/deps/`, binaries in
    /// `target/<profile>/`, which is also where `xtask` runs from).
    pub fn locate() -> Result<Self> {
        if let Some(path) = std::env::var_os(Self::ENV) {
            let path = PathBuf::from(path);
            ensure!(
                path.is_file(),
                "${} points to {}, which is not a file",
                Self::ENV,
                path.display()
            );
            return Ok(Self::at(path));
        }
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let dir = exe.parent().context("executable has no directory")?;
        for candidate in [dir.join("lab-client"), dir.join("../lab-client")] {
            if candidate.is_file() {
                return Ok(Self::at(candidate));
            }
        }
        bail!(
            "lab-client not found next to {}: build it with `cargo build -p guard-tests --bin \
             lab-client` (same profile) or set ${}",
            exe.display(),
            Self::ENV
        )
    }

    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// The command for `lab-client args...` inside `ns`, optionally pinned to `cpu`.
    pub fn command(&self, ns: &Netns, args: &[String], cpu: Option<usize>) -> Command {
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = ns.command("taskset");
                c.args(["-c", &cpu.to_string()]).arg(&self.bin);
                c
            }
            None => ns.command(&self.bin),
        };
        cmd.args(args);
        cmd
    }

    /// Starts `lab-client args...` in `ns`; `wait` gives its parsed JSON report. `budget`
    /// bounds how long `wait` waits before stopping it (lab-client bounds itself too; this is
    /// the second fence).
    pub fn spawn<T: DeserializeOwned>(
        &self,
        ns: &Netns,
        args: &[String],
        cpu: Option<usize>,
        budget: Duration,
    ) -> Result<ClientRun<T>> {
        let label = format!(
            "lab-client {}",
            args.first().map(String::as_str).unwrap_or("")
        );
        let child = ChildGuard::spawn(&label, &mut self.command(ns, args, cpu))?;
        Ok(ClientRun {
            child,
            budget,
            _report: PhantomData,
        })
    }

    /// Runs `lab-client args...` in `ns` to completion and parses its report.
    pub fn run<T: DeserializeOwned>(
        &self,
        ns: &Netns,
        args: &[String],
        budget: Duration,
    ) -> Result<T> {
        self.spawn(ns, args, None, budget)?.wait()
    }
}

/// A running `lab-client`; dropping it stops it.
pub struct ClientRun<T> {
    child: ChildGuard,
    budget: Duration,
    _report: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> ClientRun<T> {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Waits for it and parses the JSON line it printed.
    pub fn wait(self) -> Result<T> {
        let label = self.child.label().to_string();
        let done = self.child.wait_timeout(self.budget)?;
        done.ensure_success(&label)?;
        parse_report_line(&done.stdout).with_context(|| format!("{label}: bad report"))
    }

    /// Waits until it printed `needle` on stderr (servers announce readiness this way).
    pub fn wait_ready(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.child.wait_for_stderr(needle, timeout)
    }

    /// Stops it (SIGINT: lab-client prints its report so far) and parses the report.
    pub fn stop(self) -> Result<T> {
        let label = self.child.label().to_string();
        let done = self.child.stop()?;
        done.ensure_success(&label)?;
        parse_report_line(&done.stdout).with_context(|| format!("{label}: bad report"))
    }
}

/// Parses the last non-empty stdout line as JSON.
pub fn parse_report_line<T: DeserializeOwned>(stdout: &str) -> Result<T> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not a report: {line:?}"))
}

/// Lost-SYN probe: `n` sequential TCP connects from `src_ip` (which must be an address of
/// `ns`) to `dst:port`, 10 ms apart, each given 3 s (enough for one SYN retransmission at
/// ~1 s). Uses `LabClient::locate()`; see `syn_loss_probe_with` for the knobs.
pub fn syn_loss_probe(
    ns: &Netns,
    src_ip: IpAddr,
    dst: IpAddr,
    port: u16,
    n: u32,
) -> Result<ProbeResult> {
    syn_loss_probe_with(&LabClient::locate()?, ns, src_ip, dst, port, n, 10, None)
}

/// `syn_loss_probe` with an explicit client, interval and CPU pin.
#[allow(clippy::too_many_arguments)]
pub fn syn_loss_probe_with(
    client: &LabClient,
    ns: &Netns,
    src_ip: IpAddr,
    dst: IpAddr,
    port: u16,
    n: u32,
    interval_ms: u32,
    cpu: Option<usize>,
) -> Result<ProbeResult> {
    let target = std::net::SocketAddr::new(dst, port);
    spawn_syn_loss_probe(
        client,
        ns,
        src_ip,
        target,
        n,
        interval_ms,
        cpu,
        Duration::ZERO,
    )?
    .wait()
}

/// Starts `n` connects from `src_ip` to `target`, `interval_ms` apart, the first after
/// `start_delay`, each given 3 s (one SYN retransmission, ~1 s, still connects and counts as
/// lost); bounded by its own run time.
#[allow(clippy::too_many_arguments)]
pub fn spawn_syn_loss_probe(
    client: &LabClient,
    ns: &Netns,
    src_ip: IpAddr,
    target: std::net::SocketAddr,
    n: u32,
    interval_ms: u32,
    cpu: Option<usize>,
    start_delay: Duration,
) -> Result<ClientRun<ProbeResult>> {
    ensure!(n > 0, "a probe needs at least one connect");
    let delay_ms = u64::try_from(start_delay.as_millis()).context("start delay too long")?;
    // Worst case: every connect times out after 3 s; that bounds how long to wait.
    let secs = (delay_ms + u64::from(n) * (u64::from(interval_ms) + 3_000)).div_ceil(1_000) + 1;
    let args: Vec<String> = [
        "probe",
        "--target",
        &target.to_string(),
        "--bind",
        &src_ip.to_string(),
        "--count",
        &n.to_string(),
        "--interval-ms",
        &interval_ms.to_string(),
        "--connect-timeout-ms",
        "3000",
        "--secs",
        &secs.to_string(),
        "--start-delay-ms",
        &delay_ms.to_string(),
    ]
    .map(String::from)
    .into();
    client.spawn(ns, &args, cpu, Duration::from_secs(secs + 5))
}

/// utime + stime of a process (all its threads) or kernel thread, in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line; the command name before
/// them may contain spaces and parentheses, so fields are counted after its last ')'.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU trafgen's sending process runs on: with `-P 1` trafgen forks one worker and pins
/// it to CPU 0 itself (`sched_setaffinity`), whatever `taskset` gave the parent.
pub const TRAFGEN_CPU: usize = 0;

/// A server core and an attacker core among `allowed` (`allowed_cpus()`): the attacker gets
/// [`TRAFGEN_CPU`], because that is where trafgen sends from anyway, so the flood's own cost
/// never lands on the core being measured. `None` with fewer than two CPUs or without CPU 0.
pub fn server_and_attacker_cpus(allowed: &[usize]) -> Option<(usize, usize)> {
    let attacker = allowed.iter().copied().find(|&c| c == TRAFGEN_CPU)?;
    let server = allowed.iter().copied().find(|&c| c != attacker)?;
    Some((server, attacker))
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(test)]
mod stat_tests {
    use super::*;

    #[test]
    fn the_attacker_gets_the_cpu_trafgen_sends_from() {
        assert_eq!(server_and_attacker_cpus(&[0, 1]), Some((1, 0)));
        assert_eq!(server_and_attacker_cpus(&[0, 1, 2, 3]), Some((1, 0)));
        assert_eq!(server_and_attacker_cpus(&[2, 0]), Some((2, 0)));
        assert_eq!(server_and_attacker_cpus(&[0]), None);
        assert_eq!(server_and_attacker_cpus(&[1, 2]), None);
    }

    #[test]
    fn proc_stat_ticks() {
        let line = "1234 (napi/eth0 (x) 1) S 2 0 0 0 -1 2129984 0 0 0 0 17 42 0 0 20 0 1 0 99";
        assert_eq!(parse_stat_ticks(line), Some(59));
        let napi = "4242 (napi/eth0-8193) S 2 0 0 0 -1 2129984 0 0 0 0 17 250 0 0 20 0 1 0 99 0 0";
        assert_eq!(parse_stat_ticks(napi), Some(267));
        assert_eq!(parse_stat_ticks("1234 (short) S 2"), None);
        assert_eq!(parse_stat_ticks("1 (a) b) S 0"), None);
        assert!(proc_cpu_ticks(std::process::id()).is_some());
        assert!(!allowed_cpus().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 1000 10 0 5 0 0 0\n\
                        cpu0 60 0 30 400 5 0 5 0 0 0\n\
                        cpu1 40 0 20 600 5 0 0 0 0 0\n\
                        intr 12345\n";

    #[test]
    fn proc_stat_parsing() {
        assert_eq!(
            parse_proc_stat(STAT, 0).unwrap(),
            CpuTimes {
                busy: 95,
                idle: 405
            }
        );
        assert_eq!(parse_proc_stat(STAT, 1).unwrap().busy, 60);
        assert!(parse_proc_stat(STAT, 2).is_err());
        assert!(parse_proc_stat("cpu0 1 2 3\n", 0).is_err());
        assert!(parse_proc_stat("cpu0 1 2 x 4 5 6 7 8\n", 0).is_err());
    }

    #[test]
    fn busy_share_is_the_wall_time_not_idle() {
        let a = CpuTimes {
            busy: 100,
            idle: 1000,
        };
        // 1.5 s of wall time, 0.6 s of it idle: 60 % busy, whatever the sampled busy
        // fields say.
        let b = CpuTimes {
            busy: 101,
            idle: 1060,
        };
        let wall = Duration::from_millis(1500);
        assert!((busy_between(a, b, wall, 100.0) - 60.0).abs() < 1e-9);
        assert_eq!(busy_between(a, b, Duration::ZERO, 100.0), 0.0);
        // Idle rounded up to a whole tick can exceed a short wall interval: never negative.
        assert_eq!(busy_between(a, b, Duration::from_millis(500), 100.0), 0.0);
    }

    #[test]
    fn sampler_reads_this_machine() {
        let mut s = CpuSampler::new(0).unwrap();
        let pct = s.busy_percent().unwrap();
        assert!((0.0..=100.0).contains(&pct), "{pct}");
        assert!(CpuSampler::new(100_000).is_err());
    }

    #[test]
    fn report_lines() {
        let r: crate::report::EchoReport = parse_report_line(
            "noise\n{\"cmd\":\"serve-echo\",\"accepted\":2,\"bytes_echoed\":5,\"elapsed_ms\":1}\n\n",
        )
        .unwrap();
        assert_eq!(r.accepted, 2);
        assert!(parse_report_line::<crate::report::EchoReport>("").is_err());
        assert!(parse_report_line::<crate::report::EchoReport>("{\"cmd\":1}").is_err());
    }
}
