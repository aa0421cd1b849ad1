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
//! Every connection runs in its own task behind a connection limit (a cap per uid, and slots
//! only operators may take, so no reporter can lock an operator out), with
//! timeouts on the handshake, on each frame once it starts and on each
//! write, so one slow or hostile (but permitted) client cannot hold up the
//! others. A malformed frame gets an `Error` reply and the connection is
//! closed, since framing can no longer be trusted.
//!
//! What lives where: `policy` (roles and the per-request check), `server` (binding and the
//! accept loop), `session` (one connection), `socket` (the socket file's safety), `peer`
//! (credentials), `stats` (counters).

use std::io;
use std::path::PathBuf;

use guard_common::proto::{Request, Response};

mod peer;
mod policy;
mod server;
mod session;
mod slots;
mod socket;
mod stats;

pub use policy::*;
pub use server::*;
pub use slots::{Busy, DEFAULT_OPERATOR_SLOTS, DEFAULT_SESSIONS_PER_UID, MAX_SESSIONS};
pub use stats::*;
use {peer::*, session::*, slots::*, socket::*};

/// What the agent does with each request. Synchronous: requests are map
/// updates and lookups (a syscall each); the server runs the handler on the
/// blocking pool so a slow one cannot stall the runtime.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, peer: &PeerInfo, req: Request) -> Response;
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

#[cfg(test)]
mod tests;
