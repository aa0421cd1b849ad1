//! `cargo xtask bench`: what guard costs and what it buys, measured on this machine.
//!
//! Three sections, all by default, or a chosen few:
//! - `--datapath`: ns per packet of every verdict path of the real program, through
//!   `BPF_PROG_TEST_RUN` (XDP and tc), with 1 thousand and 1 million tracked sources, and the
//!   kernel memory one tracked source costs;
//! - `--flood`: one SYN flood against no protection, an nftables meter, iptables hashlimit and
//!   guard (XDP native, XDP generic, tc), modes alternating within the run, CPU-pinned as in
//!   shared/LAB.md, at a fixed offered rate (sent as LAB.md did, and evenly paced) and at the
//!   flood tool's maximum; frames reach the
//!   server as from a NIC unless `--veth-raw` (see `guard_tests::rig::Rig::new`);
//! - `--global`: a random-source flood while returning ("known good") clients keep
//!   connecting, with and without the global new-connection budget;
//! - `--cookies`: WebSocket bulk throughput through connections admitted by a SYN cookie
//!   against normally admitted ones, alternating in one run.
//!
//! Every number printed is measured in this run; the goals are checked against those numbers
//! and reported as met or not. Machines are shared: read ratios between modes of one run, not
//! absolute values.
//!
//! Like the demo, plain xtask stays free of the eBPF build: it runs setup, then re-runs itself
//! with the `lab` feature, which holds the bench itself.
//!
//! One submodule per section (`datapath`, `flood`, `global`, `cookies`) plus `table` (printed
//! tables and goals); the flood and global sections run on the lab rig, `guard_tests::rig`.

use std::path::PathBuf;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Run the datapath micro-benchmark (BPF_PROG_TEST_RUN). With no section flag, all run.
    #[arg(long)]
    datapath: bool,
    /// Run the flood comparison (none / nftables / iptables / guard XDP, generic, tc).
    #[arg(long)]
    flood: bool,
    /// Run the global-budget section (random sources vs returning clients).
    #[arg(long)]
    global: bool,
    /// Run the SYN-cookie throughput section (cookie-admitted vs normal WebSocket transfers).
    #[arg(long)]
    cookies: bool,
    /// Shorter runs and fewer repeats (about two minutes for everything).
    #[arg(long)]
    quick: bool,
    /// Also write every result as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Only these flood modes (repeatable): none, nftables, iptables, xdp-native, xdp-generic,
    /// tc. Default: all.
    #[arg(long = "mode", value_name = "MODE")]
    modes: Vec<String>,
    /// Give the server's NAPI thread real-time priority, as softirq has on a lightly loaded
    /// host, so it preempts everything else on the server core. Default: normal priority, as
    /// shared/LAB.md measured and as a kernel under a flood ends up running receive work
    /// (deferred to ksoftirqd, a normal thread): it then shares the core with the server and
    /// the clients, its ring overflows when it has to wait, and an unprotected server loses
    /// legitimate SYNs — which the lost-SYN goal needs to be decided at all.
    #[arg(long)]
    napi_rt: bool,
    /// Flood the plain veth: every frame then wakes the server's NAPI thread and arrives as
    /// the sender's socket buffer, which XDP must free (or first copy into a page), costs a NIC
    /// does not have. Default: the flood arrives as raw frames, as from a NIC, with interrupt
    /// coalescing; see `Rig::new` in tests/src/rig/mod.rs.
    #[arg(long)]
    veth_raw: bool,
    /// The flood's fixed offered rate in SYNs per second from one source, sent both as
    /// shared/LAB.md did (trafgen -b) and evenly paced. The
    /// default is about what shared/LAB.md's hping3 reached, and large enough that the
    /// filters' shares of the core stand well clear of the idle core's noise.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1_000..=2_000_000))]
    rate: u32,
}

#[cfg(not(feature = "lab"))]
pub fn main(_args: BenchArgs) -> anyhow::Result<()> {
    crate::exec_with_lab_feature("sudo -E cargo xtask bench")
}

#[cfg(feature = "lab")]
pub use lab::main;

#[cfg(feature = "lab")]
mod cookies;
#[cfg(feature = "lab")]
mod datapath;
#[cfg(feature = "lab")]
mod flood;
#[cfg(feature = "lab")]
mod global;
#[cfg(feature = "lab")]
mod table;

#[cfg(feature = "lab")]
mod lab {
    use std::time::Instant;

    use anyhow::{bail, Context as _, Result};
    use serde::Serialize;

    use super::table::Goal;
    use super::{cookies, datapath, flood, global, BenchArgs};

    pub use guard_tests::stack::check_interrupted;
    use guard_tests::stack::install_signal_handlers;

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
        let all = !(args.datapath || args.flood || args.global || args.cookies);
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

        let mut rx_model = None;
        let (flood, global) = if all || args.flood || args.global {
            let bins = guard_tests::binaries::Binaries::build(true)?;
            check_interrupted()?;
            let rx = if args.veth_raw {
                guard_tests::rig::RxModel::Veth
            } else {
                guard_tests::rig::RxModel::Nic
            };
            println!("\nlab receive model: {}", rx.describe());
            rx_model = Some(rx);
            let mut rig = guard_tests::rig::Rig::new(bins, args.napi_rt, rx)
                .context("cannot set up the lab")?;
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
            goals,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        println!("bench took {:.0} s", report.elapsed_s);
        if let Some(path) = &args.json {
            let text =
                serde_json::to_string_pretty(&report).context("cannot encode the results")?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("results written to {}", path.display());
        }
        Ok(())
    }
}
