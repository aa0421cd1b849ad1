//! The agent's settings: a TOML file (`--config`), overridden by command-line
//! options, which clap also reads from `GUARD_*` environment variables.
//! guard-user/deploy/guard.toml documents every key.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use guard_common::{addr::Prefix, config_kv, LiveConfig};
use serde::Deserialize;

use crate::{
    adaptive::AdaptiveSettings,
    control::Widest,
    datapath::{AttachRequest, MapSizes},
    paths,
};

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub interfaces: Vec<String>,
    pub ports: Vec<u16>,
    pub attach: Option<String>,
    pub dry_run: Option<bool>,
    pub block_all_traffic: Option<bool>,
    pub allow: Vec<String>,
    pub trusted_proxies: Vec<String>,
    pub metrics_addr: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub pin_dir: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub log_level: Option<String>,
    /// cgroup v2 folder whose sockets are counted (connection cap, known-good).
    pub cgroup: Option<PathBuf>,
    /// The host's cgroup2 root mounted into a sidecar container: count the whole pod.
    pub host_cgroup_mount: Option<PathBuf>,
    /// Keys of guard_common::config_kv (the live config).
    pub limits: toml::Table,
    pub blocks: BlocksFile,
    pub control: ControlFile,
    pub escalation: EscalationFile,
    pub adaptive: AdaptiveFile,
    pub maps: MapsFile,
    pub fleet: crate::fleet::FleetFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlocksFile {
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub default_ttl_secs: Option<u64>,
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub max_ttl_secs: Option<u64>,
    pub capacity: Option<u32>,
    /// Share of the blocklist only operators and escalation may fill.
    pub reserved_percent: Option<u32>,
    /// How far ahead of this host's clock a decision may be dated.
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub max_skew_secs: Option<u64>,
    /// Block reports a reporting uid may make per second, and in a burst.
    pub reporter_rate: Option<u32>,
    pub reporter_burst: Option<u32>,
    /// Active blocks one reporting uid may hold.
    pub reporter_max_entries: Option<u32>,
    /// Share of the blocklist every reporter together may hold.
    pub reporter_share_percent: Option<u32>,
}

/// Who may do what on the control socket, and how long a session may idle.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlFile {
    pub operator_group: Option<String>,
    pub operator_uids: Vec<u32>,
    pub reporter_uids: Vec<u32>,
    pub widest_report_v4: Option<u8>,
    pub widest_report_v6: Option<u8>,
    pub widest_block_v4: Option<u8>,
    pub widest_block_v6: Option<u8>,
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub idle_timeout_secs: Option<u64>,
    /// Sessions one uid may hold at once.
    pub max_sessions_per_uid: Option<usize>,
    /// Of the socket's sessions, how many only operators may take.
    pub operator_slots: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EscalationFile {
    pub enabled: Option<bool>,
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub over_cap_secs: Option<u64>,
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub ttl_secs: Option<u64>,
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub max_ttl_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveFile {
    pub enabled: Option<bool>,
    pub floor_syn_rate: Option<u32>,
    pub floor_syn_burst: Option<u32>,
    pub step_percent: Option<u32>,
    #[serde(deserialize_with = "crate::duration::de_opt_secs")]
    pub calm_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapsFile {
    pub sources: Option<u32>,
    pub aggregates: Option<u32>,
    pub allow: Option<u32>,
}

/// Command-line options of `guard run` (each also from `GUARD_<NAME>`).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunArgs {
    /// TOML config file; options given here override it.
    #[arg(long, env = "GUARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Interface to protect (repeat, or comma-separate in the env var).
    #[arg(
        long = "interface",
        short = 'i',
        env = "GUARD_INTERFACE",
        value_delimiter = ','
    )]
    pub interfaces: Vec<String>,
    /// TCP port to protect (repeat, or comma-separate).
    #[arg(long = "port", short = 'p', env = "GUARD_PORT", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// xdp (native, falls back to generic), xdp-native, xdp-generic or tc.
    #[arg(long, env = "GUARD_ATTACH")]
    pub attach: Option<String>,
    /// Count what would be dropped, drop nothing.
    #[arg(long, env = "GUARD_DRY_RUN")]
    pub dry_run: bool,
    /// Prefix that is never capped or blocked (repeat).
    #[arg(long = "allow", env = "GUARD_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// A reverse proxy in front of the app: always allowed, never blocked.
    #[arg(
        long = "trusted-proxy",
        env = "GUARD_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// HOST:PORT to serve Prometheus /metrics on (default 127.0.0.1:9940).
    #[arg(long, env = "GUARD_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Unix socket the CLI and the app talk to (default /run/guard/control.sock).
    #[arg(long, env = "GUARD_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
    /// Group that owns the control socket (its members may connect).
    #[arg(long, env = "GUARD_CONTROL_GROUP")]
    pub control_group: Option<String>,
    /// Folder under bpffs for the pins (default /sys/fs/bpf/guard).
    #[arg(long, env = "GUARD_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// JSON-lines audit log of every block, unblock and change (default:
    /// none, records go to the log only).
    #[arg(long, env = "GUARD_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// cgroup v2 folder of the app, for connection tracking (default: the
    /// cgroup2 root, i.e. every process on the host).
    #[arg(long, env = "GUARD_CGROUP", conflicts_with = "host_cgroup_mount")]
    pub cgroup: Option<PathBuf>,
    /// In a pod sidecar: where the host's cgroup2 root is mounted into this container
    /// (e.g. /host/sys/fs/cgroup). Connection tracking then counts every container of the
    /// pod, found as the parent of this container's cgroup.
    #[arg(long, env = "GUARD_HOST_CGROUP_MOUNT")]
    pub host_cgroup_mount: Option<PathBuf>,
    /// Tighten per-source limits while the server drops handshakes.
    #[arg(long, env = "GUARD_ADAPTIVE")]
    pub adaptive: bool,
    /// A live-config change, e.g. `--set syn_rate=50` (repeat).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// NATS server URL of the fleet's JetStream (repeat, or comma-separate);
    /// turns block sharing on. See `[fleet]` in guard.toml.
    #[arg(long = "fleet-url", env = "GUARD_FLEET_URL", value_delimiter = ',')]
    pub fleet_urls: Vec<String>,
    /// This host's name in the fleet (default: the kernel's hostname).
    #[arg(long, env = "GUARD_FLEET_HOST")]
    pub fleet_host: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BlockSettings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub capacity: u32,
    /// Percent of `capacity` that reporters and the fleet may not fill:
    /// there is always room for an operator's block and an escalation.
    pub reserved_percent: u32,
    /// A decision dated further ahead of this host's clock is refused.
    pub max_skew: Duration,
    pub reporter: ReporterLimits,
}

