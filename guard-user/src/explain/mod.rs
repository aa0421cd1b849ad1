//! `guard explain ADDR`: what the kernel would do with the next SYN from one
//! address to a protected port, and every input of that verdict.
//!
//! The verdict is in `verdict`, reading the maps in `read`, the text form in
//! `render`. The report's types stay here and the rest is re-exported, so
//! callers keep naming everything `guard_user::explain::X`.

mod read;
mod render;
mod verdict;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guard_common::addr::Prefix;
use serde::Serialize;

pub use read::{explain, next_syn_with_ports, BlockMeta};
pub use render::{render_text, summary};
pub use verdict::{next_syn, Action, Cause, Inputs, NextSyn};

/// A wall-clock instant as both RFC 3339 and Unix seconds (the JSON form
/// of every time `guard -o json` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instant {
    pub rfc3339: String,
    pub unix: u64,
}

impl Instant {
    pub fn from_unix(unix: u64) -> Self {
        Self {
            rfc3339: crate::audit::rfc3339(UNIX_EPOCH + Duration::from_secs(unix)),
            unix,
        }
    }

    /// The wall-clock time of a monotonic `t_ns`, given "now" on both clocks.
    pub fn from_monotonic(t_ns: u64, now_ns: u64, now_unix: SystemTime) -> Self {
        let wall = if t_ns <= now_ns {
            now_unix - Duration::from_nanos(now_ns - t_ns)
        } else {
            now_unix + Duration::from_nanos(t_ns - now_ns)
        };
        Self::from_unix(
            wall.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        )
    }
}

/// The blocklist entry that covers the address.
#[derive(Debug, Clone, Serialize)]
pub struct BlockHit {
    #[serde(serialize_with = "as_text")]
    pub prefix: Prefix,
    pub reason: &'static str,
    /// False for an entry past its expiry that the agent has not swept yet
    /// (the program ignores it).
    pub active: bool,
    /// `None`: never expires.
    pub until: Option<Instant>,
    pub expires_in_secs: Option<u64>,
    /// From the agent's audit log (`None` when the agent could not be asked
    /// or the entry predates the log).
    pub origin: Option<String>,
    pub since: Option<Instant>,
    pub detail: Option<String>,
}

/// A token bucket (per source, per aggregate prefix, or global).
#[derive(Debug, Clone, Serialize)]
pub struct BucketState {
    pub enabled: bool,
    /// The map key (the masked prefix); absent for the global budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Whether the kernel has an entry (an untracked key starts full).
    pub tracked: bool,
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Whole tokens after refilling to now.
    pub tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_cap: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Instant>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub open: u64,
    /// Handshakes let through that have neither completed nor timed out:
    /// they count against the cap too.
    pub in_flight: u64,
    /// 0 = no cap.
    pub limit: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct KnownGood {
    pub known_good: bool,
    pub last_handshake: Option<Instant>,
    pub ttl_secs: u32,
}

/// Everything `guard explain` reports about one address.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub address: String,
    pub protected_ports: Vec<u16>,
    pub dry_run: bool,
    pub syn_cookies: &'static str,
    /// The longest allow-listed prefix containing the address.
    pub allowlisted_by: Option<String>,
    pub blocked_by: Option<BlockHit>,
    pub source: BucketState,
    pub aggregate: BucketState,
    pub connections: Connections,
    pub known_good: KnownGood,
    pub global_budget: BucketState,
    pub next_syn: NextSyn,
    /// The one-line answer, e.g. `DROP (blocked by 198.18.0.0/24, operator)`.
    pub summary: String,
    /// The agent's escalation state for the source key and (when that cap
    /// is on) the aggregate key; empty when the agent could not be asked.
    pub escalation: Vec<EscalationState>,
    /// What could not be found out, in words.
    pub notes: Vec<String>,
    /// The source and aggregate map keys, for asking the agent about them.
    #[serde(skip)]
    pub keys: (Prefix, Option<Prefix>),
}

/// How far a prefix is along escalation (the agent's over-cap streaks).
#[derive(Debug, Clone, Serialize)]
pub struct EscalationState {
    #[serde(serialize_with = "as_text")]
    pub prefix: Prefix,
    /// The agent watches a streak for it (it completed a handshake and went
    /// over its cap).
    pub tracked: bool,
    /// Escalations so far; each doubles the next block's TTL.
    pub strikes: u32,
    /// How long the current over-cap streak has lasted (0: none).
    pub streak_secs: u32,
}

impl Explanation {
    /// Adds who made the block and when, as the agent's audit log says.
    pub fn set_block_meta(&mut self, meta: BlockMeta) {
        if let Some(b) = &mut self.blocked_by {
            b.origin = meta.origin;
            b.since = meta.since_unix.map(Instant::from_unix);
            b.detail = meta.detail;
        }
        self.summary = summary(self);
    }
}

fn as_text<S: serde::Serializer>(p: &Prefix, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn monotonic_times_become_wall_clock_times() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |t_ns| Instant::from_monotonic(t_ns, 50 * SEC, now).unix;
        assert_eq!(at(50 * SEC), 1_000_000);
        assert_eq!(at(40 * SEC), 999_990);
        assert_eq!(at(110 * SEC), 1_000_060);
        assert_eq!(Instant::from_unix(0).rfc3339, "1970-01-01T00:00:00.000Z");
    }
}
