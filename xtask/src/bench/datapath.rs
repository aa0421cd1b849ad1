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
#![cfg(feature = "lab")]

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Pass,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    const BOTH: [Hook; 2] = [Hook::Xdp, Hook::Tc];

    fn kind(self) -> AttachKind {
        match self {
            Hook::Xdp => AttachKind::XdpNative,
            Hook::Tc => AttachKind::Tc,
        }
    }

    fn retval(self, v: Verdict) -> u32 {
        match (self, v) {
            (Hook::Xdp, Verdict::Pass) => XDP_PASS,
            (Hook::Xdp, Verdict::Drop) => XDP_DROP,
            (Hook::Tc, Verdict::Pass) => TC_ACT_OK,
            (Hook::Tc, Verdict::Drop) => TC_ACT_SHOT,
        }
    }
}

/// One verdict path: the frame that takes it, the live config it needs, and the counter that
/// proves it was taken.
struct PathDef {
    key: &'static str,
    label: &'static str,
    frame: Vec<u8>,
    verdict: Verdict,
    stat: Stat,
    config: fn(&mut LiveConfig),
}

/// Every path but the allow-listed one runs as the agent configures a host
/// without an operator allowlist (the program then skips that lookup); the
/// blocklist holds an entry throughout, as during an attack.
fn paths() -> Vec<PathDef> {
    let syn = |a, b, c, d| Frame::syn(v4(a, b, c, d), PORT);
    vec![
        PathDef {
            key: "pass_unprotected",
            label: "pass: not TCP (UDP to the port)",
            frame: syn(198, 18, 0, 2).udp(PORT).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassUnprotected,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
        },
        PathDef {
            key: "pass_allowlisted",
            label: "pass: allow-listed SYN",
            frame: syn(198, 18, 0, 16).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassAllowlisted,
            config: |_| {},
        },
        PathDef {
            key: "pass_syn_admitted",
            label: "pass: SYN admitted (tracked, under cap)",
            frame: syn(198, 18, 0, 10).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassSyn,
            config: |c| {
                c.flags |= FLAG_ALLOW_EMPTY;
                c.syn_burst = HUGE_BURST;
            },
        },
        PathDef {
            key: "pass_not_syn",
            label: "pass: ACK (not a SYN)",
            frame: syn(198, 18, 0, 2).tcp_flags(TCP_ACK).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::PassNotSyn,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
        },
        PathDef {
            key: "drop_blocked",
            label: "drop: blocked source",
            frame: syn(198, 18, 0, 12).bytes(),
            verdict: Verdict::Drop,
            stat: Stat::DropBlocked,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
        },
        PathDef {
            key: "drop_source_rate",
            label: "drop: source over its SYN cap",
            frame: syn(198, 18, 0, 2).bytes(),
            verdict: Verdict::Drop,
            stat: Stat::DropSourceRate,
            config: |c| c.flags |= FLAG_ALLOW_EMPTY,
        },
        PathDef {
            key: "drop_aggregate",
            label: "drop: /24 over its aggregate cap",
            // Its own /24, so its aggregate entry is not shared with the other paths.
            frame: syn(198, 18, 1, 14).bytes(),
            verdict: Verdict::Drop,
            stat: Stat::DropAggregateRate,
            config: |c| {
                c.flags |= FLAG_ALLOW_EMPTY;
                c.syn_burst = HUGE_BURST;
                c.aggregate_rate = 1;
                c.aggregate_burst = 1;
            },
        },
        PathDef {
            key: "dry_run_would_drop",
            label: "dry-run: would drop (over cap), passes",
            frame: syn(198, 18, 0, 2).bytes(),
            verdict: Verdict::Pass,
            stat: Stat::WouldDropSourceRate,
            config: |c| c.flags |= FLAG_DRY_RUN | FLAG_ALLOW_EMPTY,
        },
    ]
}

/// The config every measurement starts from: guard's defaults (20 SYN/s, burst 40), each IPv6
/// address its own source (for the population), and a wide event interval.
fn base_config() -> LiveConfig {
    LiveConfig {
        source_prefix_v6: 128,
        event_interval_ms: EVENT_INTERVAL_MS,
        ..LiveConfig::DEFAULT
    }
}

