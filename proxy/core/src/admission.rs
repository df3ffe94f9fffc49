//! The admission step: the one place that decides whether a caller may use a
//! route, for every front end (PostgreSQL, HTTP, TLS, the Workload API).
//!
//! peer → **attest** (the daemon's one [`Attestor`] and executable-hash
//! cache) → **frozen?** → **allow list** (plus any front-end-specific check,
//! e.g. a PostgreSQL route's database list) → **anomaly signal** →
//! **credential** (the daemon's one [`CredentialCache`]) → the
//! **session-start audit record** (fail closed).
//!
//! Each step returns a typed [`Denial`] on refusal; [`Admission::refuse`]
//! does the bookkeeping every refusal needs (log line, audit record, metric,
//! the anomaly detector's denial signal) once for all front ends. A front
//! end only maps a `Denial` to its wire form, in one table per protocol
//! (SQLSTATE, HTTP status, gRPC status, a closed TLS connection).

use crate::anomaly::Anomaly;
use crate::audit::{Decision, Event, Target};
use crate::credentials::{CredentialCache, SecretValue};
use crate::error::ErrorKind;
use crate::freeze::{FreezeEntry, Freezer};
use crate::journal::Journal;
use crate::metrics::{AttestVia, Metrics};
use crate::peer::{actor, describe, Attested, Attestor};
use crate::service::SecretService;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Attestations that read /proc on a blocking thread at the same time, at
/// most (each holds a few descriptors while it scans).
const SLOW_ATTESTATIONS: usize = 8;

/// How the process on the other end of a connection is found.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// TCP: resolved from the connection's addresses (kernel map, then /proc).
    Tcp { local: SocketAddr, peer: SocketAddr },
    /// Unix socket: the SO_PEERCRED pid, when the kernel reported one, and
    /// when warden accepted the connection (CLOCK_BOOTTIME ns, see
    /// [`crate::peer::boottime_ns`]): a process that exec'd after that is refused.
    Unix {
        pid: Option<u32>,
        accepted_ns: Option<u64>,
    },
}

/// Attestation that did not name a workload: why, and the pid when known
/// (the denial rule keys on the process's cgroup).
#[derive(Debug, Clone)]
pub struct Unattested {
    pub pid: Option<u32>,
    pub reason: String,
}

/// The outcome of attesting a connection's peer.
pub type Attestation = Result<Attested, Unattested>;

/// Where a refusal happened.
#[derive(Clone, Copy)]
enum Venue<'a> {
    Route(&'a str),
    WorkloadApi(&'a str),
}

/// What the admission step needs to know about a route.
pub struct RoutePolicy<'a> {
    pub name: &'a str,
    pub allow: &'a [String],
}

/// A secret a route injects, and how long a fetched value may be reused.
pub struct SecretRef<'a> {
    pub name: &'a str,
    pub env: &'a str,
    pub ttl: Duration,
}

/// What [`Admission::record_session_end`] records.
pub struct SessionEnd<'a> {
    pub route: &'a str,
    /// The credential used; its `detail` starts the record's detail.
    pub target: Target,
    pub started: Instant,
    pub up: u64,
    pub down: u64,
    /// Added after the duration (e.g. `", 2 commands refused"`), or empty.
    pub note: String,
    /// How it ended (e.g. `"closed by the client"`).
    pub how: &'a str,
}

/// A server's error text never carries the password; make sure anyway: a
/// text that does is replaced whole.
pub fn withhold_secret(text: &mut String, secret: &[u8]) {
    let s = String::from_utf8_lossy(secret);
    if !s.is_empty() && text.contains(s.as_ref()) {
        *text = "(the server's answer is withheld: it contains the secret)".into();
    }
}

/// What [`Admission::login_failed`] needs besides the refusal.
pub struct LoginFailure<'a> {
    pub route: &'a str,
    /// The `warden_sessions_total` result (`upstream_error`,
    /// `upstream_rejected`, …).
    pub result: &'a str,
    /// The audit target: the route, the secret and its version.
    pub target: Target,
    /// The secret: a refusal quoting it is withheld.
    pub secret: &'a [u8],
}

