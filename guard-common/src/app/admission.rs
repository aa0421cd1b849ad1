//! Admission: who may open a WebSocket or an SSE subscription, and the
//! permits that hold their slots.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use warp::http::{header, HeaderValue, StatusCode};
use warp::reject::{Reject, Rejection};
use warp::reply::{Reply, Response};

use super::metrics::{CloseReason, ConnKind, RejectReason};
use super::{Guard, Limits, Peer, UnreadableProxyHeader};
use crate::addr::Prefix;
use crate::bucket::{TokenBucket, NANO_TOKENS};

/// A refused WebSocket upgrade or SSE subscription; a
/// [`warp::reject::Reject`], turned into a response by [`recover`] or by
/// [`Rejected::into_response`] in the app's own recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: ConnKind,
    pub reason: RejectReason,
    /// What the response's `Retry-After` says (whole seconds, at least 1).
    pub retry_after: Duration,
}

impl Reject for Rejected {}

impl Rejected {
    /// 503 when the whole service is full, 429 when it is this client.
    pub fn status(&self) -> StatusCode {
        match self.reason {
            RejectReason::GlobalCap => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl Reply for Rejected {
    fn into_response(self) -> Response {
        let body = match self.reason {
            RejectReason::GlobalCap => "server busy, retry later\n",
            _ => "too many connections, retry later\n",
        };
        let mut res = Response::new(body.into());
        *res.status_mut() = self.status();
        res.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(self.retry_after_secs()),
        );
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    }
}

/// The guard's part of a `.recover(...)`: answers [`Rejected`] with 429 or
/// 503 and `Retry-After`, [`UnreadableProxyHeader`] with 400,
/// [`UnknownPeer`] with 500, and hands every other rejection on, so it chains
/// with the app's own: `.recover(guard_common::app::recover).recover(mine)`.
pub async fn recover(err: Rejection) -> Result<Response, Rejection> {
    if let Some(r) = err.find::<Rejected>() {
        return Ok(r.clone().into_response());
    }
    if err.find::<UnreadableProxyHeader>().is_some() {
        let mut res = Response::new(
            "the trusted proxy's header does not name the client (an address is expected where the client should be)\n"
                .into(),
        );
        *res.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(res);
    }
    if err.find::<UnknownPeer>().is_some() {
        let mut res = Response::new("the server cannot tell who the client is\n".into());
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(res);
    }
    Err(err)
}

/// A peer's address could not be found (the server is not on TCP);
/// [`recover`] answers 500.
#[derive(Debug)]
pub struct UnknownPeer;

impl Reject for UnknownPeer {}

/// One admitted connection's slot. Dropping it, however the connection
/// ended (close, error, a panic in the handler, the client vanishing before
/// the upgrade finished), gives the slot back.
#[derive(Debug)]
pub struct Permit {
    guard: Guard,
    kind: ConnKind,
    peer: Peer,
    source: Prefix,
    aggregate: Prefix,
    identity: Option<u64>,
    /// Counted when the permit goes, so every admitted connection is
    /// counted closed exactly once, including ones that never started.
    pub(crate) close_reason: CloseReason,
}

impl Permit {
    /// The slot `keys` just took in the tables, held for `peer`.
    pub(crate) fn new(guard: Guard, kind: ConnKind, peer: Peer, keys: Keys) -> Self {
        let Keys {
            source,
            aggregate,
            identity,
        } = keys;
        Self {
            guard,
            kind,
            peer,
            source,
            aggregate,
            identity,
            close_reason: CloseReason::Normal,
        }
    }

    pub fn kind(&self) -> ConnKind {
        self.kind
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub(crate) fn guard(&self) -> &Guard {
        &self.guard
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let inner = &self.guard.inner;
        let mut t = inner.lock_tables();
        t.open_total = t.open_total.saturating_sub(1);
        if let Some(s) = t.sources.get_mut(&self.source) {
            s.open = s.open.saturating_sub(1);
        }
        if let Some(open) = t.aggregates.get_mut(&self.aggregate) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                t.aggregates.remove(&self.aggregate);
            }
        }
        if let Some(id) = self.identity {
            if let Some(e) = t.identities.get_mut(&id) {
                e.open = e.open.saturating_sub(1);
            }
        }
        drop(t);
        inner.metrics.open(self.kind).dec();
        inner.metrics.closed(self.close_reason).inc();
    }
}

/// Per-source state: concurrency, connect rate, storm and offender windows.
#[derive(Debug)]
pub(crate) struct SourceEntry {
    pub open: u32,
    pub bucket: TokenBucket,
    pub last_seen_ns: u64,
    pub storm_start_ns: u64,
    pub storm_attempts: u32,
    /// Distinct identities from this source that misbehaved in the current
    /// offender window (at most `identity_offenders_to_report`).
    pub offenders: Vec<u64>,
    pub offenders_start_ns: u64,
}

#[derive(Debug)]
pub(crate) struct IdentityEntry {
    pub open: u32,
    pub bucket: TokenBucket,
    pub last_seen_ns: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Tables {
    pub open_total: u32,
    pub sources: HashMap<Prefix, SourceEntry>,
    /// Open connections per aggregate prefix (see
    /// [`Limits::per_prefix_max_connections_v4`]); an entry lives only while
    /// something is open, so the map is bounded by `max_connections`.
    pub aggregates: HashMap<Prefix, u32>,
    pub identities: HashMap<u64, IdentityEntry>,
    pub last_retain_ns: u64,
}

impl Tables {
    /// The entry of source `key`, created if need be. A new one in a full
    /// table first makes room (see [`shed`]).
    pub fn source(&mut self, key: Prefix, limits: &Limits, now: u64) -> &mut SourceEntry {
        if !self.sources.contains_key(&key) && self.sources.len() >= limits.max_tracked_sources {
            self.expire(now, limits);
            self.shed_sources(now, limits);
        }
        let e = self.sources.entry(key).or_insert_with(|| SourceEntry {
            open: 0,
            bucket: TokenBucket::full(limits.per_ip_connect_burst, now),
            last_seen_ns: now,
            storm_start_ns: now,
            storm_attempts: 0,
            offenders: Vec::new(),
            offenders_start_ns: now,
        });
        e.last_seen_ns = now;
        e
    }

