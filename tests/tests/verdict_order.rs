//! `guard explain`'s verdict order held against the program's. Every
//! ordering case is written into the maps of the real program (loaded into
//! this kernel, unpinned), explained by the code `guard explain` runs, then
//! a SYN from that address goes through the XDP program by
//! `BPF_PROG_TEST_RUN`. Both must name the same action, the same rule that
//! decided it and the same effect on the packet; the test fails on the first
//! rule the two orders put differently.
//!
//! The cases are every combination of the conditions that make one rule
//! fire (allow-listed, blocked, at the connection cap, known good, SYN-ACK
//! share used, aggregate dry, source dry, global budget dry) under each
//! cookie mode, with and without dry-run, for IPv4 and IPv6: each rule meets
//! each later one it must win over. Beside them, the conditions that switch
//! a rule off: no protected port, the empty-list flags, an expired block, a
//! cap reached through handshakes in flight, buckets refilled since they ran
//! dry.
//!
//! Needs root (run through `cargo xtask test`).

use std::net::IpAddr;

use aya::{
    maps::{HashMap, MapData},
    Pod,
};
use guard_common::{
    addr::{AddrWords, Prefix},
    config::{FLAG_ALLOW_EMPTY, FLAG_BLOCK_EMPTY, FLAG_DRY_RUN},
    state::{in_flight_slot, reason, synack_slot, InFlight},
    stats::Stat,
    syncookie::{MODE_ALWAYS, MODE_OFF, MODE_UNDER_ATTACK},
    Addr, BlockEntry, LiveConfig, SourceState, TokenBucket,
};
use guard_tests::{
    frames::{v4, v6, Frame},
    testdp::{Dp, XdpOutcome, PORT},
};
use guard_user::{
    datapath::monotonic_ns,
    explain::{explain, next_syn_with_ports, Action, Cause},
};

/// Small buckets that never refill: a bucket written dry stays dry however
/// slowly the case runs, so the mirror's read and the program's run see the
/// same state.
const BURST: u32 = 4;
const CONN_LIMIT: u32 = 2;
const SEC: u64 = 1_000_000_000;

/// The map state and config of one case, for one address.
#[derive(Clone, Copy, Debug, Default)]
struct Case {
    v6: bool,
    no_protected_port: bool,
    allowed: bool,
    blocked: bool,
    /// The block entry exists but expired (the program ignores it).
    block_expired: bool,
    /// Open connections fill the cap.
    at_conn_limit: bool,
    /// Handshakes in flight fill the cap instead.
    in_flight_at_limit: bool,
    cookies: u8,
    known_good: bool,
    synack_share_used: bool,
    aggregate_dry: bool,
    source_dry: bool,
    global_dry: bool,
    dry_run: bool,
    allow_empty_flag: bool,
    block_empty_flag: bool,
    /// The dry buckets ran dry long ago and refill at 1/s: full again.
    refilled: bool,
}

impl Case {
    fn address(&self) -> IpAddr {
        if self.v6 {
            v6("2001:2:0:7::9")
        } else {
            v4(198, 18, 7, 9)
        }
    }

    fn config(&self) -> LiveConfig {
        let rate = u32::from(self.refilled);
        let mut flags = 0;
        for (on, flag) in [
            (self.dry_run, FLAG_DRY_RUN),
            (self.allow_empty_flag, FLAG_ALLOW_EMPTY),
            (self.block_empty_flag, FLAG_BLOCK_EMPTY),
        ] {
            if on {
                flags |= flag;
            }
        }
        LiveConfig {
            flags,
            syn_rate: rate,
            syn_burst: BURST,
            aggregate_rate: rate,
            aggregate_burst: BURST,
            global_syn_rate: rate,
            global_syn_burst: BURST,
            conn_limit: CONN_LIMIT,
            syn_cookies: self.cookies,
            ..LiveConfig::DEFAULT
        }
    }

    /// The ordering matrix: every combination of the rule conditions, per
    /// cookie mode, dry-run and family.
    fn matrix() -> Vec<Case> {
        let mut cases = Vec::new();
        for v6 in [false, true] {
            for dry_run in [false, true] {
                for cookies in [MODE_OFF, MODE_UNDER_ATTACK, MODE_ALWAYS] {
                    for bits in 0..1u32 << 8 {
                        let on = |i: u32| bits & (1 << i) != 0;
                        cases.push(Case {
                            v6,
                            dry_run,
                            cookies,
                            allowed: on(0),
                            blocked: on(1),
                            at_conn_limit: on(2),
                            known_good: on(3),
                            synack_share_used: on(4),
                            aggregate_dry: on(5),
                            source_dry: on(6),
                            global_dry: on(7),
                            ..Case::default()
                        });
                    }
                }
            }
        }
        cases
    }

