//! What guard's server costs an app, against plain `warp::serve` in the same
//! build: resident memory per idle WebSocket and SSE subscriber (`idle`), and
//! WebSocket echo throughput (`echo`). Each run prints one JSON line on
//! stdout; `cargo xtask bench --app` builds this in release, runs it once per
//! server and kind, and checks the goals of issue 23.
//!
//! ```text
//! cargo run --release -p guard-common --features warp --example app_bench -- \
//!     idle --server guard --kind ws --conns 8000
//! cargo run --release -p guard-common --features warp --example app_bench -- \
//!     echo --size 64 --size 16384 --rounds 9 --server-cpu 0 --client-cpu 1
//! ```
//!
//! In `idle`, the "warp" side is an app without guard at all (warp's `ws()`
//! and `sse::reply`, served by `warp::serve`): what an app had before it
//! adopted guard's filters and server; the "guard" side is the same app
//! through guard's filters and `Guard::serve`. `echo` compares one guarded
//! app on both servers, with the bare warp app as a reference (see there).

mod echo;
mod idle;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(about = "What guard's server costs an app, against plain warp::serve")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Resident memory per idle connection, for one server and kind.
    Idle(idle::IdleArgs),
    /// WebSocket echo throughput, both servers in alternating rounds.
    Echo(echo::EchoArgs),
}

/// Which server runs the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Server {
    /// guard's filters, served by `Guard::serve`.
    Guard,
    /// Plain warp filters, served by `warp::serve`.
    Warp,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Guard => "guard",
            Server::Warp => "warp",
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Idle(args) => idle::run(&args),
        Cmd::Echo(args) => echo::run(&args),
    }
}

/// Raises the soft open-files limit to the hard one, for both servers alike
/// (guard's server would do it by itself, `warp::serve` would not), and
/// checks that `needed` descriptors fit.
fn raise_nofile_limit(needed: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a valid local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read RLIMIT_NOFILE");
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads one rlimit from a valid local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot raise RLIMIT_NOFILE");
    }
    anyhow::ensure!(
        lim.rlim_cur >= needed,
        "{needed} descriptors are needed but the open-files limit is {}: raise it \
         (ulimit -n) or measure fewer connections",
        lim.rlim_cur
    );
    Ok(())
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array (all-zero is the empty set) and
    // cpu is below CPU_SETSIZE, so CPU_SET stays in bounds.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is a valid local.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `[1.5,2]`: numbers as a JSON array (non-finite ones as null).
fn json_numbers(values: &[f64]) -> String {
    let items: Vec<String> = values.iter().map(|v| json_number(*v)).collect();
    format!("[{}]", items.join(","))
}

fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}
