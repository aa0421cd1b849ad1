//! The loaded program and what is timed on it: every path on both hooks, the rotation over
//! many tracked sources, the population, the kernel memory per source.

use super::*;

pub(super) struct Loaded {
    dp: Datapath,
    tracked: u32,
}

impl Loaded {
    pub(super) fn load() -> Result<Self> {
        let mut dp = Datapath::load(&small_sizes(), None).context("load the guard program")?;
        dp.maps_mut().set_ports(&[PORT])?;
        dp.maps_mut().set_config(&base_config())?;
        dp.maps_mut()
            .insert_allow(&Prefix::host(v4(198, 18, 0, 16)))?;
        dp.maps_mut().insert_block(
            &Prefix::host(blocked_ip()),
            &BlockEntry {
                expires_ns: 0,
                reason: guard_common::state::reason::OPERATOR,
                _pad: 0,
            },
        )?;
        Ok(Self { dp, tracked: 0 })
    }

    pub(super) fn program(&self, hook: Hook) -> &LoadedProgram {
        self.dp.program(hook.kind())
    }

    pub(super) fn stats(&self) -> Result<[u64; STAT_SLOTS as usize]> {
        Ok(self.dp.maps().stat_totals()?)
    }

    pub(super) fn stat(&self, stat: Stat) -> Result<u64> {
        Ok(self.stats()?[stat.index() as usize])
    }

    pub(super) fn set_config(&mut self, f: fn(&mut LiveConfig)) -> Result<()> {
        let mut cfg = base_config();
        f(&mut cfg);
        self.dp.maps_mut().set_config(&cfg)?;
        Ok(())
    }

