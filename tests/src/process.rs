//! Running commands: checked one-shot runs, and `ChildGuard` for background processes.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How a command line reads in error messages.
pub fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` to completion; a non-zero exit becomes an error carrying the command and its
/// stderr, so a failed `ip` call says what it was asked and why it refused. Returns stdout.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}` (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// Removes every `GUARD_*` variable of the caller's environment from `cmd`: clap reads them as
/// defaults of `guard run`, and a developer's settings must not leak into a lab's agent.
pub fn without_guard_env(cmd: &mut Command) -> &mut Command {
    // Inherited ones, and any set on the command before (a wrapper's own environment).
    let keys: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(key, _)| key)
        .chain(cmd.get_envs().map(|(key, _)| key.to_os_string()))
        .filter(|key| key.to_string_lossy().starts_with("GUARD_"))
        .collect();
    for key in keys {
        cmd.env_remove(key);
    }
    cmd
}

/// Whether this process runs as root (the lab needs CAP_NET_ADMIN and CAP_SYS_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For privileged tests: returns false after saying why when not root, so the test can return
/// early instead of failing on a developer's unprivileged `cargo test`.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root (run it through `cargo xtask test` or as root)");
    false
}

/// Pins a thread or process (by its PID/TID) to one CPU: benches put the server, its NAPI
/// thread and the probe on one core and the attacker on the other, so the flood tool is not
/// the bottleneck.
pub fn pin_to_cpu(pid: u32, cpu: usize) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    anyhow::ensure!(
        cpu < libc::CPU_SETSIZE as usize,
        "cpu {cpu} is beyond CPU_SETSIZE"
    );
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set, and CPU_SET stays in
    // bounds because cpu < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from a valid local set.
    let rc = unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot pin pid {pid} to cpu {cpu}"));
    }
    Ok(())
}

/// What a finished child left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// True when we had to stop it (SIGINT/SIGKILL) rather than it exiting by itself.
    pub stopped: bool,
}

impl Finished {
    /// Errors unless the process exited with status 0.
    pub fn ensure_success(&self, what: &str) -> Result<()> {
        if !self.status.success() {
            bail!("{what} exited with {}: {}", self.status, self.stderr.trim());
        }
        Ok(())
    }
}

/// A spawned process that is stopped and reaped when dropped, so a failing test leaves no
/// flood or server behind. Only the process's own PID is ever signalled.
///
/// Stopping sends SIGINT first (the tools print their statistics and `timeout` forwards it to
/// the tool it runs), then SIGKILL to the child's own process group after a grace period. Stdout and stderr are drained by
/// threads while it runs, so a chatty tool cannot block on a full pipe.
pub struct ChildGuard {
    label: String,
    child: Option<Child>,
    grace: Duration,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    drains: Vec<JoinHandle<()>>,
}

