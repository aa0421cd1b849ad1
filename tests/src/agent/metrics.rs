//! The agent's `/metrics` page: fetching it over HTTP/1.0 and parsing the text exposition.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

/// Splits an HTTP/1.x response into its status code and body, checking the body against
/// `Content-Length` when there is one.
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = std::str::from_utf8(raw).context("the response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                let want: usize = value.trim().parse().context("bad Content-Length")?;
                ensure!(
                    body.len() == want,
                    "body of {} bytes, Content-Length {want}",
                    body.len()
                );
            }
        }
    }
    Ok((status, body.to_string()))
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Sorted by label name.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` page: the families it declares (`# TYPE`) and its samples.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Family name → type.
    pub families: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format (what the prometheus crate writes: no timestamps, label values
    /// without embedded `}`), enough to compare counters.
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest
                    .split_once(' ')
                    .with_context(|| format!("bad TYPE line {line:?}"))?;
                out.families.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad sample line {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .with_context(|| format!("bad value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .with_context(|| format!("unclosed labels in {line:?}"))?;
                    (name.to_string(), parse_labels(body)?)
                }
            };
            out.samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Ok(out)
    }

    /// The sample `name{labels}` (labels in any order, all of them given).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like `value`, but a missing series is an error naming it.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.value(name, labels)
            .with_context(|| format!("no series {name}{labels:?} in the scrape"))
    }

    /// The `q` quantile of histogram `name`, interpolated within its bucket the way PromQL's
    /// `histogram_quantile` does. `None` without observations.
    pub fn histogram_quantile(&self, name: &str, q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.name == bucket)
            .filter_map(|s| {
                let le = s.labels.iter().find(|(k, _)| k == "le")?;
                let le = if le.1 == "+Inf" {
                    f64::INFINITY
                } else {
                    le.1.parse().ok()?
                };
                Some((le, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (le, count) in &buckets {
            if *count >= rank {
                if le.is_infinite() {
                    // Past the last finite bound: that bound is all that can be said.
                    return Some(lower);
                }
                let inside = count - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            lower = *le;
            below = *count;
        }
        None
    }
}

fn parse_labels(body: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .with_context(|| format!("bad labels {body:?}"))?;
        // The value ends at the first quote not escaped by a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.with_context(|| format!("unterminated label value in {body:?}"))?;
        out.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    out.sort();
    Ok(out)
}

/// `promtool check metrics` on `text` (stdin): the exposition must parse and pass its lint.
pub fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start promtool (install the prometheus package)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())
        .context("write to promtool")?;
    let out = child.wait_with_output().context("wait for promtool")?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_parsing() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n\
                    a_total{verdict=\"drop\",reason=\"blocked\"} 7\n\
                    a_total{reason=\"x\",verdict=\"pass\"} 1\n\
                    # TYPE h histogram\n\
                    h_bucket{le=\"0.001\"} 2\nh_bucket{le=\"0.01\"} 4\nh_bucket{le=\"+Inf\"} 4\n\
                    h_sum 0.01\nh_count 4\nplain 3.5\nesc{v=\"a\\\"b\"} 1\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.families["a_total"], "counter");
        assert_eq!(s.families["h"], "histogram");
        assert_eq!(
            s.value("a_total", &[("reason", "blocked"), ("verdict", "drop")]),
            Some(7.0)
        );
        assert_eq!(s.value("a_total", &[("verdict", "drop")]), None);
        assert_eq!(s.value("plain", &[]), Some(3.5));
        assert_eq!(s.value("esc", &[("v", "a\"b")]), Some(1.0));
        // Half the observations are in the first bucket: the median is its upper bound.
        assert!((s.histogram_quantile("h", 0.5).unwrap() - 0.001).abs() < 1e-12);
        // 3 of 4: halfway into the second bucket.
        let q75 = s.histogram_quantile("h", 0.75).unwrap();
        assert!((q75 - 0.0055).abs() < 1e-12, "{q75}");
        assert_eq!(s.histogram_quantile("nothing", 0.5), None);
        assert!(Scrape::parse("bad{x=\"1\" 2").is_err());
        assert!(Scrape::parse("novalue").is_err());
    }

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello";
        assert_eq!(parse_http_response(ok).unwrap(), (200, "hello".to_string()));
        let close_delimited = b"HTTP/1.0 404 Not Found\r\n\r\n";
        assert_eq!(
            parse_http_response(close_delimited).unwrap(),
            (404, String::new())
        );
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse_http_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_http_response(b"garbage\r\n\r\n").is_err());
    }
}
