//! The not-yet-admitted budget: connections that hold a descriptor without
//! a request in flight, oldest first, capped globally, per source and per
//! network.
//!
//! Every operation is O(log n): entries are keyed by a sequence number that
//! only grows, so the oldest is the first key of a `BTreeMap` (globally) or
//! of a `BTreeSet` (per prefix), and deadlines are a second ordered index.
//! Memory is bounded by the caps: an entry is only inserted after room was
//! made for it, and a prefix's set is dropped when it empties.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::addr::Prefix;

/// How a connection left the budget without being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// Its source or network was at its cap and it was the oldest there.
    Prefix,
    /// The whole budget was full and it was the oldest.
    Global,
}

/// Which deadline a waiting connection is under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepted, no request yet: `head_timeout`.
    Head,
    /// Between keep-alive requests: `keep_alive_idle`.
    Idle,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Caps {
    pub global: usize,
    pub per_source: usize,
    pub per_network: usize,
    pub source_v4: u8,
    pub source_v6: u8,
    pub network_v4: u8,
    pub network_v6: u8,
}

struct Entry<T> {
    source: Prefix,
    network: Prefix,
    deadline_ns: u64,
    phase: Phase,
    handle: T,
}

pub(crate) struct Waiting<T> {
    caps: Caps,
    next_seq: u64,
    entries: BTreeMap<u64, Entry<T>>,
    deadlines: BTreeSet<(u64, u64)>,
    by_source: HashMap<Prefix, BTreeSet<u64>>,
    by_network: HashMap<Prefix, BTreeSet<u64>>,
}

impl<T> Waiting<T> {
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            // 0 is never a sequence number, so callers can use it for "not
            // waiting".
            next_seq: 1,
            entries: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            by_source: HashMap::new(),
            by_network: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds a connection from `ip` that must stop waiting by `deadline_ns`,
    /// first closing (returning) whoever must go to make room for it: the
    /// oldest of its source, then of its network, then of everyone. Returns
    /// its sequence number.
    pub fn enter(
        &mut self,
        ip: IpAddr,
        phase: Phase,
        deadline_ns: u64,
        handle: T,
        evicted: &mut Vec<(T, Eviction)>,
    ) -> u64 {
        let ip = ip.to_canonical();
        let caps = self.caps;
        let source = Prefix::of(ip, caps.source_v4, caps.source_v6);
        let network = Prefix::of(ip, caps.network_v4, caps.network_v6);
        if let Some(seq) = oldest_if_full(&self.by_source, &source, caps.per_source) {
            evicted.extend(self.leave(seq).map(|h| (h, Eviction::Prefix)));
        }
        if let Some(seq) = oldest_if_full(&self.by_network, &network, caps.per_network) {
            evicted.extend(self.leave(seq).map(|h| (h, Eviction::Prefix)));
        }
        while self.entries.len() >= caps.global {
            let Some((&seq, _)) = self.entries.first_key_value() else {
                break;
            };
            evicted.extend(self.leave(seq).map(|h| (h, Eviction::Global)));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            seq,
            Entry {
                source,
                network,
                deadline_ns,
                phase,
                handle,
            },
        );
        self.deadlines.insert((deadline_ns, seq));
        self.by_source.entry(source).or_default().insert(seq);
        self.by_network.entry(network).or_default().insert(seq);
        seq
    }

    /// Removes `seq` (its request head arrived, or it closed); `None` if it
    /// was already gone.
    pub fn leave(&mut self, seq: u64) -> Option<T> {
        let entry = self.entries.remove(&seq)?;
        self.deadlines.remove(&(entry.deadline_ns, seq));
        remove_from(&mut self.by_source, &entry.source, seq);
        remove_from(&mut self.by_network, &entry.network, seq);
        Some(entry.handle)
    }

    /// Removes and returns every connection whose deadline is at or before
    /// `now_ns`.
    pub fn expire(&mut self, now_ns: u64, expired: &mut Vec<(T, Phase)>) {
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if deadline > now_ns {
                break;
            }
            let phase = self.entries.get(&seq).map(|e| e.phase);
            if let (Some(handle), Some(phase)) = (self.leave(seq), phase) {
                expired.push((handle, phase));
            }
        }
    }

    /// Removes and returns the `n` connections that have waited longest.
    pub fn shed_oldest(&mut self, n: usize, shed: &mut Vec<T>) {
        for _ in 0..n {
            let Some((&seq, _)) = self.entries.first_key_value() else {
                return;
            };
            shed.extend(self.leave(seq));
        }
    }
}

fn oldest_if_full(index: &HashMap<Prefix, BTreeSet<u64>>, key: &Prefix, cap: usize) -> Option<u64> {
    let set = index.get(key)?;
    if set.len() >= cap {
        set.first().copied()
    } else {
        None
    }
}