/// Why a caller is refused. Every front end maps these to its wire form
/// (one table per protocol); the message never carries a secret value.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Denial {
    /// The peer's process could not be attested to a workload.
    Unattested { route: String, reason: String },
    /// The workload is frozen.
    Frozen(Box<FreezeEntry>),
    /// The workload is not on the route's allow list.
    NotAllowed {
        route: String,
        workload: String,
        process: String,
    },
    /// A PostgreSQL route's `databases` does not list the one asked for.
    DatabaseNotAllowed {
        route: String,
        database: String,
        allowed: Vec<String>,
    },
    /// A front end's own policy refused the request (e.g. a forward proxy
    /// asked for a destination no route serves); `reason` says why.
    NotPermitted { reason: String },
    /// warden is sealed: no credential can be opened yet.
    Sealed { route: String, reason: String },
    /// The route's secret (or lease) cannot be had.
    NoCredential { route: String, reason: String },
    /// The shared store is unreachable and no cached value may be served
    /// (none cached, or older than `store.stale_if_error` allows).
    StoreUnreachable {
        route: String,
        /// `PostgreSQL store user@host:port/dbname`.
        store: String,
        /// `since <time> (<n> s)`.
        since: String,
        /// Why the cache cannot serve.
        reason: String,
    },
    /// A dynamic route could not lease a role for the workload.
    NoLease {
        route: String,
        workload: String,
        reason: String,
    },
    /// The caller's identity (SVID) cannot be issued or used.
    Identity { route: String, reason: String },
    /// The audit record could not be written: refused (fail closed).
    AuditFailed,
    /// A failure inside warden.
    Internal { reason: String },
}

impl Denial {
    /// The `result` label of `warden_sessions_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Denial::Unattested { .. }
            | Denial::NotAllowed { .. }
            | Denial::NotPermitted { .. }
            | Denial::DatabaseNotAllowed { .. } => "denied",
            Denial::Frozen(_) => "frozen",
            Denial::Sealed { .. }
            | Denial::NoCredential { .. }
            | Denial::StoreUnreachable { .. }
            | Denial::NoLease { .. } => "credential_error",
            Denial::Identity { .. } => "identity_error",
            Denial::AuditFailed => "audit_error",
            Denial::Internal { .. } => "error",
        }
    }

    /// A refusal by policy (counted by the `denials_per_minute` rule).
    pub fn is_policy(&self) -> bool {
        self.result() == "denied"
    }

    /// The audit action of the refusal, or None when the audit log itself
    /// is what failed.
    fn audit_action(&self) -> Option<&'static str> {
        match self {
            Denial::AuditFailed => None,
            Denial::Unattested { .. }
            | Denial::Frozen(_)
            | Denial::NotAllowed { .. }
            | Denial::NotPermitted { .. }
            | Denial::DatabaseNotAllowed { .. } => Some("session.deny"),
            _ => Some("session.error"),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Not a route (the Workload API): the reason alone.
            Denial::Unattested { route, reason } if route.is_empty() => f.write_str(reason),
            Denial::Unattested { route, reason } => {
                write!(f, "{reason} — route {route:?} refuses unattested clients")
            }
            Denial::Frozen(e) => f.write_str(&crate::freeze::frozen_message(e)),
            Denial::NotAllowed {
                route,
                workload,
                process,
            } => write!(
                f,
                "warden: {process} is workload {workload:?}, which may not use route {route:?}"
            ),
            Denial::DatabaseNotAllowed {
                route,
                database,
                allowed,
            } => write!(
                f,
                "warden: route {route:?} does not allow database {database:?} (allowed: {})",
                allowed.join(", ")
            ),
            Denial::NotPermitted { reason, .. } => f.write_str(reason),
            Denial::Sealed { route, reason } | Denial::NoCredential { route, reason, .. } => {
                write!(f, "warden: no credential for route {route:?}: {reason}")
            }
            Denial::StoreUnreachable {
                route,
                store,
                since,
                reason,
            } => write!(
                f,
                "warden: no credential for route {route:?}: the {store} is unreachable {since}; {reason}"
            ),
            Denial::NoLease {
                route,
                workload,
                reason,
            } => write!(
                f,
                "warden: no lease for workload {workload:?} on route {route:?}: {reason}"
            ),
            Denial::Identity { route, reason } => write!(f, "warden: route {route:?}: {reason}"),
            Denial::AuditFailed => f.write_str(
                "warden: the audit record for this session could not be written; refusing",
            ),
            Denial::Internal { reason } => write!(f, "warden: {reason}"),
        }
    }
}

