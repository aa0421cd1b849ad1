//! `guard config check`: a config file validated as `guard run` would load it.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Result;
use guard_common::config_kv;
use guard_user::{
    paths,
    settings::{RunArgs, Settings},
};
use serde::Serialize;

use super::{args::Output, output::emit};

/// `guard config check -o json`: the effective settings.
#[derive(Serialize)]
struct CheckJson {
    valid: bool,
    file: Option<String>,
    interfaces: Vec<String>,
    ports: Vec<u16>,
    attach: String,
    limits: BTreeMap<&'static str, String>,
    allow: Vec<String>,
    trusted_proxies: Vec<String>,
    metrics_addr: String,
    control_socket: String,
    pin_dir: String,
    audit_log: Option<String>,
    log_level: Option<String>,
    default_ttl_secs: u64,
    max_ttl_secs: u64,
    escalation: bool,
    adaptive: bool,
    fleet: bool,
}

pub(crate) fn config_check(file: Option<PathBuf>, mut run: RunArgs, out: Output) -> Result<()> {
    if let Some(f) = file {
        run.config = Some(f);
    }
    if run.config.is_none() {
        run.config = Some(paths::DEFAULT_CONFIG_FILE.into());
    }
    let s = Settings::load(&run)?;
    let j = CheckJson {
        valid: true,
        file: s.config_file.as_ref().map(|p| p.display().to_string()),
        interfaces: s.interfaces.clone(),
        ports: s.ports.clone(),
        attach: s.attach.name().to_string(),
        limits: config_kv::config_entries(&s.live).into_iter().collect(),
        allow: s.allow.iter().map(ToString::to_string).collect(),
        trusted_proxies: s.trusted_proxies.iter().map(ToString::to_string).collect(),
        metrics_addr: s.metrics_addr.to_string(),
        control_socket: s.control_socket.path.display().to_string(),
        pin_dir: s.pin_root.display().to_string(),
        audit_log: s.audit_log.as_ref().map(|p| p.display().to_string()),
        log_level: s.log_level.clone(),
        default_ttl_secs: s.blocks.default_ttl.as_secs(),
        max_ttl_secs: s.blocks.max_ttl.as_secs(),
        escalation: s.escalation.enabled,
        adaptive: s.adaptive.enabled,
        fleet: s.fleet.is_some(),
    };
    if out == Output::Json {
        return emit(&j);
    }
    println!("{}: valid", j.file.as_deref().unwrap_or("(no file)"));
    println!("interfaces: {}", j.interfaces.join(", "));
    println!("ports: {:?}", j.ports);
    println!("attach: {}", j.attach);
    println!("allow: {}", j.allow.join(", "));
    println!("metrics: {}", j.metrics_addr);
    println!("control socket: {}", j.control_socket);
    println!("pins: {}", j.pin_dir);
    println!(
        "audit log: {}",
        j.audit_log.as_deref().unwrap_or("(none: the log only)")
    );
    println!("log level: {}", j.log_level.as_deref().unwrap_or("info"));
    println!(
        "blocks: default ttl {}, max ttl {}",
        guard_user::duration::format_duration(s.blocks.default_ttl),
        guard_user::duration::format_duration(s.blocks.max_ttl)
    );
    println!(
        "escalation: {}; adaptive: {}; fleet: {}",
        on(j.escalation),
        on(j.adaptive),
        on(j.fleet)
    );
    println!("limits:");
    for (k, v) in &j.limits {
        println!("  {k} = {v}");
    }
    Ok(())
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
