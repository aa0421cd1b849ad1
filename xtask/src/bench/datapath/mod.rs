//! The datapath micro-benchmark: the real program, loaded unpinned into this kernel, driven
//! through `BPF_PROG_TEST_RUN` with crafted frames, one verdict path at a time, on both hooks.
//!
//! What is measured and how:
//! - Each path runs `repeat` times inside the kernel per call; the kernel reports the mean ns
//!   per run (its timer stops while the loop is rescheduled, so a busy machine mostly adds
//!   spread, not bias). A path's number is the median over several calls, XDP and tc
//!   alternating. The path's verdict counter must move by (nearly) every run, so a number can
//!   never come from a different path than its label says.
//! - The same paths run with 1 thousand and then with 1 million sources in the `SOURCES` LRU
//!   (sized 1<<20, as a deployment expecting big floods would size it). A repeated frame keeps
//!   its own entry hot in the CPU cache, so these numbers isolate what the table's fill does to
//!   the hash lookup; rows marked "rotating" test-run many distinct tracked sources once each,
//!   which is what a flood from many sources costs when the table no longer fits the cache.
//! - Population: from user space (`BPF_MAP_UPDATE_ELEM` per key) or by test-running one SYN
//!   per new source (which also measures the program's new-source insert path). Both are
//!   timed on a sample and the faster one fills the rest.
//! - Kernel memory per tracked source: the `bytes_memlock` bpftool reports for the `SOURCES`
//!   map at 1<<20 and at 1<<10 entries (an LRU hash preallocates every entry), differenced.
//!
//! Sources for the million come from 2001:2::/48 (the IPv6 benchmarking range) with the source
//! prefix set to /128 for the run: no real traffic is involved, but every address stays in the
//! lab's ranges.
//!
//! Here: the report and its table; `paths` the verdict paths (frames, configs, counters);
//! `measure` the loaded program and what is timed on it.
#![cfg(feature = "lab")]

mod measure;
mod paths;

use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::BorrowedFd;
use std::time::Instant;

use anyhow::{ensure, Context as _, Result};
use guard_common::addr::{from_ip, Prefix};
use guard_common::config::{FLAG_ALLOW_EMPTY, FLAG_DRY_RUN};
use guard_common::maps as names;
use guard_common::stats::{Stat, STAT_SLOTS};
use guard_common::{BlockEntry, LiveConfig, SourceState};
use guard_tests::frames::{v4, Frame, TCP_ACK};
use guard_tests::pins::Pins;
use guard_tests::process::run_checked;
use guard_user::datapath::{monotonic_ns, Datapath, MapSizes};
use guard_user::paths::AttachKind;
use guard_user::testrun::{test_run, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS};
use serde::Serialize;

use super::table::{fmt_ratio, median, ratio, Goal, Table};
use guard_tests::stack::check_interrupted;

use measure::{measure_paths, rotation, sources_memlock, Loaded};
use paths::{base_config, paths, population_ip, Hook, PathDef, Verdict};

const PORT: u16 = 8080;
/// The big table: what the million tracked sources live in.
const SOURCES_BIG: u32 = 1 << 20;
const SOURCES_SMALL: u32 = 1 << 10;
const FEW: u32 = 1_000;
/// How many keys each population method inserts while being timed.
const NEW_SOURCE_SAMPLE: u32 = 20_000;
const MANY: u32 = 1_000_000;
/// A burst so large that a single source stays under its cap for every repetition, so the
/// admitted path can be repeated on one frame (the code path is the same as with any burst).
const HUGE_BURST: u32 = 2_000_000_000;
/// Over-cap events are raised once per source per interval (a slow path by design); the bench
/// does not drain the event ring, so it widens the interval to keep the ring from filling.
const EVENT_INTERVAL_MS: u32 = 3_600_000;
/// The goals of issue "Foundation".
const GOAL_NS: f64 = 100.0;
const GOAL_FLAT: f64 = 1.2;
/// Issue 12: a spoofed SYN answered with a cookie, single run.
const GOAL_COOKIE_NS: f64 = 150.0;

