//! The audit trail: one JSON object per line for every block, unblock,
//! escalation, expiry and live change, with its origin. Reopened on SIGHUP
//! so logrotate can move the file away.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use guard_common::addr::Prefix;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub ts: String,
    pub ts_unix: u64,
    pub event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    pub origin: &'a str,
    pub detected_at: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: &'a str,
}

/// RFC 3339 in UTC, without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

pub struct AuditLog {
    path: Option<PathBuf>,
    file: Mutex<Option<File>>,
}

impl AuditLog {
    /// No path: audit records go to the log only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(open_append(p)?),
            None => None,
        };
        Ok(Self {
            path: path.map(Path::to_path_buf),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// After logrotate moved the file: start a new one at the same path.
    pub fn reopen(&self) -> std::io::Result<()> {
        if let Some(p) = &self.path {
            let f = open_append(p)?;
            *self.file.lock().expect("audit lock") = Some(f);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        event: &str,
        prefix: Option<&Prefix>,
        ttl_secs: Option<u64>,
        reason: Option<&str>,
        origin: &str,
        detected_at: Option<SystemTime>,
        detail: &str,
    ) {
        let now = SystemTime::now();
        let rec = AuditRecord {
            ts: rfc3339(now),
            ts_unix: now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
            event,
            prefix: prefix.map(ToString::to_string),
            ttl_secs,
            reason,
            origin,
            detected_at: detected_at.map(rfc3339),
            detail,
        };
        let Ok(line) = serde_json::to_string(&rec) else {
            return;
        };
        log::info!(target: "guard::audit", "{line}");
        let mut guard = self.file.lock().expect("audit lock");
        if let Some(f) = guard.as_mut() {
            if let Err(e) = writeln!(f, "{line}") {
                log::error!("audit log write failed: {e}");
            }
        }
    }

    /// Lines at or after `since_unix`, about `prefix` (overlapping) if
    /// given, newest last, at most `limit`.
    pub fn history(
        &self,
        since_unix: u64,
        prefix: Option<&Prefix>,
        limit: usize,
    ) -> std::io::Result<Vec<String>> {
        let Some(path) = &self.path else {
            return Ok(Vec::new());
        };
        read_history(path, since_unix, prefix, limit)
    }
}

pub fn read_history(
    path: &Path,
    since_unix: u64,
    prefix: Option<&Prefix>,
    limit: usize,
) -> std::io::Result<Vec<String>> {
    let file = File::open(path)?;
    let mut out = std::collections::VecDeque::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v.get("ts_unix").and_then(|t| t.as_u64()).unwrap_or(0) < since_unix {
            continue;
        }
        if let Some(want) = prefix {
            let Some(p) = v
                .get("prefix")
                .and_then(|p| p.as_str())
                .and_then(|p| p.parse::<Prefix>().ok())
            else {
                continue;
            };
            if !(want.contains_prefix(&p) || p.contains_prefix(want)) {
                continue;
            }
        }
        out.push_back(line);
        if out.len() > limit {
            out.pop_front();
        }
    }
    Ok(out.into())
}

fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_862_400_123)),
            "2026-11-28T10:40:00.123Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn records_survive_rotation_and_history_filters() {
        let dir = std::env::temp_dir().join(format!("guard-audit-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(Some(&path)).unwrap();
        let a: Prefix = "198.18.0.3/32".parse().unwrap();
        let b: Prefix = "2001:2::/48".parse().unwrap();
        log.record(
            "block",
            Some(&a),
            Some(60),
            Some("message_flood"),
            "app:uid=0",
            None,
            "",
        );
        std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
        log.reopen().unwrap();
        log.record(
            "block",
            Some(&b),
            Some(60),
            Some("operator"),
            "operator:uid=0",
            None,
            "x",
        );
        log.record("unblock", Some(&a), None, None, "operator:uid=0", None, "");
        let all = log.history(0, None, 100).unwrap();
        assert_eq!(all.len(), 2, "the new file holds what came after rotation");
        let only_a = log
            .history(0, Some(&"198.18.0.0/24".parse().unwrap()), 100)
            .unwrap();
        assert_eq!(only_a.len(), 1);
        assert!(only_a[0].contains("\"event\":\"unblock\""));
        assert!(log.history(u64::MAX, None, 100).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
