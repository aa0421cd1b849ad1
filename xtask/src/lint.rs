//! `cargo xtask lint`: `cargo fmt --check` and clippy `-D warnings` on the host crates and on
//! the eBPF crate for its own target. Also the first stage of `cargo xtask test`.

use std::process::Command;

use anyhow::Result;

use crate::{cargo, run, setup, workspace_root};

pub fn lint() -> Result<()> {
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
