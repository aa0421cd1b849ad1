//! What every workload shares: the end of a run, sockets from a `--bind` source, connect
//! outcomes to count, TCP_INFO, bounded error logging and percentiles.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use guard_tests::wire::{parse_target_url, Target};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout};

/// The end of a run: `--secs` elapsed or SIGINT (ChildGuard stops us that way and still wants
/// the report).
#[derive(Clone)]
pub(crate) struct Stop {
    deadline: tokio::time::Instant,
    signalled: watch::Receiver<bool>,
}

impl Stop {
    pub(crate) fn after(secs: u64) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(true);
            }
            // Keep the sender alive: a dropped sender must not read as "stop now".
            std::future::pending::<()>().await;
        });
        Self {
            deadline: tokio::time::Instant::now() + Duration::from_secs(secs),
            signalled: rx,
        }
    }

    fn is_over(&self) -> bool {
        tokio::time::Instant::now() >= self.deadline || *self.signalled.borrow()
    }

    pub(crate) async fn wait(&self) {
        let mut rx = self.signalled.clone();
        tokio::select! {
            _ = sleep_until(self.deadline) => {}
            _ = rx.wait_for(|s| *s) => {}
        }
    }

    /// Sleeps `d` unless the run ends first; returns false if it ended.
    pub(crate) async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = sleep(d) => !self.is_over(),
            _ = self.wait() => false,
        }
    }
}

/// Runs `work` until it finishes or the run ends; returns whether it finished.
pub(crate) async fn until_stopped<F: Future>(stop: &Stop, work: F) -> bool {
    tokio::select! {
        _ = work => true,
        _ = stop.wait() => false,
    }
}

/// The lab target `url` names (in `scheme`), once a socket from `bind` can be made for it: a
/// bad `--bind` fails the run before anything is counted.
pub(crate) fn lab_url(url: &str, scheme: &str, bind: Option<IpAddr>) -> Result<Target> {
    let target = parse_target_url(url, &[scheme])?;
    socket_for(bind, target.addr)?;
    Ok(target)
}

/// Runs clients `0..n` at once until every one has ended; the first error of the run fails it.
pub(crate) async fn all_clients<F, Fut>(n: u64, client: F) -> Result<()>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let results = futures_util::future::join_all((0..n).map(client)).await;
    results.into_iter().collect()
}

/// A TCP socket of the target's family, bound to `bind` if given.
pub(crate) fn socket_for(bind: Option<IpAddr>, target: SocketAddr) -> Result<TcpSocket> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a TCP socket")?;
    if let Some(ip) = bind {
        ensure!(
            ip.is_ipv4() == target.is_ipv4(),
            "--bind {ip} and target {target} are of different IP families"
        );
        // Defer the port choice to connect(): with a plain bind(ip:0) every socket would
        // reserve a port for all destinations, and a flood would run out after ~28k.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a local c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("setsockopt IP_BIND_ADDRESS_NO_PORT");
        }
        sock.bind(SocketAddr::new(ip, 0)).with_context(|| {
            format!("cannot bind to {ip}: is it an address of this network namespace?")
        })?;
    }
    Ok(sock)
}

pub(crate) enum ConnectError {
    TimedOut,
    Refused,
    Other(io::Error),
}

/// One connect attempt. Socket setup problems are errors of the run (bad `--bind`); what the
/// network does to the attempt is a `ConnectError` to count.
pub(crate) async fn connect(
    bind: Option<IpAddr>,
    target: SocketAddr,
    limit: Duration,
) -> Result<std::result::Result<TcpStream, ConnectError>> {
    let sock = socket_for(bind, target)?;
    Ok(match timeout(limit, sock.connect(target)).await {
        Err(_) => Err(ConnectError::TimedOut),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ConnectError::Refused),
        Ok(Err(e)) => Err(ConnectError::Other(e)),
    })
}

pub(crate) enum HandshakeError {
    Status(u16),
    TimedOut,
    Failed(String),
}

/// A handshake starts with a connect; how that failed is how the handshake did.
impl From<ConnectError> for HandshakeError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::TimedOut => Self::TimedOut,
            ConnectError::Refused => Self::Failed("connection refused".into()),
            ConnectError::Other(e) => Self::Failed(e.to_string()),
        }
    }
}

impl HandshakeError {
    /// For the legit clients, which count refusals by status and everything else as one kind
    /// of error: the refusal's status, or `None` once the error is noted as `what`.
    pub(crate) fn refusal(self, what: &str, errors: &ErrorLog) -> Option<u16> {
        match self {
            Self::Status(code) => Some(code),
            Self::TimedOut => {
                errors.note(what, &"timed out");
                None
            }
            Self::Failed(e) => {
                errors.note(what, &e);
                None
            }
        }
    }
}

/// Retransmissions so far on `stream`; right after connect these can only be SYNs.
pub(crate) fn total_retrans(stream: &TcpStream) -> Result<u32> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, writing at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getsockopt TCP_INFO");
    }
    Ok(info.tcpi_total_retrans)
}

/// Prints the first few errors of a kind to stderr: enough to diagnose, bounded under floods.
pub(crate) struct ErrorLog {
    left: Cell<u32>,
}

impl ErrorLog {
    pub(crate) fn new() -> Self {
        Self { left: Cell::new(5) }
    }

    pub(crate) fn note(&self, what: &str, err: &dyn std::fmt::Display) {
        let left = self.left.get();
        if left > 0 {
            self.left.set(left - 1);
            eprintln!("lab-client: {what}: {err}");
        }
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_connect_is_a_failed_handshake_and_only_statuses_are_refusals() {
        let timed_out = HandshakeError::from(ConnectError::TimedOut);
        assert!(matches!(timed_out, HandshakeError::TimedOut));
        let refused = HandshakeError::from(ConnectError::Refused);
        assert!(matches!(&refused, HandshakeError::Failed(e) if e == "connection refused"));
        let errors = ErrorLog::new();
        assert_eq!(
            HandshakeError::Status(429).refusal("test", &errors),
            Some(429)
        );
        assert_eq!(timed_out.refusal("test", &errors), None);
        assert_eq!(refused.refusal("test", &errors), None);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        let v = [1.0, 2.0, 3.0, 4.0, 1000.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 1000.0);
    }
}

/// What the workloads' loopback tests share: no privileges, no lab.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::net::SocketAddr;

    /// Runs `work` on the same kind of runtime `main` starts.
    pub(crate) fn block_on<F: Future>(work: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    }

    /// A loopback listener that accepts every connection and closes it at once.
    pub(crate) async fn loopback_listener() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        addr
    }
}
