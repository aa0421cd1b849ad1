//! Durations as operators write them: `90s`, `10m`, `1h30m`, `1h 30m`,
//! `2d`, or a bare number of seconds. One parser for every flag and every
//! `*_secs` key of guard.toml, so what works in one place works in all.
//!
//! Not `humantime`: it takes units in any order or twice (`30m1h`, `1h1h`, refused here as
//! likely typos), sub-second and month units, and writes `1h 30m`; configs must read the same.

use std::time::Duration;

/// Why a duration could not be read. Each message names the text and says
/// what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("the duration is empty (write e.g. 90s, 10m, 1h30m or 2d)")]
    Empty,
    #[error("`{0}` is not a duration (write e.g. 90s, 10m, 1h30m or 2d)")]
    NotANumber(String),
    #[error("`{text}` has the unknown unit `{unit}` (use s, m, h or d)")]
    UnknownUnit { text: String, unit: String },
    #[error("`{0}` needs a unit after each number but the last (e.g. 1h30m, not 1 30m)")]
    MissingUnit(String),
    #[error("`{0}` repeats a unit or puts a larger one after a smaller (write e.g. 1h30m)")]
    UnitOrder(String),
    #[error("`{0}` is longer than guard can represent")]
    Overflow(String),
}

/// Seconds per unit, largest first (the order units must appear in).
const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];

/// Parses `text` into whole seconds. Parts are a number and a unit (`s`,
/// `m`, `h`, `d`), largest unit first, each unit at most once, optionally
/// separated by spaces; a lone number without a unit is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| DurationError::Overflow(text.to_string()));
    }
    let mut total: u64 = 0;
    // Index into UNITS of the last unit used: later parts must be smaller,
    // which refuses both `30m1h` (likely a typo) and `1h1h`.
    let mut last_unit: Option<usize> = None;
    let mut rest = t;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::NotANumber(text.to_string()));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow(text.to_string()))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit(text.to_string()));
        }
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let Some(idx) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        };
        if last_unit.is_some_and(|l| idx <= l) {
            return Err(DurationError::UnitOrder(text.to_string()));
        }
        last_unit = Some(idx);
        total = n
            .checked_mul(UNITS[idx].1)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| DurationError::Overflow(text.to_string()))?;
    }
    Ok(Duration::from_secs(total))
}

/// The shortest compound form of `d` (whole seconds), e.g. `1h30m`; `0s`
/// for zero. `parse_duration(&format_duration(d))` gives `d` back.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in UNITS {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// For clap's `value_parser`: the flag's error then reads like the parser's.
pub fn clap_duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

/// Serde helper for the `*_secs` keys of guard.toml: an integer (seconds,
/// as the keys always took) or a string in any form [`parse_duration`]
/// reads, e.g. `ttl_secs = "1h30m"`.
pub fn de_opt_secs<'de, D>(de: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Secs {
        Int(u64),
        Text(String),
    }
    match <Option<Secs> as serde::Deserialize>::deserialize(de)? {
        None => Ok(None),
        Some(Secs::Int(n)) => Ok(Some(n)),
        Some(Secs::Text(t)) => parse_duration(&t)
            .map(|d| Some(d.as_secs()))
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(t: &str) -> u64 {
        parse_duration(t)
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .as_secs()
    }

    #[test]
    fn single_and_compound_units() {
        assert_eq!(secs("90s"), 90);
        assert_eq!(secs("90"), 90);
        assert_eq!(secs("10m"), 600);
        assert_eq!(secs("2d"), 172_800);
        assert_eq!(secs("1h30m"), 5_400);
        assert_eq!(secs("1h 30m"), 5_400);
        assert_eq!(secs(" 1d2h3m4s "), 86_400 + 7_200 + 180 + 4);
        assert_eq!(secs("0s"), 0);
        assert_eq!(secs("0"), 0);
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_duration("  "), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("h"),
            Err(DurationError::NotANumber(_))
        ));
        assert!(matches!(
            parse_duration("-5s"),
            Err(DurationError::NotANumber(_))
        ));
        assert!(matches!(
            parse_duration("1.5h"),
            Err(DurationError::MissingUnit(_))
        ));
        assert!(matches!(
            parse_duration("1 30m"),
            Err(DurationError::MissingUnit(_))
        ));
        assert!(matches!(
            parse_duration("5w"),
            Err(DurationError::UnknownUnit { unit, .. }) if unit == "w"
        ));
        assert!(matches!(
            parse_duration("5min"),
            Err(DurationError::UnknownUnit { unit, .. }) if unit == "min"
        ));
        assert!(matches!(
            parse_duration("30m1h"),
            Err(DurationError::UnitOrder(_))
        ));
        assert!(matches!(
            parse_duration("1h1h"),
            Err(DurationError::UnitOrder(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("300000000000000000d"),
            Err(DurationError::Overflow(_))
        ));
        let msg = parse_duration("5w").unwrap_err().to_string();
        assert!(
            msg.contains("`5w`") && msg.contains("s, m, h or d"),
            "{msg}"
        );
    }

    #[test]
    fn format_round_trips() {
        for s in [0, 1, 59, 60, 61, 3_600, 5_400, 86_399, 86_400, 90_061] {
            let d = Duration::from_secs(s);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{s}");
        }
        assert_eq!(format_duration(Duration::from_secs(5_400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90_061)), "1d1h1m1s");
    }

    #[test]
    fn toml_keys_take_numbers_or_text() {
        #[derive(Debug, serde::Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "de_opt_secs")]
            ttl_secs: Option<u64>,
        }
        let t: T = toml::from_str("ttl_secs = 90").unwrap();
        assert_eq!(t.ttl_secs, Some(90));
        let t: T = toml::from_str("ttl_secs = \"1h30m\"").unwrap();
        assert_eq!(t.ttl_secs, Some(5_400));
        let t: T = toml::from_str("").unwrap();
        assert_eq!(t.ttl_secs, None);
        let e = toml::from_str::<T>("ttl_secs = \"5w\"")
            .expect_err("an unknown unit is refused")
            .to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }
}
