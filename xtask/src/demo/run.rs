//! Running the demo: the single-host scenarios without and with guard, then the fleet, then
//! the report; `--keep` leaves the lab up.
#![cfg(feature = "lab")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use guard_tests::fleet;

use super::phase::*;
use super::report::*;
use super::scenarios::*;
use super::DemoArgs;
use guard_tests::binaries::Binaries;
use guard_tests::deploy::lab_rules::LAB_SPEEDUP;
use guard_tests::deploy::prom::{unix_now_f64, Prometheus, INTERVAL_SECS};
use guard_tests::stack::{
    install_signal_handlers, interrupted, pause, Counters, Cpus, LegitLoad, Sample, Stack,
    SLICE_SECS,
};

pub(super) const FLEET_KEY: &str = "fleet";

/// How long after an attack its alerts are still watched: its last samples leave the lab
/// rules' longest window over traffic (10 s, the shipped `[10m]`) and one more scrape and
/// evaluation happen. Until then a rule it set pending can still reach firing.
pub(super) const ALERT_DRAIN_SECS: u64 = 10 + 2 * INTERVAL_SECS as u64;

/// How long a run with guard waits for the previous run's alerts to end before it starts
/// anyway (and reports them as active before).
const ALERT_SETTLE: Duration = Duration::from_secs(60);

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
        let prom = if a.prometheus {
            let alerts =
                guard_tests::binaries::workspace_root().join("guard-user/deploy/alerts.yml");
            let p = Prometheus::start_lab_rules(
                &s.lab.server,
                &s.metrics_addr().to_string(),
                &s.app_addr().to_string(),
                &alerts,
            )
            .context("start Prometheus (the `prometheus` Debian package)")?;
            println!(
                "prometheus: scraping the agent and the app every {INTERVAL_SECS}s with the \
                 rules of {} sped up {LAB_SPEEDUP} times (for: and windows; minutes become \
                 seconds)",
                alerts.display()
            );
            Some(p)
        } else {
            None
        };
        reports = single_host(s, &scenarios, cpus, &timing, prom.as_ref())?;
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
pub(super) fn single_host(
    stack: &mut Stack,
    scenarios: &[&Scenario],
    cpus: Cpus,
    timing: &Timing,
    prom: Option<&Prometheus>,
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
        (Some(s), Some(at)) => {
            println!(
            "cores: server side (app, agent, legit clients{}) on cpu{s}, attack tools on cpu{at}; \
             server CPU = what the packet thread, app and agent used, in % of one core",
            if stack.napi_pid().is_some() { ", packet thread" } else { "" }
        )
        }
        _ => println!("one core: nothing pinned; server CPU = what the app and agent used"),
    }
    println!();
    println!("{}", header());

    let mut reports = Vec::new();
    for sc in scenarios {
        let mut phases = Vec::new();
        let timing = &sc.timing(timing);
        for guarded in [false, true] {
            let phase = run_phase(stack, sc, guarded, timing, prom).with_context(|| {
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

pub(super) fn run_phase(
    stack: &mut Stack,
    sc: &Scenario,
    guarded: bool,
    timing: &Timing,
    prom: Option<&Prometheus>,
) -> Result<Phase> {
    // Cookie SYN-ACKs leave through XDP_TX, which a veth peer takes only while it runs
    // XDP itself. Its program also sinks replies to spoofed sources at the switch, so both
    // phases get it: without guard the kernel's own cookies to them die there too.
    let cookies = sc.tune.iter().any(|t| t.starts_with("syn_cookies="));
    if cookies {
        stack.lab.allow_xdp_tx()?;
    }
    let phase = run_phase_inner(stack, sc, guarded, timing, prom);
    if cookies {
        stack.lab.forbid_xdp_tx();
    }
    phase
}

pub(super) fn run_phase_inner(
    stack: &mut Stack,
    sc: &Scenario,
    guarded: bool,
    timing: &Timing,
    prom: Option<&Prometheus>,
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
    // Only runs with guard: without it there is no agent to scrape, which is an alert of its
    // own (GuardAgentDown) and says nothing about the attack.
    let prom = prom.filter(|_| guarded);
    let alerts_before = match prom {
        Some(p) => Some(settled_alerts(p)?),
        None => None,
    };

    let legit = LegitLoad::start(stack, timing.legit_secs())?;
    pause(Duration::from_secs_f64(timing.warmup_secs))?;
    let start = legit.elapsed();
    let attack_from_unix = unix_now_f64();
    let attack = (sc.attack)(stack, timing)?;
    let end = legit.elapsed();
    let attack_to_unix = unix_now_f64();
    let outcome = legit.finish()?;
    let alerts = match (prom, alerts_before) {
        (Some(p), Some(before)) => {
            let watch_to = attack_to_unix + ALERT_DRAIN_SECS as f64;
            pause(Duration::from_secs_f64(
                (watch_to - unix_now_f64()).max(0.0),
            ))?;
            Some(PhaseAlerts {
                before,
                fired: p.fired_between(attack_from_unix, watch_to)?,
                active: p.active_between(attack_from_unix, watch_to)?,
                rules: p.alert_rules()?.into_iter().map(|r| r.name).collect(),
            })
        }
        _ => None,
    };

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
        alerts,
        legit: outcome,
    })
}

/// Once both targets are scraped up, waits for every alert to end (the previous run's
/// attack, or the agent being down between runs); what is still active after
/// [`ALERT_SETTLE`].
fn settled_alerts(p: &Prometheus) -> Result<Vec<String>> {
    p.wait_targets_up(2, Duration::from_secs(30))
        .context("Prometheus does not see the agent and the app up")?;
    // Rules evaluated on the targets being up, not on the scrape before.
    pause(Duration::from_secs(u64::from(2 * INTERVAL_SECS)))?;
    p.wait_quiet(ALERT_SETTLE)
}

/// `--keep`: guard on, the app up, no floods; explains how to look, then waits for Ctrl-C.
pub(super) fn keep(stack: &mut Stack) -> Result<()> {
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
