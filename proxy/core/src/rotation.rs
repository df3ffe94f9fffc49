//! Automated rotation of static secrets.
//!
//! A `[[secret]]` with `rotate = { method = … }` is rotated by warden every
//! `rotation_period` and on `warden secret rotate NAME`. Methods:
//! - `postgres`: warden logs in to the route's database as the route's role
//!   (with the current password) and runs `ALTER ROLE … PASSWORD '<SCRAM
//!   verifier>'` — the plaintext never reaches the server or its logs;
//! - `mysql`: the same on a mysql route's server (`SET PASSWORD` for the
//!   route's own account), through a [`PasswordChanger`] the binary registers
//!   (warden-core does not speak the MySQL protocol: `warden-mysql` does);
//! - `redis`: `ACL SETUSER` of a redis route's own user on its server, the
//!   same way (`warden-redis`);
//! - `exec`: runs `command` with the new value on its stdin (never argv);
//! - `webhook`: POSTs the new value as the request body.
//!
//! **Crash safety.** The steps are
//! 1. the new value is sealed in the store as the *pending* version
//!    (`warden/rotation/<name>`, same environment) — durable before anything
//!    changes upstream;
//! 2. the upstream is changed;
//! 3. the new value is committed as the secret's next version (its audit
//!    record written inside the store transaction);
//! 4. the pending copy is removed.
//!
//! Before every rotation and at daemon start, a leftover pending value is
//! resolved: if it already equals the latest version, step 4 is finished;
//! for `postgres`, `mysql` and `redis` a login with the pending password tells whether step 2
//! happened (then commit) or not (then roll back, the current password still
//! works); hooks are re-run with the pending value (they must be idempotent)
//! and then committed. So a crash at any step leaves warden with a working
//! credential after its restart. Debug builds honour `WARDEN_FAULT_POINT`
//! (the tests' SIGKILL points between the steps).
//!
//! **One node rotates.** On a store shared by a fleet every node's daemon
//! runs the schedule, so each rotation (and each recovery of a pending
//! value) first claims the job `rotation:<name>/<env>` in the store for
//! [`claim_ttl`]; a node that finds it claimed leaves it, and the winner
//! checks again that the rotation is still due (another node may just have
//! done it). A node killed mid-rotation keeps its claim until the expiry;
//! then the next node's tick claims the job and resolves the pending value
//! with the steps above.

use crate::audit::{Actor, Decision, Event, Target};
use crate::authority::{daemon_actor, RESERVED_PREFIX};
use crate::config::{Config, RotateMethod, RouteKind};
use crate::credentials::CredentialCache;
use crate::error::{Error, Result};
use crate::leases::random_password;
use crate::metrics::Metrics;
use crate::pgwire::scram::{self, ScramKeyCache};
use crate::pgwire::sql::{self, quote_ident, quote_literal, SqlError, SqlSession};
use crate::pgwire::upstream::{Login, UpstreamFailure, UpstreamTarget};
use crate::service::SecretService;
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// `rotate.timeout` when not set.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed scheduled rotation, wait this long before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The store claim of rotating (name, env).
fn claim_job(name: &str, env: &str) -> String {
    format!("rotation:{name}/{env}")
}

/// How long a node's claim on a rotation lasts: longer than the rotation
/// can take (two hook timeouts, plus a minute for the store and upstream
/// logins), short enough that another node finishes a dead node's rotation
/// soon.
pub fn claim_ttl(hook_timeout: Duration) -> Duration {
    hook_timeout * 2 + Duration::from_secs(60)
}

/// What a claimed run did.
enum ClaimedRun {
    Rotated(RotateOutcome),
    /// Another node holds the claim.
    HeldElsewhere,
    /// Claimed, but no longer due (another node has just rotated it).
    NotDue,
}

/// Where the pending value of `name` is kept.
pub fn pending_name(name: &str) -> String {
    format!("{RESERVED_PREFIX}rotation/{name}")
}

