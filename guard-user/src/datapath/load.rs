//! Loading the embedded object, pinning and adopting maps and links, and unloading.

use std::io;

use aya::{
    maps::{MapData, RingBuf},
    programs::{Program, ProgramError},
    Ebpf, EbpfLoader,
};
use guard_common::{maps as names, LiveConfig};
use log::warn;

use crate::paths::{AttachKind, PinLayout};

use super::maps::take;
use super::sys::*;
use super::*;

impl Datapath {
    /// Loads and verifies both programs (XDP and tc). With a layout, maps are
    /// pinned there, re-using what is already pinned.
    pub fn load(sizes: &MapSizes, layout: Option<&PinLayout>) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        let mut fresh = true;
        if let Some(layout) = layout {
            check_bpffs(layout.root())?;
            check_layout(layout)?;
            fresh = !layout.map(names::CONFIG).exists();
            std::fs::create_dir_all(layout.dir())
                .map_err(io_err(format!("create {}", layout.dir().display())))?;
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::SOURCES, sizes.sources)
            .map_max_entries(names::AGGREGATES, sizes.aggregates)
            .map_max_entries(names::ALLOW, sizes.allow)
            .map_max_entries(names::BLOCK, sizes.block)
            // The per-flow and per-source tables of the connection cap and the
            // cookie-reply limits scale with the source tables, so a small
            // [maps] (a pod sidecar) keeps its kernel memory small.
            .map_max_entries(names::HANDSHAKES, sizes.sources)
            .map_max_entries(names::ACK_FAILS, sizes.sources)
            .map_max_entries(names::IN_FLIGHT, sizes.aggregates)
            .map_max_entries(names::ACK_FAILS_AGG, sizes.aggregates);
        if let Some(layout) = layout {
            for name in names::PINNED_MAPS {
                loader.map_pin_path(name, layout.map(name));
            }
        }
        let kfunc_id = aya::Btf::from_sys_fs()
            .ok()
            .and_then(|btf| crate::kfunc::assign_reqsk_id(&btf));
        let object = crate::kfunc::resolve(EBPF_OBJECT, kfunc_id);
        let mut ebpf = loader
            .load(object.bytes())
            .map_err(|e| refused("create BPF maps", e))?;
        for name in [
            names::PROG_XDP,
            names::PROG_TC,
            names::PROG_COOKIE_ACK,
            names::PROG_SOCKOPS,
        ] {
            load_program(&mut ebpf, name)?;
        }
        let maps = GuardMaps {
            config: take(&mut ebpf, names::CONFIG)?,
            stats: take(&mut ebpf, names::STATS)?,
            ports: take(&mut ebpf, names::PORTS)?,
            sources: take(&mut ebpf, names::SOURCES)?,
            aggregates: take(&mut ebpf, names::AGGREGATES)?,
            allow: take(&mut ebpf, names::ALLOW)?,
            block: take(&mut ebpf, names::BLOCK)?,
            conns: take(&mut ebpf, names::CONNS)?,
            known_good: take(&mut ebpf, names::KNOWN_GOOD)?,
            global: take(&mut ebpf, names::GLOBAL)?,
            cookie_keys: take(&mut ebpf, names::COOKIE_KEYS)?,
            cookie_state: take(&mut ebpf, names::COOKIE_STATE)?,
            in_flight: take(&mut ebpf, names::IN_FLIGHT)?,
            synack_dests: take(&mut ebpf, names::SYNACK_DESTS)?,
        };
        let events = Some(take(&mut ebpf, names::EVENTS)?);
        let mut dp = Self {
            ebpf,
            maps,
            events,
            layout: layout.cloned(),
            fresh,
            cookies_supported: object.assign_reqsk,
        };
        if fresh {
            // A zeroed config would mean "every prefix length 0"; start
            // from the documented defaults until the caller sets its own.
            dp.maps.set_config(&LiveConfig::DEFAULT)?;
        } else if let Some(layout) = layout {
            warn_if_resized(layout, sizes);
        }
        if let Some(layout) = layout {
            for kind in [AttachKind::XdpNative, AttachKind::Tc] {
                let path = layout.program(kind);
                let _ = std::fs::remove_file(&path);
                let prog = dp.program_mut(kind);
                prog.pin(&path).map_err(|e| DatapathError::Io {
                    action: format!("pin program at {}", path.display()),
                    source: io::Error::other(e.to_string()),
                })?;
            }
        }
        Ok(dp)
    }

    /// Whether this load created the maps (false: it adopted pinned ones).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Whether SYN cookies can work here: the kernel has the kfunc that
    /// hands a cookie connection to its listener (Linux >= 6.9).
    pub fn cookies_supported(&self) -> bool {
        self.cookies_supported
    }

    pub fn maps(&self) -> &GuardMaps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut GuardMaps {
        &mut self.maps
    }

    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(super) fn program_mut(&mut self, kind: AttachKind) -> &mut Program {
        self.ebpf
            .program_mut(program_name(kind))
            .expect("program exists")
    }

    /// The loaded program for `kind` (to drive it through `BPF_PROG_TEST_RUN`).
    pub fn program(&self, kind: AttachKind) -> &Program {
        self.ebpf
            .program(program_name(kind))
            .expect("program exists")
    }

    /// The loaded cookie-reply check (to drive it through `BPF_PROG_TEST_RUN`).
    pub fn cookie_ack_program(&self) -> &Program {
        self.ebpf
            .program(names::PROG_COOKIE_ACK)
            .expect("program exists")
    }
}

