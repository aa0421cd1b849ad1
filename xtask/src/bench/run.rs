//! Running the bench: the sections it was asked for, one after the other, and the report.
#![cfg(feature = "lab")]

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::table::Goal;
use super::{app, cookies, datapath, flood, global, BenchArgs};

use guard_tests::stack::{check_interrupted, install_signal_handlers};

/// Everything one run measured, for `--json`.
#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    quick: bool,
    /// How flood frames reached the server (absent without a flood section).
    rx_model: Option<guard_tests::rig::RxModel>,
    datapath: Option<datapath::DatapathReport>,
    flood: Option<flood::FloodReport>,
    global: Option<global::GlobalReport>,
    cookies: Option<cookies::CookieReport>,
    app: Option<app::AppReport>,
    goals: Vec<Goal>,
    elapsed_s: f64,
}

/// What the numbers were measured on; the load average says how busy the machine was.
#[derive(Debug, Serialize)]
struct Machine {
    kernel: String,
    cpus: usize,
    loadavg_at_start: String,
}

impl Machine {
    fn read() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Self {
            kernel: read("/proc/sys/kernel/osrelease"),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadavg_at_start: read("/proc/loadavg"),
        }
    }
}

pub fn main(args: BenchArgs) -> Result<()> {
    if !guard_tests::is_root() {
        bail!("the bench loads BPF programs and builds network namespaces: run it as root");
    }
    install_signal_handlers();
    let start = Instant::now();
    let all = !(args.datapath || args.flood || args.global || args.cookies || args.app);
    let machine = Machine::read();
    println!(
        "guard bench{} on Linux {}, {} CPUs, load average {}",
        if args.quick { " (quick)" } else { "" },
        machine.kernel,
        machine.cpus,
        machine.loadavg_at_start
    );
    let mut goals = Vec::new();

    let datapath = if all || args.datapath {
        let report = datapath::run(args.quick)?;
        goals.extend(report.goals());
        Some(report)
    } else {
        None
    };

    let cookies = if all || args.cookies {
        let report = cookies::run(args.quick)?;
        goals.extend(report.goals());
        Some(report)
    } else {
        None
    };

    let app = if all || args.app {
        let report = app::run(args.quick)?;
        goals.extend(report.goals());
        Some(report)
    } else {
        None
    };

    let mut rx_model = None;
    let (flood, global) = if all || args.flood || args.global {
        // Release builds: the probes and the server share the measured core, and a debug
        // build of them would add its own overhead to every mode's number.
        let bins = guard_tests::binaries::Binaries::build_without_demo(true)?;
        check_interrupted()?;
        let rx = if args.veth_raw {
            guard_tests::rig::RxModel::Veth
        } else {
            guard_tests::rig::RxModel::Nic
        };
        println!("\nlab receive model: {}", rx.describe());
        rx_model = Some(rx);
        let mut rig =
            guard_tests::rig::Rig::new(bins, args.napi_rt, rx).context("cannot set up the lab")?;
        // The harness (spawning probes and tools, reading counters) runs beside the
        // attacker, never on the core being measured; what it starts there pins itself.
        guard_tests::process::pin_to_cpu(std::process::id(), rig.attacker_cpu)?;
        let flood = if all || args.flood {
            let modes = guard_tests::rig::Mode::parse_list(&args.modes)?;
            let report = flood::run(&mut rig, args.quick, args.rate, &modes)?;
            goals.extend(report.goals());
            Some(report)
        } else {
            None
        };
        let global = if all || args.global {
            let report = global::run(&mut rig, args.quick)?;
            goals.extend(report.goals());
            Some(report)
        } else {
            None
        };
        (flood, global)
    } else {
        (None, None)
    };

    println!("\n== Goals");
    super::table::print_goals(&goals);
    let report = Report {
        machine,
        quick: args.quick,
        rx_model,
        datapath,
        flood,
        global,
        cookies,
        app,
        goals,
        elapsed_s: start.elapsed().as_secs_f64(),
    };
    println!("bench took {:.0} s", report.elapsed_s);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("cannot encode the results")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    Ok(())
}
