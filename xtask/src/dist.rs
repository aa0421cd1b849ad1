//! `cargo xtask dist`: what an operator installs, built once on a build machine (the one that
//! ran `cargo xtask setup`) so production hosts need no Rust, nightly or bpf-linker. The
//! `guard` binary embeds the eBPF object (guard-user/build.rs), so shipping it is shipping all
//! of guard.
//!
//! Writes into the output folder (default target/dist):
//! - `guard-<version>-<arch>-linux.tar.gz`: bin/guard, man/man1, completions, deploy/ (every
//!   file of guard-user/deploy), README.md and the guides, and the license files, under one top
//!   folder;
//! - `guard_<version>_<debarch>.deb`: the same laid out for Debian, built by `dpkg-deb`;
//! - `Dockerfile`, next to the tarball, so that folder is a complete `docker build` context;
//! - `SHA256SUMS` of the tarball and the .deb.
//!
//! Archives are reproducible for one binary: fixed owner, sorted names, every mtime set to
//! `SOURCE_DATE_EPOCH` (else the last commit's time), gzip without a timestamp.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};

use xtask::{cargo, run, workspace_root};

#[derive(clap::Args)]
pub struct DistArgs {
    /// Cargo profile of the guard binary: release (ship this) or dev (fast, for tests).
    #[arg(long, default_value = "release", value_parser = ["release", "dev"])]
    profile: String,
    /// Where to write the artefacts (default: target/dist).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// What one dist run wrote.
pub struct Written {
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub dockerfile: PathBuf,
    pub sums: PathBuf,
}

pub fn main(args: DistArgs) -> Result<()> {
    let root = workspace_root();
    let out = args
        .out_dir
        .unwrap_or_else(|| target_dir(&root).join("dist"));
    let written = dist(&root, &args.profile, &out)?;
    for path in [
        &written.tarball,
        &written.deb,
        &written.dockerfile,
        &written.sums,
    ] {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        println!("{:>12}  {}", size, path.display());
    }
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// The Debian architecture name for Rust's `ARCH`; guard supports the two the README names.
fn deb_arch(arch: &str) -> Result<&'static str> {
    match arch {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        other => {
            bail!("no Debian architecture known for {other}: guard ships for x86_64 and aarch64")
        }
    }
}

/// The tarball's top folder, and its name without `.tar.gz` (the Dockerfile's ADD spells it
/// with its build args).
fn tarball_top(version: &str, arch: &str) -> String {
    format!("guard-{version}-{arch}-linux")
}

pub fn dist(root: &Path, profile: &str, out: &Path) -> Result<Written> {
    let mut build = cargo();
    build.current_dir(root).args([
        "build",
        "-p",
        "guard-user",
        "--bin",
        "guard",
        "--profile",
        profile,
    ]);
    run(&mut build).context(
        "building guard failed; the build machine needs the eBPF toolchain: run `cargo xtask setup` once",
    )?;
    let profile_dir = if profile == "dev" { "debug" } else { profile };
    let bin = target_dir(root).join(profile_dir).join("guard");
    ensure!(
        bin.is_file(),
        "{} is missing after the build",
        bin.display()
    );

    // The version the binary itself reports is the one the names carry.
    let version_line = output(Command::new(&bin).arg("--version"))?;
    let version = version_line
        .trim()
        .strip_prefix("guard ")
        .with_context(|| format!("`guard --version` printed {version_line:?}"))?
        .to_string();
    let arch = std::env::consts::ARCH;
    let debarch = deb_arch(arch)?;
    let epoch = source_date_epoch(root)?;

    fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let work = out.join(".staging");
    // Only our own staging folder is cleared: --out-dir may be a folder with other files.
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("clear {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;

    let docs = generate_docs(&bin, &work.join("generated"))?;
    let top = tarball_top(&version, arch);
    let tarball = out.join(format!("{top}.tar.gz"));
    stage_tarball(root, &bin, &docs, &work.join(&top))?;
    archive(&work, &top, &tarball, epoch)?;

    let deb = out.join(format!("guard_{version}_{debarch}.deb"));
    let deb_root = work.join("deb");
    stage_deb(root, &bin, &docs, &deb_root, &version, debarch)?;
    set_mtimes(&deb_root, epoch)?;
    let mut dpkg = Command::new("dpkg-deb");
    dpkg.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["--build", "--root-owner-group", "-Zgzip"])
        .arg(&deb_root)
        .arg(&deb);
    run(&mut dpkg).context("dpkg-deb failed (Debian: apt-get install dpkg)")?;

    let dockerfile = out.join("Dockerfile");
    fs::copy(root.join("guard-user/deploy/Dockerfile"), &dockerfile)
        .context("copy the Dockerfile")?;

    let sums = out.join("SHA256SUMS");
    let mut sha = Command::new("sha256sum");
    sha.current_dir(out)
        .arg(file_name(&tarball)?)
        .arg(file_name(&deb)?);
    fs::write(&sums, output(&mut sha)?).with_context(|| format!("write {}", sums.display()))?;

    fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    Ok(Written {
        tarball,
        deb,
        dockerfile,
        sums,
    })
}

/// Man pages and completions, generated by the binary being shipped (so they describe it).
struct Docs {
    man_pages: Vec<PathBuf>,
    bash: PathBuf,
    zsh: PathBuf,
    fish: PathBuf,
}

fn generate_docs(bin: &Path, dir: &Path) -> Result<Docs> {
    let man_dir = dir.join("man1");
    let listed = output(Command::new(bin).arg("man").arg("--out-dir").arg(&man_dir))?;
    let man_pages: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();
    ensure!(
        man_pages.first().is_some_and(|p| p.ends_with("guard.1")),
        "`guard man --out-dir` wrote no guard.1 (it listed {listed:?})"
    );
    let completion = |shell: &str, name: &str| -> Result<PathBuf> {
        let text = output(Command::new(bin).args(["completions", shell]))?;
        ensure!(
            !text.is_empty(),
            "`guard completions {shell}` printed nothing"
        );
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    Ok(Docs {
        man_pages,
        bash: completion("bash", "guard.bash")?,
        zsh: completion("zsh", "_guard")?,
        fish: completion("fish", "guard.fish")?,
    })
}

fn deploy_files(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("guard-user/deploy");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.is_file());
    files.sort();
    Ok(files)
}

/// 0644, or 0755 for a script (check.sh) that is executable in the source tree.
fn exec_bits_kept(f: &Path) -> Result<u32> {
    let mode = fs::metadata(f)
        .with_context(|| format!("stat {}", f.display()))?
        .permissions()
        .mode();
    Ok(if mode & 0o111 != 0 { 0o755 } else { 0o644 })
}

fn license_files(root: &Path) -> [PathBuf; 2] {
    [
        root.join("guard-user/LICENSE-MIT"),
        root.join("guard-user/LICENSE-APACHE"),
    ]
}

/// Copies `from` to `to` (creating its folder) with `mode`.
fn put(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::write(to, text).with_context(|| format!("write {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn file_name(p: &Path) -> Result<&str> {
    p.file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no UTF-8 file name", p.display()))
}

fn stage_tarball(root: &Path, bin: &Path, docs: &Docs, top: &Path) -> Result<()> {
    put(bin, &top.join("bin/guard"), 0o755)?;
    for page in &docs.man_pages {
        put(page, &top.join("man/man1").join(file_name(page)?), 0o644)?;
    }
    for c in [&docs.bash, &docs.zsh, &docs.fish] {
        put(c, &top.join("completions").join(file_name(c)?), 0o644)?;
    }
    for f in deploy_files(root)? {
        put(
            &f,
            &top.join("deploy").join(file_name(&f)?),
            exec_bits_kept(&f)?,
        )?;
    }
    for f in license_files(root) {
        put(&f, &top.join(file_name(&f)?), 0o644)?;
    }
    put_guides(root, top)
}

/// The README (the map) and the guide of each audience, at the paths the map links to.
const GUIDES: [&str; 5] = [
    "README.md",
    "guard-user/README.md",
    "guard-common/README.md",
    "guard-ebpf/README.md",
    "tests/README.md",
];

fn put_guides(root: &Path, to: &Path) -> Result<()> {
    for guide in GUIDES {
        put(&root.join(guide), &to.join(guide), 0o644)?;
    }
    Ok(())
}

/// tar + gzip with fixed metadata, so the same inputs give the same bytes.
fn archive(work: &Path, top: &str, tarball: &Path, epoch: u64) -> Result<()> {
    let tar = work.join(format!("{top}.tar"));
    let mut cmd = Command::new("tar");
    cmd.current_dir(work)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=gnu",
        ])
        .arg(format!("--mtime=@{epoch}"))
        .arg("-cf")
        .arg(&tar)
        .arg(top);
    run(&mut cmd)?;
    // -n: no name or timestamp in the gzip header.
    run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&tar))?;
    let gz = work.join(format!("{top}.tar.gz"));
    fs::rename(&gz, tarball)
        .with_context(|| format!("move {} to {}", gz.display(), tarball.display()))
}

