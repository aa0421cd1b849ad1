//! What travels on the stream: decisions in versioned batches, with absolute expiries and
//! the TTL each message carries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The wire format's version; a receiver drops batches of a version it
/// does not know instead of misreading them.
pub const WIRE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Block,
    Unblock,
}

/// One block or unblock as the deciding host saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    pub prefix: String,
    /// When the block ends, Unix milliseconds (0 for an unblock).
    #[serde(default)]
    pub expires_unix_ms: u64,
    /// When the deciding host decided, Unix milliseconds.
    pub decided_unix_ms: u64,
    #[serde(default)]
    pub reason: String,
    /// Who decided on that host (`kernel:over_cap`, `chat-app:uid=…`, …).
    #[serde(default)]
    pub origin: String,
    /// Escalation strikes behind the block (0 when not escalated).
    #[serde(default)]
    pub level: u32,
    #[serde(default)]
    pub detail: String,
}

/// What one JetStream message carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub v: u32,
    pub host: String,
    pub decisions: Vec<Decision>,
}

impl Batch {
    /// How long the stream must keep this batch: until its last block
    /// ends; an unblock stays as long as a block it may cancel could.
    pub(super) fn ttl(&self, now_unix_ms: u64, max_ttl: Duration) -> Duration {
        let longest = self
            .decisions
            .iter()
            .map(|d| match d.action {
                Action::Block if d.expires_unix_ms != 0 => {
                    Duration::from_millis(d.expires_unix_ms.saturating_sub(now_unix_ms))
                }
                _ => max_ttl,
            })
            .max()
            .unwrap_or_default();
        // JetStream counts TTLs in whole seconds, at least one.
        Duration::from_secs(longest.as_millis().div_ceil(1000).max(1) as u64)
    }
}

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
