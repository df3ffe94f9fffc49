//! Timestamps: RFC 3339 in UTC, microsecond precision, everywhere warden prints
//! or stores a time.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds, always 27 bytes) for
/// years 0 to 9999 — the audit log's time format — written by hand: it is
/// on every session's path. None outside that range or offset.
pub fn format_micros_utc(t: OffsetDateTime) -> Option<String> {
    if !t.offset().is_utc() {
        return None;
    }
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut out = [0u8; 27];
    let mut put = |at: usize, value: u32, width: usize| {
        let mut v = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, u32::from(u8::from(t.month())), 2);
    put(8, u32::from(t.day()), 2);
    put(11, u32::from(t.hour()), 2);
    put(14, u32::from(t.minute()), 2);
    put(17, u32::from(t.second()), 2);
    put(20, t.microsecond(), 6);
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        out[at] = sep;
    }
    // Only ASCII digits and separators were written.
    String::from_utf8(out.to_vec()).ok()
}

pub fn format_rfc3339(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{datetime, format_description};

    #[test]
    fn micros_utc_matches_the_format_description() {
        let fmt = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        for t in [
            datetime!(2026-12-06 08:30:05.123456789 UTC),
            datetime!(0001-01-01 00:00:00 UTC),
            datetime!(9999-12-31 23:59:59.999999 UTC),
            datetime!(2024-02-29 12:00:00.000001 UTC),
            OffsetDateTime::now_utc(),
        ] {
            assert_eq!(format_micros_utc(t).unwrap(), t.format(fmt).unwrap(), "{t}");
        }
        assert_eq!(format_micros_utc(datetime!(2026-01-01 00:00 +01:00)), None);
    }
}
