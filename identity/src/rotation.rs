//! When to replace things: SVIDs at half-life with jitter, CAs with overlap.
//!
//! - An SVID is refreshed at 50% of its lifetime ±10% (of that half), so a
//!   fleet started together does not rotate in lock-step.
//! - A CA's successor is prepared when less than [`CaSchedule::overlap`] of the
//!   current CA's life remains, and is published in the trust bundle at once;
//!   issuance switches to it once it has been published for at least one SVID
//!   TTL, so every workload has fetched the new bundle before it meets a leaf
//!   signed by the new CA. The old CA stays in the bundle until it expires.

use std::time::Duration;
use time::OffsetDateTime;

/// A uniformly random jitter in [-1, 1].
pub fn random_unit_jitter() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.0;
    }
    let x = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    x * 2.0 - 1.0
}

/// When an SVID valid over [not_before, not_after] should be replaced, for a
/// jitter in [-1, 1] (scaled to ±10% of the half-life).
pub fn svid_refresh_at(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    jitter: f64,
) -> OffsetDateTime {
    let life = (not_after - not_before).as_seconds_f64().max(0.0);
    let fraction = 0.5 * (1.0 + 0.1 * jitter.clamp(-1.0, 1.0));
    not_before + time::Duration::seconds_f64(life * fraction)
}

/// CA lifetime policy.
#[derive(Debug, Clone, Copy)]
pub struct CaSchedule {
    pub ca_ttl: Duration,
    pub svid_ttl: Duration,
}

impl CaSchedule {
    /// The smallest CA TTL accepted for an SVID TTL: 6×, so the overlap can
    /// hold several SVID lifetimes.
    pub const MIN_CA_TTL_FACTOR: u32 = 6;

    /// How long before the current CA expires its successor is prepared: a
    /// sixth of the CA TTL, and at least three SVID TTLs.
    pub fn overlap(&self) -> Duration {
        (self.ca_ttl / 6).max(self.svid_ttl * 3)
    }

    /// Should a successor be prepared for a CA expiring at `ca_not_after`?
    pub fn needs_successor(&self, ca_not_after: OffsetDateTime, now: OffsetDateTime) -> bool {
        ca_not_after - now <= self.overlap()
    }

    /// May issuance switch to a successor published at `published_at`?
    pub fn may_switch(&self, published_at: OffsetDateTime, now: OffsetDateTime) -> bool {
        now - published_at >= self.svid_ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_half_life_plus_minus_ten_percent() {
        let nb = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let na = nb + time::Duration::hours(1);
        assert_eq!(
            svid_refresh_at(nb, na, 0.0),
            nb + time::Duration::minutes(30)
        );
        assert_eq!(
            svid_refresh_at(nb, na, 1.0),
            nb + time::Duration::minutes(33)
        );
        assert_eq!(
            svid_refresh_at(nb, na, -1.0),
            nb + time::Duration::minutes(27)
        );
        assert_eq!(
            svid_refresh_at(nb, na, 7.0),
            nb + time::Duration::minutes(33)
        );
        let mut lo = f64::MAX;
        let mut hi = f64::MIN;
        for _ in 0..2000 {
            let j = random_unit_jitter();
            assert!((-1.0..=1.0).contains(&j));
            lo = lo.min(j);
            hi = hi.max(j);
        }
        assert!(lo < -0.9 && hi > 0.9, "jitter does not spread: {lo}..{hi}");
    }

    #[test]
    fn ca_overlap_and_switch() {
        let s = CaSchedule {
            ca_ttl: Duration::from_secs(60 * 86400),
            svid_ttl: Duration::from_secs(3600),
        };
        assert_eq!(s.overlap(), Duration::from_secs(10 * 86400));
        let now = OffsetDateTime::from_unix_timestamp(1_000_000_000).unwrap();
        assert!(!s.needs_successor(now + time::Duration::days(11), now));
        assert!(s.needs_successor(now + time::Duration::days(10), now));
        assert!(!s.may_switch(now - time::Duration::minutes(59), now));
        assert!(s.may_switch(now - time::Duration::minutes(60), now));
        // Short CA TTLs still leave three SVID lifetimes of overlap.
        let short = CaSchedule {
            ca_ttl: Duration::from_secs(6 * 60),
            svid_ttl: Duration::from_secs(60),
        };
        assert_eq!(short.overlap(), Duration::from_secs(180));
    }
}
