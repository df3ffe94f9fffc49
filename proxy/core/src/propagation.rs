//! Fleet propagation: a change committed on one node invalidates what every
//! other node holds, fast.
//!
//! With `[store] backend = "postgres"` every write of a secret or a meta key
//! bumps the store's change counter and sends `NOTIFY warden_changes,
//! '<counter>:<kind>:<what>'` inside its own transaction (see
//! [`crate::store::postgres`]), so the notification goes out exactly when the
//! change commits. Kinds: `secret:<name>/<env>`, `meta:<key>`, `all:<why>`.
//! Payloads carry names, never values.
//!
//! Each daemon keeps one extra connection that `LISTEN`s, on a thread of its
//! own ([`ChangeListener`]). On a notification it invalidates exactly what
//! changed ([`FleetCaches::apply`]): the credential cache entry of a secret
//! (HTTP prepared headers follow the cache generation), the frozen set,
//! reloaded and applied here through the same kernel path as a local freeze,
//! or the CA list (the identity maintenance is woken to take it).
//!
//! **Reconciliation.** Notifications sent while the listener is not
//! connected are lost. So right after every (re)connect, and every
//! [`RECONCILE_EVERY`], the listener reads the change counter: if it is
//! ahead of the last counter this node heard of, something was missed and
//! everything is invalidated (the credential cache emptied, the frozen set
//! reloaded). Notifications arrive in commit order with consecutive
//! counters (the counter row serialises changes), so a gap is noticed too.
//!
//! **While the store is unreachable** the listener retries with a backoff
//! up to [`BACKOFF_MAX`] and reports the outage to the store's
//! [`crate::store::health::StoreHealth`] (as the backend's own connection
//! does); sessions are then served from cached values for at most
//! `store.stale_if_error` past their route's `cache_ttl` (see
//! [`crate::admission::Admission::credential`]). A change made on another
//! node meanwhile reaches this node when the listener reconnects (at once,
//! by the reconciliation, which empties the credential cache when the
//! change counter moved) or when the cache entry expires, whichever comes
//! first.

use crate::authority::{IdentityHandle, CA_META_KEY};
use crate::credentials::CredentialCache;
use crate::error::Result;
use crate::freeze::{self, Freezer};
use crate::store::postgres::{PostgresSettings, CHANGES_CHANNEL, READ_COUNTER};
use postgres::fallible_iterator::FallibleIterator;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the listener compares the change counter with what it heard.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// The longest wait between two connection attempts of the listener.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The first wait after a failed connection attempt (doubled up to the max).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long one wait for notifications lasts (the stop flag and the
/// reconciliation are checked between waits).
const POLL: Duration = Duration::from_millis(500);

/// What a notification says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Secret {
        name: String,
        env: String,
    },
    Meta {
        key: String,
    },
    /// Anything may have changed (a KEK rewrap, a discarded store, a
    /// notification this warden cannot read).
    Everything,
}

/// A parsed notification: the change counter after it, and what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub counter: Option<i64>,
    pub change: Change,
}

/// Reads a `<counter>:<kind>:<what>` payload. Anything else (a newer warden's
/// kind, a hand-sent NOTIFY) means "anything may have changed".
pub fn parse(payload: &str) -> Notice {
    let everything = Notice {
        counter: None,
        change: Change::Everything,
    };
    let Some((counter, rest)) = payload.split_once(':') else {
        return everything;
    };
    let Ok(counter) = counter.parse::<i64>() else {
        return everything;
    };
    let change = match rest.split_once(':') {
        // Environments never contain '/', names may.
        Some(("secret", what)) => match what.rsplit_once('/') {
            Some((name, env)) => Change::Secret {
                name: name.to_string(),
                env: env.to_string(),
            },
            None => Change::Everything,
        },
        Some(("meta", key)) => Change::Meta {
            key: key.to_string(),
        },
        _ => Change::Everything,
    };
    Notice {
        counter: Some(counter),
        change,
    }
}

