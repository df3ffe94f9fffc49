//! Whether a shared store answers: one [`StoreHealth`] per store (keyed by
//! its description, `PostgreSQL store user@host:port/dbname`), fed by
//! everything that talks to it — the backend's connection
//! ([`super::postgres`]) and the change listener ([`crate::propagation`]) —
//! and read by the session path (serving cached credentials past their TTL
//! under `store.stale_if_error`), `/readyz` and the `warden_store_up` /
//! `warden_store_unreachable_seconds` metrics.
//!
//! "Unreachable" means a connection could not be made or was lost and not
//! made again; it starts at the first failure after the last success and
//! ends at the next success. A query the server refused (a constraint, a
//! permission) is not an outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// An ongoing outage of the store.
#[derive(Debug, Clone)]
pub struct Outage {
    /// When it began (the first failed attempt after the last success).
    pub since: OffsetDateTime,
    /// The same moment on the monotonic clock, for durations.
    pub started: Instant,
    /// The latest failure, as the connection reported it (never a password:
    /// connection errors carry the host, port, user and database only).
    pub error: String,
}

impl Outage {
    /// How long the store has been unreachable.
    pub fn lasted(&self) -> Duration {
        self.started.elapsed()
    }

    /// `since 2026-12-06T09:00:00.123456Z (12 s)`.
    pub fn describe_since(&self) -> String {
        format!(
            "since {} ({} s)",
            crate::timefmt::format_rfc3339(self.since),
            self.lasted().as_secs()
        )
    }
}

/// The reachability of one store; see the module documentation.
#[derive(Debug)]
pub struct StoreHealth {
    at: String,
    outage: Mutex<Option<Outage>>,
}

/// Every store this process talks to, by description.
fn registry() -> &'static Mutex<HashMap<String, Arc<StoreHealth>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<StoreHealth>>>> = OnceLock::new();
    STORES.get_or_init(|| Mutex::new(HashMap::new()))
}

impl StoreHealth {
    /// The health of the store described as `at` (shared by every
    /// connection to it in this process).
    pub fn of(at: &str) -> Arc<StoreHealth> {
        let mut map = match registry().lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(at.to_string())
            .or_insert_with(|| {
                Arc::new(StoreHealth {
                    at: at.to_string(),
                    outage: Mutex::new(None),
                })
            })
            .clone()
    }

    /// The store's description, for messages.
    pub fn at(&self) -> &str {
        &self.at
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        match self.outage.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A connection was made or a statement answered: any outage is over.
    pub fn reachable(&self) {
        let ended = self.state().take();
        if let Some(o) = ended {
            tracing::info!(
                "the {} is reachable again after {} s unreachable: writes work again, and sessions read credentials from it again",
                self.at,
                o.lasted().as_secs()
            );
        }
    }

    /// A connection could not be made (or was lost and not remade):
    /// starts an outage, or updates the error of the ongoing one.
    pub fn unreachable(&self, error: &str) {
        let mut state = self.state();
        match state.as_mut() {
            Some(o) => o.error = error.to_string(),
            None => {
                tracing::warn!(
                    "the {} is unreachable: {error}; writes fail until it is back, and sessions are served from cached credentials for at most store.stale_if_error past their cache_ttl",
                    self.at
                );
                *state = Some(Outage {
                    since: OffsetDateTime::now_utc(),
                    started: Instant::now(),
                    error: error.to_string(),
                });
            }
        }
    }

    /// The ongoing outage, if the store is unreachable.
    pub fn outage(&self) -> Option<Outage> {
        self.state().clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_starts_at_the_first_failure_and_ends_at_a_success() {
        let h = StoreHealth::of("PostgreSQL store test@health-unit:5432/a");
        assert!(h.outage().is_none());
        h.unreachable("connection refused");
        let first = h.outage().unwrap();
        h.unreachable("connection refused again");
        let second = h.outage().unwrap();
        assert_eq!(first.started, second.started, "the outage keeps its start");
        assert_eq!(second.error, "connection refused again");
        // Shared by description.
        assert!(StoreHealth::of("PostgreSQL store test@health-unit:5432/a")
            .outage()
            .is_some());
        assert!(StoreHealth::of("PostgreSQL store test@health-unit:5432/b")
            .outage()
            .is_none());
        h.reachable();
        assert!(h.outage().is_none());
        assert!(second.describe_since().starts_with("since "));
    }
}
