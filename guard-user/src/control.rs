//! The agent's side of the control socket.
//!
//! Who may talk to the agent is decided twice: by the socket file's mode
//! and group, and by the peer's credentials (`SO_PEERCRED`, plus its
//! supplementary groups from `SO_PEERGROUPS`) checked before a byte is read.
//! The second check also covers the moment between `bind` and `chmod`, when
//! the file still has the process umask's permissions.
//!
//! What a connected peer may ask is decided by its [`Role`], from the same
//! credentials: operators (root, the agent's own uid, `operator_uids`,
//! members of `operator_group`) may do everything; every other permitted
//! peer — the internet-facing app among them — is a reporter, which may
//! report offenders no wider than [`Policy::widest_report`] and read, and
//! is answered `NotPermitted` for anything else. The check runs here, where
//! requests are dispatched, so no handler can forget it.
//!
//! The socket's directory, and every one above it, must belong to root or
//! the agent's user and be writable by others only with the sticky bit;
//! otherwise someone else could swap the socket for a symlink (which the
//! agent's chown and chmod would follow) or for a listener of their own.
//! Group and mode are applied without following symlinks all the same.
//!
//! Every connection runs in its own task behind a connection limit, with
//! timeouts on the handshake, on each frame once it starts and on each
//! write, so one slow or hostile (but permitted) client cannot hold up the
//! others. A malformed frame gets an `Error` reply and the connection is
//! closed, since framing can no longer be trusted.

