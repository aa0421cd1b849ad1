//! The inbound accounting of a [`GuardedWebSocket`](super::GuardedWebSocket):
//! bytes charged to its byte bucket, and its violations window.

use crate::bucket::{TokenBucket, NANO_TOKENS};

/// Charges `len` bytes to a byte bucket (the shared bucket takes one
/// token at a time).
pub(super) fn take_bytes(
    bucket: &mut TokenBucket,
    now: u64,
    len: u64,
    rate: u32,
    burst: u32,
) -> bool {
    bucket.refill(now, rate, burst);
    let need = len.saturating_mul(NANO_TOKENS);
    if bucket.tokens >= need {
        bucket.tokens -= need;
        true
    } else {
        false
    }
}

/// Violations in the current window.
#[derive(Default)]
pub(super) struct Violations {
    pub(super) start_ns: u64,
    pub(super) total: u32,
    pub(super) rate: u32,
    /// The threshold was crossed in this window (acted on once).
    pub(super) crossed: bool,
    /// One log line per connection is enough to see what happens.
    pub(super) logged: bool,
}

impl Violations {
    /// A fresh window starting at `now`.
    pub(super) fn starting(now: u64) -> Self {
        Self {
            start_ns: now,
            ..Self::default()
        }
    }
}