/// The `i`-th population source, inside 2001:2::/48 (never 2001:2::1, the frames' target).
fn population_ip(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        2,
        0,
        0x100 | (i >> 16) as u16,
        0,
        0,
        0,
        i as u16,
    ))
}

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
struct Loaded {
    dp: Datapath,
    tracked: u32,
}

impl Loaded {
    fn load() -> Result<Self> {
        let mut dp = Datapath::load(&small_sizes(), None).context("load the guard program")?;
        dp.maps_mut().set_ports(&[PORT])?;
        dp.maps_mut().set_config(&base_config())?;
        dp.maps_mut()
            .insert_allow(&Prefix::host(v4(198, 18, 0, 16)))?;
        dp.maps_mut().insert_block(
            &Prefix::host(v4(198, 18, 0, 12)),
            &BlockEntry {
                expires_ns: 0,
                reason: guard_common::state::reason::OPERATOR,
                _pad: 0,
            },
        )?;
        Ok(Self { dp, tracked: 0 })
    }

    fn fd(&self, hook: Hook) -> BorrowedFd<'_> {
        self.dp.program_fd(hook.kind())
    }

    fn stats(&self) -> Result<[u64; STAT_SLOTS as usize]> {
        Ok(self.dp.maps().stat_totals()?)
    }

    fn stat(&self, stat: Stat) -> Result<u64> {
        Ok(self.stats()?[stat.index() as usize])
    }

    fn set_config(&mut self, f: fn(&mut LiveConfig)) -> Result<()> {
        let mut cfg = base_config();
        f(&mut cfg);
        self.dp.maps_mut().set_config(&cfg)?;
        Ok(())
    }

    /// One timed call: `repeat` runs of the path's frame; checks the verdict and that the
    /// path's counter moved for (nearly) every run.
    fn time_path(&self, path: &PathDef, hook: Hook, repeat: u32) -> Result<Sample> {
        check_interrupted()?;
        let before = self.stat(path.stat)?;
        let run = test_run(self.fd(hook), &path.frame, repeat)
            .with_context(|| format!("test-run {} on {hook:?}", path.key))?;
        let moved = self.stat(path.stat)? - before;
        ensure!(
            run.retval == hook.retval(path.verdict),
            "{} on {hook:?}: verdict {} instead of {:?}",
            path.key,
            run.retval,
            path.verdict
        );
        // A capped source earns a token now and then (20/s): a handful of the runs may take
        // another path; more than 0.1% would mean a mislabelled number.
        ensure!(
            moved as f64 >= f64::from(repeat) * 0.999,
            "{} on {hook:?}: {:?} moved {moved} times in {repeat} runs",
            path.key,
            path.stat,
        );
        Ok(Sample {
            hook,
            tracked: self.tracked,
            ns: run.duration_ns,
        })
    }

    /// One SYN from population source `i`, run once.
    fn syn_once(&self, hook: Hook, i: u32) -> Result<f64> {
        let frame = Frame::syn(population_ip(i), PORT).bytes();
        Ok(f64::from(test_run(self.fd(hook), &frame, 1)?.duration_ns))
    }

    fn insert_from_user(&mut self, range: std::ops::Range<u32>) -> Result<()> {
        let now = monotonic_ns();
        let state = SourceState::new(LiveConfig::DEFAULT.syn_burst, now);
        for i in range {
            if i.is_multiple_of(50_000) {
                check_interrupted()?;
            }
            self.dp
                .maps_mut()
                .sources
                .insert(from_ip(population_ip(i)), state, 0)
                .with_context(|| format!("insert source #{i}"))?;
            self.tracked += 1;
        }
        Ok(())
    }

    /// Inserts by test-running one SYN per new source; returns each run's ns.
    fn insert_by_test_run(&mut self, range: std::ops::Range<u32>) -> Result<Vec<f64>> {
        let created_before = self.stat(Stat::SourcesCreated)?;
        let mut ns = Vec::with_capacity(range.len());
        for i in range.clone() {
            if i.is_multiple_of(10_000) {
                check_interrupted()?;
            }
            ns.push(self.syn_once(Hook::Xdp, i)?);
        }
        let created = self.stat(Stat::SourcesCreated)? - created_before;
        ensure!(
            created == range.len() as u64,
            "test-run population created {created} of {} sources",
            range.len()
        );
        self.tracked += created as u32;
        Ok(ns)
    }

    fn count_sources(&self) -> u64 {
        self.dp.maps().sources.keys().filter(Result::is_ok).count() as u64
    }

    /// `n` never-seen sources (past the population's range) each send one SYN while cookies
    /// answer every unproven source (`always`). Not `under-attack` with a spent budget: the
    /// budget refills with wall-clock time, so a million single runs (several seconds) would
    /// see a token come back and a SYN admitted; the cookie path itself is the same code.
    fn cookie_flood(&mut self, n: u32) -> Result<CookieFlood> {
        for slot in 0..guard_common::syncookie::KEY_SLOTS {
            let key = guard_common::syncookie::CookieKey {
                k0: 0x5eed_0000 + u64::from(slot),
                k1: 0xc00c_1e00 + u64::from(slot),
            };
            self.dp.maps_mut().set_cookie_key(slot, &key)?;
        }
        self.set_config(|c| {
            c.flags |= FLAG_ALLOW_EMPTY;
            c.syn_cookies = guard_common::syncookie::MODE_ALWAYS;
        })?;
        let sources_before = self.count_sources();
        let sent_before = self.stat(Stat::CookieSent)?;
        let created_before = self.stat(Stat::SourcesCreated)?;
        let mut ns = Vec::with_capacity(n as usize);
        for i in 0..n {
            if i.is_multiple_of(10_000) {
                check_interrupted()?;
            }
            // What a Linux client sends: MSS, SACK, timestamps, window scale.
            let frame = Frame::syn(population_ip(MANY + i), PORT)
                .linux_syn_options(1440, i, 7)
                .bytes();
            let run = test_run(self.fd(Hook::Xdp), &frame, 1)?;
            ensure!(
                run.retval == guard_user::testrun::XDP_TX,
                "cookie flood: source #{i} got XDP action {} instead of a SYN-ACK",
                run.retval
            );
            ns.push(f64::from(run.duration_ns));
        }
        let cookies_sent = self.stat(Stat::CookieSent)? - sent_before;
        let created = self.stat(Stat::SourcesCreated)? - created_before;
        ensure!(
            cookies_sent == u64::from(n) && created == 0,
            "cookie flood: {cookies_sent} cookies for {n} SYNs, {created} sources tracked"
        );
        self.set_config(|_| {})?;
        Ok(CookieFlood {
            sources: n,
            median_ns: median(&ns),
            mean_ns: super::table::mean(&ns),
            sources_before,
            sources_after: self.count_sources(),
            cookies_sent,
        })
    }
}

