//! A cgroup v2 folder for a lab server, so the agent's connection tracking (sockops) counts
//! exactly that server's sockets.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context as _, Result};
use guard_user::datapath::cgroup2_mount;

/// A cgroup v2 folder, removed on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    /// `gd-<tag>-<pid>` under the machine's cgroup2 root.
    pub fn new(tag: &str) -> Result<Self> {
        let root = cgroup2_mount().context("no cgroup2 mount on this machine")?;
        Self::under(&root, &format!("gd-{tag}-{}", std::process::id()))
    }

    /// A child cgroup `name` of `parent` (drop it before the parent).
    pub fn under(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The server is gone by now (its guard drops first); rmdir fails while a process is
        // still inside, and a parent's while a removed child is still dying in the kernel, so
        // retry for a while.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
    }
}
