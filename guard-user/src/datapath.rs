//! Loading, pinning, adopting and attaching the guard program, and typed
//! access to its maps.
//!
//! Every start loads the embedded object, re-using the maps pinned by an
//! earlier run (so counters, blocks and per-source state carry over), then
//! swaps each pinned link to the new program with `BPF_LINK_UPDATE`: the
//! interface is never without a program, not even for one packet.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::xdp::XdpLink,
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        CgroupAttachMode, ProgramError, SchedClassifier, SockOps, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use guard_common::{
    addr::Prefix,
    maps as names,
    state::AllowEntry,
    stats::{Stat, STAT_SLOTS},
    syncookie::{CookieKey, CookieState, KEY_SLOTS},
    Addr, BlockEntry, LiveConfig, SourceState, TokenBucket,
};
use log::{info, warn};

use crate::paths::{AttachKind, PinLayout, BPFFS_ROOT};

/// The compiled eBPF object, built by build.rs from guard-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("not permitted to {action}: guard needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (run it as root, or grant them as guard-user/deploy/guard.service does)")]
    NotPermitted { action: String },
    #[error("bpffs is not mounted at {path}: mount it with `mount -t bpf bpf {path}` (or add it to /etc/fstab)", path = .0.display())]
    BpffsMissing(PathBuf),
    #[error("no network interface named `{0}` (check `ip link`; inside a pod or namespace, it must be that namespace's name)")]
    NoSuchInterface(String),
    #[error("interface `{0}` already has an XDP program that guard did not attach (see `ip link show {0}`): remove it, or run guard with `--attach tc`")]
    ForeignProgram(String),
    #[error(
        "interface `{iface}` supports neither native nor generic XDP ({source}); try `--attach tc`"
    )]
    XdpUnsupported {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("{path} holds pins of guard layout(s) {found:?}, which this build ({ours}) does not understand: run the matching `guard unload`, or remove them with `rm -r {path}/<version>`", path = .root.display(), ours = crate::paths::LAYOUT_VERSION)]
    ForeignLayout { root: PathBuf, found: Vec<String> },
    #[error("pinned map {} does not match this build ({detail}): it was written by an incompatible guard; run `guard unload --pin-dir {}` to clear it", .path.display(), .root.display())]
    IncompatiblePin {
        path: PathBuf,
        root: PathBuf,
        detail: String,
    },
    #[error("the kernel refused to load the guard program (needs Linux >= 5.8 with BPF, BTF and XDP, on an architecture with efficient unaligned access such as x86-64 or arm64; this build was verified on 6.x): {0}")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("attaching to `{iface}`: {source}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("invalid live config: {0}")]
    Config(#[from] guard_common::config::ConfigError),
}

/// Only EPERM means "not privileged": the verifier rejects programs with
/// EACCES, and that must surface as the verifier's log, not as a hint to
/// run as root.
fn is_eperm(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let action = action.into();
    move |source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            DatapathError::NotPermitted { action }
        } else {
            DatapathError::Io { action, source }
        }
    }
}

/// Sizes of the maps that grow with traffic, set at load time. A map that
/// is already pinned keeps the size it was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub sources: u32,
    pub aggregates: u32,
    pub allow: u32,
    pub block: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            sources: names::DEFAULT_SOURCES,
            aggregates: names::DEFAULT_AGGREGATES,
            allow: names::DEFAULT_ALLOW,
            block: names::DEFAULT_BLOCK,
        }
    }
}

