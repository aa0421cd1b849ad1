//! Which cores the server side and the attacker get, and the thread-level helpers that put a
//! worker thread on its core and into its network namespace.

use std::os::fd::AsRawFd as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::measure::{allowed_cpus, server_and_attacker_cpus};

/// Which cores the server side and the attacker use. With at least two usable cores the
/// server (app, agent, its NAPI thread, legit clients) shares one and the attack tools get
/// another: otherwise the flood tool itself is the bottleneck and every
/// mode looks alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus {
    pub server: Option<usize>,
    pub attacker: Option<usize>,
}

impl Cpus {
    /// A server core and an attacker core, or no pinning on a one-core machine.
    ///
    /// The attacker gets CPU 0 where it may (`measure::server_and_attacker_cpus`): trafgen
    /// sends from CPU 0 whatever it is pinned to, so the flood tool never lands on the server's
    /// core. Fixed-rate floods use the evenly paced sender (`Stack::syn_flood`): trafgen's
    /// `-b` sends each second's SYNs in one burst at full speed, which from another core
    /// overflowed the server veth's 256-frame ring and lost a third of a 3000/s flood before
    /// XDP saw it.
    pub fn detect() -> Self {
        let allowed = allowed_cpus();
        if let Some((server, attacker)) = server_and_attacker_cpus(&allowed) {
            return Self {
                server: Some(server),
                attacker: Some(attacker),
            };
        }
        match allowed.as_slice() {
            [s, a, ..] => Self {
                server: Some(*s),
                attacker: Some(*a),
            },
            _ => Self {
                server: None,
                attacker: None,
            },
        }
    }

    /// The core whose busy share is "server CPU" (cpu0 when nothing is pinned).
    pub fn measured(&self) -> usize {
        self.server.unwrap_or(0)
    }
}

/// Pins the calling thread to `cpu`.
pub(super) fn pin_this_thread(cpu: usize) -> Result<()> {
    // SAFETY: as above; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot pin a thread to cpu {cpu}"));
        }
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path`.
pub(super) fn enter_netns(path: &Path) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; it changes only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot enter {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_and_attacker_never_share_a_core() {
        let cpus = Cpus::detect();
        if let (Some(s), Some(a)) = (cpus.server, cpus.attacker) {
            assert_ne!(s, a);
            assert_eq!(cpus.measured(), s);
        }
        let unpinned = Cpus {
            server: None,
            attacker: None,
        };
        assert_eq!(unpinned.measured(), 0);
    }
}
