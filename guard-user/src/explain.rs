//! `guard explain ADDR`: what the kernel would do with the next SYN from one
//! address to a protected port, and every input of that verdict.
//!
//! [`next_syn`] is a pure function that takes the inputs in the order
//! `decide` in guard-ebpf/src/main.rs consults them (allowlist, blocklist,
//! connection cap, cookies for unknown sources, aggregate then per-source
//! bucket, global budget with the known-good exemption). Keep the two in
//! step: a reordering there is a reordering here.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use guard_common::{addr::Prefix, state::reason, syncookie, LiveConfig, SourceState, TokenBucket};
use serde::Serialize;

use crate::datapath::{monotonic_ns, DatapathError, GuardMaps};

/// What the program does with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Pass,
    Drop,
    /// Answered with a SYN cookie; the source must complete the handshake.
    Cookie,
}

impl Action {
    pub const fn upper(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Drop => "DROP",
            Self::Cookie => "COOKIE",
        }
    }
}

/// Which step of the decision settled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// No port is protected: nothing is judged.
    NoProtectedPort,
    Allowlisted,
    Blocked,
    ConnLimit,
    /// Cookies on and the source is not known good (always, or the global
    /// budget is dry).
    UnknownSourceCookie,
    AggregateRate,
    SourceRate,
    /// The global budget is dry but the source completed a handshake
    /// within known_good_ttl_s.
    KnownGoodOverBudget,
    /// The global budget is dry and cookies are on.
    OverBudgetCookie,
    GlobalBudget,
    /// Under every cap.
    WithinLimits,
}

impl Cause {
    pub const fn text(self) -> &'static str {
        match self {
            Self::NoProtectedPort => "no port is protected",
            Self::Allowlisted => "allow-listed",
            Self::Blocked => "blocked",
            Self::ConnLimit => "at its concurrent-connection cap",
            Self::UnknownSourceCookie => "not known good while SYN cookies are on",
            Self::AggregateRate => "its aggregate prefix is over its SYN rate",
            Self::SourceRate => "over its per-source SYN rate",
            Self::KnownGoodOverBudget => "global budget dry, but known good",
            Self::OverBudgetCookie => "global budget dry and SYN cookies are on",
            Self::GlobalBudget => "global budget dry and not known good",
            Self::WithinLimits => "within every limit",
        }
    }
}

/// The verdict inputs for one address, read from the maps at one instant.
/// Buckets are as stored; [`next_syn`] refills them to `now_ns` on a copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inputs {
    pub any_port_protected: bool,
    pub allowed: bool,
    /// A blocklist entry matches and has not expired.
    pub blocked: bool,
    pub open_connections: u64,
    /// Completed a handshake within known_good_ttl_s.
    pub known_good: bool,
    /// `None`: not tracked yet (the program starts it with a full bucket).
    pub source: Option<TokenBucket>,
    pub aggregate: Option<TokenBucket>,
    pub global: Option<TokenBucket>,
    pub now_ns: u64,
}

/// What the next SYN gets: `decided` is the program's verdict, `effective`
/// what happens to the packet (a pass in dry-run for anything but a pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NextSyn {
    pub decided: Action,
    pub effective: Action,
    pub cause: Cause,
    pub dry_run: bool,
}

fn tokens_now(b: Option<TokenBucket>, now: u64, rate: u32, burst: u32) -> u64 {
    match b {
        Some(mut b) => {
            b.refill(now, rate, burst);
            b.available()
        }
        None => burst as u64,
    }
}

