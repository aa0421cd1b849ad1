//! The attack of each scenario, started on the stack and summed up for the report.
#![cfg(feature = "lab")]

use std::time::Duration;

use anyhow::Result;
use guard_common::stats::Stat;
use guard_tests::report::{ConnFloodReport, ProbeReport};
use guard_tests::slowhttptest;
use serde_json::json;

use super::scenarios::*;
use guard_tests::stack::{
    metric, pause, ConnFlood, FlatOutFlood, SlotHoarder, SlowHeads, Stack, Storm, StormKind,
};

pub(super) fn syn_flood(stack: &Stack, t: &Timing) -> Result<Attack> {
    // A fixed offered rate, not `hping3 --flood`: on veth the sender's own speed depends
    // on guard's verdict (hping3 measured ~145k SYN/s while the program passed and ~100k
    // while it dropped), and a flat-out tool would compare different loads. It spoofs
    // the one source just as `hping3 -a` does (the e2e test uses hping3).
    let flood = stack.syn_flood(&format!("{SPOOFED}/32"), ONE_SOURCE_PPS, t.attack_secs)?;
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    let r = flood.wait()?;
    let sent = r.sent.unwrap_or(0);
    Ok(Attack {
        summary: format!(
            "sent {sent} SYNs, evenly paced ({}/s of {ONE_SOURCE_PPS}/s)",
            per_sec(sent, t)
        ),
        detail: json!({
            "tool": "lab-client syn-flood",
            "source": SPOOFED.to_string(),
            "pps": ONE_SOURCE_PPS,
            "sent": sent,
        }),
    })
}

/// What a flood achieved per second over its nominal duration.
pub(super) fn per_sec(sent: u64, t: &Timing) -> u64 {
    sent / u64::from(t.attack_secs.max(1))
}

pub(super) fn conn_flood(stack: &Stack, t: &Timing) -> Result<Attack> {
    let run = stack.conn_flood(ConnFlood {
        count: 1_000_000,
        parallel: 200,
        hold_ms: 100,
        connect_timeout_ms: 1000,
        secs: t.attack_secs,
    })?;
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    let r = run.wait()?;
    Ok(Attack {
        summary: format!("{} of {} connects completed", r.connected, r.attempted),
        detail: serde_json::to_value(&r)?,
    })
}

pub(super) fn storms(stack: &Stack, t: &Timing) -> Result<Attack> {
    let storm = |kind| {
        stack.storm(Storm {
            kind,
            count: 1_000_000,
            parallel: 50,
            hold_ms: 1000,
            timeout_ms: 1000,
            secs: t.attack_secs,
        })
    };
    let ws = storm(StormKind::WebSocket)?;
    let sse = storm(StormKind::Sse)?;
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    let (ws, sse) = (ws.wait()?, sse.wait()?);
    Ok(Attack {
        summary: format!(
            "admitted: WS {}/{}, SSE {}/{} ({} refused 429)",
            ws.accepted,
            ws.attempted,
            sse.accepted,
            sse.attempted,
            ws.rejected_429 + sse.rejected_429
        ),
        detail: json!({ "ws_storm": ws, "sse_storm": sse }),
    })
}

pub(super) fn message_flood(stack: &Stack, t: &Timing) -> Result<Attack> {
    // The flood itself ends at the server's close; then the attacker tries to come back
    // for the rest of the attack window.
    let flood_secs = 2u32.min(t.attack_secs);
    let flood = stack.ws_flood(5000, flood_secs)?.wait()?;
    // Give the report a moment to reach the agent and the kernel.
    pause(Duration::from_millis(500))?;
    let back_secs = t.attack_secs.saturating_sub(flood_secs + 1).max(1);
    let back = stack.conn_flood(ConnFlood {
        count: 1000,
        parallel: 5,
        hold_ms: 10,
        connect_timeout_ms: 1000,
        secs: back_secs,
    })?;
    pause(Duration::from_secs(u64::from(back_secs)))?;
    let back = back.wait()?;
    let close = flood
        .close_code
        .map_or_else(|| "no close".to_string(), |c| format!("closed {c}"));
    Ok(Attack {
        summary: format!(
            "{close} after {} msgs; reconnects {}/{}",
            flood.sent, back.connected, back.attempted
        ),
        detail: json!({ "ws_flood": flood, "reconnects": back }),
    })
}

