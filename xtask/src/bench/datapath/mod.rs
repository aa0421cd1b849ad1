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
//! - Every path is read against references measured in the same run, on the same CPU and
//!   through the same harness, call by call (`refs`): the cheapest program that takes the
//!   path's verdict (it reads what any per-source SYN filter must, plus one lookup of the
//!   source where the verdict depends on it), the empty program (the harness's own cost),
//!   xdp-filter for the blocked source. A ratio is taken per round (guard's call over the
//!   reference's call beside it), so a slow moment of a shared machine lands on both; the
//!   goals read the median of those ratios, the nanoseconds are kept for reading. The
//!   calling thread is pinned to one CPU for the whole section.
//! - The cookie answer changes the frame, so it is timed one run per call, from never-seen
//!   IPv4 and IPv6 sources, beside a responder built on the kernel's
//!   `bpf_tcp_raw_gen_syncookie_*` helper, the same responder with guard's MAC, guard in
//!   dry-run (its checks before answering), a minimal SYN-ACK and the empty program. Single
//!   runs tick at the kernel clock's granularity (10 ns on some machines), so they are read
//!   as interquartile means with the empty program's taken off. The cookie computation alone
//!   (kernel helper against guard's MAC) leaves the frame as it is and is repeated like the
//!   paths.
//!
//! Sources for the million come from 2001:2::/48 (the IPv6 benchmarking range) with the source
//! prefix set to /128 for the run: no real traffic is involved, but every address stays in the
//! lab's ranges.
//!
//! Here: the report and its tables; `paths` the verdict paths (frames, configs, counters);
//! `measure` the loaded program and what is timed on it; `refs` what it is measured against.
#![cfg(feature = "lab")]

mod measure;
mod paths;
mod refs;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

use anyhow::{ensure, Context as _, Result};
use aya::programs::Program as LoadedProgram;
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
use guard_user::testrun::{test_run, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX};
use serde::Serialize;

use super::table::{fmt_ratio, iq_mean, median, ratio, Goal, Spread, Table};
use guard_tests::stack::check_interrupted;

use measure::{cookie_calc, measure_paths, rotation, sources_memlock, Loaded};
use paths::{base_config, paths, population_ip, Hook, PathDef, Verdict};
use refs::{Ref, Refs, XdpFilter};

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
/// The source the blocklist holds (and xdp-filter drops).
const BLOCKED: [u8; 4] = [198, 18, 0, 12];
fn blocked_ip() -> IpAddr {
    let [a, b, c, d] = BLOCKED;
    v4(a, b, c, d)
}

/// The key the bench's cookies are made with (guard's slots and the reference alike).
const BENCH_COOKIE_KEY: guard_common::syncookie::CookieKey = guard_common::syncookie::CookieKey {
    k0: 0x5eed_0000_0000_0001,
    k1: 0xc00c_1e00_0000_0002,
};

/// The path measured against xdp-filter too.
const PEER_PATH: &str = "drop_blocked";
/// Issue 27: every pass and drop path within twice the minimal program of its action.
const GOAL_VS_MINIMAL: f64 = 2.0;
/// Issue 27: the blocked-source drop no slower than xdp-filter. The two sit at parity (quick
/// runs on a 2-core VM under builds: medians 0.97-1.00x, single rounds 0.83-1.04x), so "no
/// slower" is read within 5%, the spread of one run's rounds; a plain 1.0 line would flip
/// between runs of the same program.
const GOAL_VS_PEER: f64 = 1.05;
/// Issue 27: the cookie answer no slower than the kernel's natively compiled cookie.
const GOAL_VS_KERNEL_COOKIE: f64 = 1.0;
/// Issue "Foundation": the drop path flat from 1 thousand to 1 million tracked sources.
const GOAL_FLAT: f64 = 1.2;

/// Which program a timed call ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Program {
    Guard,
    /// The path's reference (`PathDef::reference`).
    Reference,
    /// The empty program of the path's action.
    Empty,
    /// xdp-filter.
    Peer,
    /// The kernel-helper cookie answer.
    KernelCookie,
    /// The same answer with guard's MAC.
    GuardCookie,
    /// Guard in dry-run: its checks before a cookie answer, without the answer.
    GuardDryRun,
    /// The minimal SYN-ACK (fixed ISN).
    Tx,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    key: &'static str,
    label: &'static str,
    verdict: Verdict,
    xdp: HookResult,
    tc: HookResult,
    /// Every call's mean, in the order measured, for whoever wants the spread.
    samples: Vec<Sample>,
}

