//! `guard`: the agent (`guard run`) and the operator's commands around it.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use guard_common::{
    addr::Prefix,
    client::Connection,
    config_kv,
    proto::{Request, Response},
    state::reason,
    stats::Stat,
};
use guard_user::{
    agent, datapath,
    paths::{self, PinLayout},
    settings::RunArgs,
    tune,
};

#[derive(Parser)]
#[command(
    name = "guard",
    version,
    about = "Kernel-level connection guard for WebSocket/SSE services"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
    /// pins; works whether the agent runs or not).
    Status(PinArg),
    /// Detach everything guard attached and remove every pin.
    Unload(PinArg),
    /// Block a prefix in the kernel for a while.
    Block {
        prefix: String,
        /// e.g. 90s, 10m, 2h; default: the agent's.
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long, default_value = "operator")]
        reason: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    Unblock {
        prefix: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Never cap or block this prefix.
    Allow {
        prefix: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    Disallow {
        prefix: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List blocked prefixes.
    Blocks {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show or change the live config.
    Config {
        #[command(flatten)]
        change: ConfigChangeArgs,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The audit trail of blocks, unblocks and changes.
    History {
        /// How far back, e.g. 30m, 24h.
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: u32,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Live tuning: show state, change limits, or observe real traffic and
    /// suggest limits.
    Tune(TuneArgs),
}

/// `guard tune`: live tuning (also what `cargo xtask tune` runs).
#[derive(clap::Args)]
struct TuneArgs {
    #[command(flatten)]
    change: ConfigChangeArgs,
    #[arg(long)]
    block: Vec<String>,
    #[arg(long)]
    unblock: Vec<String>,
    #[arg(long)]
    allow: Vec<String>,
    /// Watch per-source rates in the kernel and propose limits.
    #[arg(long)]
    suggest: bool,
    /// How long to watch with --suggest, e.g. 60s.
    #[arg(long, default_value = "60s")]
    observe: String,
    /// Show the audit trail (with --since and --prefix).
    #[arg(long)]
    history: bool,
    #[arg(long, default_value = "24h", requires = "history")]
    since: String,
    #[arg(long, requires = "history")]
    prefix: Option<String>,
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    pins: PinArg,
}

fn parse_duration(text: &str) -> Result<Duration> {
    Ok(guard_user::duration::parse_duration(text)?)
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

fn print_response(resp: &Response) {
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
        Response::Allows { entries } => entries.iter().for_each(|p| println!("  {p}")),
        Response::Stats { counters } => {
            counters.iter().for_each(|(k, v)| println!("  {k:<28} {v}"))
        }
        Response::Config { entries } => entries.iter().for_each(|(k, v)| println!("  {k} = {v}")),
        Response::History { lines } => lines.iter().for_each(|l| println!("{l}")),
        other => println!("{other:?}"),
    }
}

/// Live config changes, as `guard config` and `guard tune` take them.
#[derive(clap::Args)]
struct ConfigChangeArgs {
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

fn status(pins: &PinArg) -> Result<()> {
    let layout = PinLayout::new(&pins.pin_dir);
    if !layout.map(guard_common::maps::CONFIG).exists() {
        println!(
            "guard is not loaded (no pins under {})",
            layout.dir().display()
        );
        return Ok(());
    }
    let maps = datapath::GuardMaps::open_pinned(&layout)?;
    let links = layout.links()?;
    println!("pins: {}", layout.dir().display());
    if links.is_empty() {
        println!("attached: nowhere (maps are pinned but no link is)");
    }
    for (kind, iface, _) in &links {
        println!("attached: {iface} ({})", kind.metric_label());
    }
    println!("protected ports: {:?}", maps.ports()?);
    println!("live config:");
    for (k, v) in config_kv::config_entries(&maps.config()?) {
        println!("  {k} = {v}");
    }
    let totals = maps.stat_totals()?;
    println!("counters:");
    for stat in Stat::ALL {
        let v = totals[stat.index() as usize];
        if v != 0 || stat.labels().is_none() {
            println!("  {:<28} {v}", stat.name());
        }
    }
    let conns = maps.connections()?;
    println!(
        "open connections (tracked): {} from {} sources",
        conns.iter().map(|(_, n)| n).sum::<u64>(),
        conns.len()
    );
    let mut top = conns;
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    for (addr, n) in top.iter().take(5) {
        println!(
            "  {:<40} {n}",
            Prefix::new(*addr, 128)
                .to_string()
                .trim_end_matches("/32")
                .trim_end_matches("/128")
        );
    }
    println!("blocked prefixes: {}", maps.blocks()?.len());
    println!("allow-listed prefixes: {}", maps.allows()?.len());
    Ok(())
}

async fn tune_cmd(a: TuneArgs) -> Result<()> {
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
        return history(&socket, &since, p.as_deref(), 500).await;
    }
    let mut acted = false;
    let changes = change.changes()?;
    if !changes.is_empty() {
        print_response(&call(&socket, Request::SetConfig { changes }).await?);
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
        print_response(&call(&socket, req).await?);
        acted = true;
    }
    for p in &unblock {
        print_response(&call(&socket, Request::Unblock { prefix: prefix(p)? }).await?);
        acted = true;
    }
    for p in &allow {
        print_response(&call(&socket, Request::Allow { prefix: prefix(p)? }).await?);
        acted = true;
    }
    if suggest {
        let layout = PinLayout::new(&pins.pin_dir);
        let maps = datapath::GuardMaps::open_pinned(&layout)?;
        let observe = parse_duration(&observe)?;
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
        println!("live config:");
        print_response(&call(&socket, Request::GetConfig).await?);
        println!("counters:");
        print_response(&call(&socket, Request::Stats).await?);
    }
    Ok(())
}

async fn history(socket: &SocketArg, since: &str, p: Option<&str>, limit: u32) -> Result<()> {
    let since = parse_duration(since)?;
    let since_unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        .saturating_sub(since.as_secs());
    let prefix = p.map(prefix).transpose()?;
    let req = Request::History {
        since_unix_secs,
        prefix,
        limit,
    };
    print_response(&call(socket, req).await?);
    Ok(())
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Run(args) => agent::run(args).await,
        Cmd::Status(pins) => status(&pins),
        Cmd::Unload(pins) => {
            let layout = PinLayout::new(&pins.pin_dir);
            let report = datapath::unload(&layout)?;
            if report.links.is_empty() && report.pins == 0 {
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
        Cmd::Block {
            prefix: p,
            ttl,
            reason: r,
            socket,
        } => {
            let ttl_secs = match ttl {
                Some(t) => u32::try_from(parse_duration(&t)?.as_secs()).context("ttl too long")?,
                None => 0,
            };
            let code = reason::from_name(&r).with_context(|| format!("unknown reason `{r}`"))?;
            let req = Request::Block {
                prefix: prefix(&p)?,
                ttl_secs,
                reason: code,
                detected_at_unix_ns: 0,
                detail: "guard block".into(),
            };
            print_response(&call(&socket, req).await?);
            Ok(())
        }
        Cmd::Unblock { prefix: p, socket } => {
            print_response(
                &call(
                    &socket,
                    Request::Unblock {
                        prefix: prefix(&p)?,
                    },
                )
                .await?,
            );
            Ok(())
        }
        Cmd::Allow { prefix: p, socket } => {
            print_response(
                &call(
                    &socket,
                    Request::Allow {
                        prefix: prefix(&p)?,
                    },
                )
                .await?,
            );
            Ok(())
        }
        Cmd::Disallow { prefix: p, socket } => {
            print_response(
                &call(
                    &socket,
                    Request::Disallow {
                        prefix: prefix(&p)?,
                    },
                )
                .await?,
            );
            Ok(())
        }
        Cmd::Blocks { socket } => {
            print_response(
                &call(
                    &socket,
                    Request::ListBlocks {
                        offset: 0,
                        limit: 500,
                    },
                )
                .await?,
            );
            Ok(())
        }
        Cmd::Config { change, socket } => {
            let changes = change.changes()?;
            let req = if changes.is_empty() {
                Request::GetConfig
            } else {
                Request::SetConfig { changes }
            };
            print_response(&call(&socket, req).await?);
            Ok(())
        }
        Cmd::History {
            since,
            prefix: p,
            limit,
            socket,
        } => history(&socket, &since, p.as_deref(), limit).await,
        Cmd::Tune(args) => tune_cmd(args).await,
    }
}

fn main() {
    // `guard status | head` should end quietly, not panic on a closed pipe.
    // SAFETY: restoring the default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(real_main(cli)) {
        // One sentence the operator can act on, then the chain for context.
        eprintln!("guard: {e:#}");
        std::process::exit(1);
    }
}