use std::ffi::CString;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guard_common::addr::{v4_mapped, Prefix, V4_MAPPED_BITS};
use guard_common::proto::{
    cap_str, newest_history_lines, BytesMut, ErrorCode, FrameDecoder, Message, ProtoError, Request,
    Response, MAX_LIST_ENTRIES, PROTO_VERSION,
};
use guard_common::state::reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// From `SO_PEERCRED`, as of the peer's `connect`.
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`); empty where the kernel
    /// cannot tell.
    pub groups: Vec<u32>,
    /// The name the client gave in its `Hello`; self-declared, so for logs
    /// and the origin of blocks, never for decisions.
    pub client_name: String,
    /// What the peer may do, from its credentials ([`role_of`]).
    pub role: Role,
}

/// What a peer may do on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every request; blocks no wider than [`Policy::widest_block`].
    Operator,
    /// Block reports no wider than [`Policy::widest_report`], and the
    /// read-only requests (stats, config, blocks, allows, history).
    Reporter,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Reporter => "reporter",
        }
    }
}

/// The widest prefix a block may name, per family, as prefix lengths: a
/// smaller number is a wider prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Widest {
    pub v4: u8,
    pub v6: u8,
}

impl Widest {
    /// What the app may report by default: a /24 or a /48, the kernel's
    /// default aggregate prefixes.
    pub const REPORT: Self = Self { v4: 24, v6: 48 };
    /// What an operator may block by default: a /8 or a /32 (an ISP's
    /// allocation). Wider than that is a firewall rule, not a block.
    pub const BLOCK: Self = Self { v4: 8, v6: 32 };

    /// Whether `p` is no wider than this. A prefix in the unified space
    /// that is shorter than /96 yet holds the IPv4-mapped range covers all
    /// of IPv4, so it counts as an IPv4 /0 as well.
    pub fn admits(&self, p: &Prefix) -> bool {
        let len = p.prefix_len();
        if p.is_v4() {
            return len - V4_MAPPED_BITS >= u32::from(self.v4);
        }
        let all_v4 = Prefix::new(v4_mapped([0; 4]), V4_MAPPED_BITS);
        let v4_ok = !p.contains_prefix(&all_v4) || self.v4 == 0;
        v4_ok && len >= u32::from(self.v6)
    }
}

impl std::fmt::Display for Widest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{} for IPv4, /{} for IPv6", self.v4, self.v6)
    }
}

/// What the agent does with each request. Synchronous: requests are map
/// updates and lookups (a syscall each); the server runs the handler on the
/// blocking pool so a slow one cannot stall the runtime.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, peer: &PeerInfo, req: Request) -> Response;
}

/// Which peers may use the socket, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The agent's own effective uid.
    pub agent_uid: u32,
    /// The socket file's group: its members may connect.
    pub socket_gid: Option<u32>,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Operators besides root and the agent's uid.
    pub operator_uids: Vec<u32>,
    /// Members (primary or supplementary) are operators.
    pub operator_gids: Vec<u32>,
    /// Reporters whatever else they are, e.g. an app running as root in
    /// its container.
    pub reporter_uids: Vec<u32>,
    /// The widest prefix a reporter may name in a block report.
    pub widest_report: Widest,
    /// The widest prefix anyone, operators included, may block.
    pub widest_block: Widest,
}

/// Root, the agent's own uid, an allowed uid, or a member (primary or
/// supplementary) of an allowed group or of the socket's group.
pub fn peer_allowed(peer: &PeerInfo, policy: &Policy) -> bool {
    if peer.uid == 0 || peer.uid == policy.agent_uid || policy.allowed_uids.contains(&peer.uid) {
        return true;
    }
    let in_group = |gid: u32| peer.gid == gid || peer.groups.contains(&gid);
    policy.socket_gid.is_some_and(in_group) || policy.allowed_gids.iter().any(|g| in_group(*g))
}

/// The role of a permitted peer: a `reporter_uids` entry is a reporter;
/// otherwise root, the agent's own uid, an `operator_uids` entry and a
/// member of an operator group are operators; everyone else is a reporter.
pub fn role_of(peer: &PeerInfo, policy: &Policy) -> Role {
    if policy.reporter_uids.contains(&peer.uid) {
        return Role::Reporter;
    }
    let in_group = |gid: &u32| peer.gid == *gid || peer.groups.contains(gid);
    if peer.uid == 0
        || peer.uid == policy.agent_uid
        || policy.operator_uids.contains(&peer.uid)
        || policy.operator_gids.iter().any(in_group)
    {
        Role::Operator
    } else {
        Role::Reporter
    }
}

/// Whether `peer` may make `req`; the `NotPermitted` reply if not.
pub fn authorize(peer: &PeerInfo, req: &Request, policy: &Policy) -> Result<(), Response> {
    let refuse = |message: String| Err(Response::error(ErrorCode::NotPermitted, message));
    match (peer.role, req) {
        (Role::Reporter, Request::Block { prefix, reason, .. }) => {
            if !(policy.widest_report.admits(prefix) && policy.widest_block.admits(prefix)) {
                refuse(format!(
                    "{prefix} is wider than a report may name ({}); report the sources \
                     themselves, or have an operator run `guard block`",
                    policy.widest_report
                ))
            } else if matches!(*reason, reason::OPERATOR | reason::ESCALATED_OVER_CAP) {
                refuse(format!(
                    "a report may not give the reason `{}`: only operators and the agent \
                     itself use it",
                    reason::name(*reason)
                ))
            } else {
                Ok(())
            }
        }
        (Role::Operator, Request::Block { prefix, .. }) if !policy.widest_block.admits(prefix) => {
            refuse(format!(
                "{prefix} is wider than any block may be ({}); raise [control] \
                 widest_block_v4/widest_block_v6 in guard.toml to allow it",
                policy.widest_block
            ))
        }
        (Role::Operator, _) => Ok(()),
        (
            Role::Reporter,
            Request::ListBlocks { .. }
            | Request::ListAllows
            | Request::Stats
            | Request::GetConfig
            | Request::History { .. }
            | Request::Escalation { .. }
            // Answered `Unexpected` by the session before it gets here.
            | Request::Hello { .. },
        ) => Ok(()),
        (
            Role::Reporter,
            Request::Unblock { .. }
            | Request::Allow { .. }
            | Request::Disallow { .. }
            | Request::SetConfig { .. },
        ) => refuse(format!(
            "`{}` needs the operator role, and uid {} may only report blocks and read: run \
             it as root or as a member of operator_group (guard.toml)",
            req.name(),
            peer.uid
        )),
    }
}

/// Where and how the agent listens.
#[derive(Debug, Clone)]
pub struct ControlServerConfig {
    pub path: PathBuf,
    /// Permissions of the socket file.
    pub mode: u32,
    /// Group of the socket file, by name or number; `None` keeps the
    /// agent's.
    pub group: Option<String>,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Group whose members are operators, by name or number.
    pub operator_group: Option<String>,
    pub operator_uids: Vec<u32>,
    pub reporter_uids: Vec<u32>,
    pub widest_report: Widest,
    pub widest_block: Widest,
    /// Connections served at once; more are answered `Busy` and closed.
    pub max_connections: usize,
    /// From accepting a connection to receiving its complete `Hello`.
    pub handshake_timeout: Duration,
    /// Once a frame starts arriving, the rest must follow within this;
    /// also the limit on writing one reply.
    pub frame_timeout: Duration,
    /// Longest quiet time between requests (after the handshake); a
    /// session quiet for longer is closed, so idle sessions cannot hold
    /// every slot. The app's client reconnects when it next has a report.
    /// `None` keeps idle sessions open.
    pub idle_timeout: Option<Duration>,
    /// Sent to clients in `HelloOk`.
    pub agent_version: String,
}

impl ControlServerConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: 0o660,
            group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            operator_group: None,
            operator_uids: Vec::new(),
            reporter_uids: Vec::new(),
            widest_report: Widest::REPORT,
            widest_block: Widest::BLOCK,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(30)),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

impl ControlServerConfig {
    /// The agent's control socket as its settings describe it.
    pub fn from_settings(s: &crate::settings::Settings) -> Self {
        let mut cfg = Self::new(&s.control_socket);
        cfg.group = s.control_group.clone();
        cfg.allowed_uids = s.allowed_uids.clone();
        cfg.allowed_gids = s.allowed_gids.clone();
        cfg.operator_group = s.control.operator_group.clone();
        cfg.operator_uids = s.control.operator_uids.clone();
        cfg.reporter_uids = s.control.reporter_uids.clone();
        cfg.widest_report = s.control.widest_report;
        cfg.widest_block = s.control.widest_block;
        cfg.idle_timeout = Some(s.control.idle_timeout);
        cfg
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket's directory {}: {source}", .path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error(
        "refusing to put the control socket under {}: every user may write to it and it has no \
         sticky bit, so anyone could replace the socket (chmod o-w or +t it, or set \
         control_socket elsewhere)",
        .path.display()
    )]
    UnsafeDirMode { path: PathBuf },
    #[error(
        "refusing to put the control socket under {}: it belongs to uid {uid}, who could replace \
         the socket (use a directory owned by root or the agent's user, or set control_socket \
         elsewhere)",
        .path.display()
    )]
    UnsafeDirOwner { path: PathBuf, uid: u32 },
    #[error("cannot inspect {}, a directory above the control socket: {source}", .path.display())]
    InspectDir { path: PathBuf, source: io::Error },
    #[error(
        "{} is no longer the socket the agent bound (something replaced it meanwhile); check who \
         may write to its directory",
        .path.display()
    )]
    Replaced { path: PathBuf },
    #[error(
        "another process is already listening at {}: stop the other agent first or set another \
         control_socket",
        .path.display()
    )]
    AlreadyRunning { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it (remove it or set another control_socket)", .path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot inspect or remove the old control socket {}: {source}", .path.display())]
    Stale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {}: {source}", .path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set mode {mode:o} on {}: {source}", .path.display())]
    Chmod {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("group `{group}` does not exist: create it (groupadd {group}) or set {key} to an existing group")]
    UnknownGroup { group: String, key: &'static str },
    #[error("cannot look up group `{group}`: {source}")]
    GroupLookup { group: String, source: io::Error },
    #[error("cannot give {} to group {gid}: {source}", .path.display())]
    Chown {
        path: PathBuf,
        gid: u32,
        source: io::Error,
    },
    #[error("cannot register the control socket with the runtime: {0}")]
    Runtime(io::Error),
}

/// Counters the agent exports as metrics.
#[derive(Debug, Default)]
pub struct ControlStats {
    accepted: AtomicU64,
    refused_peer: AtomicU64,
    not_permitted: AtomicU64,
    busy: AtomicU64,
    bad_frames: AtomicU64,
    timeouts: AtomicU64,
    idle_closed: AtomicU64,
    handshake_failed: AtomicU64,
    handler_panics: AtomicU64,
    accept_errors: AtomicU64,
    active: AtomicU64,
    reads_waiting: AtomicU64,
    requests_ok: [AtomicU64; Request::KINDS.len()],
    requests_error: [AtomicU64; Request::KINDS.len()],
}

/// Requests of one kind answered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestCount {
    /// One of [`Request::KINDS`].
    pub kind: &'static str,
    pub ok: u64,
    /// Answered with an `Error`.
    pub error: u64,
}

/// A copy of [`ControlStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlStatsSnapshot {
    /// Connections accepted by the kernel, before any check.
    pub accepted: u64,
    /// Closed unread because of their peer credentials.
    pub refused_peer: u64,
    /// Requests refused for the peer's role (answered `NotPermitted`).
    pub not_permitted: u64,
    /// Closed because the connection limit was reached.
    pub busy: u64,
    /// Malformed, oversized or out-of-order frames (each closes its
    /// connection).
    pub bad_frames: u64,
    /// Clients dropped for being too slow to send or to read.
    pub timeouts: u64,
    /// Sessions closed for sending no request within the idle timeout.
    pub idle_closed: u64,
    /// Clients whose protocol version differs from the agent's.
    pub handshake_failed: u64,
    /// Requests whose handler panicked (answered `Internal`).
    pub handler_panics: u64,
    pub accept_errors: u64,
    /// Connections being served now.
    pub active: u64,
    /// `list_blocks` and `history` requests waiting for the one running
    /// (they walk the blocklist or the audit log, so they take turns).
    pub reads_waiting: u64,
    /// Per request kind, in [`Request::KINDS`] order.
    pub requests: Vec<RequestCount>,
}