/// The verdict for a plain SYN (no IP options or extension headers, no
/// FIN/RST) from the address to a protected port, assuming the agent has
/// cookie keys installed whenever cookies are on (it installs them at
/// start).
pub fn next_syn(cfg: &LiveConfig, i: &Inputs) -> NextSyn {
    let verdict = |decided: Action, cause: Cause| NextSyn {
        decided,
        effective: if cfg.dry_run() { Action::Pass } else { decided },
        cause,
        dry_run: cfg.dry_run(),
    };
    if !i.any_port_protected {
        return verdict(Action::Pass, Cause::NoProtectedPort);
    }
    if cfg.may_allow() && i.allowed {
        return verdict(Action::Pass, Cause::Allowlisted);
    }
    if cfg.may_block() && i.blocked {
        return verdict(Action::Drop, Cause::Blocked);
    }
    if cfg.conn_limit_enabled() && i.open_connections >= cfg.conn_limit as u64 {
        return verdict(Action::Drop, Cause::ConnLimit);
    }
    let now = i.now_ns;
    let global_has_token = !cfg.global_budget_enabled()
        || tokens_now(i.global, now, cfg.global_syn_rate, cfg.global_syn_burst) > 0;
    let cookies = cfg.cookies_enabled();
    if cookies && !i.known_good && (cfg.syn_cookies == syncookie::MODE_ALWAYS || !global_has_token)
    {
        return verdict(Action::Cookie, Cause::UnknownSourceCookie);
    }
    if cfg.aggregate_cap_enabled()
        && tokens_now(i.aggregate, now, cfg.aggregate_rate, cfg.aggregate_burst) == 0
    {
        return verdict(Action::Drop, Cause::AggregateRate);
    }
    if cfg.source_cap_enabled() && tokens_now(i.source, now, cfg.syn_rate, cfg.syn_burst) == 0 {
        return verdict(Action::Drop, Cause::SourceRate);
    }
    if !global_has_token {
        if i.known_good {
            return verdict(Action::Pass, Cause::KnownGoodOverBudget);
        }
        if cookies {
            return verdict(Action::Cookie, Cause::OverBudgetCookie);
        }
        return verdict(Action::Drop, Cause::GlobalBudget);
    }
    verdict(Action::Pass, Cause::WithinLimits)
}

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

fn bucket(
    enabled: bool,
    key: Option<String>,
    state: Option<SourceState>,
    rate: u32,
    burst: u32,
    now_ns: u64,
    now_unix: SystemTime,
) -> BucketState {
    BucketState {
        enabled,
        key,
        tracked: state.is_some(),
        rate_per_sec: rate,
        burst,
        tokens: tokens_now(state.map(|s| s.bucket), now_ns, rate, burst),
        syns: state.map(|s| s.syns),
        over_cap: state.map(|s| s.over_cap),
        first_seen: state.map(|s| Instant::from_monotonic(s.first_seen_ns, now_ns, now_unix)),
    }
}