/// Expected (type, key size, value size) of each pinned map; anything else
/// under our versioned folder is refused rather than misread.
fn expected_shape(name: &str) -> Option<(aya::maps::MapType, u32, u32)> {
    use aya::maps::MapType as T;
    use core::mem::size_of;
    let lpm_key = size_of::<Key<Addr>>() as u32;
    Some(match name {
        names::CONFIG => (T::Array, 4, size_of::<LiveConfig>() as u32),
        names::STATS => (T::PerCpuArray, 4, 8),
        names::PORTS => (T::Array, 4, 1),
        names::SOURCES | names::AGGREGATES => (T::LruHash, 16, size_of::<SourceState>() as u32),
        names::ALLOW => (T::LpmTrie, lpm_key, size_of::<AllowEntry>() as u32),
        names::BLOCK => (T::LpmTrie, lpm_key, size_of::<BlockEntry>() as u32),
        names::EVENTS => (T::RingBuf, 0, 0),
        names::CONNS => (T::Hash, 16, 8),
        names::CONN_SOCKS => (T::Hash, 8, 16),
        names::KNOWN_GOOD => (T::LruHash, 16, 8),
        names::GLOBAL => (T::Array, 4, size_of::<guard_common::TokenBucket>() as u32),
        names::COOKIE_KEYS => (T::Array, 4, size_of::<CookieKey>() as u32),
        names::COOKIE_STATE => (T::Array, 4, size_of::<CookieState>() as u32),
        _ => return None,
    })
}

/// Finds the nearest existing ancestor of `path` and checks it is on bpffs.
pub fn check_bpffs(path: &Path) -> Result<(), DatapathError> {
    let mut probe = path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .map_err(|_| DatapathError::BpffsMissing(path.to_path_buf()))?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DatapathError::BpffsMissing(
            if probe.as_os_str().is_empty()
                || probe == Path::new("/")
                || probe == Path::new("/sys/fs")
            {
                PathBuf::from(BPFFS_ROOT)
            } else {
                probe
            },
        ));
    }
    Ok(())
}

