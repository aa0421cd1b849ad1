//! `cargo xtask`: what a build script should not do — machine setup, the
//! privileged test run, the lab demo, benchmarks and live tuning.
//!
//! This file parses the command line and hands it to the command's module; what several
//! commands share, `setup` and `lint` among it, is in the lib (`src/lib.rs`).

mod bench;
mod demo;
mod dist;
mod test;
mod tune;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{lint, setup};

#[derive(Parser)]
#[command(name = "xtask", about = "guard's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build, tests and lab need (idempotent).
    Setup,
    /// Run every test: host unit tests, then the privileged tests (root,
    /// serially), then the deploy checks and the deploy stage (the .deb under
    /// systemd, the image in a pod).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// The lab: attacks with and without guard, side by side, into a report (root).
    Demo(demo::DemoArgs),
    /// Datapath ns/packet, flood cost vs nftables/iptables, global budget: measured (root).
    Bench(bench::BenchArgs),
    /// `guard tune` against the running lab agent (or --control-socket /
    /// --pin-dir): show state, --set, --dry-run/--enforce, --block,
    /// --unblock, --allow, --suggest --observe 60s, --history.
    Tune {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build what operators install: a tarball, a .deb and SHA256SUMS (default target/dist).
    Dist(dist::DistArgs),
    /// `cargo fmt --check` and clippy `-D warnings` on the host crates and
    /// on the eBPF crate for its own target.
    Lint,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Test { filter } => test::main(filter),
        Cmd::Demo(args) => demo::main(args),
        Cmd::Bench(args) => bench::main(args),
        Cmd::Lint => lint::lint(),
        Cmd::Dist(args) => dist::main(args),
        Cmd::Tune { args } => tune::main(args),
    }
}