    /// What switches a rule off, over the state where every rule would fire
    /// and over the state where none would.
    fn switches() -> Vec<Case> {
        let mut cases = Vec::new();
        for v6 in [false, true] {
            for cookies in [MODE_OFF, MODE_UNDER_ATTACK, MODE_ALWAYS] {
                let every = Case {
                    v6,
                    cookies,
                    allowed: true,
                    blocked: true,
                    at_conn_limit: true,
                    known_good: true,
                    synack_share_used: true,
                    aggregate_dry: true,
                    source_dry: true,
                    global_dry: true,
                    ..Case::default()
                };
                let none = Case {
                    v6,
                    cookies,
                    ..Case::default()
                };
                for base in [every, none] {
                    cases.extend([
                        Case {
                            no_protected_port: true,
                            ..base
                        },
                        Case {
                            allow_empty_flag: true,
                            ..base
                        },
                        Case {
                            allow_empty_flag: true,
                            block_empty_flag: true,
                            ..base
                        },
                        Case {
                            allowed: false,
                            block_expired: base.blocked,
                            blocked: false,
                            ..base
                        },
                        Case {
                            allowed: false,
                            blocked: false,
                            at_conn_limit: false,
                            in_flight_at_limit: true,
                            ..base
                        },
                        Case {
                            refilled: true,
                            ..base
                        },
                    ]);
                }
            }
        }
        cases
    }
}

/// Writes the case's state for its address, replacing whatever an earlier
/// case (or the program's run of it) left. `ports_protected` is what the
/// port map holds: rewriting it walks all 65536 slots, so only on a change.
fn set_up(dp: &mut Dp, case: &Case, cfg: &LiveConfig, ports_protected: &mut bool) {
    dp.config(|c| *c = *cfg);
    let ip = case.address();
    let now = monotonic_ns();
    // Dry buckets ran dry now, or (refilled) long enough ago to be full.
    let dry_since = if case.refilled { now - 10 * SEC } else { now };
    let dry = TokenBucket {
        tokens: 0,
        last_ns: dry_since,
    };
    let dry_state = SourceState {
        bucket: dry,
        ..SourceState::new(BURST, dry_since)
    };
    let host = Prefix::host(ip);
    let key = Prefix::of(ip, cfg.source_prefix_v4, cfg.source_prefix_v6).addr();
    let aggregate = Prefix::of(ip, cfg.aggregate_prefix_v4, cfg.aggregate_prefix_v6).addr();
    let maps = dp.dp.maps_mut();
    if *ports_protected == case.no_protected_port {
        let ports: &[u16] = if case.no_protected_port { &[] } else { &[PORT] };
        maps.set_ports(ports).expect("set ports");
        *ports_protected = !case.no_protected_port;
    }
    if case.allowed {
        maps.insert_allow(&host).expect("allow");
    } else {
        maps.remove_allow(&host).expect("unallow");
    }
    if case.blocked || case.block_expired {
        let entry = BlockEntry {
            // 1: expired at boot, long before now.
            expires_ns: if case.blocked { 0 } else { 1 },
            reason: reason::OPERATOR,
            _pad: 0,
        };
        maps.insert_block(&host, &entry).expect("block");
    } else {
        maps.remove_block(&host).expect("unblock");
    }
    replace(
        &mut maps.conns,
        key,
        case.at_conn_limit.then_some(u64::from(CONN_LIMIT)),
    );
    let in_flight = case.in_flight_at_limit.then(|| {
        let slot = in_flight_slot(now, cfg.handshake_timeout_s);
        let mut in_flight = InFlight::default();
        in_flight.counts[InFlight::index(slot)] = u64::from(CONN_LIMIT);
        in_flight.slots[InFlight::index(slot)] = slot;
        in_flight
    });
    replace(&mut maps.in_flight, key, in_flight);
    replace(&mut maps.known_good, key, case.known_good.then_some(now));
    // A never-used slot (all zero) holds a full share.
    let synack = if case.synack_share_used {
        dry
    } else {
        TokenBucket::default()
    };
    maps.synack_dests
        .set(synack_slot(&AddrWords::from_addr(&key)), synack, 0)
        .expect("SYN-ACK share");
    replace(
        &mut maps.aggregates,
        aggregate,
        case.aggregate_dry.then_some(dry_state),
    );
    replace(&mut maps.sources, key, case.source_dry.then_some(dry_state));
    let global = if case.global_dry {
        dry
    } else {
        TokenBucket::full(BURST, now)
    };
    maps.global.set(0, global, 0).expect("global budget");
}