pub(super) fn slowloris(stack: &Stack, t: &Timing) -> Result<Attack> {
    let flood = slowhttptest(
        &stack.lab.attacker,
        &format!("http://{}/", stack.app_addr()),
        1000,
        t.attack_secs,
    )?;
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    let r = flood.wait()?;
    let peak = r.sent.unwrap_or(0);
    Ok(Attack {
        summary: format!("held {peak} connections at most"),
        detail: json!({
            "tool": "slowhttptest",
            "peak_connected": peak,
            "service_available": r.service_available,
        }),
    })
}

pub(super) fn slow_sources(stack: &Stack, t: &Timing) -> Result<Attack> {
    let audit_before = stack.audit()?.len();
    let heads = stack.slow_heads(SlowHeads {
        sources: SLOW_SOURCES,
        // A header line every 5 s keeps a head alive under any per-read timeout.
        interval_ms: 5000,
        reconnect_ms: 1000,
        ramp_ms: 5000,
        connect_timeout_ms: 3000,
        secs: t.attack_secs,
    })?;
    pause(Duration::from_secs(u64::from(NEWCOMERS_AFTER_SECS)))?;
    let fresh = stack.fresh_legit_sources(NEWCOMER_BASE, 2)?;
    let newcomer = |kind, from| {
        stack.newcomers(
            Storm {
                kind,
                count: 1000,
                parallel: 1,
                hold_ms: 500,
                timeout_ms: 5000,
                secs: t.attack_secs - NEWCOMERS_AFTER_SECS,
            },
            from,
        )
    };
    let ws = newcomer(StormKind::WebSocket, fresh[0])?;
    let sse = newcomer(StormKind::Sse, fresh[1])?;
    pause(Duration::from_secs(u64::from(
        t.attack_secs - NEWCOMERS_AFTER_SECS,
    )))?;
    let (ws, sse) = (ws.wait()?, sse.wait()?);
    let r = heads.wait()?;
    let blocked = stack.slow_sources_blocked(audit_before)?;
    Ok(Attack {
        summary: format!(
            "newcomers got in: WebSocket {}/{}, SSE {}/{}; {} sources held up to {} slow \
             heads, the server closed {}; {blocked} sources blocked",
            ws.accepted,
            ws.attempted,
            sse.accepted,
            sse.attempted,
            r.sources,
            r.peak_open,
            r.closed_by_server,
        ),
        detail: json!({
            "tool": "lab-client slow-heads",
            "report": r,
            "sources_blocked": blocked,
            "newcomers": { "ws": ws, "sse": sse },
        }),
    })
}

pub(super) fn random_sources(stack: &Stack, t: &Timing) -> Result<Attack> {
    let flood = stack.syn_flood("198.19.0.0/16", RANDOM_SOURCES_PPS, t.attack_secs)?;
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    let r = flood.wait()?;
    let sent = r.sent.unwrap_or(0);
    Ok(Attack {
        // The offered rate is fixed, but a busy attacker core can fall short of it.
        summary: format!(
            "sent {sent} SYNs, evenly paced ({}/s of {RANDOM_SOURCES_PPS}/s)",
            per_sec(sent, t)
        ),
        detail: json!({ "tool": "lab-client syn-flood", "subnet": "198.19.0.0/16", "pps": RANDOM_SOURCES_PPS, "sent": sent }),
    })
}

pub(super) fn slot_hoarder(stack: &Stack, t: &Timing) -> Result<Attack> {
    let lost_before = stack.server_handshake_losses()?;
    let hoard = SlotHoarder::start(stack, HOARD_PER_SEC, t.attack_secs);
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    // Read while it still holds everything.
    let held = hoard.held();
    let kernel = if stack.agent_pid().is_some() {
        let mine = stack.tracked_connections(guard_tests::lab::ATTACKER_V4)?;
        let all = metric(
            &stack.agent_metrics()?,
            "guard_concurrent_connections_tracked",
        )
        .unwrap_or(0.0) as u64;
        Some((mine, all))
    } else {
        None
    };
    let r = hoard.finish()?;
    let lost = stack.server_handshake_losses()? - lost_before;
    let tracked = kernel.map_or_else(String::new, |(mine, all)| {
        format!("; the kernel tracked {mine} for it ({all} in all)")
    });
    Ok(Attack {
        summary: format!(
            "held {held} connections, {} connects unanswered{tracked}; server's queue dropped {lost} SYNs",
            r.timed_out
        ),
        detail: json!({
            "hoarder": r,
            "held_at_end": held,
            "per_sec": HOARD_PER_SEC,
            "app": HOARD_APP,
            "kernel_tracked_for_hoarder": kernel.map(|k| k.0),
            "kernel_tracked_total": kernel.map(|k| k.1),
            "server_handshake_losses": lost,
        }),
    })
}