/// Every path on both hooks and both tables: `runs` calls each, the tables alternating which
/// goes first.
fn measure_paths(
    few: &mut Loaded,
    many: &mut Loaded,
    paths: &[PathDef],
    repeat: u32,
    runs: usize,
) -> Result<Vec<PathResult>> {
    let mut out = Vec::new();
    for path in paths {
        few.set_config(path.config)?;
        many.set_config(path.config)?;
        // Warm-up: brings a rate-capped source over its cap, caches and branch predictors to
        // steady state.
        for t in [&*few, &*many] {
            for hook in Hook::BOTH {
                test_run(t.fd(hook), &path.frame, 1_000)?;
            }
        }
        let mut samples = Vec::new();
        for r in 0..runs {
            for hook in Hook::BOTH {
                let order = if r.is_multiple_of(2) {
                    [&*few, &*many]
                } else {
                    [&*many, &*few]
                };
                for t in order {
                    samples.push(t.time_path(path, hook, repeat)?);
                }
            }
        }
        few.set_config(|_| {})?;
        many.set_config(|_| {})?;
        let pick = |hook: Hook, tracked: u32| {
            let v: Vec<f64> = samples
                .iter()
                .filter(|x| x.hook == hook && x.tracked == tracked)
                .map(|x| f64::from(x.ns))
                .collect();
            median(&v)
        };
        out.push(PathResult {
            key: path.key,
            label: path.label,
            verdict: path.verdict,
            xdp_few_ns: pick(Hook::Xdp, few.tracked),
            xdp_many_ns: pick(Hook::Xdp, many.tracked),
            tc_few_ns: pick(Hook::Tc, few.tracked),
            tc_many_ns: pick(Hook::Tc, many.tracked),
            samples,
        });
    }
    Ok(out)
}

