//! Sending this host's decisions in batches, retried under one message id.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self};
use log::{debug, warn};

use super::*;

/// How long one pull of the follower waits for messages (see `follow_loop`).
pub(super) const FOLLOW_PULL_EXPIRY: Duration = Duration::from_secs(3);

/// Retry delay: short, because the usual failure is a stream leader election (seconds) and
/// every retry is one small request; a decision should not wait for a long sleep after it.
pub(super) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(4)).min(500))
}

pub(super) async fn publish_loop(
    js: jetstream::Context,
    s: Arc<FleetSettings>,
    max_ttl: Duration,
    outbox: Arc<Outbox>,
    metrics: Arc<FleetMetrics>,
) {
    let subject = s.own_subject();
    // Message ids unique to this run: a retried batch keeps its id, so the
    // stream's duplicate window stores it once.
    let run_id = format!("{}-{:x}", s.host, unix_now_ms());
    let mut batch_no: u64 = 0;
    let mut failures: u32 = 0;
    loop {
        let batch = outbox.take(MAX_BATCH);
        if batch.is_empty() {
            outbox.ready.notified().await;
            continue;
        }
        let n = batch.len();
        let msg = Batch {
            v: WIRE_VERSION,
            host: s.host.clone(),
            decisions: batch,
        };
        let payload = serde_json::to_vec(&msg).expect("a batch serialises");
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("{run_id}-{batch_no}"))
            .ttl(msg.ttl(unix_now_ms(), max_ttl));
        let outcome = async {
            let ack = js.send_publish(subject.clone(), publish).await?;
            ack.await?;
            Ok::<_, async_nats::Error>(())
        }
        .await;
        match outcome {
            Ok(()) => {
                batch_no += 1;
                failures = 0;
                metrics.published.inc_by(n as u64);
                metrics.queue_depth.set(outbox.len() as i64);
            }
            Err(e) => {
                metrics.publish_errors.inc();
                if failures == 0 {
                    warn!("fleet: publish {n} decision(s) failed ({e}); they wait and are retried");
                } else {
                    debug!("fleet: publish retry failed: {e}");
                }
                outbox.put_back(msg.decisions);
                // A stream that does not exist yet (first host of a fleet)
                // is made here as well as by the follower.
                if failures.is_multiple_of(8) {
                    let _ = ensure_stream(&js, &s, max_ttl).await;
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
            }
        }
    }
}
