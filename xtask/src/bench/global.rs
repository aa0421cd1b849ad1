//! "Beyond per-source rates": a SYN flood from random sources across 198.19.0.0/16 passes any
//! per-source cap untouched (each source sends a handful). guard's answer is a global budget
//! of new connections: while it lasts everyone draws on it; when it runs dry only sources that
//! completed a handshake recently ("known good", marked by the sockops program on the server's
//! cgroup) still get in — a spoofed source never completes one.
//!
//! Here returning clients (8 legit sources that connected before the flood) keep connecting
//! through the flood, with guard XDP native and its per-source cap both times, once without
//! and once with the global budget; runs alternate. Reported: their connection success (the
//! handshake completed within 3 s, which allows one SYN retransmission), their connects that
//! lost the first SYN, the server core's CPU, and what the program counted.
#![cfg(feature = "lab")]

use std::time::Duration;

use anyhow::{ensure, Result};
use guard_common::stats::Stat;
use guard_tests::lab::{Lab, SERVER_MAC, SERVER_V4};
use guard_tests::rig::{legit_sources, CpuShares, Mode, Probes, Protection, Rig, PORT};
use guard_tests::stack::pause;
use guard_tests::tools::trafgen_flat_out;
use guard_tests::CpuSampler;
use serde::Serialize;

use super::table::{fmt_rate, mean, Goal, Table};
use guard_tests::stack::check_interrupted;

const FLOOD_NET: &str = "198.19.0.0/16";
/// The budget: all new connections together, per second, and at once.
const GLOBAL_RATE: u32 = 1_000;
const GLOBAL_BURST: u32 = 2_000;
const GOAL_SUCCESS_PCT: f64 = 99.0;

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    cycle: usize,
    global_budget: bool,
    /// Sources the sockops program marked known good before the flood.
    known_good: u64,
    sent_per_s: Option<f64>,
    /// The server core's busy share, and what serves the flood (see `Rig::cpu_snapshot`).
    core_busy_pct: f64,
    cpu: CpuShares,
    probes: Probes,
    dropped_global_budget: u64,
    passed_known_good: u64,
    passed_syn: u64,
    ring_drops: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GlobalReport {
    flood_net: &'static str,
    global_syn_rate: u32,
    global_syn_burst: u32,
    flood_secs: u32,
    runs: Vec<Run>,
}

pub fn run(rig: &mut Rig, quick: bool) -> Result<GlobalReport> {
    let (cycles, per_source, flood_secs, warmup): (usize, u32, u32, Duration) = if quick {
        (1, 25, 5, Duration::from_millis(1_000))
    } else {
        (2, 50, 7, Duration::from_millis(1_500))
    };
    let sources = legit_sources();
    println!(
        "\n== Global budget: random sources in {FLOOD_NET} (trafgen, as fast as it goes) vs {} returning clients x {per_source} connects; \
         guard XDP native, per-source cap on; global_syn_rate={GLOBAL_RATE} global_syn_burst={GLOBAL_BURST} or off",
        sources.len()
    );
    let mut runs = Vec::new();
    for cycle in 0..cycles {
        let order = if cycle.is_multiple_of(2) {
            [false, true]
        } else {
            [true, false]
        };
        for global_budget in order {
            check_interrupted()?;
            let sets: Vec<String> = if global_budget {
                vec![
                    format!("global_syn_rate={GLOBAL_RATE}"),
                    format!("global_syn_burst={GLOBAL_BURST}"),
                ]
            } else {
                Vec::new()
            };
            let protection = rig.protect(Mode::XdpNative, &sets)?;
            let Protection::Guard(agent) = &protection else {
                unreachable!("XDP native is a guard mode");
            };
            // The clients come back: each completed handshakes before the flood.
            let warm = rig.start_probes(&sources, 3, 100, Duration::ZERO)?.wait()?;
            ensure!(
                warm.connected == warm.attempted,
                "returning clients could not connect before the flood: {warm:?}"
            );
            let known_good = agent
                .maps()?
                .known_good
                .keys()
                .filter(Result::is_ok)
                .count() as u64;
            let stat = |s| agent.stat(s);
            let before = [
                stat(Stat::DropGlobalBudget)?,
                stat(Stat::PassKnownGood)?,
                stat(Stat::PassSyn)?,
            ];
            let ring_before = rig.counters(&protection)?;
            let flood = trafgen_flat_out(
                &rig.lab.attacker,
                Lab::attacker_if(),
                FLOOD_NET,
                SERVER_V4,
                SERVER_MAC,
                PORT,
                flood_secs,
                Some(rig.attacker_cpu),
            )?;
            let probes = rig.start_probes(&sources, per_source, 80, warmup)?;
            pause(warmup)?;
            let mut core = CpuSampler::new(rig.server_cpu)?;
            let ours = rig.cpu_snapshot(&protection)?;
            let probes = probes.wait()?;
            let core_busy_pct = core.busy_percent()?;
            let cpu = rig.cpu_snapshot(&protection)?.shares_since(&ours);
            let sent = flood.wait()?.sent;
            let after = [
                stat(Stat::DropGlobalBudget)?,
                stat(Stat::PassKnownGood)?,
                stat(Stat::PassSyn)?,
            ];
            let ring = rig.counters(&protection)?.since(&ring_before).ring_drops;
            rig.unprotect(protection)?;
            let run = Run {
                cycle,
                global_budget,
                known_good,
                sent_per_s: sent.map(|n| n as f64 / f64::from(flood_secs)),
                core_busy_pct,
                cpu,
                probes,
                dropped_global_budget: after[0] - before[0],
                passed_known_good: after[1] - before[1],
                passed_syn: after[2] - before[2],
                ring_drops: ring,
            };
            println!(
                "  cycle {} budget {:<3}  sent {:>7}/s  server-side {:>5.1}% (napi {:>5.1}%)  connected {}/{}  lost first SYN {}  known good {}",
                cycle + 1,
                if global_budget { "on" } else { "off" },
                run.sent_per_s.map_or("-".into(), fmt_rate),
                run.cpu.server_side_pct,
                run.cpu.napi_pct,
                run.probes.connected,
                run.probes.attempted,
                run.probes.lost_syn,
                run.known_good,
            );
            runs.push(run);
        }
    }
    let report = GlobalReport {
        flood_net: FLOOD_NET,
        global_syn_rate: GLOBAL_RATE,
        global_syn_burst: GLOBAL_BURST,
        flood_secs,
        runs,
    };
    report.print();
    Ok(report)
}

