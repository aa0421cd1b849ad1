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
            &Prefix::host(v4(198, 18, 0, 12)),
            &BlockEntry {
                expires_ns: 0,
                reason: guard_common::state::reason::OPERATOR,
                _pad: 0,
            },
        )?;
        Ok(Self { dp, tracked: 0 })
    }

    pub(super) fn fd(&self, hook: Hook) -> BorrowedFd<'_> {
        self.dp.program_fd(hook.kind())
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
    pub(super) fn syn_once(&self, hook: Hook, i: u32) -> Result<f64> {
        let frame = Frame::syn(population_ip(i), PORT).bytes();
        Ok(f64::from(test_run(self.fd(hook), &frame, 1)?.duration_ns))
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

    /// `n` never-seen sources (past the population's range) each send one SYN while cookies
    /// answer every unproven source (`always`). Not `under-attack` with a spent budget: the
    /// budget refills with wall-clock time, so a million single runs (several seconds) would
    /// see a token come back and a SYN admitted; the cookie path itself is the same code.
    pub(super) fn cookie_flood(&mut self, n: u32) -> Result<CookieFlood> {
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
            mean_ns: super::super::table::mean(&ns),
            sources_before,
            sources_after: self.count_sources(),
            cookies_sent,
        })
    }
}

/// Every path on both hooks and both tables: `runs` calls each, the tables alternating which
/// goes first.
pub(super) fn measure_paths(
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
