//! Named network namespaces as RAII guards.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context, Result};

use crate::process::run_checked;

/// Every namespace this toolkit creates starts with this, so leftovers are easy to find.
pub const NETNS_PREFIX: &str = "gd-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/gd-<role>-<pid>-<n>`), deleted on drop.
///
/// The PID and a per-process counter make names unique across concurrent runs and within one.
/// Deleting the namespace removes its interfaces (and so the peers of its veths); processes
/// still inside keep it alive anonymously, which is why they are guarded by `ChildGuard`.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `gd-<role>-<pid>-<n>`. `role` is 1–4 characters of `[a-z0-9]`, keeping names
    /// short and unambiguous to parse.
    pub fn new(role: &str) -> Result<Self> {
        ensure!(
            (1..=4).contains(&role.len())
                && role
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "netns role {role:?} must be 1-4 characters of [a-z0-9]"
        );
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{role}-{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("cannot create network namespace {name} (root needed)"))?;
        let ns = Self {
            path: Path::new("/run/netns").join(&name),
            name,
        };
        // Loopback is down in a fresh namespace; local tools (and the agent's control socket
        // tests) expect it up.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `nsenter --net=` or `setns(2)`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` inside this namespace.
    ///
    /// It goes through `nsenter --net=...`, not `ip netns exec`: the latter also remounts
    /// /sys, which hides bpffs pins from a loader. Only the network namespace changes; the
    /// program keeps the host's mounts (so /sys shows the host's devices, not the namespace's:
    /// use `ip`/`ethtool`, which ask the kernel over netlink, to inspect interfaces).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `argv` inside the namespace; errors on non-zero exit; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("exec needs a program")?;
        run_checked(self.command(program).args(args))
            .with_context(|| format!("in netns {}", self.name))
    }

    /// Runs a shell script inside the namespace; errors on non-zero exit; returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        run_checked(self.command("sh").args(["-c", script]))
            .with_context(|| format!("in netns {}", self.name))
    }

    /// `ip -n NAME args...` (netlink into the namespace without entering it).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a sysctl for this namespace only. Only `net.*` keys are per-namespace, so anything
    /// else is refused: it would change the host.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        ensure!(
            key.starts_with("net."),
            "sysctl {key} is not per-namespace; refusing to change the host"
        );
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Reads a sysctl as this namespace sees it.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.exec(&["sysctl", "-n", key])?.trim().to_string())
    }

    /// Runs `f` on a thread that has joined this namespace (`setns(2)`), so sockets it opens
    /// live there. Only that thread moves; the caller's thread stays where it was.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd; it changes only this thread, which
                // ends when `f` returns.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("cannot enter netns {}", self.name));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread inside netns {} panicked", self.name))?
        })
    }

    /// A kernel network counter as this namespace counts it, e.g. `("Tcp", "InSegs")` or
    /// `("TcpExt", "SyncookiesSent")`: the per-namespace /proc/net/snmp and /proc/net/netstat,
    /// read from a thread inside the namespace (`/proc/thread-self`, since `/proc/self` would
    /// follow the main thread, which stays outside).
    pub fn counter(&self, group: &str, field: &str) -> Result<u64> {
        let texts = self.run_in(|| -> std::io::Result<String> {
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
            Ok(snmp + &netstat)
        })?;
        let text = texts.context("cannot read /proc/thread-self/net counters")?;
        parse_counter(&text, group, field).with_context(|| format!("in netns {}", self.name))
    }

    /// The MAC address of `iface` inside this namespace.
    pub fn mac(&self, iface: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", "dev", iface])?;
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("{iface} in {} has no Ethernet address", self.name))?;
        parse_mac(text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: cannot delete netns {}: {e:#}", self.name);
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("{text:?} is not a MAC address"))?;
        *byte = u8::from_str_radix(part, 16)
            .with_context(|| format!("{text:?} is not a MAC address"))?;
    }
    ensure!(parts.next().is_none(), "{text:?} is not a MAC address");
    Ok(mac)
}

/// Finds `group:field` in /proc/net/snmp-style text: for each group a line of names followed
/// by a line of values.
pub fn parse_counter(text: &str, group: &str, field: &str) -> Result<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names.split_whitespace().position(|n| n == field) {
            let value = values
                .split_whitespace()
                .nth(i)
                .with_context(|| format!("{group}:{field} has no value"))?;
            // Some counters (Tcp MaxConn) are signed; none that we read goes negative.
            return value
                .parse()
                .with_context(|| format!("{group}:{field} = {value:?} is not a count"));
        }
    }
    anyhow::bail!("no counter {group}:{field}")
}

/// What this toolkit may leave behind on the host: namespaces named `gd-*`, and host links
/// named `gd-*` or with a peer inside a `gd-*` namespace (`ip` prints `link-netns NAME`). A
/// clean run leaves none of its own; callers filter by their PID (`-<pid>-`) when other runs
/// may be active. Links inside a deleted namespace die with it, so only the host's are listed.
pub fn leftovers() -> Result<Vec<String>> {
    let mut found = Vec::new();
    for line in run_checked(Command::new("ip").args(["netns", "list"]))?.lines() {
        if let Some(name) = line.split_whitespace().next() {
            if name.starts_with(NETNS_PREFIX) {
                found.push(format!("netns {name}"));
            }
        }
    }
    for line in run_checked(Command::new("ip").args(["-o", "link", "show"]))?.lines() {
        // "7: name@peer: <FLAGS> ... link-netns NS ..."
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let peer_ns = line
            .split_whitespace()
            .skip_while(|w| *w != "link-netns")
            .nth(1)
            .filter(|ns| ns.starts_with(NETNS_PREFIX));
        if name.starts_with(NETNS_PREFIX) || peer_ns.is_some() {
            found.push(format!(
                "link {name} (peer in {})",
                peer_ns.unwrap_or("host")
            ));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        let text = "Ip: Forwarding DefaultTTL InReceives\nIp: 2 64 1234\n\
                    Tcp: RtoAlgorithm InSegs\nTcp: 1 99\n\
                    TcpExt: SyncookiesSent ListenDrops\nTcpExt: 7 0\n";
        assert_eq!(parse_counter(text, "Ip", "InReceives").unwrap(), 1234);
        assert_eq!(parse_counter(text, "Tcp", "InSegs").unwrap(), 99);
        assert_eq!(parse_counter(text, "TcpExt", "SyncookiesSent").unwrap(), 7);
        assert!(parse_counter(text, "Tcp", "Nope").is_err());
        assert!(parse_counter(text, "Udp", "InDatagrams").is_err());
        assert!(parse_counter("Ip: A\nIp: x\n", "Ip", "A").is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:67:64:00:00:0a").unwrap(),
            [2, 0x67, 0x64, 0, 0, 10]
        );
        assert!(parse_mac("02:67:64:00:00").is_err());
        assert!(parse_mac("02:67:64:00:00:00:01").is_err());
        assert!(parse_mac("zz:67:64:00:00:00").is_err());
    }

    #[test]
    fn bad_roles_are_refused_before_touching_the_system() {
        for role in ["", "toolong", "Srv", "a-b"] {
            let err = Netns::new(role).unwrap_err().to_string();
            assert!(err.contains("must be 1-4"), "{err}");
        }
    }
}
