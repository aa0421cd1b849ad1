//! What the kernel says about the agent's objects: pinned links, programs, XDP attachments.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::process::run_checked;

/// The link and program ids of a pinned link (`bpftool link show pinned PATH`).
pub fn pinned_link_ids(path: &Path) -> Result<(u64, u64)> {
    let out = run_checked(
        Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(path),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bpftool printed {out:?}"))?;
    let id = v["id"]
        .as_u64()
        .with_context(|| format!("no link id in {out}"))?;
    let prog = v["prog_id"]
        .as_u64()
        .with_context(|| format!("no prog id in {out}"))?;
    Ok((id, prog))
}

/// Whether a BPF link with this id still exists anywhere in the kernel.
pub fn link_exists(id: u64) -> bool {
    bpf_object_exists("link", id)
}

/// Whether a BPF program with this id is still loaded. The kernel frees a program after its
/// last reference is gone, with a short deferral: poll this rather than asserting at once.
pub fn prog_exists(id: u64) -> bool {
    bpf_object_exists("prog", id)
}

fn bpf_object_exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The XDP program `ip link` reports on `iface` in `ns`: `Some((mode, prog id))` with mode
/// `xdp` (native), `xdpgeneric` or `xdpoffload`, `None` when there is none.
pub fn xdp_prog(ns: &Netns, iface: &str) -> Result<Option<(String, u64)>> {
    let out = ns.ip(&["link", "show", "dev", iface])?;
    Ok(parse_xdp_prog(&out))
}

/// Reads the XDP mode and program id out of `ip link show` output: the mode is the flag word
/// right after `mtu N` on the first line (the `prog/xdp` line says `xdp` in every mode), the
/// id follows `prog/xdp id`.
pub fn parse_xdp_prog(ip_link: &str) -> Option<(String, u64)> {
    let words: Vec<&str> = ip_link.split_whitespace().collect();
    let mode = words
        .windows(3)
        .find(|w| w[0] == "mtu")
        .map(|w| w[2])
        .filter(|m| m.starts_with("xdp"))?;
    let id = words
        .windows(3)
        .find(|w| w[0].starts_with("prog/xdp") && w[1] == "id")
        .and_then(|w| w[2].parse().ok())?;
    Some((mode.to_string(), id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_link_xdp_parsing() {
        let native = "3: eth0@eth1: <BROADCAST,UP> mtu 1500 xdp qdisc noqueue\n    \
                      link/ether 2e:c2:6e:13:8e:00 brd ff:ff:ff:ff:ff:ff\n    \
                      prog/xdp id 195 name guard_xdp tag 47a3ffb65560fff3 jited\n";
        assert_eq!(parse_xdp_prog(native), Some(("xdp".into(), 195)));
        let generic = "3: eth0@eth1: <UP> mtu 1500 xdpgeneric qdisc noqueue state UP\n    \
                       prog/xdp id 12 name guard_xdp";
        assert_eq!(parse_xdp_prog(generic), Some(("xdpgeneric".into(), 12)));
        assert_eq!(parse_xdp_prog("3: eth0: <UP> mtu 1500 qdisc noqueue"), None);
        // A flag without a program line (or the reverse) is not an attachment.
        assert_eq!(
            parse_xdp_prog("3: eth0: <UP> mtu 1500 xdp qdisc noqueue"),
            None
        );
    }
}