    /// One timed call: `repeat` runs of the path's frame; checks the verdict and that the
    /// path's counter moved for (nearly) every run.
    pub(super) fn time_path(&self, path: &PathDef, hook: Hook, repeat: u32) -> Result<Sample> {
        check_interrupted()?;
        let before = self.stat(path.stat)?;
        let run = test_run(self.program(hook), &path.frame, repeat)
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
            program: Program::Guard,
            tracked: self.tracked,
            ns: run.duration_ns,
        })
    }

    /// One SYN from population source `i`, run once.
    pub(super) fn syn_once(&self, hook: Hook, i: u32) -> Result<f64> {
        let frame = Frame::syn(population_ip(i), PORT).bytes();
        Ok(f64::from(
            test_run(self.program(hook), &frame, 1)?.duration_ns,
        ))
    }

    pub(super) fn insert_from_user(&mut self, range: std::ops::Range<u32>) -> Result<()> {
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
    pub(super) fn insert_by_test_run(&mut self, range: std::ops::Range<u32>) -> Result<Vec<f64>> {
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

    pub(super) fn count_sources(&self) -> u64 {
        self.dp.maps().sources.keys().filter(Result::is_ok).count() as u64
    }

    /// `n` never-seen sources per address family each send one SYN while cookies answer
    /// every unproven source (`always`); each SYN also goes through the kernel-helper cookie
    /// reference, the same with guard's MAC, the minimal SYN-ACK and the empty program,
    /// interleaved source by source.
    /// Single runs: an answered frame comes back as its SYN-ACK, so a repeated run would not
    /// see a SYN. Not `under-attack` with a spent budget: the budget refills with wall-clock
    /// time, so a million single runs (several seconds) would see a token come back and a
    /// SYN admitted; the cookie path itself is the same code.
    /// `dry` runs the same SYNs in dry-run: everything guard checks before it answers, and
    /// no answer, which splits guard's cost into its checks and its answer.
    pub(super) fn cookie_flood(
        &mut self,
        dry: &mut Loaded,
        refs: &Refs,
        n: u32,
        blocks: usize,
    ) -> Result<CookieFlood> {
        for t in [&mut *self, &mut *dry] {
            for slot in 0..guard_common::syncookie::KEY_SLOTS {
                t.dp.maps_mut().set_cookie_key(slot, &BENCH_COOKIE_KEY)?;
            }
        }
        self.set_config(|c| {
            c.flags |= FLAG_ALLOW_EMPTY;
            c.syn_cookies = guard_common::syncookie::MODE_ALWAYS;
        })?;
        dry.set_config(|c| {
            c.flags |= FLAG_ALLOW_EMPTY | FLAG_DRY_RUN;
            c.syn_cookies = guard_common::syncookie::MODE_ALWAYS;
        })?;
        let would_before = dry.stat(Stat::WouldCookie)?;
        let dry_created_before = dry.stat(Stat::SourcesCreated)?;
        let sources_before = self.count_sources();
        let sent_before = self.stat(Stat::CookieSent)?;
        let created_before = self.stat(Stat::SourcesCreated)?;
        let programs = [
            (Program::Guard, self.program(Hook::Xdp), XDP_TX),
            (
                Program::KernelCookie,
                refs.program(Hook::Xdp, Ref::KernelCookie)?,
                XDP_TX,
            ),
            (
                Program::GuardCookie,
                refs.program(Hook::Xdp, Ref::GuardCookie)?,
                XDP_TX,
            ),
            (Program::GuardDryRun, dry.program(Hook::Xdp), XDP_PASS),
            (Program::Tx, refs.program(Hook::Xdp, Ref::Tx)?, XDP_TX),
            (
                Program::Empty,
                refs.program(Hook::Xdp, Ref::Empty(Verdict::Pass))?,
                XDP_PASS,
            ),
        ];
        let mut families = Vec::new();
        for family in [Family::V4, Family::V6] {
            // ns per program, in the order of `programs`.
            let mut ns: [Vec<f64>; 6] = Default::default();
            for i in 0..n {
                if i.is_multiple_of(10_000) {
                    check_interrupted()?;
                }
                // What a Linux client sends: MSS, SACK, timestamps, window scale.
                let frame = Frame::syn(family.source(i), PORT)
                    .linux_syn_options(1440, i, 7)
                    .bytes();
                // Each program goes first as often as the others.
                for k in 0..programs.len() {
                    let at = (k + i as usize) % programs.len();
                    let (program, loaded, want) = programs[at];
                    let run = test_run(loaded, &frame, 1)?;
                    ensure!(
                        run.retval == want,
                        "cookie flood: {program:?} answered {family:?} source #{i} with XDP \
                         action {} instead of {want}",
                        run.retval
                    );
                    ns[at].push(f64::from(run.duration_ns));
                }
            }
            families.push(CookieFamily::from_samples(family, &ns, blocks));
        }
        let cookies_sent = self.stat(Stat::CookieSent)? - sent_before;
        let created = self.stat(Stat::SourcesCreated)? - created_before;
        ensure!(
            cookies_sent == 2 * u64::from(n) && created == 0,
            "cookie flood: {cookies_sent} cookies for {} SYNs, {created} sources tracked",
            2 * n
        );
        let would = dry.stat(Stat::WouldCookie)? - would_before;
        let dry_created = dry.stat(Stat::SourcesCreated)? - dry_created_before;
        ensure!(
            would == 2 * u64::from(n) && dry_created == 0,
            "cookie flood in dry-run: {would} would-cookie verdicts for {} SYNs, {dry_created} \
             sources tracked",
            2 * n
        );
        self.set_config(|_| {})?;
        dry.set_config(|_| {})?;
        Ok(CookieFlood {
            sources: n,
            families,
            sources_before,
            sources_after: self.count_sources(),
            cookies_sent,
        })
    }
}

/// The cookie computation alone, the kernel's against guard's (beside the empty program),
/// `repeat` times per call, `runs` rounds, each program first in turn, per address family.
pub(super) fn cookie_calc(refs: &Refs, repeat: u32, runs: usize) -> Result<Vec<CookieCalc>> {
    let programs = [
        (Program::KernelCookie, Ref::KernelCookieCalc),
        (Program::GuardCookie, Ref::GuardCookieCalc),
        (Program::Empty, Ref::Empty(Verdict::Pass)),
    ];
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let frame = Frame::syn(family.source(0), PORT)
            .linux_syn_options(1440, 1, 7)
            .bytes();
        for (program, r) in programs {
            time_program(
                refs.program(Hook::Xdp, r)?,
                program,
                &frame,
                Hook::Xdp,
                XDP_PASS,
                1_000,
            )?;
        }
        let mut ns: [Vec<f64>; 3] = Default::default();
        for round in 0..runs {
            for k in 0..programs.len() {
                let at = (k + round) % programs.len();
                let (program, r) = programs[at];
                let loaded = refs.program(Hook::Xdp, r)?;
                let sample = time_program(loaded, program, &frame, Hook::Xdp, XDP_PASS, repeat)?;
                ns[at].push(f64::from(sample.ns));
            }
        }
        let per_round: Vec<f64> = (0..runs)
            .map(|i| (ns[1][i] - ns[2][i]) / (ns[0][i] - ns[2][i]))
            .collect();
        out.push(CookieCalc {
            family,
            kernel_ns: median(&ns[0]),
            guard_ns: median(&ns[1]),
            empty_ns: median(&ns[2]),
            ratio: Spread::of(&per_round),
        });
    }
    Ok(out)
}

