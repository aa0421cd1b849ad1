//! The background task behind an [`AgentClient`](super::AgentClient):
//! connects, drains the queue one report at a time, and reconnects with
//! backoff when the agent goes away.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::backoff::{random_seed, Backoff, Outage};
use super::reporter::{ClientConfig, Shared};
use super::{ClientError, Connection};
use crate::proto::Response;

/// How a session ended.
enum SessionEnd {
    /// Every handle is gone and the queue is drained.
    Finished,
    /// The agent closed the session while nothing was in flight, as it
    /// does after its idle timeout (or when it stops).
    Idle,
    Lost(ClientError),
}

pub(super) async fn run(shared: &Shared, cfg: &ClientConfig) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max, random_seed());
    let mut outage = Outage::default();
    let path = cfg.socket_path.display();
    loop {
        if shared.handles_gone.load(Ordering::Acquire) {
            return;
        }
        let err = match Connection::connect_with_timeout(
            &cfg.socket_path,
            &cfg.client_name,
            cfg.request_timeout,
        )
        .await
        {
            Ok(conn) => {
                match outage.recovered() {
                    Some((took, attempts)) => log::info!(
                        "guard agent at {path} reachable again after {took:.1?} ({attempts} attempts); \
                         sending {} queued reports",
                        shared.queue().order.len()
                    ),
                    None => log::debug!("connected to the guard agent at {path}"),
                }
                backoff.reset();
                shared.connected.store(true, Ordering::Relaxed);
                let end = session(shared, conn).await;
                shared.connected.store(false, Ordering::Relaxed);
                match end {
                    SessionEnd::Finished => return,
                    SessionEnd::Idle => {
                        shared.idle_closes.fetch_add(1, Ordering::Relaxed);
                        log::debug!(
                            "the guard agent at {path} closed an idle session; reconnecting \
                             with the next report"
                        );
                        // Not an outage: no backoff, no warning. Should the
                        // agent be gone, the next connect says so.
                        if !wait_for_report(shared).await {
                            return;
                        }
                        continue;
                    }
                    SessionEnd::Lost(e) => e,
                }
            }
            Err(e) => e,
        };
        if outage.failed() {
            log::warn!(
                "guard agent unavailable: {err}; block reports are queued (up to {}) and \
                 retried in the background",
                cfg.queue_capacity
            );
        } else {
            log::debug!("guard agent still unavailable: {err}");
        }
        if !sleep_unless_dropped(shared, backoff.next_delay()).await {
            return;
        }
    }
}

/// Waits until a report is queued; false if every handle went away with
/// nothing queued.
async fn wait_for_report(shared: &Shared) -> bool {
    loop {
        if !shared.queue().order.is_empty() {
            return true;
        }
        if shared.handles_gone.load(Ordering::Acquire) {
            return false;
        }
        shared.wake.notified().await;
    }
}

/// Sleeps for `delay`; false if every handle went away meanwhile. New
/// reports do not cut the sleep short, or a busy app would defeat the
/// backoff.
async fn sleep_unless_dropped(shared: &Shared, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            () = shared.wake.notified() => {
                if shared.handles_gone.load(Ordering::Acquire) {
                    return false;
                }
            }
        }
    }
}

/// Sends queued reports one at a time until the connection fails or every
/// handle is gone and the queue is empty.
async fn session(shared: &Shared, mut conn: Connection) -> SessionEnd {
    let mut warned = false;
    loop {
        let Some(p) = shared.pop() else {
            if shared.handles_gone.load(Ordering::Acquire) {
                return SessionEnd::Finished;
            }
            tokio::select! {
                () = shared.wake.notified() => continue,
                e = conn.wait_for_close() => return match e {
                    ClientError::Closed { .. } => SessionEnd::Idle,
                    e => SessionEnd::Lost(e),
                },
            }
        };
        match conn.call(p.report.to_request()).await {
            Ok(Response::BlockResult {
                outcome,
                reason_text,
                ..
            }) => {
                shared.sent.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "agent {outcome} block of {}: {reason_text}",
                    p.report.prefix
                );
            }
            Ok(other) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                return SessionEnd::Lost(ClientError::Unexpected {
                    path: conn.path().to_path_buf(),
                    got: other.name(),
                });
            }
            Err(ClientError::Agent { code, message }) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                // One warning per session: an agent that refuses this client
                // refuses every report, and the count says how many.
                if !warned {
                    warned = true;
                    log::warn!(
                        "guard agent refused a block report for {} ({code}): {message}",
                        p.report.prefix
                    );
                }
            }
            Err(e) => {
                if !shared.requeue(p) {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                }
                return SessionEnd::Lost(e);
            }
        }
    }
}
