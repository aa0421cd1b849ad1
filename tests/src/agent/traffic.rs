//! Traffic toward an agent's protected port, and settling helpers for its tests.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::Netns;
use crate::process::ChildGuard;

/// A TCP listener inside a namespace that accepts and closes connections on a thread until
/// dropped, so a connect succeeds exactly when its SYN got through and the backlog never
/// fills.
pub struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn new(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        crate::wire::ensure_lab_ip(addr.ip())?;
        let listener = ns
            .run_in(|| TcpListener::bind(addr))?
            .with_context(|| format!("listen on {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections in all were accepted and every one of them is closed on
    /// the server side of `ns` (nothing but the listener and TIME-WAIT left on its port). A test
    /// that blocks a client right after connecting must wait for this: the server's FIN would
    /// otherwise go out after the block, and each retransmission of it draws an ACK from the
    /// client that the block drops and counts.
    pub fn wait_closed(&self, ns: &Netns, n: u32) -> Result<()> {
        let port = self.addr.port();
        wait_for(
            "accepted connections to close",
            Duration::from_secs(15),
            || {
                if self.accepted() < n {
                    return Ok(None);
                }
                let filter = format!("( sport = :{port} )");
                let open = ns.exec(&["ss", "-Htan", "state", "all", &filter])?;
                let busy = open
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    // TIME-WAIT: both FINs were acknowledged; nothing more comes from the client.
                    .any(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"));
                Ok((!busy).then_some(()))
            },
        )
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends exactly `count` TCP SYNs with hping3 from `ns`'s own address to `dst:port`, `rate`
/// per second, and waits for it to finish; returns how many hping3 says it sent. Bounded by the
/// count and by a timeout of the nominal duration plus slack: unlike `hping3_syn_flood`, whose
/// timeout is the nominal duration itself, a late start cannot cut off the last SYNs, so a
/// test can count every one of them.
pub fn hping3_syns(ns: &Netns, dst: IpAddr, port: u16, count: u32, rate: u32) -> Result<u64> {
    crate::wire::ensure_lab_ip(dst)?;
    ensure!(dst.is_ipv4(), "hping3 has no IPv6 support: {dst}");
    ensure!(port != 0, "port 0 is not a target");
    ensure!(
        (1..=100_000).contains(&count) && (1..=100_000).contains(&rate),
        "count {count} and rate {rate}/s must be 1..=100000"
    );
    let secs = count.div_ceil(rate) + 5;
    let mut cmd = ns.command("timeout");
    cmd.args(["-s", "INT", "-k", "2", &secs.to_string()])
        .args(["hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-i", &format!("u{}", 1_000_000 / rate)])
        .args(["-c", &count.to_string(), &dst.to_string()]);
    let done = ChildGuard::spawn("hping3", &mut cmd)?
        .wait_timeout(Duration::from_secs(u64::from(secs) + 5))?;
    // hping3 exits 1 when nothing answered, which is the point when SYNs are dropped: its
    // statistics line is what tells whether it ran.
    let output = format!("{}{}", done.stdout, done.stderr);
    crate::tools::parse_hping3_sent(&output)
        .with_context(|| format!("hping3 reported no statistics ({}): {output}", done.status))
}

/// How many of `n` sequential TCP connects from `ns` to `to` completed, each given
/// `timeout` (a dropped SYN shows up as a timeout: the kernel's first retransmission comes
/// after 1 s, so a timeout of 1 s or less means "the first SYN was lost").
pub fn connects(ns: &Netns, to: SocketAddr, n: u32, timeout: Duration) -> Result<u32> {
    crate::wire::ensure_lab_ip(to.ip())?;
    ns.run_in(|| {
        (0..n)
            .filter(|_| TcpStream::connect_timeout(&to, timeout).is_ok())
            .count() as u32
    })
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`; `what` names the wait
/// in the error. For settling, never for asserting how long something took.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up waiting for {what} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Convenience: the unified address of an IP as the agent's prefixes print it.
pub fn host_prefix(ip: IpAddr) -> String {
    guard_common::addr::Prefix::host(ip).to_string()
}

/// A namespace with one veth pair (`eth0` ↔ `eth1`), for tests that need an interface to
/// attach to but no traffic.
pub fn solo_netns() -> Result<Netns> {
    let ns = Netns::new("agt")?;
    ns.ip(&[
        "link",
        "add",
        crate::lab::ROLE_IF,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
    ])
    .context("add a veth pair")?;
    for dev in [crate::lab::ROLE_IF, "eth1"] {
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(ns)
}

/// Sends exactly `count` SYNs from the lab attacker's own address to the server's `port` at
/// `rate` per second; an error unless hping3 reports every one sent.
pub fn send_syns(lab: &crate::Lab, port: u16, count: u32, rate: u32) -> Result<u64> {
    let sent = hping3_syns(
        &lab.attacker,
        crate::lab::SERVER_V4.into(),
        port,
        count,
        rate,
    )?;
    ensure!(sent == u64::from(count), "hping3 sent {sent} of {count}");
    Ok(sent)
}

/// Waits until `read()` reaches at least `target`, then lets stragglers arrive and returns the
/// final value. Settling only: the caller asserts on the count.
pub fn settle(what: &str, target: u64, mut read: impl FnMut() -> u64) -> u64 {
    let _ = wait_for(what, Duration::from_secs(15), || {
        Ok((read() >= target).then_some(()))
    });
    std::thread::sleep(Duration::from_millis(500));
    read()
}
