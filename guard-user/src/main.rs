//! `guard`: the agent (`guard run`) and the operator's commands around it.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use guard_common::{
    addr::Prefix,
    client::Connection,
    config_kv,
    proto::{BlockInfo, Request, Response},
    state::reason,
    stats::Stat,
};
use guard_user::{
    agent, datapath,
    duration::clap_duration,
    explain::{self, BlockMeta, Instant},
    paths::{self, PinLayout},
    settings::{RunArgs, Settings},
    tune,
};
use serde::Serialize;

/// Exit status of `guard status` when nothing is loaded (0 is loaded,
/// attached and healthy; 1 an error or an unhealthy load).
const EXIT_NOT_LOADED: u8 = 3;

const AFTER_HELP: &str = "\
Output: `-o json` prints one JSON document per command (`history` prints one JSON \
object per line, the audit log's own records). Field names are snake_case and stable; \
addresses and prefixes are strings; times are objects {\"rfc3339\": ..., \"unix\": ...}.

Exit status: 0 success; 1 error; 2 bad usage. `guard status` exits 0 only when guard is \
loaded, attached and healthy, 3 when it is not loaded, 1 otherwise.

Durations (--ttl, --since, --observe, and the *_secs keys of guard.toml): 90s, 10m, 1h30m, \
\"1h 30m\", 2d, or a bare number of seconds.";

#[derive(Parser)]
#[command(
    name = "guard",
    version,
    about = "Kernel-level connection guard for WebSocket/SSE services",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Output format: text for people, json for scripts (fields: `guard --help`).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(clap::Args, Clone)]
struct SocketArg {
    /// The running agent's control socket.
    #[arg(long, env = "GUARD_CONTROL_SOCKET", default_value = paths::DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
}