/// Stops here (until killed) when the debug-build test hook names this point.
async fn fault_point(point: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    if std::env::var("WARDEN_FAULT_POINT").ok().as_deref() == Some(point) {
        tracing::error!("fault point {point} reached: waiting to be killed");
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

/// A rotation method implemented by a front-end crate for its route kind
/// (`mysql`): it logs in to the route's server itself.
pub trait PasswordChanger: Send + Sync {
    /// Logs in to `route`'s server with `current` and makes it accept `new`.
    fn change<'a>(
        &'a self,
        route: &'a str,
        current: &'a [u8],
        new: &'a [u8],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::result::Result<(), Apply>> + Send + 'a>,
    >;
    /// Does `password` log in to `route`'s server? Rejected → `Unchanged`.
    fn probe<'a>(
        &'a self,
        route: &'a str,
        password: &'a [u8],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::result::Result<(), Apply>> + Send + 'a>,
    >;
}

enum Method {
    Postgres {
        target: UpstreamTarget,
        user: String,
        database: String,
        route: String,
    },
    /// Through the [`PasswordChanger`] registered for `method`.
    Changer {
        method: &'static str,
        route: String,
    },
    Exec {
        command: Vec<String>,
    },
    Webhook {
        url: String,
    },
}

struct Spec {
    name: String,
    period: Option<Duration>,
    timeout: Duration,
    method: Method,
}

/// What a rotation did (returned to `warden secret rotate`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RotateOutcome {
    pub name: String,
    pub env: String,
    pub version: u32,
    pub method: String,
}

/// Every rotatable secret of the configuration.
pub struct Rotator {
    specs: HashMap<String, Spec>,
    env: String,
    service: Arc<Mutex<SecretService>>,
    credentials: Arc<CredentialCache>,
    metrics: Option<Metrics>,
    scram: ScramKeyCache,
    /// One rotation per secret at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failed_at: Mutex<HashMap<String, Instant>>,
    /// Methods implemented outside warden-core, by name.
    changers: HashMap<&'static str, Arc<dyn PasswordChanger>>,
}

impl Rotator {
    pub fn new(
        cfg: &Config,
        service: Arc<Mutex<SecretService>>,
        credentials: Arc<CredentialCache>,
        metrics: Option<Metrics>,
    ) -> Result<Rotator> {
        let mut specs = HashMap::new();
        for s in &cfg.secrets {
            let Some(rot) = &s.rotate else { continue };
            let method = match rot.method {
                RotateMethod::Postgres => {
                    let route_name = rot.route.clone().unwrap_or_default();
                    let found = cfg
                        .routes
                        .iter()
                        .enumerate()
                        .find(|(_, c)| c.name == route_name && c.kind == RouteKind::Postgres);
                    let (index, r) = found.ok_or_else(|| {
                        Error::usage(format!(
                            "secret {:?}: rotate.route {route_name:?} is not a postgres route; fix: run `warden config check`",
                            s.name
                        ))
                    })?;
                    let user = r
                        .credential
                        .as_ref()
                        .map(|c| c.user.clone())
                        .ok_or_else(|| {
                            Error::usage(format!(
                                "route[{index}].credential: a postgres route needs user and secret"
                            ))
                        })?;
                    Method::Postgres {
                        target: UpstreamTarget::from_route(r, index)?,
                        user,
                        database: r
                            .databases
                            .first()
                            .cloned()
                            .unwrap_or_else(|| "postgres".into()),
                        route: r.name.clone(),
                    }
                }
                RotateMethod::Mysql | RotateMethod::Redis => {
                    let (method, kind) = if rot.method == RotateMethod::Mysql {
                        ("mysql", RouteKind::Mysql)
                    } else {
                        ("redis", RouteKind::Redis)
                    };
                    let route = rot.route.clone().unwrap_or_default();
                    if !cfg.routes.iter().any(|r| r.name == route && r.kind == kind) {
                        return Err(Error::usage(format!(
                            "secret {:?}: rotate.route {route:?} is not a {method} route; fix: run `warden config check`",
                            s.name
                        )));
                    }
                    Method::Changer { method, route }
                }
                RotateMethod::Exec => Method::Exec {
                    command: rot.command.clone(),
                },
                RotateMethod::Webhook => Method::Webhook {
                    url: rot.url.clone().unwrap_or_default(),
                },
            };
            specs.insert(
                s.name.clone(),
                Spec {
                    name: s.name.clone(),
                    period: s.rotation_period,
                    timeout: rot.timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT),
                    method,
                },
            );
        }
        Ok(Rotator {
            specs,
            env: cfg.environment.clone(),
            service,
            credentials,
            metrics,
            scram: ScramKeyCache::with_capacity(64),
            locks: Mutex::new(HashMap::new()),
            failed_at: Mutex::new(HashMap::new()),
            changers: HashMap::new(),
        })
    }

    /// Registers the implementation of rotation method `method` (e.g.
    /// `"mysql"`, from warden-mysql).
    pub fn with_changer(
        mut self,
        method: &'static str,
        changer: Arc<dyn PasswordChanger>,
    ) -> Rotator {
        self.changers.insert(method, changer);
        self
    }

    fn changer(&self, method: &str) -> std::result::Result<&Arc<dyn PasswordChanger>, Apply> {
        self.changers.get(method).ok_or_else(|| {
            Apply::Unchanged(format!(
                "rotation method \"{method}\" is not available in this program"
            ))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Store and audit work under the service lock (see [`crate::service::blocking`]).
    fn with_service<T>(&self, f: impl FnOnce(&mut SecretService) -> Result<T>) -> Result<T> {
        crate::service::blocking(&self.service, f)
    }

    fn event(
        actor: &Actor,
        action: &str,
        name: &str,
        env: &str,
        decision: Decision,
        reason: String,
    ) -> Event {
        Event {
            actor: actor.clone(),
            action: action.into(),
            target: Target {
                secret: Some(name.into()),
                env: Some(env.into()),
                ..Target::default()
            },
            decision,
            reason,
        }
    }

    fn count(&self, result: &str) {
        if let Some(m) = &self.metrics {
            m.secret_rotation(result);
        }
    }

    /// Rotates `name` now. `actor` is the admin who asked, or the daemon.
    pub async fn rotate(
        &self,
        name: &str,
        env: Option<&str>,
        actor: Actor,
        why: &str,
    ) -> Result<RotateOutcome> {
        let env = env.unwrap_or(&self.env).to_string();
        let Some(spec) = self.specs.get(name) else {
            let e = Error::usage(format!(
                "secret {name:?} has no rotation method: add rotate = {{ method = \"postgres\", route = \"…\" }} (or exec / webhook) to its [[secret]] entry"
            ));
            let ev = Self::event(
                &actor,
                "secret.rotate",
                name,
                &env,
                Decision::Error,
                e.message.clone(),
            );
            let _ = self.with_service(|s| s.record(&ev));
            return Err(e);
        };
        if env != self.env {
            return Err(Error::usage(format!(
                "secret {name:?} is rotated in the daemon's environment {:?}, not {env:?}",
                self.env
            )));
        }
        match self.run_claimed(spec, &env, &actor, why, None).await? {
            ClaimedRun::Rotated(outcome) => Ok(outcome),
            ClaimedRun::HeldElsewhere | ClaimedRun::NotDue => {
                let e = Error::unavailable(format!(
                    "secret {name:?} is being rotated by another node of the fleet right now; see `warden secret versions {name}` in a moment"
                ));
                let ev = Self::event(
                    &actor,
                    "secret.rotate",
                    name,
                    &env,
                    Decision::Error,
                    e.message.clone(),
                );
                let _ = self.with_service(|s| s.record(&ev));
                Err(e)
            }
        }
    }

    /// Claims the rotation of `spec` in the store, resolves a pending value
    /// left by an interrupted rotation, and rotates — when `period` is given,
    /// only if the rotation is still due. Counts, logs and audits the result.
    async fn run_claimed(
        &self,
        spec: &Spec,
        env: &str,
        actor: &Actor,
        why: &str,
        period: Option<Duration>,
    ) -> Result<ClaimedRun> {
        let name = spec.name.as_str();
        let gate = {
            let mut l = self
                .locks
                .lock()
                .map_err(|_| Error::internal("rotation state poisoned"))?;
            l.entry(name.to_string()).or_default().clone()
        };
        let _g = gate.lock().await;
        let job = claim_job(name, env);
        let ttl = claim_ttl(spec.timeout);
        let res = async {
            if !self.with_service(|s| s.claim(&job, ttl))? {
                return Ok(ClaimedRun::HeldElsewhere);
            }
            let ran = async {
                self.recover_one(spec, env).await?;
                if let Some(period) = period {
                    if !self.is_due(spec, env, period)? {
                        return Ok(ClaimedRun::NotDue);
                    }
                }
                self.rotate_locked(spec, env, actor, why)
                    .await
                    .map(ClaimedRun::Rotated)
            }
            .await;
            if let Err(e) = self.with_service(|s| s.release_claim(&job)) {
                tracing::warn!(secret = %name, "rotation claim not released (it lapses by itself): {}", e.message);
            }
            ran
        }
        .await;
        match &res {
            Ok(ClaimedRun::Rotated(_)) => {
                self.count("success");
                if let Ok(mut f) = self.failed_at.lock() {
                    f.remove(name);
                }
            }
            Ok(ClaimedRun::HeldElsewhere) => {
                tracing::debug!(secret = %name, "rotation claimed by another node");
            }
            Ok(ClaimedRun::NotDue) => {}
            Err(e) => {
                self.count("failure");
                if let Ok(mut f) = self.failed_at.lock() {
                    f.insert(name.to_string(), Instant::now());
                }
                tracing::error!(secret = %name, "rotation failed: {}", e.message);
                let ev = Self::event(
                    actor,
                    "secret.rotate",
                    name,
                    env,
                    Decision::Error,
                    e.message.clone(),
                );
                let _ = self.with_service(|s| s.record(&ev));
            }
        }
        res
    }

    /// Whether the latest version of `spec` is at least `period` old.
    fn is_due(&self, spec: &Spec, env: &str, period: Duration) -> Result<bool> {
        let Some(created) = self.with_service(|s| s.latest_created_at(&spec.name, env))? else {
            return Ok(false);
        };
        let Ok(at) =
            time::OffsetDateTime::parse(&created, &time::format_description::well_known::Rfc3339)
        else {
            return Ok(false);
        };
        let age = time::OffsetDateTime::now_utc() - at;
        Ok(age.whole_seconds() >= 0 && age.unsigned_abs() >= period)
    }

    async fn rotate_locked(
        &self,
        spec: &Spec,
        env: &str,
        actor: &Actor,
        why: &str,
    ) -> Result<RotateOutcome> {
        let name = spec.name.as_str();
        let (cur_version, current) = self
            .with_service(|s| s.latest(name, env))?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no secret {name:?} in environment {env:?}: store the current value first (`warden secret put {name}`)"
                ))
            })?;
        let new = random_password()?;
        fault_point("rotate.before_pending").await;
        // 1. pending, durable.
        let pending = pending_name(name);
        self.with_service(|s| {
            s.put_audited(
                &pending,
                env,
                &new,
                "warden rotation (pending)",
                Self::event(actor, "secret.rotate.pending", name, env, Decision::Allow,
                    format!("new value sealed as pending before changing the upstream ({}; current v{cur_version})", self.method_name(spec))),
            )
        })?;
        fault_point("rotate.pending_written").await;
        // 2. upstream.
        match self.apply(spec, &current, &new).await {
            Ok(()) => {}
            Err(Apply::Unchanged(m)) => {
                // Nothing changed upstream: drop the pending value.
                let ev = Self::event(
                    actor,
                    "secret.rotate.rollback",
                    name,
                    env,
                    Decision::Error,
                    format!(
                        "upstream unchanged ({m}); pending value discarded, v{cur_version} stays"
                    ),
                );
                let _ = self.with_service(|s| s.remove_audited(&pending, env, ev));
                return Err(Error::unavailable(format!(
                    "rotation of {name:?} failed, nothing changed: {m}"
                )));
            }
            Err(Apply::Unknown(m)) => {
                return Err(Error::unavailable(format!(
                    "rotation of {name:?} failed and the upstream state is unknown ({m}); the pending value is kept and resolved on the next attempt or restart"
                )));
            }
        }
        fault_point("rotate.upstream_changed").await;
        // 3. commit, 4. clean up.
        let version = self
            .commit(
                spec,
                env,
                &new,
                actor,
                format!("rotated ({}): {why}", self.method_name(spec)),
            )
            .await?;
        Ok(RotateOutcome {
            name: name.to_string(),
            env: env.to_string(),
            version,
            method: self.method_name(spec).to_string(),
        })
    }

    async fn commit(
        &self,
        spec: &Spec,
        env: &str,
        new: &[u8],
        actor: &Actor,
        reason: String,
    ) -> Result<u32> {
        let name = spec.name.as_str();
        let version = self.with_service(|s| {
            s.put_audited(
                name,
                env,
                new,
                "warden rotation",
                Self::event(actor, "secret.rotate", name, env, Decision::Allow, reason),
            )
        })?;
        // `put_audited` emptied the daemon's credential cache entry already;
        // this covers a rotator with a cache of its own (offline).
        self.credentials.invalidate(name, env);
        fault_point("rotate.committed").await;
        self.finish_pending(spec, env, actor)?;
        Ok(version)
    }

    fn finish_pending(&self, spec: &Spec, env: &str, actor: &Actor) -> Result<()> {
        let name = spec.name.as_str();
        let ev = Self::event(
            actor,
            "secret.rotate.finish",
            name,
            env,
            Decision::Allow,
            "pending value removed: the rotation is complete".into(),
        );
        self.with_service(|s| s.remove_audited(&pending_name(name), env, ev).map(|_| ()))
    }

    fn method_name(&self, spec: &Spec) -> &'static str {
        match spec.method {
            Method::Postgres { .. } => "postgres",
            Method::Changer { method, .. } => method,
            Method::Exec { .. } => "exec",
            Method::Webhook { .. } => "webhook",
        }
    }

    /// Resolves a pending value left by an interrupted rotation of every
    /// rotatable secret. Returns how many were resolved; errors are logged.
    pub async fn recover_all(&self) -> usize {
        let mut n = 0;
        for spec in self.specs.values() {
            let gate = match self.locks.lock() {
                Ok(mut l) => l.entry(spec.name.clone()).or_default().clone(),
                Err(_) => return n,
            };
            let _g = gate.lock().await;
            // Another node may be in the middle of this rotation: its
            // pending value is not ours to resolve while it holds the claim.
            let job = claim_job(&spec.name, &self.env);
            match self.with_service(|s| s.claim(&job, claim_ttl(spec.timeout))) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(secret = %spec.name, "interrupted rotation not resolved yet: {}", e.message);
                    continue;
                }
            }
            let recovered = self.recover_one(spec, &self.env).await;
            let _ = self.with_service(|s| s.release_claim(&job));
            match recovered {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    self.count("failure");
                    tracing::error!(secret = %spec.name, "interrupted rotation not resolved yet: {}", e.message);
                }
            }
        }
        n
    }

    /// Ok(true) when a pending value was found and resolved.
    async fn recover_one(&self, spec: &Spec, env: &str) -> Result<bool> {
        let name = spec.name.as_str();
        let Some((_, pending)) = self.with_service(|s| s.latest(&pending_name(name), env))? else {
            return Ok(false);
        };
        let actor = daemon_actor();
        let current = self.with_service(|s| s.latest(name, env))?;
        if let Some((v, cur)) = &current {
            if aws_lc_rs::constant_time::verify_slices_are_equal(cur, &pending).is_ok() {
                self.finish_pending(spec, env, &actor)?;
                self.count("recovered");
                tracing::warn!(secret = %name, "interrupted rotation finished (v{v} was already committed)");
                return Ok(true);
            }
        }
        match &spec.method {
            Method::Postgres { .. } | Method::Changer { .. } => {
                match self.probe(spec, &pending).await {
                    Ok(()) => {
                        self.commit(spec, env, &pending, &actor,
                            "recovered an interrupted rotation: the database already has the new password".into()).await?;
                        self.count("recovered");
                        tracing::warn!(secret = %name, "interrupted rotation finished: the database had the new password");
                    }
                    Err(Apply::Unchanged(_)) => {
                        let ev = Self::event(&actor, "secret.rotate.rollback", name, env, Decision::Allow,
                            "recovered an interrupted rotation: the database still has the current password; pending value discarded".into());
                        self.with_service(|s| s.remove_audited(&pending_name(name), env, ev))?;
                        self.count("recovered");
                        tracing::warn!(secret = %name, "interrupted rotation rolled back: the database kept the current password");
                    }
                    Err(Apply::Unknown(m)) => {
                        return Err(Error::unavailable(format!(
                            "cannot tell whether the database has the new password yet: {m}"
                        )));
                    }
                }
            }
            Method::Exec { .. } | Method::Webhook { .. } => {
                let cur = current.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
                match self.apply(spec, &cur, &pending).await {
                    Ok(()) => {
                        self.commit(
                            spec,
                            env,
                            &pending,
                            &actor,
                            "recovered an interrupted rotation: hook re-run with the pending value"
                                .into(),
                        )
                        .await?;
                        self.count("recovered");
                    }
                    Err(Apply::Unchanged(m)) | Err(Apply::Unknown(m)) => {
                        return Err(Error::unavailable(format!(
                            "re-running the rotation hook with the pending value failed: {m}"
                        )));
                    }
                }
            }
        }
        Ok(true)
    }

    /// postgres: does the pending password log in? Rejected → Unchanged.
    async fn probe(&self, spec: &Spec, password: &[u8]) -> std::result::Result<(), Apply> {
        if let Method::Changer { method, route } = &spec.method {
            return self.changer(method)?.probe(route, password).await;
        }
        let Method::Postgres {
            target,
            user,
            database,
            ..
        } = &spec.method
        else {
            return Err(Apply::Unknown("not a postgres rotation".into()));
        };
        let login = Login {
            user: user.clone(),
            password: Zeroizing::new(password.to_vec()),
            secret_label: format!("{} pending", spec.name),
            scram_min_iterations: scram::MIN_ITERATIONS,
        };
        match SqlSession::connect(target, database, &login, &self.scram).await {
            Ok(s) => {
                s.close().await;
                Ok(())
            }
            Err(UpstreamFailure::Rejected(m)) => Err(Apply::Unchanged(m)),
            Err(f) => Err(Apply::Unknown(sql::describe_failure(&f))),
        }
    }

    /// Step 2: make the upstream accept `new`.
    async fn apply(
        &self,
        spec: &Spec,
        current: &[u8],
        new: &[u8],
    ) -> std::result::Result<(), Apply> {
        match &spec.method {
            Method::Postgres {
                target,
                user,
                database,
                route,
            } => {
                let login = Login {
                    user: user.clone(),
                    password: Zeroizing::new(current.to_vec()),
                    secret_label: format!("{} current", spec.name),
                    scram_min_iterations: scram::MIN_ITERATIONS,
                };
                let mut s = SqlSession::connect(target, database, &login, &self.scram)
                    .await
                    .map_err(|f| {
                        // No session, no ALTER ROLE: nothing changed.
                        Apply::Unchanged(format!("route {route:?}: login as {user:?} with the current password failed: {}", sql::describe_failure(&f)))
                    })?;
                let verifier = scram::verifier(
                    &self.scram,
                    &format!("{} new", spec.name),
                    new,
                    scram::MIN_ITERATIONS,
                )
                .ok_or_else(|| Apply::Unchanged("the system random generator failed".into()))?;
                let (Some(q_user), Some(q_verifier)) =
                    (quote_ident(user), quote_literal(&verifier))
                else {
                    return Err(Apply::Unchanged("role name cannot be quoted".into()));
                };
                let text = Zeroizing::new(format!("ALTER ROLE {q_user} PASSWORD {q_verifier}"));
                drop(verifier);
                let r = s.execute(&text).await;
                match r {
                    Ok(_) => {
                        s.close().await;
                        Ok(())
                    }
                    Err(SqlError::Server(e)) => Err(Apply::Unchanged(format!(
                        "ALTER ROLE refused: {} {}",
                        e.code().unwrap_or("?????"),
                        e.message().unwrap_or("")
                    ))),
                    Err(e @ SqlError::Link(_)) => Err(Apply::Unknown(e.to_string())),
                }
            }
            Method::Changer { method, route } => {
                self.changer(method)?.change(route, current, new).await
            }
            Method::Exec { command } => {
                run_hook(command, &spec.name, &self.env, new, spec.timeout).await
            }
            Method::Webhook { url } => {
                post_webhook(url, &spec.name, &self.env, new, spec.timeout).await
            }
        }
    }

    /// Rotates every secret whose latest version is older than its period
    /// (on a fleet store, on the one node that claims it).
    pub async fn tick(&self) {
        for spec in self.specs.values() {
            let Some(period) = spec.period else { continue };
            if let Ok(f) = self.failed_at.lock() {
                if f.get(&spec.name)
                    .is_some_and(|t| t.elapsed() < RETRY_AFTER.min(period))
                {
                    continue;
                }
            }
            if self.is_due(spec, &self.env, period).unwrap_or(false) {
                let _ = self
                    .run_claimed(
                        spec,
                        &self.env,
                        &daemon_actor(),
                        "rotation_period elapsed",
                        Some(period),
                    )
                    .await;
            }
        }
    }
}

