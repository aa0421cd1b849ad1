//! Following the stream: replay on start, resume after failures, notice a consumer that
//! died with its node, apply the other hosts' decisions.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt as _;
use log::{debug, info, warn};

use super::*;

pub(super) async fn follow_loop(
    js: jetstream::Context,
    s: Arc<FleetSettings>,
    max_ttl: Duration,
    applier: Arc<dyn Applier>,
    metrics: Arc<FleetMetrics>,
) {
    let mut last_seq: u64 = 0;
    // Where the stream stood when the agent first subscribed: until it has
    // read that far, the agent is catching up, and its own decisions in
    // there are applied too (after a reboot the kernel lost them).
    let mut catch_up_until: Option<u64> = None;
    let mut failures: u32 = 0;
    let filter = s.all_subjects();
    loop {
        let stream = match ensure_stream(&js, &s, max_ttl).await {
            Ok(st) => st,
            Err(e) => {
                if failures == 0 {
                    warn!("{e:#}; retrying");
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        if catch_up_until.is_none() {
            let state = &stream.cached_info().state;
            let tail = state.last_sequence;
            catch_up_until = Some(tail);
            // Nothing left to replay (an empty stream, or every message expired).
            if state.messages == 0 {
                metrics.caught_up.set(1);
            }
        }
        let deliver_policy = if last_seq == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: last_seq + 1,
            }
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy,
                // The client's idle heartbeat is half the pull expiry, capped at 15 s, and it
                // recreates the consumer after two missed ones: with the defaults a consumer
                // on a NATS node that died goes unnoticed for 30 s. Short pulls notice in ~3 s.
                max_expires: FOLLOW_PULL_EXPIRY,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    warn!("fleet: follow the stream: {e}; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                    failures = failures.saturating_add(1);
                    continue;
                }
            },
            Err(e) => {
                if failures == 0 {
                    warn!("fleet: create a consumer on {}: {e}; retrying", s.stream);
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        failures = 0;
        let mut watchdog = tokio::time::interval(STALL_CHECK);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watchdog.tick().await;
        let mut check = StallCheck::default();
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = watchdog.tick() => {
                    let stall = stalled(&stream, &filter, last_seq, &mut check).await;
                    // The stream's tail message may have expired before it was read.
                    if catch_up_until.is_some_and(|t| check.settled_at >= t) {
                        metrics.caught_up.set(1);
                    }
                    if stall {
                        warn!(
                            "fleet: the stream is past sequence {last_seq} but nothing arrives; \
                             following again from there"
                        );
                        metrics.follower_restarts.inc();
                        break;
                    }
                    continue;
                }
            };
            let Some(next) = next else { break };
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    warn!("fleet: reading the stream failed ({e}); resuming after sequence {last_seq}");
                    metrics.follower_restarts.inc();
                    break;
                }
            };
            let Ok(info) = msg.info() else {
                metrics.dropped.with_label_values(&["malformed"]).inc();
                continue;
            };
            let seq = info.stream_sequence;
            if seq <= last_seq {
                continue;
            }
            last_seq = seq;
            metrics.stream_sequence.set(seq as i64);
            let catching_up = catch_up_until.is_some_and(|t| seq <= t);
            handle_batch(&s.host, &msg.payload, catching_up, &*applier, &metrics);
            // At or past where the stream stood (its tail may have expired unread).
            if metrics.caught_up.get() == 0 && catch_up_until.is_some_and(|t| seq >= t) {
                metrics.caught_up.set(1);
                info!("fleet: caught up with the stream (sequence {seq})");
            }
        }
    }
}

/// How often the follower compares the stream's last sequence with its own.
pub(super) const STALL_CHECK: Duration = Duration::from_secs(2);

/// What the follower's watchdog remembers between two checks.
#[derive(Default)]
pub(super) struct StallCheck {
    /// The follower's sequence when the last check found the stream ahead of it.
    behind_at: Option<u64>,
    /// The stream's last sequence when nothing after the follower was left in it (every
    /// message past it expired by its TTL): being "behind" that is not a stall.
    settled_at: u64,
}

/// Whether the follower has made no progress for a whole check while the stream holds
/// messages it has not read. The client library only notices a consumer that died with its
/// NATS node after missed heartbeats and retries, and a pull that times out can keep it
/// waiting for a minute; the stream says at once that something is owed. A failed request
/// (a stream leader election) proves nothing either way.
pub(super) async fn stalled(
    stream: &jetstream::stream::Stream,
    filter: &str,
    last_seq: u64,
    check: &mut StallCheck,
) -> bool {
    let Ok(Ok(info)) = tokio::time::timeout(STALL_CHECK, stream.get_info()).await else {
        return false;
    };
    let tail = info.state.last_sequence;
    if tail <= last_seq || tail <= check.settled_at {
        check.behind_at = None;
        return false;
    }
    // Behind now: stalled only if it was already behind at the same place last time.
    if check.behind_at.replace(last_seq) != Some(last_seq) {
        return false;
    }
    let next = stream
        .raw_message_builder()
        .sequence(last_seq + 1)
        .next_by_subject(filter)
        .send();
    match tokio::time::timeout(STALL_CHECK, next).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            check.settled_at = tail;
            check.behind_at = None;
            false
        }
        _ => false,
    }
}

/// Applies one message's decisions. Public for the unit tests.
pub fn handle_batch(
    own_host: &str,
    payload: &[u8],
    catching_up: bool,
    applier: &dyn Applier,
    metrics: &FleetMetrics,
) {
    let batch: Batch = match serde_json::from_slice(payload) {
        Ok(b) => b,
        Err(e) => {
            metrics.dropped.with_label_values(&["malformed"]).inc();
            debug!("fleet: a message that is not a decision batch: {e}");
            return;
        }
    };
    if batch.v != WIRE_VERSION {
        metrics
            .dropped
            .with_label_values(&["unknown_version"])
            .inc_by(batch.decisions.len().max(1) as u64);
        return;
    }
    // A host's own decisions echo back: they are in its kernel already.
    if batch.host == own_host && !catching_up {
        return;
    }
    for d in &batch.decisions {
        metrics.received.inc();
        match applier.apply_remote(&batch.host, d) {
            Applied::Changed => {
                let action = match d.action {
                    Action::Block => "block",
                    Action::Unblock => "unblock",
                };
                metrics.applied.with_label_values(&[action]).inc();
                if !catching_up {
                    let lag_ms = unix_now_ms().saturating_sub(d.decided_unix_ms);
                    metrics.lag.observe(lag_ms as f64 / 1000.0);
                }
            }
            Applied::Unchanged => {}
            Applied::Dropped(why) => metrics.dropped.with_label_values(&[why]).inc(),
        }
    }
}
