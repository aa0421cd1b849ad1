//! `cargo xtask demo`: the lab. Each scenario runs twice against the guarded demo app, first
//! truly without guard (no program loaded, no agent, the app reports to nobody), then with
//! the agent running, while legitimate clients keep chatting, subscribing and connecting.
//! Prints a table, writes it as Markdown and JSON plus an SVG chart into a report folder.
//!
//! The lab links the lab toolkit, whose agent crate builds the eBPF program at compile time;
//! that needs what `cargo xtask setup` installs. So plain xtask (no features) runs setup and
//! then re-runs itself with the `lab` feature, which holds the lab itself. Building xtask on a
//! fresh machine therefore never needs the eBPF toolchain.
//!
//! The scenarios and the report live here, the SVG chart in `chart`; the stack they run on
//! (app, agent, legit load, floods) is the lab toolkit's, `guard_tests::stack`.

use std::path::PathBuf;

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Four shorter scenarios (SYN flood, message flood, random sources, returning clients):
    /// the whole pipeline in about a minute, for CI.
    #[arg(long)]
    short: bool,
    /// After the report, leave the lab, app and agent up (no floods) until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Build and run release binaries (slower to build, truer CPU numbers).
    #[arg(long)]
    release: bool,
    /// Report folder (default: <workspace>/lab-report).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only this scenario (repeatable): syn-flood, conn-flood, storms, message-flood,
    /// slowloris, random-sources, slot-hoarder, returning-clients, adaptive, fleet (three
    /// guard hosts sharing blocks through a three-node NATS JetStream cluster).
    #[arg(long = "only", value_name = "SCENARIO")]
    only: Vec<String>,
}

#[cfg(not(feature = "lab"))]
pub fn main(_args: DemoArgs) -> anyhow::Result<()> {
    crate::exec_with_lab_feature("sudo -E cargo xtask demo")
}

#[cfg(feature = "lab")]
pub use lab::main;

#[cfg(feature = "lab")]
mod chart;

#[cfg(feature = "lab")]
mod lab {
    use std::fmt::Write as _;
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use anyhow::{bail, Context as _, Result};
    use guard_common::stats::Stat;
    use guard_tests::fleet::{self, FleetDemo};
    use guard_tests::report::{ConnFloodReport, ProbeReport};
    use guard_tests::slowhttptest;
    use serde::Serialize;
    use serde_json::json;

    use super::chart::{self, Row};
    use super::DemoArgs;
    use guard_tests::binaries::Binaries;
    use guard_tests::stack::{
        audit_ts_unix, install_signal_handlers, interrupted, metric, pause, Adaptive, AppOptions,
        ConnFlood, Counters, Cpus, FlatOutFlood, LegitLoad, LegitOutcome, Sample, SlotHoarder,
        Stack, Storm, StormKind, SLICE_SECS,
    };

    /// How long each phase's parts last.
    #[derive(Debug, Clone, Copy, Serialize)]
    struct Timing {
        /// Legit clients alone first: the baseline.
        warmup_secs: f64,
        attack_secs: u32,
        /// Legit clients alone after the attack: recovery.
        tail_secs: f64,
    }

    impl Timing {
        fn legit_secs(&self) -> u32 {
            (self.warmup_secs + f64::from(self.attack_secs) + self.tail_secs).ceil() as u32
        }
    }

    /// What the attack tool reported.
    struct Attack {
        summary: String,
        detail: serde_json::Value,
    }