/// Admitted SYNs from tracked sources, each run once, the two tables interleaved: the small
/// table cycles through its thousand (which stay cache-resident), the big one never repeats a
/// source (so its entries come from memory).
fn rotation(few: &Loaded, many: &Loaded, n: u32) -> Result<Vec<RotationResult>> {
    // Each small-table source is hit n/1000 times per hook; stay well under its burst of 40.
    ensure!(
        2 * n / FEW < LiveConfig::DEFAULT.syn_burst,
        "rotation of {n} would push the thousand sources over their cap"
    );
    let far = spread(2 * n, MANY);
    let mut out = Vec::new();
    for (h, hook) in Hook::BOTH.into_iter().enumerate() {
        let mut ns_few = Vec::with_capacity(n as usize);
        let mut ns_many = Vec::with_capacity(n as usize);
        let before = [
            few.stat(Stat::PassSyn)?,
            many.stat(Stat::PassSyn)?,
            many.stat(Stat::SourcesCreated)?,
        ];
        for k in 0..n {
            if k.is_multiple_of(10_000) {
                check_interrupted()?;
            }
            let far_key = far[h * n as usize + k as usize];
            if k.is_multiple_of(2) {
                ns_few.push(few.syn_once(hook, k % FEW)?);
                ns_many.push(many.syn_once(hook, far_key)?);
            } else {
                ns_many.push(many.syn_once(hook, far_key)?);
                ns_few.push(few.syn_once(hook, k % FEW)?);
            }
        }
        let admitted_few = few.stat(Stat::PassSyn)? - before[0];
        let admitted_many = many.stat(Stat::PassSyn)? - before[1];
        ensure!(
            admitted_few == u64::from(n) && admitted_many == u64::from(n),
            "rotation on {hook:?}: {admitted_few} and {admitted_many} of {n} admitted"
        );
        let reinserted = many.stat(Stat::SourcesCreated)? - before[2];
        for (t, ns, reinserted) in [(few, ns_few, 0), (many, ns_many, reinserted)] {
            out.push(RotationResult {
                hook,
                tracked: u64::from(t.tracked),
                runs: ns.len() as u64,
                median_ns: median(&ns),
                mean_ns: super::table::mean(&ns),
                reinserted,
            });
        }
    }
    Ok(out)
}

/// A deterministic spread of `n` distinct indices below `below` (a stride coprime with it),
/// so rotations touch entries all over the table without a random-number crate.
fn spread(n: u32, below: u32) -> Vec<u32> {
    let stride = 7_919u64; // prime, and no power of ten or two divides it
    (0..u64::from(n))
        .map(|k| ((k * stride) % u64::from(below)) as u32)
        .collect()
}

/// `bytes_memlock` of the `SOURCES` map when created with `entries` entries.
fn sources_memlock(entries: u32) -> Result<u64> {
    // Removed (unloaded) on every way out, like the agent's own pins.
    let pins = Pins::new("bench")?;
    let layout = pins.layout();
    let sizes = MapSizes {
        sources: entries,
        ..small_sizes()
    };
    let _dp = Datapath::load(&sizes, Some(&layout)).context("load the program with pins")?;
    let out = run_checked(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(layout.map(names::SOURCES)),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("bpftool's JSON")?;
    v["bytes_memlock"]
        .as_u64()
        .or_else(|| v["bytes_memlock"].as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("no bytes_memlock in {out}"))
}

/// Every map but `SOURCES` kept small: the bench exercises one table.
fn small_sizes() -> MapSizes {
    MapSizes {
        sources: SOURCES_BIG,
        aggregates: 1024,
        allow: 64,
        block: 1024,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_distinct_and_in_range() {
        let v = spread(200_000, MANY);
        let set: std::collections::HashSet<u32> = v.iter().copied().collect();
        assert_eq!(set.len(), v.len());
        assert!(v.iter().all(|&i| i < MANY));
    }

    #[test]
    fn population_stays_in_the_benchmarking_range() {
        for i in [0, 1, 65_535, 65_536, MANY - 1] {
            let IpAddr::V6(ip) = population_ip(i) else {
                panic!("not IPv6")
            };
            assert_eq!(ip.segments()[..3], [0x2001, 2, 0]);
            assert_ne!(ip, "2001:2::1".parse::<Ipv6Addr>().unwrap());
        }
        let all: std::collections::HashSet<IpAddr> = (0..MANY).map(population_ip).collect();
        assert_eq!(all.len(), MANY as usize);
    }
}