/// What a node invalidates when another node changed fleet state.
pub struct FleetCaches {
    pub credentials: Arc<CredentialCache>,
    pub freezer: Arc<Freezer>,
    /// Woken to take the store's CA list when another node changed it.
    pub identity: Arc<IdentityHandle>,
    /// `node/<id>` of this node: its record changing (a removal) wakes the
    /// identity maintenance, which checks membership.
    pub own_node_key: Option<String>,
    /// Woken when another node asks for a lease revocation (the lease
    /// maintenance revokes the leases this node holds).
    pub lease_requests: Arc<tokio::sync::Notify>,
}

impl FleetCaches {
    /// Invalidates what `change` touched. Blocking (a freeze reload reads
    /// the store and scans /proc).
    pub fn apply(&self, change: &Change) {
        match change {
            Change::Secret { name, env } => self.credentials.invalidate(name, env),
            Change::Meta { key } if key == freeze::META_KEY => self.sync_freezes(),
            Change::Meta { key } if key == CA_META_KEY || key == crate::fleet::REVOKED_KEY => {
                self.identity.wake.notify_one()
            }
            // This node's own record changed (a removal): the identity
            // maintenance checks membership first.
            Change::Meta { key } if self.own_node_key.as_deref() == Some(key.as_str()) => {
                self.identity.wake.notify_one()
            }
            Change::Meta { key } if key.starts_with(crate::leases::REVOKE_REQUEST_PREFIX) => {
                self.lease_requests.notify_one()
            }
            Change::Meta { .. } => {}
            Change::Everything => self.everything(),
        }
    }

    /// Empties the credential cache and reloads the frozen set.
    pub fn everything(&self) {
        self.credentials.invalidate_all();
        self.sync_freezes();
        self.identity.wake.notify_one();
        self.lease_requests.notify_one();
    }

    fn sync_freezes(&self) {
        if let Err(e) = self.freezer.sync_from_store() {
            tracing::error!(
                "frozen set not reloaded from the store (retried at the next reconciliation): {}",
                e.message
            );
        }
    }
}

