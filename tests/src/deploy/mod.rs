//! The deploy stage: what `cargo xtask dist` ships, run the way an operator runs it. The .deb
//! is installed under a booted systemd ([`nspawn`]), the image built from the shipped
//! Dockerfile runs the shipped k8s sidecar manifest in a pod ([`pod`]).
//!
//! No image registry or Debian installer is reachable from the lab, so both start from a
//! Debian root filesystem made here with `mmdebstrap` and cached under
//! `~/.cache/guard/deploy/` ([`cached_rootfs`]): the first run makes it (~15 s each), later
//! runs reuse it. Everything a run creates (containers, pods, images, networks, namespaces,
//! pins) carries the [`PREFIX`] and the test's PID and is removed on drop, even when the test
//! fails.

pub mod lab_rules;
pub mod nspawn;
pub mod pod;
pub mod prom;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _, Result};
use guard_user::datapath;
use guard_user::paths::PinLayout;

use crate::binaries::{dist, workspace_root};
use crate::process::run_checked;

/// Every name the deploy stage gives a container, pod, image, network or pin folder starts
/// with this ("gd-" like the lab's namespaces), so leftovers are found by name.
pub const PREFIX: &str = "gd-deploy";

/// A Debian root filesystem this stage boots or imports.
#[derive(Debug, Clone, Copy)]
pub enum Rootfs {
    /// `--variant=minbase`: the base of the images (what `debian:bookworm-slim` is).
    Minbase,
    /// minbase with systemd as init, and procps (whose `/bin/kill` the unit's ExecReload
    /// runs; every standard Debian host has it, being Priority: important).
    Systemd,
}

impl Rootfs {
    fn name(self) -> &'static str {
        match self {
            Rootfs::Minbase => "bookworm-minbase",
            Rootfs::Systemd => "bookworm-systemd",
        }
    }

    fn include(self) -> Option<&'static str> {
        match self {
            Rootfs::Minbase => None,
            Rootfs::Systemd => Some("systemd,systemd-sysv,dbus,procps"),
        }
    }
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/guard/deploy")
}

/// The tarball of `kind`, made with mmdebstrap on first use. It is written under a temporary
/// name and renamed, so an interrupted run never leaves a truncated cache behind.
pub fn cached_rootfs(kind: Rootfs) -> Result<PathBuf> {
    let dir = cache_dir();
    let tar = dir.join(format!("{}.tar", kind.name()));
    if tar.is_file() {
        return Ok(tar);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // mmdebstrap picks the output format from the extension: keep `.tar` last.
    let part = dir.join(format!("{}.{}.part.tar", kind.name(), std::process::id()));
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=minbase", "--quiet"]);
    if let Some(include) = kind.include() {
        cmd.arg(format!("--include={include}"));
    }
    cmd.arg("bookworm").arg(&part);
    let made = run_checked(&mut cmd).context(
        "mmdebstrap could not make the base root filesystem (it needs the Debian mirror \
         apt uses; `cargo xtask setup` installs mmdebstrap)",
    );
    if let Err(e) = made {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, &tar)
        .with_context(|| format!("move {} to {}", part.display(), tar.display()))?;
    Ok(tar)
}

/// What `cargo xtask dist` wrote for this stage.
#[derive(Debug, Clone)]
pub struct Dist {
    pub dir: PathBuf,
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub dockerfile: PathBuf,
    pub version: String,
}

/// Runs `cargo xtask dist --profile dev` into `target/deploy/dist` (the binary the other
/// tests use, so nothing extra compiles) and finds what it wrote.
pub fn build_dist() -> Result<Dist> {
    let root = workspace_root();
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("deploy/dist");
    dist(&dir)?;
    let version = env!("CARGO_PKG_VERSION").to_string();
    let dist = Dist {
        tarball: dir.join(format!(
            "guard-{version}-{}-linux.tar.gz",
            std::env::consts::ARCH
        )),
        deb: dir.join(format!("guard_{version}_{}.deb", deb_arch()?)),
        dockerfile: dir.join("Dockerfile"),
        dir,
        version,
    };
    for f in [&dist.tarball, &dist.deb, &dist.dockerfile] {
        ensure!(f.is_file(), "cargo xtask dist wrote no {}", f.display());
    }
    Ok(dist)
}

fn deb_arch() -> Result<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        other => anyhow::bail!("the deploy stage knows no Debian architecture for {other}"),
    }
}

/// A folder of the host's bpffs that a container sees as its `/sys/fs/bpf`: guard pins under
/// its default `/sys/fs/bpf/guard` inside, which is `<this>/guard` here. On drop whatever is
/// still pinned there is unloaded (links detached) and the folder removed.
#[derive(Debug)]
pub struct BpffsScratch {
    dir: PathBuf,
}

impl BpffsScratch {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = Path::new(guard_user::paths::BPFFS_ROOT)
            .join(format!("{PREFIX}-{tag}-{}", std::process::id()));
        ensure!(
            !dir.exists(),
            "{} already exists: a leftover of an earlier run; remove it with `guard unload \
             --pin-dir {0}/guard` and rmdir",
            dir.display()
        );
        datapath::check_bpffs(Path::new(guard_user::paths::BPFFS_ROOT))
            .context("the deploy stage pins under bpffs")?;
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The pin folder guard uses inside with its default `pin_dir`.
    pub fn guard_pins(&self) -> PathBuf {
        self.dir.join("guard")
    }

    /// Every folder in it holding a guard pin layout (a pod's is `guard-pods/<uid>`).
    pub fn pin_roots(&self) -> Vec<PathBuf> {
        pin_roots(&self.dir)
    }

    /// Whether anything is pinned under guard's folder in it.
    pub fn has_pins(&self) -> bool {
        std::fs::read_dir(PinLayout::new(self.guard_pins()).dir())
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }
}

impl Drop for BpffsScratch {
    fn drop(&mut self) {
        // Wherever a guard pinned in it: its default folder, or a pod's
        // `guard-pods/<uid>` (GUARD_PIN_DIR in the k8s manifest).
        for pins in pin_roots(&self.dir) {
            if let Err(e) = datapath::unload(&PinLayout::new(&pins)) {
                eprintln!(
                    "warning: cannot unload the pins under {}: {e:#}",
                    pins.display()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Every folder under `dir` (itself included) that holds a guard pin layout.
fn pin_roots(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if PinLayout::new(dir).dir().is_dir() {
        found.push(dir.to_path_buf());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                found.extend(pin_roots(&e.path()));
            }
        }
    }
    found
}
