//! What `cargo xtask dist` ships, proven as an operator would use it: the checksums match,
//! the .deb has the layout, conffiles and postinst a Debian host needs, and the `guard`
//! unpacked from the tarball protects a lab server with no Rust toolchain reachable (no
//! cargo, nightly or bpf-linker on its PATH): the eBPF object really is inside the binary.
//!
//! Run as root: `cargo test -p guard-tests --test dist -- --test-threads=1`. It builds the
//! dist with `--profile dev` (the binary the other tests use, so no extra compile).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use guard_common::stats::Stat;
use guard_tests::agent::{connects, host_prefix, AgentHome, Listener, RunOpts};
use guard_tests::binaries::{dist, workspace_root};
use guard_tests::lab::{Lab, ATTACKER_V4, ROLE_IF, SERVER_V4};
use guard_tests::process::run_checked;
use guard_tests::require_root;
use guard_tests::tools::TempDir;

const PORT: u16 = 8080;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn sh(cmd: &mut Command) -> String {
    run_checked(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The only file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn one_file(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the dist folder")
        .map(|e| e.expect("a dir entry").path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{prefix}*{suffix} in {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// `PATH` without every folder that holds a Rust or eBPF build tool.
fn path_without_toolchains() -> String {
    const TOOLS: [&str; 4] = ["cargo", "rustc", "rustup", "bpf-linker"];
    let path = std::env::var("PATH").unwrap_or_default();
    let kept: Vec<&str> = path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .filter(|dir| !dir.contains(".cargo") && !dir.contains(".rustup"))
        .filter(|dir| !TOOLS.iter().any(|t| Path::new(dir).join(t).exists()))
        .collect();
    kept.join(":")
}

/// Runs the package's postinst as dpkg would (`configure` on a first install, then on an
/// upgrade) in a private mount namespace whose /etc is a throwaway copy and whose
/// /run/systemd is empty, so the host's groups and service manager stay untouched; checks it
/// creates the `guard` group once and only says what to do next on the first install.
fn postinst_creates_the_group_once(postinst: &Path) {
    let host_groups = || std::fs::read_to_string("/etc/group").expect("read /etc/group");
    let before = host_groups();
    let etc = TempDir::new("dist-etc").expect("a temp dir");
    sh(Command::new("cp").arg("-a").arg("/etc/.").arg(etc.path()));
    // Without a guard group in the copy, "created once" means created by the postinst.
    sh(Command::new("sed")
        .arg("-i")
        .arg("/^guard:/d")
        .arg(etc.path().join("group"))
        .arg(etc.path().join("gshadow")));
    let script = r#"set -e
mount --make-rprivate /
mount --bind "$1" /etc
if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; fi
echo "--- install"
sh "$2" configure ""
echo "--- upgrade"
sh "$2" configure 0.0.1
echo "--- groups"
getent group guard
"#;
    let out = sh(Command::new("unshare")
        .args(["--mount", "sh", "-c", script, "sh"])
        .arg(etc.path())
        .arg(postinst));
    let (install, rest) = out
        .split_once("--- upgrade")
        .unwrap_or_else(|| panic!("{out}"));
    let (upgrade, groups) = rest
        .split_once("--- groups")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(install.contains("systemctl enable --now guard"), "{out}");
    assert!(!upgrade.contains("systemctl enable"), "{out}");
    assert_eq!(
        groups.lines().filter(|l| l.starts_with("guard:")).count(),
        1,
        "{out}"
    );
    let copied = std::fs::read_to_string(etc.path().join("group")).expect("the copied group");
    assert_eq!(
        copied.lines().filter(|l| l.starts_with("guard:")).count(),
        1,
        "{copied}"
    );
    assert_eq!(
        host_groups(),
        before,
        "the postinst changed the host's /etc/group"
    );
}

#[test]
fn the_dist_tarball_alone_installs_an_agent_that_protects_a_server() {
    if !require_root("the_dist_tarball_alone_installs_an_agent_that_protects_a_server") {
        return;
    }
    let out = TempDir::new("dist").expect("a temp dir");
    dist(out.path()).unwrap_or_else(|e| panic!("{e:#}"));

    let tarball = one_file(out.path(), "guard-", "-linux.tar.gz");
    let deb = one_file(out.path(), "guard_", ".deb");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        tarball.file_name().unwrap().to_string_lossy(),
        format!("guard-{version}-{}-linux.tar.gz", std::env::consts::ARCH)
    );
    assert!(
        out.path().join("Dockerfile").is_file(),
        "no Dockerfile beside the tarball"
    );

    // SHA256SUMS names exactly the two artefacts, and both match.
    let sums = std::fs::read_to_string(out.path().join("SHA256SUMS")).expect("SHA256SUMS");
    let mut named: Vec<&str> = sums
        .lines()
        .map(|l| l.split_whitespace().nth(1).expect("`hash  name` lines"))
        .collect();
    named.sort();
    let mut want = vec![
        tarball.file_name().unwrap().to_str().unwrap(),
        deb.file_name().unwrap().to_str().unwrap(),
    ];
    want.sort();
    assert_eq!(named, want, "{sums}");
    let checked = sh(Command::new("sha256sum")
        .current_dir(out.path())
        .args(["-c", "SHA256SUMS"]));
    assert_eq!(checked.matches(": OK").count(), 2, "{checked}");

    // The tarball: one top folder with the binary, docs, completions, deploy/ and licenses.
    let unpacked = TempDir::new("dist-unpacked").expect("a temp dir");
    sh(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(unpacked.path()));
    let top = unpacked
        .path()
        .join(format!("guard-{version}-{}-linux", std::env::consts::ARCH));
    let mut expected: Vec<String> = [
        "bin/guard",
        "man/man1/guard.1",
        "man/man1/guard-run.1",
        "completions/guard.bash",
        "completions/_guard",
        "completions/guard.fish",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "README.md",
        "guard-user/README.md",
        "guard-common/README.md",
        "guard-ebpf/README.md",
        "tests/README.md",
    ]
    .map(String::from)
    .to_vec();
    for e in std::fs::read_dir(workspace_root().join("guard-user/deploy")).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            expected.push(format!("deploy/{}", e.file_name().to_string_lossy()));
        }
    }
    assert!(expected.iter().any(|p| p == "deploy/Dockerfile"));
    for rel in &expected {
        assert!(top.join(rel).is_file(), "the tarball has no {rel}");
    }
    let bin = top.join("bin/guard");
    let shown = sh(Command::new(&bin).arg("--version"));
    assert_eq!(shown.trim(), format!("guard {version}"));

    // The .deb: metadata, conffiles, postinst, layout, and the same binary.
    let info = sh(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: guard",
        &format!("Version: {version}"),
        "Depends: libc6 (>= 2.",
    ] {
        assert!(info.contains(field), "no `{field}` in:\n{info}");
    }
    let conffiles = sh(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert!(
        conffiles.lines().any(|l| l == "/etc/guard/guard.toml"),
        "{conffiles}"
    );
    let postinst = sh(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("postinst"));
    assert!(postinst.contains("groupadd --system guard"), "{postinst}");
    let control = TempDir::new("dist-control").expect("a temp dir");
    sh(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(control.path()));
    postinst_creates_the_group_once(&control.path().join("postinst"));
    let contents = sh(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/guard",
        "./etc/guard/guard.toml",
        "./lib/systemd/system/guard.service",
        "./etc/logrotate.d/guard",
        "./usr/share/doc/guard/RUNBOOK.md",
        "./usr/share/doc/guard/guard-user/README.md",
        "./usr/share/doc/guard/copyright",
        "./usr/share/man/man1/guard.1.gz",
        "./usr/share/bash-completion/completions/guard",
        "./usr/share/zsh/vendor-completions/_guard",
        "./usr/share/fish/vendor_completions.d/guard.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "the .deb has no {path}:\n{contents}"
        );
    }
    assert!(
        contents.lines().all(|l| l.contains(" root/root ")),
        "files in the .deb not owned by root:\n{contents}"
    );
    let extracted = TempDir::new("dist-deb").expect("a temp dir");
    sh(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(extracted.path()));
    let unit = std::fs::read_to_string(extracted.path().join("lib/systemd/system/guard.service"))
        .expect("the packaged unit");
    assert!(
        unit.contains("\nType=notify\n"),
        "the unit is not Type=notify"
    );
    assert!(
        unit.contains("\nExecStart=/usr/bin/guard run "),
        "the packaged unit does not start the packaged binary"
    );
    assert!(
        std::fs::read(extracted.path().join("usr/bin/guard")).unwrap()
            == std::fs::read(&bin).unwrap(),
        "the .deb and the tarball ship different binaries"
    );

    // The unpacked binary, with no toolchain reachable, protects a lab server.
    let path = path_without_toolchains();
    for tool in ["cargo", "rustc", "bpf-linker"] {
        assert!(
            !path.split(':').any(|d| Path::new(d).join(tool).exists()),
            "{tool} is still reachable through PATH={path}"
        );
    }
    let lab = Lab::new().expect("build the lab");
    let home = AgentHome::with_bin(bin.clone()).expect("agent home");
    let agent = home
        .start(&lab.server, &RunOpts::new(ROLE_IF, PORT).env("PATH", &path))
        .unwrap_or_else(|e| panic!("start the unpacked agent: {e:#}"));
    let environ = std::fs::read(format!("/proc/{}/environ", agent.pid())).expect("its environ");
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|kv| kv == format!("PATH={path}").as_bytes()),
        "the agent does not run with the stripped PATH"
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", agent.pid())).expect("its exe");
    assert_eq!(exe, bin, "the agent is not the unpacked binary");

    let server = SocketAddr::new(SERVER_V4.into(), PORT);
    let listener = Listener::new(&lab.server, server).expect("listener");
    let attacker = host_prefix(ATTACKER_V4.into());
    assert_eq!(
        connects(&lab.attacker, server, 3, CONNECT_TIMEOUT).unwrap(),
        3,
        "before any block"
    );
    listener
        .wait_closed(&lab.server, 3)
        .expect("connections closed");
    let out = home
        .ctl(&["block", &attacker, "--ttl", "10m"])
        .unwrap_or_else(|e| panic!("guard block: {e:#}"));
    assert!(out.starts_with("added"), "{out}");
    let dropped = || {
        home.pins()
            .maps()
            .and_then(|m| m.stat(Stat::DropBlocked).map_err(anyhow::Error::from))
            .expect("read drop_blocked")
    };
    let before = dropped();
    assert_eq!(
        connects(&lab.attacker, server, 3, CONNECT_TIMEOUT).unwrap(),
        0,
        "the blocked attacker still connects"
    );
    assert_eq!(
        connects(&lab.legit, server, 3, CONNECT_TIMEOUT).unwrap(),
        3,
        "a legit client was dropped too"
    );
    assert!(
        dropped() >= before + 3,
        "the kernel counted no blocked drops"
    );
    let status = home
        .status()
        .unwrap_or_else(|e| panic!("guard status: {e:#}"));
    assert!(
        status.contains(&format!("attached: {ROLE_IF} (")),
        "{status}"
    );
    assert!(status.contains("blocked prefixes: 1"), "{status}");
    agent
        .stop()
        .expect("stop the agent")
        .ensure_success("guard run")
        .expect("a clean exit");
}
