//! This host's decisions waiting for JetStream: bounded, oldest dropped first and counted.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use super::*;

/// Where this host's decisions wait for JetStream. Pushing never blocks:
/// the agent calls it with its locks held.
pub struct Outbox {
    queue: Mutex<VecDeque<Decision>>,
    limit: usize,
    pub(super) ready: Notify,
    metrics: Arc<FleetMetrics>,
}

impl Outbox {
    pub fn new(limit: usize, metrics: Arc<FleetMetrics>) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            limit,
            ready: Notify::new(),
            metrics,
        }
    }

    pub fn push(&self, decision: Decision) {
        let mut q = self.queue.lock().expect("outbox lock");
        // The newest decisions matter most (the oldest are the likeliest to
        // have expired by the time NATS is back).
        while q.len() >= self.limit {
            q.pop_front();
            self.metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc();
        }
        q.push_back(decision);
        self.metrics.queue_depth.set(q.len() as i64);
        drop(q);
        self.ready.notify_one();
    }

    pub(super) fn take(&self, max: usize) -> Vec<Decision> {
        let mut q = self.queue.lock().expect("outbox lock");
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    /// Puts a batch that failed back in front, in order, within the limit.
    pub(super) fn put_back(&self, batch: Vec<Decision>) {
        let mut q = self.queue.lock().expect("outbox lock");
        for d in batch.into_iter().rev() {
            if q.len() >= self.limit {
                self.metrics
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc();
                continue;
            }
            q.push_front(d);
        }
        self.metrics.queue_depth.set(q.len() as i64);
    }

    pub(super) fn len(&self) -> usize {
        self.queue.lock().expect("outbox lock").len()
    }
}