/// What the .deb's unit differs in from the tarball's: the package installs to /usr, the
/// by-hand install to /usr/local. The strings must be present, so an edit of guard.service
/// that moves them fails here instead of shipping a unit that starts nothing.
fn deb_unit(text: &str) -> Result<String> {
    let mut unit = text.to_string();
    for (from, to) in [
        (
            "ExecStart=/usr/local/bin/guard ",
            "ExecStart=/usr/bin/guard ",
        ),
        (
            "Documentation=file:/usr/local/share/doc/guard/",
            "Documentation=file:/usr/share/doc/guard/",
        ),
    ] {
        ensure!(
            unit.contains(from),
            "guard.service has no `{from}` line to point at the package's paths"
        );
        unit = unit.replace(from, to);
    }
    Ok(unit)
}

/// The lowest glibc that has every versioned symbol the binary uses: the newest
/// `GLIBC_2.N` version name in it (they sit in its dynamic string table).
fn min_glibc(bin: &[u8]) -> Option<(u32, u32)> {
    const TAG: &[u8] = b"GLIBC_";
    let mut best = None;
    let mut i = 0;
    while let Some(pos) = bin[i..].windows(TAG.len()).position(|w| w == TAG) {
        let start = i + pos + TAG.len();
        let digits: Vec<u8> = bin[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit() || **b == b'.')
            .copied()
            .collect();
        // Only a NUL-terminated name is a version string; GLIBC_PRIVATE and the like are not.
        if bin.get(start + digits.len()) == Some(&0) {
            let text = String::from_utf8_lossy(&digits);
            let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
            if let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) {
                best = best.max(Some((major, minor)));
            }
        }
        i = start;
    }
    best
}

