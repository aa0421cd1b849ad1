//! The one way the lab starts `guard run`: every lab set-up (the agent tests' `AgentHome`,
//! the demo's `Stack`, the bench's `Rig`, the two-namespace `Setup`) describes its agent as a
//! [`GuardRun`] and wraps the resulting command the way its topology needs (inside a
//! namespace, pinned to a core, inside a pod's cgroup namespace).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::process::{without_guard_env, ChildGuard};

/// What `guard run` logs once its control socket and metrics listener are up.
pub const READY_LINE: &str = "guard running on";

/// How `RUST_LOG` reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFilter {
    /// `RUST_LOG=<filter>`.
    Filter(String),
    /// No `RUST_LOG`: guard.toml's `log_level` decides.
    Unset,
}

impl Default for LogFilter {
    /// What the lab's readiness check needs to see: `info`.
    fn default() -> Self {
        Self::Filter("info".to_string())
    }
}

/// The command line and environment of one `guard run`.
#[derive(Debug, Clone)]
pub struct GuardRun {
    pub iface: String,
    pub port: u16,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub audit_log: Option<PathBuf>,
    /// `--metrics-addr`; port 0 when nothing scrapes it.
    pub metrics_addr: String,
    pub config: Option<PathBuf>,
    /// `--cgroup`: the server's cgroup, whose sockets connection tracking counts.
    pub cgroup: Option<PathBuf>,
    /// `--attach`: xdp, xdp-native, xdp-generic or tc; `None` is the agent's default.
    pub attach: Option<String>,
    /// `--set key=value` live-config changes.
    pub sets: Vec<String>,
    /// Further arguments, after all of the above.
    pub extra: Vec<OsString>,
    pub log: LogFilter,
    /// Extra environment (`NOTIFY_SOCKET`, a stripped `PATH`), set last.
    pub envs: Vec<(String, String)>,
}

impl GuardRun {
    /// `guard run -i IFACE -p PORT` with its pins and control socket; metrics on an
    /// ephemeral loopback port, `RUST_LOG=info`.
    pub fn new(iface: &str, port: u16, pin_dir: &Path, control_socket: &Path) -> Self {
        Self {
            iface: iface.to_string(),
            port,
            pin_dir: pin_dir.to_path_buf(),
            control_socket: control_socket.to_path_buf(),
            audit_log: None,
            metrics_addr: "127.0.0.1:0".to_string(),
            config: None,
            cgroup: None,
            attach: None,
            sets: Vec::new(),
            extra: Vec::new(),
            log: LogFilter::default(),
            envs: Vec::new(),
        }
    }

    pub fn audit_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit_log = Some(path.into());
        self
    }

    pub fn metrics_addr(mut self, addr: impl ToString) -> Self {
        self.metrics_addr = addr.to_string();
        self
    }

    pub fn config(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = Some(path.into());
        self
    }

    pub fn cgroup(mut self, path: impl Into<PathBuf>) -> Self {
        self.cgroup = Some(path.into());
        self
    }

    pub fn attach(mut self, mode: &str) -> Self {
        self.attach = Some(mode.to_string());
        self
    }

    pub fn sets<S: AsRef<str>>(mut self, sets: impl IntoIterator<Item = S>) -> Self {
        self.sets
            .extend(sets.into_iter().map(|s| s.as_ref().to_string()));
        self
    }

    pub fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn log(mut self, log: LogFilter) -> Self {
        self.log = log;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// `run` and its options, as the guard binary takes them.
    pub fn argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = ["run", "-i", &self.iface, "-p", &self.port.to_string()]
            .into_iter()
            .map(Into::into)
            .collect();
        let mut opt = |name: &str, value: &std::ffi::OsStr| {
            argv.push(name.into());
            argv.push(value.into());
        };
        opt("--pin-dir", self.pin_dir.as_os_str());
        opt("--control-socket", self.control_socket.as_os_str());
        opt("--metrics-addr", self.metrics_addr.as_ref());
        if let Some(path) = &self.audit_log {
            opt("--audit-log", path.as_os_str());
        }
        if let Some(path) = &self.config {
            opt("--config", path.as_os_str());
        }
        if let Some(path) = &self.cgroup {
            opt("--cgroup", path.as_os_str());
        }
        if let Some(mode) = &self.attach {
            opt("--attach", mode.as_ref());
        }
        for set in &self.sets {
            opt("--set", set.as_ref());
        }
        argv.extend(self.extra.iter().cloned());
        argv
    }

    /// Appends the arguments to `cmd` (the guard binary, or a wrapper that execs it with
    /// the arguments that follow) and sets its environment.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.args(self.argv());
        // clap reads GUARD_* variables as defaults: none of the caller's may leak in.
        without_guard_env(cmd);
        // A NOTIFY_SOCKET of the developer's session (or of a unit running the tests) is not
        // the lab's to receive; a test that wants one passes it in `envs`.
        cmd.env_remove("NOTIFY_SOCKET");
        match &self.log {
            LogFilter::Filter(filter) => cmd.env("RUST_LOG", filter),
            LogFilter::Unset => cmd.env_remove("RUST_LOG"),
        };
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
    }

    /// Starts `cmd` with these arguments without waiting for it to serve.
    pub fn spawn(&self, label: &str, mut cmd: Command) -> Result<ChildGuard> {
        self.apply(&mut cmd);
        ChildGuard::spawn(label, &mut cmd)
    }

    /// Starts `cmd` with these arguments and waits until the agent logs [`READY_LINE`].
    pub fn start(&self, label: &str, cmd: Command, timeout: Duration) -> Result<ChildGuard> {
        let mut child = self.spawn(label, cmd)?;
        child.wait_for_stderr(READY_LINE, timeout)?;
        Ok(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(argv: &[OsString]) -> Vec<&str> {
        argv.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn argv_names_every_option_once() {
        let run = GuardRun::new("eth0", 8080, Path::new("/p"), Path::new("/s.sock"))
            .audit_log("/a.jsonl")
            .config("/g.toml")
            .cgroup("/cg")
            .attach("tc")
            .sets(["syn_rate=5", "dry_run=true"])
            .args(["--adaptive"]);
        assert_eq!(
            strings(&run.argv()),
            [
                "run",
                "-i",
                "eth0",
                "-p",
                "8080",
                "--pin-dir",
                "/p",
                "--control-socket",
                "/s.sock",
                "--metrics-addr",
                "127.0.0.1:0",
                "--audit-log",
                "/a.jsonl",
                "--config",
                "/g.toml",
                "--cgroup",
                "/cg",
                "--attach",
                "tc",
                "--set",
                "syn_rate=5",
                "--set",
                "dry_run=true",
                "--adaptive",
            ]
        );
    }

    #[test]
    fn environment_is_the_labs_own() {
        let run = GuardRun::new("eth0", 1, Path::new("/p"), Path::new("/s"))
            .log(LogFilter::Unset)
            .env("NOTIFY_SOCKET", "/n");
        let mut cmd = Command::new("guard");
        cmd.env("GUARD_SYN_RATE", "1").env("RUST_LOG", "trace");
        run.apply(&mut cmd);
        let envs: Vec<(String, Option<String>)> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert!(envs.contains(&("GUARD_SYN_RATE".into(), None)), "{envs:?}");
        assert!(envs.contains(&("RUST_LOG".into(), None)), "{envs:?}");
        assert!(
            envs.contains(&("NOTIFY_SOCKET".into(), Some("/n".into()))),
            "{envs:?}"
        );
    }
}