/// Serving cached credentials while the shared store is unreachable
/// (`store.stale_if_error`).
pub struct StalePolicy {
    /// The store's reachability.
    pub health: Arc<crate::store::health::StoreHealth>,
    /// How long past its route's `cache_ttl` a cached value may be served
    /// while the store is unreachable.
    pub stale_if_error: Duration,
    /// `secret[].rotation_period` by secret name: a cached value is never
    /// served longer than its secret's rotation period after it was read.
    pub rotation_periods: std::collections::HashMap<String, Duration>,
}

/// How long after it was read a cached value of `secret` may be served while
/// the store is unreachable — `cache_ttl + stale_if_error`, never past the
/// secret's rotation period — and that bound in words.
fn stale_limit(
    secret: &SecretRef<'_>,
    stale_if_error: Duration,
    rotation_period: Option<Duration>,
) -> (Duration, String) {
    let fmt = crate::config::format_duration;
    let limit = secret.ttl.saturating_add(stale_if_error);
    match rotation_period {
        Some(period) if period < limit => (
            period,
            format!(
                "the rotation period {} of secret {:?}",
                fmt(period),
                secret.name
            ),
        ),
        _ => (
            limit,
            format!(
                "cache_ttl {} + store.stale_if_error {}",
                fmt(secret.ttl),
                fmt(stale_if_error)
            ),
        ),
    }
}

/// Everything the admission step consults; one per daemon, shared by every
/// front end.
pub struct Admission {
    attestor: Attestor,
    freezer: Arc<Freezer>,
    anomaly: Arc<Anomaly>,
    credentials: Arc<CredentialCache>,
    service: Arc<Mutex<SecretService>>,
    /// The daemon's one audit writer for session records.
    audit: Journal,
    metrics: Metrics,
    stale: Option<StalePolicy>,
    /// The start of the outage a stale serve was last logged for (one
    /// warning per outage, not one per session).
    stale_logged: Mutex<Option<Instant>>,
}

/// The services an [`Admission`] is built from.
pub struct AdmissionParts {
    pub attestor: Attestor,
    pub freezer: Arc<Freezer>,
    pub anomaly: Arc<Anomaly>,
    pub credentials: Arc<CredentialCache>,
    pub service: Arc<Mutex<SecretService>>,
    pub audit: Journal,
    pub metrics: Metrics,
    /// On a shared (PostgreSQL) store: serving from the cache while it is
    /// unreachable. None on SQLite (a local file has no outages to ride out).
    pub stale: Option<StalePolicy>,
}

impl Admission {
    pub fn new(p: AdmissionParts) -> Arc<Admission> {
        Arc::new(Admission {
            attestor: p.attestor,
            freezer: p.freezer,
            anomaly: p.anomaly,
            credentials: p.credentials,
            service: p.service,
            audit: p.audit,
            metrics: p.metrics,
            stale: p.stale,
            stale_logged: Mutex::new(None),
        })
    }

    pub fn freezer(&self) -> &Arc<Freezer> {
        &self.freezer
    }

    pub fn credentials(&self) -> &Arc<CredentialCache> {
        &self.credentials
    }

    /// The session audit writer (session-end records go here too).
    pub fn audit(&self) -> &Journal {
        &self.audit
    }

