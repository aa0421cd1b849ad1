//! `cargo xtask`: what a build script should not do — machine setup, the
//! privileged test run, the lab demo, benchmarks and live tuning.

mod bench;
mod demo;
mod dist;
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

/// The lab commands (demo, bench) without the `lab` feature: checks root, runs setup, then
/// replaces this process with xtask built with `lab`, which holds them (plain xtask stays free
/// of the eBPF build). `sudo_hint` is the command to suggest without root.
#[cfg(not(feature = "lab"))]
fn exec_with_lab_feature(sudo_hint: &str) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    if !is_root() {
        bail!("this builds network namespaces and loads BPF programs: run `{sudo_hint}`");
    }
    setup::setup()?;
    // exec, not spawn: Ctrl-C and the exit status then belong to the lab process alone.
    let err = cargo()
        .current_dir(workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--features", "lab", "--"])
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).context("cannot re-run xtask with the lab feature")
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
    // Lint first: a formatting slip fails in minutes, not after the whole run.
    if filter.is_empty() {
        lint()?;
        std::env::set_current_dir(&root)?;
    }
    let mut tally = Tally::default();
    // Host tests: pure logic, parallel.
    tally.run(
        cargo()
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
            .args(&filter),
    )?;
    // The privileged tests drive the real binaries (agent, lab client).
    run(cargo().args(["build", "-p", "guard-user", "-p", "guard-tests", "--bins"]))?;
    // Privileged tests share kernel state (namespaces, bpffs, interfaces):
    // one at a time.
    tally.run(
        cargo()
            .args(["test", "-p", "guard-tests", "--", "--test-threads=1"])
            .args(&filter),
    )?;
    if filter.is_empty() {
        run(Command::new("bash").arg(root.join("guard-user/deploy/check.sh")))?;
    }
    // The deploy stage: the shipped .deb under a booted systemd, the shipped image and k8s
    // manifest in a pod, run as an operator runs them (tests/tests/deploy.rs). Containers
    // and pods share the machine's podman and bpffs: one at a time.
    tally.run(
        cargo()
            .args([
                "test",
                "-p",
                "guard-tests",
                "--features",
                "deploy",
                "--test",
                "deploy",
                "--",
                "--test-threads=1",
            ])
            .args(&filter),
    )?;
    // One closing line for the whole run: the last runner printed may be a
    // crate's (empty) doc-test pass, which says nothing about the rest.
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

/// Counts what every `cargo test` of the run reported.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Runs a `cargo test`, echoing its output and adding up its
    /// `test result:` lines; fails like `run` does.
    fn run(&mut self, cmd: &mut Command) -> Result<()> {
        use std::io::BufRead as _;
        let shown = format!("{cmd:?}");
        eprintln!("xtask: {shown}");
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {shown}"))?;
        let out = child.stdout.take().context("test output")?;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some((p, f)) = parse_result_line(&line) {
                self.passed += p;
                self.failed += f;
            }
        }
        let status = child.wait()?;
        if !status.success() {
            println!(
                "tests: {} passed, {} failed",
                self.passed,
                self.failed.max(1)
            );
            bail!("{shown} failed with {status}");
        }
        Ok(())
    }
}

/// `test result: ok. 12 passed; 0 failed; ...` -> (12, 0).
fn parse_result_line(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split(['.', ';']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (words.next(), words.next()) {
            match what {
                "passed" => passed = n.parse().ok(),
                "failed" => failed = n.parse().ok(),
                _ => {}
            }
        }
    }
    Some((passed?, failed?))
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
        Cmd::Dist(args) => dist::main(args),
        Cmd::Tune { args } => tune::main(args),
    }
}

#[cfg(test)]
mod tally_tests {
    use super::parse_result_line;

    #[test]
    fn reads_cargo_test_result_lines() {
        assert_eq!(
            parse_result_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.20s"),
            Some((12, 0))
        );
        assert_eq!(
            parse_result_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured"),
            Some((3, 2))
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}