/// Refuses pins this build would misread: other layout versions beside
/// ours, and maps whose shape differs from what we would create.
pub fn check_layout(layout: &PinLayout) -> Result<(), DatapathError> {
    let found = layout.foreign_versions();
    if !found.is_empty() {
        return Err(DatapathError::ForeignLayout {
            root: layout.root().to_path_buf(),
            found,
        });
    }
    for name in names::PINNED_MAPS {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let data =
            MapData::from_pin(&path).map_err(|source| DatapathError::Map { name, source })?;
        let info = data
            .info()
            .map_err(|source| DatapathError::Map { name, source })?;
        let (ty, key, value) = expected_shape(name).expect("every pinned map has a shape");
        let actual_ty = info
            .map_type()
            .map_err(|source| DatapathError::Map { name, source })?;
        if actual_ty != ty
            || (ty != aya::maps::MapType::RingBuf
                && (info.key_size() != key || info.value_size() != value))
        {
            return Err(DatapathError::IncompatiblePin {
                path,
                root: layout.root().to_path_buf(),
                detail: format!(
                    "found {:?} key {} value {}, expected {:?} key {} value {}",
                    actual_ty,
                    info.key_size(),
                    info.value_size(),
                    ty,
                    key,
                    value
                ),
            });
        }
    }
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn open_pinned<T>(layout: &PinLayout, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = MapData::from_pin(layout.map(name))
        .map_err(|source| DatapathError::Map { name, source })?;
    let map = Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// What the maps hold for one address: its source and aggregate keys and
/// every entry the program would consult for a SYN from it.
#[derive(Debug, Clone)]
pub struct PointState {
    pub source_key: Prefix,
    pub aggregate_key: Prefix,
    pub source: Option<SourceState>,
    pub aggregate: Option<SourceState>,
    pub open_connections: u64,
    /// Monotonic ns of the source's last completed handshake.
    pub last_handshake_ns: Option<u64>,
    /// The allowlist's longest match exists (which prefix: see `allows`).
    pub allowed: bool,
    /// The blocklist's longest match, active or not.
    pub block: Option<BlockEntry>,
    pub global: Option<TokenBucket>,
}

/// Typed handles on the program's maps.
pub struct GuardMaps {
    pub config: Array<MapData, LiveConfig>,
    pub stats: PerCpuArray<MapData, u64>,
    pub ports: Array<MapData, u8>,
    pub sources: HashMap<MapData, Addr, SourceState>,
    pub aggregates: HashMap<MapData, Addr, SourceState>,
    pub allow: LpmTrie<MapData, Addr, AllowEntry>,
    pub block: LpmTrie<MapData, Addr, BlockEntry>,
    /// Established connections per source key (signed in effect: see
    /// guard-ebpf/src/conns.rs).
    pub conns: HashMap<MapData, Addr, u64>,
    pub known_good: HashMap<MapData, Addr, u64>,
    /// The global new-connection budget's bucket (one slot).
    pub global: Array<MapData, TokenBucket>,
    pub cookie_keys: Array<MapData, CookieKey>,
    pub cookie_state: Array<MapData, CookieState>,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn key_of(prefix: &Prefix) -> Key<Addr> {
    Key::new(prefix.prefix_len(), prefix.addr())
}

fn prefix_of(key: &Key<Addr>) -> Prefix {
    // `Key` is packed: copy the fields out before use.
    let len = key.prefix_len();
    let data = key.data();
    Prefix::new(data, len)
}

impl GuardMaps {
    /// Opens the maps an agent pinned, without loading anything (for
    /// `guard status` and friends).
    pub fn open_pinned(layout: &PinLayout) -> Result<Self, DatapathError> {
        check_layout(layout)?;
        Ok(Self {
            config: open_pinned(layout, names::CONFIG)?,
            stats: open_pinned(layout, names::STATS)?,
            ports: open_pinned(layout, names::PORTS)?,
            sources: open_pinned(layout, names::SOURCES)?,
            aggregates: open_pinned(layout, names::AGGREGATES)?,
            allow: open_pinned(layout, names::ALLOW)?,
            block: open_pinned(layout, names::BLOCK)?,
            conns: open_pinned(layout, names::CONNS)?,
            known_good: open_pinned(layout, names::KNOWN_GOOD)?,
            global: open_pinned(layout, names::GLOBAL)?,
            cookie_keys: open_pinned(layout, names::COOKIE_KEYS)?,
            cookie_state: open_pinned(layout, names::COOKIE_STATE)?,
        })
    }

    /// The SYN cookie key of each epoch slot.
    pub fn cookie_keys(&self) -> Result<[CookieKey; KEY_SLOTS as usize], DatapathError> {
        let mut out = [CookieKey::default(); KEY_SLOTS as usize];
        for (slot, key) in out.iter_mut().enumerate() {
            *key = self
                .cookie_keys
                .get(&(slot as u32), 0)
                .map_err(map_err(names::COOKIE_KEYS))?;
        }
        Ok(out)
    }

    pub fn set_cookie_key(&mut self, slot: u32, key: &CookieKey) -> Result<(), DatapathError> {
        self.cookie_keys
            .set(slot, key, 0)
            .map_err(map_err(names::COOKIE_KEYS))
    }

    pub fn cookie_state(&self) -> Result<CookieState, DatapathError> {
        self.cookie_state
            .get(&0, 0)
            .map_err(map_err(names::COOKIE_STATE))
    }

    /// Open connections per source key, as the sockops program counts them.
    pub fn connections(&self) -> Result<Vec<(Addr, u64)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.conns.iter() {
            match item {
                Ok((k, v)) if (v as i64) > 0 => out.push((k, v)),
                Ok(_) | Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: names::CONNS,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Deletes per-source connection counters that are back at zero so the
    /// table keeps room for new sources. Racing a new connection of the same
    /// source can undercount it by one (read as zero by the program, never
    /// as a wrapped huge count).
    pub fn prune_idle_connections(&mut self) -> Result<usize, DatapathError> {
        let idle: Vec<Addr> = self
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| (*v as i64) <= 0)
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for key in idle {
            if self.conns.remove(&key).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn config(&self) -> Result<LiveConfig, DatapathError> {
        self.config.get(&0, 0).map_err(map_err(names::CONFIG))
    }

    /// Validates, then replaces the live config in one map write; the
    /// program sees either the old or the new config, never a mix.
    pub fn set_config(&mut self, cfg: &LiveConfig) -> Result<(), DatapathError> {
        cfg.validate()?;
        self.config.set(0, cfg, 0).map_err(map_err(names::CONFIG))
    }

    /// Sums of the per-CPU counters, indexed by [`Stat`].
    pub fn stat_totals(&self) -> Result<[u64; STAT_SLOTS as usize], DatapathError> {
        let mut out = [0u64; STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(names::STATS))?;
            *slot = values.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }

    pub fn stat(&self, stat: Stat) -> Result<u64, DatapathError> {
        let values = self
            .stats
            .get(&stat.index(), 0)
            .map_err(map_err(names::STATS))?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// Makes exactly `ports` protected.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), DatapathError> {
        let want: std::collections::HashSet<u16> = ports.iter().copied().collect();
        for port in 0..=u16::MAX {
            let wanted = want.contains(&port) as u8;
            let current = self
                .ports
                .get(&(port as u32), 0)
                .map_err(map_err(names::PORTS))?;
            if current != wanted {
                self.ports
                    .set(port as u32, wanted, 0)
                    .map_err(map_err(names::PORTS))?;
            }
        }
        Ok(())
    }

    pub fn ports(&self) -> Result<Vec<u16>, DatapathError> {
        let mut out = Vec::new();
        for (port, value) in self.ports.iter().enumerate() {
            if value.map_err(map_err(names::PORTS))? != 0 {
                out.push(port as u16);
            }
        }
        Ok(out)
    }

    pub fn insert_block(
        &mut self,
        prefix: &Prefix,
        entry: &BlockEntry,
    ) -> Result<(), DatapathError> {
        self.block
            .insert(&key_of(prefix), entry, 0)
            .map_err(map_err(names::BLOCK))
    }

    /// Whether an entry existed.
    pub fn remove_block(&mut self, prefix: &Prefix) -> Result<bool, DatapathError> {
        match self.block.remove(&key_of(prefix)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(DatapathError::Map {
                name: names::BLOCK,
                source,
            }),
        }
    }

    pub fn get_block(&self, prefix: &Prefix) -> Option<BlockEntry> {
        // LPM lookups return the longest match; we want this exact prefix.
        let entry = self.block.get(&key_of(prefix), 0).ok()?;
        self.blocks()
            .ok()?
            .into_iter()
            .find(|(p, _)| p == prefix)
            .map(|_| entry)
    }

    pub fn blocks(&self) -> Result<Vec<(Prefix, BlockEntry)>, DatapathError> {
        self.block
            .iter()
            .map(|r| {
                r.map(|(k, v)| (prefix_of(&k), v))
                    .map_err(map_err(names::BLOCK))
            })
            .collect()
    }

    pub fn insert_allow(&mut self, prefix: &Prefix) -> Result<(), DatapathError> {
        self.allow
            .insert(&key_of(prefix), 1, 0)
            .map_err(map_err(names::ALLOW))
    }

    pub fn remove_allow(&mut self, prefix: &Prefix) -> Result<bool, DatapathError> {
        match self.allow.remove(&key_of(prefix)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(DatapathError::Map {
                name: names::ALLOW,
                source,
            }),
        }
    }

    pub fn allows(&self) -> Result<Vec<Prefix>, DatapathError> {
        self.allow
            .keys()
            .map(|r| r.map(|k| prefix_of(&k)).map_err(map_err(names::ALLOW)))
            .collect()
    }

    /// One address's entries, as the program looks them up (for `guard
    /// explain`): reads only, so explaining never changes a verdict.
    pub fn point(&self, ip: std::net::IpAddr, cfg: &LiveConfig) -> PointState {
        let source_key = Prefix::of(ip, cfg.source_prefix_v4, cfg.source_prefix_v6);
        let aggregate_key = Prefix::of(ip, cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6);
        let host = Key::new(guard_common::addr::MAX_PREFIX_LEN, Prefix::host(ip).addr());
        PointState {
            source: self.sources.get(&source_key.addr(), 0).ok(),
            aggregate: self.aggregates.get(&aggregate_key.addr(), 0).ok(),
            // Negative counts are transient (see guard-ebpf/src/conns.rs); the
            // program reads them as zero too.
            open_connections: self
                .conns
                .get(&source_key.addr(), 0)
                .map_or(0, |v| (v as i64).max(0) as u64),
            last_handshake_ns: self.known_good.get(&source_key.addr(), 0).ok(),
            allowed: self.allow.get(&host, 0).is_ok(),
            block: self.block.get(&host, 0).ok(),
            global: self.global.get(&0, 0).ok(),
            source_key,
            aggregate_key,
        }
    }

    /// Reads every per-source entry (the tuner's view); does not modify
    /// them, so observing never changes what the program decides.
    pub fn sources(&self) -> Result<Vec<(Addr, SourceState)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.sources.iter() {
            match item {
                Ok(kv) => out.push(kv),
                // The LRU can evict a key between next_key and lookup.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: names::SOURCES,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }
}

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

/// A loaded guard program with its maps.
pub struct Datapath {
    ebpf: Ebpf,
    maps: GuardMaps,
    events: Option<RingBuf<MapData>>,
    layout: Option<PinLayout>,
    /// Whether the maps were created by this load (false: adopted pins).
    fresh: bool,
    /// Whether this kernel can hand cookie connections to a listener.
    cookies_supported: bool,
}

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
            .map_max_entries(names::BLOCK, sizes.block);
        if let Some(layout) = layout {
            for name in names::PINNED_MAPS {
                loader.map_pin_path(name, layout.map(name));
            }
        }
        let kfunc_id = aya::Btf::from_sys_fs()
            .ok()
            .and_then(|btf| crate::kfunc::assign_reqsk_id(&btf));
        let object = crate::kfunc::resolve(EBPF_OBJECT, kfunc_id);
        let mut ebpf = loader.load(object.bytes()).map_err(|e| {
            if is_eperm(&e) {
                DatapathError::NotPermitted {
                    action: "create BPF maps".into(),
                }
            } else {
                DatapathError::Load(Box::new(e))
            }
        })?;
        let load_err = |e: ProgramError| {
            if is_eperm(&e) {
                DatapathError::NotPermitted {
                    action: "load BPF programs".into(),
                }
            } else {
                DatapathError::Load(Box::new(e))
            }
        };
        {
            let xdp: &mut Xdp = ebpf
                .program_mut(names::PROG_XDP)
                .expect("object has the XDP program")
                .try_into()
                .map_err(load_err)?;
            xdp.load().map_err(load_err)?;
        }
        {
            let tc: &mut SchedClassifier = ebpf
                .program_mut(names::PROG_TC)
                .expect("object has the tc program")
                .try_into()
                .map_err(load_err)?;
            tc.load().map_err(load_err)?;
        }
        {
            let tc: &mut SchedClassifier = ebpf
                .program_mut(names::PROG_COOKIE_ACK)
                .expect("object has the cookie-reply program")
                .try_into()
                .map_err(load_err)?;
            tc.load().map_err(load_err)?;
        }
        {
            let sockops: &mut SockOps = ebpf
                .program_mut(names::PROG_SOCKOPS)
                .expect("object has the sockops program")
                .try_into()
                .map_err(load_err)?;
            sockops.load().map_err(load_err)?;
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

    fn program_mut(&mut self, kind: AttachKind) -> &mut aya::programs::Program {
        let name = if kind.is_xdp() {
            names::PROG_XDP
        } else {
            names::PROG_TC
        };
        self.ebpf.program_mut(name).expect("program exists")
    }

    /// The cookie-reply check's fd (for `BPF_PROG_TEST_RUN`).
    pub fn cookie_ack_fd(&self) -> BorrowedFd<'_> {
        let prog = self
            .ebpf
            .program(names::PROG_COOKIE_ACK)
            .expect("program exists");
        prog.fd().expect("program is loaded").as_fd()
    }

    /// The loaded program's fd (for `BPF_PROG_TEST_RUN`).
    pub fn program_fd(&self, kind: AttachKind) -> BorrowedFd<'_> {
        let name = if kind.is_xdp() {
            names::PROG_XDP
        } else {
            names::PROG_TC
        };
        let prog = self.ebpf.program(name).expect("program exists");
        prog.fd().expect("program is loaded").as_fd()
    }

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
                            let link =
                                XdpLink::try_from(fd_link).map_err(|e| DatapathError::Io {
                                    action: format!("adopt link {}", path.display()),
                                    source: io::Error::other(e.to_string()),
                                })?;
                            let prog: &mut Xdp =
                                self.program_mut(kind).try_into().map_err(attach_err)?;
                            let id = prog.attach_to_link(link).map_err(attach_err)?;
                            // Keep the link alive past this program object:
                            // the pin holds it.
                            let link = prog.take_link(id).map_err(attach_err)?;
                            drop(link);
                        }
                        AttachKind::Tc => {
                            let link = SchedClassifierLink::try_from(fd_link).map_err(|e| {
                                DatapathError::Io {
                                    action: format!("adopt link {}", path.display()),
                                    source: io::Error::other(e.to_string()),
                                }
                            })?;
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
                    .map_err(|e: aya::programs::links::LinkError| DatapathError::Io {
                        action: format!("pin the XDP link on {iface} (the kernel attached it through netlink, which cannot be pinned)"),
                        source: io::Error::other(e.to_string()),
                    })?
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
                prog.take_link(id).map_err(attach_err)?.try_into().map_err(
                    |e: aya::programs::links::LinkError| DatapathError::Io {
                        action: format!("pin the tc link on {iface} (needs tcx, Linux >= 6.6)"),
                        source: io::Error::other(e.to_string()),
                    },
                )?
            }
        };
        if let Some(layout) = layout {
            let path = layout.link(kind, iface);
            fd_link.pin(&path).map_err(|e| DatapathError::Io {
                action: format!("pin link at {}", path.display()),
                source: io::Error::other(e.to_string()),
            })?;
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
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| {
                            DatapathError::Io {
                                action: format!("adopt link {}", path.display()),
                                source: io::Error::other(e.to_string()),
                            }
                        })?;
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
            let fd_link: FdLink = prog.take_link(id).map_err(attach_err)?.try_into().map_err(
                |e: aya::programs::links::LinkError| DatapathError::Io {
                    action: format!(
                        "pin the cookie-reply link on {iface} (needs tcx, Linux >= 6.6)"
                    ),
                    source: io::Error::other(e.to_string()),
                },
            )?;
            fd_link.pin(&path).map_err(|e| DatapathError::Io {
                action: format!("pin link at {}", path.display()),
                source: io::Error::other(e.to_string()),
            })?;
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
            let fd_link: FdLink =
                link.try_into()
                    .map_err(|e: aya::programs::links::LinkError| DatapathError::Io {
                        action: "pin the sockops link (needs Linux >= 5.7)".into(),
                        source: io::Error::other(e.to_string()),
                    })?;
            let path = layout.sockops_link();
            fd_link.pin(&path).map_err(|e| DatapathError::Io {
                action: format!("pin link at {}", path.display()),
                source: io::Error::other(e.to_string()),
            })?;
        }
        info!(
            "{}: connection tracking attached (sockops)",
            cgroup.display()
        );
        Ok(())
    }
}

/// `BPF_OBJ_GET`: opens a pinned object (aya 0.14 keeps the fd of a
/// `PinnedLink` private, and the update below needs it).
fn obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: a valid bpf_attr prefix whose path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: swaps the program behind a link atomically.
fn link_update(link_fd: std::os::fd::RawFd, prog_fd: std::os::fd::RawFd) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdateAttr {
        link_fd: link_fd as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_LINK_UPDATE.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
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

pub fn nix_if_index(iface: &str) -> Option<u32> {
    let c = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

fn raise_memlock_limit() {
    // Kernels >= 5.11 account BPF memory to the cgroup and ignore this;
    // older ones need it for any sizeable map.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
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

/// The cgroup v2 mount point (pure v2 at /sys/fs/cgroup, or the hybrid
/// layout's /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux >= 5.14), so
/// connection tracking counts only sockets of the namespace guard protects.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `CLOCK_MONOTONIC`, the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::AttachRequest;

    #[test]
    fn attach_names_parse_back() {
        for a in [
            AttachRequest::Xdp,
            AttachRequest::XdpNative,
            AttachRequest::XdpGeneric,
            AttachRequest::Tc,
        ] {
            assert_eq!(a.name().parse::<AttachRequest>(), Ok(a));
        }
        assert!("ebpf".parse::<AttachRequest>().is_err());
    }
}
