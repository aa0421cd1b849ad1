//! Attaching the programs (XDP or tc on interfaces, sockops on a cgroup), pinning the links
//! and switching an earlier run's links to the new program.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    programs::xdp::XdpLink,
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        CgroupAttachMode, ProgramError, SchedClassifier, SockOps, TcAttachType, Xdp, XdpMode,
    },
};
use guard_common::maps as names;
use log::{info, warn};

use crate::paths::AttachKind;

use super::sys::*;
use super::*;

/// How the operator asked to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachRequest {
    /// Native XDP, falling back to generic with a warning.
    Xdp,
    XdpNative,
    XdpGeneric,
    Tc,
}

impl AttachRequest {
    /// The name `--attach` takes for it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

impl std::str::FromStr for AttachRequest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xdp" => Ok(Self::Xdp),
            "xdp-native" | "xdp-drv" => Ok(Self::XdpNative),
            "xdp-generic" | "xdp-skb" => Ok(Self::XdpGeneric),
            "tc" => Ok(Self::Tc),
            other => Err(format!(
                "unknown attach mode `{other}` (expected xdp, xdp-native, xdp-generic or tc)"
            )),
        }
    }
}

impl Datapath {
    /// Attaches to `iface`; with a pin layout the link is pinned, and a link
    /// pinned by an earlier run is updated in place instead.
    pub fn attach(
        &mut self,
        iface: &str,
        request: AttachRequest,
    ) -> Result<AttachKind, DatapathError> {
        if nix_if_index(iface).is_none() {
            return Err(DatapathError::NoSuchInterface(iface.to_string()));
        }
        let existing: Vec<(AttachKind, PathBuf)> = match &self.layout {
            Some(layout) => layout
                .links()
                .map_err(io_err(format!("read {}", layout.dir().display())))?
                .into_iter()
                .filter(|(_, i, _)| i == iface)
                .map(|(k, _, p)| (k, p))
                .collect(),
            None => Vec::new(),
        };
        let kind = match request {
            AttachRequest::XdpNative => {
                self.attach_kind(iface, AttachKind::XdpNative, &existing)?
            }
            AttachRequest::XdpGeneric => {
                self.attach_kind(iface, AttachKind::XdpGeneric, &existing)?
            }
            AttachRequest::Tc => self.attach_kind(iface, AttachKind::Tc, &existing)?,
            AttachRequest::Xdp => match self.attach_kind(iface, AttachKind::XdpNative, &existing) {
                Ok(kind) => kind,
                Err(DatapathError::Attach { source, .. }) => {
                    warn!("native XDP is not available on {iface} ({source}); falling back to generic XDP, which runs later in the stack and costs more CPU per dropped packet");
                    self.attach_kind(iface, AttachKind::XdpGeneric, &existing)
                        .map_err(|e| match e {
                            DatapathError::Attach { source, .. } => DatapathError::XdpUnsupported {
                                iface: iface.to_string(),
                                source,
                            },
                            other => other,
                        })?
                }
                Err(other) => return Err(other),
            },
        };
        // The replies to cookies are checked by a tc ingress program of their
        // own behind either attach: only an skb can carry a connection to its
        // listener, and the tc program with the check built in would exceed
        // the verifier's stack limit.
        if self.cookies_supported {
            self.attach_cookie_ack(iface)?;
        }
        // Links of another kind on this interface are now redundant: XDP
        // and tc can overlap, so removing them after the new one is in place
        // leaves no gap.
        for (other, path) in &existing {
            if *other != kind && !(other.is_xdp() && kind.is_xdp()) {
                info!(
                    "removing the {} link on {iface}: replaced by {}",
                    other.pin_tag(),
                    kind.pin_tag()
                );
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(kind)
    }

    fn attach_kind(
        &mut self,
        iface: &str,
        kind: AttachKind,
        existing: &[(AttachKind, PathBuf)],
    ) -> Result<AttachKind, DatapathError> {
        let layout = self.layout.clone();
        let attach_err = |source: ProgramError| classify_attach_error(iface, source);
        // Same kind already pinned: swap the program under the link.
        if let Some((_, path)) = existing.iter().find(|(k, _)| *k == kind) {
            match PinnedLink::from_pin(path) {
                Ok(pinned) => {
                    let fd_link: FdLink = pinned.into();
                    match kind {
                        AttachKind::XdpNative | AttachKind::XdpGeneric => {
                            let link = XdpLink::try_from(fd_link).map_err(adopt_err(path))?;
                            let prog: &mut Xdp =
                                self.program_mut(kind).try_into().map_err(attach_err)?;
                            let id = prog.attach_to_link(link).map_err(attach_err)?;
                            // Keep the link alive past this program object:
                            // the pin holds it.
                            let link = prog.take_link(id).map_err(attach_err)?;
                            drop(link);
                        }
                        AttachKind::Tc => {
                            let link =
                                SchedClassifierLink::try_from(fd_link).map_err(adopt_err(path))?;
                            let prog: &mut SchedClassifier =
                                self.program_mut(kind).try_into().map_err(attach_err)?;
                            let id = prog.attach_to_link(link).map_err(attach_err)?;
                            let link = prog.take_link(id).map_err(attach_err)?;
                            drop(link);
                        }
                    }
                    info!(
                        "{iface}: updated the pinned {} link to the new program (no detach)",
                        kind.pin_tag()
                    );
                    return Ok(kind);
                }
                Err(e) => {
                    warn!(
                        "{iface}: pinned link {} is unusable ({e}); attaching anew",
                        path.display()
                    );
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        // Switching between native and generic XDP cannot overlap: the
        // kernel allows one XDP mode per device.
        for (other, path) in existing {
            if other.is_xdp() && kind.is_xdp() && *other != kind {
                let _ = std::fs::remove_file(path);
            }
        }
        let fd_link: FdLink = match kind {
            AttachKind::XdpNative | AttachKind::XdpGeneric => {
                let mode = if kind == AttachKind::XdpNative {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let prog: &mut Xdp = self.program_mut(kind).try_into().map_err(attach_err)?;
                let id = prog.attach(iface, mode).map_err(attach_err)?;
                if layout.is_none() {
                    return Ok(kind);
                }
                prog.take_link(id)
                    .map_err(attach_err)?
                    .try_into()
                    .map_err(link_err(format!("pin the XDP link on {iface} (the kernel attached it through netlink, which cannot be pinned)")))?
            }
            AttachKind::Tc => {
                let prog: &mut SchedClassifier =
                    self.program_mut(kind).try_into().map_err(attach_err)?;
                let id = prog
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(attach_err)?;
                if layout.is_none() {
                    return Ok(kind);
                }
                prog.take_link(id)
                    .map_err(attach_err)?
                    .try_into()
                    .map_err(link_err(format!(
                        "pin the tc link on {iface} (needs tcx, Linux >= 6.6)"
                    )))?
            }
        };
        if let Some(layout) = layout {
            pin_link(fd_link, &layout.link(kind, iface))?;
        }
        info!("{iface}: attached ({})", kind.pin_tag());
        Ok(kind)
    }
}

impl Datapath {
    /// Attaches the cookie-reply check at tc ingress of `iface` (ahead of the
    /// tc attach's own program), or switches
    /// an earlier run's pinned link to this program.
    fn attach_cookie_ack(&mut self, iface: &str) -> Result<(), DatapathError> {
        let path = self.layout.as_ref().map(|l| l.cookie_ack_link(iface));
        let attach_err = |source: ProgramError| classify_attach_error(iface, source);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(names::PROG_COOKIE_ACK)
            .expect("program exists")
            .try_into()
            .map_err(attach_err)?;
        if let Some(path) = path.as_ref().filter(|p| p.exists()) {
            match PinnedLink::from_pin(path) {
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(adopt_err(path))?;
                    let id = prog.attach_to_link(link).map_err(attach_err)?;
                    drop(prog.take_link(id).map_err(attach_err)?);
                    return Ok(());
                }
                Err(e) => {
                    warn!(
                        "{iface}: pinned link {} is unusable ({e}); attaching anew",
                        path.display()
                    );
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        // First in the tcx chain, passing with "next": behind the tc attach,
        // whose program ends the chain when it passes a packet.
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                aya::programs::tc::TcAttachOptions::TcxOrder(
                    aya::programs::links::LinkOrder::first(),
                ),
            )
            .map_err(attach_err)?;
        if let Some(path) = path {
            let fd_link: FdLink =
                prog.take_link(id)
                    .map_err(attach_err)?
                    .try_into()
                    .map_err(link_err(format!(
                        "pin the cookie-reply link on {iface} (needs tcx, Linux >= 6.6)"
                    )))?;
            pin_link(fd_link, &path)?;
        }
        info!("{iface}: SYN cookie replies checked at tc ingress");
        Ok(())
    }

    /// Attaches connection tracking (sockops) to a cgroup v2: every socket
    /// of processes in it (and its descendants) is counted. With pins, an
    /// earlier run's link is switched to this program atomically, so no
    /// close goes unseen across a restart (a missed close would leave a
    /// connection counted forever).
    pub fn attach_sockops(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let layout = self.layout.clone();
        let prog_fd = {
            let prog = self
                .ebpf
                .program(names::PROG_SOCKOPS)
                .expect("program exists");
            prog.fd()
                .map_err(|e| DatapathError::Attach {
                    iface: cgroup.display().to_string(),
                    source: e,
                })?
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("dup the sockops program fd"))?
        };
        if let Some(layout) = &layout {
            let path = layout.sockops_link();
            if path.exists() {
                match obj_get(&path) {
                    Ok(link_fd) => {
                        link_update(link_fd.as_raw_fd(), prog_fd.as_raw_fd()).map_err(io_err(
                            format!(
                                "switch the pinned sockops link {} to the new program",
                                path.display()
                            ),
                        ))?;
                        info!(
                            "{}: updated the pinned sockops link to the new program (no detach)",
                            cgroup.display()
                        );
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(
                            "pinned sockops link {} is unusable ({e}); attaching anew",
                            path.display()
                        );
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        let dir = std::fs::File::open(cgroup).map_err(io_err(format!(
            "open cgroup {} (connection tracking needs cgroup v2: pass --cgroup with the app's cgroup2 folder)",
            cgroup.display()
        )))?;
        let sockops: &mut SockOps = self
            .ebpf
            .program_mut(names::PROG_SOCKOPS)
            .expect("program exists")
            .try_into()
            .map_err(|e| classify_attach_error(&cgroup.display().to_string(), e))?;
        // As a bpf_link the attachment always coexists with other programs
        // on the cgroup; the kernel refuses the ALLOW_MULTI flag for links.
        let id = sockops
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| classify_attach_error(&cgroup.display().to_string(), e))?;
        if let Some(layout) = layout {
            let link = sockops
                .take_link(id)
                .map_err(|e| classify_attach_error(&cgroup.display().to_string(), e))?;
            let fd_link: FdLink = link
                .try_into()
                .map_err(link_err("pin the sockops link (needs Linux >= 5.7)"))?;
            pin_link(fd_link, &layout.sockops_link())?;
        }
        info!(
            "{}: connection tracking attached (sockops)",
            cgroup.display()
        );
        Ok(())
    }
}

/// A link that could not be adopted, converted or pinned, with what was
/// being done (aya's link errors carry no path or interface of their own).
fn link_err<E: std::fmt::Display>(action: impl Into<String>) -> impl FnOnce(E) -> DatapathError {
    let action = action.into();
    move |e| DatapathError::Io {
        action,
        source: io::Error::other(e.to_string()),
    }
}

/// Taking over the link an earlier run pinned at `path`.
fn adopt_err<E: std::fmt::Display>(path: &Path) -> impl FnOnce(E) -> DatapathError {
    link_err(format!("adopt link {}", path.display()))
}

/// Pins `link` at `path`, where the next run finds it.
fn pin_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    link.pin(path)
        .map_err(link_err(format!("pin link at {}", path.display())))?;
    Ok(())
}

fn classify_attach_error(iface: &str, source: ProgramError) -> DatapathError {
    if let ProgramError::UnknownInterface { name } = &source {
        return DatapathError::NoSuchInterface(name.clone());
    }
    let text = format!("{source:?}");
    if text.contains("EBUSY")
        || text.contains("Device or resource busy")
        || text.contains("File exists")
        || text.contains("code: 16")
        || text.contains("code: 17")
    {
        return DatapathError::ForeignProgram(iface.to_string());
    }
    if is_eperm(&source) {
        return DatapathError::NotPermitted {
            action: format!("attach to {iface}"),
        };
    }
    DatapathError::Attach {
        iface: iface.to_string(),
        source,
    }
}