#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    key: &'static str,
    label: &'static str,
    verdict: Verdict,
    /// Median ns/packet per hook and population: [xdp 1k, xdp 1M, tc 1k, tc 1M].
    xdp_few_ns: f64,
    xdp_many_ns: f64,
    tc_few_ns: f64,
    tc_many_ns: f64,
    /// Every call's mean, in the order measured, for whoever wants the spread.
    samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    hook: Hook,
    tracked: u32,
    ns: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RotationResult {
    hook: Hook,
    tracked: u64,
    /// Distinct tracked sources test-run once each.
    runs: u64,
    median_ns: f64,
    mean_ns: f64,
    /// How many of them had been evicted by the LRU and were re-inserted instead.
    reinserted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Population {
    /// Keys per second through `BPF_MAP_UPDATE_ELEM` from user space, on a sample.
    user_insert_per_s: f64,
    /// Keys per second by test-running one SYN per new source, on the same sample size.
    test_run_per_s: f64,
    /// Which one filled the rest.
    chosen: &'static str,
    /// Wall time to go from 1 thousand to 1 million tracked sources.
    fill_s: f64,
    /// Entries found in the map afterwards (the LRU may evict before it is full).
    present: u64,
    /// The program's new-source path (LRU insert + charge), from the test-run sample: median
    /// ns of single runs (each includes one kernel clock read; see `floor_ns`).
    new_source_median_ns: f64,
    /// A single run of the cheapest path (UDP pass): what a repeat=1 number costs by itself.
    floor_ns: f64,
}

/// A spoofed flood from never-seen sources with cookies on (under attack, the global budget
/// dry): one test-run SYN per source, each answered with a cookie SYN-ACK.
#[derive(Debug, Clone, Serialize)]
pub struct CookieFlood {
    sources: u32,
    /// Median ns of single runs (each includes the `floor_ns` of a repeat=1 run).
    median_ns: f64,
    mean_ns: f64,
    /// `SOURCES` entries before and after: a cookie stores nothing.
    sources_before: u64,
    sources_after: u64,
    cookies_sent: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    memlock_big: u64,
    memlock_small: u64,
    entries_big: u32,
    entries_small: u32,
    bytes_per_source: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatapathReport {
    repeat: u32,
    runs: usize,
    paths: Vec<PathResult>,
    rotation: Vec<RotationResult>,
    population: Population,
    cookie_flood: CookieFlood,
    memory: Memory,
}

/// One loaded program with its own `SOURCES` table (sized 1<<20) and how many sources it
/// tracks. The bench loads two side by side, so every measurement of the thousand-source table
/// sits right next to the same measurement of the million-source one.
pub fn run(quick: bool) -> Result<DatapathReport> {
    let (repeat, runs, rotation_n, cookie_n) = if quick {
        (200_000, 5, 5_000, 100_000)
    } else {
        (1_000_000, 7, 15_000, MANY)
    };
    println!(
        "\n== Datapath: ns per packet through BPF_PROG_TEST_RUN (median of {runs} calls x {repeat} repeats)"
    );
    let memory = {
        let big = sources_memlock(SOURCES_BIG)?;
        let small = sources_memlock(SOURCES_SMALL)?;
        Memory {
            memlock_big: big,
            memlock_small: small,
            entries_big: SOURCES_BIG,
            entries_small: SOURCES_SMALL,
            bytes_per_source: (big as f64 - small as f64) / f64::from(SOURCES_BIG - SOURCES_SMALL),
        }
    };

    let mut few = Loaded::load()?;
    let mut many = Loaded::load()?;
    few.insert_from_user(0..FEW)?;
    many.insert_from_user(0..FEW)?;
    let floor = {
        let udp = Frame::syn(v4(198, 18, 0, 2), PORT).udp(PORT).bytes();
        let ns: Vec<f64> = (0..2_000)
            .map(|_| test_run(few.fd(Hook::Xdp), &udp, 1).map(|r| f64::from(r.duration_ns)))
            .collect::<Result<_, _>>()?;
        median(&ns)
    };

    // Fill the big table to a million: both ways timed on a sample, the faster does the rest.
    let sample = NEW_SOURCE_SAMPLE;
    let fill_start = Instant::now();
    let t = Instant::now();
    let new_source_ns = many.insert_by_test_run(FEW..FEW + sample)?;
    let test_run_per_s = f64::from(sample) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    many.insert_from_user(FEW + sample..FEW + 2 * sample)?;
    let user_insert_per_s = f64::from(sample) / t.elapsed().as_secs_f64();
    let rest = FEW + 2 * sample..MANY;
    let chosen = if user_insert_per_s >= test_run_per_s {
        many.insert_from_user(rest)?;
        "user-space insert"
    } else {
        many.insert_by_test_run(rest)?;
        "test-run SYNs"
    };
    let fill_s = fill_start.elapsed().as_secs_f64();
    let present = many.count_sources();
    println!(
        "population: user-space insert {user_insert_per_s:.0} keys/s, test-run SYNs {test_run_per_s:.0} keys/s \
         -> {chosen} filled the rest; 1k -> 1M took {fill_s:.1} s; {present} entries present"
    );
    let population = Population {
        user_insert_per_s,
        test_run_per_s,
        chosen,
        fill_s,
        present,
        new_source_median_ns: median(&new_source_ns),
        floor_ns: floor,
    };

    let paths = measure_paths(&mut few, &mut many, &paths(), repeat, runs)?;
    let rotation = rotation(&few, &many, rotation_n)?;
    let cookie_flood = few.cookie_flood(cookie_n)?;
    let report = DatapathReport {
        repeat,
        runs,
        paths,
        rotation,
        population,
        cookie_flood,
        memory,
    };
    report.print();
    Ok(report)
}

impl DatapathReport {
    fn print(&self) {
        let mut t = Table::new(&[
            "path (ns/packet)",
            "XDP 1k",
            "XDP 1M",
            "1M/1k",
            "tc 1k",
            "tc 1M",
            "1M/1k",
        ]);
        for p in &self.paths {
            t.row(vec![
                p.label.into(),
                format!("{:.0}", p.xdp_few_ns),
                format!("{:.0}", p.xdp_many_ns),
                fmt_ratio(ratio(p.xdp_many_ns, p.xdp_few_ns)),
                format!("{:.0}", p.tc_few_ns),
                format!("{:.0}", p.tc_many_ns),
                fmt_ratio(ratio(p.tc_many_ns, p.tc_few_ns)),
            ]);
        }
        t.print();
        let mut t = Table::new(&[
            "repeat=1, distinct sources",
            "hook",
            "tracked",
            "runs",
            "median ns",
            "re-inserted",
        ]);
        t.row(vec![
            "floor: UDP pass (one clock read)".into(),
            "xdp".into(),
            "-".into(),
            "2000".into(),
            format!("{:.0}", self.population.floor_ns),
            "-".into(),
        ]);
        t.row(vec![
            "new source: LRU insert + charge".into(),
            "xdp".into(),
            format!("{}k-{}k", FEW / 1000, (FEW + NEW_SOURCE_SAMPLE) / 1000),
            NEW_SOURCE_SAMPLE.to_string(),
            format!("{:.0}", self.population.new_source_median_ns),
            "all".into(),
        ]);
        t.row(vec![
            "never-seen source, SYN cookie (XDP_TX)".into(),
            "xdp".into(),
            format!(
                "{} -> {}",
                self.cookie_flood.sources_before, self.cookie_flood.sources_after
            ),
            self.cookie_flood.sources.to_string(),
            format!("{:.0}", self.cookie_flood.median_ns),
            "none".into(),
        ]);
        for r in &self.rotation {
            t.row(vec![
                "tracked source, rotating (admitted)".into(),
                format!("{:?}", r.hook).to_lowercase(),
                r.tracked.to_string(),
                r.runs.to_string(),
                format!("{:.0}", r.median_ns),
                r.reinserted.to_string(),
            ]);
        }
        t.print();
        println!(
            "kernel memory per tracked source: {:.1} bytes (SOURCES memlock {} B at {} entries, {} B at {})",
            self.memory.bytes_per_source,
            self.memory.memlock_big,
            self.memory.entries_big,
            self.memory.memlock_small,
            self.memory.entries_small
        );
    }

    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let c = &self.cookie_flood;
        goals.push(Goal::new(
            "datapath XDP: spoofed SYN from a never-seen source, cookie on",
            "<= 150 ns (repeat=1)",
            format!(
                "median {:.0} ns over {} sources (floor {:.0})",
                c.median_ns, c.sources, self.population.floor_ns
            ),
            Some(c.median_ns <= GOAL_COOKIE_NS),
        ));
        goals.push(Goal::new(
            "datapath XDP: cookie flood tracks no source",
            "SOURCES unchanged",
            format!("{} -> {} entries", c.sources_before, c.sources_after),
            Some(c.sources_before == c.sources_after),
        ));
        for (hook, name) in [(Hook::Xdp, "XDP"), (Hook::Tc, "tc")] {
            let worst = |verdict: Verdict| {
                self.paths
                    .iter()
                    .filter(|p| p.verdict == verdict)
                    .map(|p| {
                        let v = match hook {
                            Hook::Xdp => p.xdp_few_ns.max(p.xdp_many_ns),
                            Hook::Tc => p.tc_few_ns.max(p.tc_many_ns),
                        };
                        (v, p.key)
                    })
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .unwrap_or((f64::NAN, "-"))
            };
            for (verdict, what) in [(Verdict::Drop, "drop"), (Verdict::Pass, "pass")] {
                let (ns, key) = worst(verdict);
                goals.push(Goal::new(
                    &format!("datapath {name}: every {what} path"),
                    "< 100 ns/packet",
                    format!("worst {ns:.0} ns ({key})"),
                    Some(ns < GOAL_NS),
                ));
            }
            let drop = self.paths.iter().find(|p| p.key == "drop_source_rate");
            let flat = drop.and_then(|p| match hook {
                Hook::Xdp => ratio(p.xdp_many_ns, p.xdp_few_ns),
                Hook::Tc => ratio(p.tc_many_ns, p.tc_few_ns),
            });
            goals.push(Goal::new(
                &format!("datapath {name}: drop path 1M vs 1k sources"),
                "within 20%",
                fmt_ratio(flat),
                flat.map(|r| (1.0 / GOAL_FLAT..=GOAL_FLAT).contains(&r)),
            ));
        }
        goals
    }
}
