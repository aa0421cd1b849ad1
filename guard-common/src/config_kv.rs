//! The text form of [`LiveConfig`]: `key = value` pairs shared by the
//! control protocol (`GetConfig`/`SetConfig`), the agent's TOML file and
//! `cargo xtask tune --set`, so every place accepts the same keys and says
//! the same thing about a bad value.

use core::fmt;

use crate::config::{ConfigError, LiveConfig, FLAG_BLOCK_ALL_TRAFFIC, FLAG_DRY_RUN};

/// How a key maps onto [`LiveConfig`].
enum Field {
    Flag(u32),
    U8 {
        get: fn(&LiveConfig) -> u8,
        set: fn(&mut LiveConfig, u8),
        min: u8,
        max: u8,
        expected: &'static str,
    },
    U32 {
        get: fn(&LiveConfig) -> u32,
        set: fn(&mut LiveConfig, u32),
        min: u32,
        expected: &'static str,
    },
    /// One of `names`, stored as its index.
    Choice {
        get: fn(&LiveConfig) -> u8,
        set: fn(&mut LiveConfig, u8),
        names: &'static [&'static str],
        expected: &'static str,
    },
}

const ANY_U32: &str = "an integer 0..=4294967295";

/// Every key, in the order [`config_entries`] lists them.
static FIELDS: [(&str, Field); 23] = [
    ("dry_run", Field::Flag(FLAG_DRY_RUN)),
    ("block_all_traffic", Field::Flag(FLAG_BLOCK_ALL_TRAFFIC)),
    (
        "source_prefix_v4",
        Field::U8 {
            get: |c| c.source_prefix_v4,
            set: |c, v| c.source_prefix_v4 = v,
            min: 1,
            max: 32,
            expected: "an IPv4 prefix length 1..=32",
        },
    ),
    (
        "source_prefix_v6",
        Field::U8 {
            get: |c| c.source_prefix_v6,
            set: |c, v| c.source_prefix_v6 = v,
            min: 1,
            max: 128,
            expected: "an IPv6 prefix length 1..=128",
        },
    ),
    (
        "aggregate_prefix_v4",
        Field::U8 {
            get: |c| c.aggregate_prefix_v4,
            set: |c, v| c.aggregate_prefix_v4 = v,
            min: 1,
            max: 32,
            expected: "an IPv4 prefix length 1..=32",
        },
    ),
    (
        "aggregate_prefix_v6",
        Field::U8 {
            get: |c| c.aggregate_prefix_v6,
            set: |c, v| c.aggregate_prefix_v6 = v,
            min: 1,
            max: 128,
            expected: "an IPv6 prefix length 1..=128",
        },
    ),
    (
        "syn_rate",
        Field::U32 {
            get: |c| c.syn_rate,
            set: |c, v| c.syn_rate = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "syn_burst",
        Field::U32 {
            get: |c| c.syn_burst,
            set: |c, v| c.syn_burst = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "aggregate_rate",
        Field::U32 {
            get: |c| c.aggregate_rate,
            set: |c, v| c.aggregate_rate = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "aggregate_burst",
        Field::U32 {
            get: |c| c.aggregate_burst,
            set: |c, v| c.aggregate_burst = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "event_interval_ms",
        Field::U32 {
            get: |c| c.event_interval_ms,
            set: |c, v| c.event_interval_ms = v,
            min: 1,
            expected: "milliseconds 1..=4294967295",
        },
    ),
    (
        "conn_limit",
        Field::U32 {
            get: |c| c.conn_limit,
            set: |c, v| c.conn_limit = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "handshake_timeout_s",
        Field::U32 {
            get: |c| c.handshake_timeout_s,
            set: |c, v| c.handshake_timeout_s = v,
            min: 1,
            expected: "seconds 1..=4294967295",
        },
    ),
    (
        "invalid_ack_rate",
        Field::U32 {
            get: |c| c.invalid_ack_rate,
            set: |c, v| c.invalid_ack_rate = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "invalid_ack_burst",
        Field::U32 {
            get: |c| c.invalid_ack_burst,
            set: |c, v| c.invalid_ack_burst = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "invalid_ack_aggregate_rate",
        Field::U32 {
            get: |c| c.invalid_ack_aggregate_rate,
            set: |c, v| c.invalid_ack_aggregate_rate = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "invalid_ack_aggregate_burst",
        Field::U32 {
            get: |c| c.invalid_ack_aggregate_burst,
            set: |c, v| c.invalid_ack_aggregate_burst = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "invalid_ack_global_rate",
        Field::U32 {
            get: |c| c.invalid_ack_global_rate,
            set: |c, v| c.invalid_ack_global_rate = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "invalid_ack_global_burst",
        Field::U32 {
            get: |c| c.invalid_ack_global_burst,
            set: |c, v| c.invalid_ack_global_burst = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "global_syn_rate",
        Field::U32 {
            get: |c| c.global_syn_rate,
            set: |c, v| c.global_syn_rate = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "global_syn_burst",
        Field::U32 {
            get: |c| c.global_syn_burst,
            set: |c, v| c.global_syn_burst = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "known_good_ttl_s",
        Field::U32 {
            get: |c| c.known_good_ttl_s,
            set: |c, v| c.known_good_ttl_s = v,
            min: 0,
            expected: ANY_U32,
        },
    ),
    (
        "syn_cookies",
        Field::Choice {
            get: |c| c.syn_cookies,
            set: |c, v| c.syn_cookies = v,
            names: &crate::syncookie::MODE_NAMES,
            expected: "off, under-attack or always",
        },
    ),
];

/// The key names, in the order [`config_entries`] lists them.
pub fn config_keys() -> impl Iterator<Item = &'static str> {
    FIELDS.iter().map(|(k, _)| *k)
}

/// Why a key or value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigKeyError {
    UnknownKey(String),
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The same key twice in one batch: which one was meant is unclear.
    Duplicate(&'static str),
    /// `key=value` text without the `=`.
    NotAnAssignment(String),
    /// Every value is fine alone but together they are not.
    Invalid(ConfigError),
}

impl fmt::Display for ConfigKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey(key) => {
                write!(f, "unknown config key `{key}`; known keys: ")?;
                for (i, k) in config_keys().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(k)?;
                }
                Ok(())
            }
            Self::BadValue {
                key,
                value,
                expected,
            } => write!(f, "`{value}` is not a valid {key}: expected {expected}"),
            Self::Duplicate(key) => write!(f, "{key} is set more than once in the same change"),
            Self::NotAnAssignment(text) => {
                write!(
                    f,
                    "`{text}` is not a setting: expected key=value, e.g. syn_rate=50"
                )
            }
            Self::Invalid(e) => write!(f, "the resulting config is invalid: {e}"),
        }
    }
}

impl std::error::Error for ConfigKeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Invalid(e) => Some(e),
            _ => None,
        }
    }
}

/// Every key with its current value, in a fixed order.
pub fn config_entries(c: &LiveConfig) -> Vec<(&'static str, String)> {
    FIELDS
        .iter()
        .map(|(key, field)| {
            let value = match field {
                Field::Flag(bit) => (c.flags & bit != 0).to_string(),
                Field::U8 { get, .. } => get(c).to_string(),
                Field::U32 { get, .. } => get(c).to_string(),
                Field::Choice { get, names, .. } => names
                    .get(get(c) as usize)
                    .map_or_else(|| get(c).to_string(), |n| n.to_string()),
            };
            (*key, value)
        })
        .collect()
}

/// Sets one key from its text form. Checks the value's own range only; a
/// batch goes through [`apply_config_changes`], which also checks the
/// combination. On error `c` is unchanged.
pub fn set_config_value(c: &mut LiveConfig, key: &str, value: &str) -> Result<(), ConfigKeyError> {
    let (name, field) = FIELDS
        .iter()
        .find(|(k, _)| *k == key.trim())
        .ok_or_else(|| ConfigKeyError::UnknownKey(key.to_string()))?;
    let value = value.trim();
    match field {
        Field::Flag(bit) => {
            let bad = || ConfigKeyError::BadValue {
                key: name,
                value: value.to_string(),
                expected: "true or false",
            };
            match value {
                "true" => c.flags |= bit,
                "false" => c.flags &= !bit,
                _ => return Err(bad()),
            }
        }
        Field::U8 {
            set,
            min,
            max,
            expected,
            ..
        } => {
            let v = value
                .parse::<u8>()
                .ok()
                .filter(|v| (*min..=*max).contains(v))
                .ok_or_else(|| ConfigKeyError::BadValue {
                    key: name,
                    value: value.to_string(),
                    expected,
                })?;
            set(c, v);
        }
        Field::U32 {
            set, min, expected, ..
        } => {
            let v = value
                .parse::<u32>()
                .ok()
                .filter(|v| v >= min)
                .ok_or_else(|| ConfigKeyError::BadValue {
                    key: name,
                    value: value.to_string(),
                    expected,
                })?;
            set(c, v);
        }
        Field::Choice {
            set,
            names,
            expected,
            ..
        } => {
            let v =
                names
                    .iter()
                    .position(|n| *n == value)
                    .ok_or_else(|| ConfigKeyError::BadValue {
                        key: name,
                        value: value.to_string(),
                        expected,
                    })?;
            set(c, v as u8);
        }
    }
    Ok(())
}

/// `base` with every change applied, or an error and no change at all: each
/// value is checked, then the result as a whole ([`LiveConfig::validate`]),
/// so the order of the changes does not matter.
pub fn apply_config_changes(
    base: &LiveConfig,
    changes: &[(String, String)],
) -> Result<LiveConfig, ConfigKeyError> {
    let mut next = *base;
    let mut seen: Vec<&'static str> = Vec::with_capacity(changes.len());
    for (key, value) in changes {
        set_config_value(&mut next, key, value)?;
        // The lookup succeeded, so the key is one of ours.
        if let Some(name) = config_keys().find(|k| *k == key.trim()) {
            if seen.contains(&name) {
                return Err(ConfigKeyError::Duplicate(name));
            }
            seen.push(name);
        }
    }
    next.validate().map_err(ConfigKeyError::Invalid)?;
    Ok(next)
}

/// Splits `key=value` (as given to `tune --set`) into its parts.
pub fn parse_assignment(text: &str) -> Result<(String, String), ConfigKeyError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| ConfigKeyError::NotAnAssignment(text.to_string()))?;
    let key = key.trim();
    if !config_keys().any(|k| k == key) {
        return Err(ConfigKeyError::UnknownKey(key.to_string()));
    }
    Ok((key.to_string(), value.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get_of(entries: &[(&str, String)], key: &str) -> String {
        entries.iter().find(|(e, _)| *e == key).unwrap().1.clone()
    }

    #[test]
    fn entries_list_every_key_once_and_read_back() {
        let c = LiveConfig::default();
        let entries = config_entries(&c);
        assert_eq!(entries.len(), FIELDS.len());
        let mut keys: Vec<_> = entries.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), FIELDS.len());
        assert_eq!(get_of(&entries, "handshake_timeout_s"), "64");
        assert_eq!(get_of(&entries, "invalid_ack_burst"), "8");
        let get = |k: &str| entries.iter().find(|(e, _)| *e == k).unwrap().1.clone();
        assert_eq!(get("dry_run"), "false");
        assert_eq!(get("source_prefix_v6"), "64");
        assert_eq!(get("syn_burst"), "40");
        assert_eq!(get("known_good_ttl_s"), "600");
        assert_eq!(get("syn_cookies"), "off");

        // Applying a config's own entries to another config reproduces it.
        let mut custom = c;
        custom.flags = FLAG_DRY_RUN;
        custom.syn_rate = 7;
        custom.aggregate_prefix_v6 = 40;
        custom.syn_cookies = crate::syncookie::MODE_ALWAYS;
        let text: Vec<(String, String)> = config_entries(&custom)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(apply_config_changes(&c, &text), Ok(custom));
    }

    #[test]
    fn each_key_sets_its_own_field_and_nothing_else() {
        let base = LiveConfig::default();
        let before = config_entries(&base);
        for (key, value) in &before {
            let new_value = match value.as_str() {
                "false" => "true".to_string(),
                "true" => "false".to_string(),
                "off" => "always".to_string(),
                // Narrowing a prefix by one and bumping a counter both stay
                // in range from the defaults.
                v if key.contains("prefix") => (v.parse::<u8>().unwrap() - 1).to_string(),
                v => (v.parse::<u32>().unwrap() + 1).to_string(),
            };
            let mut c = base;
            set_config_value(&mut c, key, &new_value).unwrap();
            for ((k, was), (_, now)) in before.iter().zip(config_entries(&c)) {
                if k == key {
                    assert_eq!(now, new_value, "{key}");
                } else {
                    assert_eq!(&now, was, "setting {key} changed {k}");
                }
            }
        }
    }

    #[test]
    fn flags_keep_the_other_bits() {
        let mut c = LiveConfig::default();
        set_config_value(&mut c, "dry_run", "true").unwrap();
        set_config_value(&mut c, "block_all_traffic", "true").unwrap();
        set_config_value(&mut c, "dry_run", "false").unwrap();
        assert_eq!(c.flags, FLAG_BLOCK_ALL_TRAFFIC);
    }

    #[test]
    fn bad_keys_and_values_name_what_is_accepted() {
        let mut c = LiveConfig::default();
        let err = set_config_value(&mut c, "syn_rat", "5").unwrap_err();
        assert_eq!(err, ConfigKeyError::UnknownKey("syn_rat".into()));
        let text = err.to_string();
        assert!(text.contains("`syn_rat`"), "{text}");
        assert!(text.contains("syn_rate, syn_burst"), "{text}");

        let err = set_config_value(&mut c, "dry_run", "yes").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`yes` is not a valid dry_run: expected true or false"
        );
        for (key, value) in [
            ("source_prefix_v4", "33"),
            ("source_prefix_v4", "0"),
            ("aggregate_prefix_v6", "129"),
            ("aggregate_prefix_v6", "-1"),
            ("syn_rate", "4294967296"),
            ("syn_rate", "fast"),
            ("syn_rate", ""),
            ("event_interval_ms", "0"),
            ("syn_cookies", "on"),
            ("syn_cookies", "1"),
        ] {
            let err = set_config_value(&mut c, key, value).unwrap_err();
            assert!(
                matches!(&err, ConfigKeyError::BadValue { key: k, .. } if *k == key),
                "{key}={value}: {err}"
            );
            assert!(err.to_string().contains("expected"), "{err}");
        }
        assert_eq!(c, LiveConfig::default(), "failed sets change nothing");
        // Surrounding whitespace is not part of the value.
        set_config_value(&mut c, " syn_rate ", " 50 ").unwrap();
        assert_eq!(c.syn_rate, 50);
    }

    #[test]
    fn a_batch_is_all_or_nothing_and_validated_as_a_whole() {
        let base = LiveConfig::default();
        // Alone, source /16 under aggregate /24 is invalid; with the
        // aggregate widened in the same batch it is fine, in either order.
        let err = apply_config_changes(&base, &changes(&[("source_prefix_v4", "16")]));
        assert_eq!(
            err,
            Err(ConfigKeyError::Invalid(
                ConfigError::AggregateNarrowerThanSource
            ))
        );
        for batch in [
            [("source_prefix_v4", "16"), ("aggregate_prefix_v4", "8")],
            [("aggregate_prefix_v4", "8"), ("source_prefix_v4", "16")],
        ] {
            let c = apply_config_changes(&base, &changes(&batch)).unwrap();
            assert_eq!((c.source_prefix_v4, c.aggregate_prefix_v4), (16, 8));
        }
        let err =
            apply_config_changes(&base, &changes(&[("syn_rate", "50"), ("dry_run", "maybe")]))
                .unwrap_err();
        assert!(matches!(
            err,
            ConfigKeyError::BadValue { key: "dry_run", .. }
        ));
        let err = apply_config_changes(&base, &changes(&[("syn_rate", "5"), ("syn_rate", "6")]))
            .unwrap_err();
        assert_eq!(err, ConfigKeyError::Duplicate("syn_rate"));
        assert_eq!(apply_config_changes(&base, &[]), Ok(base));
        // Cookies "under attack" mean "while the global budget is dry".
        let err = apply_config_changes(&base, &changes(&[("syn_cookies", "under-attack")]));
        assert_eq!(
            err,
            Err(ConfigKeyError::Invalid(ConfigError::CookiesNeedBudget))
        );
        let c = apply_config_changes(
            &base,
            &changes(&[
                ("syn_cookies", "under-attack"),
                ("global_syn_rate", "1000"),
                ("global_syn_burst", "2000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.syn_cookies, crate::syncookie::MODE_UNDER_ATTACK);
    }

    #[test]
    fn assignments_split_on_the_first_equals() {
        assert_eq!(
            parse_assignment(" syn_rate = 50 "),
            Ok(("syn_rate".into(), "50".into()))
        );
        assert_eq!(
            parse_assignment("syn_rate"),
            Err(ConfigKeyError::NotAnAssignment("syn_rate".into()))
        );
        assert_eq!(
            parse_assignment("nope=1"),
            Err(ConfigKeyError::UnknownKey("nope".into()))
        );
        let (k, v) = parse_assignment("dry_run=a=b").unwrap();
        assert_eq!((k.as_str(), v.as_str()), ("dry_run", "a=b"));
    }
}
