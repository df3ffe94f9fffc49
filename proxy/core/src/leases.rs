//! Dynamic credentials: one role per workload lease. The bookkeeping here
//! serves every route kind; the SQL below is PostgreSQL's, and another kind
//! (mysql) plugs in its own through a [`LeaseBackend`]
//! ([`LeaseTarget::Other`]): creating, renewing and dropping the account.
//!
//! A route whose `credential` has a `dynamic` table logs in with
//! `credential.user`/`credential.secret` as its *administrative* login and,
//! per lease, runs in one transaction
//!
//! ```sql
//! CREATE ROLE "warden_reports_3f9a…" LOGIN PASSWORD 'SCRAM-SHA-256$…'
//!     VALID UNTIL '…' ROLE <admin>;   -- admin becomes a member: it may terminate
//!                                    -- the role's sessions and DROP OWNED BY it
//! COMMENT ON ROLE … IS 'warden lease … for workload reports on route orders-db';
//! <the route's grants, {role} replaced by the quoted role name>
//! ```
//!
//! The password is 256 random bits from the system CSPRNG and never leaves
//! this process: the server gets a SCRAM verifier, the store gets a lease row
//! without it. Sessions of that workload log in as the lease's role (so
//! `pg_stat_activity` and the server log name the workload), the lease is
//! renewed (`ALTER ROLE … VALID UNTIL`) while sessions are open, up to
//! `max_ttl`, and revoked when it expires: sessions terminated, owned objects
//! reassigned or dropped, role dropped.
//!
//! Crash safety: the lease row is written (and fsynced) *before* CREATE ROLE,
//! so a role can never exist without its row. At start-up every row left by
//! another process is revoked: its password died with that process, so
//! nothing can use the role any more (no orphans).
//!
//! Store outage (fleet): a lease this process holds lives in its memory, so
//! sessions keep reusing it while the store is unreachable, until its expiry
//! as always. What the store should learn meanwhile — a renewal's new expiry,
//! a revocation's deleted row — is kept in memory and written when the store
//! answers again (every maintenance tick tries); the audit records of those
//! events go to the local log at once. A crash meanwhile loses nothing that
//! matters: the next process revokes every row of this one. A new lease needs
//! its row in the store first, so it is refused during an outage
//! ([`LeaseManager::store_outage`] names it); the administrative login uses
//! the last value of its secret read, so renewals and revocations (expiry
//! included) go on.
//!
//! Fleet: a lease belongs to the node whose process holds its password, so
//! only that node can revoke it. `warden lease revoke ID` on another node
//! writes a request (meta `lease-revoke/<id>`, naming the admin and the
//! asking node), which is announced to every node; the holder revokes the
//! lease as for a local `lease revoke` and deletes the request, and the
//! asking command returns once the lease row is gone (so the holder's next
//! session of that workload gets a new lease) — or after 10 s with an error
//! saying the holder has not done it yet (the request stays: the holder acts
//! on it when it runs, and checks for requests every 10 s anyway).

use crate::admission::Denial;
use crate::audit::{Actor, Decision, Event, Target};
use crate::authority::daemon_actor;
use crate::config::{Dynamic, GrantMode};
use crate::credentials::CredentialCache;
use crate::error::{Error, Result};
use crate::journal::{Entry, Journal};
use crate::metrics::Metrics;
use crate::peer::Attested;
use crate::pgwire::protocol::ErrorFields;
use crate::pgwire::scram::{self, ScramKeyCache};
use crate::pgwire::sql::{self, quote_ident, quote_literal, SqlError, SqlSession};
use crate::pgwire::upstream::{Login, UpstreamTarget};
use crate::service::SecretService;
use crate::store::health::{Outage, StoreHealth};
use crate::store::LeaseRow;
use base64::Engine;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// Meta keys of requests to revoke a lease another node of a fleet holds.
pub const REVOKE_REQUEST_PREFIX: &str = "lease-revoke/";
/// How long `warden lease revoke` waits for the node holding a lease.
const REMOTE_REVOKE_WAIT: Duration = Duration::from_secs(10);

/// A request to revoke a lease held by another node (no secret in it).
#[derive(serde::Serialize, serde::Deserialize)]
struct RevokeRequest {
    actor: Actor,
    from_node: String,
    at: String,
}

/// Marks an error where the admin session broke (the server may or may not
/// have run the statements). A [`LeaseBackend`] uses it too.
pub const LINK_FAILED: &str = "the administrative session failed";
/// Marks an error where the server refused a statement (and nothing of the
/// lease is left on it). A [`LeaseBackend`] uses it too.
pub const REFUSED: &str = "the database refused";
/// A lease row of this process that is not in memory (its creation broke
/// off) is swept after this long.
const STRAY_AFTER_SECS: i64 = 60;

/// Transaction-level advisory lock taken by every batch that changes ACLs
/// (grants at creation, DROP OWNED at revocation): concurrent GRANTs on the
/// same schema or table otherwise fail with "tuple concurrently updated".
/// Server-side, so it also orders several warden nodes on one database.
const GRANT_LOCK_KEY: i64 = 0x7761_7264_656e; // "warden"

/// Idle admin sessions kept per route.
const POOL_MAX: usize = 4;

/// A group role's grants are re-applied when older than this before a lease
/// is created, so tables created since are covered within a minute
/// (`ALTER DEFAULT PRIVILEGES … TO {role}` in the grants covers them at once).
const GROUP_REFRESH: Duration = Duration::from_secs(60);

/// The administrative login of a dynamic route, as a [`LeaseBackend`] gets
/// it: the route's `credential.user` and the current value of its secret.
pub struct AdminLogin {
    pub user: String,
    pub password: Zeroizing<Vec<u8>>,
    /// `secret vN` (for messages; never the value).
    pub label: String,
}

/// What a [`LeaseBackend`] call returns.
pub type LeaseFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

/// The per-kind part of dynamic credentials for a route kind other than
/// PostgreSQL (built in): creating, renewing and dropping one lease's
/// account on the server. The lease bookkeeping (rows, journal, audit,
/// renewal schedule, orphan sweep, `warden lease`) stays in
/// [`LeaseManager`]. Errors carry [`REFUSED`] when the server refused (and
/// nothing is left behind) or [`LINK_FAILED`] when the session broke.
pub trait LeaseBackend: Send + Sync {
    /// Creates `row.role` with `password`, with the route's privileges.
    fn create<'a>(
        &'a self,
        admin: &'a AdminLogin,
        row: &'a LeaseRow,
        password: &'a [u8],
    ) -> LeaseFuture<'a>;
    /// The lease now lasts until `until` (unix seconds).
    fn renew<'a>(&'a self, admin: &'a AdminLogin, row: &'a LeaseRow, until: i64)
        -> LeaseFuture<'a>;
    /// Drops `row.role` (if it exists) and ends its sessions.
    fn revoke<'a>(&'a self, admin: &'a AdminLogin, row: &'a LeaseRow) -> LeaseFuture<'a>;
}

/// Where a dynamic route's lease accounts live.
pub enum LeaseTarget {
    /// A PostgreSQL server (the SQL of this module).
    Postgres(UpstreamTarget),
    /// Another route kind's server, through its [`LeaseBackend`].
    Other(Arc<dyn LeaseBackend>),
}

