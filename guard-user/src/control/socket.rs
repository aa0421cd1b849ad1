//! The socket file's safety: its directories' owners and modes, group and mode applied
//! without following symlinks, stale sockets, the control group's id.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// Refuses a socket directory that someone other than root or the agent
/// could change: `dir` (or, while it does not exist, its nearest existing
/// ancestor) and every directory above it, symlinks resolved, must belong
/// to root or `euid` and be writable by other users only with the sticky
/// bit. Otherwise that user could swap the socket, or a folder on its way,
/// for a symlink the agent would then chown and chmod, or for a listener
/// of their own that operators would talk to.
pub(super) fn check_dirs(dir: &Path, euid: u32) -> Result<(), ControlError> {
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
pub(super) fn restrict(
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

pub(super) fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
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

pub(super) fn remove_if_ours(path: &Path, id: (u64, u64)) {
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
pub(super) fn resolve_group(group: &str, key: &'static str) -> Result<u32, ControlError> {
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