impl ControlStats {
    pub fn snapshot(&self) -> ControlStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ControlStatsSnapshot {
            accepted: get(&self.accepted),
            refused_peer: get(&self.refused_peer),
            not_permitted: get(&self.not_permitted),
            busy: get(&self.busy),
            bad_frames: get(&self.bad_frames),
            timeouts: get(&self.timeouts),
            idle_closed: get(&self.idle_closed),
            handshake_failed: get(&self.handshake_failed),
            handler_panics: get(&self.handler_panics),
            accept_errors: get(&self.accept_errors),
            active: get(&self.active),
            reads_waiting: get(&self.reads_waiting),
            requests: Request::KINDS
                .iter()
                .enumerate()
                .map(|(i, kind)| RequestCount {
                    kind,
                    ok: get(&self.requests_ok[i]),
                    error: get(&self.requests_error[i]),
                })
                .collect(),
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn count_request(&self, kind: usize, resp: &Response) {
        let slot = if matches!(resp, Response::Error { .. }) {
            &self.requests_error
        } else {
            &self.requests_ok
        };
        Self::bump(&slot[kind]);
    }
}

/// A bound control socket, ready to serve.
pub struct ControlServer {
    listener: std::os::unix::net::UnixListener,
    cfg: ControlServerConfig,
    policy: Policy,
    /// Identity of the socket file we created, so shutdown removes it only
    /// if nobody replaced it meanwhile.
    file_id: (u64, u64),
    stats: Arc<ControlStats>,
}

impl ControlServer {
    /// Creates the directory, replaces a stale socket (never a live one or a
    /// non-socket), binds, and applies mode and group.
    pub fn bind(cfg: ControlServerConfig) -> Result<Self, ControlError> {
        let path = cfg.path.clone();
        // Before anything touches the file system, so a typo leaves nothing
        // behind.
        let gid = cfg
            .group
            .as_deref()
            .map(|g| resolve_group(g, "control_group"))
            .transpose()?;
        let operator_gid = cfg
            .operator_group
            .as_deref()
            .map(|g| resolve_group(g, "[control] operator_group"))
            .transpose()?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        // What exists already is checked before anything is created in it,
        // and the whole chain once more after.
        check_dirs(dir, euid)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| ControlError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        check_dirs(dir, euid)?;
        remove_stale_socket(&path)?;
        let listener =
            std::os::unix::net::UnixListener::bind(&path).map_err(|source| ControlError::Bind {
                path: path.clone(),
                source,
            })?;
        let meta = match restrict(&path, cfg.mode, gid, &listener) {
            Ok(meta) => meta,
            Err(e) => {
                // A socket with the wrong owner or mode must not stay behind
                // for someone else to find.
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let policy = Policy {
            // SAFETY: geteuid has no preconditions and cannot fail.
            agent_uid: unsafe { libc::geteuid() },
            socket_gid: Some(meta.gid()),
            allowed_uids: cfg.allowed_uids.clone(),
            allowed_gids: cfg.allowed_gids.clone(),
            operator_uids: cfg.operator_uids.clone(),
            operator_gids: operator_gid.into_iter().collect(),
            reporter_uids: cfg.reporter_uids.clone(),
            widest_report: cfg.widest_report,
            widest_block: cfg.widest_block,
        };
        Ok(Self {
            listener,
            file_id: (meta.dev(), meta.ino()),
            cfg,
            policy,
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<ControlStats> {
        self.stats.clone()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// Serves until `shutdown` resolves, then closes every connection and
    /// removes the socket file.
    pub async fn serve(
        self,
        handler: Arc<dyn ControlHandler>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ControlError> {
        let listener = UnixListener::from_std(self.listener).map_err(ControlError::Runtime)?;
        let limits = Arc::new(Limits {
            handshake_timeout: self.cfg.handshake_timeout,
            frame_timeout: self.cfg.frame_timeout,
            idle_timeout: self.cfg.idle_timeout,
            agent_version: self.cfg.agent_version.clone(),
            reads: Semaphore::new(1),
        });
        let slots = Arc::new(Semaphore::new(self.cfg.max_connections.max(1)));
        let mut conns = JoinSet::new();
        let mut refusals = RefusalLog::default();
        log::info!("control socket listening at {}", self.cfg.path.display());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        ControlStats::bump(&self.stats.accepted);
                        let Some(peer) = admit(&stream, &self.policy, &self.stats, &mut refusals)
                        else {
                            continue;
                        };
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            ControlStats::bump(&self.stats.busy);
                            refuse_busy(&stream);
                            continue;
                        };
                        conns.spawn(connection(
                            stream,
                            peer,
                            handler.clone(),
                            self.policy.clone(),
                            limits.clone(),
                            self.stats.clone(),
                            permit,
                        ));
                    }
                    Err(e) => {
                        // Out of descriptors or memory: back off instead of
                        // spinning on an error that repeats at once.
                        ControlStats::bump(&self.stats.accept_errors);
                        log::warn!("control socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            log::error!("a control connection task panicked: {e}");
                        }
                    }
                }
            }
        }
        conns.shutdown().await;
        drop(listener);
        remove_if_ours(&self.cfg.path, self.file_id);
        log::info!("control socket at {} closed", self.cfg.path.display());
        Ok(())
    }
}

/// Binds `cfg.path` and serves until `shutdown` resolves. Use
/// [`ControlServer`] directly to read its [`ControlStats`].
pub async fn serve(
    cfg: ControlServerConfig,
    handler: Arc<dyn ControlHandler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlError> {
    ControlServer::bind(cfg)?.serve(handler, shutdown).await
}

/// Refuses a socket directory that someone other than root or the agent
/// could change: `dir` (or, while it does not exist, its nearest existing
/// ancestor) and every directory above it, symlinks resolved, must belong
/// to root or `euid` and be writable by other users only with the sticky
/// bit. Otherwise that user could swap the socket, or a folder on its way,
/// for a symlink the agent would then chown and chmod, or for a listener
/// of their own that operators would talk to.
fn check_dirs(dir: &Path, euid: u32) -> Result<(), ControlError> {
    let mut existing = dir;
    let real = loop {
        match existing.canonicalize() {
            Ok(real) => break real,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match existing.parent() {
                Some(up) if !up.as_os_str().is_empty() => existing = up,
                _ => existing = Path::new("."),
            },
            Err(source) => {
                return Err(ControlError::InspectDir {
                    path: existing.to_path_buf(),
                    source,
                })
            }
        }
    };
    for d in real.ancestors() {
        let meta = std::fs::metadata(d).map_err(|source| ControlError::InspectDir {
            path: d.to_path_buf(),
            source,
        })?;
        let mode = meta.mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(ControlError::UnsafeDirMode {
                path: d.to_path_buf(),
            });
        }
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(ControlError::UnsafeDirOwner {
                path: d.to_path_buf(),
                uid: meta.uid(),
            });
        }
    }
    Ok(())
}

/// Applies group and mode to a freshly bound socket without following a
/// symlink, should one have replaced it; returns its metadata.
fn restrict(
    path: &Path,
    mode: u32,
    gid: Option<u32>,
    listener: &std::os::unix::net::UnixListener,
) -> Result<std::fs::Metadata, ControlError> {
    let replaced = || ControlError::Replaced {
        path: path.to_path_buf(),
    };
    let stale = |source| ControlError::Stale {
        path: path.to_path_buf(),
        source,
    };
    let is_socket = |m: &std::fs::Metadata| m.file_type().is_socket();
    if !is_socket(&std::fs::symlink_metadata(path).map_err(stale)?) {
        return Err(replaced());
    }
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| replaced())?;
    if let Some(gid) = gid {
        // SAFETY: `cpath` is a valid C string; -1 keeps the owner.
        let rc = unsafe {
            libc::fchownat(
                libc::AT_FDCWD,
                cpath.as_ptr(),
                libc::uid_t::MAX,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(ControlError::Chown {
                path: path.to_path_buf(),
                gid,
                source: io::Error::last_os_error(),
            });
        }
    }
    // SAFETY: `cpath` is a valid C string.
    let rc = unsafe {
        libc::fchmodat(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            mode as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // Where the C library cannot change a mode without following
        // (no /proc to go through), the directories checked above keep
        // anyone else from swapping the socket we just saw.
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(ControlError::Chmod {
                path: path.to_path_buf(),
                mode,
                source: err,
            });
        }
        if !is_socket(&std::fs::symlink_metadata(path).map_err(stale)?) {
            return Err(replaced());
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| ControlError::Chmod {
                path: path.to_path_buf(),
                mode,
                source,
            },
        )?;
    }
    listener
        .set_nonblocking(true)
        .map_err(ControlError::Runtime)?;
    let meta = std::fs::symlink_metadata(path).map_err(stale)?;
    if !is_socket(&meta) {
        return Err(replaced());
    }
    Ok(meta)
}

fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
    let stale = |source| ControlError::Stale {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    // A socket file outlives its listener; only one nobody answers on is
    // stale.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyRunning {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale control socket {}", path.display());
            std::fs::remove_file(path).map_err(stale)
        }
        Err(e) => Err(stale(e)),
    }
}