/// What one reporting peer (a uid that is not an operator) may add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReporterLimits {
    /// Block reports per second, refilled continuously, and the burst.
    pub rate: u32,
    pub burst: u32,
    /// Active blocks one reporting uid may hold.
    pub max_entries: u32,
    /// Percent of the blocklist's capacity every reporter together may hold.
    pub share_percent: u32,
}

impl ReporterLimits {
    pub const DEFAULT: Self = Self {
        rate: 100,
        burst: 1000,
        max_entries: 4096,
        share_percent: 50,
    };
}

/// Default of `[blocks] reserved_percent`.
pub const DEFAULT_RESERVED_PERCENT: u32 = 10;
/// Default of `[blocks] max_skew_secs`.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(30);

/// The control socket's file and who may connect to it (the top-level `control_socket`,
/// `control_group`, `allowed_uids` and `allowed_gids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSocket {
    pub path: PathBuf,
    /// Group of the socket file, by name or number; `None` keeps the agent's.
    pub group: Option<String>,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
}

impl ControlSocket {
    /// A socket at `path` that root, the agent's own uid and the socket file's group may
    /// use, nobody else.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
        }
    }
}

/// The control socket's roles and session limits (`[control]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSettings {
    pub operator_group: Option<String>,
    pub operator_uids: Vec<u32>,
    pub reporter_uids: Vec<u32>,
    pub widest_report: Widest,
    pub widest_block: Widest,
    pub idle_timeout: Duration,
    /// Sessions one uid may hold at once (operators included).
    pub max_sessions_per_uid: usize,
    /// Of the socket's sessions, those only operators may take.
    pub operator_slots: usize,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            operator_group: None,
            operator_uids: Vec::new(),
            reporter_uids: Vec::new(),
            widest_report: Widest::REPORT,
            widest_block: Widest::BLOCK,
            idle_timeout: Duration::from_secs(30),
            max_sessions_per_uid: crate::control::DEFAULT_SESSIONS_PER_UID,
            operator_slots: crate::control::DEFAULT_OPERATOR_SLOTS,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EscalationSettings {
    pub enabled: bool,
    pub over_cap_for: Duration,
    pub ttl: Duration,
    pub max_ttl: Duration,
}

