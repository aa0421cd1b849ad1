//! Descriptors: the open-files limit, how many are open, and a reserve.

use std::fs::File;
use std::io;
use std::sync::OnceLock;

/// Raises the soft open-files limit to the hard one, once per process, and
/// says so in the log. Failures are logged, never fatal: the server works
/// within whatever limit it has, shedding earlier.
pub(crate) fn raise_nofile_limit() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| match getrlimit() {
        Ok((soft, hard)) if soft < hard => {
            let raised = libc::rlimit {
                rlim_cur: hard,
                rlim_max: hard,
            };
            // SAFETY: setrlimit reads one initialised rlimit struct.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                log::info!("raised the open-files soft limit from {soft} to its hard limit {hard}");
            } else {
                log::warn!(
                    "could not raise the open-files soft limit from {soft} to {hard}: {}; serving within {soft}",
                    io::Error::last_os_error()
                );
            }
        }
        Ok((soft, _)) => log::info!("open-files soft limit is {soft} (already the hard limit)"),
        Err(e) => log::warn!("cannot read the open-files limit: {e}"),
    });
}

fn getrlimit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The soft open-files limit now (`u64::MAX` if unreadable, so nothing is
/// shed on a guess).
pub(crate) fn soft_limit() -> u64 {
    getrlimit().map_or(u64::MAX, |(soft, _)| soft)
}

/// Descriptors open in this process, counted from `/proc/self/fd` (the
/// directory's own descriptor excluded). Linear in the count, so the
/// server calls it from its sweeper at most once a second and keeps a
/// counter of its own connections in between.
pub(crate) fn count_open() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((dir.count() as u64).saturating_sub(1))
}

/// One descriptor held back so that, when `accept` fails for lack of
/// descriptors, the loop can free it, take the pending connection, close it
/// and take the reserve back, instead of spinning or sleeping on a backlog
/// it cannot drain.
pub(crate) struct Reserve(Option<File>);

impl Reserve {
    pub fn new() -> Self {
        Self(File::open("/dev/null").ok())
    }

    /// Runs `f` with the reserve descriptor given back, then takes it again.
    pub fn spend<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.0 = None;
        let out = f();
        self.0 = File::open("/dev/null").ok();
        out
    }

    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_descriptors_are_counted() {
        let files: Vec<File> = (0..5).map(|_| File::open("/dev/null").unwrap()).collect();
        // Other tests open and close files meanwhile; ours are there at least.
        let during = count_open().unwrap();
        assert!(during >= 5, "{during}");
        drop(files);
        assert!(soft_limit() > 0);
    }

    #[test]
    fn the_reserve_is_taken_back_after_spending() {
        let mut reserve = Reserve::new();
        assert!(reserve.is_held());
        let held_inside = reserve.spend(|| 7);
        assert_eq!(held_inside, 7);
        assert!(reserve.is_held());
    }
}