/// The object's program behind an attach kind: one XDP program serves both
/// XDP modes.
fn program_name(kind: AttachKind) -> &'static str {
    if kind.is_xdp() {
        names::PROG_XDP
    } else {
        names::PROG_TC
    }
}

/// Loads (verifies) one of the object's programs.
fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), DatapathError> {
    let program = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("the object has no {name} program"));
    let loaded = match program {
        Program::Xdp(xdp) => xdp.load(),
        Program::SchedClassifier(tc) => tc.load(),
        Program::SockOps(sockops) => sockops.load(),
        _ => Err(ProgramError::UnexpectedProgramType),
    };
    loaded.map_err(|e| refused("load BPF programs", e))
}

/// A refused load: a missing privilege to `action`, or what the kernel said.
fn refused(action: &str, err: impl std::error::Error + Send + Sync + 'static) -> DatapathError {
    if is_eperm(&err) {
        DatapathError::NotPermitted {
            action: action.into(),
        }
    } else {
        DatapathError::Load(Box::new(err))
    }
}

fn warn_if_resized(layout: &PinLayout, sizes: &MapSizes) {
    for (name, want) in [
        (names::SOURCES, sizes.sources),
        (names::AGGREGATES, sizes.aggregates),
        (names::ALLOW, sizes.allow),
        (names::BLOCK, sizes.block),
    ] {
        if let Ok(info) = MapData::from_pin(layout.map(name)).and_then(|d| d.info()) {
            if info.max_entries() != want {
                warn!(
                    "pinned map {name} keeps its {} entries (config asks for {want}); `guard unload` then start to resize",
                    info.max_entries()
                );
            }
        }
    }
}

/// What `guard unload` removed.
#[derive(Debug, Default)]
pub struct UnloadReport {
    pub links: Vec<String>,
    pub pins: usize,
}

/// Detaches every pinned link and removes every pin under the layout's
/// versioned folder (and the folder, and the root if it is then empty).
pub fn unload(layout: &PinLayout) -> Result<UnloadReport, DatapathError> {
    let mut report = UnloadReport::default();
    for (kind, iface, path) in layout
        .links()
        .map_err(io_err(format!("read {}", layout.dir().display())))?
    {
        std::fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
        report.links.push(format!("{iface} ({})", kind.pin_tag()));
    }
    if layout.sockops_link().exists() {
        report.links.push("cgroup (sockops)".into());
    }
    if layout.dir().exists() {
        for entry in std::fs::read_dir(layout.dir())
            .map_err(io_err(format!("read {}", layout.dir().display())))?
        {
            let entry = entry.map_err(io_err("read pin folder"))?;
            std::fs::remove_file(entry.path())
                .map_err(io_err(format!("remove {}", entry.path().display())))?;
            report.pins += 1;
        }
        std::fs::remove_dir(layout.dir())
            .map_err(io_err(format!("remove {}", layout.dir().display())))?;
    }
    let _ = std::fs::remove_dir(layout.root());
    Ok(report)
}
