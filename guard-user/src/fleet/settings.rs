//! `[fleet]` as written in guard.toml and as validated: servers, host name, stream,
//! credentials, TLS.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// `[fleet]` in guard.toml.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetFile {
    /// NATS server URLs (`nats://host:4222`, `tls://…`); none: fleet off.
    pub urls: Vec<String>,
    /// This host's name in the fleet (default: the kernel's hostname).
    pub host: Option<String>,
    pub stream: Option<String>,
    pub subject_prefix: Option<String>,
    /// Replicas of the stream when this agent creates it (1..=5).
    pub replicas: Option<usize>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_required: Option<bool>,
    /// Decisions held while NATS is unreachable before the oldest go.
    pub queue_limit: Option<usize>,
    /// Decisions each other host may have applied here per second, and in a burst.
    pub host_rate: Option<u32>,
    pub host_burst: Option<u32>,
    /// Percent of this host's blocklist each other host may hold.
    pub host_share_percent: Option<u32>,
    /// What another host's unblock may lift here: `fleet` (blocks that came from the fleet)
    /// or `any` (this host's own blocks too).
    pub unblocks: Option<String>,
    /// When the stream is gone: `recreate` it, or `wait` for it to come back.
    pub missing_stream: Option<String>,
}

/// What another host's unblock may lift here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnblockScope {
    /// Only blocks that came from the fleet: a host's own blocks (its operator's, its app's,
    /// its escalations) are lifted where they were decided, then everywhere.
    Fleet,
    /// Any block, this host's own included.
    Any,
}

/// What the follower does when the stream is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingStream {
    /// Create it again (empty) and follow it from its start.
    Recreate,
    /// Wait for someone else (an operator, a provisioning job) to create it.
    Wait,
}

/// Defaults of the per-host bounds: a burst of a few thousand (a real incident on one host),
/// then 200 a second; a quarter of the blocklist.
pub const DEFAULT_HOST_RATE: u32 = 200;
pub const DEFAULT_HOST_BURST: u32 = 5000;
pub const DEFAULT_HOST_SHARE_PERCENT: u32 = 25;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    UserPassword { user: String, password: String },
    Token(String),
    CredsFile(PathBuf),
}

/// The fleet settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub urls: Vec<String>,
    pub host: String,
    pub stream: String,
    pub subject_prefix: String,
    pub replicas: usize,
    pub auth: Auth,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub tls_required: bool,
    pub queue_limit: usize,
    pub host_rate: u32,
    pub host_burst: u32,
    pub host_share_percent: u32,
    pub unblocks: UnblockScope,
    pub missing_stream: MissingStream,
}

/// A NATS subject token: letters, digits, `-` and `_` only.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(super) fn kernel_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!name.is_empty()).then_some(name)
}

impl FleetSettings {
    /// `None` when no URL is configured (the fleet is off). `urls` and
    /// `host` from the command line win over the file's.
    pub fn resolve(file: &FleetFile, urls: &[String], host: Option<&str>) -> Result<Option<Self>> {
        let urls: Vec<String> = if urls.is_empty() {
            file.urls.clone()
        } else {
            urls.to_vec()
        };
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        for url in &urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("fleet: `{url}` is not a NATS server URL: {e}"))?;
        }
        let host = match host.map(str::to_string).or_else(|| file.host.clone()) {
            Some(h) => h,
            None => kernel_hostname()
                .context("fleet: no host name given and /proc/sys/kernel/hostname is unreadable; set [fleet] host")?,
        };
        if !is_token(&host) {
            bail!("fleet: host `{host}` may hold only letters, digits, `-` and `_` (it is a NATS subject token), at most 64");
        }
        let stream = file.stream.clone().unwrap_or_else(|| "GUARD_BLOCKS".into());
        if !is_token(&stream) {
            bail!("fleet: stream `{stream}` may hold only letters, digits, `-` and `_`");
        }
        let subject_prefix = file
            .subject_prefix
            .clone()
            .unwrap_or_else(|| "guard.blocks".into());
        if subject_prefix.split('.').any(|t| !is_token(t)) {
            bail!("fleet: subject_prefix `{subject_prefix}` must be dot-separated tokens of letters, digits, `-` and `_`");
        }
        let replicas = file.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            bail!("fleet: replicas must be 1..=5 (JetStream's limit)");
        }
        let auth = match (&file.user, &file.password, &file.token, &file.creds_file) {
            (None, None, None, None) => Auth::None,
            (Some(user), Some(password), None, None) => Auth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(token), None) => Auth::Token(token.clone()),
            (None, None, None, Some(path)) => Auth::CredsFile(path.clone()),
            (Some(_), None, None, None) | (None, Some(_), None, None) => {
                bail!("fleet: user and password go together")
            }
            _ => bail!("fleet: give one of user+password, token or creds_file"),
        };
        let tls_client = match (&file.tls_cert_file, &file.tls_key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => bail!("fleet: tls_cert_file and tls_key_file go together"),
        };
        let queue_limit = file.queue_limit.unwrap_or(100_000);
        if queue_limit == 0 {
            bail!("fleet: queue_limit must be at least 1");
        }
        let host_rate = file.host_rate.unwrap_or(DEFAULT_HOST_RATE);
        let host_burst = file.host_burst.unwrap_or(DEFAULT_HOST_BURST);
        if host_rate == 0 || host_burst == 0 {
            bail!("fleet: host_rate and host_burst must be at least 1");
        }
        let host_share_percent = file
            .host_share_percent
            .unwrap_or(DEFAULT_HOST_SHARE_PERCENT);
        if host_share_percent > 100 {
            bail!("fleet: host_share_percent is a percent of the blocklist's capacity, 0..=100");
        }
        let unblocks = match file.unblocks.as_deref().unwrap_or("fleet") {
            "fleet" => UnblockScope::Fleet,
            "any" => UnblockScope::Any,
            other => bail!("fleet: unblocks = `{other}`: give `fleet` or `any`"),
        };
        let missing_stream = match file.missing_stream.as_deref().unwrap_or("recreate") {
            "recreate" => MissingStream::Recreate,
            "wait" => MissingStream::Wait,
            other => bail!("fleet: missing_stream = `{other}`: give `recreate` or `wait`"),
        };
        Ok(Some(Self {
            urls,
            host,
            stream,
            subject_prefix,
            replicas,
            auth,
            tls_ca_file: file.tls_ca_file.clone(),
            tls_client,
            tls_required: file.tls_required.unwrap_or(false),
            queue_limit,
            host_rate,
            host_burst,
            host_share_percent,
            unblocks,
            missing_stream,
        }))
    }

    pub(super) fn own_subject(&self) -> String {
        format!("{}.{}", self.subject_prefix, self.host)
    }

    pub(super) fn all_subjects(&self) -> String {
        format!("{}.*", self.subject_prefix)
    }
}