fn stage_deb(
    root: &Path,
    bin: &Path,
    docs: &Docs,
    deb: &Path,
    version: &str,
    debarch: &str,
) -> Result<()> {
    let deploy = root.join("guard-user/deploy");
    put(bin, &deb.join("usr/bin/guard"), 0o755)?;
    // Same modes as the by-hand install in guard.service's header.
    put(
        &deploy.join("guard.toml"),
        &deb.join("etc/guard/guard.toml"),
        0o640,
    )?;
    fs::set_permissions(deb.join("etc/guard"), fs::Permissions::from_mode(0o750))?;
    let unit = fs::read_to_string(deploy.join("guard.service")).context("read guard.service")?;
    write(
        &deb.join("lib/systemd/system/guard.service"),
        &deb_unit(&unit)?,
        0o644,
    )?;
    put(
        &deploy.join("guard.logrotate"),
        &deb.join("etc/logrotate.d/guard"),
        0o644,
    )?;
    let doc = deb.join("usr/share/doc/guard");
    put(&deploy.join("RUNBOOK.md"), &doc.join("RUNBOOK.md"), 0o644)?;
    put_guides(root, &doc)?;
    for f in license_files(root) {
        put(&f, &doc.join(file_name(&f)?), 0o644)?;
    }
    write(&doc.join("copyright"), COPYRIGHT, 0o644)?;
    // The rest of deploy/ (alerts, dashboard, k8s, Dockerfile, checks) are examples to adapt.
    let installed = [
        "guard.toml",
        "guard.service",
        "guard.logrotate",
        "RUNBOOK.md",
    ];
    for f in deploy_files(root)? {
        let name = file_name(&f)?;
        if !installed.contains(&name) {
            put(&f, &doc.join("examples").join(name), exec_bits_kept(&f)?)?;
        }
    }
    let man = deb.join("usr/share/man/man1");
    let mut gzip = Command::new("gzip");
    // Debian policy: man pages compressed, without a timestamp in the header.
    gzip.args(["-9", "-n", "-f"]);
    for page in &docs.man_pages {
        let to = man.join(file_name(page)?);
        put(page, &to, 0o644)?;
        gzip.arg(to);
    }
    run(&mut gzip)?;
    put(
        &docs.bash,
        &deb.join("usr/share/bash-completion/completions/guard"),
        0o644,
    )?;
    put(
        &docs.zsh,
        &deb.join("usr/share/zsh/vendor-completions/_guard"),
        0o644,
    )?;
    put(
        &docs.fish,
        &deb.join("usr/share/fish/vendor_completions.d/guard.fish"),
        0o644,
    )?;

    let binary = fs::read(bin).with_context(|| format!("read {}", bin.display()))?;
    let (major, minor) =
        min_glibc(&binary).context("the guard binary names no GLIBC_ symbol version")?;
    let installed_kib = tree_size(deb)?.div_ceil(1024);
    let control = format!(
        "Package: guard\n\
         Version: {version}\n\
         Architecture: {debarch}\n\
         Maintainer: guard maintainers <guard@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6 (>= {major}.{minor}), libgcc-s1, procps\n\
         Suggests: logrotate\n\
         Section: net\n\
         Priority: optional\n\
         Description: eBPF (XDP/tc) connection guard for WebSocket/SSE services\n \
         The guard agent loads and pins an XDP/tc program that caps and blocks\n \
         connection floods in the kernel, serves a control socket for the warp\n \
         app's block reports and exports Prometheus metrics. The eBPF object is\n \
         built into /usr/bin/guard.\n"
    );
    let debian = deb.join("DEBIAN");
    write(&debian.join("control"), &control, 0o644)?;
    write(
        &debian.join("conffiles"),
        "/etc/guard/guard.toml\n/etc/logrotate.d/guard\n",
        0o644,
    )?;
    write(&debian.join("postinst"), POSTINST, 0o755)?;
    write(&debian.join("prerm"), PRERM, 0o755)?;
    write(&debian.join("postrm"), POSTRM, 0o755)?;
    fs::set_permissions(&debian, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Creates the group the unit runs as (`Group=guard`; without it systemd fails the start with
/// 216/GROUP). It does not enable or start guard: guard.toml names interfaces and ports that
/// only the operator knows, and attaching to the wrong ones would drop real traffic.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ]; then
    if ! getent group guard >/dev/null; then
        groupadd --system guard
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade replaced the binary under a running agent: the new one adopts the pins
        # and switches the link atomically. Not started if it was not running.
        if [ -n "$2" ]; then
            systemctl try-restart guard.service || true
        fi
    fi
    if [ -z "$2" ]; then
        echo "guard: edit /etc/guard/guard.toml (interfaces, ports), then: systemctl enable --now guard"
    fi
fi
exit 0
"#;

/// On removal (not on upgrade), stops the agent and takes guard out of the data path: once the
/// binary is gone nothing is left that could `guard unload` the pinned program, and a
/// running agent would outlive its unit file. An upgrade keeps both (the new agent adopts the
/// pins). A failed unload only warns: refusing the removal would leave the operator stuck.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop guard.service || true
    fi
    # `guard unload` reads no config file: take an edited pin_dir from it.
    pin_dir=$(sed -n 's/^pin_dir *= *"\(.*\)".*/\1/p' /etc/guard/guard.toml 2>/dev/null | tail -n 1)
    if ! /usr/bin/guard unload ${pin_dir:+--pin-dir "$pin_dir"}; then
        echo "guard: could not unload the pinned program: see \`bpftool net\` and ${pin_dir:-/sys/fs/bpf/guard}" >&2
    fi
fi
exit 0
"#;

/// Purge removes what the package and its unit made outside the conffiles (dpkg purges
/// those): the audit logs and the enablement link. The `guard` group stays, as Debian
/// leaves system groups (files elsewhere may still carry its GID).
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "purge" ]; then
    rm -rf /var/log/guard
    rm -f /etc/systemd/system/multi-user.target.wants/guard.service
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
"#;

const COPYRIGHT: &str =
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: guard\n\
\n\
Files: *\n\
Copyright: The guard authors\n\
License: MIT or Apache-2.0\n \
The full texts are in LICENSE-MIT and LICENSE-APACHE in this folder\n \
(Apache-2.0 also in /usr/share/common-licenses/Apache-2.0).\n";

fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let meta = fs::symlink_metadata(e.path())?;
        total += if meta.is_dir() {
            tree_size(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Every file and folder under `dir` gets mtime `epoch` (dpkg-deb takes mtimes as found).
fn set_mtimes(dir: &Path, epoch: u64) -> Result<()> {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.is_dir() {
            set_mtimes(&path, epoch)?;
        }
        fs::File::open(&path)
            .and_then(|f| f.set_modified(time))
            .with_context(|| format!("set the mtime of {}", path.display()))?;
    }
    fs::File::open(dir)
        .and_then(|f| f.set_modified(time))
        .with_context(|| format!("set the mtime of {}", dir.display()))
}

/// `SOURCE_DATE_EPOCH` if set, else the last commit's time, else now.
fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let text = v.to_string_lossy();
        return text
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH is `{text}`, not seconds since 1970"));
    }
    let commit = Command::new("git")
        .current_dir(root)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
    Ok(commit.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }))
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("spawn {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_glibc_is_the_newest_version_named() {
        let bin = b"\0GLIBC_2.2.5\0xx\0GLIBC_2.34\0GLIBC_PRIVATE\0GLIBC_2.17\0GLIBC_2.99x";
        assert_eq!(min_glibc(bin), Some((2, 34)));
        assert_eq!(min_glibc(b"no versions"), None);
    }

    #[test]
    fn the_deb_unit_points_at_usr() {
        let unit = "Documentation=file:/usr/local/share/doc/guard/RUNBOOK.md\n\
                    ExecStart=/usr/local/bin/guard run --config /etc/guard/guard.toml\n";
        let out = deb_unit(unit).unwrap();
        assert!(out.contains("ExecStart=/usr/bin/guard run"), "{out}");
        assert!(
            out.contains("file:/usr/share/doc/guard/RUNBOOK.md"),
            "{out}"
        );
        assert!(deb_unit("ExecStart=/opt/guard run\n").is_err());
    }

    #[test]
    fn the_shipped_unit_can_be_rewritten() {
        let text =
            fs::read_to_string(workspace_root().join("guard-user/deploy/guard.service")).unwrap();
        deb_unit(&text).unwrap();
    }

    /// The image k8s-sidecar.yaml runs is the one the Dockerfile builds from this version's
    /// tarball: same version, same tarball name, same guard GID, and arguments that suit the
    /// `guard run` entrypoint.
    #[test]
    fn the_dockerfile_and_the_k8s_sidecar_agree() {
        let deploy = workspace_root().join("guard-user/deploy");
        let docker = fs::read_to_string(deploy.join("Dockerfile")).unwrap();
        let k8s = fs::read_to_string(deploy.join("k8s-sidecar.yaml")).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            docker.contains(&format!("\nARG VERSION={version}\n")),
            "Dockerfile VERSION"
        );
        assert!(docker.contains("\nFROM debian:bookworm-slim\n"));
        let add = format!("ADD {}.tar.gz /tmp/", tarball_top("${VERSION}", "${ARCH}"));
        assert!(docker.contains(&add), "the Dockerfile does not ADD `{add}`");
        assert!(docker.contains(r#"ENTRYPOINT ["/usr/bin/guard", "run"]"#));
        assert!(docker.contains("groupadd --system --gid 9940 guard"));
        assert!(
            k8s.contains(&format!("image: registry.example.com/guard:{version}\n")),
            "k8s-sidecar.yaml does not run guard {version}"
        );
        assert!(docker.contains(&format!("registry.example.com/guard:{version}")));
        assert!(k8s.contains("runAsGroup: 9940") && k8s.contains("supplementalGroups: [9940]"));
        assert!(
            k8s.contains(r#"args: ["--config", "/etc/guard/guard.toml"]"#),
            "the sidecar's args must not repeat the entrypoint's `run`"
        );
    }

    #[test]
    fn deb_arch_names() {
        assert_eq!(deb_arch("x86_64").unwrap(), "amd64");
        assert_eq!(deb_arch("aarch64").unwrap(), "arm64");
        assert!(deb_arch("riscv64").is_err());
    }
}