    /// Attributes and attests a connection's peer. A process seen before
    /// is confirmed on the runtime thread (small /proc reads, the cached
    /// executable hash); anything else, and every refusal, runs on a
    /// blocking thread.
    pub async fn attest(self: &Arc<Self>, peer: Peer, via: AttestVia) -> Attestation {
        let t0 = Instant::now();
        let known = match self.attest_quick(peer) {
            Ok(who) => {
                let res = self.same_program(peer, Ok(who));
                self.metrics.attestation(via, res.is_ok(), t0.elapsed());
                return res;
            }
            Err(known) => known,
        };
        // At most SLOW_ATTESTATIONS at once: a flood of new connections
        // would otherwise take up to the blocking pool's 512 threads, and
        // their /proc reads the descriptors kept free for sessions.
        static SLOW: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
        let _permit = SLOW
            .get_or_init(|| tokio::sync::Semaphore::new(SLOW_ATTESTATIONS))
            .acquire()
            .await;
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || me.attest_known(peer, known))
            .await
            .unwrap_or_else(|e| {
                Err(Unattested {
                    pid: None,
                    reason: format!("warden: attestation failed: {e}"),
                })
            });
        let res = self.same_program(peer, res);
        self.metrics.attestation(via, res.is_ok(), t0.elapsed());
        res
    }

    /// [`Self::attest`] for a blocking thread (the Workload API's handlers).
    pub fn attest_blocking(&self, peer: Peer, via: AttestVia) -> Attestation {
        let t0 = Instant::now();
        let res = match self.attest_quick(peer) {
            Ok(who) => Ok(who),
            Err(known) => self.attest_known(peer, known),
        };
        let res = self.same_program(peer, res);
        self.metrics.attestation(via, res.is_ok(), t0.elapsed());
        res
    }

    /// A unix-socket peer attested after its facts were read: refused when
    /// the kernel saw it exec another program after warden accepted the
    /// connection (the program speaking may not be the one that connected).
    /// TCP peers are checked against their connect time by the resolver.
    fn same_program(&self, peer: Peer, res: Attestation) -> Attestation {
        let who = res?;
        if let Peer::Unix {
            pid: Some(pid),
            accepted_ns: Some(at),
        } = peer
        {
            if self.attestor.resolver.unchanged_since(pid, at) == Some(false) {
                return Err(Unattested {
                    pid: Some(pid),
                    reason: format!(
                        "warden: process {pid} started a new program (exec) after it opened this connection; warden cannot tell which program speaks on it and refuses (open the connection from the program that uses it)"
                    ),
                });
            }
        }
        Ok(who)
    }

    /// The cached path; `Err(Some(pid))` when the kernel named the pid.
    /// First the kernel-fresh cache (no /proc read at all), then the /proc
    /// re-check of a kept attestation, which on success lets the kernel
    /// vouch for the next connection of the same process.
    fn attest_quick(&self, peer: Peer) -> Result<Attested, Option<u32>> {
        match peer {
            Peer::Tcp { local, peer } => {
                let resolver = &self.attestor.resolver;
                let Some(record) = resolver.kernel_record(local, peer) else {
                    return self.attestor.attest_tcp_cached(local, peer);
                };
                // One map lookup and a memory read: the common case.
                if let Some(who) = self.attestor.attest_kernel(&record) {
                    return Ok(who);
                }
                // The exec check the stamp stood for, then /proc.
                let who = self.attestor.attest_tcp_cached(local, peer)?;
                if let Some(k) = resolver.kernel_peer(local, peer) {
                    self.attestor.stamp(who.facts.pid, &k, record.generation);
                }
                Ok(who)
            }
            Peer::Unix { pid: Some(pid), .. } => {
                self.attestor.attest_pid_cached(pid).ok_or(Some(pid))
            }
            Peer::Unix { pid: None, .. } => Err(None),
        }
    }

    /// The blocking path: /proc reads, the executable hashed if new.
    fn attest_known(&self, peer: Peer, known: Option<u32>) -> Attestation {
        let pid = match (known, peer) {
            (Some(pid), _) => pid,
            (None, Peer::Tcp { local, peer }) => self
                .attestor
                .tcp_pid(local, peer)
                .map_err(|reason| Unattested { pid: None, reason })?,
            (None, Peer::Unix { .. }) => {
                return Err(Unattested {
                    pid: None,
                    reason: "warden: the kernel did not report the connecting process".into(),
                })
            }
        };
        // Read before the facts: a stamp made from them is stale after
        // any exec or exit from here on.
        let generation = self.attestor.resolver.change_count(pid);
        let who = self.attestor.attest_pid(pid).map_err(|reason| Unattested {
            pid: Some(pid),
            reason,
        })?;
        if let Peer::Tcp { local, peer } = peer {
            match self.attestor.resolver.kernel_peer(local, peer) {
                Some(k) => {
                    if let Some(generation) = generation {
                        self.attestor.stamp(pid, &k, generation);
                    }
                }
                // The kernel named the process, and no longer vouches for
                // it: it exec'd while its facts were read. Refuse, with
                // the resolver's words.
                None if known.is_some() => {
                    let reason = match self.attestor.tcp_pid(local, peer) {
                        Err(reason) => reason,
                        Ok(_) => "warden: the connecting process changed while it was attested"
                            .to_string(),
                    };
                    return Err(Unattested {
                        pid: Some(pid),
                        reason,
                    });
                }
                None => {}
            }
        }
        Ok(who)
    }

    /// Policy: attested, not frozen, on the route's allow list.
    pub fn authorize<'a>(
        &self,
        who: &'a Attestation,
        route: &RoutePolicy<'_>,
    ) -> Result<&'a Attested, Denial> {
        let who = who.as_ref().map_err(|u| Denial::Unattested {
            route: route.name.to_string(),
            reason: u.reason.clone(),
        })?;
        self.authorize_workload(who, route)?;
        Ok(who)
    }

    /// Policy for an attested caller: not frozen, on the allow list.
    pub fn authorize_workload(
        &self,
        who: &Attested,
        route: &RoutePolicy<'_>,
    ) -> Result<(), Denial> {
        self.check_frozen(&who.workload)?;
        if !route.allow.contains(&who.workload) {
            return Err(Denial::NotAllowed {
                route: route.name.to_string(),
                workload: who.workload.clone(),
                process: describe(&who.facts),
            });
        }
        Ok(())
    }

    /// Refuses a frozen workload.
    pub fn check_frozen(&self, workload: &str) -> Result<(), Denial> {
        match self.freezer.frozen(workload) {
            Some(f) => Err(Denial::Frozen(Box::new(f))),
            None => Ok(()),
        }
    }

    /// The bookkeeping of a refusal, the same for every front end: a log
    /// line, the audit record (`session.deny` or `session.error`), the
    /// `warden_sessions_total` metric and, for a policy refusal, the
    /// anomaly detector's denial signal. `detail` goes into the record's
    /// target (e.g. "database orders", "http").
    pub async fn refuse(&self, route: &str, who: &Attestation, denial: &Denial, detail: String) {
        if let Some(event) = self.note_refusal(Venue::Route(route), who, denial, detail) {
            let _ = self.audit.record(event).await;
        }
    }

    /// [`Self::refuse`] on a blocking thread, for a Workload API request `op` (audited as
    /// `svid.deny`, counted in `warden_workload_api_denied_total{op}`).
    pub fn refuse_identity_request(&self, op: &str, who: &Attestation, denial: &Denial) {
        let detail = format!("Workload API {op}");
        if let Some(event) = self.note_refusal(Venue::WorkloadApi(op), who, denial, detail) {
            let _ = self.audit.record_blocking(event);
        }
    }

    /// Log, metric and anomaly signal of a refusal; its audit record.
    fn note_refusal(
        &self,
        venue: Venue<'_>,
        who: &Attestation,
        denial: &Denial,
        detail: String,
    ) -> Option<Event> {
        let message = denial.to_string();
        let attested = who.as_ref().ok();
        let workload = attested.map(|w| w.workload.as_str());
        let route = match venue {
            Venue::Route(route) => {
                tracing::warn!(route = %route, "session refused: {message}");
                self.metrics
                    .session(route, workload.unwrap_or(""), denial.result());
                Some(route)
            }
            Venue::WorkloadApi(op) => {
                tracing::warn!("Workload API {op} refused: {message}");
                self.metrics.workload_api_denied(op);
                None
            }
        };
        if denial.is_policy() {
            let pid = match who {
                Ok(w) => Some(w.facts.pid),
                Err(u) => u.pid,
            };
            if let Some(pid) = pid {
                self.anomaly.denial(workload, pid);
            }
        }
        let action = match venue {
            Venue::Route(_) => denial.audit_action()?,
            Venue::WorkloadApi(_) => "svid.deny",
        };
        Some(Event {
            actor: actor(attested),
            action: action.into(),
            target: Target {
                route: route.map(String::from),
                detail: Some(detail),
                ..Target::default()
            },
            decision: if denial.audit_action() == Some("session.deny") {
                Decision::Deny
            } else {
                Decision::Error
            },
            reason: message,
        })
    }

    /// The route's secret: from the cache on the runtime thread, else read
    /// from the store on a blocking thread.
    pub async fn credential(
        self: &Arc<Self>,
        route: &str,
        secret: &SecretRef<'_>,
    ) -> Result<SecretValue, Denial> {
        if let Some(hit) = self.credentials.cached(secret.name, secret.env, secret.ttl) {
            return Ok(hit);
        }
        // A known outage: a value the cache may still serve is served without
        // waiting for a connection attempt; the listener notices the store's
        // return. Nothing servable: try the store anyway (it may be back).
        if let Some(Ok(v)) = self.stale_credential(route, secret) {
            return Ok(v);
        }
        let me = self.clone();
        let (name, env, ttl) = (secret.name.to_string(), secret.env.to_string(), secret.ttl);
        let got = tokio::task::spawn_blocking(move || {
            me.credentials.get(&name, &env, ttl, |name, env| {
                me.service
                    .lock()
                    .map_err(|_| crate::error::Error::internal("service state poisoned"))?
                    .fetch_for_injection(name, env)
            })
        })
        .await;
        match got {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.kind == ErrorKind::Sealed => Err(Denial::Sealed {
                route: route.to_string(),
                reason: e.message,
            }),
            Ok(Err(e)) if e.kind == ErrorKind::Unavailable => self
                .stale_credential(route, secret)
                .unwrap_or(Err(Denial::NoCredential {
                    route: route.to_string(),
                    reason: e.message,
                })),
            Ok(Err(e)) => Err(Denial::NoCredential {
                route: route.to_string(),
                reason: e.message,
            }),
            Err(e) => Err(Denial::Internal {
                reason: format!("credential lookup failed: {e}"),
            }),
        }
    }

    /// While the store is unreachable (None otherwise, and on SQLite): the
    /// cached value of `secret` if it was read less than `cache_ttl +
    /// store.stale_if_error` ago (and less than its rotation period), else
    /// the refusal naming the outage.
    fn stale_credential(
        &self,
        route: &str,
        secret: &SecretRef<'_>,
    ) -> Option<Result<SecretValue, Denial>> {
        let policy = self.stale.as_ref()?;
        let outage = policy.health.outage()?;
        let (limit, bound) = stale_limit(
            secret,
            policy.stale_if_error,
            policy.rotation_periods.get(secret.name).copied(),
        );
        if let Some((v, age)) = self
            .credentials
            .cached_stale(secret.name, secret.env, limit)
        {
            self.metrics.stale_credential_served(route);
            if let Ok(mut logged) = self.stale_logged.lock() {
                if *logged != Some(outage.started) {
                    *logged = Some(outage.started);
                    tracing::warn!(
                        route = %route,
                        "the {} is unreachable {}: serving cached credentials past their cache_ttl (this one read {} s ago; at most {bound}); further stale serves during this outage are counted in warden_credentials_stale_served_total",
                        policy.health.at(),
                        outage.describe_since(),
                        age.as_secs()
                    );
                }
            }
            return Some(Ok(v));
        }
        let held = self
            .credentials
            .cached_stale(secret.name, secret.env, Duration::MAX)
            .is_some();
        let reason = if held {
            format!("cached credential expired (read longer ago than {bound}); sessions resume by themselves once the store is back")
        } else {
            "no credential of this route is cached on this node; sessions resume by themselves once the store is back".to_string()
        };
        Some(Err(Denial::StoreUnreachable {
            route: route.to_string(),
            store: policy.health.at().to_string(),
            since: outage.describe_since(),
            reason,
        }))
    }

    /// Writes the `session.start` record (fail closed: `Err` means the
    /// session must not go on), then counts the session and tells the
    /// anomaly detector which credential the workload used (`credential`:
    /// the secret's name, or the route's for a credential that is not a
    /// stored secret). `first`: the first start of this connection (an HTTP
    /// connection records again when the secret's version changes).
    pub async fn record_start(
        &self,
        who: &Attested,
        route: &str,
        credential: &str,
        target: Target,
        reason: &str,
        first: bool,
    ) -> Result<(), Denial> {
        let start = self.begin_start(who, route, credential, target, reason);
        if first {
            start.finish().await
        } else {
            start.finish_quietly().await
        }
    }

    /// The admission of a connection to a route with a stored credential,
    /// in order: attested, allowed by `policy`, the credential fetched. The
    /// attestation comes back either way, for [`Self::refuse`].
    pub async fn admit_with_secret(
        self: &Arc<Self>,
        peer: Peer,
        via: AttestVia,
        policy: &RoutePolicy<'_>,
        secret: &SecretRef<'_>,
    ) -> (Attestation, Result<(Attested, SecretValue), Denial>) {
        let attestation = self.attest(peer, via).await;
        let admitted = match self.authorize(&attestation, policy) {
            Err(d) => Err(d),
            Ok(who) => {
                let who = who.clone();
                self.credential(policy.name, secret).await.map(|v| (who, v))
            }
        };
        (attestation, admitted)
    }

    /// warden's own login upstream failed (every front end that logs in for
    /// its clients): the kind's refusal `refusal`, whose message
    /// (`message(&mut refusal)`) is withheld when it quotes the secret, is
    /// logged, counted as `result` in `warden_sessions_total` and audited as
    /// `session.error` on `target`; it comes back for the kind to write.
    pub async fn login_failed<R>(
        &self,
        who: &Attested,
        failure: LoginFailure<'_>,
        mut refusal: R,
        message: impl Fn(&mut R) -> &mut String,
    ) -> R {
        let text = message(&mut refusal);
        withhold_secret(text, failure.secret);
        let text = text.clone();
        tracing::warn!(route = %failure.route, "session failed: {text}");
        self.metrics
            .session(failure.route, &who.workload, failure.result);
        self.record_session_error(who, failure.target, text).await;
        refusal
    }

    /// A session that was admitted but failed before it started (e.g. the
    /// upstream refused the login): a `session.error` record.
    pub async fn record_session_error(&self, who: &Attested, target: Target, reason: String) {
        let event = Event {
            actor: actor(Some(who)),
            action: "session.error".into(),
            target,
            decision: Decision::Error,
            reason,
        };
        let _ = self.audit.record(event).await;
    }

    /// The end of a relayed session (every route kind): its length and bytes
    /// counted, and a `session.end` record whose detail is `detail`, the
    /// byte counts, the duration, `note` and `how`. Nobody waits for it: it
    /// may share a later commit.
    pub async fn record_session_end(&self, who: &Attested, end: SessionEnd<'_>) {
        let ms = end.started.elapsed();
        self.metrics.session_end(end.route, ms, end.up, end.down);
        let mut target = end.target;
        target.detail = Some(format!(
            "{}, {} bytes up, {} bytes down, {} ms{}, {}",
            target.detail.as_deref().unwrap_or(""),
            end.up,
            end.down,
            ms.as_millis(),
            end.note,
            end.how
        ));
        let event = Event {
            actor: actor(Some(who)),
            action: "session.end".into(),
            target,
            decision: Decision::Allow,
            reason: "session ended".into(),
        };
        let _ = self.audit.record_unhurried(event).await;
    }

    /// [`record_start`](Self::record_start) in two steps, for a front end
    /// that overlaps the record's `fsync` (`audit.sync = "commit"`) with
    /// work that uses no credential — the PostgreSQL greeting: the append is
    /// begun here, and [`StartRecord::finish`] says whether the session may
    /// go on. Nothing may reach the upstream on the client's behalf before
    /// `finish` returns `Ok`.
    pub fn begin_start<'a>(
        &'a self,
        who: &'a Attested,
        route: &'a str,
        credential: &'a str,
        target: Target,
        reason: &str,
    ) -> StartRecord<'a> {
        let event = Event {
            actor: actor(Some(who)),
            action: "session.start".into(),
            target,
            decision: Decision::Allow,
            reason: reason.into(),
        };
        StartRecord {
            admission: self,
            who,
            route,
            credential,
            pending: self.audit.begin_record(event),
        }
    }

    /// An SVID handed to `who` (the new-executable rule watches these).
    pub fn issued(&self, who: &Attested) {
        self.anomaly.issue(
            &who.workload,
            who.facts.pid,
            who.facts.exe_sha256.as_deref(),
        );
    }
}