/// Everything the agent runs with, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_file: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub ports: Vec<u16>,
    pub attach: AttachRequest,
    pub live: LiveConfig,
    /// Operator allow-list plus loopback and trusted proxies.
    pub allow: Vec<Prefix>,
    pub trusted_proxies: Vec<Prefix>,
    pub metrics_addr: SocketAddr,
    pub control_socket: ControlSocket,
    pub control: ControlSettings,
    pub pin_root: PathBuf,
    pub audit_log: Option<PathBuf>,
    pub log_level: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub host_cgroup_mount: Option<PathBuf>,
    pub blocks: BlockSettings,
    pub escalation: EscalationSettings,
    pub adaptive: AdaptiveSettings,
    pub map_sizes: MapSizes,
    /// Block sharing through NATS JetStream; `None` is a single host.
    pub fleet: Option<crate::fleet::FleetSettings>,
}

fn parse_prefixes(what: &str, items: &[String]) -> Result<Vec<Prefix>> {
    items
        .iter()
        .map(|s| {
            s.parse::<Prefix>()
                .with_context(|| format!("{what}: bad prefix"))
        })
        .collect()
}

/// Loopback can never be blocked: the agent's own health checks and local
/// sidecars talk over it.
pub fn loopback() -> [Prefix; 2] {
    [
        "127.0.0.0/8".parse().expect("literal"),
        "::1/128".parse().expect("literal"),
    ]
}

