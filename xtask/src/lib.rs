//! What more than one `cargo xtask` command needs: running cargo and other commands, the
//! workspace root, the root check, and the two steps other commands start with — `setup`
//! (every command that builds the eBPF program or runs the lab) and `lint` (the first stage
//! of `cargo xtask test`). The binary parses the command line and runs one command module.

pub mod lint;
pub mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Whether this process runs as root, which the privileged tests and the lab need.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The cargo that launched this xtask (cargo passes itself in `CARGO`), so nested builds use
/// the same toolchain; outside cargo, the one on PATH.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Echoes `cmd`, runs it, and fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd.status().with_context(|| format!("spawn {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The lab commands (demo, bench) without the `lab` feature: checks root, runs setup, then
/// replaces this process with xtask built with `lab`, which holds them (plain xtask stays free
/// of the eBPF build). `sudo_hint` is the command to suggest without root.
#[cfg(not(feature = "lab"))]
pub fn exec_with_lab_feature(sudo_hint: &str) -> Result<()> {
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
