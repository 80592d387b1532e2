//! The `key=value,key=value` option strings of the command-line flags: splitting them
//! into pairs and reading on/off, number and size values.

use super::ConfigError;

/// Parses `key=value,key=value` into pairs.
pub(super) fn pairs(flag: &'static str, s: &str) -> Result<Vec<(String, String)>, ConfigError> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ConfigError::NotKeyValue {
                    flag,
                    item: item.to_string(),
                })
        })
        .collect()
}

pub(super) fn on_off(flag: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::BadValue {
            flag,
            key: key.into(),
            value: v.into(),
            reason: "expected on or off".into(),
        }),
    }
}

/// Parses a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

pub(super) fn number<T: std::str::FromStr>(
    flag: &'static str,
    key: &str,
    v: &str,
) -> Result<T, ConfigError> {
    v.parse().map_err(|_| ConfigError::BadValue {
        flag,
        key: key.into(),
        value: v.into(),
        reason: "expected a number".into(),
    })
}
