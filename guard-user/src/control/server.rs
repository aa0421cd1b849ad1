//! The control server: its settings, binding the socket, the accept loop with its
//! connection limit, and admitting or turning away peers.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guard_common::proto::{BytesMut, ErrorCode, Response};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::*;
use crate::settings::{ControlSettings, ControlSocket};

/// Where and how the agent listens.
#[derive(Debug, Clone)]
pub struct ControlServerConfig {
    /// The socket file and who may connect.
    pub socket: ControlSocket,
    /// Permissions of the socket file.
    pub mode: u32,
    /// Roles, widths and session limits (`[control]`).
    pub control: ControlSettings,
    /// Connections served at once; more are answered `Busy` and closed.
    pub max_connections: usize,
    /// From accepting a connection to receiving its complete `Hello`.
    pub handshake_timeout: Duration,
    /// Once a frame starts arriving, the rest must follow within this;
    /// also the limit on writing one reply.
    pub frame_timeout: Duration,
    /// Sent to clients in `HelloOk`.
    pub agent_version: String,
}

impl ControlServerConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            socket: ControlSocket::at(path),
            mode: 0o660,
            control: ControlSettings::default(),
            max_connections: MAX_SESSIONS,
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// The agent's control socket as its settings describe it.
    pub fn from_settings(s: &crate::settings::Settings) -> Self {
        Self {
            socket: s.control_socket.clone(),
            control: s.control.clone(),
            ..Self::new(&s.control_socket.path)
        }
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
        let path = cfg.socket.path.clone();
        // Before anything touches the file system, so a typo leaves nothing
        // behind.
        let gid = cfg
            .socket
            .group
            .as_deref()
            .map(|g| resolve_group(g, "control_group"))
            .transpose()?;
        let operator_gid = cfg
            .control
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
            allowed_uids: cfg.socket.allowed_uids.clone(),
            allowed_gids: cfg.socket.allowed_gids.clone(),
            operator_uids: cfg.control.operator_uids.clone(),
            operator_gids: operator_gid.into_iter().collect(),
            reporter_uids: cfg.control.reporter_uids.clone(),
            widest_report: cfg.control.widest_report,
            widest_block: cfg.control.widest_block,
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
        &self.cfg.socket.path
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
            idle_timeout: Some(self.cfg.control.idle_timeout),
            agent_version: self.cfg.agent_version.clone(),
            reads: Semaphore::new(1),
        });
        let slots = Slots::new(
            self.cfg.max_connections,
            self.cfg.control.operator_slots,
            self.cfg.control.max_sessions_per_uid,
        );
        let mut conns = JoinSet::new();
        let mut refusals = RefusalLog::default();
        log::info!(
            "control socket listening at {}",
            self.cfg.socket.path.display()
        );
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
                        let permit = match slots.take(peer.uid, peer.role) {
                            Ok(permit) => permit,
                            Err(why) => {
                                self.stats.count_busy(why);
                                refusals.busy(peer.uid, why);
                                refuse_busy(&stream, &why.message(slots.per_uid()));
                                continue;
                            }
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
        remove_if_ours(&self.cfg.socket.path, self.file_id);
        log::info!(
            "control socket at {} closed",
            self.cfg.socket.path.display()
        );
        Ok(())
    }
}

/// Binds `cfg.socket.path` and serves until `shutdown` resolves. Use
/// [`ControlServer`] directly to read its [`ControlStats`].
pub async fn serve(
    cfg: ControlServerConfig,
    handler: Arc<dyn ControlHandler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlError> {
    ControlServer::bind(cfg)?.serve(handler, shutdown).await
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
fn refuse_busy(stream: &UnixStream, message: &str) {
    let mut out = BytesMut::new();
    let reply = Response::error(ErrorCode::Busy, message);
    if reply.encode(&mut out).is_ok() {
        let _ = stream.try_write(&out);
    }
}