fn remove_if_ours(path: &Path, id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == id => {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("cannot remove the control socket {}: {e}", path.display());
            }
        }
        _ => log::debug!(
            "control socket {} was replaced or removed; leaving it",
            path.display()
        ),
    }
}

/// A group by name or number; `key` is the setting that named it.
fn resolve_group(group: &str, key: &'static str) -> Result<u32, ControlError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || ControlError::UnknownGroup {
        group: group.to_string(),
        key,
    };
    let name = CString::new(group).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `group` is plain data for getgrnam_r to fill in.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is the
        // real size of `buf`; `grp`'s string fields point into `buf`, which
        // outlives the only field read (`gr_gid`, a plain integer).
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            let bigger = buf.len() * 2;
            buf.resize(bigger, 0);
            continue;
        }
        if rc != 0 {
            return Err(ControlError::GroupLookup {
                group: group.to_string(),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if found.is_null() {
            return Err(unknown());
        }
        return Ok(grp.gr_gid);
    }
}

/// The peer's supplementary groups as of its `connect`.
fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    // NGROUPS_MAX on Linux.
    const MAX_GROUPS: usize = 65536;
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `fd` is a live socket owned by the caller's stream;
        // `groups` has `len` writable bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / GID);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        let needed = len as usize / GID;
        // ERANGE reports the size needed in `len`.
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= MAX_GROUPS
        {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

fn peer_info(stream: &UnixStream) -> io::Result<PeerInfo> {
    let cred = stream.peer_cred()?;
    let groups = match peer_groups(stream.as_raw_fd()) {
        Ok(g) => g,
        Err(e) => {
            // Older kernels lack SO_PEERGROUPS; the primary gid still
            // counts.
            log::debug!("cannot read the control peer's groups: {e}");
            Vec::new()
        }
    };
    Ok(PeerInfo {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        groups,
        client_name: String::new(),
        // Decided by `admit` against the policy.
        role: Role::Reporter,
    })
}

/// Logs refused peers at most every ten seconds, so a process retrying in
/// a loop cannot flood the log; the counter keeps the full number.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn refused(&mut self, what: &str) {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            let more = std::mem::take(&mut self.suppressed);
            log::warn!(
                "control socket refused {what}: not root, the agent's uid, an allowed uid/gid or \
                 a member of the socket's group{}",
                if more > 0 {
                    format!(" ({more} more refused since the last report)")
                } else {
                    String::new()
                }
            );
            self.last = Some(Instant::now());
        } else {
            self.suppressed += 1;
        }
    }
}

