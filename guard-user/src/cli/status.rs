//! `guard status` and `guard unload`: they read or remove the pins directly,
//! so they work whether the agent runs or not.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::Result;
use guard_common::{config_kv, stats::Stat};
use guard_user::{datapath, paths::PinLayout};
use serde::Serialize;

use super::{
    args::{Output, PinArg},
    output::emit,
};

/// Exit status of `guard status` when nothing is loaded (0 is loaded,
/// attached and healthy; 1 an error or an unhealthy load).
const EXIT_NOT_LOADED: u8 = 3;

#[derive(Serialize)]
struct Attachment {
    interface: String,
    kind: &'static str,
}

#[derive(Serialize)]
struct TopSource {
    source: String,
    connections: u64,
}

/// `guard status -o json`.
#[derive(Serialize)]
struct StatusJson {
    loaded: bool,
    healthy: bool,
    /// Why it is not healthy (empty when it is).
    problems: Vec<String>,
    pin_dir: String,
    attached: Vec<Attachment>,
    protected_ports: Vec<u16>,
    config: BTreeMap<&'static str, String>,
    counters: BTreeMap<&'static str, u64>,
    open_connections: u64,
    connection_sources: usize,
    top_sources: Vec<TopSource>,
    blocked_prefixes: usize,
    allowlisted_prefixes: usize,
}

pub(crate) fn status(pins: &PinArg, out: Output) -> Result<ExitCode> {
    let layout = PinLayout::new(&pins.pin_dir);
    if !layout.map(guard_common::maps::CONFIG).exists() {
        if out == Output::Json {
            emit(&serde_json::json!({
                "loaded": false,
                "healthy": false,
                "pin_dir": layout.dir().display().to_string(),
            }))?;
        } else {
            println!(
                "guard is not loaded (no pins under {})",
                layout.dir().display()
            );
        }
        return Ok(ExitCode::from(EXIT_NOT_LOADED));
    }
    let maps = datapath::GuardMaps::open_pinned(&layout)?;
    let links = layout.links()?;
    let mut problems = Vec::new();
    if links.is_empty() {
        problems.push("maps are pinned but no program is attached".to_string());
    }
    let ports = maps.ports()?;
    if ports.is_empty() {
        problems.push("no port is protected".to_string());
    }
    let live = maps.config()?;
    let totals = maps.stat_totals()?;
    let conns = maps.connections()?;
    let mut top = conns.clone();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let top: Vec<TopSource> = top
        .iter()
        .take(5)
        .map(|(addr, n)| TopSource {
            source: guard_common::addr::to_ip(addr).to_string(),
            connections: *n,
        })
        .collect();
    let s = StatusJson {
        loaded: true,
        healthy: problems.is_empty(),
        problems,
        pin_dir: layout.dir().display().to_string(),
        attached: links
            .iter()
            .map(|(kind, iface, _)| Attachment {
                interface: iface.clone(),
                kind: kind.metric_label(),
            })
            .collect(),
        protected_ports: ports,
        config: config_kv::config_entries(&live).into_iter().collect(),
        counters: Stat::ALL
            .iter()
            .map(|s| (s.name(), totals[s.index() as usize]))
            .collect(),
        open_connections: conns.iter().map(|(_, n)| n).sum(),
        connection_sources: conns.len(),
        top_sources: top,
        blocked_prefixes: maps.blocks()?.len(),
        allowlisted_prefixes: maps.allows()?.len(),
    };
    let code = if s.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if out == Output::Json {
        emit(&s)?;
        return Ok(code);
    }
    println!("pins: {}", s.pin_dir);
    for a in &s.attached {
        println!("attached: {} ({})", a.interface, a.kind);
    }
    for p in &s.problems {
        println!("unhealthy: {p}");
    }
    println!("protected ports: {:?}", s.protected_ports);
    println!("live config:");
    for (k, v) in config_kv::config_entries(&live) {
        println!("  {k} = {v}");
    }
    println!("counters:");
    for stat in Stat::ALL {
        let v = totals[stat.index() as usize];
        if v != 0 || stat.labels().is_none() {
            println!("  {:<28} {v}", stat.name());
        }
    }
    println!(
        "open connections (tracked): {} from {} sources",
        s.open_connections, s.connection_sources
    );
    for t in &s.top_sources {
        println!("  {:<40} {}", t.source, t.connections);
    }
    println!("blocked prefixes: {}", s.blocked_prefixes);
    println!("allow-listed prefixes: {}", s.allowlisted_prefixes);
    Ok(code)
}

pub(crate) fn unload(pins: &PinArg, out: Output) -> Result<()> {
    let layout = PinLayout::new(&pins.pin_dir);
    let report = datapath::unload(&layout)?;
    if out == Output::Json {
        emit(&serde_json::json!({
            "detached": report.links,
            "pins_removed": report.pins,
            "pin_dir": layout.dir().display().to_string(),
        }))?;
    } else if report.links.is_empty() && report.pins == 0 {
        println!("nothing to unload under {}", layout.dir().display());
    } else {
        println!(
            "detached from {}; removed {} pins under {}",
            if report.links.is_empty() {
                "nothing".into()
            } else {
                report.links.join(", ")
            },
            report.pins,
            layout.dir().display()
        );
    }
    Ok(())
}
