//! The pod's cgroup, found from inside a sidecar container.
//!
//! Connection tracking counts the sockets of one cgroup v2 subtree. On a host that is the
//! cgroup2 root (or `cgroup`). In a pod sidecar the container's own `/sys/fs/cgroup` is a
//! cgroup namespace rooted at the *sidecar's* container cgroup, which holds none of the app's
//! sockets: attached there, tracking would count nothing. The app's container is a sibling
//! under the pod's cgroup, so the agent looks itself up in the host's cgroup2 tree (mounted
//! into the container, read-only is enough) and attaches to its parent: every container of
//! the pod, the app's included.
//!
//! A cgroup v2 directory's inode number is the cgroup's id, the same through every mount of
//! the hierarchy, so the container's root as it sees it and its directory in the host tree
//! have the same inode.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// How much of the host's tree is searched (a busy node has a few thousand cgroups).
const MAX_DIRS: usize = 200_000;
const MAX_DEPTH: usize = 16;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum PodCgroupError {
    #[error(
        "{0} is not a cgroup v2 mount: mount the host's /sys/fs/cgroup there (a hostPath volume)"
    )]
    NotCgroup2(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 line in /proc/self/cgroup (is this a cgroup v2 host?)")]
    NoCgroup2Line,
    #[error(
        "this container has no cgroup2 mount of its own cgroup (mount cgroup2 at /sys/fs/cgroup)"
    )]
    NoOwnMount,
    #[error(
        "this container's cgroup (id {0}) is not in the tree mounted at {1}: mount the host's \
         cgroup2 root, not a sub-folder"
    )]
    NotFound(u64, PathBuf),
    #[error("this container's cgroup {0} is the root of the host's tree: it has no pod above it")]
    AtRoot(PathBuf),
}

/// Where connection tracking attaches in a pod: the parent of this process's cgroup, as a
/// path under `host_mount` (the host's cgroup2 root mounted into the container).
pub fn pod_cgroup(host_mount: &Path) -> Result<PodCgroup, PodCgroupError> {
    // A node with the hybrid layout keeps cgroup2 in `unified` under its /sys/fs/cgroup.
    let hybrid = host_mount.join("unified");
    let host_mount = if is_cgroup2(host_mount)? {
        host_mount
    } else if is_cgroup2(&hybrid).unwrap_or(false) {
        hybrid.as_path()
    } else {
        return Err(PodCgroupError::NotCgroup2(host_mount.to_path_buf()));
    };
    let own = own_cgroup_dir()?;
    let id = inode(&own)?;
    let found =
        find_by_inode(host_mount, id).ok_or(PodCgroupError::NotFound(id, host_mount.into()))?;
    if found == host_mount {
        return Err(PodCgroupError::AtRoot(found));
    }
    let pod = found
        .parent()
        .ok_or_else(|| PodCgroupError::AtRoot(found.clone()))?
        .to_path_buf();
    Ok(PodCgroup {
        container: found,
        pod,
    })
}

/// This container's cgroup and the pod's above it, both under the host mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub container: PathBuf,
    pub pod: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PodCgroupError + '_ {
    move |source| PodCgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_cgroup2(path: &Path) -> Result<bool, PodCgroupError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| PodCgroupError::NotCgroup2(path.to_path_buf()))?;
    // SAFETY: statfs writes into the struct we own; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

fn inode(path: &Path) -> Result<u64, PodCgroupError> {
    Ok(std::fs::metadata(path).map_err(io_err(path))?.ino())
}

/// This process's cgroup directory as this process sees it: its cgroup v2 path (relative to
/// its cgroup namespace) under a cgroup2 mount whose root holds it. The host's tree mounted
/// into the container does not qualify: seen from the container's namespace its root lies
/// above the namespace's (`/..`).
fn own_cgroup_dir() -> Result<PathBuf, PodCgroupError> {
    let proc_path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(proc_path).map_err(io_err(proc_path))?;
    let own = cgroup2_path(&text).ok_or(PodCgroupError::NoCgroup2Line)?;
    let info_path = Path::new("/proc/self/mountinfo");
    let mountinfo = std::fs::read_to_string(info_path).map_err(io_err(info_path))?;
    own_dir_in(&mountinfo, own).ok_or(PodCgroupError::NoOwnMount)
}