/// A dynamic route's settings, resolved from the config.
pub struct DynamicSpec {
    pub route: String,
    pub target: LeaseTarget,
    pub admin_user: String,
    pub admin_secret: String,
    pub env: String,
    pub database: String,
    pub ttl: Duration,
    pub max_ttl: Duration,
    pub grants: Vec<String>,
    pub reassign_owned_to: Option<String>,
    pub role_prefix: String,
    pub cache_ttl: Duration,
    pub grant_mode: GrantMode,
    /// `<prefix><route>_grp<8 hex of SHA-256(grants)>`: a changed grants
    /// list gets a new group role, so privileges always match the config.
    pub group_role: String,
    pub scram_iterations: u32,
    /// Longest lease role name (PostgreSQL: 63 bytes).
    pub max_name: usize,
}

impl DynamicSpec {
    /// A route whose leases `backend` creates (a route kind other than
    /// PostgreSQL); `max_name` bounds the account names (`role_prefix`,
    /// workload, `_`, 8 hex).
    pub fn with_backend(
        route: &crate::config::Route,
        d: &Dynamic,
        backend: Arc<dyn LeaseBackend>,
        env: &str,
        cache_ttl: Duration,
        max_name: usize,
    ) -> Option<DynamicSpec> {
        let cred = route.credential.as_ref()?;
        Some(DynamicSpec {
            route: route.name.clone(),
            target: LeaseTarget::Other(backend),
            admin_user: cred.user.clone(),
            admin_secret: cred.secret.clone(),
            env: env.to_string(),
            database: String::new(),
            ttl: d.ttl(),
            max_ttl: d.max_ttl(),
            grants: d.grants.clone(),
            reassign_owned_to: None,
            role_prefix: d.role_prefix().to_string(),
            cache_ttl,
            // No group role: the backend applies the route's privileges.
            grant_mode: GrantMode::PerLease,
            group_role: String::new(),
            scram_iterations: d.scram_iterations(),
            max_name,
        })
    }

    fn backend(&self) -> Option<&Arc<dyn LeaseBackend>> {
        match &self.target {
            LeaseTarget::Other(b) => Some(b),
            LeaseTarget::Postgres(_) => None,
        }
    }

    pub fn new(
        route: &crate::config::Route,
        d: &Dynamic,
        target: UpstreamTarget,
        env: &str,
        cache_ttl: Duration,
    ) -> Option<DynamicSpec> {
        let cred = route.credential.as_ref()?;
        Some(DynamicSpec {
            route: route.name.clone(),
            target: LeaseTarget::Postgres(target),
            admin_user: cred.user.clone(),
            admin_secret: cred.secret.clone(),
            env: env.to_string(),
            database: d
                .database
                .clone()
                .or_else(|| route.databases.first().cloned())
                .unwrap_or_else(|| "postgres".into()),
            ttl: d.ttl(),
            max_ttl: d.max_ttl(),
            grants: d.grants.clone(),
            reassign_owned_to: d.reassign_owned_to.clone(),
            role_prefix: d.role_prefix().to_string(),
            cache_ttl,
            grant_mode: d.grant_mode,
            group_role: group_role_name(d.role_prefix(), &route.name, &d.grants),
            scram_iterations: d.scram_iterations(),
            max_name: 63,
        })
    }
}

/// A session's lease on a route whose backend is not PostgreSQL (mysql,
/// redis): the account it logs in as, and its password. The lease's session
/// count drops when this does.
pub struct Leased {
    pub id: String,
    pub user: String,
    pub password: Zeroizing<Vec<u8>>,
    leases: Arc<LeaseManager>,
}

impl Leased {
    /// The pool key's label: per workload and lease (a newer lease of the
    /// workload supersedes the older one's idle connections; other
    /// workloads' stay), never the password.
    pub fn label(&self, workload: &str) -> String {
        format!("lease {workload} {}", self.id)
    }

    /// Whether the lease is still held (a revoked one's connection is not
    /// pooled).
    pub fn held(&self) -> bool {
        self.leases.is_held(&self.id)
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        self.leases.release(&self.id);
    }
}

/// A lease for `who` on the dynamic route `route` (a [`LeaseBackend`]
/// route): the current one, or a new account. A failure is a
/// [`Denial::NoLease`] (or [`Denial::Sealed`]), which the caller refuses in
/// its protocol, counts and records.
pub async fn lease_for_session(
    leases: Option<&Arc<LeaseManager>>,
    route: &str,
    who: &Attested,
) -> std::result::Result<Leased, Denial> {
    let no_lease = |reason: String| Denial::NoLease {
        route: route.to_string(),
        workload: who.workload.clone(),
        reason,
    };
    let Some(leases) = leases else {
        return Err(no_lease(
            "dynamic credentials are not running in this process".into(),
        ));
    };
    // SCRAM keys are PostgreSQL's; these backends need none.
    let scram = ScramKeyCache::with_capacity(1);
    let ticket =
        Box::pin(leases.acquire(route, &who.workload, crate::peer::actor(Some(who)), &scram))
            .await
            .map_err(|e| match e.kind {
                crate::error::ErrorKind::Sealed => Denial::Sealed {
                    route: route.to_string(),
                    reason: e.message,
                },
                _ => no_lease(e.message),
            })?;
    Ok(Leased {
        id: ticket.id.clone(),
        user: ticket.role.clone(),
        password: ticket.password.clone(),
        leases: leases.clone(),
    })
}

/// What a session needs to log in with a lease.
pub struct LeaseTicket {
    pub id: String,
    pub role: String,
    pub password: Zeroizing<Vec<u8>>,
    /// The count in the role's verifier (the SCRAM client's floor for it).
    pub scram_iterations: u32,
}

impl LeaseTicket {
    /// The SCRAM cache tag (also shown in messages): never the password.
    pub fn label(&self) -> String {
        format!("lease {}", self.id)
    }
}

struct Lease {
    row: LeaseRow,
    password: Zeroizing<Vec<u8>>,
    scram_iterations: u32,
    sessions: usize,
}

/// (route, workload).
type LeaseKey = (String, String);

/// Every lease this process holds, and the admin connections that manage them.
pub struct LeaseManager {
    specs: HashMap<String, Arc<DynamicSpec>>,
    service: Arc<Mutex<SecretService>>,
    credentials: Arc<CredentialCache>,
    metrics: Option<Metrics>,
    leases: Mutex<HashMap<String, Lease>>,
    /// (route, workload) → the lease new sessions get.
    current: Mutex<HashMap<LeaseKey, String>>,
    /// Serialises lease creation per (route, workload).
    creating: Mutex<HashMap<LeaseKey, Arc<tokio::sync::Mutex<()>>>>,
    pool: Mutex<HashMap<String, Vec<SqlSession>>>,
    /// Group commit of lease rows and lease records; None without dynamic
    /// routes (or if its thread could not be started).
    journal: Option<Journal>,
    /// Group-mode routes → when their group role's grants were last applied.
    groups: HashMap<String, tokio::sync::Mutex<Option<std::time::Instant>>>,
    /// The shared store's reachability (fleet), None on SQLite.
    health: Option<Arc<StoreHealth>>,
    /// Lease rows the store has not heard of yet because it was unreachable:
    /// id → the row to write (a renewal) or None (deleted by a revocation).
    unsynced: Mutex<HashMap<String, Option<LeaseRow>>>,
}

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn timestamp_literal(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    // `+00` keeps the server's TimeZone setting out of it.
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut raw = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut raw)
        .map_err(|_| Error::internal("the system random generator failed"))?;
    Ok(hex::encode(raw))
}

