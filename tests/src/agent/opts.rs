//! What a test asks of the agent it starts; [`super::AgentHome`] fills in the paths.

use std::path::PathBuf;

use crate::launch::LogFilter;

/// How to start `guard run`.
#[derive(Debug, Clone)]
pub struct RunOpts {
    pub iface: String,
    pub port: u16,
    /// `--attach`: xdp, xdp-native, xdp-generic or tc; `None` is the agent's default.
    pub attach: Option<String>,
    /// `--set key=value` live-config changes.
    pub sets: Vec<String>,
    /// A TOML config file's text, written into the agent's temp dir.
    pub config: Option<String>,
    /// `RUST_LOG` for the agent (info unless set); [`LogFilter::Unset`] lets guard.toml's
    /// `log_level` decide.
    pub log: LogFilter,
    /// Audit log path; `None` is the agent's temp dir.
    pub audit_log: Option<PathBuf>,
    /// Extra environment for the agent (`NOTIFY_SOCKET`, a stripped `PATH`), set last.
    pub envs: Vec<(String, String)>,
}

impl RunOpts {
    pub fn new(iface: &str, port: u16) -> Self {
        Self {
            iface: iface.to_string(),
            port,
            attach: None,
            sets: Vec::new(),
            config: None,
            log: LogFilter::default(),
            audit_log: None,
            envs: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn attach(mut self, mode: &str) -> Self {
        self.attach = Some(mode.to_string());
        self
    }

    pub fn set(mut self, assignment: &str) -> Self {
        self.sets.push(assignment.to_string());
        self
    }

    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    pub fn log(mut self, filter: &str) -> Self {
        self.log = LogFilter::Filter(filter.to_string());
        self
    }

    pub fn audit_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit_log = Some(path.into());
        self
    }
}