/// Where `own` (a cgroup path relative to this namespace) appears in the mounts of
/// `mountinfo`: under the cgroup2 mount whose root is the longest prefix of it.
fn own_dir_in(mountinfo: &str, own: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = left.split_whitespace().skip(3);
            let (root, mount_point) = (unescape(f.next()?), unescape(f.next()?));
            if root.starts_with("/..") {
                return None;
            }
            let rest = if root == "/" {
                own
            } else {
                own.strip_prefix(root.as_str())
                    .filter(|r| r.is_empty() || r.starts_with('/'))?
            };
            Some((
                root.len(),
                PathBuf::from(mount_point).join(rest.trim_start_matches('/')),
            ))
        })
        .max_by_key(|(root_len, _)| *root_len)
        .map(|(_, dir)| dir)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The v2 entry of `/proc/PID/cgroup` (`0::/path`).
fn cgroup2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The directory under `root` whose inode is `ino`, breadth first and bounded.
fn find_by_inode(root: &Path, ino: u64) -> Option<PathBuf> {
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    let mut seen = 0usize;
    while let Some((dir, depth)) = queue.pop_front() {
        seen += 1;
        if seen > MAX_DIRS {
            return None;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if meta.ino() == ino {
            return Some(dir);
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back((e.path(), depth + 1));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_line_is_read_whatever_comes_before_it() {
        let hybrid = "12:memory:/x\n1:name=systemd:/y\n0::/kubepods/pod1/ctr\n";
        assert_eq!(cgroup2_path(hybrid), Some("/kubepods/pod1/ctr"));
        assert_eq!(cgroup2_path("0::/\n"), Some("/"));
        assert_eq!(cgroup2_path("5:cpu:/a\n"), None);
    }

    #[test]
    fn the_own_mount_is_the_one_rooted_in_this_namespace_not_the_hosts() {
        let sidecar = "72 49 0:38 /../.. /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw\n\
                       63 53 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 none rw\n\
                       64 53 0:39 / /sys/fs/bpf rw - bpf bpf rw\n";
        assert_eq!(
            own_dir_in(sidecar, "/"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A host without a cgroup namespace: the process's path under the root mount.
        let host = "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_dir_in(host, "/system.slice/guard.service"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/guard.service"
            ))
        );
        // A mount of a sub-tree holds only what is under its root.
        let sub = "40 25 0:26 /kubepods/pod1 /cg\\040x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_dir_in(sub, "/kubepods/pod1/ctr"),
            Some(PathBuf::from("/cg x/ctr"))
        );
        assert_eq!(own_dir_in(sub, "/kubepods/pod10"), None);
        assert_eq!(own_dir_in("", "/"), None);
    }

    #[test]
    fn a_directory_is_found_by_its_inode_and_a_missing_one_is_not() {
        let root = std::env::temp_dir().join(format!("gd-podcg-unit-{}", std::process::id()));
        let deep = root.join("pod").join("ctr");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        let ino = std::fs::metadata(&deep).unwrap().ino();
        let found = find_by_inode(&root, ino);
        let missing = find_by_inode(&root, u64::MAX);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, Some(deep));
        assert_eq!(missing, None);
    }

    #[test]
    fn a_folder_that_is_not_cgroup2_is_refused_with_what_to_mount() {
        let err = pod_cgroup(Path::new("/proc")).unwrap_err();
        assert!(matches!(err, PodCgroupError::NotCgroup2(_)), "{err}");
        assert!(err.to_string().contains("hostPath"), "{err}");
    }
}