/// Gathers the explanation from the pinned maps; who made a block and when
/// is the agent's to tell ([`Explanation::set_block_meta`]).
pub fn explain(maps: &GuardMaps, ip: IpAddr) -> Result<Explanation, DatapathError> {
    let cfg = maps.config()?;
    let ports = maps.ports()?;
    let now_ns = monotonic_ns();
    let now_unix = SystemTime::now();
    let p = maps.point(ip, &cfg);
    // The trie says whether something matches; the listing says what.
    let allowlisted_by = if p.allowed {
        maps.allows()?
            .into_iter()
            .filter(|a| a.contains(ip))
            .max_by_key(Prefix::prefix_len)
    } else {
        None
    };
    let block_prefix = match p.block {
        Some(_) => maps
            .blocks()?
            .into_iter()
            .filter(|(b, _)| b.contains(ip))
            .max_by_key(|(b, _)| b.prefix_len()),
        None => None,
    };
    let blocked_by = block_prefix.map(|(prefix, entry)| BlockHit {
        prefix,
        reason: reason::name(entry.reason),
        active: entry.is_active(now_ns),
        until: (entry.expires_ns != 0)
            .then(|| Instant::from_monotonic(entry.expires_ns, now_ns, now_unix)),
        expires_in_secs: (entry.expires_ns != 0)
            .then(|| entry.expires_ns.saturating_sub(now_ns) / 1_000_000_000),
        origin: None,
        since: None,
        detail: None,
    });
    let known_good = p
        .last_handshake_ns
        .is_some_and(|t| now_ns.saturating_sub(t) < cfg.known_good_ttl_ns());
    let inputs = Inputs {
        any_port_protected: !ports.is_empty(),
        allowed: p.allowed,
        blocked: p.block.is_some_and(|b| b.is_active(now_ns)),
        open_connections: p.open_connections,
        known_good,
        source: p.source.map(|s| s.bucket),
        aggregate: p.aggregate.map(|s| s.bucket),
        global: p.global,
        now_ns,
    };
    let next = next_syn(&cfg, &inputs);
    let global_state = p.global.map(|bucket| SourceState {
        bucket,
        ..Default::default()
    });
    let mut global_budget = bucket(
        cfg.global_budget_enabled(),
        None,
        global_state,
        cfg.global_syn_rate,
        cfg.global_syn_burst,
        now_ns,
        now_unix,
    );
    // The one global slot always exists; "tracked" means nothing for it.
    (
        global_budget.syns,
        global_budget.over_cap,
        global_budget.first_seen,
    ) = (None, None, None);
    let mut e = Explanation {
        address: ip.to_string(),
        protected_ports: ports,
        dry_run: cfg.dry_run(),
        syn_cookies: syncookie::MODE_NAMES
            .get(cfg.syn_cookies as usize)
            .copied()
            .unwrap_or("unknown"),
        allowlisted_by: allowlisted_by.map(|a| a.to_string()),
        blocked_by,
        source: bucket(
            cfg.source_cap_enabled(),
            Some(p.source_key.to_string()),
            p.source,
            cfg.syn_rate,
            cfg.syn_burst,
            now_ns,
            now_unix,
        ),
        aggregate: bucket(
            cfg.aggregate_cap_enabled(),
            Some(p.aggregate_key.to_string()),
            p.aggregate,
            cfg.aggregate_rate,
            cfg.aggregate_burst,
            now_ns,
            now_unix,
        ),
        connections: Connections {
            open: p.open_connections,
            limit: cfg.conn_limit,
        },
        known_good: KnownGood {
            known_good,
            last_handshake: p
                .last_handshake_ns
                .map(|t| Instant::from_monotonic(t, now_ns, now_unix)),
            ttl_secs: cfg.known_good_ttl_s,
        },
        global_budget,
        next_syn: next,
        summary: String::new(),
        escalation: Vec::new(),
        notes: Vec::new(),
        keys: (
            p.source_key,
            cfg.aggregate_cap_enabled().then_some(p.aggregate_key),
        ),
    };
    e.summary = summary(&e);
    Ok(e)
}

/// Who blocked a prefix and when, from the audit log.
#[derive(Debug, Clone, Default)]
pub struct BlockMeta {
    pub origin: Option<String>,
    pub since_unix: Option<u64>,
    pub detail: Option<String>,
}

impl BlockMeta {
    /// The newest `block` / `escalate` line about exactly `prefix` in
    /// `lines` (audit JSON lines, oldest first).
    pub fn from_audit(lines: &[String], prefix: &Prefix) -> Option<Self> {
        let want = prefix.to_string();
        lines.iter().rev().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let event = v.get("event")?.as_str()?;
            if !matches!(event, "block" | "escalate") || v.get("prefix")?.as_str()? != want {
                return None;
            }
            let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            Some(Self {
                origin: text("origin"),
                since_unix: v.get("ts_unix").and_then(|t| t.as_u64()),
                detail: text("detail"),
            })
        })
    }
}

fn bucket_line(name: &str, b: &BucketState) -> String {
    if !b.enabled {
        return format!("{name}: cap off\n");
    }
    let key = b
        .key
        .as_deref()
        .map(|k| format!(" {k}"))
        .unwrap_or_default();
    let mut line = format!(
        "{name}:{key} {} of {} tokens (refills {}/s)",
        b.tokens, b.burst, b.rate_per_sec
    );
    match (b.syns, b.over_cap) {
        (Some(syns), Some(over)) => line.push_str(&format!(", {syns} SYNs, {over} over cap")),
        _ if b.key.is_some() => line.push_str(", not tracked yet (starts full)"),
        _ => {}
    }
    line.push('\n');
    line
}