/// The peer, if it may use the socket; counts and logs it if not.
fn admit(
    stream: &UnixStream,
    policy: &Policy,
    stats: &ControlStats,
    log: &mut RefusalLog,
) -> Option<PeerInfo> {
    match peer_info(stream) {
        Ok(mut peer) if peer_allowed(&peer, policy) => {
            peer.role = role_of(&peer, policy);
            Some(peer)
        }
        Ok(peer) => {
            ControlStats::bump(&stats.refused_peer);
            let pid = peer.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
            log.refused(&format!("pid {pid} (uid {}, gid {})", peer.uid, peer.gid));
            None
        }
        Err(e) => {
            // Unknown credentials are not good credentials.
            ControlStats::bump(&stats.refused_peer);
            log.refused(&format!("a peer whose credentials cannot be read ({e})"));
            None
        }
    }
}

/// Tells a permitted peer over the limit why it is being closed, without
/// waiting: if the reply does not fit in the socket buffer at once it is
/// not sent.
fn refuse_busy(stream: &UnixStream) {
    let mut out = BytesMut::new();
    let reply = Response::error(
        ErrorCode::Busy,
        "the agent is serving its maximum number of control connections; retry shortly",
    );
    if reply.encode(&mut out).is_ok() {
        let _ = stream.try_write(&out);
    }
}

