//! Sources whose connections keep being closed with a request head half
//! sent: counted per window, reported once per window.

use std::collections::HashMap;

use crate::addr::Prefix;

struct Strikes {
    window_start_ns: u64,
    count: u32,
    reported: bool,
}

pub(crate) struct Offenders {
    threshold: u32,
    window_ns: u64,
    max_tracked: usize,
    sources: HashMap<Prefix, Strikes>,
}

impl Offenders {
    pub fn new(threshold: u32, window_ns: u64, max_tracked: usize) -> Self {
        Self {
            threshold,
            window_ns,
            max_tracked,
            sources: HashMap::new(),
        }
    }

    /// Counts one strike against `source`; true when this one makes it an
    /// offender to report (once per window).
    pub fn strike(&mut self, source: Prefix, now_ns: u64) -> bool {
        if !self.sources.contains_key(&source) && self.sources.len() >= self.max_tracked {
            self.prune(now_ns);
            if self.sources.len() >= self.max_tracked {
                // Full of live windows: this source waits for one to
                // expire; its connections are still closed all the same.
                return false;
            }
        }
        let s = self.sources.entry(source).or_insert(Strikes {
            window_start_ns: now_ns,
            count: 0,
            reported: false,
        });
        if now_ns.saturating_sub(s.window_start_ns) >= self.window_ns {
            *s = Strikes {
                window_start_ns: now_ns,
                count: 0,
                reported: false,
            };
        }
        s.count = s.count.saturating_add(1);
        if s.count >= self.threshold && !s.reported {
            s.reported = true;
            return true;
        }
        false
    }

    /// Forgets sources whose window has passed.
    pub fn prune(&mut self, now_ns: u64) {
        let window = self.window_ns;
        self.sources
            .retain(|_, s| now_ns.saturating_sub(s.window_start_ns) < window);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn reported_once_per_window_at_the_threshold() {
        let mut o = Offenders::new(3, 100, 10);
        let src = p("198.18.0.1/32");
        assert!(!o.strike(src, 0));
        assert!(!o.strike(src, 10));
        assert!(o.strike(src, 20));
        assert!(!o.strike(src, 30));
        // A new window starts counting again.
        assert!(!o.strike(src, 120));
        assert!(!o.strike(src, 130));
        assert!(o.strike(src, 140));
    }

    #[test]
    fn strikes_spread_over_windows_never_report() {
        let mut o = Offenders::new(2, 100, 10);
        let src = p("198.18.0.1/32");
        for t in [0, 150, 300, 450] {
            assert!(!o.strike(src, t));
        }
    }

    #[test]
    fn the_table_stays_bounded_and_frees_expired_windows() {
        let mut o = Offenders::new(1, 100, 2);
        assert!(o.strike(p("198.18.0.1/32"), 0));
        assert!(o.strike(p("198.18.0.2/32"), 0));
        // Full of live windows: a third source is not tracked yet.
        assert!(!o.strike(p("198.18.0.3/32"), 50));
        assert_eq!(o.len(), 2);
        // Once they expire it is.
        assert!(o.strike(p("198.18.0.3/32"), 200));
        assert_eq!(o.len(), 1);
    }
}