impl Settings {
    pub fn load(args: &RunArgs) -> Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(args: &RunArgs, file: FileConfig) -> Result<Self> {
        let interfaces = if args.interfaces.is_empty() {
            file.interfaces
        } else {
            args.interfaces.clone()
        };
        if interfaces.is_empty() {
            bail!("no interface to protect: pass --interface IF (or set `interfaces` in the config file)");
        }
        let ports = if args.ports.is_empty() {
            file.ports
        } else {
            args.ports.clone()
        };
        if ports.is_empty() {
            bail!("no port to protect: pass --port N (or set `ports` in the config file)");
        }
        if ports.contains(&0) {
            bail!("port 0 cannot be protected: give the TCP ports your WebSocket/SSE service listens on");
        }
        let attach: AttachRequest = args
            .attach
            .clone()
            .or(file.attach)
            .unwrap_or_else(|| "xdp".into())
            .parse()
            .map_err(anyhow::Error::msg)?;

        let mut live = LiveConfig::DEFAULT;
        let mut changes: Vec<(String, String)> = Vec::new();
        for (key, value) in &file.limits {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            changes.push((key.clone(), text));
        }
        if file.dry_run == Some(true) || args.dry_run {
            changes.push(("dry_run".into(), "true".into()));
        }
        if let Some(b) = file.block_all_traffic {
            changes.push(("block_all_traffic".into(), b.to_string()));
        }
        if !changes.is_empty() {
            live = config_kv::apply_config_changes(&live, &changes)
                .map_err(|e| anyhow::anyhow!("limits: {e}"))?;
        }
        // The command line applies after the file, so it may repeat a key.
        let mut overrides = Vec::new();
        for item in &args.set {
            overrides.push(
                config_kv::parse_assignment(item)
                    .map_err(|e| anyhow::anyhow!("--set {item}: {e}"))?,
            );
        }
        if !overrides.is_empty() {
            live = config_kv::apply_config_changes(&live, &overrides)
                .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
        }

        let trusted_items = if args.trusted_proxies.is_empty() {
            file.trusted_proxies
        } else {
            args.trusted_proxies.clone()
        };
        let trusted_proxies = parse_prefixes("trusted_proxies", &trusted_items)?;
        let allow_items = if args.allow.is_empty() {
            file.allow
        } else {
            args.allow.clone()
        };
        let mut allow = parse_prefixes("allow", &allow_items)?;
        allow.extend(loopback());
        allow.extend(trusted_proxies.iter().copied());
        allow.sort();
        allow.dedup();

        let metrics_addr = args
            .metrics_addr
            .clone()
            .or(file.metrics_addr)
            .unwrap_or_else(|| paths::DEFAULT_METRICS_ADDR.into());
        let metrics_addr: SocketAddr = metrics_addr
            .parse()
            .with_context(|| format!("metrics_addr `{metrics_addr}` is not HOST:PORT"))?;

        let blocks = BlockSettings {
            default_ttl: Duration::from_secs(file.blocks.default_ttl_secs.unwrap_or(300)),
            max_ttl: Duration::from_secs(file.blocks.max_ttl_secs.unwrap_or(86_400)),
            capacity: file
                .blocks
                .capacity
                .unwrap_or(guard_common::maps::DEFAULT_BLOCK),
            reserved_percent: file
                .blocks
                .reserved_percent
                .unwrap_or(DEFAULT_RESERVED_PERCENT),
            max_skew: file
                .blocks
                .max_skew_secs
                .map_or(DEFAULT_MAX_SKEW, Duration::from_secs),
            reporter: ReporterLimits {
                rate: file
                    .blocks
                    .reporter_rate
                    .unwrap_or(ReporterLimits::DEFAULT.rate),
                burst: file
                    .blocks
                    .reporter_burst
                    .unwrap_or(ReporterLimits::DEFAULT.burst),
                max_entries: file
                    .blocks
                    .reporter_max_entries
                    .unwrap_or(ReporterLimits::DEFAULT.max_entries),
                share_percent: file
                    .blocks
                    .reporter_share_percent
                    .unwrap_or(ReporterLimits::DEFAULT.share_percent),
            },
        };
        if blocks.default_ttl.is_zero() || blocks.default_ttl > blocks.max_ttl {
            bail!("blocks: default_ttl_secs must be between 1 and max_ttl_secs");
        }
        if blocks.reserved_percent > 90 {
            bail!(
                "blocks: reserved_percent must be 0..=90 (reporters and the fleet need room too)"
            );
        }
        if blocks.reporter.share_percent > 100 {
            bail!("blocks: reporter_share_percent is a percent of capacity, 0..=100");
        }
        if blocks.reporter.rate == 0 || blocks.reporter.burst == 0 {
            bail!("blocks: reporter_rate and reporter_burst must be at least 1 (set reporter_share_percent = 0 to refuse every report)");
        }
        let c = &file.control;
        let d = ControlSettings::default();
        let control = ControlSettings {
            operator_group: c.operator_group.clone(),
            operator_uids: c.operator_uids.clone(),
            reporter_uids: c.reporter_uids.clone(),
            widest_report: Widest {
                v4: c.widest_report_v4.unwrap_or(d.widest_report.v4),
                v6: c.widest_report_v6.unwrap_or(d.widest_report.v6),
            },
            widest_block: Widest {
                v4: c.widest_block_v4.unwrap_or(d.widest_block.v4),
                v6: c.widest_block_v6.unwrap_or(d.widest_block.v6),
            },
            idle_timeout: c
                .idle_timeout_secs
                .map_or(d.idle_timeout, Duration::from_secs),
            max_sessions_per_uid: c.max_sessions_per_uid.unwrap_or(d.max_sessions_per_uid),
            operator_slots: c.operator_slots.unwrap_or(d.operator_slots),
        };
        if control.max_sessions_per_uid == 0 {
            bail!("control: max_sessions_per_uid must be at least 1");
        }
        if control.operator_slots >= crate::control::MAX_SESSIONS {
            bail!(
                "control: operator_slots must leave reporters at least one of the socket's {} sessions",
                crate::control::MAX_SESSIONS
            );
        }
        for w in [control.widest_report, control.widest_block] {
            if w.v4 > 32 || w.v6 > 128 {
                bail!("control: widest_*_v4 is a prefix length of at most 32, widest_*_v6 at most 128");
            }
        }
        if control.widest_report.v4 < control.widest_block.v4
            || control.widest_report.v6 < control.widest_block.v6
        {
            bail!("control: widest_report_v4/v6 may not be wider than widest_block_v4/v6 (a smaller number is wider)");
        }
        if control.idle_timeout.is_zero() {
            bail!("control: idle_timeout_secs must be at least 1 (an idle session holds one of the socket's 64 slots)");
        }
        let escalation = EscalationSettings {
            enabled: file.escalation.enabled.unwrap_or(true),
            over_cap_for: Duration::from_secs(file.escalation.over_cap_secs.unwrap_or(10)),
            ttl: Duration::from_secs(file.escalation.ttl_secs.unwrap_or(60)),
            max_ttl: Duration::from_secs(file.escalation.max_ttl_secs.unwrap_or(3600)),
        };
        let adaptive = AdaptiveSettings {
            enabled: args.adaptive || file.adaptive.enabled.unwrap_or(false),
            floor_syn_rate: file.adaptive.floor_syn_rate.unwrap_or(5),
            floor_syn_burst: file.adaptive.floor_syn_burst.unwrap_or(10),
            step_percent: file.adaptive.step_percent.unwrap_or(25),
            calm: Duration::from_secs(file.adaptive.calm_secs.unwrap_or(30)),
        };
        if adaptive.step_percent == 0 || adaptive.step_percent > 90 {
            bail!("adaptive: step_percent must be 1..=90");
        }
        let defaults = MapSizes::default();
        let map_sizes = MapSizes {
            sources: file.maps.sources.unwrap_or(defaults.sources),
            aggregates: file.maps.aggregates.unwrap_or(defaults.aggregates),
            allow: file.maps.allow.unwrap_or(defaults.allow),
            block: blocks.capacity,
        };
        let fleet = crate::fleet::FleetSettings::resolve(
            &file.fleet,
            &args.fleet_urls,
            args.fleet_host.as_deref(),
        )?;
        let cgroup = args.cgroup.clone().or(file.cgroup);
        let host_cgroup_mount = args.host_cgroup_mount.clone().or(file.host_cgroup_mount);
        if let (Some(c), Some(h)) = (&cgroup, &host_cgroup_mount) {
            bail!(
                "both cgroup ({}) and host_cgroup_mount ({}) are set: cgroup names the folder \
                 to count, host_cgroup_mount finds the pod's; keep one",
                c.display(),
                h.display()
            );
        }
        Ok(Self {
            config_file: args.config.clone(),
            interfaces,
            ports,
            attach,
            live,
            allow,
            trusted_proxies,
            metrics_addr,
            control_socket: ControlSocket {
                path: args
                    .control_socket
                    .clone()
                    .or(file.control_socket)
                    .unwrap_or_else(|| paths::DEFAULT_CONTROL_SOCKET.into()),
                group: args.control_group.clone().or(file.control_group),
                allowed_uids: file.allowed_uids,
                allowed_gids: file.allowed_gids,
            },
            control,
            pin_root: args
                .pin_dir
                .clone()
                .or(file.pin_dir)
                .unwrap_or_else(|| paths::DEFAULT_PIN_ROOT.into()),
            audit_log: args.audit_log.clone().or(file.audit_log),
            log_level: {
                crate::logging::check_filter(file.log_level.as_deref())?;
                file.log_level
            },
            cgroup,
            host_cgroup_mount,
            blocks,
            escalation,
            adaptive,
            map_sizes,
            fleet,
        })
    }
}

