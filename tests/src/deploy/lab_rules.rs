//! The lab's variant of the shipped alert rules (`guard-user/deploy/alerts.yml`): the same
//! rules with the same expressions and thresholds, but every `for:` and every time span in an
//! expression (range selectors `[5m]`, `offset 1h`) divided by [`LAB_SPEEDUP`], so an attack
//! of seconds takes a rule through pending to firing, and one scenario's samples leave the
//! windows seconds later instead of minutes.
//!
//! Thresholds stay as shipped. Those on per-second rates (`rate(...) > 50`) mean the same in
//! the lab; those on counts over a window (`increase(...[10m]) > 5`) become 60 times stricter
//! per unit of time: "more than 5 floods in 10 s" instead of "in 10 min".
//!
//! The variant is derived here, in code, and written to the lab's temporary folder; the
//! shipped file is never edited. It works on the YAML's lines (the rules file's layout is
//! the one `promtool check rules` accepts and check.sh keeps): `for:` values, and the lines of
//! each `expr:` value. Annotations and labels are left alone even if they contain brackets.

use anyhow::{bail, ensure, Context as _, Result};

/// How many times faster the lab's rules run than the shipped ones: minutes become seconds.
pub const LAB_SPEEDUP: u64 = 60;

/// The shortest range selector the variant writes: `rate()` needs two samples in its window,
/// and the lab's Prometheus scrapes every second (see `prom::INTERVAL_SECS`).
pub const MIN_RANGE_SECS: u64 = 3;

/// The shortest `for:` the variant writes: one evaluation with the condition true is not
/// enough to fire, as with every shipped rule.
pub const MIN_FOR_SECS: u64 = 1;

