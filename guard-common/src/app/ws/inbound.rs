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
    start_ns: u64,
    total: u32,
    rate: u32,
    /// The threshold was crossed in this window (acted on once).
    crossed: bool,
    /// One log line per connection is enough to see what happens.
    logged: bool,
}

/// Where one more violation left its window.
pub(super) enum Tally {
    Below,
    /// This one reached the threshold: acted on once per window.
    Crossed {
        total: u32,
        rate: u32,
    },
}

impl Violations {
    /// A fresh window starting at `now`.
    pub(super) fn starting(now: u64) -> Self {
        Self {
            start_ns: now,
            ..Self::default()
        }
    }

    /// Counts one violation (`rate`: a rate one) at `now`, in a window of
    /// `window_ns` that starts over once past.
    pub(super) fn count(&mut self, rate: bool, now: u64, window_ns: u64, threshold: u32) -> Tally {
        if now.saturating_sub(self.start_ns) >= window_ns {
            *self = Self {
                start_ns: now,
                logged: self.logged,
                ..Self::default()
            };
        }
        self.total += 1;
        if rate {
            self.rate += 1;
        }
        if self.total < threshold || self.crossed {
            return Tally::Below;
        }
        self.crossed = true;
        Tally::Crossed {
            total: self.total,
            rate: self.rate,
        }
    }

    /// True for the connection's first violation only.
    pub(super) fn first_to_log(&mut self) -> bool {
        !std::mem::replace(&mut self.logged, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_crosses_its_threshold_once_and_starts_over_when_past() {
        let mut w = Violations::starting(0);
        assert!(matches!(w.count(true, 1, 100, 3), Tally::Below));
        assert!(matches!(w.count(false, 2, 100, 3), Tally::Below));
        assert!(matches!(
            w.count(true, 3, 100, 3),
            Tally::Crossed { total: 3, rate: 2 }
        ));
        assert!(matches!(w.count(true, 4, 100, 3), Tally::Below));
        // Past the window: counted afresh, and it can cross again.
        for now in 100..102 {
            assert!(matches!(w.count(false, now, 100, 3), Tally::Below));
        }
        assert!(matches!(
            w.count(false, 102, 100, 3),
            Tally::Crossed { total: 3, rate: 0 }
        ));
    }

    #[test]
    fn only_the_first_violation_of_a_connection_is_logged() {
        let mut w = Violations::starting(0);
        assert!(w.first_to_log());
        assert!(!w.first_to_log());
        w.count(true, 1_000, 10, 5);
        assert!(
            !w.first_to_log(),
            "a new window keeps the connection's flag"
        );
    }
}