impl GlobalReport {
    fn totals(&self, budget: bool) -> (Probes, Vec<&Run>) {
        let of: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| r.global_budget == budget)
            .collect();
        let mut p = Probes::default();
        for r in &of {
            p.attempted += r.probes.attempted;
            p.connected += r.probes.connected;
            p.lost_syn += r.probes.lost_syn;
            p.timed_out += r.probes.timed_out;
            p.failed += r.probes.failed;
        }
        (p, of)
    }

    fn print(&self) {
        let mut t = Table::new(&[
            "returning clients",
            "flood sent/s",
            "server %",
            "µs/SYN",
            "connected",
            "success %",
            "lost 1st SYN",
            "global drops/s",
            "known-good pass",
            "ring drops/s",
        ]);
        for budget in [false, true] {
            let (p, of) = self.totals(budget);
            if of.is_empty() {
                continue;
            }
            let per_s = |f: fn(&Run) -> u64| {
                mean(
                    &of.iter()
                        .map(|r| f(r) as f64 / f64::from(self.flood_secs))
                        .collect::<Vec<_>>(),
                )
            };
            t.row(vec![
                if budget {
                    format!("global budget {}/s", self.global_syn_rate)
                } else {
                    "per-source cap only".into()
                },
                fmt_rate(mean(
                    &of.iter().filter_map(|r| r.sent_per_s).collect::<Vec<_>>(),
                )),
                format!(
                    "{:.1}",
                    mean(&of.iter().map(|r| r.cpu.server_side_pct).collect::<Vec<_>>())
                ),
                // Server-side CPU per flood SYN that reached the server: what the budget saves
                // per packet, independent of how fast the tool happened to send.
                format!(
                    "{:.2}",
                    mean(
                        &of.iter()
                            .filter_map(|r| {
                                let arrived = r.sent_per_s?
                                    - r.ring_drops as f64 / f64::from(self.flood_secs);
                                (arrived > 0.0)
                                    .then(|| r.cpu.server_side_pct / 100.0 / arrived * 1e6)
                            })
                            .collect::<Vec<_>>()
                    )
                ),
                format!("{}/{}", p.connected, p.attempted),
                format!("{:.2}", p.success_pct()),
                p.lost_syn.to_string(),
                fmt_rate(per_s(|r| r.dropped_global_budget)),
                of.iter()
                    .map(|r| r.passed_known_good)
                    .sum::<u64>()
                    .to_string(),
                fmt_rate(per_s(|r| r.ring_drops)),
            ]);
        }
        t.print();
    }

    pub fn goals(&self) -> Vec<Goal> {
        let (with, of) = self.totals(true);
        let (without, _) = self.totals(false);
        vec![Goal::new(
            "global budget: returning clients connect during a random-source flood",
            ">= 99% with the budget",
            format!(
                "{:.2}% with, {:.2}% without",
                with.success_pct(),
                without.success_pct()
            ),
            (!of.is_empty()).then(|| with.success_pct() >= GOAL_SUCCESS_PCT),
        )]
    }
}
