//! Durations as the config file writes them (`"90s"`, `"1h30m"`, `"7d"`):
//! the parser, the formatter used in messages, and the serde adapters for
//! duration-valued keys.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

const DURATION_FORMS: &str = "write a whole number followed by a unit (ms, s, m, h or d), optionally several from largest to smallest, e.g. \"500ms\", \"90s\", \"15m\", \"1h\", \"1h30m\", \"7d\"";

/// Parse a duration such as `"90s"`, `"15m"`, `"1h"`, `"7d"`, `"1h30m"` or `"500ms"`.
///
/// Units are `d`, `h`, `m`, `s` and `ms`. Several may be combined, each at
/// most once and from largest to smallest. Fractions, signs and spaces are
/// rejected. The error text says which forms are accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration \"{s}\": {why}; {DURATION_FORMS}");
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u64 = 0;
    let mut previous_rank: Option<u8> = None;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            let ch = s[i..].chars().next().unwrap_or(' ');
            return Err(match ch {
                '-' => bad("negative durations are not allowed"),
                '+' => bad("write the number without a sign"),
                _ if ch.is_whitespace() => bad("it contains spaces"),
                _ => bad(&format!("expected a number but found `{ch}`")),
            });
        }
        let number: u64 = s[start..i]
            .parse()
            .map_err(|_| bad("the number is too large"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &s[unit_start..i];
        if unit.is_empty() {
            let next = s[i..].chars().next();
            return Err(match next {
                None => bad(&format!("`{number}` has no unit")),
                Some('.') | Some(',') => {
                    bad("fractions are not supported; combine units instead, e.g. \"1h30m\"")
                }
                Some(ch) if ch.is_whitespace() => bad("it contains spaces"),
                Some(ch) => bad(&format!("unexpected `{ch}`")),
            });
        }
        let (rank, unit_ms): (u8, u64) = match unit {
            "d" => (5, 86_400_000),
            "h" => (4, 3_600_000),
            "m" => (3, 60_000),
            "s" => (2, 1_000),
            "ms" => (1, 1),
            _ => return Err(bad(&format!("unknown unit `{unit}`"))),
        };
        if previous_rank.is_some_and(|prev| rank >= prev) {
            return Err(bad(
                "units must go from largest to smallest, each at most once",
            ));
        }
        previous_rank = Some(rank);
        total_ms = number
            .checked_mul(unit_ms)
            .and_then(|part| total_ms.checked_add(part))
            .ok_or_else(|| bad("the duration is too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Format a duration in the config's own notation, e.g. `1h30m`, `500ms`, `2d`.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::{format_duration, parse_duration};

    #[test]
    fn duration_parser_accepts() {
        let cases = [
            ("90s", 90_000),
            ("15m", 900_000),
            ("1h", 3_600_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("0s", 0),
            ("1d2h3m4s5ms", 93_784_005),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn duration_parser_rejects() {
        for text in [
            "",
            "10",
            "h",
            "1x",
            "1.5h",
            "-1h",
            "+1h",
            "1 h",
            " 1h",
            "1h ",
            "30m1h",
            "1h1h",
            "1H",
            "1hour",
            "99999999999999999999d",
            "213503982335d",
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("\"1h30m\""), "{text}: {err}");
            assert!(err.contains("ms, s, m, h or d"), "{text}: {err}");
        }
    }

    #[test]
    fn duration_formatting_round_trips() {
        for text in ["2h", "1h30m", "500ms", "1d", "7d", "1m1s", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
    }
}
