//! Ctrl-C for the lab: a SIGINT/SIGTERM handler that only sets a flag, and the bounded waits
//! (`pause`, `wait_until`) that check it, so an interrupted demo, bench or test unwinds through
//! its guards instead of sitting out its scenarios.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Set by the SIGINT/SIGTERM handler of the demo and the bench; every wait checks it, so an
/// interrupted run unwinds through the guards (floods stopped, guard unloaded, namespaces
/// deleted) instead of waiting for its scenarios to end.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Fails once Ctrl-C was pressed; called between steps.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`].
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Sleeps `d` in short slices; fails as soon as the run is interrupted.
pub fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Polls `check` every 100 ms until it returns true or `limit` passes; the bound keeps a
/// broken run from hanging, and the answer is a yes/no, never a time.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<bool> {
    let end = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(true);
        }
        if Instant::now() >= end {
            return Ok(false);
        }
        pause(Duration::from_millis(100))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_is_a_bounded_yes_or_no() {
        assert!(wait_until(Duration::from_secs(5), || Ok(true)).unwrap());
        let mut polls = 0;
        let seen = wait_until(Duration::from_millis(150), || {
            polls += 1;
            Ok(false)
        })
        .unwrap();
        assert!(!seen);
        assert!(polls >= 2, "{polls}");
        assert!(wait_until(Duration::from_secs(5), || bail!("broken")).is_err());
    }
}
