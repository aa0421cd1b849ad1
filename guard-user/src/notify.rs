//! systemd's readiness protocol (`sd_notify`), written by hand: one datagram of `KEY=VALUE`
//! lines to the socket named by `$NOTIFY_SOCKET`. With `Type=notify`, systemd holds back
//! units ordered after guard (the warp app) until `READY=1`, so the app's first reports find
//! the control socket listening and the program attached.
//!
//! Without `$NOTIFY_SOCKET` (a terminal, a container, `Type=simple`) every call is a no-op.
//! A path starting with `@` names a Linux abstract socket, as systemd documents.
//!
//! Not the `sd-notify` crate: it finds `$NOTIFY_SOCKET` again at every send, so a wrong one
//! shows only at `READY=1` instead of at start, and ends every line with a newline.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// The variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("${NOTIFY_SOCKET_ENV} is `{0}`, which is neither an absolute path nor an @abstract name; unset it or fix the unit")]
    BadAddress(String),
    #[error("cannot reach the notify socket `{addr}` named by ${NOTIFY_SOCKET_ENV}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where `$NOTIFY_SOCKET` points, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    Path(std::path::PathBuf),
    /// The name without its leading `@` (the kernel's leading NUL is added when sending).
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    pub fn parse(text: &str) -> Result<Self, NotifyError> {
        if let Some(name) = text.strip_prefix('@') {
            if name.is_empty() {
                return Err(NotifyError::BadAddress(text.to_string()));
            }
            return Ok(Self::Abstract(name.as_bytes().to_vec()));
        }
        if Path::new(text).is_absolute() {
            return Ok(Self::Path(text.into()));
        }
        Err(NotifyError::BadAddress(text.to_string()))
    }

    fn socket_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Path(p) => SocketAddr::from_pathname(p),
            Self::Abstract(name) => SocketAddr::from_abstract_name(name),
        }
    }
}

/// A connected notifier, or none when the service manager did not ask for notifications.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(String, UnixDatagram)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; unset or empty means "nobody listens" (no-op notifier).
    pub fn from_env() -> Result<Self, NotifyError> {
        match std::env::var(NOTIFY_SOCKET_ENV) {
            Ok(text) if !text.is_empty() => Self::connect(&text),
            _ => Ok(Self::disabled()),
        }
    }

    pub fn disabled() -> Self {
        Self { target: None }
    }

    /// A notifier for the socket `text` (a path or an `@abstract` name). Connecting now
    /// surfaces a wrong address at start instead of at the first notification.
    pub fn connect(text: &str) -> Result<Self, NotifyError> {
        let addr = NotifyAddr::parse(text)?;
        let unreachable = |source| NotifyError::Unreachable {
            addr: text.to_string(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(unreachable)?;
        let sa = addr.socket_addr().map_err(unreachable)?;
        sock.connect_addr(&sa).map_err(unreachable)?;
        Ok(Self {
            target: Some((text.to_string(), sock)),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (newline-separated `KEY=VALUE` lines).
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let Some((addr, sock)) = &self.target else {
            return Ok(());
        };
        sock.send(state.as_bytes())
            .map(drop)
            .map_err(|source| NotifyError::Unreachable {
                addr: addr.clone(),
                source,
            })
    }

    /// The program is attached and the control socket listens.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// A SIGHUP reload starts; systemd (>= 253) wants the monotonic clock with it to tell this
    /// reload from an earlier one. `ready` ends it.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()))
    }

    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }
}

/// A STATUS= value must not contain a newline: it would start a new assignment.
fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on
    // Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_abstract_names_and_refuses_the_rest() {
        assert_eq!(
            NotifyAddr::parse("/run/systemd/notify").unwrap(),
            NotifyAddr::Path("/run/systemd/notify".into())
        );
        assert_eq!(
            NotifyAddr::parse("@guard/notify").unwrap(),
            NotifyAddr::Abstract(b"guard/notify".to_vec())
        );
        for bad in ["relative/sock", "@", "notify"] {
            assert!(
                matches!(NotifyAddr::parse(bad), Err(NotifyError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    }

    #[test]
    fn sends_the_protocol_lines_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("guard-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.ready("attached to eth0\nsecond line").unwrap();
        assert_eq!(
            recv(&server),
            "READY=1\nSTATUS=attached to eth0 second line"
        );
        n.reloading().unwrap();
        let msg = recv(&server);
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{msg:?}"))
            .parse()
            .unwrap();
        assert!(usec > 0);
        n.stopping().unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reaches_an_abstract_socket() {
        let name = format!("guard-notify-test-{}", std::process::id());
        let sa = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&sa).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        Notifier::connect(&format!("@{name}"))
            .unwrap()
            .stopping()
            .unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_and_no_socket_is_a_no_op() {
        let err = Notifier::connect("/nonexistent/guard/notify.sock").unwrap_err();
        assert!(matches!(err, NotifyError::Unreachable { .. }), "{err}");
        let off = Notifier::disabled();
        assert!(!off.is_enabled());
        off.ready("x").unwrap();
    }
}
