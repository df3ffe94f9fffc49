//! The daemon's one credential cache: secret values fetched for injection,
//! shared by every front end and emptied by every change.
//!
//! Revocation is immediate: `SecretService` calls
//! [`CredentialCache::invalidate`] inside every mutation of a secret (put,
//! rm, rotation commit) while it still holds the service lock, so the very
//! next session reads the store. A lookup that raced with such a change
//! (read the old value before the change, came back after it) does not put
//! the old value back: inserts carry the generation seen before the read and
//! are dropped when it moved.
//!
//! On a store shared by several nodes, changes made on another node arrive
//! through [`crate::propagation`], which calls the same `invalidate` (or
//! [`CredentialCache::invalidate_all`] when it may have missed some).
//!
//! Front ends that keep something derived from a value (an HTTP route's
//! prepared header) compare [`CredentialCache::generation`] before reuse.

use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Credential cache TTL when a route sets none: short, so a change made
/// outside warden is picked up quickly (never longer than the secret's
/// rotation period; changes made through warden apply at once).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// A cached secret value.
struct CachedSecret {
    fetched: Instant,
    version: u32,
    value: Zeroizing<Vec<u8>>,
}

/// Secret values fetched for injection, each reused for at most its route's
/// TTL and never after the secret changed.
#[derive(Default)]
pub struct CredentialCache {
    entries: Mutex<HashMap<(String, String), CachedSecret>>,
    /// Bumped by every invalidation.
    generation: AtomicU64,
}

/// A value and what it is: never printed (no Debug), zeroized on drop.
pub struct SecretValue {
    pub version: u32,
    pub value: Zeroizing<Vec<u8>>,
    /// The cache generation the value is current for.
    pub generation: u64,
}

impl CredentialCache {
    /// The number of invalidations so far: anything derived from a value is
    /// stale once this moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The cached value of (secret, env), if fetched less than `ttl` ago.
    pub fn cached(&self, secret: &str, env: &str, ttl: Duration) -> Option<SecretValue> {
        let generation = self.generation();
        let map = self.entries.lock().ok()?;
        let c = map.get(&(secret.to_string(), env.to_string()))?;
        (c.fetched.elapsed() < ttl).then(|| SecretValue {
            version: c.version,
            value: c.value.clone(),
            generation,
        })
    }

    /// The cached value of (secret, env) fetched less than `max_age` ago,
    /// and its age: for serving past the TTL while the store is unreachable
    /// (`store.stale_if_error`). An invalidated entry is gone, never served.
    pub fn cached_stale(
        &self,
        secret: &str,
        env: &str,
        max_age: Duration,
    ) -> Option<(SecretValue, Duration)> {
        let generation = self.generation();
        let map = self.entries.lock().ok()?;
        let c = map.get(&(secret.to_string(), env.to_string()))?;
        let age = c.fetched.elapsed();
        (age < max_age).then(|| {
            (
                SecretValue {
                    version: c.version,
                    value: c.value.clone(),
                    generation,
                },
                age,
            )
        })
    }

    /// The value of (secret, env) and its version, from the cache or, on a
    /// miss, from `fetch` (the store: blocking).
    pub fn get(
        &self,
        secret: &str,
        env: &str,
        ttl: Duration,
        fetch: impl FnOnce(&str, &str) -> Result<(u32, Zeroizing<Vec<u8>>)>,
    ) -> Result<SecretValue> {
        if let Some(hit) = self.cached(secret, env, ttl) {
            return Ok(hit);
        }
        // Read before the store: a change after this point bumps it.
        let generation = self.generation();
        let (version, value) = fetch(secret, env)?;
        if let Ok(mut map) = self.entries.lock() {
            // Checked under the map lock, which `invalidate` takes too.
            if self.generation() == generation {
                map.insert(
                    (secret.to_string(), env.to_string()),
                    CachedSecret {
                        fetched: Instant::now(),
                        version,
                        value: value.clone(),
                    },
                );
            }
        }
        Ok(SecretValue {
            version,
            value,
            generation,
        })
    }

    /// Forgets (secret, env): the next session reads the store.
    pub fn invalidate(&self, secret: &str, env: &str) {
        if let Ok(mut map) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            map.remove(&(secret.to_string(), env.to_string()));
        }
    }

    /// Forgets every value: the next session of every route reads the store
    /// (a fleet node that may have missed changes made on another node).
    pub fn invalidate_all(&self) {
        if let Ok(mut map) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_moves_the_generation_and_drops_the_entry() {
        let c = CredentialCache::default();
        c.entries.lock().unwrap().insert(
            ("a".into(), "prod".into()),
            CachedSecret {
                fetched: Instant::now(),
                version: 3,
                value: Zeroizing::new(b"v".to_vec()),
            },
        );
        let hit = c.cached("a", "prod", Duration::from_secs(60)).unwrap();
        assert_eq!((hit.version, hit.generation), (3, 0));
        c.invalidate("a", "prod");
        assert!(c.cached("a", "prod", Duration::from_secs(60)).is_none());
        assert_eq!(c.generation(), 1);
    }

    #[test]
    fn stale_entries_are_served_only_within_their_limit() {
        let c = CredentialCache::default();
        c.entries.lock().unwrap().insert(
            ("a".into(), "prod".into()),
            CachedSecret {
                fetched: Instant::now() - Duration::from_secs(90),
                version: 4,
                value: Zeroizing::new(b"pw".to_vec()),
            },
        );
        // Past a 60 s TTL, within 60 s + 60 s.
        assert!(c.cached("a", "prod", Duration::from_secs(60)).is_none());
        let (hit, age) = c
            .cached_stale("a", "prod", Duration::from_secs(120))
            .unwrap();
        assert_eq!(hit.version, 4);
        assert!(age >= Duration::from_secs(90));
        assert!(c
            .cached_stale("a", "prod", Duration::from_secs(80))
            .is_none());
        c.invalidate("a", "prod");
        assert!(c
            .cached_stale("a", "prod", Duration::from_secs(3600))
            .is_none());
    }

    #[test]
    fn invalidate_all_empties_the_cache() {
        let c = CredentialCache::default();
        for name in ["a", "b"] {
            c.entries.lock().unwrap().insert(
                (name.into(), "prod".into()),
                CachedSecret {
                    fetched: Instant::now(),
                    version: 1,
                    value: Zeroizing::new(b"v".to_vec()),
                },
            );
        }
        c.invalidate_all();
        assert!(c.cached("a", "prod", Duration::from_secs(60)).is_none());
        assert!(c.cached("b", "prod", Duration::from_secs(60)).is_none());
        assert_eq!(c.generation(), 1);
    }

    #[test]
    fn expired_entries_are_not_served() {
        let c = CredentialCache::default();
        c.entries.lock().unwrap().insert(
            ("a".into(), "prod".into()),
            CachedSecret {
                fetched: Instant::now(),
                version: 1,
                value: Zeroizing::new(b"v".to_vec()),
            },
        );
        assert!(c.cached("a", "prod", Duration::ZERO).is_none());
    }
}
