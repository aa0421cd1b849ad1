//! The integer token bucket the kernel charges for every connection-opening
//! SYN, and that the app side reuses for its own rates.
//!
//! Tokens are kept in nano-tokens so that a rate in tokens per second is
//! exactly nano-tokens per nanosecond: refill is one multiplication, no
//! division on the hot path and no floats (the BPF target has none).

/// One token, in the bucket's unit.
pub const NANO_TOKENS: u64 = 1_000_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Nano-tokens available.
    pub tokens: u64,
    /// Monotonic time of the last refill, in ns.
    pub last_ns: u64,
}

const _: () = assert!(core::mem::size_of::<TokenBucket>() == 16);

impl TokenBucket {
    /// A bucket that starts full: a new source gets its whole burst.
    #[inline(always)]
    pub const fn full(burst: u32, now_ns: u64) -> Self {
        Self {
            tokens: burst as u64 * NANO_TOKENS,
            last_ns: now_ns,
        }
    }

    /// Adds what `rate` tokens/s earned since the last refill, capped at
    /// `burst`. A clock that goes backwards earns nothing (and does not move
    /// `last_ns` back, so the next forward step is not double-counted).
    #[inline(always)]
    pub fn refill(&mut self, now_ns: u64, rate_per_sec: u32, burst: u32) {
        let capacity = burst as u64 * NANO_TOKENS;
        if now_ns > self.last_ns {
            let elapsed = now_ns - self.last_ns;
            if rate_per_sec != 0 {
                let rate = rate_per_sec as u64;
                let earned = if elapsed <= u32::MAX as u64 {
                    // Under ~4.3 s since the last refill (every busy
                    // source): u32 x u32 cannot overflow, no division on
                    // the hot path.
                    elapsed * rate
                } else {
                    // Longer idle: past the time that fills an empty
                    // bucket, more adds nothing; clamping first keeps
                    // `elapsed * rate` within `capacity + rate`, far from
                    // overflow even after years.
                    let fill_time = capacity / rate + 1;
                    elapsed.min(fill_time) * rate
                };
                self.tokens = self.tokens.saturating_add(earned);
            }
            self.last_ns = now_ns;
        }
        if self.tokens > capacity {
            // Also trims a bucket whose burst was lowered live.
            self.tokens = capacity;
        }
    }

    /// Refills, then takes one token if there is one.
    #[inline(always)]
    pub fn try_take(&mut self, now_ns: u64, rate_per_sec: u32, burst: u32) -> bool {
        self.refill(now_ns, rate_per_sec, burst);
        self.take()
    }

    /// Whether a whole token is there (without refilling).
    #[inline(always)]
    pub const fn has_token(&self) -> bool {
        self.tokens >= NANO_TOKENS
    }

    /// Takes one token if there is one (without refilling): for a caller
    /// that refilled and looked with [`Self::has_token`] first.
    #[inline(always)]
    pub fn take(&mut self) -> bool {
        if self.has_token() {
            self.tokens -= NANO_TOKENS;
            true
        } else {
            false
        }
    }

    /// Takes up to `n` tokens (without refilling) and says how many it
    /// took: what `n` calls of [`Self::take`] would do, in one step.
    #[inline(always)]
    pub fn take_up_to(&mut self, n: u64) -> u64 {
        let taken = self.available().min(n);
        self.tokens -= taken * NANO_TOKENS;
        taken
    }