/// One reference run: `repeat` runs of `frame` through `loaded`, which must answer `want`.
pub(super) fn time_program(
    loaded: &LoadedProgram,
    program: Program,
    frame: &[u8],
    hook: Hook,
    want: u32,
    repeat: u32,
) -> Result<Sample> {
    check_interrupted()?;
    let run = test_run(loaded, frame, repeat).with_context(|| format!("test-run {program:?}"))?;
    ensure!(
        run.retval == want,
        "{program:?} on {hook:?}: verdict {} instead of {want}",
        run.retval
    );
    Ok(Sample {
        hook,
        program,
        tracked: 0,
        ns: run.duration_ns,
    })
}

/// Every path on both hooks and both tables, each call beside the same call on the path's
/// reference and on the empty program of its action (and, for the blocked source on XDP,
/// xdp-filter): `runs` rounds, each program going first in turn.
pub(super) fn measure_paths(
    few: &mut Loaded,
    many: &mut Loaded,
    refs: &Refs,
    peer: &XdpFilter,
    paths: &[PathDef],
    repeat: u32,
    runs: usize,
) -> Result<Vec<PathResult>> {
    let mut out = Vec::new();
    for path in paths {
        few.set_config(path.config)?;
        many.set_config(path.config)?;
        let with_peer = |hook: Hook| hook == Hook::Xdp && path.key == PEER_PATH;
        // One timed call of each program in a round, by index.
        let call = |hook: Hook, which: usize, n: u32| -> Result<Sample> {
            let want = hook.retval(path.verdict);
            match which {
                0 => few.time_path(path, hook, n),
                1 => many.time_path(path, hook, n),
                2 => time_program(
                    refs.program(hook, path.reference)?,
                    Program::Reference,
                    &path.frame,
                    hook,
                    want,
                    n,
                ),
                3 => time_program(
                    refs.program(hook, Ref::Empty(path.verdict))?,
                    Program::Empty,
                    &path.frame,
                    hook,
                    want,
                    n,
                ),
                _ => time_program(peer.program(), Program::Peer, &path.frame, hook, want, n),
            }
        };
        let count = |hook: Hook| if with_peer(hook) { 5 } else { 4 };
        // Warm-up: brings a rate-capped source over its cap, caches and branch predictors to
        // steady state.
        for hook in Hook::BOTH {
            for t in [&*few, &*many] {
                test_run(t.program(hook), &path.frame, 1_000)?;
            }
            for which in 2..count(hook) {
                call(hook, which, 1_000)?;
            }
        }
        let mut samples = Vec::new();
        for r in 0..runs {
            for hook in Hook::BOTH {
                let k = count(hook);
                for j in 0..k {
                    samples.push(call(hook, (j + r) % k, repeat)?);
                }
            }
        }
        few.set_config(|_| {})?;
        many.set_config(|_| {})?;
        out.push(PathResult::from_samples(
            path,
            samples,
            few.tracked,
            many.tracked,
            with_peer(Hook::Xdp).then(|| peer.name.clone()),
        ));
    }
    Ok(out)
}

/// Admitted SYNs from tracked sources, each run once, the two tables interleaved: the small
/// table cycles through its thousand (which stay cache-resident), the big one never repeats a
/// source (so its entries come from memory).
pub(super) fn rotation(few: &Loaded, many: &Loaded, n: u32) -> Result<Vec<RotationResult>> {
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
                mean_ns: super::super::table::mean(&ns),
                reinserted,
            });
        }
    }
    Ok(out)
}

/// A deterministic spread of `n` distinct indices below `below` (a stride coprime with it),
/// so rotations touch entries all over the table without a random-number crate.
pub(super) fn spread(n: u32, below: u32) -> Vec<u32> {
    let stride = 7_919u64; // prime, and no power of ten or two divides it
    (0..u64::from(n))
        .map(|k| ((k * stride) % u64::from(below)) as u32)
        .collect()
}

/// `bytes_memlock` of the `SOURCES` map when created with `entries` entries.
pub(super) fn sources_memlock(entries: u32) -> Result<u64> {
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
pub(super) fn small_sizes() -> MapSizes {
    MapSizes {
        sources: SOURCES_BIG,
        aggregates: 1024,
        allow: 64,
        block: 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn spread_is_distinct_and_in_range() {
        let v = spread(200_000, MANY);
        let set: std::collections::HashSet<u32> = v.iter().copied().collect();
        assert_eq!(set.len(), v.len());
        assert!(v.iter().all(|&i| i < MANY));
    }
}