    /// The entry of identity `id`, created if need be, as [`Tables::source`].
    pub fn identity(&mut self, id: u64, limits: &Limits, now: u64) -> &mut IdentityEntry {
        if !self.identities.contains_key(&id) && self.identities.len() >= limits.max_tracked_sources
        {
            self.expire(now, limits);
            self.shed_identities(now, limits);
        }
        let burst = limits.per_identity_connect_burst;
        let e = self.identities.entry(id).or_insert_with(|| IdentityEntry {
            open: 0,
            bucket: TokenBucket::full(burst, now),
            last_seen_ns: now,
        });
        e.last_seen_ns = now;
        e
    }

    /// Decides on one attempt to open a connection counted under `keys`,
    /// and takes its slot when admitted. Every attempt counts toward its
    /// source's storm window, refused ones included: a client hammering on
    /// its 429s is the storm.
    pub fn admit(&mut self, keys: Keys, limits: &Limits, now: u64) -> Attempt {
        let Keys {
            source,
            aggregate,
            identity,
        } = keys;
        let aggregate_cap = if aggregate.is_v4() {
            limits.per_prefix_max_connections_v4
        } else {
            limits.per_prefix_max_connections_v6
        };
        let refuse = |reason: RejectReason, retry_after: Duration| -> Result<(), Refused> {
            Err(Refused {
                reason,
                retry_after,
            })
        };
        // Periodic; a full table also makes room when a new source or
        // identity comes (Tables::source).
        if now.saturating_sub(self.last_retain_ns) >= duration_ns(limits.source_idle_ttl) / 4 {
            self.retain(now, limits);
        }
        let open_total = self.open_total;
        let s = self.source(source, limits, now);

        let window = duration_ns(limits.storm_window);
        if now.saturating_sub(s.storm_start_ns) >= window {
            s.storm_start_ns = now;
            s.storm_attempts = 0;
        }
        s.storm_attempts = s.storm_attempts.saturating_add(1);
        let storm = (s.storm_attempts == limits.storm_threshold).then_some(StormSeen {
            attempts: s.storm_attempts,
        });

        let verdict = if s.open >= limits.per_ip_max_connections {
            refuse(RejectReason::PerIpCap, limits.retry_after_cap)
        } else if self.aggregates.get(&aggregate).copied().unwrap_or(0) >= aggregate_cap {
            refuse(RejectReason::PerPrefixCap, limits.retry_after_cap)
        } else if identity.is_some_and(|id| {
            self.identities
                .get(&id)
                .is_some_and(|e| e.open >= limits.per_identity_max_connections)
        }) {
            refuse(RejectReason::PerIdentityCap, limits.retry_after_cap)
        } else if open_total >= limits.max_connections {
            let base = limits.retry_after_global;
            refuse(RejectReason::GlobalCap, base + super::jitter(base))
        } else {
            // Rates are charged last so that refused attempts do not
            // also use up the budget of the next, admissible one.
            let s = self.source(source, limits, now);
            let (rate, burst) = (limits.per_ip_connect_rate, limits.per_ip_connect_burst);
            if !s.bucket.try_take(now, rate, burst) {
                let wait = until_next_token(&s.bucket, rate, limits.retry_after_cap);
                refuse(RejectReason::PerIpRate, wait)
            } else if let Some(id) = identity {
                let (rate, burst) = (
                    limits.per_identity_connect_rate,
                    limits.per_identity_connect_burst,
                );
                let e = self.identity(id, limits, now);
                if e.bucket.try_take(now, rate, burst) {
                    e.open += 1;
                    Ok(())
                } else {
                    let wait = until_next_token(&e.bucket, rate, limits.retry_after_cap);
                    // The source's token was spent on an attempt that
                    // failed for the identity's sake; give it back.
                    let s = self.source(source, limits, now);
                    s.bucket.tokens = s.bucket.tokens.saturating_add(NANO_TOKENS);
                    refuse(RejectReason::PerIdentityRate, wait)
                }
            } else {
                Ok(())
            }
            .map(|()| {
                let s = self.source(source, limits, now);
                s.open += 1;
                *self.aggregates.entry(aggregate).or_insert(0) += 1;
                self.open_total += 1;
            })
        };
        Attempt { verdict, storm }
    }

