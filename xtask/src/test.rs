//! `cargo xtask test`: every test, stage by stage — lint, the host unit tests, the privileged
//! tests (root, serially), the deploy checks and the deploy stage — closed by one line that
//! adds up what every `cargo test` of the run reported.

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use xtask::{cargo, is_root, lint, run, setup, workspace_root};

pub fn main(filter: Option<String>) -> Result<()> {
    if !is_root() {
        bail!("the privileged tests load BPF programs and build network namespaces: run `sudo -E cargo xtask test`");
    }
    setup::setup()?;
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    let filter: Vec<String> = filter.into_iter().collect();
    // Lint first: a formatting slip fails in minutes, not after the whole run.
    if filter.is_empty() {
        lint::lint()?;
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

#[cfg(test)]
mod tests {
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
