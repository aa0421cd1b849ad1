//! lab-client: the traffic generator the lab runs inside network namespaces.
//!
//! Every subcommand is bounded in count and in time (`--secs`), stops early and still reports
//! on SIGINT, refuses targets outside the lab ranges, and prints exactly one JSON line on
//! stdout (the structs in `guard_tests::report`). Diagnostics go to stderr.
//!
//! It runs on a single-threaded runtime: one core's worth of load that a bench can pin with
//! taskset, and shared counters that need no locking.
//!
//! What lives where: `cli` (the arguments), `net` (the run's end, sockets, connect outcomes,
//! error logging), one module per workload family: `probe`, `ws` (chat and flood), `sse`
//! (subscribers and the HTTP GET they share with the SSE storm), `floods` (connection and
//! SYN floods, handshake storms), `slow` (never-ending request heads from many sources),
//! `echo`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;

mod cli;
mod echo;
mod floods;
mod net;
mod probe;
mod slow;
mod sse;
mod ws;

use cli::{Cli, Cmd};
use echo::serve_echo;
use floods::{conn_flood, storm, syn_flood, StormKind};
use net::Stop;
use probe::probe;
use slow::slow_heads;
use sse::sse;
use ws::{ws_chat, ws_flood};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::SynFlood(a) = cli.cmd {
        return finish(syn_flood(a));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lab-client: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    finish(runtime.block_on(run(cli.cmd)))
}

fn finish(outcome: Result<String>) -> ExitCode {
    match outcome {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lab-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<String> {
    raise_fd_limit();
    let started = Instant::now();
    let stop = Stop::after(cmd.secs());
    match cmd {
        Cmd::Probe(a) => encode(probe(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::WsChat(a) => encode(ws_chat(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::Sse(a) => encode(sse(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::WsFlood(a) => encode(ws_flood(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::ConnFlood(a) => encode(conn_flood(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::WsStorm(a) => {
            let r = storm(a, StormKind::Ws, &stop).await?;
            encode(r, started, |r| &mut r.elapsed_ms)
        }
        Cmd::SseStorm(a) => {
            let r = storm(a, StormKind::Sse, &stop).await?;
            encode(r, started, |r| &mut r.elapsed_ms)
        }
        Cmd::ServeEcho(a) => encode(serve_echo(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::SlowHeads(a) => encode(slow_heads(a, &stop).await?, started, |r| &mut r.elapsed_ms),
        Cmd::SynFlood(_) => unreachable!("handled before the runtime starts"),
    }
}

/// A report as its JSON line, with the run's duration (from `started`) in its `elapsed_ms`.
fn encode<R: Serialize>(
    mut report: R,
    started: Instant,
    elapsed_ms: impl FnOnce(&mut R) -> &mut u64,
) -> Result<String> {
    *elapsed_ms(&mut report) = started.elapsed().as_millis() as u64;
    serde_json::to_string(&report).context("cannot encode the report")
}

/// Floods and storms hold many sockets; the default soft limit (1024) would turn a
/// `--parallel 2000` run into EMFILE failures that look like server rejections. Raising the
/// soft limit to the hard one only affects this process.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
