//! Loading, pinning, adopting and attaching the guard program, and typed
//! access to its maps.
//!
//! Every start loads the embedded object, re-using the maps pinned by an
//! earlier run (so counters, blocks and per-source state carry over), then
//! swaps each pinned link to the new program with `BPF_LINK_UPDATE`: the
//! interface is never without a program, not even for one packet.
//!
//! What lives where: `maps` (typed access to the pinned maps), `load` (loading, pinning,
//! adopting, unloading), `attach` (XDP/tc/sockops attachment and link pinning), `sys` (the
//! raw syscalls and host facts aya does not cover).

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    programs::ProgramError,
    Ebpf,
};
use guard_common::{
    addr::Prefix,
    maps as names,
    state::{AllowEntry, FlowKey, Handshake, InFlight},
    syncookie::{CookieKey, CookieState},
    Addr, BlockEntry, LiveConfig, SourceState, TokenBucket,
};

use crate::paths::{PinLayout, BPFFS_ROOT};

/// The compiled eBPF object, built by build.rs from guard-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard"));

/// The datapath bench's reference programs (guard-ebpf's `bench-ref` binary): the cheapest
/// program per action and a kernel-helper cookie, measured beside guard. The agent never
/// loads them.
pub static BENCH_REF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-ref"));

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
        names::HANDSHAKES => (
            T::LruHash,
            size_of::<FlowKey>() as u32,
            size_of::<Handshake>() as u32,
        ),
        names::IN_FLIGHT => (T::LruHash, 16, size_of::<InFlight>() as u32),
        names::ACK_FAILS | names::ACK_FAILS_AGG => {
            (T::LruHash, 16, size_of::<TokenBucket>() as u32)
        }
        names::SYNACK_DESTS | names::ACK_FAILS_ALL => {
            (T::Array, 4, size_of::<TokenBucket>() as u32)
        }
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

/// What the maps hold for one address: its source and aggregate keys and
/// every entry the program would consult for a SYN from it.
#[derive(Debug, Clone)]
pub struct PointState {
    pub source_key: Prefix,
    pub aggregate_key: Prefix,
    pub source: Option<SourceState>,
    pub aggregate: Option<SourceState>,
    pub open_connections: u64,
    /// Its handshakes in flight, by slot (count them with `InFlight::live`).
    pub in_flight: Option<InFlight>,
    /// The bucket of cookie SYN-ACKs sent to it.
    pub synack_dest: Option<TokenBucket>,
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
    /// Handshakes in flight per source key (see guard-ebpf/src/conns.rs).
    pub in_flight: HashMap<MapData, Addr, InFlight>,
    /// Cookie SYN-ACK buckets, by `state::synack_slot` of the destination.
    pub synack_dests: Array<MapData, TokenBucket>,
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

mod attach;
mod load;
mod maps;
mod sys;

pub use attach::AttachRequest;
pub use load::{unload, UnloadReport};
pub use sys::{cgroup2_mount, monotonic_ns, netns_cookie, nix_if_index};

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