    struct Scenario {
        key: &'static str,
        title: &'static str,
        /// Live config the run with guard sets through the control socket before the attack
        /// (`guard config --set`), without restarting anything.
        tune: &'static [&'static str],
        /// The agent's adaptive mode, for the run with guard.
        adaptive: Option<Adaptive>,
        /// How the app runs, the same in both runs.
        app: AppOptions,
        attack: fn(&Stack, &Timing) -> Result<Attack>,
        in_short: bool,
    }

    const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 7);
    /// The floods' fixed offered rates (shared/LAB.md: measure cost at a fixed rate): high
    /// enough to load the server core without guard, low enough that a shared attacker core
    /// sustains them.
    const ONE_SOURCE_PPS: u32 = 50_000;
    const RANDOM_SOURCES_PPS: u32 = 40_000;

    /// The slot hoarder's pace: three quarters of the default per-source cap (20/s), so the
    /// rate cap never fires, and the app it starves: 48 connection slots behind a backlog of 32
    /// (a small server, so that one source fills it within the attack).
    const HOARD_PER_SEC: u32 = 15;
    const HOARD_APP: AppOptions = AppOptions {
        backlog: 32,
        slots: Some(48),
    };
    /// First-time clients during the random-source flood: fresh legit addresses
    /// 198.18.0.40.. that never connected before.
    const FIRST_TIMER_BASE: u8 = 40;
    const FIRST_TIMERS: u8 = 16;
    /// The overload: many real sources (198.18.0.100..), each keeping 40 connections in
    /// flight and holding each for a second: 40 new connections a second per source, under
    /// the generous static cap of 50/s the scenario sets, and together far more than the app's
    /// slots hold.
    const OVERLOAD_SOURCE_BASE: u8 = 100;
    const OVERLOAD_SOURCES: u8 = 10;
    const OVERLOAD_PARALLEL: u32 = 40;
    const OVERLOAD_HOLD_MS: u32 = 1000;
    const OVERLOAD_APP: AppOptions = AppOptions {
        backlog: 64,
        slots: Some(200),
    };

    const SCENARIOS: [Scenario; 9] = [
        Scenario {
            key: "syn-flood",
            title: "1. SYN flood, one spoofed source (198.19.0.7, 50k SYN/s evenly paced)",
            tune: &[],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: syn_flood,
            in_short: true,
        },
        Scenario {
            key: "conn-flood",
            title: "2. TCP connection flood, one real source (lab-client conn-flood)",
            tune: &[],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: conn_flood,
            in_short: false,
        },
        Scenario {
            key: "storms",
            title: "3. WebSocket handshake + SSE subscription storms, one source",
            tune: &[],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: storms,
            in_short: false,
        },
        Scenario {
            key: "message-flood",
            title: "4. WebSocket message flood from an admitted client, then its reconnects",
            tune: &[],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: message_flood,
            in_short: true,
        },
        Scenario {
            key: "slowloris",
            title: "5. slowloris (slowhttptest, 1000 slow connections)",
            tune: &[],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: slowloris,
            in_short: false,
        },
        Scenario {
            key: "random-sources",
            title: "6. SYN flood, random sources in 198.19.0.0/16 (40k SYN/s evenly paced), aggregate /16 cap",
            tune: &[
                "aggregate_prefix_v4=16",
                "aggregate_rate=200",
                "aggregate_burst=400",
            ],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: random_sources,
            in_short: true,
        },
        Scenario {
            key: "slot-hoarder",
            title: "7. Slot hoarder: one source, 15 new connections/s (under its cap), none closed; app with 48 slots; conn_limit=20",
            tune: &["conn_limit=20"],
            adaptive: None,
            app: HOARD_APP,
            attack: slot_hoarder,
            in_short: false,
        },
        Scenario {
            key: "returning-clients",
            title: "8. Random-source SYN flood (trafgen flat out) vs returning and first-time clients; global budget 1000/s, SYN cookies under attack",
            tune: &[
                "global_syn_rate=1000",
                "global_syn_burst=2000",
                "known_good_ttl_s=600",
                "syn_cookies=under-attack",
            ],
            adaptive: None,
            app: AppOptions::ROOMY,
            attack: returning_clients,
            in_short: true,
        },
        Scenario {
            key: "adaptive",
            title: "9. Overload: 10 real sources at 40 connections/s each (under a static cap of 50/s); app with 200 slots; --adaptive",
            tune: &["syn_rate=50", "syn_burst=100"],
            adaptive: Some(Adaptive {
                floor_syn_rate: 12,
                floor_syn_burst: 12,
                step_percent: 50,
                calm_secs: 30,
            }),
            app: OVERLOAD_APP,
            attack: adaptive_overload,
            in_short: false,
        },
    ];

    /// One run of a scenario.
    #[derive(Debug, Clone, Serialize)]
    struct Phase {
        guard: bool,
        /// Legit connection attempts that succeeded, in percent, and the counts.
        legit_success_pct: f64,
        legit_connects_ok: u64,
        legit_connects: u64,
        /// Chat messages and feed events that reached legit clients.
        legit_delivered: u64,
        /// The probe's connects whose first SYN did not make it.
        lost_syn: u64,
        probe_connects: u64,
        /// Mean CPU the server side used (its packet thread, the app and the agent, in
        /// percent of one core) while the attack ran, and before it.
        server_cpu_pct: f64,
        server_cpu_before_pct: f64,
        /// Mean busy share of the whole server core (whoever used it), during and before.
        core_busy_pct: f64,
        core_busy_before_pct: f64,
        /// What the kernel program counted during the phase (with guard only).
        kernel: Option<Counters>,
        kernel_drops: Option<u64>,
        /// Blocks placed on a report, and their mean detection-to-kernel-block time.
        blocks_with_latency: u64,
        block_latency_ms: Option<f64>,
        /// The attack's window in the timeline (seconds since the legit load started).
        attack_window: (f64, f64),
        attacker: String,
        attacker_detail: serde_json::Value,
        /// Audit records the agent wrote during the phase.
        audit: Vec<serde_json::Value>,
        /// For scenarios with adaptive mode: how legit connects fared over the attack.
        recovery: Option<Recovery>,
        legit: LegitOutcome,
    }

    /// When legit clients got their connections back during an attack.
    #[derive(Debug, Clone, Serialize)]
    struct Recovery {
        /// Adaptive changes: seconds after the attack began, and the audit's detail.
        steps: Vec<(f64, String)>,
        /// Whether any timeline slice during the attack completed under 99 % of its connects.
        hurt: bool,
        /// Seconds after the attack began from which every slice to the attack's end completed
        /// at least 99 % of its connects; `None` if that never happened.
        recovered_after_s: Option<f64>,
        /// Timeline connects from then to the attack's end: completed, attempted.
        after_ok: u32,
        after_all: u32,
    }

    impl Recovery {
        fn measure(
            outcome: &LegitOutcome,
            audit: &[serde_json::Value],
            window: (f64, f64),
        ) -> Self {
            let (start, end) = window;
            let slice = SLICE_SECS as f64;
            let inside: Vec<&Sample> = outcome
                .timeline
                .iter()
                .filter(|s| s.t - slice >= start - 0.05 && s.t <= end + 0.05)
                .collect();
            let good = |s: &Sample| u64::from(s.connects_ok) * 100 >= u64::from(s.connects) * 99;
            // The first slice of the tail of good slices that runs to the attack's end.
            let from = inside
                .iter()
                .rposition(|s| !good(s))
                .map_or(0, |bad| bad + 1);
            let tail = &inside[from..];
            let steps = audit
                .iter()
                .filter(|r| r["event"] == "adaptive")
                .filter_map(|r| {
                    let at = audit_ts_unix(r["ts"].as_str()?)? - outcome.started_unix - start;
                    Some((at, r["detail"].as_str().unwrap_or("").to_string()))
                })
                .collect();
            Self {
                steps,
                hurt: from > 0,
                recovered_after_s: (!tail.is_empty()).then(|| tail[0].t - slice - start),
                after_ok: tail.iter().map(|s| s.connects_ok).sum(),
                after_all: tail.iter().map(|s| s.connects).sum(),
            }
        }

        fn summary(&self) -> String {
            let adaptive = match self.steps.last() {
                Some((at, detail)) => format!(
                    "adaptive: {} step(s), the first at +{:.1}s, {detail} at +{at:.1}s; ",
                    self.steps.len(),
                    self.steps[0].0
                ),
                None => String::new(),
            };
            let legit = match (self.hurt, self.recovered_after_s) {
                (false, _) => "legit connects never fell under 99%".to_string(),
                (true, Some(at)) => format!(
                    "legit back to >=99% from +{at:.1}s ({}/{} timeline connects after)",
                    self.after_ok, self.after_all
                ),
                (true, None) => "legit connects under 99% to the attack's end".to_string(),
            };
            adaptive + &legit
        }
    }

    #[derive(Debug, Serialize)]
    struct ScenarioReport {
        key: &'static str,
        title: &'static str,
        tune: &'static [&'static str],
        adaptive: Option<Adaptive>,
        app: AppOptions,
        phases: Vec<Phase>,
    }

    #[derive(Debug, Serialize)]
    struct Report {
        generated_unix: u64,
        mode: &'static str,
        release_build: bool,
        server_core: Option<usize>,
        attacker_core: Option<usize>,
        measured_core: usize,
        napi_thread_pinned: bool,
        timing: Timing,
        scenarios: Vec<ScenarioReport>,
        /// The fleet scenario (no with/without phases: it shows one decision reaching every
        /// host, through a NATS node failure and a host restart).
        fleet: Option<FleetDemo>,
    }

    const FLEET_KEY: &str = "fleet";

    pub fn main(a: DemoArgs) -> Result<()> {
        if !guard_tests::is_root() {
            bail!("the lab builds network namespaces and loads BPF programs: run it as root");
        }
        let known = |o: &str| o == FLEET_KEY || SCENARIOS.iter().any(|s| s.key == o);
        if let Some(unknown) = a.only.iter().find(|o| !known(o)) {
            let mut keys: Vec<&str> = SCENARIOS.iter().map(|s| s.key).collect();
            keys.push(FLEET_KEY);
            bail!("no scenario is called {unknown:?}; known: {keys:?}");
        }
        let want_fleet = a.only.is_empty() || a.only.iter().any(|o| o == FLEET_KEY);
        let scenarios: Vec<&Scenario> = SCENARIOS
            .iter()
            .filter(|s| {
                if a.only.is_empty() {
                    !a.short || s.in_short
                } else {
                    a.only.iter().any(|o| o == s.key)
                }
            })
            .collect();
        let out = a
            .out
            .clone()
            .unwrap_or_else(|| guard_tests::binaries::workspace_root().join("lab-report"));
        install_signal_handlers();
        let timing = if a.short {
            Timing {
                warmup_secs: 1.5,
                attack_secs: 4,
                tail_secs: 1.0,
            }
        } else {
            Timing {
                warmup_secs: 1.5,
                attack_secs: 8,
                tail_secs: 1.5,
            }
        };

        eprintln!("demo: building the agent, the demo app and lab-client");
        let bins = Binaries::build(a.release)?;
        // The fleet lab starts its agents through the test harness, which takes the binary
        // from here; set before any lab thread runs.
        std::env::set_var(guard_tests::agent::GUARD_BIN_ENV, &bins.guard);
        let cpus = Cpus::detect();
        let mut stack = None;
        let mut reports = Vec::new();
        if !scenarios.is_empty() {
            // Blocks outlive every phase; each phase with guard starts a fresh agent and
            // fresh pins anyway, so nothing carries over from one scenario to the next.
            let s = stack.insert(Stack::new(bins, cpus, Duration::from_secs(300))?);
            reports = single_host(s, &scenarios, cpus, &timing)?;
        }
        let fleet = if want_fleet {
            println!();
            println!(
                "fleet: three guard hosts, a three-node NATS JetStream cluster, attackers on \
                 the same bridge"
            );
            Some(fleet::demo_scenario(|line| println!("{line}")).context("scenario fleet")?)
        } else {
            None
        };
        let report = Report {
            generated_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            mode: if a.short { "short" } else { "full" },
            release_build: a.release,
            server_core: cpus.server,
            attacker_core: cpus.attacker,
            measured_core: cpus.measured(),
            napi_thread_pinned: stack.as_ref().is_some_and(|s| s.napi_pid().is_some()),
            timing,
            scenarios: reports,
            fleet,
        };
        write_report(&out, &report)?;
        if a.keep {
            match stack.as_mut() {
                Some(s) => keep(s)?,
                None => println!("--keep keeps the single-host lab, which this run did not build"),
            }
        }
        drop(stack);
        println!();
        println!(
            "report: {} (report.md, report.json, chart.svg)",
            out.display()
        );
        Ok(())
    }

    /// The single-host scenarios, each without guard and then with it.
    fn single_host(
        stack: &mut Stack,
        scenarios: &[&Scenario],
        cpus: Cpus,
        timing: &Timing,
    ) -> Result<Vec<ScenarioReport>> {
        println!(
            "lab up: server {} (app {}, agent metrics {}), legit {}, attacker {}",
            stack.lab.server.name(),
            stack.app_addr(),
            stack.metrics_addr(),
            stack.lab.legit.name(),
            stack.lab.attacker.name()
        );
        match (cpus.server, cpus.attacker) {
            (Some(s), Some(at)) => println!(
                "cores: server side (app, agent, legit clients{}) on cpu{s}, attack tools on cpu{at}; \
                 server CPU = what the packet thread, app and agent used, in % of one core",
                if stack.napi_pid().is_some() { ", packet thread" } else { "" }
            ),
            _ => println!("one core: nothing pinned; server CPU = what the app and agent used"),
        }
        println!();
        println!("{}", header());

        let mut reports = Vec::new();
        for sc in scenarios {
            let mut phases = Vec::new();
            for guarded in [false, true] {
                let phase = run_phase(stack, sc, guarded, timing).with_context(|| {
                    format!(
                        "scenario {} ({})",
                        sc.key,
                        if guarded {
                            "with guard"
                        } else {
                            "without guard"
                        }
                    )
                })?;
                println!("{}", row_text(sc, &phase));
                phases.push(phase);
            }
            reports.push(ScenarioReport {
                key: sc.key,
                title: sc.title,
                tune: sc.tune,
                adaptive: sc.adaptive,
                app: sc.app,
                phases,
            });
        }
        Ok(reports)
    }

    fn run_phase(
        stack: &mut Stack,
        sc: &Scenario,
        guarded: bool,
        timing: &Timing,
    ) -> Result<Phase> {
        // Cookie SYN-ACKs leave through XDP_TX, which a veth peer takes only while it runs
        // XDP itself. Its program also sinks replies to spoofed sources at the switch, so both
        // phases get it: without guard the kernel's own cookies to them die there too.
        let cookies = sc.tune.iter().any(|t| t.starts_with("syn_cookies="));
        if cookies {
            stack.lab.allow_xdp_tx()?;
        }
        let phase = run_phase_inner(stack, sc, guarded, timing);
        if cookies {
            stack.lab.forbid_xdp_tx();
        }
        phase
    }

    fn run_phase_inner(
        stack: &mut Stack,
        sc: &Scenario,
        guarded: bool,
        timing: &Timing,
    ) -> Result<Phase> {
        if guarded {
            stack.start_agent_with(&[], sc.adaptive.as_ref())?;
            if !sc.tune.is_empty() {
                let mut cli = vec!["config"];
                for set in sc.tune {
                    cli.extend(["--set", set]);
                }
                stack.guard(&cli)?;
            }
        }
        stack.start_app_with(guarded, sc.app)?;
        let before = stack.counters()?;
        let audit_before = stack.audit()?.len();

        let legit = LegitLoad::start(stack, timing.legit_secs())?;
        pause(Duration::from_secs_f64(timing.warmup_secs))?;
        let start = legit.elapsed();
        let attack = (sc.attack)(stack, timing)?;
        let end = legit.elapsed();
        let outcome = legit.finish()?;

        let kernel = match (before, stack.counters()?) {
            (Some(b), Some(a)) => Some(a.since(&b)),
            _ => None,
        };
        let latency = if guarded {
            stack.block_latency()?
        } else {
            None
        };
        let audit: Vec<serde_json::Value> = stack.audit()?.into_iter().skip(audit_before).collect();
        stack.stop_app()?;
        if guarded {
            stack.stop_agent()?;
        }

        let cpu_mean = |from: f64, to: f64, pick: fn(&Sample) -> f64| {
            // Slices wholly inside the window (with a little slack for timer jitter).
            let slice = SLICE_SECS as f64;
            let inside: Vec<f64> = outcome
                .timeline
                .iter()
                .filter(|s| s.t - slice >= from - 0.05 && s.t <= to + 0.05)
                .map(pick)
                .collect();
            if inside.is_empty() {
                0.0
            } else {
                inside.iter().sum::<f64>() / inside.len() as f64
            }
        };
        let (ok, all) = outcome.connections();
        let recovery = sc
            .adaptive
            .is_some()
            .then(|| Recovery::measure(&outcome, &audit, (start, end)));
        let attacker = match &recovery {
            Some(r) => format!("{}; {}", attack.summary, r.summary()),
            None => attack.summary,
        };
        Ok(Phase {
            guard: guarded,
            legit_success_pct: outcome.success_pct(),
            legit_connects_ok: ok,
            legit_connects: all,
            legit_delivered: outcome.delivered(),
            lost_syn: outcome.probe.lost_syn,
            probe_connects: outcome.probe.attempted,
            server_cpu_pct: cpu_mean(start, end, |s| s.server_cpu),
            server_cpu_before_pct: cpu_mean(0.0, start, |s| s.server_cpu),
            core_busy_pct: cpu_mean(start, end, |s| s.core_busy),
            core_busy_before_pct: cpu_mean(0.0, start, |s| s.core_busy),
            kernel_drops: kernel.as_ref().map(Counters::drops),
            kernel,
            blocks_with_latency: latency.map_or(0, |l| l.0),
            block_latency_ms: latency.map(|l| l.1),
            attack_window: (start, end),
            attacker,
            attacker_detail: attack.detail,
            audit,
            recovery,
            legit: outcome,
        })
    }

    // --- the attacks --------------------------------------------------------------------

    fn syn_flood(stack: &Stack, t: &Timing) -> Result<Attack> {
        // A fixed offered rate, not `hping3 --flood`: on veth the sender's own speed depends
        // on guard's verdict (hping3 measured ~145k SYN/s while the program passed and ~100k
        // while it dropped), and a flat-out tool would compare different loads. It spoofs
        // the one source just as `hping3 -a` does (the e2e test uses hping3).
        let flood = stack.syn_flood(&format!("{SPOOFED}/32"), ONE_SOURCE_PPS, t.attack_secs)?;
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        let r = flood.wait()?;
        let sent = r.sent.unwrap_or(0);
        Ok(Attack {
            summary: format!(
                "sent {sent} SYNs, evenly paced ({}/s of {ONE_SOURCE_PPS}/s)",
                per_sec(sent, t)
            ),
            detail: json!({
                "tool": "lab-client syn-flood",
                "source": SPOOFED.to_string(),
                "pps": ONE_SOURCE_PPS,
                "sent": sent,
            }),
        })
    }

    /// What a flood achieved per second over its nominal duration.
    fn per_sec(sent: u64, t: &Timing) -> u64 {
        sent / u64::from(t.attack_secs.max(1))
    }

    fn conn_flood(stack: &Stack, t: &Timing) -> Result<Attack> {
        let run = stack.conn_flood(ConnFlood {
            count: 1_000_000,
            parallel: 200,
            hold_ms: 100,
            connect_timeout_ms: 1000,
            secs: t.attack_secs,
        })?;
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        let r = run.wait()?;
        Ok(Attack {
            summary: format!("{} of {} connects completed", r.connected, r.attempted),
            detail: serde_json::to_value(&r)?,
        })
    }

    fn storms(stack: &Stack, t: &Timing) -> Result<Attack> {
        let storm = |kind| {
            stack.storm(Storm {
                kind,
                count: 1_000_000,
                parallel: 50,
                hold_ms: 1000,
                timeout_ms: 1000,
                secs: t.attack_secs,
            })
        };
        let ws = storm(StormKind::WebSocket)?;
        let sse = storm(StormKind::Sse)?;
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        let (ws, sse) = (ws.wait()?, sse.wait()?);
        Ok(Attack {
            summary: format!(
                "admitted: WS {}/{}, SSE {}/{} ({} refused 429)",
                ws.accepted,
                ws.attempted,
                sse.accepted,
                sse.attempted,
                ws.rejected_429 + sse.rejected_429
            ),
            detail: json!({ "ws_storm": ws, "sse_storm": sse }),
        })
    }

    fn message_flood(stack: &Stack, t: &Timing) -> Result<Attack> {
        // The flood itself ends at the server's close; then the attacker tries to come back
        // for the rest of the attack window.
        let flood_secs = 2u32.min(t.attack_secs);
        let flood = stack.ws_flood(5000, flood_secs)?.wait()?;
        // Give the report a moment to reach the agent and the kernel.
        pause(Duration::from_millis(500))?;
        let back_secs = t.attack_secs.saturating_sub(flood_secs + 1).max(1);
        let back = stack.conn_flood(ConnFlood {
            count: 1000,
            parallel: 5,
            hold_ms: 10,
            connect_timeout_ms: 1000,
            secs: back_secs,
        })?;
        pause(Duration::from_secs(u64::from(back_secs)))?;
        let back = back.wait()?;
        let close = flood
            .close_code
            .map_or_else(|| "no close".to_string(), |c| format!("closed {c}"));
        Ok(Attack {
            summary: format!(
                "{close} after {} msgs; reconnects {}/{}",
                flood.sent, back.connected, back.attempted
            ),
            detail: json!({ "ws_flood": flood, "reconnects": back }),
        })
    }

    fn slowloris(stack: &Stack, t: &Timing) -> Result<Attack> {
        let flood = slowhttptest(
            &stack.lab.attacker,
            &format!("http://{}/", stack.app_addr()),
            1000,
            t.attack_secs,
        )?;
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        let r = flood.wait()?;
        let peak = r.sent.unwrap_or(0);
        Ok(Attack {
            summary: format!("held {peak} connections at most"),
            detail: json!({
                "tool": "slowhttptest",
                "peak_connected": peak,
                "service_available": r.service_available,
            }),
        })
    }

    fn random_sources(stack: &Stack, t: &Timing) -> Result<Attack> {
        let flood = stack.syn_flood("198.19.0.0/16", RANDOM_SOURCES_PPS, t.attack_secs)?;
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        let r = flood.wait()?;
        let sent = r.sent.unwrap_or(0);
        Ok(Attack {
            // The offered rate is fixed, but a busy attacker core can fall short of it.
            summary: format!(
                "sent {sent} SYNs, evenly paced ({}/s of {RANDOM_SOURCES_PPS}/s)",
                per_sec(sent, t)
            ),
            detail: json!({ "tool": "lab-client syn-flood", "subnet": "198.19.0.0/16", "pps": RANDOM_SOURCES_PPS, "sent": sent }),
        })
    }

    fn slot_hoarder(stack: &Stack, t: &Timing) -> Result<Attack> {
        let lost_before = stack.server_handshake_losses()?;
        let hoard = SlotHoarder::start(stack, HOARD_PER_SEC, t.attack_secs);
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        // Read while it still holds everything.
        let held = hoard.held();
        let kernel = if stack.agent_pid().is_some() {
            let mine = stack.tracked_connections(guard_tests::lab::ATTACKER_V4)?;
            let all = metric(
                &stack.agent_metrics()?,
                "guard_concurrent_connections_tracked",
            )
            .unwrap_or(0.0) as u64;
            Some((mine, all))
        } else {
            None
        };
        let r = hoard.finish()?;
        let lost = stack.server_handshake_losses()? - lost_before;
        let tracked = kernel.map_or_else(String::new, |(mine, all)| {
            format!("; the kernel tracked {mine} for it ({all} in all)")
        });
        Ok(Attack {
            summary: format!(
                "held {held} connections, {} connects unanswered{tracked}; server's queue dropped {lost} SYNs",
                r.timed_out
            ),
            detail: json!({
                "hoarder": r,
                "held_at_end": held,
                "per_sec": HOARD_PER_SEC,
                "app": HOARD_APP,
                "kernel_tracked_for_hoarder": kernel.map(|k| k.0),
                "kernel_tracked_total": kernel.map(|k| k.1),
                "server_handshake_losses": lost,
            }),
        })
    }

    fn returning_clients(stack: &Stack, t: &Timing) -> Result<Attack> {
        let fresh = stack.fresh_legit_sources(FIRST_TIMER_BASE, FIRST_TIMERS)?;
        let before = stack.counters()?;
        // What the server's own kernel does with the SYNs that reach it: past its SYN queue it
        // answers with cookies instead of keeping state.
        let cookies_before = stack.lab.server.counter("TcpExt", "SyncookiesSent")?;
        let flood = FlatOutFlood::start(stack, "198.19.0.0/16", t.attack_secs)?;
        let started = std::time::Instant::now();
        let flood_end = Duration::from_secs(u64::from(t.attack_secs));
        // First-time clients arrive one by one, spread over the flood once it has drained the
        // budget (arriving together they would also compete with each other), and each gets
        // one connect that may last until the flood ends: TCP resends its SYN after 1 s, 3 s.
        let lead = Duration::from_secs(1);
        let spread =
            flood_end.saturating_sub(lead + Duration::from_secs(1)) / u32::from(FIRST_TIMERS);
        let mut runs = Vec::new();
        let mut timeouts_ms = Vec::new();
        for (i, ip) in fresh.iter().enumerate() {
            let at = lead + spread * i as u32;
            pause(at.saturating_sub(started.elapsed()))?;
            let left = flood_end
                .saturating_sub(started.elapsed() + Duration::from_millis(200))
                .max(Duration::from_millis(500));
            timeouts_ms.push(left.as_millis() as u64);
            runs.push(stack.one_connect(*ip, left)?);
        }
        let sent = flood.wait()?;
        let cookies = stack.lab.server.counter("TcpExt", "SyncookiesSent")? - cookies_before;
        let firsts = runs
            .into_iter()
            .map(|r| r.wait())
            .collect::<Result<Vec<ProbeReport>>>()?;
        let got: u64 = firsts.iter().map(|p| p.connected).sum();
        let first_syn: u64 = firsts.iter().map(|p| p.connected - p.retransmitted).sum();
        let kernel = match (before, stack.counters()?) {
            (Some(b), Some(a)) => Some(a.since(&b)),
            _ => None,
        };
        let known_good = kernel.as_ref().map_or_else(String::new, |k| {
            format!(
                "; returning clients' SYNs passed as known-good: {}; guard's SYN cookies sent {}, replies handed over {}",
                k.get(Stat::PassKnownGood),
                k.get(Stat::CookieSent),
                k.get(Stat::CookieAckValid)
            )
        });
        Ok(Attack {
            summary: format!(
                "trafgen sent {sent} SYNs ({}/s), server sent {cookies} SYN cookies; first-time clients during it: {got}/{} got in ({first_syn} on the first SYN){known_good}",
                per_sec(sent, t),
                firsts.len()
            ),
            detail: json!({
                "tool": "trafgen (no rate limit)",
                "subnet": "198.19.0.0/16",
                "sent": sent,
                "first_timers": fresh.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "first_timer_connect_timeout_ms": timeouts_ms,
                "first_timer_reports": firsts,
                "first_timers_connected": got,
                "first_timers_on_first_syn": first_syn,
                "server_syncookies_sent": cookies,
            }),
        })
    }

    fn adaptive_overload(stack: &Stack, t: &Timing) -> Result<Attack> {
        let sources = stack.attacker_sources(OVERLOAD_SOURCE_BASE, OVERLOAD_SOURCES)?;
        let lost_before = stack.server_handshake_losses()?;
        let runs = stack.conn_floods(
            &sources,
            ConnFlood {
                count: 1_000_000,
                parallel: OVERLOAD_PARALLEL,
                hold_ms: OVERLOAD_HOLD_MS,
                connect_timeout_ms: 1000,
                secs: t.attack_secs,
            },
        )?;
        pause(Duration::from_secs(u64::from(t.attack_secs)))?;
        let reports = runs
            .into_iter()
            .map(|r| r.wait())
            .collect::<Result<Vec<ConnFloodReport>>>()?;
        let lost = stack.server_handshake_losses()? - lost_before;
        let attempted: u64 = reports.iter().map(|r| r.attempted).sum();
        let connected: u64 = reports.iter().map(|r| r.connected).sum();
        Ok(Attack {
            summary: format!(
                "{} sources: {connected} of {attempted} connects; server's queue dropped {lost} SYNs",
                sources.len()
            ),
            detail: json!({
                "sources": sources.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "parallel_per_source": OVERLOAD_PARALLEL,
                "hold_ms": OVERLOAD_HOLD_MS,
                "app": OVERLOAD_APP,
                "reports": reports,
                "server_handshake_losses": lost,
            }),
        })
    }

    // --- output -------------------------------------------------------------------------

    const COLUMNS: [&str; 8] = [
        "guard",
        "legit conn ok",
        "legit msgs",
        "lost SYN",
        "server CPU",
        "kernel drops",
        "detect→block",
        "attacker got",
    ];

    fn cells(p: &Phase) -> [String; 8] {
        [
            if p.guard { "on" } else { "off" }.to_string(),
            format!(
                "{:.1}% ({}/{})",
                p.legit_success_pct, p.legit_connects_ok, p.legit_connects
            ),
            p.legit_delivered.to_string(),
            format!("{}/{}", p.lost_syn, p.probe_connects),
            format!(
                "{:.0}% (before {:.0}%)",
                p.server_cpu_pct, p.server_cpu_before_pct
            ),
            match &p.kernel {
                None => "-".to_string(),
                Some(k) if k.drops() == 0 => "0".to_string(),
                Some(k) => format!("{} ({})", k.drops(), k.drop_breakdown()),
            },
            p.block_latency_ms
                .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms")),
            p.attacker.clone(),
        ]
    }

    const WIDTHS: [usize; 8] = [5, 22, 10, 9, 16, 34, 12, 0];

    fn header() -> String {
        let mut line = String::new();
        for (c, w) in COLUMNS.iter().zip(WIDTHS) {
            let _ = write!(line, "{c:<w$}  ");
        }
        line.trim_end().to_string()
    }

    fn row_text(sc: &Scenario, p: &Phase) -> String {
        let mut line = String::new();
        if !p.guard {
            let _ = writeln!(line, "{}", sc.title);
        }
        for (c, w) in cells(p).iter().zip(WIDTHS) {
            let _ = write!(line, "{c:<w$}  ");
        }
        line.trim_end().to_string()
    }

    fn markdown(r: &Report) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# guard lab report\n");
        if r.scenarios.is_empty() {
            if let Some(f) = &r.fleet {
                fleet_markdown(&mut md, f);
            }
            return md;
        }
        let _ = writeln!(
            md,
            "Each scenario ran twice for {}s of attack between {:.1}s of warm-up and {:.1}s of \
             recovery: **off** = no program loaded, no agent, the app reporting to nobody (its \
             own warp-side limits still apply); **on** = the agent running with its defaults \
             (per-source SYN cap 20/s, burst 40) plus the scenario's live tuning (and adaptive \
             mode where the scenario says so). Legit clients throughout: 4 WebSocket chatters, \
             4 SSE subscribers, a SYN-loss probe at 10 connects/s and a timeline probe starting \
             10 connects/s whether or not earlier ones finished, from four addresses.\n",
            r.timing.attack_secs, r.timing.warmup_secs, r.timing.tail_secs
        );
        let _ = writeln!(md, "| scenario | {} |", COLUMNS.join(" | "));
        let _ = writeln!(md, "|---{}|", "|---".repeat(COLUMNS.len()));
        for sc in &r.scenarios {
            for p in &sc.phases {
                let title = if p.guard { "" } else { sc.title };
                let cells: Vec<String> = cells(p).iter().map(|c| c.replace('|', "/")).collect();
                let _ = writeln!(md, "| {title} | {} |", cells.join(" | "));
            }
        }
        let _ = writeln!(
            md,
            "\n![legit connects and server CPU over time](chart.svg)\n"
        );
        let _ = writeln!(md, "## How to read it\n");
        let _ = writeln!(
            md,
            "- **legit conn ok**: legit connection attempts that succeeded (probe connects, \
             WebSocket handshakes, SSE subscriptions, timeline connects).\n\
             - **legit msgs**: chat messages and feed events that reached legit clients.\n\
             - **lost SYN**: probe connects whose first SYN did not make it (resent, refused or \
             timed out), of all probe connects.\n\
             - **server CPU**: CPU the server side itself used while the attack ran (before it \
             in brackets), in percent of one core: {}, read per process from /proc so that \
             other work on a shared machine does not count. {}The busy share of the whole core \
             (`core_busy_pct`) is in report.json.\n\
             - **kernel drops**: packets guard's program dropped during the run, by reason.\n\
             - **detect→block**: mean time from the app detecting abuse to the block being in \
             the kernel (`guard_block_latency_seconds`).\n\
             - **attacker got**: what the attack achieved. SYN floods run at a fixed offered rate, \
             evenly paced, on the attacker's core, so check the rates \
             they reached in the two runs before comparing server CPU. Scenario 8's flood runs \
             as fast as trafgen goes, which on veth depends on guard's verdict itself.\n\
             - **scenarios 7 and 9** give the app a ceiling, as every server has one: a number \
             of connection slots (its open-files limit) behind a short listen backlog. Once \
             both are full, the server's own kernel drops every new SYN (\"server's queue \
             dropped\"). The slot hoarder never sends a byte, so no request-level limit sees \
             it; only the kernel's count of its open connections (`conn_limit`) does.\n\
             - **scenario 8**: the legit clients connected before the flood, so they return as \
             known-good; the first-time clients are fresh addresses arriving one by one during \
             the flood, each with one connect that may last until the flood ends.\n\
             - **scenario 9**: when adaptive mode stepped (from the audit log) and from when on \
             every timeline slice completed at least 99 % of its connects, both counted from \
             the attack's start.\n",
            if r.napi_thread_pinned {
                "the server's packet (NAPI) thread, the app and the agent"
            } else {
                "the app and the agent (the packet thread was not found, so packet processing is \
                 missing)"
            },
            match (r.server_core, r.attacker_core) {
                (Some(s), Some(a)) => format!(
                    "All of them and the legit clients are pinned to cpu{s}, the attack tools to cpu{a}. "
                ),
                _ => String::new(),
            }
        );
        let with_audit: Vec<&ScenarioReport> = r
            .scenarios
            .iter()
            .filter(|s| s.phases.iter().any(|p| !p.audit.is_empty()))
            .collect();
        if !with_audit.is_empty() {
            let _ = writeln!(md, "## Audit log (runs with guard)\n");
            for sc in with_audit {
                let _ = writeln!(md, "{}:\n", sc.title);
                let _ = writeln!(md, "```");
                for p in &sc.phases {
                    for rec in &p.audit {
                        let _ = writeln!(md, "{rec}");
                    }
                }
                let _ = writeln!(md, "```\n");
            }
        }
        if let Some(f) = &r.fleet {
            fleet_markdown(&mut md, f);
        }
        md
    }

    fn fleet_markdown(md: &mut String, f: &FleetDemo) {
        let _ = writeln!(md, "## Fleet: blocks shared through NATS JetStream\n");
        let _ = writeln!(
            md,
            "Hosts {} (a guard agent each, in its own namespace), a JetStream cluster of {} \
             nats-server nodes (stream replicated three times) and attackers on the same \
             bridge. A step's time runs from the decision (the app's report, the operator's \
             unblock, or the restart) until the last other host's kernel agrees, polled every \
             5 ms.\n",
            f.hosts.join(", "),
            f.nats_nodes
        );
        let _ = writeln!(
            md,
            "| step | source | dropped on | served on | in every kernel after |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for st in &f.steps {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.join(", ")
                }
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                st.what.replace('|', "/"),
                st.source,
                list(&st.dropped_on),
                list(&st.served_on),
                st.propagation_ms
                    .map(|m| format!("{m} ms"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        let _ = writeln!(md);
    }

    fn chart(r: &Report) -> String {
        let rows: Vec<Row> = r
            .scenarios
            .iter()
            .map(|sc| {
                let mut row = Row {
                    title: sc.title.to_string(),
                    ..Row::default()
                };
                for p in &sc.phases {
                    let success: Vec<(f64, f64)> = p
                        .legit
                        .timeline
                        .iter()
                        .filter(|s| s.connects > 0)
                        .map(|s| {
                            (
                                s.t,
                                f64::from(s.connects_ok) * 100.0 / f64::from(s.connects),
                            )
                        })
                        .collect();
                    let cpu: Vec<(f64, f64)> = p
                        .legit
                        .timeline
                        .iter()
                        .map(|s| (s.t, s.server_cpu))
                        .collect();
                    if p.guard {
                        row.on_success = success;
                        row.on_cpu = cpu;
                        row.attack = p.attack_window;
                    } else {
                        row.off_success = success;
                        row.off_cpu = cpu;
                    }
                }
                row
            })
            .collect();
        chart::render(&rows)
    }

    fn write_report(out: &Path, r: &Report) -> Result<()> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create the report folder {}", out.display()))?;
        let write = |name: &str, text: String| {
            let path = out.join(name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
        };
        write("report.json", serde_json::to_string_pretty(r)? + "\n")?;
        write("report.md", markdown(r))?;
        write("chart.svg", chart(r))?;
        Ok(())
    }

    /// `--keep`: guard on, the app up, no floods; explains how to look, then waits for Ctrl-C.
    fn keep(stack: &mut Stack) -> Result<()> {
        stack.start_agent(&[])?;
        stack.start_app(true)?;
        let srv = stack.lab.server.path().display().to_string();
        let guard = stack.bins.guard.display().to_string();
        let sock = stack.control_socket().display().to_string();
        println!();
        println!("the lab stays up with guard on (no attack running); Ctrl-C tears it all down.");
        println!(
            "  agent metrics: nsenter --net={srv} curl -s http://{}/metrics",
            stack.metrics_addr()
        );
        println!(
            "  app metrics:   nsenter --net={srv} curl -s http://{}/metrics",
            stack.app_addr()
        );
        println!("  live tuning:   {guard} tune --control-socket {sock}");
        println!("                 {guard} config --control-socket {sock} --set syn_rate=50");
        println!("  blocks/audit:  {guard} blocks --control-socket {sock}; {guard} history --control-socket {sock}");
        println!(
            "  kernel state:  {guard} status --pin-dir {}",
            stack.pin_dir().display()
        );
        println!(
            "  a shell as the attacker: nsenter --net={} bash",
            stack.lab.attacker.path().display()
        );
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("tearing the lab down");
        Ok(())
    }
}
