//! How the background task paces its reconnects, and how it tells one
//! outage from the next so that each is logged once.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Reconnect delays: doubling from `min` to `max`, each drawn uniformly
/// from the upper half of the current step so many apps restarted together
/// do not reconnect in lockstep.
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: u64,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            step: min,
            // xorshift never leaves zero.
            rng: seed | 1,
        }
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = step / 2;
        let spread = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng % spread.saturating_add(1))
    }

    pub(super) fn reset(&mut self) {
        self.step = self.min;
    }
}

/// Tracks outages so each one is logged once, not per reconnect attempt.
#[derive(Default)]
pub(super) struct Outage {
    since: Option<Instant>,
    attempts: u64,
}

impl Outage {
    /// A failed connect or a lost session; true when this starts an outage
    /// (and so should be logged).
    pub(super) fn failed(&mut self) -> bool {
        self.attempts += 1;
        if self.since.is_none() {
            self.since = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// A session is up; how long the outage that ended lasted and how many
    /// attempts it took, if there was one.
    pub(super) fn recovered(&mut self) -> Option<(Duration, u64)> {
        let since = self.since.take()?;
        let attempts = core::mem::take(&mut self.attempts);
        Some((since.elapsed(), attempts))
    }
}

pub(super) fn random_seed() -> u64 {
    // RandomState is seeded per process from the OS; no extra crate needed
    // for jitter.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for seed in [0, 1, 42, u64::MAX] {
            let mut b = Backoff::new(min, max, seed);
            let mut step = min;
            for _ in 0..12 {
                let d = b.next_delay();
                assert!(
                    d >= step / 2 && d <= step,
                    "{d:?} outside [{:?}, {step:?}]",
                    step / 2
                );
                step = (step * 2).min(max);
            }
            b.reset();
            let d = b.next_delay();
            assert!(d >= min / 2 && d <= min, "{d:?} after reset");
        }
        // Absurd settings saturate instead of overflowing.
        let mut b = Backoff::new(Duration::MAX, Duration::MAX, 3);
        for _ in 0..3 {
            assert!(b.next_delay() >= Duration::MAX / 2);
        }
        // Jitter actually varies.
        let mut b = Backoff::new(max, max, 7);
        let delays: std::collections::BTreeSet<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn an_outage_is_logged_once_however_many_attempts() {
        let mut o = Outage::default();
        assert_eq!(o.recovered(), None, "no outage yet");
        assert!(o.failed(), "the first failure starts an outage");
        assert!(!o.failed());
        assert!(!o.failed());
        let (_, attempts) = o.recovered().unwrap();
        assert_eq!(attempts, 3);
        assert_eq!(o.recovered(), None);
        assert!(o.failed(), "a new outage after recovering");
    }
}
