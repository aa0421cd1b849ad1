//! `guard`: the agent (`guard run`) and the operator's commands around it.

mod cli;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use guard_common::{
    proto::{BlockRequest, Request},
    state::reason,
};
use guard_user::agent;

use cli::{
    call, config_check, explain_cmd, history, prefix, print_response, status, tune_cmd, unload,
    Cmd, ConfigAction, Output, SocketArg,
};

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

async fn real_main(cli: Cli) -> Result<ExitCode> {
    let out = cli.output;
    let simple = |req: Request, socket: SocketArg| async move {
        print_response(&call(&socket, req).await?, out)
    };
    match cli.command {
        Cmd::Run(args) => agent::run(args).await?,
        Cmd::Status(pins) => return status(&pins, out),
        Cmd::Unload(pins) => unload(&pins, out)?,
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
            let req = Request::Block(BlockRequest {
                prefix: prefix(&p)?,
                ttl_secs,
                reason: code,
                detected_at_unix_ns: 0,
                detail: "guard block".into(),
            });
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
