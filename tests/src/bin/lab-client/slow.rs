//! Slow request heads from many sources: each source holds one connection whose request head
//! never ends (one more header line every interval), and opens a new one whenever the server
//! closes it. No per-source cap sees this; only a server that bounds how long a head may take
//! and how many unfinished heads it keeps does.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{ensure, Result};
use guard_tests::report::SlowHeadsReport;
use guard_tests::wire::ensure_lab_ip;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::sleep;

use crate::cli::SlowHeadsArgs;
use crate::net::{connect, socket_for, until_stopped, ConnectError, ErrorLog, Stop};

/// The `n`th host address of `net` (n = 0 is the first after the network address).
fn nth_source((base, len): (Ipv4Addr, u8), n: u64) -> Option<Ipv4Addr> {
    let hosts = (1u64 << (32 - u32::from(len))).saturating_sub(2);
    if n >= hosts {
        return None;
    }
    let first = u32::from(base) & (u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0));
    Some(Ipv4Addr::from(first + 1 + n as u32))
}

/// Counters every source task shares (the runtime is single-threaded).
#[derive(Default)]
struct Tally {
    connects: Cell<u64>,
    connected: Cell<u64>,
    refused: Cell<u64>,
    timed_out: Cell<u64>,
    failed: Cell<u64>,
    closed_by_server: Cell<u64>,
    open: Cell<u64>,
    peak_open: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

impl Tally {
    fn opened(&self) {
        bump(&self.connected);
        bump(&self.open);
        self.peak_open
            .set(self.peak_open.get().max(self.open.get()));
    }

    fn closed(&self) {
        self.open.set(self.open.get() - 1);
    }
}

pub(crate) async fn slow_heads(a: SlowHeadsArgs, stop: &Stop) -> Result<SlowHeadsReport> {
    ensure_lab_ip(a.target.ip())?;
    ensure!(
        a.target.is_ipv4(),
        "slow-heads sends from IPv4 sources: give an IPv4 target"
    );
    let last = nth_source(a.src_net, a.sources - 1);
    ensure!(
        last.is_some(),
        "{}/{} has fewer than {} host addresses",
        a.src_net.0,
        a.src_net.1,
        a.sources
    );
    for n in [0, a.sources - 1] {
        let ip = nth_source(a.src_net, n).map(IpAddr::V4);
        ensure_lab_ip(ip.expect("checked above"))?;
        // A source the namespace does not own fails here, before anything is counted.
        socket_for(ip, a.target)?;
    }
    let tally = Tally::default();
    let errors = ErrorLog::new();
    let limit = Duration::from_millis(a.connect_timeout_ms);
    let interval = Duration::from_millis(a.interval_ms);
    let reconnect = Duration::from_millis(a.reconnect_ms);
    let ramp_step = Duration::from_millis(a.ramp_ms) / u32::try_from(a.sources).unwrap_or(u32::MAX);

    let one_source = |n: u64| {
        let (tally, errors) = (&tally, &errors);
        let src = nth_source(a.src_net, n).map(IpAddr::V4);
        async move {
            if !stop.pause(ramp_step * n as u32).await {
                return;
            }
            loop {
                bump(&tally.connects);
                match connect(src, a.target, limit).await {
                    Ok(Ok(stream)) => {
                        tally.opened();
                        hold_slowly(stream, interval).await;
                        tally.closed();
                        bump(&tally.closed_by_server);
                    }
                    Ok(Err(ConnectError::TimedOut)) => bump(&tally.timed_out),
                    Ok(Err(ConnectError::Refused)) => bump(&tally.refused),
                    Ok(Err(ConnectError::Other(e))) => {
                        errors.note("connect", &e);
                        bump(&tally.failed);
                    }
                    Err(e) => {
                        errors.note("socket", &format!("{e:#}"));
                        bump(&tally.failed);
                    }
                }
                if !stop.pause(reconnect).await {
                    return;
                }
            }
        }
    };
    let all = futures_util::future::join_all((0..a.sources).map(one_source));
    until_stopped(stop, all).await;
    Ok(SlowHeadsReport {
        cmd: "slow-heads".into(),
        sources: a.sources,
        connects: tally.connects.get(),
        connected: tally.connected.get(),
        refused: tally.refused.get(),
        timed_out: tally.timed_out.get(),
        failed: tally.failed.get(),
        closed_by_server: tally.closed_by_server.get(),
        peak_open: tally.peak_open.get(),
        open_at_end: tally.open.get(),
        elapsed_ms: 0,
    })
}

/// Starts a request head and adds a header line every `interval` until the server closes the
/// connection (or answers: a server that replies to an unfinished head has given up on it).
/// The run's end drops the future, and the socket with it.
async fn hold_slowly(mut stream: TcpStream, interval: Duration) {
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nUser-Agent: slow-heads\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 512];
    for line in 0u64.. {
        tokio::select! {
            // EOF, a reset or any answer: the server is done with this head.
            _ = stream.read(&mut buf) => return,
            _ = sleep(interval) => {}
        }
        let header = format!("X-Slow-{line}: 1\r\n");
        if stream.write_all(header.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_the_host_addresses_in_order() {
        let net = (Ipv4Addr::new(198, 19, 64, 0), 22);
        assert_eq!(nth_source(net, 0), Some(Ipv4Addr::new(198, 19, 64, 1)));
        assert_eq!(nth_source(net, 255), Some(Ipv4Addr::new(198, 19, 65, 0)));
        assert_eq!(nth_source(net, 1021), Some(Ipv4Addr::new(198, 19, 67, 254)));
        // The broadcast address is not a source.
        assert_eq!(nth_source(net, 1022), None);
        // A base that is not the network address still counts from the network.
        assert_eq!(
            nth_source((Ipv4Addr::new(198, 19, 64, 9), 24), 0),
            Some(Ipv4Addr::new(198, 19, 64, 1))
        );
        assert_eq!(nth_source((Ipv4Addr::new(198, 19, 64, 9), 32), 0), None);
    }
}