/// The listener thread; stopped when dropped.
pub struct ChangeListener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChangeListener {
    /// Starts listening on `settings`' store; returns at once (the first
    /// connection is made on the thread, with the same backoff as later ones).
    pub fn start(settings: PostgresSettings, caches: FleetCaches) -> Result<ChangeListener> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("warden-listen".into())
            .spawn(move || listen(&settings, &caches, &flag))
            .map_err(|e| {
                crate::error::Error::internal(format!("cannot start the change listener: {e}"))
            })?;
        Ok(ChangeListener {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ChangeListener {
    fn drop(&mut self) {
        // The thread ends within one POLL, or after a connection attempt in
        // progress; nobody waits for it (a daemon stopping while the store
        // is unreachable must not wait for a connect timeout).
        self.stop.store(true, Ordering::Release);
        drop(self.thread.take());
    }
}

/// Connects, listens, applies; reconnects with backoff until stopped.
fn listen(settings: &PostgresSettings, caches: &FleetCaches, stop: &AtomicBool) {
    let at = settings.describe();
    let health = crate::store::health::StoreHealth::of(&at);
    // The last change counter this node is known to be current with.
    let mut heard: Option<i64> = None;
    let mut backoff = BACKOFF_MIN;
    let mut connected_before = false;
    let mut failing_since: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let mut client = match settings.connect_listener().and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                .map_err(|e| crate::error::Error::internal(format!("{at}: LISTEN failed: {e}")))?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                if e.kind == crate::error::ErrorKind::Unavailable {
                    health.unreachable(&e.message);
                }
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(
                        "change listener cannot reach the store (retrying every {} s at most; changes made on other nodes apply here when it is back, or when a cached credential's cache_ttl + store.stale_if_error ends): {}",
                        BACKOFF_MAX.as_secs(),
                        e.message
                    );
                }
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        if let Some(since) = failing_since.take() {
            tracing::info!(
                "change listener reached the store again after {} ms",
                since.elapsed().as_millis()
            );
        }
        // LISTEN is in place: anything committed from now on is notified,
        // anything before shows in the counter.
        match read_counter(&mut client) {
            Ok(now) => {
                health.reachable();
                catch_up(caches, &mut heard, now, connected_before);
                if connected_before {
                    tracing::info!("change listener reconnected to the {at}");
                } else {
                    tracing::info!("change listener connected to the {at}: fleet changes apply here as they commit");
                }
                connected_before = true;
            }
            Err(e) => {
                tracing::warn!("change listener: {e}; reconnecting");
                continue;
            }
        }
        let mut reconciled = Instant::now();
        'connected: while !stop.load(Ordering::Acquire) {
            let mut notes = client.notifications();
            let mut waiting = notes.timeout_iter(POLL);
            loop {
                match waiting.next() {
                    Ok(Some(n)) => {
                        let notice = parse(n.payload());
                        receive(caches, &mut heard, &notice);
                        if reconciled.elapsed() >= RECONCILE_EVERY {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("change listener lost its connection: {e}; reconnecting");
                        break 'connected;
                    }
                }
            }
            drop(waiting);
            drop(notes);
            if client.is_closed() {
                tracing::warn!("change listener lost its connection; reconnecting");
                break;
            }
            if reconciled.elapsed() >= RECONCILE_EVERY {
                match read_counter(&mut client) {
                    Ok(now) => {
                        // Notifications that arrived with the answer first.
                        let pending: Vec<Notice> = client
                            .notifications()
                            .iter()
                            .map(|n| Ok(parse(n.payload())))
                            .collect()
                            .unwrap_or_default();
                        for notice in &pending {
                            receive(caches, &mut heard, notice);
                        }
                        health.reachable();
                        catch_up(caches, &mut heard, now, true);
                    }
                    Err(e) => {
                        tracing::warn!("change listener: {e}; reconnecting");
                        break;
                    }
                }
                reconciled = Instant::now();
            }
        }
    }
}

/// Applies one notification; a gap in the counters means some were missed.
fn receive(caches: &FleetCaches, heard: &mut Option<i64>, notice: &Notice) {
    if let (Some(c), Some(h)) = (notice.counter, *heard) {
        if c <= h {
            return; // already covered (e.g. by a reconciliation)
        }
        if c > h + 1 {
            tracing::warn!(
                "change listener: changes {}..{} were not heard of; invalidating everything",
                h + 1,
                c - 1
            );
            caches.everything();
            *heard = Some(c);
            return;
        }
    }
    tracing::debug!(change = ?notice.change, "fleet change");
    caches.apply(&notice.change);
    if let Some(c) = notice.counter {
        *heard = Some(c);
    }
}

/// The counter is at `now`: if this node has not heard of everything up to
/// it, invalidate everything (`log`: say so; the first connection of a
/// daemon just started has nothing stale to report).
fn catch_up(caches: &FleetCaches, heard: &mut Option<i64>, now: i64, log: bool) {
    if *heard == Some(now) {
        return;
    }
    if log {
        tracing::warn!(
            "reconciliation: the store's change counter is at {now}, this node heard of changes up to {}; invalidating everything",
            heard.map_or_else(|| "none".to_string(), |h| h.to_string())
        );
    }
    caches.everything();
    *heard = Some(now);
}

fn read_counter(client: &mut postgres::Client) -> std::result::Result<i64, String> {
    let row = client
        .query_one(READ_COUNTER, &[])
        .map_err(|e| format!("reading the change counter failed: {e}"))?;
    row.try_get::<_, i64>(0)
        .map_err(|e| format!("the change counter has an unexpected type: {e}"))
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        assert_eq!(
            parse("42:secret:orders-db/app/prod"),
            Notice {
                counter: Some(42),
                change: Change::Secret {
                    name: "orders-db/app".into(),
                    env: "prod".into()
                }
            }
        );
        assert_eq!(
            parse("7:meta:frozen_workloads").change,
            Change::Meta {
                key: "frozen_workloads".into()
            }
        );
        assert_eq!(parse("8:all:rewrap").change, Change::Everything);
        // Unknown or broken: anything may have changed.
        for odd in ["", "x", "9:lease:abc", "nan:secret:a/b", "3:secret:nopath"] {
            assert_eq!(parse(odd).change, Change::Everything, "{odd}");
        }
    }
}
