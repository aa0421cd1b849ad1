//! The rules every block meets, whoever decided it: an operator on the control socket, a
//! reporting app, the kernel's escalation, or another host of the fleet. `admit` is the one
//! place they are checked; `Blocklist` keeps the counts the quotas need.
//!
//! In order: the allow-list wins over any block; a prefix is no wider than its decider may
//! name; a decision dated ahead of this host's clock (past a small skew) is refused, so a
//! clock far ahead cannot make a block outrank later unblocks; reporters and fleet hosts
//! are held to a rate; and a new entry must find room: reporters and the fleet never fill
//! the share kept for operators and escalations, all reporters together hold at most their
//! share and each reporting uid at most its quota, and each fleet host at most its share.
//! The TTL is clamped to the blocklist's widest last.

use std::collections::HashMap;
use std::time::Duration;

use guard_common::addr::Prefix;
use prometheus::{IntCounterVec, Opts, Registry};

use super::blocks::{allow_overlap, block_ttl, BlockMeta};
use crate::control::Widest;
use crate::settings::BlockSettings;

const SEC_NS: u64 = 1_000_000_000;

/// Who a block belongs to: which quota it counts against, and who may lift it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Owner {
    /// An operator on the control socket.
    Operator,
    /// The agent itself, for a source that stayed over its cap.
    Escalation,
    /// A reporting peer (the app), by uid: the credential the kernel vouches for.
    Reporter(u32),
    /// Another host of the fleet, by the subject it published on.
    Fleet(String),
    /// Found in the kernel at start, left by an earlier run: its decider is unknown, so it
    /// counts against no quota and a fleet unblock does not lift it unless the fleet's own
    /// replay claims it first.
    Adopted,
}

impl Owner {
    /// The `origin` label of `guard_block_refusals_total`.
    pub(super) fn class(&self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Escalation => "escalation",
            Self::Reporter(_) => "reporter",
            Self::Fleet(_) => "fleet",
            Self::Adopted => "adopted",
        }
    }

    /// Operators and escalations may use the whole blocklist; the others leave a share.
    fn may_use_reserve(&self) -> bool {
        matches!(self, Self::Operator | Self::Escalation | Self::Adopted)
    }
}

/// What the fleet's hosts may each add here (`[fleet]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FleetLimits {
    pub(super) rate: u32,
    pub(super) burst: u32,
    pub(super) share_percent: u32,
}

/// The settings the rules read, copied out of the agent's settings for one decision.
#[derive(Debug, Clone)]
pub(super) struct Rules {
    pub(super) allow: Vec<Prefix>,
    pub(super) blocks: BlockSettings,
    pub(super) widest_block: Widest,
    pub(super) widest_report: Widest,
    pub(super) fleet: Option<FleetLimits>,
}

/// One block someone asks for.
#[derive(Debug, Clone)]
pub(super) struct Proposal<'a> {
    pub(super) prefix: Prefix,
    pub(super) owner: &'a Owner,
    /// None or zero: the default TTL.
    pub(super) ttl: Option<Duration>,
    /// When the decider says it decided or detected this (Unix ns; 0 when it says nothing).
    pub(super) dated_unix_ns: u64,
    /// Whether the decider's rate applies: not to the fleet stream replayed at start,
    /// which the shares bound, since a decision dropped there is gone for good.
    pub(super) rated: bool,
}

/// Why a block was refused. `label` is the metric's and the fleet's drop reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    Allowlisted(Prefix),
    TooWide(Widest),
    FutureDated { ahead: Duration },
    RateLimited { rate: u32 },
    Full { capacity: u32 },
    Reserved { room: u32 },
    ReporterQuota { max: u32 },
    Share { max: u32 },
}

impl Refusal {
    /// Every label, so each series exists from the start.
    pub(super) const LABELS: [&'static str; 8] = [
        "allowlisted",
        "too_wide",
        "future_dated",
        "rate_limited",
        "blocklist_full",
        "reserved",
        "quota",
        "share",
    ];

