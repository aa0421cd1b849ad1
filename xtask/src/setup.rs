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
];

/// The bpf-linker release and LLVM major that work with this machine's
/// nightly (shared/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

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