/// One path on one hook: medians of ns/packet, and guard over the references per round.
#[derive(Debug, Clone, Serialize)]
pub struct HookResult {
    few_ns: f64,
    many_ns: f64,
    reference: Ref,
    reference_ns: f64,
    empty_ns: f64,
    /// The slower of guard's two tables in each round over the reference in that round.
    vs_reference: Spread,
    /// The same over xdp-filter, for the path measured against it.
    peer: Option<PeerResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    name: String,
    ns: f64,
    ratio: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct Sample {
    hook: Hook,
    program: Program,
    /// Sources guard's table tracked (0 for the references).
    tracked: u32,
    ns: u32,
}

impl PathResult {
    fn from_samples(
        path: &PathDef,
        samples: Vec<Sample>,
        few: u32,
        many: u32,
        peer: Option<String>,
    ) -> Self {
        let series = |hook: Hook, program: Program, tracked: u32| -> Vec<f64> {
            samples
                .iter()
                .filter(|x| x.hook == hook && x.program == program && x.tracked == tracked)
                .map(|x| f64::from(x.ns))
                .collect()
        };
        let hook_result = |hook: Hook| {
            let g_few = series(hook, Program::Guard, few);
            let g_many = series(hook, Program::Guard, many);
            let worse: Vec<f64> = g_few.iter().zip(&g_many).map(|(a, b)| a.max(*b)).collect();
            let reference = series(hook, Program::Reference, 0);
            let per_round = |reference: &[f64]| -> Vec<f64> {
                worse.iter().zip(reference).map(|(g, r)| g / r).collect()
            };
            let peer_ns = series(hook, Program::Peer, 0);
            HookResult {
                few_ns: median(&g_few),
                many_ns: median(&g_many),
                reference: path.reference,
                reference_ns: median(&reference),
                empty_ns: median(&series(hook, Program::Empty, 0)),
                vs_reference: Spread::of(&per_round(&reference)),
                peer: match (&peer, peer_ns.is_empty()) {
                    (Some(name), false) => Some(PeerResult {
                        name: name.clone(),
                        ns: median(&peer_ns),
                        ratio: Spread::of(&per_round(&peer_ns)),
                    }),
                    _ => None,
                },
            }
        };
        Self {
            key: path.key,
            label: path.label,
            verdict: path.verdict,
            xdp: hook_result(Hook::Xdp),
            tc: hook_result(Hook::Tc),
            samples,
        }
    }

