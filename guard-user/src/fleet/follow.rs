//! Following the stream: replay on start, resume after failures, notice a consumer that
//! died with its node and a stream that was deleted, recreated or truncated, apply the
//! other hosts' decisions.

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
    // When the stream followed was created: another time is another stream (deleted and made
    // again), whose sequences start over.
    let mut created: Option<StreamCreated> = None;
    // The stream was found missing: whatever stream comes next is read from its start.
    let mut lost = false;
    let filter = s.all_subjects();
    let subject_head = format!("{}.", s.subject_prefix);
    loop {
        let stream = match ensure_stream(&js, &s, max_ttl).await {
            Ok(st) => st,
            Err(e) => {
                if matches!(e, StreamError::Missing) && !lost {
                    lost = true;
                    if created.is_some() {
                        stream_lost(&metrics, &s.stream);
                    } else {
                        // Never seen yet: nothing was reset, the stream is just not there.
                        metrics.stream_present.set(0);
                        info!("fleet: {e}");
                    }
                } else if failures == 0 {
                    warn!("{e}; retrying");
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        let info = stream.cached_info();
        let replaced = replacement(created, last_seq, info.created, info.state.last_sequence);
        if lost || replaced.is_some() {
            if let (Some(kind), false) = (replaced, lost) {
                metrics.stream_resets.with_label_values(&[kind]).inc();
                warn!(
                    "fleet: stream {} was {kind} (this agent had read to sequence {last_seq}, \
                     it now ends at {}): reading it again from its start",
                    s.stream, info.state.last_sequence
                );
            } else {
                info!(
                    "fleet: stream {} is back; reading it from its start",
                    s.stream
                );
            }
            last_seq = 0;
            catch_up_until = None;
            metrics.caught_up.set(0);
            metrics.stream_sequence.set(0);
            lost = false;
        }
        created = Some(info.created);
        metrics.stream_present.set(1);
        if catch_up_until.is_none() {
            let state = &info.state;
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
                    let watch = watch(&stream, &filter, last_seq, created, &mut check).await;
                    // The stream's tail message may have expired before it was read.
                    if catch_up_until.is_some_and(|t| check.settled_at >= t) {
                        metrics.caught_up.set(1);
                    }
                    match watch {
                        Watch::Fine => continue,
                        Watch::Stalled => {
                            warn!(
                                "fleet: the stream is past sequence {last_seq} but nothing \
                                 arrives; following again from there"
                            );
                            metrics.follower_restarts.inc();
                        }
                        Watch::Missing => {
                            lost = true;
                            stream_lost(&metrics, &s.stream);
                        }
                        // Counted and read again from its start by the loop above.
                        Watch::Replaced => {}
                    }
                    break;
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
            // The subject names the publishing host: `<subject_prefix>.<host>`.
            match msg.subject.as_str().strip_prefix(&subject_head) {
                Some(host) if is_token(host) => handle_batch(
                    &s.host,
                    host,
                    &msg.payload,
                    catching_up,
                    &*applier,
                    &metrics,
                ),
                _ => metrics.dropped.with_label_values(&["malformed"]).inc(),
            }
            // At or past where the stream stood (its tail may have expired unread).
            if metrics.caught_up.get() == 0 && catch_up_until.is_some_and(|t| seq >= t) {
                metrics.caught_up.set(1);
                info!("fleet: caught up with the stream (sequence {seq})");
            }
        }
    }
}

/// When a stream was created, as JetStream reports it.
pub(super) type StreamCreated = async_nats::datetime::DateTime;

/// Whether the stream found now is not the one followed so far: created at another time
/// (`recreated`), or ending before what the follower has read (`truncated`: its messages
/// were removed and its sequences rewound). Either way the follower reads it from its start.
pub(super) fn replacement(
    followed: Option<StreamCreated>,
    last_read: u64,
    created: StreamCreated,
    last_sequence: u64,
) -> Option<&'static str> {
    if followed.is_some_and(|f| f != created) {
        Some("recreated")
    } else if last_sequence < last_read {
        Some("truncated")
    } else {
        None
    }
}

/// The stream is gone: say so in the metrics and the log; it is created again or waited
/// for, as configured.
fn stream_lost(metrics: &FleetMetrics, stream: &str) {
    metrics.stream_resets.with_label_values(&["deleted"]).inc();
    metrics.stream_present.set(0);
    metrics.caught_up.set(0);
    warn!(
        "fleet: stream {stream} is gone (deleted?): decisions are not shared until it is back \
         ([fleet] missing_stream says whether this agent creates it or waits)"
    );
}

/// What the watchdog found.
pub(super) enum Watch {
    Fine,
    /// Messages are owed and do not arrive.
    Stalled,
    /// The stream does not exist.
    Missing,
    /// Another stream, or this one rewound.
    Replaced,
}

/// One look at the stream: is it still the one followed, and is the follower keeping up.
pub(super) async fn watch(
    stream: &jetstream::stream::Stream,
    filter: &str,
    last_seq: u64,
    created: Option<StreamCreated>,
    check: &mut StallCheck,
) -> Watch {
    let info = match tokio::time::timeout(STALL_CHECK, stream.get_info()).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) if is_stream_not_found(&e) => return Watch::Missing,
        // A failed request (a stream leader election) proves nothing either way.
        _ => return Watch::Fine,
    };
    if replacement(created, last_seq, info.created, info.state.last_sequence).is_some() {
        return Watch::Replaced;
    }
    if stalled(stream, filter, last_seq, info.state.last_sequence, check).await {
        Watch::Stalled
    } else {
        Watch::Fine
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
    tail: u64,
    check: &mut StallCheck,
) -> bool {
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

/// Applies one message's decisions: `host` is the subject's host token. Bad input (too
/// large, unreadable, of an unknown version, or naming another host than its subject) is
/// counted by reason and never applied. Public for the unit tests.
pub fn handle_batch(
    own_host: &str,
    host: &str,
    payload: &[u8],
    catching_up: bool,
    applier: &dyn Applier,
    metrics: &FleetMetrics,
) {
    if payload.len() > MAX_MESSAGE_BYTES {
        metrics.dropped.with_label_values(&["oversized"]).inc();
        debug!(
            "fleet: a {} byte message on host {host}'s subject (over {MAX_MESSAGE_BYTES})",
            payload.len()
        );
        return;
    }
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
    if batch.decisions.len() > MAX_BATCH {
        metrics
            .dropped
            .with_label_values(&["oversized"])
            .inc_by(batch.decisions.len() as u64);
        return;
    }
    if batch.host != host {
        metrics
            .dropped
            .with_label_values(&["host_mismatch"])
            .inc_by(batch.decisions.len() as u64);
        return;
    }
    let own = host == own_host;
    // A host's own decisions echo back: they are in its kernel already.
    if own && !catching_up {
        return;
    }
    let from = Remote {
        host,
        own,
        live: !catching_up,
    };
    for d in &batch.decisions {
        metrics.received.inc();
        match applier.apply_remote(&from, d) {
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
