//! `probe`: sequential connects that count the SYNs the network lost.

use std::time::{Duration, Instant};

use anyhow::Result;
use guard_tests::report::ProbeReport;
use guard_tests::wire::ensure_lab_ip;
use tokio::time::MissedTickBehavior;

use crate::cli::ProbeArgs;
use crate::net::{
    connect, percentile, socket_for, total_retrans, until_stopped, ConnectError, ErrorLog, Stop,
};

pub(crate) async fn probe(a: ProbeArgs, stop: &Stop) -> Result<ProbeReport> {
    ensure_lab_ip(a.target.ip())?;
    // Fail on a bad --bind before counting anything.
    socket_for(a.src.bind, a.target)?;
    let limit = Duration::from_millis(a.connect_timeout_ms);
    let mut r = ProbeReport {
        cmd: "probe".into(),
        ..Default::default()
    };
    let errors = ErrorLog::new();
    let mut times = Vec::new();
    if !until_stopped(
        stop,
        tokio::time::sleep(Duration::from_millis(a.start_delay_ms)),
    )
    .await
    {
        return Ok(r);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(a.interval_ms));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for _ in 0..a.count {
        if !until_stopped(stop, tick.tick()).await {
            break;
        }
        let t0 = Instant::now();
        let attempt = tokio::select! {
            res = connect(a.src.bind, a.target, limit) => res?,
            _ = stop.wait() => break,
        };
        r.attempted += 1;
        match attempt {
            Ok(stream) => {
                times.push(t0.elapsed().as_secs_f64() * 1000.0);
                r.connected += 1;
                if total_retrans(&stream)? > 0 {
                    r.retransmitted += 1;
                }
            }
            Err(ConnectError::TimedOut) => r.timed_out += 1,
            Err(ConnectError::Refused) => {
                errors.note("connect", &"connection refused");
                r.failed += 1;
            }
            Err(ConnectError::Other(e)) => {
                errors.note("connect", &e);
                r.failed += 1;
            }
        }
    }
    r.lost_syn = r.retransmitted + r.failed + r.timed_out;
    times.sort_by(f64::total_cmp);
    r.connect_ms_p50 = percentile(&times, 0.50);
    r.connect_ms_p99 = percentile(&times, 0.99);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::cli::Source;
    use crate::net::testing::{block_on, loopback_listener};

    /// A short probe of `target` from the kernel's choice of source, with no start delay.
    fn probe_of(target: SocketAddr, count: u64) -> ProbeArgs {
        ProbeArgs {
            target,
            src: Source { bind: None },
            count,
            interval_ms: 1,
            connect_timeout_ms: 3000,
            secs: 30,
            start_delay_ms: 0,
        }
    }

    /// Loopback end-to-end: the probe path, no privileges needed.
    #[test]
    fn probe_against_a_loopback_listener() {
        block_on(async {
            let addr = loopback_listener().await;
            let stop = Stop::after(30);
            let started = Instant::now();
            let from_loopback = ProbeArgs {
                src: Source {
                    bind: Some("127.0.0.1".parse().unwrap()),
                },
                start_delay_ms: 200,
                ..probe_of(addr, 5)
            };
            let p = probe(from_loopback, &stop).await.unwrap();
            assert_eq!((p.attempted, p.connected, p.lost_syn), (5, 5, 0));
            // A lower bound only: a sleep never ends early, however busy the machine.
            assert!(started.elapsed() >= Duration::from_millis(200));
            // A port nobody listens on: refused, counted, not an error of the run.
            let closed = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            };
            let p = probe(probe_of(closed, 2), &stop).await.unwrap();
            assert_eq!((p.failed, p.lost_syn), (2, 2));
            // Outside the lab: refused before any packet.
            let outside = ProbeArgs {
                connect_timeout_ms: 10,
                secs: 1,
                ..probe_of("10.1.2.3:80".parse().unwrap(), 1)
            };
            let err = probe(outside, &stop).await.unwrap_err();
            assert!(err.to_string().contains("outside the lab"), "{err}");
        });
    }
}