    fn hook(&self, hook: Hook) -> &HookResult {
        match hook {
            Hook::Xdp => &self.xdp,
            Hook::Tc => &self.tc,
        }
    }
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
/// dry): one test-run SYN per source, each answered with a cookie SYN-ACK, beside the same SYN
/// through the references.
#[derive(Debug, Clone, Serialize)]
pub struct CookieFlood {
    /// Sources per address family.
    sources: u32,
    families: Vec<CookieFamily>,
    /// `SOURCES` entries before and after: a cookie stores nothing.
    sources_before: u64,
    sources_after: u64,
    cookies_sent: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    /// The `i`-th spoofed source: 198.19.0.0/16 for IPv4 (the lab's spoofed range,
    /// `guard_tests::lab::SPOOF_NET`), past the population's range in 2001:2::/48 for IPv6.
    fn source(self, i: u32) -> IpAddr {
        match self {
            Family::V4 => v4(198, 19, (i >> 8) as u8, i as u8),
            Family::V6 => population_ip(MANY + i),
        }
    }
}

/// The cookie answer of one address family: interquartile means of single runs (each
/// includes the harness's clock read, which the empty program measures), and guard over the
/// kernel-helper reference per block of sources.
#[derive(Debug, Clone, Serialize)]
pub struct CookieFamily {
    family: Family,
    guard_ns: f64,
    kernel_cookie_ns: f64,
    guard_mac_ns: f64,
    /// Guard in dry-run on the same SYN: its checks before deciding to answer.
    guard_checks_ns: f64,
    minimal_synack_ns: f64,
    empty_ns: f64,
    /// guard / kernel cookie as measured (the clock read included).
    raw_ratio: Spread,
    /// The same with the empty program's median taken off both: what the programs cost.
    net_ratio: Spread,
    /// guard's MAC in the reference's answer over the kernel's cookie in it, the empty
    /// program's median taken off both: the cookie computation alone, all else equal.
    mac_ratio: Spread,
    /// guard's answer alone (guard minus guard in dry-run) over the kernel-helper reference's
    /// answer (it minus the empty program): the part of guard's path a responder does.
    answer_ratio: Spread,
}

impl CookieFamily {
    /// `ns` per program in the order guard, kernel cookie, guard's MAC, guard in dry-run,
    /// minimal SYN-ACK, empty; the ratios are taken per block of consecutive sources,
    /// `blocks` of them.
    fn from_samples(family: Family, ns: &[Vec<f64>; 6], blocks: usize) -> Self {
        let len = ns[0].len();
        let size = len.div_ceil(blocks.max(1)).max(1);
        let (mut raw, mut net, mut mac, mut answer) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for start in (0..len).step_by(size) {
            let end = (start + size).min(len);
            let m = |k: usize| iq_mean(&ns[k][start..end]);
            let (g, kc, gm, checks, empty) = (m(0), m(1), m(2), m(3), m(5));
            raw.push(g / kc);
            net.push((g - empty) / (kc - empty));
            mac.push((gm - empty) / (kc - empty));
            answer.push((g - checks) / (kc - empty));
        }
        Self {
            family,
            guard_ns: iq_mean(&ns[0]),
            kernel_cookie_ns: iq_mean(&ns[1]),
            guard_mac_ns: iq_mean(&ns[2]),
            guard_checks_ns: iq_mean(&ns[3]),
            minimal_synack_ns: iq_mean(&ns[4]),
            empty_ns: iq_mean(&ns[5]),
            raw_ratio: Spread::of(&raw),
            net_ratio: Spread::of(&net),
            mac_ratio: Spread::of(&mac),
            answer_ratio: Spread::of(&answer),
        }
    }
}

/// The cookie computation alone, repeated on one SYN (ns/packet medians over the rounds).
#[derive(Debug, Clone, Serialize)]
pub struct CookieCalc {
    family: Family,
    kernel_ns: f64,
    guard_ns: f64,
    empty_ns: f64,
    /// guard's over the kernel's, the empty program taken off both, per round.
    ratio: Spread,
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
    cookie_calc: Vec<CookieCalc>,
    memory: Memory,
}

/// One loaded program with its own `SOURCES` table (sized 1<<20) and how many sources it
/// tracks. The bench loads two side by side, so every measurement of the thousand-source table
/// sits right next to the same measurement of the million-source one.
pub fn run(quick: bool) -> Result<DatapathReport> {
    let (repeat, runs, rotation_n, cookie_n) = if quick {
        (200_000, 5, 5_000, 100_000)
    } else {
        (1_000_000, 7, 15_000, 250_000)
    };
    println!(
        "\n== Datapath: ns per packet through BPF_PROG_TEST_RUN (median of {runs} calls x {repeat} repeats), \
         and guard / the reference beside it"
    );
    // Every test run executes on the calling thread's CPU: one CPU throughout, so guard and
    // its references always share caches and frequency.
    let _pinned = PinnedThread::to_last_cpu()?;
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
            .map(|_| test_run(few.program(Hook::Xdp), &udp, 1).map(|r| f64::from(r.duration_ns)))
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

    let refs = Refs::load(&paths::drop_sources()?, &BENCH_COOKIE_KEY)?;
    let peer = XdpFilter::load(blocked_ip()).context("set up xdp-filter, the peer")?;
    let paths = measure_paths(&mut few, &mut many, &refs, &peer, &paths(), repeat, runs)?;
    drop(peer);
    let rotation = rotation(&few, &many, rotation_n)?;
    let cookie_flood = few.cookie_flood(&mut many, &refs, cookie_n, runs)?;
    let cookie_calc = cookie_calc(&refs, repeat, runs)?;
    let report = DatapathReport {
        repeat,
        runs,
        paths,
        rotation,
        population,
        cookie_flood,
        cookie_calc,
        memory,
    };
    report.print();
    Ok(report)
}

/// The calling thread pinned to one CPU; its former CPU set restored on drop.
struct PinnedThread {
    before: libc::cpu_set_t,
}

impl PinnedThread {
    fn to_last_cpu() -> Result<Self> {
        // SAFETY: cpu_set_t is a plain bit array, and these calls read or write exactly
        // `size_of::<cpu_set_t>()` bytes of the local sets (pid 0: this thread).
        let before = unsafe {
            let mut before: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut before) != 0 {
                return Err(std::io::Error::last_os_error()).context("read this thread's CPUs");
            }
            let last = (0..libc::CPU_SETSIZE as usize)
                .rev()
                .find(|&c| libc::CPU_ISSET(c, &before))
                .context("this thread may run on no CPU")?;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(last, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("pin this thread to CPU {last}"));
            }
            println!("datapath: measuring on CPU {last}");
            before
        };
        Ok(Self { before })
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        // SAFETY: as above, restoring the set read at the start.
        let rc = unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.before)
        };
        if rc != 0 {
            eprintln!(
                "warning: cannot restore this thread's CPUs: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl DatapathReport {
    fn print(&self) {
        for hook in Hook::BOTH {
            let name = match hook {
                Hook::Xdp => "XDP",
                Hook::Tc => "tc",
            };
            let mut t = Table::new(&[
                &format!("{name}: path (ns/packet)"),
                "guard 1k",
                "guard 1M",
                "1M/1k",
                "reference",
                "ref",
                "empty",
                "guard / ref (min / median / max)",
            ]);
            for p in &self.paths {
                let h = p.hook(hook);
                t.row(vec![
                    p.label.into(),
                    format!("{:.0}", h.few_ns),
                    format!("{:.0}", h.many_ns),
                    fmt_ratio(ratio(h.many_ns, h.few_ns)),
                    h.reference.label().into(),
                    format!("{:.0}", h.reference_ns),
                    format!("{:.0}", h.empty_ns),
                    h.vs_reference.fmt_ratio(),
                ]);
            }
            t.print();
        }
        for p in &self.paths {
            if let Some(peer) = &p.xdp.peer {
                println!(
                    "XDP {}: guard {:.0} ns (worse table {:.0}), {} {:.0} ns: guard / peer {}",
                    p.label,
                    p.xdp.few_ns,
                    p.xdp.few_ns.max(p.xdp.many_ns),
                    peer.name,
                    peer.ns,
                    peer.ratio.fmt_ratio()
                );
            }
        }
        let mut t = Table::new(&[
            "XDP cookie answer, never-seen source (repeat=1, IQ mean ns)",
            "guard",
            "kernel cookie",
            "guard's MAC",
            "guard dry-run",
            "min SYN-ACK",
            "empty",
            "guard / kernel",
            "net of empty (min / median / max)",
            "MAC / kernel",
            "answer / kernel",
        ]);
        for f in &self.cookie_flood.families {
            t.row(vec![
                format!("{:?} ({} sources)", f.family, self.cookie_flood.sources),
                format!("{:.0}", f.guard_ns),
                format!("{:.0}", f.kernel_cookie_ns),
                format!("{:.0}", f.guard_mac_ns),
                format!("{:.0}", f.guard_checks_ns),
                format!("{:.0}", f.minimal_synack_ns),
                format!("{:.0}", f.empty_ns),
                format!("{:.2}x", f.raw_ratio.median),
                f.net_ratio.fmt_ratio(),
                format!("{:.2}x", f.mac_ratio.median),
                format!("{:.2}x", f.answer_ratio.median),
            ]);
        }
        t.print();
        let mut t = Table::new(&[
            "XDP cookie computed only, one SYN repeated (ns/packet)",
            "kernel helper",
            "guard's MAC",
            "empty",
            "guard / kernel, net of empty (min / median / max)",
        ]);
        for k in &self.cookie_calc {
            t.row(vec![
                format!("{:?}", k.family),
                format!("{:.0}", k.kernel_ns),
                format!("{:.0}", k.guard_ns),
                format!("{:.0}", k.empty_ns),
                k.ratio.fmt_ratio(),
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
        for f in &c.families {
            goals.push(Goal::new(
                &format!(
                    "datapath XDP: {:?} SYN from a never-seen source, cookie answer",
                    f.family
                ),
                "<= 1.0x the kernel-helper cookie",
                format!(
                    "{:.2}x net of the empty program ({:.0} vs {:.0} ns, empty {:.0}); \
                     its answer alone {:.2}x, its checks before it {:.0} ns (dry-run)",
                    f.net_ratio.median,
                    f.guard_ns,
                    f.kernel_cookie_ns,
                    f.empty_ns,
                    f.answer_ratio.median,
                    f.guard_checks_ns - f.empty_ns,
                ),
                Some(f.net_ratio.median <= GOAL_VS_KERNEL_COOKIE),
            ));
        }
        for k in &self.cookie_calc {
            goals.push(Goal::new(
                &format!("datapath XDP: {:?} cookie computed, guard's MAC", k.family),
                "<= 1.0x the kernel's cookie helper",
                format!(
                    "{:.2}x net of the empty program ({:.0} vs {:.0} ns, empty {:.0})",
                    k.ratio.median, k.guard_ns, k.kernel_ns, k.empty_ns
                ),
                Some(k.ratio.median <= GOAL_VS_KERNEL_COOKIE),
            ));
        }
        goals.push(Goal::new(
            "datapath XDP: cookie flood tracks no source",
            "SOURCES unchanged",
            format!("{} -> {} entries", c.sources_before, c.sources_after),
            Some(c.sources_before == c.sources_after),
        ));
        for (hook, name) in [(Hook::Xdp, "XDP"), (Hook::Tc, "tc")] {
            for (verdict, what) in [(Verdict::Drop, "drop"), (Verdict::Pass, "pass")] {
                let worst = self
                    .paths
                    .iter()
                    .filter(|p| p.verdict == verdict)
                    .map(|p| (p.hook(hook).vs_reference.median, p.key))
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                let (r, key) = worst.unwrap_or((f64::NAN, "-"));
                goals.push(Goal::new(
                    &format!("datapath {name}: every {what} path"),
                    "<= 2.0x its reference",
                    format!("worst {r:.2}x ({key})"),
                    worst.map(|(r, _)| r <= GOAL_VS_MINIMAL),
                ));
            }
            let drop = self.paths.iter().find(|p| p.key == "drop_source_rate");
            let flat = drop.and_then(|p| {
                let h = p.hook(hook);
                ratio(h.many_ns, h.few_ns)
            });
            goals.push(Goal::new(
                &format!("datapath {name}: drop path 1M vs 1k sources"),
                "within 20%",
                fmt_ratio(flat),
                flat.map(|r| (1.0 / GOAL_FLAT..=GOAL_FLAT).contains(&r)),
            ));
        }
        let peer = self
            .paths
            .iter()
            .find_map(|p| p.xdp.peer.as_ref().map(|peer| (p, peer)));
        goals.push(Goal::new(
            "datapath XDP: blocked source dropped",
            "<= 1.0x xdp-filter (within 5%)",
            peer.map_or_else(
                || "not measured".into(),
                |(p, peer)| {
                    format!(
                        "{:.2}x ({:.0} vs {:.0} ns)",
                        peer.ratio.median,
                        p.xdp.few_ns.max(p.xdp.many_ns),
                        peer.ns
                    )
                },
            ),
            peer.map(|(_, peer)| peer.ratio.median <= GOAL_VS_PEER),
        ));
        goals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_ratios_take_the_empty_program_off_both_sides_per_block() {
        // Two blocks of two sources: guard, kernel cookie, guard's MAC, guard dry-run,
        // minimal SYN-ACK, empty.
        let ns: [Vec<f64>; 6] = [
            vec![300.0, 300.0, 500.0, 500.0],
            vec![200.0, 200.0, 300.0, 300.0],
            vec![150.0, 150.0, 200.0, 200.0],
            vec![250.0, 250.0, 400.0, 400.0],
            vec![110.0, 110.0, 110.0, 110.0],
            vec![100.0, 100.0, 100.0, 100.0],
        ];
        let f = CookieFamily::from_samples(Family::V4, &ns, 2);
        // Block 1: (300-100)/(200-100) = 2; block 2: (500-100)/(300-100) = 2.
        assert_eq!((f.net_ratio.min, f.net_ratio.max), (2.0, 2.0));
        // The MAC: (150-100)/100 = 0.5 and (200-100)/200 = 0.5.
        assert_eq!(f.mac_ratio.median, 0.5);
        // The answer: (300-250)/100 = 0.5 and (500-400)/200 = 0.5.
        assert_eq!(f.answer_ratio.median, 0.5);
        assert_eq!((f.raw_ratio.min, f.raw_ratio.max), (1.5, 500.0 / 300.0));
    }

    #[test]
    fn path_ratios_pair_each_round_and_take_the_slower_table() {
        let path = &paths()[0];
        let sample = |program, tracked, ns| Sample {
            hook: Hook::Xdp,
            program,
            tracked,
            ns,
        };
        let mut samples = Vec::new();
        for (few, many, reference) in [(30, 40, 20), (60, 50, 30), (45, 45, 45)] {
            samples.push(sample(Program::Guard, FEW, few));
            samples.push(sample(Program::Guard, MANY, many));
            samples.push(sample(Program::Reference, 0, reference));
            samples.push(sample(Program::Empty, 0, 10));
        }
        let r = PathResult::from_samples(path, samples, FEW, MANY, None);
        // Rounds: 40/20, 60/30, 45/45.
        assert_eq!(
            (
                r.xdp.vs_reference.min,
                r.xdp.vs_reference.median,
                r.xdp.vs_reference.max
            ),
            (1.0, 2.0, 2.0)
        );
        assert_eq!(
            (r.xdp.few_ns, r.xdp.many_ns, r.xdp.empty_ns),
            (45.0, 45.0, 10.0)
        );
        assert!(r.xdp.peer.is_none());
        assert!(
            r.tc.vs_reference.median.is_nan(),
            "no tc samples, no tc ratio"
        );
    }
}
