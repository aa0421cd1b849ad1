//! guard's own log: env_logger behind a lock, so the agent can swap in a new
//! filter when guard.toml's `log_level` changes on SIGHUP.
//!
//! `RUST_LOG`, when set, wins over `log_level` for the whole run: it is what
//! someone debugging asked for on purpose, and a reload must not undo it.

use std::sync::{OnceLock, RwLock};

use log::{LevelFilter, Log, Metadata, Record};

/// The filter when neither `RUST_LOG` nor `log_level` says otherwise.
pub const DEFAULT_FILTER: &str = "info";

/// A `log_level` that env_logger would not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log_level `{0}` is not a log filter (write e.g. \"info\", \"debug\" or \"info,guard_user::fleet=debug\")")]
pub struct BadFilter(pub String);

struct Swappable {
    inner: RwLock<env_logger::Logger>,
}

impl Log for Swappable {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.read().expect("logger lock").enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        self.inner.read().expect("logger lock").log(record)
    }

    fn flush(&self) {
        self.inner.read().expect("logger lock").flush()
    }
}

static LOGGER: OnceLock<Swappable> = OnceLock::new();

fn build(filter: &str) -> env_logger::Logger {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter)).build()
}

fn build_ignoring_env(filter: &str) -> env_logger::Logger {
    env_logger::Builder::new().parse_filters(filter).build()
}

/// Installs the logger with `RUST_LOG`, else [`DEFAULT_FILTER`]. A second
/// call does nothing.
pub fn init() {
    let logger = LOGGER.get_or_init(|| Swappable {
        inner: RwLock::new(build(DEFAULT_FILTER)),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.inner.read().expect("logger lock").filter());
    }
}

/// Checks a `log_level` the way env_logger reads it: comma-separated
/// directives, each a level or `module=level` (an optional `/regex` after
/// them is env_logger's message filter and is not checked).
pub fn check_filter(level: Option<&str>) -> Result<(), BadFilter> {
    let Some(text) = level else { return Ok(()) };
    let directives = text.split('/').next().unwrap_or_default();
    let is_level = |s: &str| s.trim().parse::<LevelFilter>().is_ok();
    let ok = !directives.trim().is_empty()
        && directives.split(',').all(|d| {
            let d = d.trim();
            match d.split_once('=') {
                Some((module, lvl)) => !module.trim().is_empty() && is_level(lvl),
                // A bare word is a level, or a module path shown at every level.
                None => {
                    !d.is_empty()
                        && d.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                }
            }
        });
    if ok {
        Ok(())
    } else {
        Err(BadFilter(text.to_string()))
    }
}

/// What [`apply_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The new filter is in force.
    Set,
    /// `RUST_LOG` is set and keeps precedence.
    EnvWins,
    /// No logger of ours is installed (e.g. a test harness owns it).
    NotInstalled,
}

/// Puts `level` (guard.toml's `log_level`; `None` is [`DEFAULT_FILTER`])
/// in force, unless `RUST_LOG` is set.
pub fn apply_level(level: Option<&str>) -> Result<Applied, BadFilter> {
    apply_with_env(std::env::var("RUST_LOG").ok().as_deref(), level)
}

fn apply_with_env(env: Option<&str>, level: Option<&str>) -> Result<Applied, BadFilter> {
    check_filter(level)?;
    if env.is_some_and(|e| !e.trim().is_empty()) {
        return Ok(Applied::EnvWins);
    }
    let Some(logger) = LOGGER.get() else {
        return Ok(Applied::NotInstalled);
    };
    let new = build_ignoring_env(level.unwrap_or(DEFAULT_FILTER));
    let max = new.filter();
    *logger.inner.write().expect("logger lock") = new;
    log::set_max_level(max);
    Ok(Applied::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked() {
        for good in [
            "info",
            "DEBUG",
            "warn,guard_user::fleet=debug",
            "guard_user",
            "info/flood",
        ] {
            assert_eq!(check_filter(Some(good)), Ok(()), "{good}");
        }
        assert_eq!(check_filter(None), Ok(()));
        // A bare word is a module path to env_logger, so only levels after
        // `=` and the characters of a path can be checked.
        for bad in ["", " ", "info,fleet=verbose", "=debug", "info;debug"] {
            assert!(check_filter(Some(bad)).is_err(), "{bad}");
        }
        let msg = check_filter(Some("info,x=verbose"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("x=verbose"), "{msg}");
    }

    #[test]
    fn a_new_level_takes_effect_live_unless_rust_log_is_set() {
        init();
        assert_eq!(
            apply_with_env(Some("trace"), Some("error")),
            Ok(Applied::EnvWins)
        );
        assert_eq!(apply_with_env(None, Some("warn")), Ok(Applied::Set));
        assert!(log::log_enabled!(log::Level::Warn));
        assert!(!log::log_enabled!(log::Level::Info));
        assert_eq!(apply_with_env(None, Some("debug")), Ok(Applied::Set));
        assert!(log::log_enabled!(log::Level::Debug));
        assert!(!log::log_enabled!(log::Level::Trace));
        // Per-module directives reach the swapped logger, not only the max.
        assert_eq!(
            apply_with_env(None, Some("error,guard_user::logging=trace")),
            Ok(Applied::Set)
        );
        assert!(log::log_enabled!(log::Level::Trace));
        assert!(!log::log_enabled!(target: "guard_user::agent", log::Level::Warn));
        assert_eq!(
            apply_with_env(None, Some("info,x=verbose")),
            Err(BadFilter("info,x=verbose".into()))
        );
        assert_eq!(apply_with_env(None, None), Ok(Applied::Set));
        assert!(log::log_enabled!(log::Level::Info));
        assert!(!log::log_enabled!(log::Level::Debug));
    }
}
