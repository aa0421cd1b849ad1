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
//! Here: `scenarios` (what each one is), `attacks` (each scenario's attack, which its
//! end-to-end test in tests/tests/e2e.rs starts through the same `guard_tests::stack`
//! functions), `run` (without and with guard, then the fleet), `phase` (what a run
//! measured), `report` (table, Markdown, JSON) and `chart` (SVG). The stack they run on (app,
//! agent, legit load, floods) is the lab toolkit's, `guard_tests::stack`.

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
    /// slowloris, random-sources, slot-hoarder, returning-clients, adaptive, slow-sources,
    /// fleet (three guard hosts sharing blocks through a three-node NATS JetStream cluster).
    #[arg(long = "only", value_name = "SCENARIO")]
    only: Vec<String>,
    /// Run a Prometheus server (Debian's package) scraping the agent (job="guard") and the
    /// app (job="app") with the rules of guard-user/deploy/alerts.yml sped up for the lab
    /// (`for:` and windows 60 times shorter, written to a temp folder); the report gets a
    /// table of the alerts each attack fired and those that stayed quiet.
    #[arg(long)]
    prometheus: bool,
}

#[cfg(not(feature = "lab"))]
pub fn main(_args: DemoArgs) -> anyhow::Result<()> {
    xtask::exec_with_lab_feature("sudo -E cargo xtask demo")
}

#[cfg(feature = "lab")]
pub use run::main;

mod attacks;
mod chart;
mod phase;
mod report;
mod run;
mod scenarios;