/// A lease password: 32 random bytes, base64url (43 ASCII characters).
pub fn random_password() -> Result<Zeroizing<Vec<u8>>> {
    let mut raw = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut raw[..])
        .map_err(|_| Error::internal("the system random generator failed"))?;
    Ok(Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(&raw[..])
            .into_bytes(),
    ))
}

/// `<prefix><workload>_<8 hex>`, at most 63 bytes, lowercase, `-` → `_`.
pub fn role_name(prefix: &str, workload: &str, suffix: &str) -> String {
    role_name_within(prefix, workload, suffix, 63)
}

/// [`role_name`] of at most `max` bytes (the workload part is cut).
pub fn role_name_within(prefix: &str, workload: &str, suffix: &str, max: usize) -> String {
    let w: String = workload
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let room = max.saturating_sub(prefix.len() + 1 + suffix.len());
    let w: String = w.chars().take(room).collect();
    format!("{prefix}{w}_{suffix}")
}

fn server_error_text(e: &ErrorFields) -> String {
    format!(
        "{} {}",
        e.code().unwrap_or("?????"),
        e.message().unwrap_or("")
    )
}

fn lease_event(
    actor: Actor,
    action: &str,
    row: &LeaseRow,
    decision: Decision,
    reason: String,
) -> Event {
    Event {
        actor,
        action: action.into(),
        target: Target {
            route: Some(row.route.clone()),
            detail: Some(format!(
                "lease {} role {} workload {}",
                row.id, row.role, row.workload
            )),
            ..Target::default()
        },
        decision,
        reason,
    }
}

/// `<prefix><route>_grp<8 hex>`, at most 63 bytes; the hex is the start of
/// SHA-256 over the grants. Never a lease role's name: those end in
/// `_<8 hex>`, and `grp…` is not hex.
pub fn group_role_name(prefix: &str, route: &str, grants: &[String]) -> String {
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, grants.join("\n").as_bytes());
    let tag = format!("grp{}", hex::encode(&digest.as_ref()[..4]));
    role_name(prefix, route, &tag)
}

/// The one transaction that creates a lease's role: CREATE ROLE with a SCRAM
/// verifier of `password` (never the password itself) and the comment; in
/// `group` mode the role joins the route's group role, in `per_lease` mode
/// the grants follow (under the ACL lock).
fn create_sql(
    spec: &DynamicSpec,
    row: &LeaseRow,
    password: &[u8],
    label: &str,
    scram: &ScramKeyCache,
) -> Result<Zeroizing<String>> {
    let verifier = scram::verifier(scram, label, password, spec.scram_iterations)
        .ok_or_else(|| Error::internal("the system random generator failed"))?;
    let (
        Some(q_role),
        Some(q_admin),
        Some(q_group),
        Some(q_verifier),
        Some(q_until),
        Some(q_comment),
    ) = (
        quote_ident(&row.role),
        quote_ident(&spec.admin_user),
        quote_ident(&spec.group_role),
        quote_literal(&verifier),
        quote_literal(&timestamp_literal(row.expires_at)),
        quote_literal(&format!(
            "warden lease {} for workload {} on route {}",
            row.id, row.workload, spec.route
        )),
    )
    else {
        return Err(Error::internal("lease names could not be quoted"));
    };
    let text = match spec.grant_mode {
        // No shared catalog row changes: creations run concurrently.
        GrantMode::Group => Zeroizing::new(format!(
            "CREATE ROLE {q_role} LOGIN PASSWORD {q_verifier} VALID UNTIL {q_until} IN ROLE {q_group} ROLE {q_admin};\nCOMMENT ON ROLE {q_role} IS {q_comment};\n"
        )),
        GrantMode::PerLease => {
            let mut text = Zeroizing::new(format!(
                "SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY});\nCREATE ROLE {q_role} LOGIN PASSWORD {q_verifier} VALID UNTIL {q_until} ROLE {q_admin};\nCOMMENT ON ROLE {q_role} IS {q_comment};\n"
            ));
            text.push_str(&grants_sql(&spec.grants, &q_role));
            text
        }
    };
    Ok(text)
}

/// The grant templates for `q_role` (quoted), one statement a line.
fn grants_sql(grants: &[String], q_role: &str) -> String {
    let mut text = String::new();
    for g in grants {
        text.push_str(&g.replace("{role}", q_role));
        text.push_str(";\n");
    }
    text
}

impl LeaseManager {
    pub fn new(
        specs: Vec<DynamicSpec>,
        service: Arc<Mutex<SecretService>>,
        credentials: Arc<CredentialCache>,
        metrics: Option<Metrics>,
    ) -> LeaseManager {
        let groups = specs
            .iter()
            .filter(|s| s.grant_mode == GrantMode::Group)
            .map(|s| (s.route.clone(), tokio::sync::Mutex::new(None)))
            .collect();
        let journal = (!specs.is_empty())
            .then(|| Journal::start(service.clone(), "warden-leases", None).ok())
            .flatten();
        LeaseManager {
            specs: specs
                .into_iter()
                .map(|s| (s.route.clone(), Arc::new(s)))
                .collect(),
            service,
            credentials,
            metrics,
            leases: Mutex::new(HashMap::new()),
            current: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            journal,
            groups,
            health: None,
            unsynced: Mutex::new(HashMap::new()),
        }
    }

    /// Tells the manager the shared store's health (fleet): lease row writes
    /// that fail while it is unreachable are caught up later, and
    /// [`store_outage`](Self::store_outage) answers.
    pub fn with_store_health(mut self, health: Option<Arc<StoreHealth>>) -> LeaseManager {
        self.health = health;
        self
    }

    /// The shared store's description and ongoing outage, if it is unreachable.
    pub fn store_outage(&self) -> Option<(String, Outage)> {
        let h = self.health.as_ref()?;
        h.outage().map(|o| (h.at().to_string(), o))
    }

    /// Whether `e` is the store being unreachable (a write to retry later):
    /// a failed connection, or one lost as the server stopped.
    pub fn is_outage(&self, e: &Error) -> bool {
        let lost = e.kind == crate::error::ErrorKind::Unavailable
            || (e.kind == crate::error::ErrorKind::Internal
                && e.message.contains("the connection was lost"));
        lost && self.store_outage().is_some()
    }

    /// Writes a renewed lease row; while the store is unreachable it is kept
    /// for [`sync_unsynced`](Self::sync_unsynced).
    fn store_put(&self, row: &LeaseRow) {
        match self.with_service(|s| s.lease_put(row)) {
            Ok(()) => {}
            Err(e) if self.is_outage(&e) => {
                if let Ok(mut u) = self.unsynced.lock() {
                    u.insert(row.id.clone(), Some(row.clone()));
                }
            }
            Err(e) => tracing::warn!(lease = %row.id, "lease row not updated: {}", e.message),
        }
    }