struct Limits {
    handshake_timeout: Duration,
    frame_timeout: Duration,
    idle_timeout: Option<Duration>,
    agent_version: String,
    /// One turn for the requests that walk a whole table or file
    /// (`list_blocks`, `history`): however many sessions ask at once, the
    /// agent does that work once at a time.
    reads: Semaphore,
}

/// Whether `req` walks a whole table or file, and so waits its turn.
fn is_heavy(req: &Request) -> bool {
    matches!(req, Request::ListBlocks { .. } | Request::History { .. })
}

/// Counts a task as waiting for as long as it holds this.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why reading a frame stopped.
enum ReadEnd {
    /// The client closed (or reset) the connection.
    Closed,
    /// A frame, once started, did not complete in time.
    TimedOut,
    /// No frame started within the idle timeout.
    Idle,
    Malformed(ProtoError),
}

struct Session {
    stream: UnixStream,
    decoder: FrameDecoder,
    out: BytesMut,
    stats: Arc<ControlStats>,
    frame_timeout: Duration,
}

impl Session {
    /// The next message. `idle` bounds the wait for a frame to start; once
    /// it has, the rest must come within the frame timeout.
    async fn read(&mut self, idle: Option<Duration>) -> Result<Message, ReadEnd> {
        let mut buf = [0u8; 4096];
        let mut frame_started = (self.decoder.buffered() > 0).then(Instant::now);
        loop {
            match self.decoder.decode() {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Malformed(e)),
            }
            let wait = match frame_started {
                Some(t) => Some(self.frame_timeout.saturating_sub(t.elapsed())),
                None => idle,
            };
            let read = self.stream.read(&mut buf);
            let n = match wait {
                Some(wait) => match tokio::time::timeout(wait, read).await {
                    Ok(r) => r,
                    Err(_) if frame_started.is_none() => return Err(ReadEnd::Idle),
                    Err(_) => return Err(ReadEnd::TimedOut),
                },
                None => read.await,
            };
            match n {
                Ok(0) | Err(_) => return Err(ReadEnd::Closed),
                Ok(n) => {
                    self.decoder.feed(&buf[..n]);
                    frame_started.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    /// Sends a reply; false if the connection should close.
    async fn write(&mut self, resp: &Response) -> bool {
        self.out.clear();
        if let Err(e) = resp.encode(&mut self.out) {
            log::error!("cannot encode a {} control reply: {e}", resp.name());
            self.out.clear();
            let fallback = Response::error(
                ErrorCode::Internal,
                format!("the agent could not encode its {} reply: {e}", resp.name()),
            );
            if fallback.encode(&mut self.out).is_err() {
                return false;
            }
        }
        match tokio::time::timeout(self.frame_timeout, self.stream.write_all(&self.out)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                ControlStats::bump(&self.stats.timeouts);
                false
            }
        }
    }

    /// Handles a read failure: a malformed frame is answered before
    /// closing, so the client learns why.
    async fn fail(&mut self, end: ReadEnd, peer: &PeerInfo) {
        match end {
            ReadEnd::Closed => {}
            ReadEnd::TimedOut => {
                ControlStats::bump(&self.stats.timeouts);
                log::debug!("control client {peer:?} too slow; dropped");
            }
            ReadEnd::Idle => {
                ControlStats::bump(&self.stats.idle_closed);
                log::debug!("control client {peer:?} idle; closed");
            }
            ReadEnd::Malformed(e) => {
                ControlStats::bump(&self.stats.bad_frames);
                log::debug!("control client {peer:?} sent a bad frame: {e}");
                self.write(&Response::error(e.code(), e.to_string())).await;
            }
        }
    }

    /// Rejects a message that is well-formed but out of place, then the
    /// connection closes.
    async fn unexpected(&mut self, what: &str) {
        ControlStats::bump(&self.stats.bad_frames);
        self.write(&Response::error(ErrorCode::Unexpected, what))
            .await;
    }
}

/// Decrements the active-connection gauge however the task ends.
struct Active(Arc<ControlStats>);

impl Active {
    fn new(stats: Arc<ControlStats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: UnixStream,
    mut peer: PeerInfo,
    handler: Arc<dyn ControlHandler>,
    policy: Policy,
    limits: Arc<Limits>,
    stats: Arc<ControlStats>,
    _permit: OwnedSemaphorePermit,
) {
    let _active = Active::new(stats.clone());
    let mut s = Session {
        stream,
        decoder: FrameDecoder::new(),
        out: BytesMut::new(),
        stats: stats.clone(),
        frame_timeout: limits.frame_timeout,
    };

    let hello = match tokio::time::timeout(limits.handshake_timeout, s.read(None)).await {
        Err(_) => Err(ReadEnd::TimedOut),
        Ok(r) => r,
    };
    let hello_kind = Request::Hello {
        version: 0,
        client_name: String::new(),
    }
    .kind_index();
    match hello {
        Err(end) => return s.fail(end, &peer).await,
        Ok(Message::Request(Request::Hello {
            version,
            client_name,
        })) => {
            if version != PROTO_VERSION {
                ControlStats::bump(&stats.handshake_failed);
                let reply = Response::error(
                    ErrorCode::BadVersion,
                    format!(
                        "this agent speaks control protocol version {PROTO_VERSION}, the client \
                         {version}: upgrade the older side"
                    ),
                );
                stats.count_request(hello_kind, &reply);
                s.write(&reply).await;
                return;
            }
            peer.client_name = client_name;
            let reply = Response::HelloOk {
                version: PROTO_VERSION,
                agent_version: limits.agent_version.clone(),
            };
            stats.count_request(hello_kind, &reply);
            if !s.write(&reply).await {
                return;
            }
            log::debug!("control client {peer:?} connected");
        }
        Ok(_) => {
            return s
                .unexpected("the first message on the control socket must be hello")
                .await
        }
    }

    let mut refused_before = false;
    loop {
        let req = match s.read(limits.idle_timeout).await {
            Err(end) => return s.fail(end, &peer).await,
            Ok(Message::Request(Request::Hello { .. })) => {
                return s.unexpected("hello was already exchanged").await
            }
            Ok(Message::Response(r)) => {
                return s
                    .unexpected(&format!(
                        "the agent takes requests, not a `{}` reply",
                        r.name()
                    ))
                    .await
            }
            Ok(Message::Request(req)) => req,
        };
        let kind = req.kind_index();
        let name = req.name();
        log::debug!("control request {name} from {peer:?}");
        if let Err(reply) = authorize(&peer, &req, &policy) {
            ControlStats::bump(&stats.not_permitted);
            // Once per session: a compromised client retrying in a loop
            // shows in the counter, not in a flood of log lines.
            if !refused_before {
                refused_before = true;
                log::warn!(
                    "control client {:?} (uid {}, {}) may not {name}: {}",
                    peer.client_name,
                    peer.uid,
                    peer.role.name(),
                    match &reply {
                        Response::Error { message, .. } => message.as_str(),
                        _ => "",
                    }
                );
            }
            stats.count_request(kind, &reply);
            if !s.write(&reply).await {
                return;
            }
            continue;
        }
        // At most a page of history, and none is no work at all.
        let (req, history_limit) = match req {
            Request::History {
                since_unix_secs,
                prefix,
                limit,
            } => {
                let limit = limit.min(MAX_LIST_ENTRIES);
                let req = Request::History {
                    since_unix_secs,
                    prefix,
                    limit,
                };
                (req, Some(limit as usize))
            }
            other => (other, None),
        };
        if history_limit == Some(0) {
            let reply = Response::History { lines: Vec::new() };
            stats.count_request(kind, &reply);
            if !s.write(&reply).await {
                return;
            }
            continue;
        }
        let turn = if is_heavy(&req) {
            let _waiting = Waiting::new(&stats.reads_waiting);
            // Never closed, so acquiring cannot fail.
            Some(
                limits
                    .reads
                    .acquire()
                    .await
                    .expect("the reads semaphore stays open"),
            )
        } else {
            None
        };
        let h = handler.clone();
        let p = peer.clone();
        let reply = match tokio::task::spawn_blocking(move || h.handle(&p, req)).await {
            Ok(reply) => reply,
            Err(e) => {
                ControlStats::bump(&stats.handler_panics);
                log::error!("control handler failed on a {name} request: {e}");
                Response::error(
                    ErrorCode::Internal,
                    format!("the agent failed handling this {name} request; see its log"),
                )
            }
        };
        drop(turn);
        let reply = match reply {
            // A handler's message is free text; keep the reply encodable.
            Response::Error { code, message } if message.len() > 4096 => Response::Error {
                code,
                message: cap_str(&message, 4096).to_string(),
            },
            // No more than asked for, and what one frame can carry.
            Response::History { lines } => Response::History {
                lines: newest_history_lines(lines, history_limit.unwrap_or(0)),
            },
            other => other,
        };
        stats.count_request(kind, &reply);
        if !s.write(&reply).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