/// The text form of `guard explain`.
pub fn render_text(e: &Explanation) -> String {
    let mut t = format!("{}\n", e.address);
    t.push_str(&format!(
        "allow list: {}\n",
        e.allowlisted_by
            .as_ref()
            .map(|p| format!("allow-listed by {p}"))
            .unwrap_or_else(|| "not allow-listed".into())
    ));
    match &e.blocked_by {
        None => t.push_str("blocklist: not blocked\n"),
        Some(b) => {
            t.push_str(&format!(
                "blocklist: blocked by {} (reason {}{})\n",
                b.prefix,
                b.reason,
                if b.active {
                    ""
                } else {
                    ", expired, not swept yet"
                }
            ));
            if let Some(o) = &b.origin {
                t.push_str(&format!("  by: {o}\n"));
            }
            if let Some(s) = &b.since {
                t.push_str(&format!("  since: {}\n", s.rfc3339));
            }
            match (&b.until, b.expires_in_secs) {
                (Some(u), Some(left)) => {
                    t.push_str(&format!("  until: {} ({left}s left)\n", u.rfc3339))
                }
                _ => t.push_str("  until: never expires\n"),
            }
            if let Some(d) = b.detail.as_deref().filter(|d| !d.is_empty()) {
                t.push_str(&format!("  detail: {d}\n"));
            }
        }
    }
    t.push_str(&bucket_line("source", &e.source));
    t.push_str(&bucket_line("aggregate", &e.aggregate));
    t.push_str(&format!(
        "connections: {} open{}\n",
        e.connections.open,
        if e.connections.limit == 0 {
            ", no cap".to_string()
        } else {
            format!(", cap {}", e.connections.limit)
        }
    ));
    t.push_str(&format!(
        "known good: {}\n",
        match (&e.known_good.last_handshake, e.known_good.known_good) {
            (Some(at), true) => format!("yes (last handshake {})", at.rfc3339),
            (Some(at), false) => format!("no (last handshake {}, expired)", at.rfc3339),
            (None, _) => "no".into(),
        }
    ));
    t.push_str(&bucket_line("global budget", &e.global_budget));
    for x in &e.escalation {
        t.push_str(&format!(
            "escalation: {} {}\n",
            x.prefix,
            if !x.tracked {
                "no over-cap streak watched".to_string()
            } else {
                format!("{} strikes, current streak {}s", x.strikes, x.streak_secs)
            }
        ));
    }
    t.push_str(&format!(
        "dry-run: {}; syn cookies: {}; protected ports: {:?}\n",
        if e.dry_run { "on" } else { "off" },
        e.syn_cookies,
        e.protected_ports
    ));
    for n in &e.notes {
        t.push_str(&format!("note: {n}\n"));
    }
    t.push_str(&e.summary);
    t.push('\n');
    t
}

