//! A Debian whose PID 1 is systemd (`systemd-nspawn -b`), booted inside a lab namespace, to
//! install the .deb into as an operator would: `dpkg -i`, `systemctl`, `guard`.
//!
//! What the runner adds and a real host already has: the interface (the namespace's `eth0`),
//! a bpffs at `/sys/fs/bpf` (a folder of the host's, see [`BpffsScratch`]), and the
//! capabilities and system calls guard's unit asks for. nspawn keeps `CAP_NET_ADMIN`,
//! `CAP_BPF` and `CAP_PERFMON` out of a container and filters `bpf`/`perf_event_open` by
//! default; the unit itself then narrows them again, exactly as on a host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::{cached_rootfs, BpffsScratch, Rootfs, PREFIX};
use crate::agent::wait_for;
use crate::netns::Netns;
use crate::process::{describe, run_checked, ChildGuard};
use crate::tools::TempDir;

/// How long boot may take on a busy 2-core machine (it takes ~2 s idle).
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// A booted container; powered off and its root removed on drop (field order: the container
/// stops before its bpffs folder is unloaded and its root deleted).
pub struct BootedDebian {
    nspawn: Option<ChildGuard>,
    init_pid: u32,
    bpffs: BpffsScratch,
    root: TempDir,
}

impl BootedDebian {
    /// Unpacks the cached systemd root filesystem and boots it with `ns` as its network.
    pub fn boot(ns: &Netns) -> Result<Self> {
        let tar = cached_rootfs(Rootfs::Systemd)?;
        let root = TempDir::new("deploy-root")?;
        run_checked(
            Command::new("tar")
                .arg("-xf")
                .arg(&tar)
                .arg("-C")
                .arg(root.path()),
        )
        .context("unpack the root filesystem")?;
        let bpffs = BpffsScratch::new("nspawn")?;
        let machine = format!("{PREFIX}-{}", std::process::id());
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(root.path())
            .args(["-b", "--register=no", "--keep-unit", "-M", &machine])
            .arg(format!("--network-namespace-path={}", ns.path().display()))
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.path().display()))
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN")
            .arg("--system-call-filter=bpf perf_event_open")
            // The console is a pipe: no colours, no pager.
            .env("SYSTEMD_COLORS", "0");
        let mut nspawn =
            ChildGuard::spawn("systemd-nspawn", &mut cmd)?.with_grace(Duration::from_secs(30));
        let nspawn_pid = nspawn.pid();
        let init_pid = wait_for("the container's init", BOOT_LIMIT, || {
            if !nspawn.is_running()? {
                bail!(
                    "systemd-nspawn exited while booting: {}",
                    nspawn.stderr_so_far()
                );
            }
            Ok(init_of(nspawn_pid))
        })?;
        let booted = Self {
            nspawn: Some(nspawn),
            init_pid,
            bpffs,
            root,
        };
        // Until systemd listens, `systemctl` answers nothing or "offline"; "degraded" is a
        // booted system too (a unit nspawn cannot run, e.g. a getty, failed).
        let mut last = String::new();
        wait_for("the container's boot", BOOT_LIMIT, || {
            let out = booted.exec(&["systemctl", "is-system-running"])?;
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(matches!(last.as_str(), "running" | "degraded").then_some(()))
        })
        .with_context(|| format!("systemd in the container last said {last:?}"))?;
        Ok(booted)
    }

    /// The container's root as seen from the host (to copy files in and read them).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn bpffs(&self) -> &BpffsScratch {
        &self.bpffs
    }

    /// Runs `argv` inside the container (all its namespaces), whatever its exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.init_pid))
            .args(["--all", "--"])
            .args(argv)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "");
        cmd.output()
            .with_context(|| format!("run {}", describe(&cmd)))
    }

    /// Runs a shell script inside; its stdout, or an error with everything it printed.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.exec(&["sh", "-c", script])?;
        if !out.status.success() {
            bail!(
                "in the container, `{script}` failed with {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The exit code of a shell script inside (for commands whose code is the answer).
    pub fn code(&self, script: &str) -> Result<i32> {
        let out = self.exec(&["sh", "-c", script])?;
        out.status
            .code()
            .with_context(|| format!("`{script}` was killed by a signal"))
    }

    /// Copies a host file into the container's root at `to` (absolute inside).
    pub fn copy_in(&self, from: &Path, to: &str) -> Result<PathBuf> {
        let dest = self.root.path().join(to.trim_start_matches('/'));
        std::fs::copy(from, &dest)
            .with_context(|| format!("copy {} to {}", from.display(), dest.display()))?;
        Ok(dest)
    }
}

impl Drop for BootedDebian {
    fn drop(&mut self) {
        let Some(nspawn) = self.nspawn.take() else {
            return;
        };
        // An orderly poweroff: units stop as on a host, then nspawn exits by itself.
        let _ = self.exec(&["systemctl", "poweroff", "--no-block"]);
        match nspawn.wait_timeout(Duration::from_secs(60)) {
            Ok(done) if done.stopped => eprintln!(
                "warning: the container did not power off in time and was stopped: {}",
                done.stderr.trim()
            ),
            Ok(_) => {}
            Err(e) => eprintln!("warning: stopping the container: {e:#}"),
        }
    }
}

/// The container's PID 1 as the host sees it: nspawn's only child, once it is systemd.
fn init_of(nspawn_pid: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "systemd")
            .then(|| pid.parse().ok())
            .flatten()
    })
}