pub fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(interfaces: &[&str], ports: &[u16]) -> RunArgs {
        RunArgs {
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            ports: ports.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn the_shipped_sample_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/guard.toml");
        let file = read_file(&path).expect("deploy/guard.toml parses");
        let s = Settings::merge(&RunArgs::default(), file).expect("and validates");
        assert_eq!(s.live, LiveConfig::DEFAULT);
        assert_eq!(s.ports, vec![8080]);
        let defaults = Settings::merge(&args(&["eth0"], &[8080]), FileConfig::default()).unwrap();
        assert_eq!(s.control, defaults.control, "the sample shows the defaults");
    }

    #[test]
    fn control_roles_and_limits() {
        let merge =
            |f: &str| Settings::merge(&args(&["eth0"], &[8080]), toml::from_str(f).unwrap());
        let d = merge("").unwrap().control;
        assert_eq!(
            d,
            ControlSettings {
                operator_group: None,
                operator_uids: vec![],
                reporter_uids: vec![],
                widest_report: Widest { v4: 24, v6: 48 },
                widest_block: Widest { v4: 8, v6: 32 },
                idle_timeout: Duration::from_secs(30),
                max_sessions_per_uid: 16,
                operator_slots: 8,
            }
        );
        let c = merge(
            "[control]\noperator_group = \"guard-admin\"\noperator_uids = [1001]\n\
             reporter_uids = [0]\nwidest_report_v4 = 28\nwidest_block_v6 = 0\n\
             widest_block_v4 = 0\nidle_timeout_secs = 5\n",
        )
        .unwrap()
        .control;
        assert_eq!(c.operator_group.as_deref(), Some("guard-admin"));
        assert_eq!((c.operator_uids, c.reporter_uids), (vec![1001], vec![0]));
        assert_eq!(c.widest_report, Widest { v4: 28, v6: 48 });
        assert_eq!(c.widest_block, Widest { v4: 0, v6: 0 });
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        for bad in [
            "widest_report_v4 = 33",
            "widest_block_v6 = 129",
            "widest_report_v4 = 7",
            "widest_report_v6 = 31",
            "idle_timeout_secs = 0",
            "max_sessions_per_uid = 0",
            "operator_slots = 64",
        ] {
            let e = merge(&format!("[control]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("control: "), "{bad}: {e}");
        }
    }

    #[test]
    fn block_rules_take_their_defaults_and_refuse_bad_bounds() {
        let merge =
            |f: &str| Settings::merge(&args(&["eth0"], &[8080]), toml::from_str(f).unwrap());
        let b = merge("").unwrap().blocks;
        assert_eq!(b.reserved_percent, DEFAULT_RESERVED_PERCENT);
        assert_eq!(b.max_skew, DEFAULT_MAX_SKEW);
        assert_eq!(b.reporter, ReporterLimits::DEFAULT);
        let b = merge(
            "[blocks]\nreserved_percent = 20\nmax_skew_secs = \"2m\"\nreporter_rate = 5\n\
             reporter_burst = 50\nreporter_max_entries = 100\nreporter_share_percent = 0\n",
        )
        .unwrap()
        .blocks;
        assert_eq!(b.reserved_percent, 20);
        assert_eq!(b.max_skew, Duration::from_secs(120));
        assert_eq!(
            b.reporter,
            ReporterLimits {
                rate: 5,
                burst: 50,
                max_entries: 100,
                share_percent: 0
            }
        );
        for bad in [
            "reserved_percent = 91",
            "reporter_share_percent = 101",
            "reporter_rate = 0",
            "reporter_burst = 0",
        ] {
            let e = merge(&format!("[blocks]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("blocks: "), "{bad}: {e}");
        }
    }

    #[test]
    fn command_line_overrides_the_file_and_loopback_is_always_allowed() {
        let file: FileConfig = toml::from_str(
            "interfaces = [\"eth0\"]\nports = [80]\n[limits]\nsyn_rate = 5\nsyn_burst = 7\n",
        )
        .unwrap();
        let mut a = args(&["veth1"], &[8080]);
        a.set = vec!["syn_rate=50".into()];
        a.trusted_proxies = vec!["198.18.0.254".into()];
        let s = Settings::merge(&a, file).unwrap();
        assert_eq!(s.interfaces, vec!["veth1"]);
        assert_eq!(s.ports, vec![8080]);
        assert_eq!((s.live.syn_rate, s.live.syn_burst), (50, 7));
        let lo: Prefix = "127.0.0.0/8".parse().unwrap();
        let proxy: Prefix = "198.18.0.254/32".parse().unwrap();
        assert!(s.allow.contains(&lo) && s.allow.contains(&proxy));
    }

    #[test]
    fn secs_keys_take_compound_durations() {
        let s = Settings::merge(
            &args(&["eth0"], &[8080]),
            toml::from_str(
                "[blocks]\ndefault_ttl_secs = \"1h30m\"\nmax_ttl_secs = \"2d\"\n\
                 [escalation]\nttl_secs = \"90s\"\nover_cap_secs = 20\n",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(s.blocks.default_ttl, Duration::from_secs(5_400));
        assert_eq!(s.blocks.max_ttl, Duration::from_secs(172_800));
        assert_eq!(s.escalation.ttl, Duration::from_secs(90));
        assert_eq!(s.escalation.over_cap_for, Duration::from_secs(20));
        let e = toml::from_str::<FileConfig>("[blocks]\nmax_ttl_secs = \"1h1h\"\n")
            .expect_err("a repeated unit is refused")
            .to_string();
        assert!(e.contains("1h1h"), "{e}");
    }

    #[test]
    fn bad_input_is_named() {
        let e = |a: RunArgs, f: &str| {
            Settings::merge(&a, toml::from_str(f).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(e(args(&[], &[8080]), "").contains("--interface"));
        assert!(e(args(&["eth0"], &[]), "").contains("--port"));
        let mut a = args(&["eth0"], &[8080]);
        a.allow = vec!["198.18.0.0/33".into()];
        assert!(format!(
            "{:#}",
            Settings::merge(&a, FileConfig::default()).unwrap_err()
        )
        .contains("198.18.0.0/33"));
        assert!(e(args(&["eth0"], &[8080]), "[limits]\nsyn_ratee = 3\n").contains("syn_ratee"));
        let mut a = args(&["eth0"], &[8080]);
        a.attach = Some("ebpf".into());
        assert!(Settings::merge(&a, FileConfig::default())
            .unwrap_err()
            .to_string()
            .contains("attach mode"));
        assert!(
            toml::from_str::<FileConfig>("bogus = 1").is_err(),
            "unknown keys are refused"
        );
    }
}