pub(super) fn returning_clients(stack: &Stack, t: &Timing) -> Result<Attack> {
    let fresh = stack.fresh_legit_sources(FIRST_TIMER_BASE, FIRST_TIMERS)?;
    let before = stack.counters()?;
    // What the server's own kernel does with the SYNs that reach it: past its SYN queue it
    // answers with cookies instead of keeping state.
    let cookies_before = stack.lab.server.counter("TcpExt", "SyncookiesSent")?;
    let flood = FlatOutFlood::start(stack, "198.19.0.0/16", t.attack_secs)?;
    let started = std::time::Instant::now();
    let flood_end = Duration::from_secs(u64::from(t.attack_secs));
    // First-time clients arrive one by one, spread over the flood once it has drained the
    // budget (arriving together they would also compete with each other), and each gets
    // one connect that may last until the flood ends: TCP resends its SYN after 1 s, 3 s.
    let lead = Duration::from_secs(1);
    let spread = flood_end.saturating_sub(lead + Duration::from_secs(1)) / u32::from(FIRST_TIMERS);
    let mut runs = Vec::new();
    let mut timeouts_ms = Vec::new();
    for (i, ip) in fresh.iter().enumerate() {
        let at = lead + spread * i as u32;
        pause(at.saturating_sub(started.elapsed()))?;
        let left = flood_end
            .saturating_sub(started.elapsed() + Duration::from_millis(200))
            .max(Duration::from_millis(500));
        timeouts_ms.push(left.as_millis() as u64);
        runs.push(stack.one_connect(*ip, left)?);
    }
    let sent = flood.wait()?;
    let cookies = stack.lab.server.counter("TcpExt", "SyncookiesSent")? - cookies_before;
    let firsts = runs
        .into_iter()
        .map(|r| r.wait())
        .collect::<Result<Vec<ProbeReport>>>()?;
    let got: u64 = firsts.iter().map(|p| p.connected).sum();
    let first_syn: u64 = firsts.iter().map(|p| p.connected - p.retransmitted).sum();
    let kernel = match (before, stack.counters()?) {
        (Some(b), Some(a)) => Some(a.since(&b)),
        _ => None,
    };
    let known_good = kernel.as_ref().map_or_else(String::new, |k| {
        format!(
            "; returning clients' SYNs passed as known-good: {}; guard's SYN cookies sent {}, replies handed over {}",
            k.get(Stat::PassKnownGood),
            k.get(Stat::CookieSent),
            k.get(Stat::CookieAckValid)
        )
    });
    Ok(Attack {
        summary: format!(
            "trafgen sent {sent} SYNs ({}/s), server sent {cookies} SYN cookies; first-time clients during it: {got}/{} got in ({first_syn} on the first SYN){known_good}",
            per_sec(sent, t),
            firsts.len()
        ),
        detail: json!({
            "tool": "trafgen (no rate limit)",
            "subnet": "198.19.0.0/16",
            "sent": sent,
            "first_timers": fresh.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            "first_timer_connect_timeout_ms": timeouts_ms,
            "first_timer_reports": firsts,
            "first_timers_connected": got,
            "first_timers_on_first_syn": first_syn,
            "server_syncookies_sent": cookies,
        }),
    })
}

pub(super) fn adaptive_overload(stack: &Stack, t: &Timing) -> Result<Attack> {
    let sources = stack.attacker_sources(OVERLOAD_SOURCE_BASE, OVERLOAD_SOURCES)?;
    let lost_before = stack.server_handshake_losses()?;
    let runs = stack.conn_floods(
        &sources,
        ConnFlood {
            count: 1_000_000,
            parallel: OVERLOAD_PARALLEL,
            hold_ms: OVERLOAD_HOLD_MS,
            connect_timeout_ms: 1000,
            secs: t.attack_secs,
        },
    )?;
    pause(Duration::from_secs(u64::from(t.attack_secs)))?;
    let reports = runs
        .into_iter()
        .map(|r| r.wait())
        .collect::<Result<Vec<ConnFloodReport>>>()?;
    let lost = stack.server_handshake_losses()? - lost_before;
    let attempted: u64 = reports.iter().map(|r| r.attempted).sum();
    let connected: u64 = reports.iter().map(|r| r.connected).sum();
    Ok(Attack {
        summary: format!(
            "{} sources: {connected} of {attempted} connects; server's queue dropped {lost} SYNs",
            sources.len()
        ),
        detail: json!({
            "sources": sources.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            "parallel_per_source": OVERLOAD_PARALLEL,
            "hold_ms": OVERLOAD_HOLD_MS,
            "app": OVERLOAD_APP,
            "reports": reports,
            "server_handshake_losses": lost,
        }),
    })
}
