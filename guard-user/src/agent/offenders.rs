//! `Offenders`: the sources over their cap that escalation watches, bounded by
//! [`MAX_OFFENDERS`] and by forgetting the ones gone quiet.

use std::{collections::HashMap, sync::Mutex};

use guard_common::addr::Prefix;

use super::blocks::{offender_admitted, Offender, SourceCounts, Standing, Streak};
use crate::settings::EscalationSettings;

#[cfg(doc)]
use super::blocks::MAX_OFFENDERS;

#[derive(Debug, Default)]
pub(super) struct Offenders {
    watched: Mutex<HashMap<Prefix, Offender>>,
}

impl Offenders {
    fn watched(&self) -> std::sync::MutexGuard<'_, HashMap<Prefix, Offender>> {
        self.watched.lock().expect("offenders lock")
    }

    /// Counts one over-cap event of `prefix` at `now_ns` (see [`Offender::over_cap`]);
    /// `None` when the table is full and the source is not watched yet.
    pub(super) fn over_cap(
        &self,
        prefix: Prefix,
        now_ns: u64,
        counts: SourceCounts,
        esc: &EscalationSettings,
        event_interval_ns: u64,
    ) -> Option<Streak> {
        let mut watched = self.watched();
        if !offender_admitted(watched.len(), watched.contains_key(&prefix)) {
            return None;
        }
        Some(
            watched
                .entry(prefix)
                .or_default()
                .over_cap(now_ns, counts, esc, event_interval_ns),
        )
    }

    /// Where `prefix` stands at `now_ns` (the kernel's monotonic clock, as events carry
    /// it); `None` when it is not watched.
    pub(super) fn standing(
        &self,
        prefix: &Prefix,
        now_ns: u64,
        event_interval_ns: u64,
    ) -> Option<Standing> {
        let watched = self.watched();
        let o = watched.get(prefix)?;
        Some(Standing {
            strikes: o.strikes,
            // The same gap that over_cap takes as the end of a streak.
            streak_secs: o.streak_secs(now_ns, event_interval_ns),
        })
    }

    /// Forgets the sources that went quiet long ago, keeping the table bounded by the
    /// sources actually over their cap.
    pub(super) fn forget_quiet(&self, now_ns: u64) {
        self.watched().retain(|_, o| o.is_recent(now_ns));
    }
}
