//! The clap definitions of every subcommand and its options (the top-level
//! `Cli` stays in main.rs beside the dispatch).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use guard_common::config_kv;
use guard_user::{duration::clap_duration, paths, settings::RunArgs};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

#[derive(clap::Args, Clone)]
pub(crate) struct SocketArg {
    /// The running agent's control socket.
    #[arg(long, env = "GUARD_CONTROL_SOCKET", default_value = paths::DEFAULT_CONTROL_SOCKET)]
    pub(super) control_socket: PathBuf,
}

#[derive(clap::Args, Clone)]
pub(crate) struct PinArg {
    /// The pin folder (the layout version folder is inside it).
    #[arg(long, env = "GUARD_PIN_DIR", default_value = paths::DEFAULT_PIN_ROOT)]
    pub(super) pin_dir: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
pub(crate) enum ConfigAction {
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
pub(crate) struct TuneArgs {
    #[command(flatten)]
    pub(super) change: ConfigChangeArgs,
    /// Block this prefix with the agent's default TTL (repeat).
    #[arg(long)]
    pub(super) block: Vec<String>,
    /// Lift the block on this prefix (repeat).
    #[arg(long)]
    pub(super) unblock: Vec<String>,
    /// Allow-list this prefix (repeat).
    #[arg(long)]
    pub(super) allow: Vec<String>,
    /// Watch per-source rates in the kernel and propose limits.
    #[arg(long)]
    pub(super) suggest: bool,
    /// How long to watch with --suggest, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = clap_duration)]
    pub(super) observe: Duration,
    /// Show the audit trail (with --since and --prefix).
    #[arg(long)]
    pub(super) history: bool,
    /// With --history: how far back, e.g. 24h.
    #[arg(long, default_value = "24h", requires = "history", value_parser = clap_duration)]
    pub(super) since: Duration,
    /// With --history: only records about prefixes overlapping this one.
    #[arg(long, requires = "history")]
    pub(super) prefix: Option<String>,
    #[command(flatten)]
    pub(super) socket: SocketArg,
    #[command(flatten)]
    pub(super) pins: PinArg,
}

/// Live config changes, as `guard config` and `guard tune` take them.
#[derive(clap::Args)]
pub(crate) struct ConfigChangeArgs {
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
    pub(crate) fn changes(&self) -> Result<Vec<(String, String)>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory as _, Parser as _};

    use crate::Cli;

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
