//! Every runtime location guard uses, in one place.

use std::path::{Path, PathBuf};

/// Where guard pins under bpffs; the layout version is a folder inside it so
/// an agent never misreads pins written by another layout.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/guard";
/// The layout this build writes and understands. Bump it whenever a map's
/// type, key or value changes.
pub const LAYOUT_VERSION: &str = "v3";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/guard/control.sock";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9940";
pub const DEFAULT_CONFIG_FILE: &str = "/etc/guard/guard.toml";
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/guard/audit.jsonl";

/// The versioned pin folder and the names inside it.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
    dir: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref().to_path_buf();
        let dir = root.join(LAYOUT_VERSION);
        Self { root, dir }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(format!("map_{}", name.to_ascii_lowercase()))
    }

    /// The program pin: one per hook type (both XDP modes share one).
    pub fn program(&self, kind: AttachKind) -> PathBuf {
        self.dir
            .join(if kind.is_xdp() { "prog_xdp" } else { "prog_tc" })
    }

    pub fn link(&self, kind: AttachKind, interface: &str) -> PathBuf {
        self.dir
            .join(format!("link_{}_{}", kind.pin_tag(), interface))
    }

    /// The tc ingress link of the XDP attach's cookie-reply check.
    pub fn cookie_ack_link(&self, interface: &str) -> PathBuf {
        self.dir.join(format!("link_cookieack_{interface}"))
    }

    /// The connection-tracking (sockops) link on the app's cgroup.
    pub fn sockops_link(&self) -> PathBuf {
        self.dir.join("link_sockops")
    }

    /// Every pinned link as (kind, interface, path).
    pub fn links(&self) -> std::io::Result<Vec<(AttachKind, String, PathBuf)>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("link_") else {
                continue;
            };
            for kind in AttachKind::ALL {
                if let Some(iface) = rest.strip_prefix(&format!("{}_", kind.pin_tag())) {
                    out.push((kind, iface.to_string(), entry.path()));
                }
            }
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    /// Sibling folders of other layout versions (written by another build).
    pub fn foreign_versions(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LAYOUT_VERSION)
            .collect()
    }
}

/// Where and how a program is attached; the pin name records it so a
/// restarted agent (and `guard status`) knows without asking netlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    XdpNative,
    XdpGeneric,
    Tc,
}

impl AttachKind {
    pub const ALL: [AttachKind; 3] = [
        AttachKind::XdpNative,
        AttachKind::XdpGeneric,
        AttachKind::Tc,
    ];

    pub const fn pin_tag(self) -> &'static str {
        match self {
            AttachKind::XdpNative => "xdpdrv",
            AttachKind::XdpGeneric => "xdpgeneric",
            AttachKind::Tc => "tc",
        }
    }

    /// The `mode` label of `guard_attach_info`.
    pub const fn metric_label(self) -> &'static str {
        match self {
            AttachKind::XdpNative => "xdp",
            AttachKind::XdpGeneric => "xdp_generic",
            AttachKind::Tc => "tc",
        }
    }

    pub const fn is_xdp(self) -> bool {
        matches!(self, AttachKind::XdpNative | AttachKind::XdpGeneric)
    }
}
