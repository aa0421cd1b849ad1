//! Who may hold the socket's sessions: a cap per uid, and slots only operators may take, so
//! no reporter (however many sessions it opens, however often it speaks) can lock an operator
//! out of `guard block`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Role;

/// Sessions the control socket serves at once.
pub const MAX_SESSIONS: usize = 64;
/// Default of `[control] max_sessions_per_uid`: an app's reporter keeps one or two sessions;
/// a script of an operator's may run a few in parallel.
pub const DEFAULT_SESSIONS_PER_UID: usize = 16;
/// Default of `[control] operator_slots`.
pub const DEFAULT_OPERATOR_SLOTS: usize = 8;

/// Why a permitted peer was not given a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every session is taken.
    Full,
    /// Only operator slots are left, and this peer is a reporter.
    Reserved,
    /// This uid holds its share already.
    PerUid,
}

impl Busy {
    pub const ALL: [Self; 3] = [Self::Full, Self::Reserved, Self::PerUid];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Reserved => "reserved_for_operators",
            Self::PerUid => "per_uid",
        }
    }

    pub(super) fn message(self, per_uid: usize) -> String {
        match self {
            Self::Full => "the agent is serving its maximum number of control connections; \
                           retry shortly"
                .into(),
            Self::Reserved => {
                "the control sessions left are kept for operators; retry shortly".into()
            }
            Self::PerUid => format!(
                "this uid already holds {per_uid} control sessions ([control] \
                 max_sessions_per_uid); close one or retry shortly"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    reporters: usize,
    per_uid: HashMap<u32, usize>,
}

/// The sessions held now, by role and uid.
#[derive(Debug)]
pub(super) struct Slots {
    total: usize,
    /// Sessions reporters may hold together: `total` less the operators' slots.
    reporters: usize,
    per_uid: usize,
    held: Mutex<Held>,
}

impl Slots {
    /// `operator_slots` is held below `total` so a reporter always has one session to take.
    pub(super) fn new(total: usize, operator_slots: usize, per_uid: usize) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Self {
            total,
            reporters: total - operator_slots.min(total - 1),
            per_uid: per_uid.max(1),
            held: Mutex::default(),
        })
    }

    pub(super) fn per_uid(&self) -> usize {
        self.per_uid
    }

    /// A session for `uid` in `role`, held until the permit drops.
    pub(super) fn take(self: &Arc<Self>, uid: u32, role: Role) -> Result<SlotPermit, Busy> {
        let mut held = self.held.lock().expect("slots lock");
        if held.total >= self.total {
            return Err(Busy::Full);
        }
        let reporter = role == Role::Reporter;
        if reporter && held.reporters >= self.reporters {
            return Err(Busy::Reserved);
        }
        let mine = held.per_uid.entry(uid).or_insert(0);
        if *mine >= self.per_uid {
            return Err(Busy::PerUid);
        }
        *mine += 1;
        held.total += 1;
        held.reporters += usize::from(reporter);
        Ok(SlotPermit {
            slots: self.clone(),
            uid,
            reporter,
        })
    }
}

/// One session's slot; given back on drop however the session ends.
#[derive(Debug)]
pub(super) struct SlotPermit {
    slots: Arc<Slots>,
    uid: u32,
    reporter: bool,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("slots lock");
        held.total -= 1;
        held.reporters -= usize::from(self.reporter);
        if let Some(n) = held.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.per_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reporters_never_take_the_operators_slots() {
        let slots = Slots::new(4, 2, 10);
        let r: Vec<_> = (0..2)
            .map(|i| {
                slots
                    .take(1000 + i, Role::Reporter)
                    .expect("a reporter slot")
            })
            .collect();
        assert_eq!(
            slots.take(2000, Role::Reporter).unwrap_err(),
            Busy::Reserved
        );
        let ops: Vec<_> = (0..2)
            .map(|_| slots.take(0, Role::Operator).expect("an operator slot"))
            .collect();
        assert_eq!(slots.take(0, Role::Operator).unwrap_err(), Busy::Full);
        drop(r);
        // Operators may use the reporters' slots too.
        let more = slots.take(0, Role::Operator).expect("a free slot");
        drop((ops, more));
    }

    #[test]
    fn one_uid_holds_at_most_its_share_and_gets_it_back() {
        let slots = Slots::new(64, 8, 3);
        let held: Vec<_> = (0..3)
            .map(|_| slots.take(65534, Role::Reporter).expect("within the cap"))
            .collect();
        assert_eq!(slots.take(65534, Role::Reporter).unwrap_err(), Busy::PerUid);
        // Another uid is not affected.
        let other = slots.take(998, Role::Reporter).expect("another uid");
        drop(held);
        let again = slots.take(65534, Role::Reporter).expect("freed on drop");
        drop((other, again));
        assert_eq!(slots.held.lock().unwrap().per_uid.len(), 0);
    }

    #[test]
    fn a_tiny_socket_still_serves_a_reporter() {
        let slots = Slots::new(1, 8, 16);
        let only = slots.take(7, Role::Reporter).expect("the one slot");
        assert_eq!(slots.take(0, Role::Operator).unwrap_err(), Busy::Full);
        drop(only);
    }
}
