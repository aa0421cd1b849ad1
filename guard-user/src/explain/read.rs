//! Gathering an [`Explanation`] from the pinned maps, and who made a block
//! from the audit log's lines.

use std::{net::IpAddr, time::SystemTime};

use guard_common::{addr::Prefix, state::reason, syncookie, LiveConfig, SourceState};

use super::{
    next_syn, summary, verdict::tokens_now, BlockHit, BucketState, Connections, Explanation,
    Inputs, Instant, KnownGood, NextSyn,
};
use crate::datapath::{monotonic_ns, DatapathError, GuardMaps, PointState};

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
    let inputs = inputs(&cfg, &p, !ports.is_empty(), now_ns);
    let (known_good, in_flight) = (inputs.known_good, inputs.in_flight);
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
            in_flight,
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

/// The verdict inputs in what the maps hold for one address at `now_ns`.
fn inputs(cfg: &LiveConfig, p: &PointState, any_port_protected: bool, now_ns: u64) -> Inputs {
    Inputs {
        any_port_protected,
        allowed: p.allowed,
        blocked: p.block.is_some_and(|b| b.is_active(now_ns)),
        open_connections: p.open_connections,
        in_flight: p.in_flight.map_or(0, |f| {
            f.live(guard_common::state::in_flight_slot(
                now_ns,
                cfg.handshake_timeout_s,
            ))
        }),
        synack_dest: p.synack_dest,
        known_good: p
            .last_handshake_ns
            .is_some_and(|t| now_ns.saturating_sub(t) < cfg.known_good_ttl_ns()),
        source: p.source.map(|s| s.bucket),
        aggregate: p.aggregate.map(|s| s.bucket),
        global: p.global,
        now_ns,
    }
}

/// The next SYN's verdict as [`explain`] reaches it, from the same reads
/// except the protected ports (whether there are any is given): listing
/// them reads all 65536 slots, too slow to repeat for thousands of states.
pub fn next_syn_with_ports(
    maps: &GuardMaps,
    ip: IpAddr,
    any_port_protected: bool,
) -> Result<NextSyn, DatapathError> {
    let cfg = maps.config()?;
    let now_ns = monotonic_ns();
    let p = maps.point(ip, &cfg);
    Ok(next_syn(
        &cfg,
        &inputs(&cfg, &p, any_port_protected, now_ns),
    ))
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
#[cfg(test)]
mod tests {
    use super::*;

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
}
