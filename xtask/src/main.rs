//! `cargo xtask`: what a build script should not do — machine setup, the
//! privileged test run, the lab demo, benchmarks and live tuning.

mod bench;
mod demo;
mod setup;
mod tune;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

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
    /// serially), then the deploy checks.
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
    /// `cargo fmt --check` and clippy `-D warnings` on the host crates and
    /// on the eBPF crate for its own target.
    Lint,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd.status().with_context(|| format!("spawn {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn test(filter: Option<String>) -> Result<()> {
    if !is_root() {
        bail!("the privileged tests load BPF programs and build network namespaces: run `sudo -E cargo xtask test`");
    }
    setup::setup()?;
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    let filter: Vec<String> = filter.into_iter().collect();
    // Host tests: pure logic, parallel.
    run(cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "guard-ebpf",
            "--exclude",
            "guard-tests",
            "--all-features",
            "--",
        ])
        .args(&filter))?;
    // The privileged tests drive the real binaries (agent, lab client).
    run(cargo().args(["build", "-p", "guard-user", "-p", "guard-tests", "--bins"]))?;
    // Privileged tests share kernel state (namespaces, bpffs, interfaces):
    // one at a time.
    run(cargo()
        .args(["test", "-p", "guard-tests", "--", "--test-threads=1"])
        .args(&filter))?;
    if filter.is_empty() {
        run(Command::new("bash").arg(root.join("guard-user/deploy/check.sh")))?;
        lint()?;
    }
    Ok(())
}

fn lint() -> Result<()> {
    setup::setup()?;
    std::env::set_current_dir(workspace_root())?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "guard-ebpf",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate only builds for the BPF target, with the nightly's
    // build-std; its own target dir keeps host artefacts apart.
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "guard-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-lint",
        "--",
        "-D",
        "warnings",
    ]))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Test { filter } => test(filter),
        Cmd::Demo(args) => demo::main(args),
        Cmd::Bench(args) => bench::main(args),
        Cmd::Lint => lint(),
        Cmd::Tune { args } => tune::main(args),
    }
}
