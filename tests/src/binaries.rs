//! The programs the lab runs (the agent, lab-client, the demo app), built with cargo and
//! found through cargo's own artifact messages, and the workspace they are built in. The
//! privileged tests take the agent beside their own executable ([`guard_bin`]); the demo and
//! the bench build all three ([`Binaries`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{ensure, Context as _, Result};

use crate::process::run_checked;

/// `cargo`, the one running this build if any.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `cargo xtask dist --profile dev --out-dir OUT`: what an operator installs, built from
/// this workspace (the dist test and the deploy stage both start from it).
pub fn dist(out_dir: &Path) -> Result<()> {
    run_checked(
        cargo()
            .current_dir(workspace_root())
            .args([
                "run",
                "--quiet",
                "-p",
                "xtask",
                "--",
                "dist",
                "--profile",
                "dev",
            ])
            .arg("--out-dir")
            .arg(out_dir),
    )
    .context("cargo xtask dist")?;
    Ok(())
}

/// The workspace root, one level above this (the tests) crate.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("a workspace member lives inside the workspace")
        .to_path_buf()
}

/// The programs the stack runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The agent and its CLI.
    pub guard: PathBuf,
    /// guard-common's demo app (examples/demo.rs); `None` for the bench, whose server is
    /// lab-client's echo server (the app and its warp build are not needed there).
    pub demo: Option<PathBuf>,
    pub lab_client: PathBuf,
}

impl Binaries {
    /// Builds the agent, lab-client and the demo app with cargo and takes their paths from
    /// cargo's own artifact messages, so a custom target dir or profile cannot mislead it.
    pub fn build(release: bool) -> Result<Self> {
        Self::build_with(release, true)
    }

    /// The agent and lab-client only.
    pub fn build_without_demo(release: bool) -> Result<Self> {
        Self::build_with(release, false)
    }

    fn build_with(release: bool, with_demo: bool) -> Result<Self> {
        let profile: &[&str] = if release { &["--release"] } else { &[] };
        let mut found = artifacts(
            cargo()
                .args(["build", "-p", "guard-user", "-p", "guard-tests", "--bins"])
                .args(profile),
        )?;
        if !with_demo {
            let take = |name: &str| built(&found, name);
            return Ok(Self {
                guard: take("guard")?,
                demo: None,
                lab_client: take("lab-client")?,
            });
        }
        found.extend(artifacts(
            cargo()
                .args([
                    "build",
                    "-p",
                    "guard-common",
                    "--example",
                    "demo",
                    "--features",
                    "warp",
                ])
                .args(profile),
        )?);
        let take = |name: &str| built(&found, name);
        Ok(Self {
            guard: take("guard")?,
            demo: Some(take("demo")?),
            lab_client: take("lab-client")?,
        })
    }
}

/// Environment variable that overrides where the `guard` binary is looked for.
pub const GUARD_BIN_ENV: &str = "GUARD_BIN";

/// The `guard` binary of this workspace: `$GUARD_BIN`, else `target/<profile>/guard` beside
/// the running test executable. It is (re)built with `cargo build -p guard-user` when missing
/// or older than the test executable, which links the same guard-user library: an older binary
/// would test yesterday's agent. Built at most once per process.
pub fn guard_bin() -> Result<PathBuf> {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    if let Some(bin) = BIN.get() {
        return Ok(bin.clone());
    }
    let bin = locate_guard_bin()?;
    Ok(BIN.get_or_init(|| bin).clone())
}

fn mtime(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn locate_guard_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(GUARD_BIN_ENV) {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "${GUARD_BIN_ENV} points to {}, which is not a file",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    // Test binaries live in target/<profile>/deps/, binaries in target/<profile>/.
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().context("deps/ has no parent")?
    } else {
        dir
    };
    let bin = profile_dir.join("guard");
    let fresh = match (mtime(&bin), mtime(&exe)) {
        (Some(b), Some(e)) => b >= e,
        _ => false,
    };
    if !fresh {
        let mut cmd = cargo();
        cmd.current_dir(workspace_root())
            .args(["build", "-p", "guard-user", "--bin", "guard"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        run_checked(&mut cmd).context("cannot build the guard binary")?;
    }
    ensure!(
        bin.is_file(),
        "{} is missing after `cargo build -p guard-user`; set ${GUARD_BIN_ENV}",
        bin.display()
    );
    Ok(bin)
}

/// The executable named `name` among what [`artifacts`] found.
pub fn built(found: &BTreeMap<String, PathBuf>, name: &str) -> Result<PathBuf> {
    found
        .get(name)
        .cloned()
        .with_context(|| format!("cargo built no executable named {name}"))
}

/// Runs a cargo build with JSON messages on stdout (diagnostics still rendered on stderr) and
/// returns executable paths by target name.
pub fn artifacts(cmd: &mut Command) -> Result<BTreeMap<String, PathBuf>> {
    cmd.current_dir(workspace_root())
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let line = crate::process::describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    ensure!(out.status.success(), "`{line}` failed ({})", out.status);
    let mut found = BTreeMap::new();
    for msg in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(msg) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_names_what_cargo_did_not_build() {
        let found = BTreeMap::from([("guard".to_string(), PathBuf::from("/t/debug/guard"))]);
        assert_eq!(built(&found, "guard").unwrap(), Path::new("/t/debug/guard"));
        let err = built(&found, "lab-client").unwrap_err().to_string();
        assert!(err.contains("lab-client"), "{err}");
    }
}