fn remove_from(index: &mut HashMap<Prefix, BTreeSet<u64>>, key: &Prefix, seq: u64) {
    if let Some(set) = index.get_mut(key) {
        set.remove(&seq);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(global: usize, per_source: usize, per_network: usize) -> Caps {
        Caps {
            global,
            per_source,
            per_network,
            source_v4: 32,
            source_v6: 64,
            network_v4: 24,
            network_v6: 48,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Enters `name` and returns the names evicted to make room.
    fn enter(
        w: &mut Waiting<&'static str>,
        from: &str,
        name: &'static str,
        deadline: u64,
    ) -> Vec<(&'static str, Eviction)> {
        let mut evicted = Vec::new();
        w.enter(ip(from), Phase::Head, deadline, name, &mut evicted);
        evicted
    }

    #[test]
    fn a_full_budget_closes_the_longest_waiting_first() {
        let mut w = Waiting::new(caps(3, 3, 3));
        assert!(enter(&mut w, "198.18.0.1", "a", 100).is_empty());
        assert!(enter(&mut w, "198.18.1.1", "b", 100).is_empty());
        assert!(enter(&mut w, "198.18.2.1", "c", 100).is_empty());
        assert_eq!(
            enter(&mut w, "198.18.3.1", "d", 100),
            [("a", Eviction::Global)]
        );
        assert_eq!(
            enter(&mut w, "198.18.4.1", "e", 100),
            [("b", Eviction::Global)]
        );
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_served_connection_leaves_and_is_never_evicted() {
        let mut w = Waiting::new(caps(2, 2, 2));
        let mut evicted = Vec::new();
        let a = w.enter(ip("198.18.0.1"), Phase::Head, 100, "a", &mut evicted);
        enter(&mut w, "198.18.1.1", "b", 100);
        assert_eq!(w.leave(a), Some("a"));
        assert_eq!(w.leave(a), None);
        assert!(enter(&mut w, "198.18.2.1", "c", 100).is_empty());
        assert_eq!(
            enter(&mut w, "198.18.3.1", "d", 100),
            [("b", Eviction::Global)]
        );
    }

    #[test]
    fn a_full_source_or_network_evicts_its_own_oldest_not_others() {
        let mut w = Waiting::new(caps(100, 2, 3));
        enter(&mut w, "198.18.9.9", "other", 100);
        enter(&mut w, "198.18.0.1", "s1", 100);
        enter(&mut w, "198.18.0.1", "s2", 100);
        assert_eq!(
            enter(&mut w, "198.18.0.1", "s3", 100),
            [("s1", Eviction::Prefix)]
        );
        // The /24 holds s2, s3; one more host there fills it, the next
        // evicts the network's oldest (s2), not "other" (another /24).
        assert!(enter(&mut w, "198.18.0.2", "n1", 100).is_empty());
        assert_eq!(
            enter(&mut w, "198.18.0.3", "n2", 100),
            [("s2", Eviction::Prefix)]
        );
        assert_eq!(w.len(), 4);
        let mut shed = Vec::new();
        w.shed_oldest(1, &mut shed);
        assert_eq!(shed, ["other"]);
    }

    #[test]
    fn ipv6_sources_are_64s_and_networks_48s() {
        let mut w = Waiting::new(caps(100, 1, 2));
        enter(&mut w, "2001:2::1", "a", 100);
        // Same /64: the source's one slot goes to the newcomer.
        assert_eq!(
            enter(&mut w, "2001:2::ffff", "b", 100),
            [("a", Eviction::Prefix)]
        );
        // Another /64 of the same /48.
        assert!(enter(&mut w, "2001:2:0:1::1", "c", 100).is_empty());
        assert_eq!(
            enter(&mut w, "2001:2:0:2::1", "d", 100),
            [("b", Eviction::Prefix)]
        );
        // Another /48 is untouched.
        assert!(enter(&mut w, "2001:2:1::1", "e", 100).is_empty());
        // IPv4-mapped addresses count as IPv4.
        enter(&mut w, "198.18.0.1", "v4", 100);
        assert_eq!(
            enter(&mut w, "::ffff:198.18.0.1", "mapped", 100),
            [("v4", Eviction::Prefix)]
        );
    }

    #[test]
    fn deadlines_expire_in_order_with_their_phase() {
        let mut w = Waiting::new(caps(10, 10, 10));
        let mut evicted = Vec::new();
        w.enter(ip("198.18.0.1"), Phase::Idle, 50, "late", &mut evicted);
        w.enter(ip("198.18.0.2"), Phase::Head, 20, "early", &mut evicted);
        w.enter(ip("198.18.0.3"), Phase::Head, 90, "never", &mut evicted);
        let mut expired = Vec::new();
        w.expire(10, &mut expired);
        assert!(expired.is_empty());
        w.expire(50, &mut expired);
        assert_eq!(expired, [("early", Phase::Head), ("late", Phase::Idle)]);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn memory_stays_bounded_by_the_caps() {
        let mut w = Waiting::new(caps(64, 4, 16));
        let mut evicted = Vec::new();
        for i in 0..10_000u32 {
            let addr = IpAddr::from([198, 18, (i % 7) as u8, (i % 251) as u8]);
            w.enter(addr, Phase::Head, u64::from(i), i, &mut evicted);
            assert!(w.len() <= 64);
        }
        assert!(w.by_source.values().all(|s| s.len() <= 4));
        assert!(w.by_network.values().all(|s| s.len() <= 16));
        assert_eq!(w.deadlines.len(), w.len());
        let mut expired = Vec::new();
        w.expire(u64::MAX, &mut expired);
        assert_eq!(w.len(), 0);
        assert!(w.by_source.is_empty() && w.by_network.is_empty());
    }
}
