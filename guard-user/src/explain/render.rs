//! The text form of `guard explain`.

use super::{Action, BucketState, Cause, Explanation};

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
        "connections: {} open, {} in flight{}\n",
        e.connections.open,
        e.connections.in_flight,
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
            "{} open connections and {} in flight, cap {}",
            e.connections.open, e.connections.in_flight, e.connections.limit
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
    use guard_common::addr::Prefix;

    use super::*;
    use crate::explain::{BlockHit, Connections, Instant, KnownGood, NextSyn};

    fn bucket(enabled: bool, key: Option<&str>, tracked: bool) -> BucketState {
        BucketState {
            enabled,
            key: key.map(str::to_string),
            tracked,
            rate_per_sec: 20,
            burst: 40,
            tokens: 0,
            syns: tracked.then_some(7),
            over_cap: tracked.then_some(3),
            first_seen: None,
        }
    }

    fn blocked(dry_run: bool) -> Explanation {
        let prefix: Prefix = "198.18.0.0/24".parse().unwrap();
        let mut e = Explanation {
            address: "198.18.0.3".into(),
            protected_ports: vec![8080],
            dry_run,
            syn_cookies: "off",
            allowlisted_by: None,
            blocked_by: Some(BlockHit {
                prefix,
                reason: "operator",
                active: true,
                until: None,
                expires_in_secs: None,
                origin: Some("guard-cli".into()),
                since: Some(Instant::from_unix(0)),
                detail: None,
            }),
            source: bucket(true, Some("198.18.0.3/32"), true),
            aggregate: bucket(false, Some("198.18.0.0/24"), false),
            connections: Connections {
                open: 2,
                in_flight: 1,
                limit: 0,
            },
            known_good: KnownGood {
                known_good: false,
                last_handshake: None,
                ttl_secs: 300,
            },
            global_budget: bucket(true, None, false),
            next_syn: NextSyn {
                decided: Action::Drop,
                effective: if dry_run { Action::Pass } else { Action::Drop },
                cause: Cause::Blocked,
                dry_run,
            },
            summary: String::new(),
            escalation: Vec::new(),
            notes: vec!["the agent could not be asked".into()],
            keys: (prefix, None),
        };
        e.summary = summary(&e);
        e
    }

    #[test]
    fn the_summary_names_the_block_and_what_dry_run_lets_through() {
        let why = "(blocked by 198.18.0.0/24, operator, by guard-cli)";
        assert_eq!(
            blocked(false).summary,
            format!("next SYN to a protected port would be: DROP {why}")
        );
        assert_eq!(
            blocked(true).summary,
            format!("next SYN to a protected port would be: PASS in dry-run, else DROP {why}")
        );
    }

    #[test]
    fn the_text_form_has_one_line_per_input_then_the_summary() {
        let e = blocked(false);
        let want = "\
198.18.0.3
allow list: not allow-listed
blocklist: blocked by 198.18.0.0/24 (reason operator)
  by: guard-cli
  since: 1970-01-01T00:00:00.000Z
  until: never expires
source: 198.18.0.3/32 0 of 40 tokens (refills 20/s), 7 SYNs, 3 over cap
aggregate: cap off
connections: 2 open, 1 in flight, no cap
known good: no
global budget: 0 of 40 tokens (refills 20/s)
dry-run: off; syn cookies: off; protected ports: [8080]
note: the agent could not be asked
";
        assert_eq!(render_text(&e), format!("{want}{}\n", e.summary));
    }
}