#[derive(clap::Args, Clone)]
struct PinArg {
    /// The pin folder (the layout version folder is inside it).
    #[arg(long, env = "GUARD_PIN_DIR", default_value = paths::DEFAULT_PIN_ROOT)]
    pin_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load, attach and pin the program, then serve the control socket and
    /// metrics until SIGTERM (protection stays in place after exit).
    Run(RunArgs),
    /// What is attached where, the live config and the counters (reads the
    /// pins; works whether the agent runs or not). Exits 0 when loaded,
    /// attached and healthy, 3 when not loaded, 1 otherwise.
    Status(PinArg),
    /// Detach everything guard attached and remove every pin.
    Unload(PinArg),
    /// Block a prefix in the kernel for a while.
    Block {
        /// An address or prefix, e.g. 198.18.0.3 or 2001:db8::/48.
        prefix: String,
        /// How long, e.g. 90s, 10m, 1h30m; default: the agent's
        /// ([blocks] default_ttl_secs).
        #[arg(long, value_parser = clap_duration)]
        ttl: Option<Duration>,
        /// Why, for the audit log and metrics: operator, message_flood,
        /// connection_flood, invalid_messages, reconnect_storm,
        /// escalated_over_cap, slow_connections or other.
        #[arg(long, default_value = "operator")]
        reason: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Lift a block (the exact prefix it was made with).
    Unblock {
        /// The blocked address or prefix, as `guard blocks` lists it.
        prefix: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Never cap or block this prefix (until the agent restarts or reloads:
    /// put it in guard.toml's `allow` to keep it).
    Allow {
        /// An address or prefix, e.g. 10.0.0.0/8.
        prefix: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Take a prefix off the allow list.
    Disallow {
        /// The allow-listed prefix, as `guard allows` lists it.
        prefix: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List blocked prefixes, with reason, time left and who blocked them.
    Blocks {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List the allow list (operator entries, loopback and trusted proxies).
    Allows {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Why an address passes or drops: allow list, blocklist entry, its
    /// buckets, connections, known-good state, the global budget, dry-run,
    /// and what its next SYN to a protected port would get (reads the
    /// pins; asks the agent who made a block when it runs).
    Explain {
        /// The IPv4 or IPv6 address to explain.
        addr: IpAddr,
        #[command(flatten)]
        pins: PinArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show or change the live config, or check a config file.
    #[command(args_conflicts_with_subcommands = true)]
    Config {
        #[command(subcommand)]
        action: Option<ConfigAction>,
        #[command(flatten)]
        change: ConfigChangeArgs,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The audit trail of blocks, unblocks and changes (rotated files too).
    History {
        /// How far back, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = clap_duration)]
        since: Duration,
        /// Only records about prefixes overlapping this one.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many records, the newest (the agent caps it at 500).
        #[arg(long, default_value_t = 200)]
        limit: u32,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Live tuning: show state, change limits, or observe real traffic and
    /// suggest limits.
    Tune(TuneArgs),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: guard_user::docs::Shell,
    },
    /// Print the man page, or with --out-dir write one page per subcommand there.
    Man {
        /// Write guard.1, guard-status.1, ... into this folder instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Parse and validate a config file as `guard run` would and print the
    /// effective settings; exits 1 when it is invalid.
    Check {
        /// The file; default: $GUARD_CONFIG, else /etc/guard/guard.toml.
        file: Option<PathBuf>,
        /// `guard run` options to merge in as the service passes them (e.g.
        /// -i eth0 -p 8080).
        #[command(flatten)]
        run: RunArgs,
    },
}

/// `guard tune`: live tuning (also what `cargo xtask tune` runs).
#[derive(clap::Args)]
struct TuneArgs {
    #[command(flatten)]
    change: ConfigChangeArgs,
    /// Block this prefix with the agent's default TTL (repeat).
    #[arg(long)]
    block: Vec<String>,
    /// Lift the block on this prefix (repeat).
    #[arg(long)]
    unblock: Vec<String>,
    /// Allow-list this prefix (repeat).
    #[arg(long)]
    allow: Vec<String>,
    /// Watch per-source rates in the kernel and propose limits.
    #[arg(long)]
    suggest: bool,
    /// How long to watch with --suggest, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = clap_duration)]
    observe: Duration,
    /// Show the audit trail (with --since and --prefix).
    #[arg(long)]
    history: bool,
    /// With --history: how far back, e.g. 24h.
    #[arg(long, default_value = "24h", requires = "history", value_parser = clap_duration)]
    since: Duration,
    /// With --history: only records about prefixes overlapping this one.
    #[arg(long, requires = "history")]
    prefix: Option<String>,
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    pins: PinArg,
}

/// Live config changes, as `guard config` and `guard tune` take them.
#[derive(clap::Args)]
struct ConfigChangeArgs {
    /// A live-config change, e.g. `--set syn_rate=50` (repeat; applied all
    /// or nothing).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Count would-be drops only.
    #[arg(long, conflicts_with = "enforce")]
    dry_run: bool,
    /// Drop again.
    #[arg(long)]
    enforce: bool,
}

impl ConfigChangeArgs {
    /// The `key = value` changes to send, in order; empty when none was asked for.
    fn changes(&self) -> Result<Vec<(String, String)>> {
        let mut changes = Vec::new();
        for s in &self.set {
            changes.push(
                config_kv::parse_assignment(s).map_err(|e| anyhow::anyhow!("--set {s}: {e}"))?,
            );
        }
        if self.dry_run {
            changes.push(("dry_run".into(), "true".into()));
        }
        if self.enforce {
            changes.push(("dry_run".into(), "false".into()));
        }
        Ok(changes)
    }
}

fn prefix(text: &str) -> Result<Prefix> {
    text.parse::<Prefix>().map_err(|e| anyhow::anyhow!("{e}"))
}

async fn call(socket: &SocketArg, req: Request) -> Result<Response> {
    let mut conn = Connection::connect(&socket.control_socket, "guard-cli")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let resp = conn.call(req).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Response::Error { code, message } = &resp {
        bail!("the agent refused: {message} ({})", code.name());
    }
    Ok(resp)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Prints one JSON document.
fn emit<T: Serialize>(value: &T) -> Result<()> {
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
fn print_response(resp: &Response, out: Output) -> Result<()> {
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

fn status(pins: &PinArg, out: Output) -> Result<ExitCode> {
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

/// Who made the block on `prefix` and when, from the agent's audit log.
/// Most blocks are hours old, so the recent past is asked first: the agent
/// then opens only the files written since (a full read can mean months of
/// rotated, compressed logs). Only a block extended for longer than that
/// needs the whole log.
async fn block_meta(socket: &SocketArg, prefix: Prefix) -> Result<Option<BlockMeta>> {
    let now = unix_now();
    for since in [
        now.saturating_sub(2 * 86_400),
        now.saturating_sub(30 * 86_400),
        0,
    ] {
        let req = Request::History {
            since_unix_secs: since,
            prefix: Some(prefix),
            limit: guard_common::proto::MAX_LIST_ENTRIES,
        };
        match call(socket, req).await? {
            Response::History { lines } => {
                if let Some(meta) = BlockMeta::from_audit(&lines, &prefix) {
                    return Ok(Some(meta));
                }
            }
            other => bail!("the agent answered `{}` to a history request", other.name()),
        }
    }
    Ok(None)
}

async fn explain_cmd(addr: IpAddr, pins: &PinArg, socket: &SocketArg, out: Output) -> Result<()> {
    let layout = PinLayout::new(&pins.pin_dir);
    if !layout.map(guard_common::maps::CONFIG).exists() {
        bail!(
            "guard is not loaded (no pins under {}): nothing judges {addr}",
            layout.dir().display()
        );
    }
    let maps = datapath::GuardMaps::open_pinned(&layout)?;
    let mut e = explain::explain(&maps, addr)?;
    if let Some(hit) = &e.blocked_by {
        match block_meta(socket, hit.prefix).await {
            Ok(Some(meta)) => e.set_block_meta(meta),
            Ok(None) => e
                .notes
                .push("the audit log has no record of this block".into()),
            Err(err) => e.notes.push(format!(
                "who made the block is unknown: the agent could not be asked ({err:#})"
            )),
        }
    }
    let (source_key, aggregate_key) = e.keys;
    for key in std::iter::once(source_key).chain(aggregate_key) {
        match call(socket, Request::Escalation { prefix: key }).await {
            Ok(Response::Escalation {
                tracked,
                strikes,
                streak_secs,
            }) => e.escalation.push(explain::EscalationState {
                prefix: key,
                tracked,
                strikes,
                streak_secs,
            }),
            Ok(other) => {
                e.notes.push(format!(
                    "the agent answered `{}` to an escalation request",
                    other.name()
                ));
                break;
            }
            Err(err) => {
                e.notes
                    .push(format!("escalation strikes are unknown ({err:#})"));
                break;
            }
        }
    }
    if out == Output::Json {
        return emit(&e);
    }
    print!("{}", explain::render_text(&e));
    Ok(())
}

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

fn config_check(file: Option<PathBuf>, mut run: RunArgs, out: Output) -> Result<()> {
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
        control_socket: s.control_socket.display().to_string(),
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

async fn tune_cmd(a: TuneArgs, out: Output) -> Result<()> {
    let TuneArgs {
        change,
        block,
        unblock,
        allow,
        suggest,
        observe,
        history: show_history,
        since,
        prefix: p,
        socket,
        pins,
    } = a;
    if show_history {
        return history(&socket, since, p.as_deref(), 500, out).await;
    }
    let mut acted = false;
    let changes = change.changes()?;
    if !changes.is_empty() {
        print_response(&call(&socket, Request::SetConfig { changes }).await?, out)?;
        acted = true;
    }
    for p in &block {
        let req = Request::Block {
            prefix: prefix(p)?,
            ttl_secs: 0,
            reason: reason::OPERATOR,
            detected_at_unix_ns: 0,
            detail: "guard tune --block".into(),
        };
        print_response(&call(&socket, req).await?, out)?;
        acted = true;
    }
    for p in &unblock {
        print_response(
            &call(&socket, Request::Unblock { prefix: prefix(p)? }).await?,
            out,
        )?;
        acted = true;
    }
    for p in &allow {
        print_response(
            &call(&socket, Request::Allow { prefix: prefix(p)? }).await?,
            out,
        )?;
        acted = true;
    }
    if suggest {
        let layout = PinLayout::new(&pins.pin_dir);
        let maps = datapath::GuardMaps::open_pinned(&layout)?;
        eprintln!(
            "observing per-source SYN rates for {}s ...",
            observe.as_secs()
        );
        let text = tokio::task::spawn_blocking(move || tune::observe_and_suggest(&maps, observe))
            .await??;
        print!("{text}");
        acted = true;
    }
    if !acted {
        let config = call(&socket, Request::GetConfig).await?;
        let stats = call(&socket, Request::Stats).await?;
        match (out, &config, &stats) {
            // One document, as every other command prints.
            (Output::Json, Response::Config { entries }, Response::Stats { counters }) => {
                let config: BTreeMap<&str, &str> = entries
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let counters: BTreeMap<&str, u64> =
                    counters.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                emit(&serde_json::json!({ "config": config, "counters": counters }))?;
            }
            _ => {
                println!("live config:");
                print_response(&config, out)?;
                println!("counters:");
                print_response(&stats, out)?;
            }
        }
    }
    Ok(())
}

async fn history(
    socket: &SocketArg,
    since: Duration,
    p: Option<&str>,
    limit: u32,
    out: Output,
) -> Result<()> {
    let since_unix_secs = unix_now().saturating_sub(since.as_secs());
    let prefix = p.map(prefix).transpose()?;
    let req = Request::History {
        since_unix_secs,
        prefix,
        limit,
    };
    print_response(&call(socket, req).await?, out)
}

async fn real_main(cli: Cli) -> Result<ExitCode> {
    let out = cli.output;
    let simple = |req: Request, socket: SocketArg| async move {
        print_response(&call(&socket, req).await?, out)
    };
    match cli.command {
        Cmd::Run(args) => agent::run(args).await?,
        Cmd::Status(pins) => return status(&pins, out),
        Cmd::Unload(pins) => {
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
        }
        Cmd::Block {
            prefix: p,
            ttl,
            reason: r,
            socket,
        } => {
            let ttl_secs = match ttl {
                Some(t) => u32::try_from(t.as_secs())
                    .context("--ttl is longer than the protocol carries (136 years)")?,
                None => 0,
            };
            let code = reason::from_name(&r).with_context(|| {
                format!("unknown reason `{r}` (see `guard block --help` for the names)")
            })?;
            let req = Request::Block {
                prefix: prefix(&p)?,
                ttl_secs,
                reason: code,
                detected_at_unix_ns: 0,
                detail: "guard block".into(),
            };
            simple(req, socket).await?;
        }
        Cmd::Unblock { prefix: p, socket } => {
            simple(
                Request::Unblock {
                    prefix: prefix(&p)?,
                },
                socket,
            )
            .await?
        }
        Cmd::Allow { prefix: p, socket } => {
            simple(
                Request::Allow {
                    prefix: prefix(&p)?,
                },
                socket,
            )
            .await?
        }
        Cmd::Disallow { prefix: p, socket } => {
            simple(
                Request::Disallow {
                    prefix: prefix(&p)?,
                },
                socket,
            )
            .await?
        }
        Cmd::Blocks { socket } => {
            simple(
                Request::ListBlocks {
                    offset: 0,
                    limit: guard_common::proto::MAX_LIST_ENTRIES,
                },
                socket,
            )
            .await?
        }
        Cmd::Allows { socket } => simple(Request::ListAllows, socket).await?,
        Cmd::Explain { addr, pins, socket } => explain_cmd(addr, &pins, &socket, out).await?,
        Cmd::Config {
            action: Some(ConfigAction::Check { file, run }),
            ..
        } => config_check(file, run, out)?,
        Cmd::Config {
            action: None,
            change,
            socket,
        } => {
            let changes = change.changes()?;
            let req = if changes.is_empty() {
                Request::GetConfig
            } else {
                Request::SetConfig { changes }
            };
            simple(req, socket).await?;
        }
        Cmd::History {
            since,
            prefix: p,
            limit,
            socket,
        } => history(&socket, since, p.as_deref(), limit, out).await?,
        Cmd::Tune(args) => tune_cmd(args, out).await?,
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            guard_user::docs::completions(&mut Cli::command(), shell, &mut std::io::stdout());
        }
        Cmd::Man { out_dir } => {
            use clap::CommandFactory as _;
            match out_dir {
                None => guard_user::docs::man_page(Cli::command(), &mut std::io::stdout())?,
                Some(dir) => {
                    for page in guard_user::docs::man_pages_to(Cli::command(), &dir)? {
                        println!("{}", page.display());
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // `guard status | head` should end quietly, not panic on a closed pipe.
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Usage errors exit 2 here (clap's convention), before anything runs.
    let cli = Cli::parse();
    guard_user::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(real_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            // One sentence the operator can act on, then the chain for context.
            eprintln!("guard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every subcommand and every option says what it is for.
    #[test]
    fn everything_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "guard", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn durations_and_output_parse_on_the_command_line() {
        let cli = Cli::try_parse_from([
            "guard",
            "-o",
            "json",
            "block",
            "198.18.0.3",
            "--ttl",
            "1h30m",
        ])
        .expect("parses");
        assert!(cli.output == Output::Json);
        match cli.command {
            Cmd::Block { ttl, .. } => assert_eq!(ttl, Some(Duration::from_secs(5_400))),
            _ => panic!("not a block"),
        }
        let e = Cli::try_parse_from(["guard", "block", "198.18.0.3", "--ttl", "5w"])
            .err()
            .expect("an unknown unit is a usage error");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("unknown unit"), "{e}");
        let cli = Cli::try_parse_from(["guard", "history", "--since", "1h 30m", "--output=json"])
            .expect("a global flag after the subcommand");
        assert!(cli.output == Output::Json);
        assert!(Cli::try_parse_from(["guard", "config", "check", "/tmp/x.toml"]).is_ok());
        assert!(Cli::try_parse_from(["guard", "explain", "not-an-ip"]).is_err());
    }
}