/// Makes `map` hold `value` at `key`, or nothing.
fn replace<V: Pod>(map: &mut HashMap<MapData, Addr, V>, key: Addr, value: Option<V>) {
    // Absent already is fine.
    let _ = map.remove(&key);
    if let Some(value) = value {
        map.insert(key, value, 0).expect("write the case's entry");
    }
}

/// The decided action and the deciding rule, as the program counted them.
fn counted(stat: Stat) -> (Action, Cause) {
    use Stat::*;
    match stat {
        PassUnprotected => (Action::Pass, Cause::NoProtectedPort),
        PassAllowlisted => (Action::Pass, Cause::Allowlisted),
        DropBlocked | WouldDropBlocked => (Action::Drop, Cause::Blocked),
        DropConnLimit | WouldDropConnLimit => (Action::Drop, Cause::ConnLimit),
        CookieSent | WouldCookie => (Action::Cookie, Cause::UnknownSourceCookie),
        DropSynAckRate | WouldDropSynAckRate => (Action::Drop, Cause::SynAckRate),
        DropAggregateRate | WouldDropAggregateRate => (Action::Drop, Cause::AggregateRate),
        DropSourceRate | WouldDropSourceRate => (Action::Drop, Cause::SourceRate),
        PassKnownGood => (Action::Pass, Cause::KnownGoodOverBudget),
        DropGlobalBudget | WouldDropGlobalBudget => (Action::Drop, Cause::GlobalBudget),
        PassSyn => (Action::Pass, Cause::WithinLimits),
        other => panic!("a plain SYN ended in {other:?}, which the mirror does not model"),
    }
}

/// (decided, effective, cause) as the program reached them for the case's
/// SYN: its counters say which rule decided, its action what happened.
fn program_verdict(dp: &Dp, frame: &[u8]) -> (Action, Action, Cause) {
    let (outcome, stat) = dp.xdp_verdict(frame);
    let (decided, cause) = counted(stat);
    let effective = match outcome {
        XdpOutcome::Pass => Action::Pass,
        XdpOutcome::Drop => Action::Drop,
        XdpOutcome::Tx(_) => Action::Cookie,
    };
    (decided, effective, cause)
}

/// How the mirror's verdict is read.
#[derive(Clone, Copy)]
enum Mirror {
    /// `guard explain` whole, protected ports listed from the map.
    Explain,
    /// Its verdict from the same reads, told whether any port is protected
    /// (listing the ports costs 65536 reads, too many for every case).
    Verdict,
}

/// Runs each case through the mirror and the program; the disagreements.
fn disagreements(cases: &[Case], mirror: Mirror) -> Vec<String> {
    let mut dp = Dp::with_cookies();
    let mut ports_protected = true;
    let mut out = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let cfg = case.config();
        set_up(&mut dp, case, &cfg, &mut ports_protected);
        let ip = case.address();
        let mirror = match mirror {
            Mirror::Explain => explain(dp.dp.maps(), ip).map(|e| e.next_syn),
            Mirror::Verdict => next_syn_with_ports(dp.dp.maps(), ip, !case.no_protected_port),
        }
        .expect("explain the address");
        // A fresh flow per case: the program lets a retransmitted SYN of a
        // handshake it already charged past the connection cap.
        let source_port = 1024 + u16::try_from(i).expect("fewer cases than ports");
        let frame = Frame::syn(ip, PORT).tcp_ports(source_port, PORT).bytes();
        let program = program_verdict(&dp, &frame);
        // The program counts both of the mirror's cookie causes as one.
        let mirror_cause = match mirror.cause {
            Cause::OverBudgetCookie => Cause::UnknownSourceCookie,
            cause => cause,
        };
        let mirrored = (mirror.decided, mirror.effective, mirror_cause);
        if mirrored != program {
            out.push(format!(
                "{case:?}: explain says {mirrored:?}, the program did {program:?}"
            ));
        }
    }
    out
}

fn assert_in_step(cases: &[Case], mirror: Mirror) {
    let wrong = disagreements(cases, mirror);
    assert!(
        wrong.is_empty(),
        "guard explain and the program disagree on {} of {} cases; the first:\n{}",
        wrong.len(),
        cases.len(),
        wrong[..wrong.len().min(5)].join("\n")
    );
}

#[test]
fn explain_orders_every_rule_as_the_program_does() {
    assert_in_step(&Case::matrix(), Mirror::Verdict);
}

#[test]
fn explain_switches_rules_off_as_the_program_does() {
    assert_in_step(&Case::switches(), Mirror::Explain);
}