/// "next SYN to a protected port would be: ..." for the text output.
pub fn summary(e: &Explanation) -> String {
    let n = &e.next_syn;
    let why = match n.cause {
        Cause::Allowlisted => format!(
            "allow-listed by {}",
            e.allowlisted_by.as_deref().unwrap_or("?")
        ),
        Cause::Blocked => match &e.blocked_by {
            Some(b) => format!(
                "blocked by {}, {}{}",
                b.prefix,
                b.reason,
                b.origin
                    .as_ref()
                    .map(|o| format!(", by {o}"))
                    .unwrap_or_default()
            ),
            None => "blocked".into(),
        },
        Cause::ConnLimit => format!(
            "{} open connections, cap {}",
            e.connections.open, e.connections.limit
        ),
        Cause::SourceRate => format!(
            "{} over {}/s burst {}",
            e.source.key.as_deref().unwrap_or("?"),
            e.source.rate_per_sec,
            e.source.burst
        ),
        Cause::AggregateRate => format!(
            "{} over {}/s burst {}",
            e.aggregate.key.as_deref().unwrap_or("?"),
            e.aggregate.rate_per_sec,
            e.aggregate.burst
        ),
        other => other.text().to_string(),
    };
    if n.dry_run && n.decided != Action::Pass {
        return format!(
            "next SYN to a protected port would be: PASS in dry-run, else {} ({why})",
            n.decided.upper()
        );
    }
    format!(
        "next SYN to a protected port would be: {} ({why})",
        n.effective.upper()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use guard_common::config::{FLAG_ALLOW_EMPTY, FLAG_BLOCK_EMPTY, FLAG_DRY_RUN};

    const SEC: u64 = 1_000_000_000;

    fn base() -> Inputs {
        Inputs {
            any_port_protected: true,
            now_ns: 100 * SEC,
            ..Default::default()
        }
    }

    fn empty(now: u64) -> Option<TokenBucket> {
        Some(TokenBucket {
            tokens: 0,
            last_ns: now,
        })
    }

    fn check(cfg: &LiveConfig, i: &Inputs, decided: Action, cause: Cause) {
        let v = next_syn(cfg, i);
        assert_eq!((v.decided, v.cause), (decided, cause), "{i:?}");
    }

    #[test]
    fn an_untracked_source_passes_under_the_defaults() {
        let cfg = LiveConfig::DEFAULT;
        check(&cfg, &base(), Action::Pass, Cause::WithinLimits);
        let v = next_syn(&cfg, &base());
        assert_eq!(v.effective, Action::Pass);
        assert!(!v.dry_run);
    }

    #[test]
    fn nothing_protected_is_never_judged() {
        let i = Inputs {
            any_port_protected: false,
            blocked: true,
            ..base()
        };
        check(
            &LiveConfig::DEFAULT,
            &i,
            Action::Pass,
            Cause::NoProtectedPort,
        );
    }

    #[test]
    fn allowlist_beats_block_and_block_beats_caps() {
        let cfg = LiveConfig {
            conn_limit: 1,
            ..LiveConfig::DEFAULT
        };
        let i = Inputs {
            allowed: true,
            blocked: true,
            open_connections: 5,
            source: empty(100 * SEC),
            ..base()
        };
        check(&cfg, &i, Action::Pass, Cause::Allowlisted);
        let i = Inputs {
            allowed: false,
            ..i
        };
        check(&cfg, &i, Action::Drop, Cause::Blocked);
        let i = Inputs {
            blocked: false,
            ..i
        };
        check(&cfg, &i, Action::Drop, Cause::ConnLimit);
        let i = Inputs {
            open_connections: 0,
            ..i
        };
        check(&cfg, &i, Action::Drop, Cause::SourceRate);
    }

    #[test]
    fn the_empty_list_flags_skip_their_lookups_as_the_program_does() {
        // With the flag saying "empty" the program does not look, so a stale
        // hit read from the map must not count either.
        let cfg = LiveConfig {
            flags: FLAG_ALLOW_EMPTY | FLAG_BLOCK_EMPTY,
            ..LiveConfig::DEFAULT
        };
        let i = Inputs {
            allowed: true,
            blocked: true,
            ..base()
        };
        check(&cfg, &i, Action::Pass, Cause::WithinLimits);
    }

    #[test]
    fn buckets_refill_before_judging() {
        let cfg = LiveConfig::DEFAULT; // 20/s, burst 40
        let now = 100 * SEC;
        let drained_long_ago = Some(TokenBucket {
            tokens: 0,
            last_ns: now - SEC,
        });
        let i = Inputs {
            source: drained_long_ago,
            ..base()
        };
        check(&cfg, &i, Action::Pass, Cause::WithinLimits);
        let i = Inputs {
            source: empty(now),
            ..base()
        };
        check(&cfg, &i, Action::Drop, Cause::SourceRate);
        let off = LiveConfig {
            syn_burst: 0,
            ..cfg
        };
        check(&off, &i, Action::Pass, Cause::WithinLimits);
    }

    #[test]
    fn aggregate_is_judged_before_the_source() {
        let cfg = LiveConfig {
            aggregate_rate: 10,
            aggregate_burst: 10,
            ..LiveConfig::DEFAULT
        };
        let now = 100 * SEC;
        let i = Inputs {
            aggregate: empty(now),
            source: empty(now),
            ..base()
        };
        check(&cfg, &i, Action::Drop, Cause::AggregateRate);
        let i = Inputs {
            aggregate: None,
            ..i
        };
        check(&cfg, &i, Action::Drop, Cause::SourceRate);
    }

    #[test]
    fn global_budget_spares_known_good_and_falls_back_to_cookies() {
        let now = 100 * SEC;
        let cfg = LiveConfig {
            global_syn_rate: 100,
            global_syn_burst: 100,
            ..LiveConfig::DEFAULT
        };
        let dry = Inputs {
            global: empty(now),
            ..base()
        };
        check(&cfg, &dry, Action::Drop, Cause::GlobalBudget);
        let good = Inputs {
            known_good: true,
            ..dry
        };
        check(&cfg, &good, Action::Pass, Cause::KnownGoodOverBudget);
        let under_attack = LiveConfig {
            syn_cookies: syncookie::MODE_UNDER_ATTACK,
            ..cfg
        };
        check(
            &under_attack,
            &dry,
            Action::Cookie,
            Cause::UnknownSourceCookie,
        );
        check(
            &under_attack,
            &good,
            Action::Pass,
            Cause::KnownGoodOverBudget,
        );
        let full = Inputs {
            global: None,
            ..base()
        };
        check(&under_attack, &full, Action::Pass, Cause::WithinLimits);
        let always = LiveConfig {
            syn_cookies: syncookie::MODE_ALWAYS,
            ..cfg
        };
        check(&always, &full, Action::Cookie, Cause::UnknownSourceCookie);
        // A known-good source skips the cookie but is still charged.
        let good_drained = Inputs {
            known_good: true,
            source: empty(now),
            ..full
        };
        check(&always, &good_drained, Action::Drop, Cause::SourceRate);
        // The cookie for unknown sources comes before the caps.
        let unknown_drained = Inputs {
            known_good: false,
            ..good_drained
        };
        check(
            &always,
            &unknown_drained,
            Action::Cookie,
            Cause::UnknownSourceCookie,
        );
    }

    #[test]
    fn dry_run_passes_what_it_would_drop() {
        let cfg = LiveConfig {
            flags: FLAG_DRY_RUN,
            ..LiveConfig::DEFAULT
        };
        let i = Inputs {
            blocked: true,
            ..base()
        };
        let v = next_syn(&cfg, &i);
        assert_eq!(
            v,
            NextSyn {
                decided: Action::Drop,
                effective: Action::Pass,
                cause: Cause::Blocked,
                dry_run: true,
            }
        );
    }

    #[test]
    fn block_meta_is_the_newest_block_of_exactly_that_prefix() {
        let p: Prefix = "198.18.0.0/24".parse().unwrap();
        let lines: Vec<String> = [
            r#"{"ts_unix":100,"event":"block","prefix":"198.18.0.0/24","origin":"old","detail":"a"}"#,
            r#"{"ts_unix":200,"event":"escalate","prefix":"198.18.0.0/24","origin":"kernel:over_cap","detail":"b"}"#,
            r#"{"ts_unix":300,"event":"block","prefix":"198.18.0.3/32","origin":"narrower"}"#,
            r#"{"ts_unix":400,"event":"unblock","prefix":"198.18.0.0/24","origin":"op"}"#,
            "not json",
        ]
        .map(String::from)
        .to_vec();
        let m = BlockMeta::from_audit(&lines, &p).expect("found");
        assert_eq!(m.origin.as_deref(), Some("kernel:over_cap"));
        assert_eq!(m.since_unix, Some(200));
        assert_eq!(m.detail.as_deref(), Some("b"));
        let other: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(BlockMeta::from_audit(&lines, &other).is_none());
    }

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
