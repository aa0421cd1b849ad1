//! The peer's kernel credentials (`SO_PEERCRED`, `SO_PEERGROUPS`) and the rate-limited
//! log of refused peers.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use super::*;

/// The peer's supplementary groups as of its `connect`.
pub(super) fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
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

pub(super) fn peer_info(stream: &UnixStream) -> io::Result<PeerInfo> {
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
pub(super) struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
    busy_last: Option<Instant>,
    busy_suppressed: u64,
}

impl RefusalLog {
    pub(super) fn refused(&mut self, what: &str) {
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

    /// A permitted peer turned away for want of a session it may take; a reporter that keeps
    /// trying shows in the counter, and here once every 10 s.
    pub(super) fn busy(&mut self, uid: u32, why: super::Busy) {
        let due = self
            .busy_last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            let more = std::mem::take(&mut self.busy_suppressed);
            log::warn!(
                "control socket busy for uid {uid} ({}){}",
                why.label(),
                if more > 0 {
                    format!(" ({more} more turned away since the last report)")
                } else {
                    String::new()
                }
            );
            self.busy_last = Some(Instant::now());
        } else {
            self.busy_suppressed += 1;
        }
    }
}
