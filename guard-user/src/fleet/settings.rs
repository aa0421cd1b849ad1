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
}

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
        }))
    }

    pub(super) fn own_subject(&self) -> String {
        format!("{}.{}", self.subject_prefix, self.host)
    }

    pub(super) fn all_subjects(&self) -> String {
        format!("{}.*", self.subject_prefix)
    }
}
