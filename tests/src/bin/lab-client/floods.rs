//! Floods and storms: many real TCP handshakes, raw SYNs at a fixed pace, and storms of
//! WebSocket handshakes or SSE subscriptions from one source.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::stream::StreamExt;
use guard_tests::paced_syn::{self, SynSpec};
use guard_tests::report::{ConnFloodReport, StormReport};
use guard_tests::wire::ensure_lab_ip;
use tokio::time::{sleep, timeout};

use crate::cli::{ConnFloodArgs, StormArgs, SynFloodArgs};
use crate::net::{
    connect, lab_url, socket_for, until_stopped, ConnectError, ErrorLog, HandshakeError, Stop,
};
use crate::sse::http_get;
use crate::ws::ws_connect;

/// Set by SIGINT: the synchronous sender stops and still reports.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The paced sender spins rather than awaits, so it runs outside the runtime.
pub(crate) fn syn_flood(a: SynFloodArgs) -> Result<String> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let spec = SynSpec {
        src_net: a.src_net,
        dst: a.dst,
        src_mac: a.src_mac,
        dst_mac: a.dst_mac,
        port: a.port,
    };
    let report = paced_syn::send(&a.iface, &spec, a.rate, a.secs, &INTERRUPTED)?;
    serde_json::to_string(&report).context("cannot encode the report")
}

pub(crate) async fn conn_flood(a: ConnFloodArgs, stop: &Stop) -> Result<ConnFloodReport> {
    ensure_lab_ip(a.target.ip())?;
    socket_for(a.src.bind, a.target)?;
    let limit = Duration::from_millis(a.connect_timeout_ms);
    let hold = Duration::from_millis(a.hold_ms);
    let r = RefCell::new(ConnFloodReport {
        cmd: "conn-flood".into(),
        ..Default::default()
    });
    let errors = ErrorLog::new();
    let one = || async {
        match connect(a.src.bind, a.target, limit).await {
            Ok(Ok(stream)) => {
                r.borrow_mut().connected += 1;
                sleep(hold).await;
                drop(stream);
            }
            Ok(Err(ConnectError::TimedOut)) => r.borrow_mut().timed_out += 1,
            Ok(Err(ConnectError::Refused)) => r.borrow_mut().refused += 1,
            Ok(Err(ConnectError::Other(e))) => {
                errors.note("connect", &e);
                r.borrow_mut().failed += 1;
            }
            Err(e) => {
                errors.note("socket", &format!("{e:#}"));
                r.borrow_mut().failed += 1;
            }
        }
    };
    let done = concurrently(a.count, a.parallel, stop, one).await;
    let mut r = r.into_inner();
    (r.attempted, r.unfinished, r.not_started) =
        (done.attempted, done.unfinished, done.not_started);
    Ok(r)
}

/// How far a run of attempts got.
struct Progress {
    attempted: u64,
    /// Started but cut off by `--secs` or SIGINT.
    unfinished: u64,
    /// Never started because time ran out.
    not_started: u64,
}

/// Runs `one` attempt after another, `parallel` at once, until `count` are done or the run
/// ends.
async fn concurrently<F, Fut>(count: u64, parallel: u64, stop: &Stop, one: F) -> Progress
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let attempted = Cell::new(0u64);
    let in_flight = Cell::new(0u64);
    let each = |_| async {
        attempted.set(attempted.get() + 1);
        in_flight.set(in_flight.get() + 1);
        one().await;
        in_flight.set(in_flight.get() - 1);
    };
    let work = futures_util::stream::iter(0..count).for_each_concurrent(parallel as usize, each);
    until_stopped(stop, work).await;
    Progress {
        attempted: attempted.get(),
        unfinished: in_flight.get(),
        not_started: count - attempted.get(),
    }
}

#[derive(Clone, Copy)]
pub(crate) enum StormKind {
    Ws,
    Sse,
}

pub(crate) async fn storm(a: StormArgs, kind: StormKind, stop: &Stop) -> Result<StormReport> {
    let (cmd, scheme) = match kind {
        StormKind::Ws => ("ws-storm", "ws"),
        StormKind::Sse => ("sse-storm", "http"),
    };
    let target = lab_url(&a.url, scheme, a.src.bind)?;
    let limit = Duration::from_millis(a.timeout_ms);
    let hold = Duration::from_millis(a.hold_ms);
    let r = RefCell::new(StormReport {
        cmd: cmd.into(),
        ..Default::default()
    });
    let errors = ErrorLog::new();
    let one = || async {
        let outcome = match kind {
            StormKind::Ws => match ws_connect(a.src.bind, &target, limit).await {
                Ok(Ok(mut ws)) => {
                    r.borrow_mut().accepted += 1;
                    sleep(hold).await;
                    let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(e) => Some(HandshakeError::Failed(format!("{e:#}"))),
            },
            StormKind::Sse => match http_get(a.src.bind, &target, "text/event-stream", limit).await
            {
                Ok(Ok((stream, head, _))) if head.status == 200 => {
                    r.borrow_mut().accepted += 1;
                    sleep(hold).await;
                    drop(stream);
                    None
                }
                Ok(Ok((_, head, _))) => Some(HandshakeError::Status(head.status)),
                Ok(Err(e)) => Some(e),
                Err(e) => Some(HandshakeError::Failed(format!("{e:#}"))),
            },
        };
        let mut r = r.borrow_mut();
        match outcome {
            None => {}
            Some(HandshakeError::Status(429)) => r.rejected_429 += 1,
            Some(HandshakeError::Status(503)) => r.rejected_503 += 1,
            Some(HandshakeError::Status(s)) => *r.other_status.entry(s).or_default() += 1,
            Some(HandshakeError::TimedOut) => r.timed_out += 1,
            Some(HandshakeError::Failed(e)) => {
                errors.note(cmd, &e);
                r.failed += 1;
            }
        }
    };
    let done = concurrently(a.count, a.parallel, stop, one).await;
    let mut r = r.into_inner();
    (r.attempted, r.unfinished, r.not_started) =
        (done.attempted, done.unfinished, done.not_started);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Source;
    use crate::net::testing::{block_on, loopback_listener};

    #[test]
    fn concurrently_counts_what_the_end_of_the_run_cut_off() {
        block_on(async {
            let stop = Stop::after(1);
            let done = concurrently(10, 3, &stop, || async {}).await;
            assert_eq!(
                (done.attempted, done.unfinished, done.not_started),
                (10, 0, 0)
            );
            let stuck = concurrently(10, 3, &stop, std::future::pending::<()>).await;
            assert_eq!(
                (stuck.attempted, stuck.unfinished, stuck.not_started),
                (3, 3, 7)
            );
        });
    }

    /// Loopback end-to-end: the connection flood, no privileges needed.
    #[test]
    fn conn_flood_against_a_loopback_listener() {
        block_on(async {
            let addr = loopback_listener().await;
            let stop = Stop::after(30);
            let f = conn_flood(
                ConnFloodArgs {
                    target: addr,
                    src: Source { bind: None },
                    count: 50,
                    parallel: 10,
                    secs: 30,
                    hold_ms: 1,
                    connect_timeout_ms: 3000,
                },
                &stop,
            )
            .await
            .unwrap();
            assert_eq!((f.attempted, f.connected, f.not_started), (50, 50, 0));
        });
    }
}