impl ChildGuard {
    /// Spawns `cmd` with piped stdout/stderr and null stdin; `label` names it in errors.
    pub fn spawn(label: &str, cmd: &mut Command) -> Result<Self> {
        let line = describe(cmd);
        // Its own process group: a tool under `timeout` forks, and if it ever has to be
        // SIGKILLed, killing the group takes the forked tool along instead of orphaning an
        // unbounded `hping3 --flood`. The group's ID is the child's PID, so it holds only what
        // we started.
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {label}: `{line}` (is it installed?)"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut drains = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            drains.push(drain(pipe, Arc::clone(&stdout)));
        }
        if let Some(pipe) = child.stderr.take() {
            drains.push(drain(pipe, Arc::clone(&stderr)));
        }
        Ok(Self {
            label: label.to_string(),
            child: Some(child),
            grace: Duration::from_secs(3),
            stdout,
            stderr,
            drains,
        })
    }

    /// Sets how long to wait after SIGINT before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            Some(child) => Ok(child
                .try_wait()
                .with_context(|| format!("cannot poll {}", self.label))?
                .is_none()),
            None => Ok(false),
        }
    }

    /// Stderr printed so far (lossy UTF-8).
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    /// Waits until stderr contains `needle` (a readiness line), failing if the process exits
    /// first or `timeout` passes.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr_so_far().contains(needle) {
                return Ok(());
            }
            if !self.is_running()? {
                bail!(
                    "{} exited before printing {needle:?}: {}",
                    self.label,
                    self.stderr_so_far().trim()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}: {}",
                    self.label,
                    self.stderr_so_far().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself, then stops it; returns what it
    /// printed either way.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        while self.is_running()? {
            if Instant::now() >= deadline {
                return self.stop();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.finish(false)
    }

    /// Stops it now (SIGINT, then SIGKILL after the grace period) and returns its output.
    pub fn stop(mut self) -> Result<Finished> {
        let stopped = self.is_running()?;
        if stopped {
            self.terminate()?;
        }
        self.finish(stopped)
    }

    fn finish(&mut self, stopped: bool) -> Result<Finished> {
        let mut child = self.child.take().context("child already reaped")?;
        let status = child
            .wait()
            .with_context(|| format!("cannot reap {}", self.label))?;
        // The pipes close when the process and anything it forked that kept them are gone.
        // A forked straggler holding them must not hang us: wait a little, then leave the
        // drain threads behind with what they collected so far.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.drains.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in self.drains.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                eprintln!(
                    "warning: {}: something it forked still holds its output pipes",
                    self.label
                );
            }
        }
        Ok(Finished {
            status,
            stdout: String::from_utf8_lossy(&lock(&self.stdout)).into_owned(),
            stderr: String::from_utf8_lossy(&lock(&self.stderr)).into_owned(),
            stopped,
        })
    }

    /// SIGINT, wait up to the grace period, then SIGKILL; leaves the child reaped-ready.
    fn terminate(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill() on the PID of a child we have not reaped yet: it cannot have been
        // recycled for another process, so only our own child is signalled.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; the group was created for this child at spawn (`process_group(0)`),
        // so it contains only the child and what it forked.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        // The group kill covers the child; this reports if even that failed.
        match child.kill() {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot SIGKILL {} (pid {pid})", self.label)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Err(e) = self.terminate() {
            eprintln!("warning: stopping {}: {e:#}", self.label);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

fn lock(buf: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    // A drain thread cannot panic while holding the lock in a way that corrupts a Vec<u8>.
    buf.lock().unwrap_or_else(|p| p.into_inner())
}

fn drain(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            lock(&into).extend_from_slice(&buf[..n]);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_a_child() {
        let child = ChildGuard::spawn("sleeper", Command::new("sleep").arg("30")).unwrap();
        pin_to_cpu(child.pid(), 0).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid())).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Cpus_allowed_list:", "0"]),
            "{status}"
        );
        assert!(pin_to_cpu(child.pid(), 100_000).is_err());
    }

    #[test]
    fn run_checked_reports_failures_with_stderr() {
        assert_eq!(
            run_checked(Command::new("sh").args(["-c", "echo hi"])).unwrap(),
            "hi\n"
        );
        let err = run_checked(Command::new("sh").args(["-c", "echo nope >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope") && err.contains("sh -c"), "{err}");
        assert!(run_checked(&mut Command::new("/nonexistent/tool")).is_err());
    }

    #[test]
    fn child_guard_stops_with_sigint_and_keeps_output() {
        // The shell traps SIGINT, prints, and exits 7: proves SIGINT (not SIGKILL) came first.
        let mut child = ChildGuard::spawn(
            "trap test",
            Command::new("sh").args([
                "-c",
                "trap 'echo got-int; exit 7' INT; echo ready >&2; while :; do sleep 0.05; done",
            ]),
        )
        .unwrap();
        child
            .wait_for_stderr("ready", Duration::from_secs(5))
            .unwrap();
        let done = child.stop().unwrap();
        assert!(done.stopped);
        assert_eq!(done.status.code(), Some(7));
        assert_eq!(done.stdout, "got-int\n");
    }

    #[test]
    fn child_guard_escalates_to_sigkill() {
        let mut child = ChildGuard::spawn(
            "stubborn",
            Command::new("sh").args([
                "-c",
                "trap '' INT; echo ready >&2; while :; do sleep 0.05; done",
            ]),
        )
        .unwrap()
        .with_grace(Duration::from_millis(200));
        child
            .wait_for_stderr("ready", Duration::from_secs(5))
            .unwrap();
        let pid = child.pid();
        let done = child.stop().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(done.status.signal(), Some(libc::SIGKILL));
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn sigkill_takes_forked_tools_along() {
        // Like `timeout` running a tool: the shell forks a worker that ignores SIGINT too.
        let mut child = ChildGuard::spawn(
            "forker",
            Command::new("sh").args([
                "-c",
                "trap '' INT; sh -c 'trap \"\" INT; exec sleep 300' & echo \"worker $!\" >&2; wait",
            ]),
        )
        .unwrap()
        .with_grace(Duration::from_millis(200));
        child
            .wait_for_stderr("worker ", Duration::from_secs(5))
            .unwrap();
        let worker: u32 = child
            .stderr_so_far()
            .trim()
            .strip_prefix("worker ")
            .unwrap()
            .parse()
            .unwrap();
        child.stop().unwrap();
        // The orphaned worker is reaped by init shortly after it dies; wait for that, bounded.
        let gone = (0..250).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_to_string(format!("/proc/{worker}/stat"))
                .map_or(true, |s| s.contains(") Z "))
        });
        assert!(gone, "forked worker {worker} survived");
    }

    #[test]
    fn child_guard_drop_reaps_and_wait_for_stderr_sees_early_exit() {
        let child = ChildGuard::spawn("sleeper", Command::new("sleep").arg("30")).unwrap();
        let pid = child.pid();
        drop(child);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

        let mut quitter =
            ChildGuard::spawn("quitter", Command::new("sh").args(["-c", "echo bye >&2"])).unwrap();
        let err = quitter
            .wait_for_stderr("never", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited before"), "{err}");
        let done = quitter.wait_timeout(Duration::from_secs(5)).unwrap();
        assert!(!done.stopped);
        done.ensure_success("quitter").unwrap();
    }
}
