//! `cargo xtask tune`: `guard tune` against a running agent — by default the
//! lab's (the newest `guard run` on this machine, e.g. one left up by
//! `cargo xtask demo --keep`), so the same implementation serves hosts
//! without a checkout (`guard tune`) and the lab.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Arguments of a running `guard run`, read from /proc.
#[derive(Debug, Default, PartialEq, Eq)]
struct RunningAgent {
    pid: u32,
    control_socket: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
}

fn flag_value(args: &[String], flag: &str) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            let prefix = format!("{flag}=");
            args.iter()
                .find_map(|a| a.strip_prefix(&prefix).map(PathBuf::from))
        })
}

/// `guard run` processes, parsed from their NUL-separated command lines.
fn parse_agent(pid: u32, cmdline: &[u8]) -> Option<RunningAgent> {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let bin = Path::new(args.first()?).file_name()?.to_str()?;
    if bin != "guard" || args.get(1).map(String::as_str) != Some("run") {
        return None;
    }
    Some(RunningAgent {
        pid,
        control_socket: flag_value(&args, "--control-socket"),
        pin_dir: flag_value(&args, "--pin-dir"),
    })
}

fn newest_agent() -> Option<RunningAgent> {
    let mut found: Vec<RunningAgent> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| parse_agent(pid, &std::fs::read(format!("/proc/{pid}/cmdline")).ok()?))
        .collect();
    found.sort_by_key(|a| a.pid);
    found.pop()
}

pub fn main(args: Vec<String>) -> Result<()> {
    xtask::setup::setup()?;
    let root = xtask::workspace_root();
    let status = xtask::cargo()
        .current_dir(&root)
        .args(["build", "-q", "-p", "guard-user", "--bin", "guard"])
        .status()
        .context("build the guard binary")?;
    if !status.success() {
        bail!("building the guard binary failed");
    }
    let guard = root.join("target/debug/guard");
    let mut cmd = Command::new(&guard);
    cmd.arg("tune").args(&args);
    let explicit = |flag: &str| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if !explicit("--control-socket") || !explicit("--pin-dir") {
        match newest_agent() {
            Some(agent) => {
                eprintln!("xtask tune: using the agent running as PID {}", agent.pid);
                if let (false, Some(sock)) = (explicit("--control-socket"), agent.control_socket) {
                    cmd.arg("--control-socket").arg(sock);
                }
                if let (false, Some(pins)) = (explicit("--pin-dir"), agent.pin_dir) {
                    cmd.arg("--pin-dir").arg(pins);
                }
            }
            None => eprintln!(
                "xtask tune: no `guard run` is running here; using guard's defaults (start the lab with `cargo xtask demo --keep`)"
            ),
        }
    }
    let status = cmd
        .status()
        .with_context(|| format!("run {}", guard.display()))?;
    if !status.success() {
        bail!("guard tune failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_socket_and_pins_of_a_guard_run_command_line() {
        let line = b"/work/target/debug/guard\0run\0-i\0eth0\0--pin-dir\0/sys/fs/bpf/gd-x\0--control-socket=/tmp/a.sock\0";
        assert_eq!(
            parse_agent(7, line),
            Some(RunningAgent {
                pid: 7,
                control_socket: Some("/tmp/a.sock".into()),
                pin_dir: Some("/sys/fs/bpf/gd-x".into()),
            })
        );
        assert_eq!(
            parse_agent(8, b"/usr/bin/guard\0status\0"),
            None,
            "only `guard run`"
        );
        assert_eq!(parse_agent(9, b"/usr/bin/vim\0run\0"), None);
        assert_eq!(parse_agent(10, b""), None);
    }
}