/// A `session.start` record begun by [`Admission::begin_start`].
pub struct StartRecord<'a> {
    admission: &'a Admission,
    who: &'a Attested,
    route: &'a str,
    credential: &'a str,
    pending: crate::journal::PendingRecord,
}

impl StartRecord<'_> {
    /// The outcome when it is known without waiting (`audit.sync =
    /// "interval"` writes inline); `None`: a commit is under way.
    pub fn decided(&self) -> Option<bool> {
        self.pending.decided()
    }

    /// Waits for the record; `Ok`: the session may go on (counted, and the
    /// anomaly detector told).
    pub async fn finish(self) -> Result<(), Denial> {
        let a = self.admission;
        let (who, route, credential) = (self.who, self.route, self.credential);
        self.finish_quietly().await?;
        a.metrics.session(route, &who.workload, "allowed");
        a.anomaly.session(
            &who.workload,
            credential,
            who.facts.pid,
            who.facts.exe_sha256.as_deref(),
        );
        Ok(())
    }

    /// [`finish`](Self::finish) without counting a new session (a
    /// connection that records again).
    async fn finish_quietly(self) -> Result<(), Denial> {
        if self.pending.wait().await {
            Ok(())
        } else {
            Err(Denial::AuditFailed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_text_carrying_the_secret_is_withheld() {
        let mut text = "bad pw hunter2".to_string();
        withhold_secret(&mut text, b"hunter2");
        assert!(!text.contains("hunter2"), "{text}");
        let mut text = "bad pw".to_string();
        withhold_secret(&mut text, b"");
        assert_eq!(text, "bad pw");
    }

    #[test]
    fn stale_serving_never_outlives_the_rotation_period() {
        let secret = SecretRef {
            name: "orders-db/app",
            env: "prod",
            ttl: Duration::from_secs(60),
        };
        let ten_min = Duration::from_secs(600);
        let (limit, bound) = stale_limit(&secret, ten_min, None);
        assert_eq!(limit, Duration::from_secs(660));
        assert_eq!(bound, "cache_ttl 1m + store.stale_if_error 10m");
        let (limit, _) = stale_limit(&secret, ten_min, Some(Duration::from_secs(3600)));
        assert_eq!(limit, Duration::from_secs(660));
        let (limit, bound) = stale_limit(&secret, ten_min, Some(Duration::from_secs(300)));
        assert_eq!(limit, Duration::from_secs(300));
        assert!(bound.contains("rotation period 5m"), "{bound}");
        // stale_if_error = "0s": the cache_ttl alone.
        assert_eq!(stale_limit(&secret, Duration::ZERO, None).0, secret.ttl);
    }

    #[test]
    fn store_unreachable_names_the_store_and_the_outage() {
        let d = Denial::StoreUnreachable {
            route: "orders-db".into(),
            store: "PostgreSQL store warden@db-1:5432/warden".into(),
            since: "since 2026-12-06T09:02:11.5Z (95 s)".into(),
            reason: "cached credential expired".into(),
        };
        assert_eq!(
            d.to_string(),
            "warden: no credential for route \"orders-db\": the PostgreSQL store warden@db-1:5432/warden is unreachable since 2026-12-06T09:02:11.5Z (95 s); cached credential expired"
        );
        assert_eq!(d.result(), "credential_error");
        assert_eq!(d.audit_action(), Some("session.error"));
    }

    #[test]
    fn denial_messages_name_route_and_fix() {
        let d = Denial::NotAllowed {
            route: "orders-db".into(),
            workload: "reports".into(),
            process: "process 7 (/usr/bin/psql, uid 1001)".into(),
        };
        assert_eq!(
            d.to_string(),
            "warden: process 7 (/usr/bin/psql, uid 1001) is workload \"reports\", which may not use route \"orders-db\""
        );
        assert!(d.is_policy());
        let d = Denial::Unattested {
            route: "api".into(),
            reason: "warden: no [[workload]] matches".into(),
        };
        assert!(d
            .to_string()
            .ends_with("route \"api\" refuses unattested clients"));
        let d = Denial::NoCredential {
            route: "api".into(),
            reason: "no secret \"payments/token\" in environment \"default\"".into(),
        };
        assert!(d.to_string().contains("payments/token"));
        assert_eq!(d.result(), "credential_error");
        assert!(!d.is_policy());
        assert_eq!(Denial::AuditFailed.audit_action(), None);
    }
}
