//! The audit trail: one JSON object per line for every block, unblock,
//! escalation, expiry and live change, with its origin. Reopened on SIGHUP
//! so logrotate can move the file away.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write as _},
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

/// Lines of the audit log at `path` and of the files logrotate made of it
/// (`audit.jsonl.1`, `audit.jsonl.2.gz`, or with `dateext`
/// `audit.jsonl-20261204-1796400000[.gz]`), at or after `since_unix`, about
/// `prefix` (overlapping) if given: the newest `limit`, oldest first.
pub fn read_history(
    path: &Path,
    since_unix: u64,
    prefix: Option<&Prefix>,
    limit: usize,
) -> std::io::Result<Vec<String>> {
    let mut out = std::collections::VecDeque::new();
    for (file, mtime) in rotated_files(path)? {
        // A file last written before `since` holds only older lines (the log
        // is appended in time order), so it need not be opened.
        if mtime < since_unix {
            continue;
        }
        let reader: Box<dyn BufRead> = match File::open(&file) {
            Ok(f) if file.extension().is_some_and(|e| e == "gz") => {
                Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(f)))
            }
            Ok(f) => Box::new(BufReader::new(f)),
            // Rotated away or compressed meanwhile: its lines are elsewhere.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file != path => continue,
            Err(e) => return Err(e),
        };
        for line in reader.lines() {
            let line = match line {
                Ok(l) => l,
                // A damaged or half-compressed rotated file: keep what the
                // others hold rather than answer nothing.
                Err(e) if file != path => {
                    log::warn!("audit history: stopped reading {}: {e}", file.display());
                    break;
                }
                Err(e) => return Err(e),
            };
            if let Some(line) = keep(line, since_unix, prefix) {
                out.push_back(line);
                if out.len() > limit {
                    out.pop_front();
                }
            }
        }
    }
    Ok(out.into())
}

fn keep(line: String, since_unix: u64, prefix: Option<&Prefix>) -> Option<String> {
    let v = serde_json::from_str::<serde_json::Value>(&line).ok()?;
    if v.get("ts_unix").and_then(|t| t.as_u64()).unwrap_or(0) < since_unix {
        return None;
    }
    if let Some(want) = prefix {
        let p = v
            .get("prefix")
            .and_then(|p| p.as_str())
            .and_then(|p| p.parse::<Prefix>().ok())?;
        if !(want.contains_prefix(&p) || p.contains_prefix(want)) {
            return None;
        }
    }
    Some(line)
}

/// The audit log's rotated siblings, oldest first, then the log itself,
/// each with its modification time (Unix seconds). Order is by that time;
/// on a tie a higher rotation number (`.2` before `.1`) is older, as
/// logrotate numbers them.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mtime = |p: &Path| -> Option<u64> {
        let m = std::fs::metadata(p).ok()?.modified().ok()?;
        Some(m.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    };
    let mut rotated = Vec::new();
    if let (Some(dir), Some(base)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => Some(e),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        for entry in entries.into_iter().flatten() {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(base) else {
                continue;
            };
            let rest = rest.strip_suffix(".gz").unwrap_or(rest);
            // `.N` (numbered) or `-DATE...` (dateext); nothing else is ours.
            let number = if let Some(n) = rest.strip_prefix('.') {
                match n.parse::<u64>() {
                    Ok(n) => n,
                    Err(_) => continue,
                }
            } else if rest.starts_with('-') && rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
                0
            } else {
                continue;
            };
            let p = entry.path();
            if let Some(t) = mtime(&p) {
                rotated.push((p, t, number));
            }
        }
    }
    rotated.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    let mut files: Vec<(PathBuf, u64)> = rotated.into_iter().map(|(p, t, _)| (p, t)).collect();
    match mtime(path) {
        Some(t) => files.push((path.to_path_buf(), t)),
        // No current file yet (just rotated, not reopened): the rotated
        // ones are all there is. Without any file at all, say so.
        None if files.is_empty() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", path.display()),
            ))
        }
        None => {}
    }
    Ok(files)
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
        assert_eq!(all.len(), 3, "the rotated file is read too");
        assert!(all[0].contains("198.18.0.3/32") && all[0].contains("\"event\":\"block\""));
        let only_a = log
            .history(0, Some(&"198.18.0.0/24".parse().unwrap()), 100)
            .unwrap();
        assert_eq!(only_a.len(), 2);
        assert!(only_a[1].contains("\"event\":\"unblock\""));
        assert!(log.history(u64::MAX, None, 100).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn line(ts: u64, prefix: &str) -> String {
        format!(
            "{{\"ts_unix\":{ts},\"event\":\"block\",\"prefix\":\"{prefix}\",\"origin\":\"t\"}}\n"
        )
    }

    fn write_at(path: &Path, text: &str, mtime: u64, gz: bool) {
        use std::io::Write as _;
        let f = File::create(path).unwrap();
        if gz {
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(text.as_bytes()).unwrap();
            enc.finish()
                .unwrap()
                .set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
                .unwrap();
        } else {
            let mut f = f;
            f.write_all(text.as_bytes()).unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
                .unwrap();
        }
    }

    #[test]
    fn history_reads_numbered_dated_and_compressed_rotations_in_time_order() {
        let dir = std::env::temp_dir().join(format!("guard-audit-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        // Oldest first: a dated, compressed one; .2.gz; .1 (delaycompress); the live file.
        write_at(
            &dir.join("audit.jsonl-20261201-1000.gz"),
            &line(1_000, "198.18.0.1/32"),
            1_000,
            true,
        );
        write_at(
            &dir.join("audit.jsonl.2.gz"),
            &(line(2_000, "198.18.0.2/32") + &line(2_001, "198.18.0.2/32")),
            2_001,
            true,
        );
        write_at(
            &dir.join("audit.jsonl.1"),
            &line(3_000, "198.18.0.3/32"),
            3_000,
            false,
        );
        write_at(&path, &line(4_000, "198.18.0.4/32"), 4_000, false);
        // Not ours: left alone.
        write_at(
            &dir.join("audit.jsonl.bak"),
            &line(5_000, "198.18.0.5/32"),
            5_000,
            false,
        );
        write_at(
            &dir.join("other.jsonl.1"),
            &line(5_000, "198.18.0.6/32"),
            5_000,
            false,
        );
        let ts = |lines: Vec<String>| -> Vec<u64> {
            lines
                .iter()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["ts_unix"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(
            ts(read_history(&path, 0, None, 100).unwrap()),
            [1_000, 2_000, 2_001, 3_000, 4_000]
        );
        assert_eq!(
            ts(read_history(&path, 2_001, None, 100).unwrap()),
            [2_001, 3_000, 4_000]
        );
        assert_eq!(
            ts(read_history(&path, 0, None, 2).unwrap()),
            [3_000, 4_000],
            "the newest"
        );
        let p: Prefix = "198.18.0.2/32".parse().unwrap();
        assert_eq!(
            ts(read_history(&path, 0, Some(&p), 100).unwrap()),
            [2_000, 2_001]
        );
        // Rotated, not reopened yet: the rotated files still answer.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(ts(read_history(&path, 3_000, None, 100).unwrap()), [3_000]);
        let _ = std::fs::remove_dir_all(dir);
        assert!(
            read_history(&path, 0, None, 100).is_err(),
            "no log at all is an error"
        );
    }
}