    /// Deletes a revoked lease's row. `Ok(true)`: the store is unreachable,
    /// the deletion waits for [`sync_unsynced`](Self::sync_unsynced).
    fn store_delete(&self, id: &str) -> Result<bool> {
        match self.with_service(|s| s.lease_delete(id)) {
            Ok(()) => {
                if let Ok(mut u) = self.unsynced.lock() {
                    u.remove(id);
                }
                Ok(false)
            }
            Err(e) if self.is_outage(&e) => {
                if let Ok(mut u) = self.unsynced.lock() {
                    u.insert(id.to_string(), None);
                }
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes what the store missed while it was unreachable (renewals,
    /// deleted rows); stops at the first failure (retried next tick).
    /// Returns how many are still waiting.
    pub fn sync_unsynced(&self) -> usize {
        let waiting: Vec<(String, Option<LeaseRow>)> = match self.unsynced.lock() {
            Ok(u) => u.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => return 0,
        };
        let total = waiting.len();
        // Known to be down: the change listener notices its return (within
        // 5 s); no connection attempt under the service lock every tick.
        if total == 0 || self.store_outage().is_some() {
            return total;
        }
        let mut done = 0;
        for (id, row) in waiting {
            let res = match &row {
                Some(r) => self.with_service(|s| s.lease_put(r)),
                None => self.with_service(|s| s.lease_delete(&id)),
            };
            match res {
                Ok(()) => {
                    done += 1;
                    if let Ok(mut u) = self.unsynced.lock() {
                        // Unless something newer replaced it meanwhile.
                        let expiry = |v: &Option<LeaseRow>| v.as_ref().map(|r| r.expires_at);
                        if u.get(&id).is_some_and(|v| expiry(v) == expiry(&row)) {
                            u.remove(&id);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(lease = %id, "lease row not caught up yet: {}", e.message);
                    break;
                }
            }
        }
        if done > 0 {
            tracing::info!(
                "caught up {done} lease row change(s) the store missed while it was unreachable"
            );
        }
        total - done
    }

    /// Makes `entry` durable, batched with whatever other leases queue
    /// meanwhile (see [`crate::journal`]); returns once it is on disk.
    async fn commit(&self, entry: Entry) -> Result<()> {
        self.journal
            .as_ref()
            .ok_or_else(|| Error::internal("the lease journal is not running"))?
            .write(entry, true)
            .await
    }

    /// The lease's creation record, through the group commit.
    async fn audit_created(&self, actor: Actor, row: &LeaseRow) -> Result<()> {
        self.commit(Entry::Audit(lease_event(
            actor,
            "lease.create",
            row,
            Decision::Allow,
            format!(
                "role created, valid until {} (max {})",
                timestamp_literal(row.expires_at),
                timestamp_literal(row.max_expires_at)
            ),
        )))
        .await
    }

    /// Makes sure the route's group role exists and holds the grants
    /// (re-applied when older than [`GROUP_REFRESH`]). No-op in `per_lease` mode.
    async fn ensure_group(&self, spec: &DynamicSpec, scram: &ScramKeyCache) -> Result<()> {
        let Some(state) = self.groups.get(&spec.route) else {
            return Ok(());
        };
        let mut applied = state.lock().await;
        if applied.is_some_and(|t| t.elapsed() < GROUP_REFRESH) {
            return Ok(());
        }
        let (Some(q_group), Some(q_admin), Some(l_group), Some(q_comment)) = (
            quote_ident(&spec.group_role),
            quote_ident(&spec.admin_user),
            quote_literal(&spec.group_role),
            quote_literal(&format!(
                "warden: the grants of dynamic route {}; its lease roles are members",
                spec.route
            )),
        ) else {
            return Err(Error::internal("group role name cannot be quoted"));
        };
        let exists = self
            .admin_execute(
                spec,
                scram,
                &format!("SELECT 1 FROM pg_roles WHERE rolname = {l_group}"),
            )
            .await?;
        if exists.is_empty() {
            match self
                .admin_execute(
                    spec,
                    scram,
                    // The admin is a member, so it may DROP OWNED BY the group
                    // once a changed grants list retires it.
                    &format!("CREATE ROLE {q_group} NOLOGIN ROLE {q_admin};\nCOMMENT ON ROLE {q_group} IS {q_comment}"),
                )
                .await
            {
                Ok(_) => tracing::info!(route = %spec.route, role = %spec.group_role, "created the route's group role"),
                // Another warden node created it first.
                Err(e) if e.message.contains("42710") => {}
                Err(e) => return Err(e),
            }
        }
        let text = format!(
            "SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY});\n{}",
            grants_sql(&spec.grants, &q_group)
        );
        self.admin_execute(spec, scram, &text).await?;
        *applied = Some(std::time::Instant::now());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Store and audit work under the service lock (see [`crate::service::blocking`]).
    fn with_service<T>(&self, f: impl FnOnce(&mut SecretService) -> Result<T>) -> Result<T> {
        crate::service::blocking(&self.service, f)
    }

    fn audit(
        &self,
        actor: Actor,
        action: &str,
        row: &LeaseRow,
        decision: Decision,
        reason: String,
    ) -> Result<()> {
        let event = lease_event(actor, action, row, decision, reason);
        self.with_service(|s| s.record(&event))
    }

    fn update_gauge(&self) {
        if let (Some(m), Ok(l)) = (&self.metrics, self.leases.lock()) {
            m.set_leases_active(l.len());
        }
    }

    /// An admin session for `spec`: pooled, or a new login.
    async fn admin(&self, spec: &DynamicSpec, scram: &ScramKeyCache) -> Result<SqlSession> {
        if let Some(s) = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(&spec.route).and_then(Vec::pop))
        {
            return Ok(s);
        }
        let LeaseTarget::Postgres(target) = &spec.target else {
            return Err(Error::internal(format!(
                "route {:?}: not a PostgreSQL dynamic route",
                spec.route
            )));
        };
        let admin = self.admin_login(spec).await?;
        let login = Login {
            user: admin.user,
            password: admin.password,
            secret_label: admin.label,
            scram_min_iterations: scram::MIN_ITERATIONS,
        };
        SqlSession::connect(target, &spec.database, &login, scram)
            .await
            .map_err(|f| {
                Error::unavailable(format!(
                    "route {:?}: the administrative login {:?} (secret {}) failed: {}",
                    spec.route,
                    spec.admin_user,
                    login.secret_label,
                    sql::describe_failure(&f)
                ))
            })
    }

    /// The administrative login of `spec`: its user and the secret's value
    /// (the last one read while the store is unreachable).
    async fn admin_login(&self, spec: &DynamicSpec) -> Result<AdminLogin> {
        let crate::credentials::SecretValue {
            version,
            value: password,
            ..
        } = {
            let (svc, creds, spec_secret, env, ttl) = (
                self.service.clone(),
                self.credentials.clone(),
                spec.admin_secret.clone(),
                spec.env.clone(),
                spec.cache_ttl,
            );
            let fetched = tokio::task::spawn_blocking(move || {
                creds.get(&spec_secret, &env, ttl, |name, env| {
                    svc.lock()
                        .map_err(|_| Error::internal("service state poisoned"))?
                        .fetch_for_injection(name, env)
                })
            })
            .await
            .map_err(|e| Error::internal(format!("credential lookup failed: {e}")))?;
            match fetched {
                // The store is unreachable: the last value read still
                // renews and revokes leases (expiry goes on during an
                // outage); a value changed meanwhile just fails the login.
                Err(e) if self.is_outage(&e) => self
                    .credentials
                    .cached_stale(&spec.admin_secret, &spec.env, Duration::MAX)
                    .map(|(v, _)| v)
                    .ok_or(e)?,
                r => r?,
            }
        };
        Ok(AdminLogin {
            user: spec.admin_user.clone(),
            password,
            label: format!("{} v{version}", spec.admin_secret),
        })
    }

    fn give_back(&self, route: &str, s: SqlSession) {
        if let Ok(mut p) = self.pool.lock() {
            let v = p.entry(route.to_string()).or_default();
            if v.len() < POOL_MAX {
                v.push(s);
            }
        }
    }

    /// Runs `sql` on an admin session of `spec`.
    async fn admin_execute(
        &self,
        spec: &DynamicSpec,
        scram: &ScramKeyCache,
        text: &str,
    ) -> Result<sql::Rows> {
        let s = self.admin(spec, scram).await?;
        self.run_on(spec, s, text).await
    }

    /// Runs `text` on `s`, returning the session to the pool unless it broke.
    async fn run_on(&self, spec: &DynamicSpec, mut s: SqlSession, text: &str) -> Result<sql::Rows> {
        match s.execute(text).await {
            Ok(rows) => {
                self.give_back(&spec.route, s);
                Ok(rows)
            }
            Err(SqlError::Server(e)) => {
                self.give_back(&spec.route, s);
                Err(Error::unavailable(format!(
                    "route {:?}: {REFUSED}: {}",
                    spec.route,
                    server_error_text(&e)
                )))
            }
            Err(e @ SqlError::Link(_)) => Err(Error::unavailable(format!(
                "route {:?}: {LINK_FAILED}: {e}",
                spec.route
            ))),
        }
    }

    /// A lease for `workload` on `route`: the current one when it has time
    /// left, else a new role. The caller calls [`release`](Self::release)
    /// when its session ends.
    pub async fn acquire(
        &self,
        route: &str,
        workload: &str,
        actor: Actor,
        scram: &ScramKeyCache,
    ) -> Result<LeaseTicket> {
        let spec =
            self.specs.get(route).cloned().ok_or_else(|| {
                Error::internal(format!("route {route:?} has no dynamic credential"))
            })?;
        let key = (route.to_string(), workload.to_string());
        let gate = {
            let mut c = self
                .creating
                .lock()
                .map_err(|_| Error::internal("lease state poisoned"))?;
            c.entry(key.clone()).or_default().clone()
        };
        let _guard = gate.lock().await;
        let margin = (spec.ttl.as_secs() as i64 / 10).max(1);
        if let Some(t) = self.reuse(&key, margin) {
            return Ok(t);
        }
        let ticket = match self.create(&spec, workload, actor.clone(), scram).await {
            // A pooled admin session may have died with a server restart: one
            // more try on a fresh login, under a new role name (a role the
            // broken attempt may have created keeps its row; the sweep drops it).
            Err(e) if e.message.contains(LINK_FAILED) => {
                tracing::warn!(route = %route, "lease creation failed ({}); retrying once", e.message);
                self.create(&spec, workload, actor, scram).await?
            }
            r => r?,
        };
        if let Ok(mut c) = self.current.lock() {
            c.insert(key, ticket.id.clone());
        }
        Ok(ticket)
    }

    fn reuse(&self, key: &LeaseKey, margin: i64) -> Option<LeaseTicket> {
        let id = self.current.lock().ok()?.get(key)?.clone();
        let mut leases = self.leases.lock().ok()?;
        let l = leases.get_mut(&id)?;
        let now = now_unix();
        if l.row.expires_at - now <= margin || l.row.max_expires_at - now <= margin {
            return None;
        }
        l.sessions += 1;
        Some(LeaseTicket {
            id: l.row.id.clone(),
            role: l.row.role.clone(),
            password: l.password.clone(),
            scram_iterations: l.scram_iterations,
        })
    }

    /// Creates a role for a new lease (see the module documentation).
    pub async fn create(
        &self,
        spec: &DynamicSpec,
        workload: &str,
        actor: Actor,
        scram: &ScramKeyCache,
    ) -> Result<LeaseTicket> {
        let suffix = random_hex(4)?;
        let id = format!("{}-{}", spec.route, random_hex(8)?);
        let role = role_name_within(&spec.role_prefix, workload, &suffix, spec.max_name);
        let now = now_unix();
        let ttl = spec.ttl.as_secs() as i64;
        let max = now + spec.max_ttl.as_secs() as i64;
        let row = LeaseRow {
            id: id.clone(),
            route: spec.route.clone(),
            workload: workload.to_string(),
            role: role.clone(),
            state: "creating".into(),
            owner_pid: std::process::id(),
            created_at: now,
            expires_at: (now + ttl).min(max),
            max_expires_at: max,
        };
        let password = random_password()?;
        let ticket = LeaseTicket {
            id: id.clone(),
            role: role.clone(),
            password: password.clone(),
            scram_iterations: spec.scram_iterations,
        };
        if let Some(backend) = spec.backend() {
            self.create_with(spec, backend.as_ref(), &row, &password, actor.clone())
                .await?;
        } else {
            self.create_pg(spec, &row, &password, &ticket, actor.clone(), scram)
                .await?;
        }
        let mut active = row.clone();
        active.state = "active".into();
        if let Err(e) = self.audit_created(actor, &active).await {
            // Fail closed: no audit record, no credential.
            let _ = self
                .revoke_row(
                    spec,
                    &active,
                    scram,
                    "the audit record could not be written",
                )
                .await;
            return Err(e);
        }
        if let Ok(mut l) = self.leases.lock() {
            l.insert(
                id.clone(),
                Lease {
                    row: active,
                    password,
                    scram_iterations: spec.scram_iterations,
                    sessions: 1,
                },
            );
        }
        if let Some(m) = &self.metrics {
            m.lease_created();
        }
        self.update_gauge();
        Ok(ticket)
    }

    /// A lease's account through a [`LeaseBackend`]: the row first (as for
    /// PostgreSQL), then the backend's statements.
    async fn create_with(
        &self,
        spec: &DynamicSpec,
        backend: &dyn LeaseBackend,
        row: &LeaseRow,
        password: &[u8],
        actor: Actor,
    ) -> Result<()> {
        let fail = |e: Error| {
            let _ = self.audit(
                actor.clone(),
                "lease.create",
                row,
                Decision::Error,
                e.message.clone(),
            );
            e
        };
        let admin = self.admin_login(spec).await.map_err(fail)?;
        if let Err(e) = self.commit(Entry::LeaseRow(row.clone())).await {
            let _ = self.audit(
                actor.clone(),
                "lease.create",
                row,
                Decision::Error,
                format!(
                    "the lease row could not be written to the store: {}",
                    e.message
                ),
            );
            return Err(e);
        }
        if let Err(e) = backend.create(&admin, row, password).await {
            // A refusal left nothing behind: no row either. A broken link
            // leaves the row for the sweeper.
            if e.message.contains(REFUSED) {
                let _ = self.with_service(|s| s.lease_delete(&row.id));
            }
            return Err(fail(e));
        }
        Ok(())
    }

    /// A lease's role on a PostgreSQL route (see the module documentation).
    async fn create_pg(
        &self,
        spec: &DynamicSpec,
        row: &LeaseRow,
        password: &[u8],
        ticket: &LeaseTicket,
        actor: Actor,
        scram: &ScramKeyCache,
    ) -> Result<()> {
        let (row, id) = (row.clone(), row.id.clone());
        let text = create_sql(spec, &row, password, &ticket.label(), scram)?;
        let ready = match self.ensure_group(spec, scram).await {
            Ok(()) => self.admin(spec, scram).await,
            Err(e) => Err(e),
        };
        let session = match ready {
            Ok(s) => s,
            Err(e) => {
                let _ = self.audit(
                    actor,
                    "lease.create",
                    &row,
                    Decision::Error,
                    e.message.clone(),
                );
                return Err(e);
            }
        };
        // Write-ahead: the row exists before the role can (so no new lease
        // while the store is unreachable).
        if let Err(e) = self.commit(Entry::LeaseRow(row.clone())).await {
            self.give_back(&spec.route, session);
            let _ = self.audit(
                actor,
                "lease.create",
                &row,
                Decision::Error,
                format!(
                    "the lease row could not be written to the store: {}",
                    e.message
                ),
            );
            return Err(e);
        }
        match self.run_on(spec, session, &text).await {
            Ok(_) => {}
            Err(e) => {
                // A refused batch was rolled back: no role, no row. A broken
                // link leaves the row for the sweeper (DROP ROLE IF EXISTS).
                if e.message.contains(REFUSED) {
                    let _ = self.with_service(|s| s.lease_delete(&id));
                }
                let _ = self.audit(
                    actor,
                    "lease.create",
                    &row,
                    Decision::Error,
                    e.message.clone(),
                );
                return Err(e);
            }
        }
        Ok(())
    }

    /// A session that used `id` ended.
    pub fn release(&self, id: &str) {
        if let Ok(mut l) = self.leases.lock() {
            if let Some(lease) = l.get_mut(id) {
                lease.sessions = lease.sessions.saturating_sub(1);
            }
        }
    }

    /// Drops the lease's role: terminate its sessions, reassign or drop what
    /// it owns, drop it; then the row goes. An error keeps the row (retried).
    async fn revoke_row(
        &self,
        spec: &DynamicSpec,
        row: &LeaseRow,
        scram: &ScramKeyCache,
        why: &str,
    ) -> Result<()> {
        self.revoke_row_as(spec, row, scram, why, daemon_actor())
            .await
    }

    /// Revokes lease `id` now (`warden lease revoke`): its sessions end, its
    /// role is dropped, the record names `actor`. The workload's next session
    /// gets a new lease.
    pub async fn revoke(&self, id: &str, actor: Actor) -> Result<LeaseInfo> {
        let Some(info) = self.list().into_iter().find(|l| l.id == id) else {
            return self.revoke_on_holder(id, actor).await;
        };
        let row = self
            .leases
            .lock()
            .map_err(|_| Error::internal("lease state poisoned"))?
            .get(id)
            .map(|l| l.row.clone())
            .ok_or_else(|| Error::not_found(format!("lease {id:?} ended meanwhile")))?;
        let spec = self
            .specs
            .get(&row.route)
            .cloned()
            .ok_or_else(|| Error::internal("lease of an unknown route"))?;
        let scram = ScramKeyCache::with_capacity(4);
        self.revoke_row_as(
            &spec,
            &row,
            &scram,
            "revoked by an admin (`warden lease revoke`)",
            actor,
        )
        .await?;
        Ok(info)
    }

    /// `warden lease revoke` for a lease this process does not hold: on a
    /// fleet, asks the node that holds it and waits until it revoked it (see
    /// the module documentation).
    async fn revoke_on_holder(&self, id: &str, actor: Actor) -> Result<LeaseInfo> {
        let not_held = || {
            Error::not_found(format!(
                "no lease {id:?} is held by the daemon; `warden lease list` shows the leases"
            ))
        };
        let (found, me) = self.with_service(|s| Ok((s.lease_of_any_node(id)?, s.fleet_node())))?;
        let (Some((node, row)), Some(me)) = (found, me) else {
            return Err(not_held());
        };
        if node == me {
            return Err(Error::not_found(format!(
                "lease {id:?} was left by an earlier warden process on this node; the orphan sweep revokes it within 30 s"
            )));
        }
        let request = RevokeRequest {
            actor: actor.clone(),
            from_node: me.clone(),
            at: crate::timefmt::now_rfc3339(),
        };
        let json = serde_json::to_string(&request)
            .map_err(|e| Error::internal(format!("lease revocation request: {e}")))?;
        let key = format!("{REVOKE_REQUEST_PREFIX}{id}");
        self.with_service(|s| s.meta_set(&key, &json))?;
        let _ = self.audit(
            actor,
            "lease.revoke.request",
            &row,
            Decision::Allow,
            format!("asked node {node}, which holds the lease, to revoke it"),
        );
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.with_service(|s| s.lease_of_any_node(id))?.is_none() {
                break;
            }
            if started.elapsed() >= REMOTE_REVOKE_WAIT {
                return Err(Error::unavailable(format!(
                    "lease {id:?} is held by node {node}, which has not revoked it within {} s: is its daemon running? The request stays in the store; the node revokes the lease as soon as it runs (and a restarted node revokes all its earlier leases)",
                    REMOTE_REVOKE_WAIT.as_secs()
                )));
            }
        }
        Ok(LeaseInfo {
            id: row.id,
            route: row.route,
            workload: row.workload,
            role: row.role,
            sessions: 0,
            expires_at: crate::timefmt::format_rfc3339(
                time::OffsetDateTime::from_unix_timestamp(row.expires_at)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            ),
            node: Some(node),
        })
    }

    /// Revokes the leases this process holds that an admin on another node
    /// asked to revoke (fleet); clears requests for leases no node holds any
    /// more. Returns how many it revoked.
    pub async fn revoke_requested(&self, scram: &ScramKeyCache) -> usize {
        let requests = match self.with_service(|s| s.meta_list(REVOKE_REQUEST_PREFIX)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("lease revocation requests not read: {}", e.message);
                return 0;
            }
        };
        let mut n = 0;
        for (key, json) in requests {
            let id = &key[REVOKE_REQUEST_PREFIX.len()..];
            let row = self
                .leases
                .lock()
                .ok()
                .and_then(|l| l.get(id).map(|x| x.row.clone()));
            let Some(row) = row else {
                if let Ok(None) = self.with_service(|s| s.lease_of_any_node(id)) {
                    let _ = self.with_service(|s| s.meta_delete(&key));
                }
                continue;
            };
            let Some(spec) = self.specs.get(&row.route).cloned() else {
                continue;
            };
            let (actor, why) = match serde_json::from_str::<RevokeRequest>(&json) {
                Ok(r) => (
                    r.actor,
                    format!(
                        "revoked by an admin on node {} (`warden lease revoke`)",
                        r.from_node
                    ),
                ),
                Err(_) => (
                    daemon_actor(),
                    "revoked on request of another node (`warden lease revoke`)".to_string(),
                ),
            };
            match self.revoke_row_as(&spec, &row, scram, &why, actor).await {
                Ok(()) => {
                    n += 1;
                    let _ = self.with_service(|s| s.meta_delete(&key));
                }
                Err(e) => {
                    tracing::warn!(lease = %row.id, "requested lease revocation failed (retrying): {}", e.message)
                }
            }
        }
        n
    }

    async fn revoke_row_as(
        &self,
        spec: &DynamicSpec,
        row: &LeaseRow,
        scram: &ScramKeyCache,
        why: &str,
        actor: Actor,
    ) -> Result<()> {
        match spec.backend() {
            Some(backend) => {
                let admin = self.admin_login(spec).await?;
                backend.revoke(&admin, row).await?;
            }
            None => self.drop_pg_role(spec, row, scram).await?,
        }
        // No session picks the lease any more before its row goes (a node
        // that asked for the revocation waits for the row to go).
        if let Ok(mut c) = self.current.lock() {
            c.retain(|_, v| v != &row.id);
        }
        // The role is gone: so is the lease, even if the store cannot hear
        // of it yet (its row is deleted once it is reachable again).
        let deferred = self.store_delete(&row.id)?;
        if let Ok(mut l) = self.leases.lock() {
            l.remove(&row.id);
        }
        let why = if deferred {
            format!("{why}; the store is unreachable: its lease row is deleted once it is back")
        } else {
            why.to_string()
        };
        let _ = self.audit(actor, "lease.revoke", row, Decision::Allow, why);
        if let Some(m) = &self.metrics {
            m.lease_revoked();
        }
        self.update_gauge();
        Ok(())
    }

    /// A PostgreSQL lease role's end: its sessions terminated, what it owns
    /// reassigned or dropped, the role dropped.
    async fn drop_pg_role(
        &self,
        spec: &DynamicSpec,
        row: &LeaseRow,
        scram: &ScramKeyCache,
    ) -> Result<()> {
        let (Some(q_role), Some(l_role)) = (quote_ident(&row.role), quote_literal(&row.role))
        else {
            return Err(Error::internal("lease role name cannot be quoted"));
        };
        let exists = self
            .admin_execute(
                spec,
                scram,
                &format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {l_role} AND pid <> pg_backend_pid();\nSELECT 1 FROM pg_roles WHERE rolname = {l_role}"
                ),
            )
            .await?;
        if !exists.is_empty() {
            let mut text = format!("SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY});\n");
            if let Some(to) = &spec.reassign_owned_to {
                let to = quote_ident(to)
                    .ok_or_else(|| Error::internal("reassign_owned_to cannot be quoted"))?;
                text.push_str(&format!("REASSIGN OWNED BY {q_role} TO {to};\n"));
            }
            text.push_str(&format!(
                "DROP OWNED BY {q_role};\nDROP ROLE IF EXISTS {q_role}"
            ));
            self.admin_execute(spec, scram, &text).await?;
        }
        Ok(())
    }

    /// Revokes every lease row another process left behind (its passwords
    /// are gone, so no session can use them). Returns how many were revoked.
    pub async fn revoke_orphans(&self, scram: &ScramKeyCache) -> Result<usize> {
        self.sync_unsynced();
        let rows = self.with_service(|s| s.lease_list())?;
        let me = std::process::id();
        let mut held: std::collections::HashSet<String> = match self.leases.lock() {
            Ok(l) => l.keys().cloned().collect(),
            Err(_) => return Err(Error::internal("lease state poisoned")),
        };
        // Revoked while the store was unreachable, row not deleted yet.
        if let Ok(u) = self.unsynced.lock() {
            held.extend(u.keys().cloned());
        }
        let stray_before = now_unix() - STRAY_AFTER_SECS;
        let mut n = 0;
        let mut first_err = None;
        for row in rows
            .into_iter()
            .filter(|r| r.owner_pid != me || (!held.contains(&r.id) && r.created_at < stray_before))
        {
            let Some(spec) = self.specs.get(&row.route).cloned() else {
                tracing::warn!(lease = %row.id, role = %row.role, route = %row.route,
                    "orphaned lease belongs to a route that is no longer configured as dynamic; drop the role by hand");
                continue;
            };
            let why = if row.owner_pid == me {
                "stray: its creation broke off before the lease was handed out"
            } else if row.expires_at <= now_unix() {
                "orphan: expired while warden was down"
            } else {
                "orphan: left by a previous warden process (its password is gone)"
            };
            match self.revoke_row(&spec, &row, scram, why).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(lease = %row.id, "orphaned lease not revoked yet: {}", e.message);
                    first_err.get_or_insert(e);
                }
            }
        }
        for spec in self.specs.values() {
            if let Err(e) = self.drop_stale_groups(spec, scram).await {
                tracing::warn!(route = %spec.route, "stale group roles not dropped yet: {}", e.message);
            }
        }
        match first_err {
            Some(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// Drops the route's group roles made for an earlier grants list once no
    /// role but the admin is a member (their leases are gone).
    async fn drop_stale_groups(&self, spec: &DynamicSpec, scram: &ScramKeyCache) -> Result<()> {
        if spec.backend().is_some() {
            return Ok(());
        }
        let base = group_role_name(&spec.role_prefix, &spec.route, &[]);
        let Some(stem) = base.get(..base.len().saturating_sub(8)) else {
            return Ok(());
        };
        let pattern = format!(
            "{}%",
            stem.replace('\\', "\\\\")
                .replace('_', "\\_")
                .replace('%', "\\%")
        );
        let (Some(l_pattern), Some(l_current)) =
            (quote_literal(&pattern), quote_literal(&spec.group_role))
        else {
            return Ok(());
        };
        let stale = self
            .admin_execute(
                spec,
                scram,
                &format!(
                    "SELECT r.rolname FROM pg_roles r WHERE r.rolname LIKE {l_pattern} AND r.rolname <> {l_current} \
                     AND length(r.rolname) = {len} AND NOT r.rolcanlogin AND NOT EXISTS (SELECT 1 FROM pg_auth_members m \
                     JOIN pg_roles u ON u.oid = m.member WHERE m.roleid = r.oid AND u.rolname <> current_user)",
                    len = base.len()
                ),
            )
            .await?;
        for name in stale
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
        {
            let Some(q) = quote_ident(&name) else {
                continue;
            };
            self.admin_execute(
                spec,
                scram,
                &format!("SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY});\nDROP OWNED BY {q};\nDROP ROLE IF EXISTS {q}"),
            )
            .await?;
            tracing::info!(route = %spec.route, role = %name, "dropped a group role of an earlier grants list");
        }
        Ok(())
    }

    /// Renews leases with open sessions, revokes expired ones.
    pub async fn maintain(&self, scram: &ScramKeyCache) {
        self.sync_unsynced();
        let now = now_unix();
        let snapshot: Vec<(LeaseRow, usize)> = match self.leases.lock() {
            Ok(l) => l.values().map(|x| (x.row.clone(), x.sessions)).collect(),
            Err(_) => return,
        };
        for (row, sessions) in snapshot {
            let Some(spec) = self.specs.get(&row.route).cloned() else {
                continue;
            };
            let ttl = spec.ttl.as_secs() as i64;
            if now >= row.max_expires_at || (now >= row.expires_at && sessions == 0) {
                let why = if now >= row.max_expires_at {
                    "max_ttl reached"
                } else {
                    "ttl expired"
                };
                if let Err(e) = self.revoke_row(&spec, &row, scram, why).await {
                    tracing::warn!(lease = %row.id, "lease revocation failed (retrying): {}", e.message);
                }
                continue;
            }
            if sessions > 0
                && row.expires_at - now <= ttl / 2
                && row.expires_at < row.max_expires_at
            {
                let until = (now + ttl).min(row.max_expires_at);
                match self.renew_role(&spec, &row, until, scram).await {
                    Ok(_) => {
                        let mut r = row.clone();
                        r.expires_at = until;
                        self.store_put(&r);
                        if let Ok(mut l) = self.leases.lock() {
                            if let Some(x) = l.get_mut(&row.id) {
                                x.row.expires_at = until;
                            }
                        }
                        let _ = self.audit(
                            daemon_actor(),
                            "lease.renew",
                            &r,
                            Decision::Allow,
                            format!(
                                "{sessions} open session(s); valid until {}",
                                timestamp_literal(until)
                            ),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(lease = %row.id, "lease renewal failed: {}", e.message)
                    }
                }
            }
        }
    }

    /// Extends the lease's role on the server to `until`.
    async fn renew_role(
        &self,
        spec: &DynamicSpec,
        row: &LeaseRow,
        until: i64,
        scram: &ScramKeyCache,
    ) -> Result<()> {
        if let Some(backend) = spec.backend() {
            let admin = self.admin_login(spec).await?;
            return backend.renew(&admin, row, until).await;
        }
        let (Some(q_role), Some(q_until)) = (
            quote_ident(&row.role),
            quote_literal(&timestamp_literal(until)),
        ) else {
            return Err(Error::internal("lease role name cannot be quoted"));
        };
        self.admin_execute(
            spec,
            scram,
            &format!("ALTER ROLE {q_role} VALID UNTIL {q_until}"),
        )
        .await
        .map(|_| ())
    }

    /// Whether lease `id` is held (not revoked nor expired).
    pub fn is_held(&self, id: &str) -> bool {
        self.leases.lock().is_ok_and(|l| l.contains_key(id))
    }

    /// Revokes every lease this process holds (shutdown, bench clean-up).
    pub async fn revoke_all(&self, scram: &ScramKeyCache, why: &str) -> usize {
        let rows: Vec<LeaseRow> = match self.leases.lock() {
            Ok(l) => l.values().map(|x| x.row.clone()).collect(),
            Err(_) => return 0,
        };
        let mut n = 0;
        for row in rows {
            if let Some(spec) = self.specs.get(&row.route).cloned() {
                if self.revoke_row(&spec, &row, scram, why).await.is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// The leases held now (for `warden lease list`).
    pub fn list(&self) -> Vec<LeaseInfo> {
        let mut out: Vec<LeaseInfo> = match self.leases.lock() {
            Ok(l) => l
                .values()
                .map(|x| LeaseInfo {
                    id: x.row.id.clone(),
                    route: x.row.route.clone(),
                    workload: x.row.workload.clone(),
                    role: x.row.role.clone(),
                    sessions: x.sessions,
                    expires_at: crate::timefmt::format_rfc3339(
                        time::OffsetDateTime::from_unix_timestamp(x.row.expires_at)
                            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                    ),
                    node: None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn spec(&self, route: &str) -> Option<Arc<DynamicSpec>> {
        self.specs.get(route).cloned()
    }
}

/// One lease as `warden lease list` shows it (no password).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LeaseInfo {
    pub id: String,
    pub route: String,
    pub workload: String,
    pub role: String,
    pub sessions: usize,
    pub expires_at: String,
    /// The node that held it, when another node revoked it for an admin here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_bounded_and_tame() {
        assert_eq!(
            role_name("warden_", "reports", "0a1b2c3d"),
            "warden_reports_0a1b2c3d"
        );
        assert_eq!(role_name("warden_", "Ba-d\"x", "00"), "warden_ba_d_x_00");
        let long = role_name("warden_", &"w".repeat(100), "0a1b2c3d");
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("_0a1b2c3d"));
    }

    #[test]
    fn passwords_are_random_and_ascii() {
        let a = random_password().ok().unwrap_or_default();
        let b = random_password().ok().unwrap_or_default();
        assert_eq!(a.len(), 43);
        assert_ne!(*a, *b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'));
    }

    #[test]
    fn create_sql_carries_a_verifier_never_the_password() {
        let spec = DynamicSpec {
            route: "shop".into(),
            target: LeaseTarget::Postgres(UpstreamTarget {
                host: "127.0.0.1".into(),
                port: 5432,
                tls: None,
                server_name: rustls::pki_types::ServerName::try_from("localhost")
                    .map(|n| n.to_owned())
                    .unwrap_or_else(|_| {
                        rustls::pki_types::ServerName::IpAddress(
                            std::net::IpAddr::from([127, 0, 0, 1]).into(),
                        )
                    }),
                connect_timeout: Duration::from_secs(1),
            }),
            admin_user: "adm\"in".into(),
            admin_secret: "shop/admin".into(),
            env: "prod".into(),
            database: "shop".into(),
            ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(600),
            grants: vec!["GRANT SELECT ON t TO {role}".into()],
            reassign_owned_to: None,
            role_prefix: "warden_".into(),
            cache_ttl: Duration::from_secs(60),
            grant_mode: GrantMode::PerLease,
            group_role: group_role_name("warden_", "shop", &["GRANT SELECT ON t TO {role}".into()]),
            scram_iterations: 16,
            max_name: 63,
        };
        let row = LeaseRow {
            id: "shop-1".into(),
            route: "shop".into(),
            workload: "it's".into(),
            role: role_name("warden_", "reports", "0a1b2c3d"),
            state: "creating".into(),
            owner_pid: 1,
            created_at: 0,
            expires_at: 60,
            max_expires_at: 600,
        };
        let pw = random_password().ok().unwrap_or_default();
        let cache = ScramKeyCache::new();
        let sql = create_sql(&spec, &row, &pw, "lease shop-1", &cache)
            .ok()
            .unwrap_or_default();
        let pw_text = String::from_utf8_lossy(&pw).into_owned();
        assert!(!sql.contains(&pw_text), "{}", *sql);
        assert!(
            sql.starts_with(&format!(
                "SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY});\nCREATE ROLE \"warden_reports_0a1b2c3d\" LOGIN PASSWORD E'SCRAM-SHA-256$16:"
            )),
            "{}",
            *sql
        );
        assert!(
            sql.contains("VALID UNTIL E'1970-01-01 00:01:00+00' ROLE \"adm\"\"in\";"),
            "{}",
            *sql
        );
        assert!(
            sql.contains("IS E'warden lease shop-1 for workload it''s on route shop';"),
            "{}",
            *sql
        );
        assert!(
            sql.ends_with("GRANT SELECT ON t TO \"warden_reports_0a1b2c3d\";\n"),
            "{}",
            *sql
        );
        // The first login with the lease's label skips PBKDF2 (keys cached with the verifier).
        assert_eq!(cache.misses(), 1);

        // Group mode: membership in the route's group role, no grants, no ACL lock.
        let group = DynamicSpec {
            grant_mode: GrantMode::Group,
            ..spec
        };
        let sql = create_sql(&group, &row, &pw, "lease shop-1", &cache)
            .ok()
            .unwrap_or_default();
        assert!(!sql.contains(&pw_text) && !sql.contains("GRANT") && !sql.contains("advisory"));
        assert!(
            sql.contains(&format!(
                "VALID UNTIL E'1970-01-01 00:01:00+00' IN ROLE \"{}\" ROLE \"adm\"\"in\";",
                group.group_role
            )),
            "{}",
            *sql
        );
    }

    #[test]
    fn group_role_names_follow_the_grants_and_never_look_like_leases() {
        let a = group_role_name(
            "warden_",
            "orders-db",
            &["GRANT SELECT ON t TO {role}".into()],
        );
        let b = group_role_name(
            "warden_",
            "orders-db",
            &["GRANT INSERT ON t TO {role}".into()],
        );
        assert!(
            a.starts_with("warden_orders_db_grp") && a.len() == "warden_orders_db_grp".len() + 8,
            "{a}"
        );
        assert_ne!(a, b);
        assert_eq!(
            a,
            group_role_name(
                "warden_",
                "orders-db",
                &["GRANT SELECT ON t TO {role}".into()]
            )
        );
        assert!(group_role_name("warden_", &"r".repeat(80), &[]).len() <= 63);
    }

    #[test]
    fn timestamps_are_utc_literals() {
        assert_eq!(timestamp_literal(0), "1970-01-01 00:00:00+00");
        assert_eq!(timestamp_literal(1_700_000_000), "2023-11-14 22:13:20+00");
    }
}