    /// Records that identity `id` from `source` misbehaved; returns how
    /// many distinct identities from it did in the current offender
    /// window, and starts a new window once that reaches
    /// `identity_offenders_to_report`.
    pub fn note_offender(&mut self, source: Prefix, id: u64, limits: &Limits, now: u64) -> usize {
        let s = self.source(source, limits, now);
        if now.saturating_sub(s.offenders_start_ns) >= duration_ns(limits.source_idle_ttl) {
            s.offenders.clear();
            s.offenders_start_ns = now;
        }
        if !s.offenders.contains(&id) {
            s.offenders.push(id);
        }
        let n = s.offenders.len();
        if n >= limits.identity_offenders_to_report as usize {
            s.offenders.clear();
            s.offenders_start_ns = now;
        }
        n
    }

    /// Forgets sources and identities with nothing open that were last
    /// seen over `source_idle_ttl` ago (governor's `retain_recent`).
    fn expire(&mut self, now: u64, limits: &Limits) {
        let idle_ns = duration_ns(limits.source_idle_ttl);
        let recent = |open: u32, last: u64| open > 0 || now.saturating_sub(last) < idle_ns;
        self.sources.retain(|_, e| recent(e.open, e.last_seen_ns));
        self.identities
            .retain(|_, e| recent(e.open, e.last_seen_ns));
        self.last_retain_ns = now;
    }

    /// [`Tables::expire`], then, in a table still full, [`shed`].
    /// The tables stay bounded by `max_tracked_sources` plus the
    /// connections open (at most `max_connections`), and the state of a
    /// limited source is what goes last.
    pub fn retain(&mut self, now: u64, limits: &Limits) {
        self.expire(now, limits);
        self.shed_sources(now, limits);
        self.shed_identities(now, limits);
    }

    fn shed_sources(&mut self, now: u64, limits: &Limits) {
        if self.sources.len() >= limits.max_tracked_sources {
            shed(
                &mut self.sources,
                limits.max_tracked_sources,
                |e| e.open == 0,
                |e| (source_stake(e, limits, now), e.last_seen_ns),
            );
        }
    }