    pub(super) fn label(&self) -> &'static str {
        match self {
            Self::Allowlisted(_) => "allowlisted",
            Self::TooWide(_) => "too_wide",
            Self::FutureDated { .. } => "future_dated",
            Self::RateLimited { .. } => "rate_limited",
            Self::Full { .. } => "blocklist_full",
            Self::Reserved { .. } => "reserved",
            Self::ReporterQuota { .. } => "quota",
            Self::Share { .. } => "share",
        }
    }

    /// What the decider is told (and the audit log keeps).
    pub(super) fn message(&self, prefix: &Prefix, owner: &Owner) -> String {
        match self {
            Self::Allowlisted(allowed) => format!(
                "{prefix} overlaps allow-listed {allowed} (loopback, trusted proxy or operator \
                 allow-list)"
            ),
            Self::TooWide(widest) => format!(
                "{prefix} is wider than a {} block may be ({widest})",
                owner.class()
            ),
            Self::FutureDated { ahead } => format!(
                "the decision is dated {}s ahead of this host's clock, past [blocks] \
                 max_skew_secs: check the deciding host's clock",
                ahead.as_secs()
            ),
            Self::RateLimited { rate } => format!(
                "over the {rate}/s block rate of this {} (counted in \
                 guard_block_refusals_total); retry later",
                owner.class()
            ),
            Self::Full { capacity } => format!("blocklist full ({capacity} entries)"),
            Self::Reserved { room } => format!(
                "the blocklist's last entries are kept for operators and escalations; a {} may \
                 fill {room} ([blocks] reserved_percent)",
                owner.class()
            ),
            Self::ReporterQuota { max } => format!(
                "this reporter already holds {max} active blocks ([blocks] \
                 reporter_max_entries); let some expire or ask an operator"
            ),
            Self::Share { max } => match owner {
                Owner::Fleet(host) => format!(
                    "host {host} already holds {max} blocks here, its share ([fleet] \
                     host_share_percent)"
                ),
                _ => format!(
                    "reporters already hold {max} blocks together, their share ([blocks] \
                     reporter_share_percent)"
                ),
            },
        }
    }
}

/// A token bucket on the monotonic clock: `rate` per second, at most `burst` saved.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ns: u64,
}