    /// Whole tokens available now (without refilling).
    #[inline(always)]
    pub const fn available(&self) -> u64 {
        self.tokens / NANO_TOKENS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn drain(b: &mut TokenBucket, now: u64, rate: u32, burst: u32) -> u32 {
        let mut n = 0;
        while b.try_take(now, rate, burst) {
            n += 1;
            assert!(n <= burst + 1, "never more than the burst at one instant");
        }
        n
    }

    #[test]
    fn taking_many_at_once_is_taking_them_one_by_one() {
        for (start, n) in [
            (0u64, 0u64),
            (0, 4),
            (3, 2),
            (3, 3),
            (3, 7),
            (4_000_000_000, 5),
        ] {
            // Whole tokens and a fraction, which neither way may take.
            let bucket = TokenBucket {
                tokens: start * NANO_TOKENS + 400,
                last_ns: 0,
            };
            let (mut many, mut one_by_one) = (bucket, bucket);
            let taken = many.take_up_to(n);
            let singly = (0..n).filter(|_| one_by_one.take()).count() as u64;
            assert_eq!(taken, singly, "{start} tokens, {n} asked");
            assert_eq!(many, one_by_one);
        }
    }

    #[test]
    fn new_bucket_gives_exactly_its_burst() {
        let mut b = TokenBucket::full(40, 5 * SEC);
        assert_eq!(drain(&mut b, 5 * SEC, 20, 40), 40);
        assert!(!b.try_take(5 * SEC, 20, 40));
    }

    #[test]
    fn refills_at_rate_and_caps_at_burst() {
        let mut b = TokenBucket::full(10, 0);
        assert_eq!(drain(&mut b, 0, 20, 10), 10);
        // 20/s for 250 ms is 5 tokens.
        assert_eq!(drain(&mut b, SEC / 4, 20, 10), 5);
        // A long pause refills only to the burst.
        assert_eq!(drain(&mut b, 3600 * SEC, 20, 10), 10);
        // Fractions accumulate: 20/s for 49 ms is 0.98 tokens, then 1 ms more.
        let t = 3600 * SEC + 49_000_000;
        assert_eq!(drain(&mut b, t, 20, 10), 0);
        assert_eq!(drain(&mut b, t + 1_000_000, 20, 10), 1);
    }

    #[test]
    fn zero_rate_never_refills_and_zero_burst_never_admits() {
        let mut b = TokenBucket::full(3, 0);
        assert_eq!(drain(&mut b, 0, 0, 3), 3);
        assert_eq!(drain(&mut b, u64::MAX, 0, 3), 0);
        let mut z = TokenBucket::full(0, 0);
        assert_eq!(drain(&mut z, 10 * SEC, 1000, 0), 0);
    }

    #[test]
    fn max_burst_and_rate_do_not_overflow() {
        let mut b = TokenBucket::full(u32::MAX, 0);
        assert_eq!(b.available(), u32::MAX as u64);
        assert!(b.try_take(u64::MAX, u32::MAX, u32::MAX));
        assert_eq!(b.available(), u32::MAX as u64 - 1);
        let mut e = TokenBucket {
            tokens: 0,
            last_ns: 0,
        };
        e.refill(u64::MAX, u32::MAX, u32::MAX);
        assert_eq!(e.available(), u32::MAX as u64);
        // Rate far above burst: one nanosecond refills whole tokens.
        let mut f = TokenBucket {
            tokens: 0,
            last_ns: 0,
        };
        f.refill(1, u32::MAX, 1);
        assert_eq!(f.available(), 1);
    }

    #[test]
    fn clock_going_backwards_earns_nothing_and_is_not_double_counted() {
        let mut b = TokenBucket::full(5, 10 * SEC);
        assert_eq!(drain(&mut b, 10 * SEC, 1, 5), 5);
        assert_eq!(drain(&mut b, 5 * SEC, 1, 5), 0);
        assert_eq!(b.last_ns, 10 * SEC, "last_ns never moves back");
        assert_eq!(drain(&mut b, 12 * SEC, 1, 5), 2);
    }

    #[test]
    fn u64_wrap_of_the_clock_is_treated_as_backwards() {
        let mut b = TokenBucket::full(2, u64::MAX - 1);
        assert_eq!(drain(&mut b, u64::MAX - 1, 1, 2), 2);
        // A wrapped clock reads as a small value: no refill, no panic.
        assert_eq!(drain(&mut b, 3, 1, 2), 0);
        assert_eq!(drain(&mut b, u64::MAX, u32::MAX, 2), 2);
    }

    #[test]
    fn short_and_long_idle_refills_agree_at_their_boundary() {
        let edge = u32::MAX as u64;
        for rate in [1u32, 3, 1000, u32::MAX] {
            let mut a = TokenBucket {
                tokens: 0,
                last_ns: 0,
            };
            let mut b = TokenBucket {
                tokens: 0,
                last_ns: 0,
            };
            a.refill(edge, rate, u32::MAX);
            b.refill(edge + 1, rate, u32::MAX);
            let cap = u32::MAX as u64 * NANO_TOKENS;
            assert_eq!(a.tokens, (edge * rate as u64).min(cap), "rate {rate}");
            assert_eq!(b.tokens, ((edge + 1) * rate as u64).min(cap), "rate {rate}");
        }
    }

    #[test]
    fn look_then_take_agrees_with_try_take() {
        let mut a = TokenBucket::full(2, 0);
        let mut b = a;
        for step in 0..200u64 {
            let now = step * SEC / 7;
            a.refill(now, 3, 2);
            let looked = a.has_token();
            assert_eq!(looked, a.take(), "take follows the look at {step}");
            assert_eq!(looked, b.try_take(now, 3, 2), "same as try_take at {step}");
            assert_eq!(a, b);
        }
        let mut empty = TokenBucket::full(0, 0);
        assert!(!empty.has_token() && !empty.take());
    }

    #[test]
    fn lowering_the_burst_live_trims_the_bucket() {
        let mut b = TokenBucket::full(100, 0);
        assert_eq!(drain(&mut b, 0, 0, 10), 10);
    }

    #[test]
    fn admissions_never_exceed_burst_plus_rate_times_time() {
        // Property over a pseudo-random schedule: the bucket never admits
        // more than burst + rate * elapsed.
        let (rate, burst) = (7u32, 3u32);
        let mut b = TokenBucket::full(burst, 0);
        let mut now = 0u64;
        let mut admitted = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += x % 50_000_000;
            if b.try_take(now, rate, burst) {
                admitted += 1;
            }
            let bound = burst as u64 + (now as u128 * rate as u128 / SEC as u128) as u64;
            assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
        }
        // Arrivals (~40/s) outpace the rate, so after the first burst nothing
        // is wasted: it admits the burst plus every whole token earned.
        let earned = (now as u128 * rate as u128 / SEC as u128) as u64;
        assert!(
            admitted + 1 >= burst as u64 + earned,
            "admitted {admitted}, earned {earned}"
        );
    }
}
