//! Printing the agent's answers as text or JSON.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use guard_common::{
    proto::{BlockInfo, Response},
    state::reason,
};
use guard_user::explain::Instant;
use serde::Serialize;

use super::{args::Output, unix_now};

/// Prints one JSON document.
pub(super) fn emit<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// One blocklist entry in `-o json`.
#[derive(Serialize)]
struct BlockJson<'a> {
    prefix: String,
    reason: &'static str,
    origin: &'a str,
    /// `None`: never expires.
    expires_in_secs: Option<u32>,
    expires: Option<Instant>,
}

impl<'a> BlockJson<'a> {
    fn new(b: &'a BlockInfo, now: u64) -> Self {
        let left = (b.expires_in_secs != 0).then_some(b.expires_in_secs);
        Self {
            prefix: b.prefix.to_string(),
            reason: reason::name(b.reason),
            origin: &b.origin,
            expires_in_secs: left,
            expires: left.map(|s| Instant::from_unix(now + s as u64)),
        }
    }
}

/// Prints a response as text or as one JSON document (`history` as JSON
/// lines).
pub(crate) fn print_response(resp: &Response, out: Output) -> Result<()> {
    if out == Output::Json {
        return print_json(resp);
    }
    match resp {
        Response::Ok => println!("ok"),
        Response::BlockResult {
            outcome,
            reason_text,
            expires_in_secs,
        } => match outcome {
            guard_common::proto::BlockOutcome::Refused => println!("refused: {reason_text}"),
            _ if *expires_in_secs == 0 => {
                println!("{}: {reason_text} (never expires)", outcome.name())
            }
            _ => println!(
                "{}: {reason_text} (expires in {expires_in_secs}s)",
                outcome.name()
            ),
        },
        Response::Blocks { total, entries } => {
            println!("{total} blocked");
            for b in entries {
                let ttl = if b.expires_in_secs == 0 {
                    "never expires".to_string()
                } else {
                    format!("{}s left", b.expires_in_secs)
                };
                println!(
                    "  {:<24} {:<20} {:<14} {}",
                    b.prefix.to_string(),
                    reason::name(b.reason),
                    ttl,
                    b.origin
                );
            }
        }
        Response::Allows { entries } => {
            println!("{} allow-listed", entries.len());
            entries.iter().for_each(|p| println!("  {p}"))
        }
        Response::Stats { counters } => {
            counters.iter().for_each(|(k, v)| println!("  {k:<28} {v}"))
        }
        Response::Config { entries } => entries.iter().for_each(|(k, v)| println!("  {k} = {v}")),
        Response::History { lines } => lines.iter().for_each(|l| println!("{l}")),
        other => println!("{other:?}"),
    }
    Ok(())
}

fn print_json(resp: &Response) -> Result<()> {
    match resp {
        Response::Ok => emit(&serde_json::json!({ "ok": true })),
        Response::BlockResult {
            outcome,
            reason_text,
            expires_in_secs,
        } => emit(&serde_json::json!({
            "outcome": outcome.name(),
            "message": reason_text,
            "expires_in_secs": (*expires_in_secs != 0).then_some(*expires_in_secs),
        })),
        Response::Blocks { total, entries } => {
            let now = unix_now();
            let entries: Vec<_> = entries.iter().map(|b| BlockJson::new(b, now)).collect();
            emit(&serde_json::json!({ "total": total, "entries": entries }))
        }
        Response::Allows { entries } => {
            let entries: Vec<String> = entries.iter().map(ToString::to_string).collect();
            emit(&serde_json::json!({ "total": entries.len(), "entries": entries }))
        }
        Response::Stats { counters } => {
            let map: BTreeMap<&str, u64> = counters.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            emit(&serde_json::json!({ "counters": map }))
        }
        Response::Config { entries } => {
            let map: BTreeMap<&str, &str> = entries
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            emit(&serde_json::json!({ "config": map }))
        }
        Response::History { lines } => {
            // The audit log's records are JSON already: pass each through
            // serde so a damaged line fails here, not in the reader's jq.
            for l in lines {
                let v: serde_json::Value =
                    serde_json::from_str(l).with_context(|| format!("audit line {l:?}"))?;
                println!("{}", serde_json::to_string(&v)?);
            }
            Ok(())
        }
        other => bail!(
            "the agent answered `{}`, which has no JSON form",
            other.name()
        ),
    }
}