impl Bucket {
    fn full(burst: u32, now_ns: u64) -> Self {
        Self {
            tokens: f64::from(burst),
            at_ns: now_ns,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now_ns: u64) {
        let secs = now_ns.saturating_sub(self.at_ns) as f64 / SEC_NS as f64;
        self.tokens = (self.tokens + secs * f64::from(rate)).min(f64::from(burst));
        self.at_ns = now_ns;
    }

    fn take(&mut self, rate: u32, burst: u32, now_ns: u64) -> bool {
        self.refill(rate, burst, now_ns);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Rate buckets kept at once. Deciders are uids on the socket and hosts of the fleet: a
/// handful. Past this, full (idle) buckets are forgotten; if none is, a new decider waits.
const MAX_BUCKETS: usize = 4096;

/// The blocks the agent holds, with the counts its quotas read, the deciders' rate buckets,
/// and when each kind of refusal was last audited.
#[derive(Debug, Default)]
pub(super) struct Blocklist {
    entries: HashMap<Prefix, BlockMeta>,
    held: HashMap<Owner, usize>,
    reporters: usize,
    buckets: HashMap<Owner, Bucket>,
    audited: HashMap<(Owner, &'static str), (u64, u64)>,
}

impl Blocklist {
    pub(super) fn get(&self, prefix: &Prefix) -> Option<&BlockMeta> {
        self.entries.get(prefix)
    }

    /// Changes an entry's expiry and decision time. Its owner changes only through
    /// [`Self::claim`], so the counts stay right.
    pub(super) fn extend(&mut self, prefix: &Prefix, expires_ns: u64, decided_unix_ns: u64) {
        if let Some(meta) = self.entries.get_mut(prefix) {
            meta.expires_ns = expires_ns;
            meta.decided_unix_ns = meta.decided_unix_ns.max(decided_unix_ns);
        }
    }

    /// An adopted entry that the fleet's replay shows came from `owner`: it belongs to that
    /// host again, so its unblock lifts it.
    pub(super) fn claim(&mut self, prefix: &Prefix, owner: &Owner) {
        let Some(meta) = self.entries.get(prefix) else {
            return;
        };
        if meta.owner != Owner::Adopted || !matches!(owner, Owner::Fleet(_)) {
            return;
        }
        let mut meta = self.remove(prefix).expect("present");
        meta.owner = owner.clone();
        self.insert(*prefix, meta);
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&Prefix, &BlockMeta)> {
        self.entries.iter()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &Prefix> {
        self.entries.keys()
    }

    /// Active entries `owner` holds.
    pub(super) fn held_by(&self, owner: &Owner) -> usize {
        self.held.get(owner).copied().unwrap_or(0)
    }

    pub(super) fn insert(&mut self, prefix: Prefix, meta: BlockMeta) {
        let owner = meta.owner.clone();
        if let Some(old) = self.entries.insert(prefix, meta) {
            self.forget_owner(&old.owner);
        }
        if matches!(owner, Owner::Reporter(_)) {
            self.reporters += 1;
        }
        *self.held.entry(owner).or_insert(0) += 1;
    }

    pub(super) fn remove(&mut self, prefix: &Prefix) -> Option<BlockMeta> {
        let old = self.entries.remove(prefix)?;
        self.forget_owner(&old.owner);
        Some(old)
    }

    fn forget_owner(&mut self, owner: &Owner) {
        if matches!(owner, Owner::Reporter(_)) {
            self.reporters -= 1;
        }
        if let Some(n) = self.held.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(owner);
            }
        }
    }

    /// Takes one token of `owner`'s bucket; false when it has none left.
    fn take_token(&mut self, owner: &Owner, rate: u32, burst: u32, now_ns: u64) -> bool {
        if !self.buckets.contains_key(owner) && self.buckets.len() >= MAX_BUCKETS {
            self.buckets.retain(|_, b| {
                let mut b = *b;
                b.refill(rate, burst, now_ns);
                b.tokens < f64::from(burst)
            });
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        self.buckets
            .entry(owner.clone())
            .or_insert_with(|| Bucket::full(burst, now_ns))
            .take(rate, burst, now_ns)
    }

    /// Whether a refusal of this kind for `owner` is due in the audit log (once per 10 s per
    /// owner and kind, so a flood of refusals cannot flood the log), with how many went
    /// unwritten since the last line.
    pub(super) fn audit_due(
        &mut self,
        owner: &Owner,
        label: &'static str,
        now_ns: u64,
    ) -> Option<u64> {
        const EVERY_NS: u64 = 10 * SEC_NS;
        if self.audited.len() >= MAX_BUCKETS {
            self.audited
                .retain(|_, (at, _)| now_ns.saturating_sub(*at) < EVERY_NS);
        }
        let slot = self.audited.entry((owner.clone(), label)).or_insert((0, 0));
        if slot.0 != 0 && now_ns.saturating_sub(slot.0) < EVERY_NS {
            slot.1 += 1;
            return None;
        }
        let skipped = slot.1;
        *slot = (now_ns.max(1), 0);
        Some(skipped)
    }
}

/// `percent` of `capacity`, rounded down.
fn share_of(capacity: u32, percent: u32) -> u32 {
    (u64::from(capacity) * u64::from(percent) / 100) as u32
}

/// Whether `p` may be blocked as `p.owner` asks, and for how long. `now_ns` is the
/// monotonic clock (rates), `now_unix_ns` the wall clock (the decision's date). A request
/// that is refused for its rate still counts against it: a reporter retrying in a loop
/// stays refused.
pub(super) fn admit(
    rules: &Rules,
    p: &Proposal<'_>,
    list: &mut Blocklist,
    now_ns: u64,
    now_unix_ns: u64,
) -> Result<Duration, Refusal> {
    if let Some(allowed) = allow_overlap(&rules.allow, &p.prefix) {
        return Err(Refusal::Allowlisted(allowed));
    }
    let widest = match p.owner {
        Owner::Reporter(_) => rules.widest_report,
        _ => rules.widest_block,
    };
    if !(widest.admits(&p.prefix) && rules.widest_block.admits(&p.prefix)) {
        return Err(Refusal::TooWide(widest));
    }
    let skew_ns = rules.blocks.max_skew.as_nanos() as u64;
    if p.dated_unix_ns > now_unix_ns.saturating_add(skew_ns) {
        return Err(Refusal::FutureDated {
            ahead: Duration::from_nanos(p.dated_unix_ns - now_unix_ns),
        });
    }
    let rate = match p.owner {
        Owner::Reporter(_) => Some((rules.blocks.reporter.rate, rules.blocks.reporter.burst)),
        Owner::Fleet(_) => rules.fleet.map(|f| (f.rate, f.burst)),
        _ => None,
    };
    if let (Some((rate, burst)), true) = (rate, p.rated) {
        if !list.take_token(p.owner, rate, burst, now_ns) {
            return Err(Refusal::RateLimited { rate });
        }
    }
    if list.get(&p.prefix).is_none() {
        let capacity = rules.blocks.capacity;
        let len = list.len() as u32;
        if len >= capacity {
            return Err(Refusal::Full { capacity });
        }
        if !p.owner.may_use_reserve() {
            let room = capacity - share_of(capacity, rules.blocks.reserved_percent);
            if len >= room {
                return Err(Refusal::Reserved { room });
            }
        }
        match p.owner {
            Owner::Reporter(_) => {
                let max = rules.blocks.reporter.max_entries;
                if list.held_by(p.owner) as u32 >= max {
                    return Err(Refusal::ReporterQuota { max });
                }
                let max = share_of(capacity, rules.blocks.reporter.share_percent);
                if list.reporters as u32 >= max {
                    return Err(Refusal::Share { max });
                }
            }
            Owner::Fleet(_) => {
                if let Some(f) = rules.fleet {
                    let max = share_of(capacity, f.share_percent);
                    if list.held_by(p.owner) as u32 >= max {
                        return Err(Refusal::Share { max });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(block_ttl(p.ttl, &rules.blocks))
}

/// The series the rules add to the agent's metrics.
pub(super) struct RuleMetrics {
    pub(super) refusals: IntCounterVec,
    pub(super) control_busy: IntCounterVec,
}

impl RuleMetrics {
    pub(super) fn register(r: &Registry) -> Self {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let m = Self {
            refusals: vec(
                "guard_block_refusals_total",
                "Blocks refused by the rules every block meets, by who asked (operator, \
                 reporter, escalation, fleet) and why (allowlisted, too_wide, future_dated, \
                 rate_limited, blocklist_full, reserved, quota, share).",
                &["origin", "reason"],
            ),
            control_busy: vec(
                "guard_control_busy_total",
                "Permitted control-socket peers turned away without a session, by why (full, \
                 reserved_for_operators: the rest is kept for operators, per_uid: the uid's \
                 cap).",
                &["why"],
            ),
        };
        for origin in ["operator", "reporter", "escalation", "fleet"] {
            for reason in Refusal::LABELS {
                m.refusals.with_label_values(&[origin, reason]);
            }
        }
        for why in crate::control::Busy::ALL {
            m.control_busy.with_label_values(&[why.label()]);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::blocks::{BlockOrder, DecidedBy};
    use crate::settings::{ReporterLimits, DEFAULT_MAX_SKEW};

    const NOW: u64 = 1_000 * SEC_NS;
    const UNIX: u64 = 1_800_000_000 * SEC_NS;

    fn p(s: &str) -> Prefix {
        s.parse().expect("a prefix")
    }

    fn rules(capacity: u32) -> Rules {
        Rules {
            allow: vec![p("127.0.0.0/8"), p("198.18.0.254/32")],
            blocks: BlockSettings {
                default_ttl: Duration::from_secs(300),
                max_ttl: Duration::from_secs(3600),
                capacity,
                reserved_percent: 10,
                max_skew: DEFAULT_MAX_SKEW,
                reporter: ReporterLimits {
                    rate: 10,
                    burst: 20,
                    max_entries: 30,
                    share_percent: 50,
                },
            },
            widest_block: Widest::BLOCK,
            widest_report: Widest::REPORT,
            fleet: Some(FleetLimits {
                rate: 5,
                burst: 10,
                share_percent: 20,
            }),
        }
    }

    fn ask<'a>(prefix: &str, owner: &'a Owner) -> Proposal<'a> {
        Proposal {
            prefix: p(prefix),
            owner,
            ttl: Some(Duration::from_secs(600)),
            dated_unix_ns: UNIX,
            rated: true,
        }
    }

    fn meta(owner: Owner) -> BlockMeta {
        BlockMeta {
            expires_ns: NOW + 600 * SEC_NS,
            reason: 0,
            origin: "test".into(),
            decided_unix_ns: UNIX,
            owner,
        }
    }

    /// The n-th distinct /32 under 198.19.0.0/16.
    fn nth(n: u32) -> String {
        format!("198.19.{}.{}/32", n / 256, n % 256)
    }

    fn fill(list: &mut Blocklist, owner: &Owner, from: u32, n: u32) {
        for i in from..from + n {
            list.insert(p(&nth(i)), meta(owner.clone()));
        }
    }

    #[test]
    fn every_origin_meets_the_allow_list_the_width_limits_and_the_clock() {
        let r = rules(1000);
        let owners = [
            Owner::Operator,
            Owner::Escalation,
            Owner::Reporter(998),
            Owner::Fleet("host-b".into()),
        ];
        for owner in &owners {
            let mut list = Blocklist::default();
            let refused = |prefix: &str, dated: u64, list: &mut Blocklist| {
                let mut a = ask(prefix, owner);
                a.dated_unix_ns = dated;
                admit(&r, &a, list, NOW, UNIX).unwrap_err()
            };
            assert_eq!(
                refused("198.18.0.0/24", UNIX, &mut list),
                Refusal::Allowlisted(p("198.18.0.254/32")),
                "{owner:?}"
            );
            assert!(
                matches!(refused("0.0.0.0/2", UNIX, &mut list), Refusal::TooWide(_)),
                "{owner:?}"
            );
            assert!(
                matches!(refused("2000::/3", UNIX, &mut list), Refusal::TooWide(_)),
                "{owner:?}"
            );
            // Ten years ahead is refused; within the skew is taken.
            let decade = 10 * 365 * 86_400 * SEC_NS;
            assert!(matches!(
                refused("203.0.113.7/32", UNIX + decade, &mut list),
                Refusal::FutureDated { .. }
            ));
            let mut near = ask("203.0.113.7/32", owner);
            near.dated_unix_ns = UNIX + DEFAULT_MAX_SKEW.as_nanos() as u64;
            assert!(admit(&r, &near, &mut list, NOW, UNIX).is_ok(), "{owner:?}");
        }
        // A reporter is held to the narrower report width.
        let mut list = Blocklist::default();
        let reporter = Owner::Reporter(998);
        assert_eq!(
            admit(&r, &ask("203.0.112.0/20", &reporter), &mut list, NOW, UNIX),
            Err(Refusal::TooWide(Widest::REPORT))
        );
        assert!(admit(
            &r,
            &ask("203.0.112.0/20", &Owner::Operator),
            &mut list,
            NOW,
            UNIX
        )
        .is_ok());
    }

    /// One order from each place a block comes from, as that place builds it.
    fn orders_from_every_origin(prefix: &str) -> Vec<BlockOrder> {
        let order = |by: DecidedBy| BlockOrder {
            prefix: p(prefix),
            ttl: None,
            reason: 0,
            detected_at_unix_ns: UNIX,
            detail: String::new(),
            origin: "test".into(),
            by,
        };
        let fleet = |own: bool, live: bool| DecidedBy::Fleet {
            decided_unix_ns: UNIX,
            host: "host-b".into(),
            own,
            live,
        };
        vec![
            order(DecidedBy::Peer {
                owner: Owner::Operator,
            }),
            order(DecidedBy::Peer {
                owner: Owner::Reporter(998),
            }),
            order(DecidedBy::Here { level: 1 }),
            order(fleet(false, true)),
            order(fleet(false, false)),
            order(fleet(true, false)),
        ]
    }

    #[test]
    fn an_order_from_any_origin_meets_the_width_limit_and_the_allow_list() {
        let r = rules(1000);
        let refusals = |prefix: &str| -> Vec<(Owner, Result<Duration, Refusal>)> {
            orders_from_every_origin(prefix)
                .iter()
                .map(|order| {
                    let owner = order.by.owner();
                    let mut list = Blocklist::default();
                    let result = admit(&r, &order.proposal(&owner), &mut list, NOW, UNIX);
                    (owner, result)
                })
                .collect()
        };
        for (owner, result) in refusals("0.0.0.0/2") {
            // A reporter is told its own, narrower limit.
            let widest = if matches!(owner, Owner::Reporter(_)) {
                Widest::REPORT
            } else {
                Widest::BLOCK
            };
            assert_eq!(result, Err(Refusal::TooWide(widest)), "{owner:?}");
        }
        for (owner, result) in refusals("198.18.0.254/32") {
            let allowed = p("198.18.0.254/32");
            assert_eq!(result, Err(Refusal::Allowlisted(allowed)), "{owner:?}");
        }
    }

    #[test]
    fn an_order_is_dated_and_rated_as_its_origin_says() {
        for order in orders_from_every_origin("203.0.113.7/32") {
            let owner = order.by.owner();
            let proposal = order.proposal(&owner);
            let replayed = matches!(order.by, DecidedBy::Fleet { live: false, .. });
            assert_eq!(proposal.rated, !replayed, "{:?}", order.by);
            assert_eq!(proposal.dated_unix_ns, UNIX, "{:?}", order.by);
            assert_eq!(proposal.prefix, order.prefix);
        }
    }

    #[test]
    fn the_ttl_is_clamped_for_every_origin() {
        let r = rules(1000);
        for owner in [Owner::Escalation, Owner::Fleet("b".into()), Owner::Operator] {
            let mut a = ask("203.0.113.7/32", &owner);
            a.ttl = Some(Duration::from_secs(10 * 86_400));
            assert_eq!(
                admit(&r, &a, &mut Blocklist::default(), NOW, UNIX),
                Ok(Duration::from_secs(3600))
            );
        }
    }

    #[test]
    fn reporters_and_the_fleet_leave_the_reserve_to_operators_and_escalations() {
        let r = rules(100);
        let mut list = Blocklist::default();
        // 90 entries: the room reporters and the fleet may fill (10 % reserved).
        fill(&mut list, &Owner::Operator, 0, 90);
        let host = Owner::Fleet("host-b".into());
        assert_eq!(
            admit(&r, &ask("203.0.113.7/32", &host), &mut list, NOW, UNIX),
            Err(Refusal::Reserved { room: 90 })
        );
        assert_eq!(
            admit(
                &r,
                &ask("203.0.113.7/32", &Owner::Reporter(998)),
                &mut list,
                NOW,
                UNIX
            ),
            Err(Refusal::Reserved { room: 90 })
        );
        for owner in [Owner::Operator, Owner::Escalation] {
            assert!(admit(&r, &ask("203.0.113.7/32", &owner), &mut list, NOW, UNIX).is_ok());
        }
        fill(&mut list, &Owner::Operator, 90, 10);
        assert_eq!(
            admit(
                &r,
                &ask("203.0.113.7/32", &Owner::Operator),
                &mut list,
                NOW,
                UNIX
            ),
            Err(Refusal::Full { capacity: 100 })
        );
        // A prefix already held is extended whatever the room.
        assert!(admit(&r, &ask(&nth(3), &host), &mut list, NOW, UNIX).is_ok());
    }

    #[test]
    fn a_reporting_uid_has_a_quota_and_reporters_together_a_share() {
        let r = rules(100);
        let mut list = Blocklist::default();
        let a = Owner::Reporter(998);
        fill(&mut list, &a, 0, 30);
        assert_eq!(
            admit(&r, &ask("203.0.113.7/32", &a), &mut list, NOW, UNIX),
            Err(Refusal::ReporterQuota { max: 30 })
        );
        // Another uid may report until reporters hold half the blocklist.
        let b = Owner::Reporter(999);
        fill(&mut list, &b, 30, 20);
        assert_eq!(
            admit(&r, &ask("203.0.113.7/32", &b), &mut list, NOW, UNIX),
            Err(Refusal::Share { max: 50 })
        );
        // Expiries give the room back.
        list.remove(&p(&nth(0)));
        assert!(admit(&r, &ask("203.0.113.7/32", &b), &mut list, NOW, UNIX).is_ok());
        assert_eq!(list.held_by(&a), 29);
    }

    #[test]
    fn each_fleet_host_holds_at_most_its_share() {
        let r = rules(100);
        let mut list = Blocklist::default();
        let b = Owner::Fleet("host-b".into());
        fill(&mut list, &b, 0, 20);
        assert_eq!(
            admit(&r, &ask("203.0.113.7/32", &b), &mut list, NOW, UNIX),
            Err(Refusal::Share { max: 20 })
        );
        let c = Owner::Fleet("host-c".into());
        assert!(admit(&r, &ask("203.0.113.7/32", &c), &mut list, NOW, UNIX).is_ok());
    }

    #[test]
    fn reporters_and_fleet_hosts_are_rate_limited_each_on_their_own() {
        let r = rules(100_000);
        let mut list = Blocklist::default();
        let reporter = Owner::Reporter(998);
        let host = Owner::Fleet("host-b".into());
        for owner in [&reporter, &host] {
            let burst = if matches!(owner, Owner::Reporter(_)) {
                20
            } else {
                10
            };
            for i in 0..burst {
                assert!(
                    admit(&r, &ask(&nth(i), owner), &mut list, NOW, UNIX).is_ok(),
                    "{owner:?} {i}"
                );
            }
            assert!(matches!(
                admit(&r, &ask(&nth(500), owner), &mut list, NOW, UNIX),
                Err(Refusal::RateLimited { .. })
            ));
        }
        // Another reporter has its own bucket; operators have none.
        assert!(admit(&r, &ask(&nth(1), &Owner::Reporter(7)), &mut list, NOW, UNIX).is_ok());
        for i in 0..100 {
            assert!(admit(&r, &ask(&nth(i), &Owner::Operator), &mut list, NOW, UNIX).is_ok());
        }
        // A second refills one report at 10/s; the replay of the stream is not rated.
        assert!(admit(
            &r,
            &ask(&nth(9), &reporter),
            &mut list,
            NOW + SEC_NS / 10,
            UNIX
        )
        .is_ok());
        let mut replay = ask(&nth(9), &host);
        replay.rated = false;
        assert!(admit(&r, &replay, &mut list, NOW, UNIX).is_ok());
    }

    #[test]
    fn counts_follow_inserts_removals_and_claims() {
        let mut list = Blocklist::default();
        let b = Owner::Fleet("host-b".into());
        list.insert(p("203.0.113.1/32"), meta(Owner::Adopted));
        list.insert(p("203.0.113.2/32"), meta(Owner::Reporter(1)));
        assert_eq!((list.held_by(&Owner::Adopted), list.reporters), (1, 1));
        list.claim(&p("203.0.113.1/32"), &b);
        assert_eq!((list.held_by(&Owner::Adopted), list.held_by(&b)), (0, 1));
        // Only adopted entries are claimed, and only by the fleet.
        list.claim(&p("203.0.113.2/32"), &b);
        assert_eq!(
            list.get(&p("203.0.113.2/32")).unwrap().owner,
            Owner::Reporter(1)
        );
        // Replacing an entry moves its count.
        list.insert(p("203.0.113.2/32"), meta(Owner::Operator));
        assert_eq!((list.reporters, list.held_by(&Owner::Operator)), (0, 1));
        list.remove(&p("203.0.113.2/32"));
        assert!(!list.held.contains_key(&Owner::Operator));
    }

    #[test]
    fn refusals_are_audited_once_per_ten_seconds_with_the_count_skipped() {
        let mut list = Blocklist::default();
        let o = Owner::Reporter(998);
        assert_eq!(list.audit_due(&o, "quota", NOW), Some(0));
        assert_eq!(list.audit_due(&o, "quota", NOW + SEC_NS), None);
        assert_eq!(list.audit_due(&o, "quota", NOW + 2 * SEC_NS), None);
        assert_eq!(list.audit_due(&o, "share", NOW + 2 * SEC_NS), Some(0));
        assert_eq!(list.audit_due(&o, "quota", NOW + 10 * SEC_NS), Some(2));
    }
}
