//! [`next_syn`] is a pure function that takes the inputs in the order
//! `decide` in guard-ebpf/src/main.rs consults them (allowlist, blocklist,
//! connection cap counting handshakes in flight, cookies for unknown
//! sources within their destination's SYN-ACK share, aggregate then
//! per-source bucket, global budget with the known-good exemption).
//!
//! The two orders are held together by a test, not derived from one
//! description: tests/tests/verdict_order.rs writes every combination of
//! the conditions that make a rule fire into the real program's maps and
//! compares what this function says with what the program does to a SYN
//! (`BPF_PROG_TEST_RUN`). A shared description was weighed and left: in
//! the program the order is interleaved with what deciding costs and
//! changes (the clock read once, buckets created full and charged, a
//! retransmitted SYN spared the cap, the global budget peeked before the
//! caps and taken after them, the SYN-ACK built in place), all under the
//! verifier's stack and instruction limits, while this side must only read.
//! A rule table interpreted by both would put a loop and indirect state on
//! the per-packet path; generating both from one source would hide the
//! program's order from its readers. The pure pieces both sides can share
//! (bucket refill, prefix keys, slots) already come from guard-common; the
//! test also catches a drift in those reads (map keys, slots, expiry), which
//! a shared order alone would not.

use guard_common::{syncookie, LiveConfig, TokenBucket};
use serde::Serialize;

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
    /// It would get a cookie, but SYN-ACKs toward it are over their share
    /// (`syn_rate`, `syn_burst`): guard reflects nothing more at it.
    SynAckRate,
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
            Self::ConnLimit => "at its concurrent-connection cap (established and in flight)",
            Self::SynAckRate => "would get a cookie, but its SYN-ACK share is used up",
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
    /// Handshakes let through that have neither completed nor timed out.
    pub in_flight: u64,
    /// The bucket of cookie SYN-ACKs sent to it (`None`: never sent one).
    pub synack_dest: Option<TokenBucket>,
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

pub(super) fn tokens_now(b: Option<TokenBucket>, now: u64, rate: u32, burst: u32) -> u64 {
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
    if cfg.conn_limit_enabled()
        && i.open_connections.saturating_add(i.in_flight) >= cfg.conn_limit as u64
    {
        return verdict(Action::Drop, Cause::ConnLimit);
    }
    let now = i.now_ns;
    let global_has_token = !cfg.global_budget_enabled()
        || tokens_now(i.global, now, cfg.global_syn_rate, cfg.global_syn_burst) > 0;
    let cookies = cfg.cookies_enabled();
    let synack_share_used = cfg.source_cap_enabled()
        && tokens_now(i.synack_dest, now, cfg.syn_rate, cfg.syn_burst) == 0;
    if cookies && !i.known_good && (cfg.syn_cookies == syncookie::MODE_ALWAYS || !global_has_token)
    {
        if synack_share_used {
            return verdict(Action::Drop, Cause::SynAckRate);
        }
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
            if synack_share_used {
                return verdict(Action::Drop, Cause::SynAckRate);
            }
            return verdict(Action::Cookie, Cause::OverBudgetCookie);
        }
        return verdict(Action::Drop, Cause::GlobalBudget);
    }
    verdict(Action::Pass, Cause::WithinLimits)
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
    fn handshakes_in_flight_count_against_the_connection_cap() {
        let cfg = LiveConfig {
            conn_limit: 3,
            ..LiveConfig::DEFAULT
        };
        let i = Inputs {
            open_connections: 1,
            in_flight: 2,
            ..base()
        };
        check(&cfg, &i, Action::Drop, Cause::ConnLimit);
        let i = Inputs { in_flight: 1, ..i };
        check(&cfg, &i, Action::Pass, Cause::WithinLimits);
    }

    #[test]
    fn a_cookie_is_answered_only_within_its_destinations_synack_share() {
        let cfg = LiveConfig {
            syn_cookies: syncookie::MODE_ALWAYS,
            ..LiveConfig::DEFAULT
        };
        let i = Inputs {
            synack_dest: empty(100 * SEC),
            ..base()
        };
        check(&cfg, &i, Action::Drop, Cause::SynAckRate);
        let i = Inputs {
            known_good: true,
            ..i
        };
        check(&cfg, &i, Action::Pass, Cause::WithinLimits);
        let cfg = LiveConfig {
            syn_burst: 0,
            ..cfg
        };
        let i = Inputs {
            known_good: false,
            ..i
        };
        check(&cfg, &i, Action::Cookie, Cause::UnknownSourceCookie);
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
}
