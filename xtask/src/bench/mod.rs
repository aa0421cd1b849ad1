//! `cargo xtask bench`: what guard costs and what it buys, measured on this machine.
//!
//! Three sections, all by default, or a chosen few:
//! - `--datapath`: ns per packet of every verdict path of the real program, through
//!   `BPF_PROG_TEST_RUN` (XDP and tc), with 1 thousand and 1 million tracked sources, each
//!   beside reference programs (the cheapest program of the same verdict, xdp-filter, a
//!   kernel-helper cookie responder) and gated on the ratio to them, and the kernel memory one
//!   tracked source costs;
//! - `--flood`: one SYN flood against no protection, an nftables meter, iptables hashlimit and
//!   guard (XDP native, XDP generic, tc), modes alternating within the run, CPU-pinned (the
//!   server side on one core, the attack tools on the other: `guard_tests::rig`), at a fixed
//!   offered rate (in one burst a second by trafgen -b, and evenly paced) and at the flood
//!   tool's maximum; frames reach the
//!   server as from a NIC unless `--veth-raw` (see `guard_tests::rig::Rig::new`);
//! - `--global`: a random-source flood while returning ("known good") clients keep
//!   connecting, with and without the global new-connection budget;
//! - `--cookies`: WebSocket bulk throughput through connections admitted by a SYN cookie
//!   against normally admitted ones, alternating in one run;
//! - `--app`: what guard's server costs an app against plain `warp::serve`, same release
//!   build: resident memory per idle WebSocket and SSE subscriber, and WebSocket echo
//!   throughput and the server's CPU per message in alternating rounds.
//!
//! Every number printed is measured in this run; the goals are checked against those numbers
//! and reported as met or not. Machines are shared: read ratios between modes of one run, not
//! absolute values.
//!
//! Like the demo, plain xtask stays free of the eBPF build: it runs setup, then re-runs itself
//! with the `lab` feature, which holds the bench itself.
//!
//! One submodule per section (`datapath`, `flood`, `global`, `cookies`, `app`) plus `table` (printed
//! tables and goals); the flood and global sections run on the lab rig, `guard_tests::rig`.

use std::path::PathBuf;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Run the datapath micro-benchmark (BPF_PROG_TEST_RUN). With no section flag, all run.
    #[arg(long)]
    datapath: bool,
    /// Run the flood comparison (none / nftables / iptables / guard XDP, generic, tc).
    #[arg(long)]
    flood: bool,
    /// Run the global-budget section (random sources vs returning clients).
    #[arg(long)]
    global: bool,
    /// Run the SYN-cookie throughput section (cookie-admitted vs normal WebSocket transfers).
    #[arg(long)]
    cookies: bool,
    /// Run the app section (guard's server vs plain warp::serve: idle memory, echo throughput).
    #[arg(long)]
    app: bool,
    /// Shorter runs and fewer repeats (about two minutes for everything).
    #[arg(long)]
    quick: bool,
    /// Also write every result as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Only these flood modes (repeatable): none, nftables, iptables, xdp-native, xdp-generic,
    /// tc. Default: all.
    #[arg(long = "mode", value_name = "MODE")]
    modes: Vec<String>,
    /// Give the server's NAPI thread real-time priority, as softirq has on a lightly loaded
    /// host, so it preempts everything else on the server core. Default: normal priority, as
    /// a kernel under a flood ends up running receive work
    /// (deferred to ksoftirqd, a normal thread): it then shares the core with the server and
    /// the clients, its ring overflows when it has to wait, and an unprotected server loses
    /// legitimate SYNs — which the lost-SYN goal needs to be decided at all.
    #[arg(long)]
    napi_rt: bool,
    /// Flood the plain veth: every frame then wakes the server's NAPI thread and arrives as
    /// the sender's socket buffer, which XDP must free (or first copy into a page), costs a NIC
    /// does not have. Default: the flood arrives as raw frames, as from a NIC, with interrupt
    /// coalescing; see `Rig::new` in tests/src/rig/mod.rs.
    #[arg(long)]
    veth_raw: bool,
    /// The flood's fixed offered rate in SYNs per second from one source, sent both in one
    /// burst a second (trafgen -b) and evenly paced. The default is about what hping3 --flood
    /// reaches from one core of a two-core machine, and large enough that the
    /// filters' shares of the core stand well clear of the idle core's noise.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1_000..=2_000_000))]
    rate: u32,
}

#[cfg(not(feature = "lab"))]
pub fn main(_args: BenchArgs) -> anyhow::Result<()> {
    xtask::exec_with_lab_feature("sudo -E cargo xtask bench")
}

#[cfg(feature = "lab")]
pub use run::main;

mod app;
mod cookies;
mod datapath;
mod flood;
mod global;
mod run;
mod table;
