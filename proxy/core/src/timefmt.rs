//! Timestamps: RFC 3339 in UTC, microsecond precision, everywhere warden prints
//! or stores a time.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

pub fn format_rfc3339(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(t.microsecond() * 1000).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
