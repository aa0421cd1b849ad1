//! The stack's own attackers beyond the lab toolkit's floods: the slot hoarder (one source
//! holding connections open under any rate cap) and a flat-out random-source SYN flood.

use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::cpus::{enter_netns, pin_this_thread};
use super::legit::join;
use super::{Stack, APP_PORT};
use crate::lab::{self, Lab, SERVER_MAC, SERVER_V4};
use crate::tools::{trafgen_flat_out, Flood};

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
/// `crate::tools::trafgen_flat_out`).
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