    fn shed_identities(&mut self, now: u64, limits: &Limits) {
        if self.identities.len() >= limits.max_tracked_sources {
            shed(
                &mut self.identities,
                limits.max_tracked_sources,
                |e| e.open == 0,
                |e| (identity_stake(e, limits, now), e.last_seen_ns),
            );
        }
    }
}

/// What forgetting a source would give back to it: the tokens it spent and
/// has not earned back yet, its attempts in the current storm window, and
/// the offenders it has on record. 0 for an entry as good as a new one
/// (one whose bucket has refilled); a rate-limited source's is at least its
/// burst.
fn source_stake(e: &SourceEntry, limits: &Limits, now: u64) -> u64 {
    let spent = spent_tokens(
        e.bucket,
        now,
        limits.per_ip_connect_rate,
        limits.per_ip_connect_burst,
    );
    let storm = if now.saturating_sub(e.storm_start_ns) < duration_ns(limits.storm_window) {
        u64::from(e.storm_attempts)
    } else {
        0
    };
    let offenders =
        if now.saturating_sub(e.offenders_start_ns) < duration_ns(limits.source_idle_ttl) {
            e.offenders.len() as u64
        } else {
            0
        };
    spent + storm + offenders
}

/// The same for an identity: the tokens it has yet to earn back.
fn identity_stake(e: &IdentityEntry, limits: &Limits, now: u64) -> u64 {
    spent_tokens(
        e.bucket,
        now,
        limits.per_identity_connect_rate,
        limits.per_identity_connect_burst,
    )
}

/// Whole tokens (rounded up) `bucket` lacks, at `now`, to be full.
fn spent_tokens(mut bucket: TokenBucket, now: u64, rate: u32, burst: u32) -> u64 {
    bucket.refill(now, rate, burst);
    let missing = (u64::from(burst) * NANO_TOKENS).saturating_sub(bucket.tokens);
    missing.div_ceil(NANO_TOKENS)
}

/// Makes room in a full `map`: forgets entries that `may_go` (nothing open)
/// until an eighth of `max` is free (at least one entry), lowest `rank`
/// first, so each shedding is paid for by many insertions. Ranked by stake,
/// then by when last seen: one-shot sources and refused attempts go before
/// a source that used up its burst, which therefore stays refused however
/// many sources churn through the table; with equal stakes, the longest
/// unseen goes first. Never everything with nothing open at once: that
/// would hand every limited source its burst back.
fn shed<K: Copy + Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    may_go: impl Fn(&V) -> bool,
    rank: impl Fn(&V) -> (u64, u64),
) {
    let target = max.saturating_sub((max / 8).max(1));
    let excess = map.len().saturating_sub(target);
    if excess == 0 {
        return;
    }
    let mut candidates: Vec<((u64, u64), K)> = map
        .iter()
        .filter(|(_, v)| may_go(v))
        .map(|(k, v)| (rank(v), *k))
        .collect();
    if candidates.len() > excess {
        candidates.select_nth_unstable_by_key(excess, |c| c.0);
        candidates.truncate(excess);
    }
    for (_, k) in candidates {
        map.remove(&k);
    }
}

/// How long until `bucket` has a whole token again at `rate`/s.
fn until_next_token(bucket: &TokenBucket, rate: u32, fallback: Duration) -> Duration {
    if rate == 0 {
        return fallback;
    }
    let missing = NANO_TOKENS.saturating_sub(bucket.tokens);
    // `rate` tokens/s is `rate` nano-tokens per ns.
    Duration::from_nanos(missing.div_ceil(u64::from(rate)))
}

pub(crate) fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The table entries one connection counts in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keys {
    pub source: Prefix,
    pub aggregate: Prefix,
    /// The app-supplied identity, hashed.
    pub identity: Option<u64>,
}

/// Why the tables refused an attempt, and when to come back.
pub(crate) struct Refused {
    pub reason: RejectReason,
    pub retry_after: Duration,
}

/// One attempt as the tables saw it: the verdict, and the storm it
/// completed, if any, acted on after the lock.
pub(crate) struct Attempt {
    pub verdict: Result<(), Refused>,
    pub storm: Option<StormSeen>,
}

/// The attempt that brought its source to `storm_threshold`.
pub(crate) struct StormSeen {
    pub attempts: u32,
}

/// The socket address of a request, or a rejection with [`UnknownPeer`].
pub(crate) fn require_remote(
    remote: Option<std::net::SocketAddr>,
) -> Result<std::net::SocketAddr, Rejection> {
    remote.ok_or_else(|| {
        log::error!("guard: request without a remote address; serve the app over TCP");
        warp::reject::custom(UnknownPeer)
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = |ms| Rejected {
            kind: ConnKind::Sse,
            reason: RejectReason::PerIpRate,
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(r(0).retry_after_secs(), 1);
        assert_eq!(r(200).retry_after_secs(), 1);
        assert_eq!(r(1000).retry_after_secs(), 1);
        assert_eq!(r(1001).retry_after_secs(), 2);
    }

    #[test]
    fn time_to_next_token() {
        let empty = TokenBucket {
            tokens: 0,
            last_ns: 0,
        };
        let fallback = Duration::from_secs(9);
        assert_eq!(
            until_next_token(&empty, 5, fallback),
            Duration::from_millis(200)
        );
        assert_eq!(until_next_token(&empty, 0, fallback), fallback);
        let half = TokenBucket {
            tokens: NANO_TOKENS / 2,
            last_ns: 0,
        };
        assert_eq!(
            until_next_token(&half, 1, fallback),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn retain_bounds_the_tables() {
        let mut limits = Limits {
            source_idle_ttl: Duration::from_nanos(1_000),
            max_tracked_sources: 1_000,
            ..Limits::default()
        };
        let mut t = Tables::default();
        let host = |i: u8| Prefix::host(IpAddr::from([198, 18, 0, i]));
        for i in 0..100u8 {
            t.source(host(i), &limits, u64::from(i)).open = u32::from(i % 10 == 0);
        }
        // Nothing is old enough yet.
        t.retain(100, &limits);
        assert_eq!(t.sources.len(), 100);
        // Old and closed goes, open stays however old.
        t.retain(10_000, &limits);
        assert_eq!(t.sources.len(), 10);
        // Past the cap, each new source makes room, never by forgetting
        // everything, never the open ones.
        limits.max_tracked_sources = 50;
        for i in 100..200u8 {
            t.source(host(i), &limits, 10_000 + u64::from(i));
            assert!(t.sources.len() <= 50, "{}", t.sources.len());
        }
        assert!(t.sources.len() > 40, "{}", t.sources.len());
        assert_eq!(t.sources.values().filter(|e| e.open > 0).count(), 10);
        t.retain(10_300, &limits);
        assert!((40..50).contains(&t.sources.len()), "{}", t.sources.len());
    }

    #[test]
    fn a_full_table_sheds_what_has_the_least_at_stake() {
        const SEC: u64 = 1_000_000_000;
        let limits = Limits {
            max_tracked_sources: 16,
            ..Limits::default()
        };
        let (rate, burst) = (limits.per_ip_connect_rate, limits.per_ip_connect_burst);
        let mut t = Tables::default();
        let host = |i: u8, j: u8| Prefix::host(IpAddr::from([198, 18, i, j]));
        // One source spent its burst at once...
        let limited = host(1, 1);
        let e = t.source(limited, &limits, 0);
        for _ in 0..burst {
            assert!(e.bucket.try_take(0, rate, burst));
        }
        // ...then one-shot sources, each a token and an attempt, churn
        // through the table many times over.
        for j in 0..200u8 {
            let now = 1 + u64::from(j);
            let e = t.source(host(2, j), &limits, now);
            assert!(e.bucket.try_take(now, rate, burst));
            e.storm_attempts = 1;
            assert!(t.sources.len() <= 16, "{}", t.sources.len());
        }
        assert!(t.sources.contains_key(&limited), "the limited source kept");
        assert_eq!(
            spent_tokens(t.sources[&limited].bucket, 201, rate, burst),
            u64::from(burst)
        );
        // Among equals, the longest unseen went first.
        assert!(t.sources.contains_key(&host(2, 199)));
        assert!(!t.sources.contains_key(&host(2, 0)));
        // Once it has earned its burst back its state is worth nothing: it
        // goes before sources whose storm window still counts them.
        t.source(host(3, 0), &limits, 5 * SEC);
        t.source(host(3, 1), &limits, 5 * SEC);
        t.source(host(3, 2), &limits, 5 * SEC);
        assert!(!t.sources.contains_key(&limited));
    }
}
