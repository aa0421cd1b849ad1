//! The legitimate side of a phase: WebSocket chatters, SSE subscribers, the SYN-loss probe and
//! the timeline sampler (server-side CPU, server-core busy share, a steady trickle of connects
//! from the legit namespace), and what they report.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

use super::cpus::{enter_netns, pin_this_thread};
use super::{args, pause, Stack, LEGIT_CHAT, LEGIT_PROBE, LEGIT_SSE};
use crate::measure::proc_cpu_ticks;
use crate::report::{ProbeReport, SseReport, WsChatReport};
use crate::{ClientRun, CpuSampler};

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

pub(super) fn join<T>(handle: Option<JoinHandle<Result<T>>>) -> Result<T> {
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
/// (all pinned with the server, so the attack tools keep the other core) and the timeline
/// sampler.
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
