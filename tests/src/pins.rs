//! The one pin folder every lab agent, rig and test uses: unique under bpffs, and unloaded
//! (links detached, pins removed) on drop, so a failing run never leaves a program attached.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context as _, Result};
use guard_user::datapath::{self, GuardMaps};
use guard_user::paths::PinLayout;

/// A pin root `/sys/fs/bpf/gd-<tag>-<pid>-<n>`: "gd-" like the namespaces, so leftovers are
/// easy to spot and tell apart by PID.
#[derive(Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = Path::new(guard_user::paths::BPFFS_ROOT).join(format!(
            "gd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        ensure!(
            !root.exists(),
            "{} already exists: a leftover of an earlier run; remove it with `guard unload \
             --pin-dir {0}`",
            root.display()
        );
        datapath::check_bpffs(&root).context("the lab pins under bpffs")?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> PinLayout {
        PinLayout::new(&self.root)
    }

    /// The pinned maps, opened the way `guard status` opens them.
    pub fn maps(&self) -> Result<GuardMaps> {
        GuardMaps::open_pinned(&self.layout())
            .with_context(|| format!("open the maps pinned under {}", self.root.display()))
    }

    /// Detaches whatever the pins hold and removes them; the folder can be used again.
    pub fn unload(&self) -> Result<()> {
        datapath::unload(&self.layout())
            .with_context(|| format!("cannot unload the pins under {}", self.root.display()))?;
        Ok(())
    }

    /// Every file and folder under the root (the root itself excluded); empty when the
    /// root does not exist.
    pub fn entries(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.filter_map(Result::ok) {
                let p = e.path();
                out.push(p.clone());
                if p.is_dir() {
                    walk(&p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = self.unload() {
            eprintln!("warning: {e:#}");
        }
        // Whatever unload did not know about (a half-written layout) goes too.
        if self.root.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.root) {
                eprintln!("warning: cannot remove {}: {e}", self.root.display());
            }
        }
    }
}