/// The lab's variant of `shipped` (the text of a Prometheus rules file).
pub fn lab_variant(shipped: &str, speedup: u64) -> Result<String> {
    ensure!(speedup > 0, "a speed-up of 0 would stop time");
    let mut out = format!(
        "# Derived by guard-tests from guard-user/deploy/alerts.yml for the lab: `for:` and the\n\
         # time spans in expressions are {speedup} times shorter. Not for production.\n"
    );
    // The indentation of the `expr:` key whose value the current line may continue.
    let mut expr_indent: Option<usize> = None;
    for (n, line) in shipped.lines().enumerate() {
        let at = || format!("alerts.yml line {}", n + 1);
        // A key may open a list item (`- expr: ...`); its value's lines are indented past
        // the key, not the dash.
        let mut indent = line.len() - line.trim_start().len();
        let mut body = line.trim_start();
        if let Some(item) = body.strip_prefix("- ") {
            indent += 2;
            body = item;
        }
        if let Some(i) = expr_indent {
            if body.is_empty() || indent > i {
                out.push_str(&scale_expr(line, speedup).with_context(at)?);
                out.push('\n');
                continue;
            }
            expr_indent = None;
        }
        if let Some(value) = body.strip_prefix("for:") {
            let secs = scale_secs(parse_duration(value.trim()).with_context(at)?, speedup)
                .max(MIN_FOR_SECS);
            out.push_str(&format!("{}for: {secs}s\n", &line[..indent]));
        } else if let Some(value) = body.strip_prefix("expr:") {
            expr_indent = Some(indent);
            out.push_str(&line[..indent]);
            out.push_str("expr:");
            out.push_str(&scale_expr(value, speedup).with_context(at)?);
            out.push('\n');
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// A Prometheus duration (`5m`, `1h30m`, `500ms`) in milliseconds.
pub fn parse_duration(text: &str) -> Result<u64> {
    ensure!(!text.is_empty(), "an empty duration");
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        ensure!(digits > 0, "{text:?} is not a duration (like 5m or 1h30m)");
        let number: u64 = rest[..digits]
            .parse()
            .with_context(|| format!("{text:?}: number out of range"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "y" => 365 * 86_400_000,
            other => bail!("{text:?}: unknown duration unit {other:?}"),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(unit_ms)
            .and_then(|ms| total.checked_add(ms))
            .with_context(|| format!("{text:?}: duration out of range"))?;
    }
    Ok(total)
}

/// `ms` sped up, in whole seconds (rounded to the nearest, so 90 s / 60 is 2 s).
fn scale_secs(ms: u64, speedup: u64) -> u64 {
    let scaled_ms = ms / speedup;
    (scaled_ms + 500) / 1000
}

/// `expr` with every range selector and `offset` sped up. Quoted strings (label values,
/// regexes) are copied as they are: a `[5m]` inside one is text, not a range.
fn scale_expr(expr: &str, speedup: u64) -> Result<String> {
    let mut out = String::with_capacity(expr.len());
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                out.push(c);
                let mut escaped = false;
                for (_, q) in chars.by_ref() {
                    out.push(q);
                    if escaped {
                        escaped = false;
                    } else if q == '\\' && c != '`' {
                        escaped = true;
                    } else if q == c {
                        break;
                    }
                }
            }
            '[' => {
                let close = expr[i..]
                    .find(']')
                    .with_context(|| format!("an unclosed [ in {expr:?}"))?;
                let inside = &expr[i + 1..i + close];
                // `[5m]` is a range, `[5m:30s]` a subquery's range and step.
                let scaled: Vec<String> = inside
                    .split(':')
                    .map(|part| {
                        let ms = parse_duration(part.trim())?;
                        Ok(format!("{}s", scale_secs(ms, speedup).max(MIN_RANGE_SECS)))
                    })
                    .collect::<Result<_>>()
                    .with_context(|| format!("the range [{inside}] in {expr:?}"))?;
                out.push('[');
                out.push_str(&scaled.join(":"));
                out.push(']');
                // Skip what was copied, up to and including the `]`.
                while chars.next_if(|&(j, _)| j <= i + close).is_some() {}
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some((_, w)) =
                    chars.next_if(|&(_, w)| w.is_ascii_alphanumeric() || w == '_')
                {
                    word.push(w);
                }
                out.push_str(&word);
                if word == "offset" {
                    while let Some((_, s)) = chars.next_if(|&(_, s)| s.is_whitespace()) {
                        out.push(s);
                    }
                    let mut span = String::new();
                    while let Some((_, d)) = chars.next_if(|&(_, d)| d.is_ascii_alphanumeric()) {
                        span.push(d);
                    }
                    let ms =
                        parse_duration(&span).with_context(|| format!("the offset in {expr:?}"))?;
                    out.push_str(&format!("{}s", scale_secs(ms, speedup)));
                }
            }
            _ => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = "groups:
  - name: g
    rules:
      - alert: Surge
        # Rate over [5m] (a comment, left alone).
        expr: |
          sum(rate(x_total{job=\"guard\", reason=~\"a[5m]\"}[5m])) > 50
          unless sum(rate(x_total[1d] offset 1h)) > 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: 'dropping {{ printf \"%.1f\" $value }} [5m]'
      - alert: Flood
        expr: sum by (instance) (increase(y_total{job=\"app\"}[10m])) > 5
        for: 90s
";

    #[test]
    fn for_and_time_spans_are_sped_up_and_nothing_else() {
        let lab = lab_variant(RULES, 60).unwrap();
        let body: Vec<&str> = lab.lines().skip_while(|l| l.starts_with('#')).collect();
        let expected = RULES
            .replace("reason=~\"a[5m]\"}[5m]", "reason=~\"a[5m]\"}[5s]")
            .replace("x_total[1d] offset 1h", "x_total[1440s] offset 60s")
            .replace("for: 5m", "for: 5s")
            .replace("[10m]", "[10s]")
            .replace("for: 90s", "for: 2s");
        assert_eq!(body, expected.lines().collect::<Vec<_>>());
        assert!(lab.starts_with("# Derived by guard-tests"), "{lab}");
    }

    #[test]
    fn short_spans_have_a_floor() {
        let lab = lab_variant("  - expr: rate(x[1m]) > 0\n    for: 10s\n", 60).unwrap();
        assert!(lab.contains("rate(x[3s]) > 0"), "{lab}");
        assert!(lab.contains("for: 1s"), "{lab}");
    }

    #[test]
    fn the_shipped_rules_keep_every_rule_and_expression() {
        let shipped = std::fs::read_to_string(
            crate::binaries::workspace_root().join("guard-user/deploy/alerts.yml"),
        )
        .unwrap();
        let lab = lab_variant(&shipped, LAB_SPEEDUP).unwrap();
        let count = |t: &str, what: &str| t.lines().filter(|l| l.contains(what)).count();
        assert_eq!(count(&lab, "- alert: "), count(&shipped, "- alert: "));
        assert_eq!(count(&lab, "for: "), count(&shipped, "for: "));
        // No range of minutes or more is left in an expression, and every `for:` is seconds.
        for line in lab.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for unit in ["m]", "h]", "d]"] {
                assert!(!line.contains(unit), "{line}");
            }
            if let Some(v) = line.trim_start().strip_prefix("for: ") {
                assert!(parse_duration(v).unwrap() <= 1_440_000, "{line}");
            }
        }
        assert!(lab.contains("guard_packets_total{job=\"guard\", verdict=\"drop\"}[5s]"));
    }

    #[test]
    fn bad_durations_are_errors_naming_the_line() {
        let e = lab_variant("groups:\n  - for: soon\n", 60).unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        let e = lab_variant("  - expr: rate(x[5q])\n", 60).unwrap_err();
        assert!(format!("{e:#}").contains("unknown duration unit"), "{e:#}");
        assert!(lab_variant("x", 0).is_err());
        assert_eq!(parse_duration("1h30m").unwrap(), 5_400_000);
        assert_eq!(parse_duration("250ms").unwrap(), 250);
        assert!(parse_duration("").is_err());
    }
}