/// Result of step 2 when it did not succeed.
/// Why changing the upstream failed.
#[derive(Debug)]
pub enum Apply {
    /// The upstream certainly still accepts the current value.
    Unchanged(String),
    /// It may or may not have changed (e.g. the link broke after ALTER ROLE was sent).
    Unknown(String),
}

/// exec: the program gets the new value on stdin; exit 0 means done.
async fn run_hook(
    command: &[String],
    name: &str,
    env: &str,
    value: &[u8],
    timeout: Duration,
) -> std::result::Result<(), Apply> {
    let Some((prog, args)) = command.split_first() else {
        return Err(Apply::Unchanged("rotate.command is empty".into()));
    };
    let (prog, args, name, env) = (
        prog.clone(),
        args.to_vec(),
        name.to_string(),
        env.to_string(),
    );
    let value = Zeroizing::new(value.to_vec());
    let res = tokio::task::spawn_blocking(move || -> std::result::Result<(), Apply> {
        let mut child = std::process::Command::new(&prog)
            .args(&args)
            .env("WARDEN_SECRET_NAME", &name)
            .env("WARDEN_SECRET_ENV", &env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| Apply::Unchanged(format!("cannot run {prog}: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&value);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(Apply::Unchanged(format!("{prog} exited with {st} (the hook must exit non-zero only when it changed nothing)")))
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Apply::Unknown(format!("{prog} did not finish within {} s and was killed", timeout.as_secs())));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(Apply::Unknown(format!("waiting for {prog}: {e}"))),
            }
        }
    })
    .await;
    res.unwrap_or_else(|e| Err(Apply::Unknown(format!("hook task failed: {e}"))))
}

/// webhook: `POST url` with the new value as the body; any 2xx means done.
async fn post_webhook(
    url: &str,
    name: &str,
    env: &str,
    value: &[u8],
    timeout: Duration,
) -> std::result::Result<(), Apply> {
    let headers = [("X-Warden-Secret", name), ("X-Warden-Env", env)];
    match crate::webhook::post(url, "application/octet-stream", &headers, value, timeout).await {
        Ok(status) if (200..300).contains(&status) => Ok(()),
        Ok(status) => Err(Apply::Unchanged(format!("webhook answered HTTP {status}"))),
        Err(crate::webhook::PostError::NotSent(m)) => Err(Apply::Unchanged(m)),
        Err(crate::webhook::PostError::Unknown(m)) => Err(Apply::Unknown(m)),
    }
}
