//! The secrets service: the one place where secret operations happen, whether
//! the caller came through the daemon's admin socket or a CLI verb working
//! offline on the data dir. Every operation — allowed, denied or failed — is
//! an audit record, and a mutation commits only after its record is durable.

use crate::audit::{Actor, ActorKind, AuditLog, Decision, Event, Target};
use crate::auditor::Auditor;
use crate::authority::{bundle_pem_from_store, check_not_reserved, daemon_actor, StoreAccess};
use crate::error::{Error, ErrorKind, Result};
use crate::masterkey::{self, Kek, KekState, SealConfig, UnsealProgress, Unsealer};
use crate::metrics::Metrics;
use crate::paths;
use crate::store::{
    validate_env, validate_secret_name, NewVersion, SecretStore, SecretSummary, VersionInfo,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Who is asking, as established by SO_PEERCRED (daemon) or the process's own
/// credentials (offline CLI).
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<u32>,
    /// May read secret values back (`secret get --reveal`): root or the uid the
    /// store belongs to.
    pub is_admin: bool,
}

impl Caller {
    /// The current process as caller (offline CLI): it can read the key file,
    /// so it is an admin of this data dir.
    pub fn this_process() -> Caller {
        Caller {
            uid: paths::euid(),
            pid: Some(std::process::id()),
            is_admin: true,
        }
    }

    /// The audit actor of an admin caller.
    pub fn actor(&self) -> Actor {
        Actor {
            kind: ActorKind::Admin,
            uid: Some(self.uid),
            user: paths::user_name(self.uid),
            pid: self.pid,
            exe: None,
            workload: None,
        }
    }
}

/// Store-wide policy taken from the configuration.
#[derive(Debug, Clone)]
pub struct StorePolicy {
    pub default_env: String,
    pub max_versions: u32,
    pub per_secret_max_versions: HashMap<String, u32>,
    /// `[store]`: which database holds the store and how to reach it.
    pub store: crate::config::Store,
}

impl StorePolicy {
    pub fn from_config(cfg: &crate::config::Config) -> StorePolicy {
        StorePolicy {
            default_env: cfg.environment.clone(),
            max_versions: cfg.store.max_versions,
            per_secret_max_versions: cfg
                .secrets
                .iter()
                .filter_map(|s| s.max_versions.map(|m| (s.name.clone(), m)))
                .collect(),
            store: cfg.store.clone(),
        }
    }

    fn keep_for(&self, name: &str) -> u32 {
        self.per_secret_max_versions
            .get(name)
            .copied()
            .unwrap_or(self.max_versions)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub data_dir: PathBuf,
    pub sealed: bool,
    pub kek_source: String,
    pub kek_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unseal_progress: Option<UnsealProgress>,
    pub secrets: usize,
    pub default_env: String,
    pub daemon_pid: Option<u32>,
    /// This node's record on a store shared by a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_node: Option<crate::fleet::NodeRecord>,
    /// Where this node's copy of its audit log in the shared store stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_copy: Option<crate::fleet_views::ShipReport>,
    /// Why the shared store could not be read (`secrets` is then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_unreachable: Option<String>,
}

pub struct SecretService {
    data_dir: PathBuf,
    store: SecretStore,
    /// The audit log's owner (its own lock: see [`crate::auditor`]).
    audit: Auditor,
    seal: SealConfig,
    kek: KekState,
    policy: StorePolicy,
    metrics: Option<Metrics>,
    daemon: bool,
    /// The daemon's credential cache, emptied by every change of a secret.
    credentials: Option<std::sync::Arc<crate::credentials::CredentialCache>>,
    /// The daemon's fleet shipper (PostgreSQL store), for `status`.
    shipping: Option<std::sync::Arc<crate::fleet_views::ShipStatus>>,
}

/// Opens the store (`[store]`: the SQLite file in the data dir, or the
/// PostgreSQL database), the audit log and the seal configuration of an
/// initialised data dir, after checking its permissions. The caller holds the
/// data dir lock.
pub fn open_store(
    data_dir: &Path,
    config: &crate::config::Store,
) -> Result<(SecretStore, SealConfig, AuditLog)> {
    paths::check_private_dir(data_dir)?;
    let sqlite = config.backend == crate::config::StoreBackend::Sqlite;
    if sqlite && !data_dir.join(paths::STORE_FILE).exists() {
        return Err(Error::usage(format!(
            "{} is not initialised (no {}): run `warden init --data-dir {}`",
            data_dir.display(),
            paths::STORE_FILE,
            data_dir.display()
        )));
    }
    let (backend, at) = crate::store::open_backend(data_dir, config)?;
    let store = SecretStore::new(backend);
    let seal_json = match store.backend().meta_get(masterkey::SEAL_META_KEY)? {
        Some(json) => json,
        None if sqlite => {
            return Err(Error::integrity(format!(
                "{at} has no seal configuration: the store was not initialised by `warden init` or was damaged"
            )))
        }
        None => {
            return Err(Error::usage(format!(
                "the {at} is not initialised: run `warden init --data-dir {}` on one node first",
                data_dir.display()
            )))
        }
    };
    let seal = SealConfig::from_json(&seal_json)?;
    let audit = AuditLog::open(&data_dir.join(paths::AUDIT_FILE))?;
    Ok((store, seal, audit))
}

impl SecretService {
    /// Opens an initialised data dir and loads its KEK (or starts sealed).
    pub fn open(data_dir: &Path, policy: StorePolicy, daemon: bool) -> Result<SecretService> {
        let (mut store, seal, mut audit) = open_store(data_dir, &policy.store)?;
        // A node removed from its fleet uses the store no more, through the
        // daemon or an offline verb.
        if let Some(name) = store.backend().node().map(str::to_string) {
            crate::fleet::check_member(store.backend_mut(), &name)?;
        }
        if daemon {
            // The daemon holds the data dir lock for its lifetime: no other
            // process appends to the log meanwhile.
            audit.set_sole_writer();
        }
        let kek = masterkey::load_kek(data_dir, &seal)?;
        Ok(SecretService {
            data_dir: data_dir.to_path_buf(),
            store,
            audit: Auditor::new(audit),
            seal,
            kek,
            policy,
            metrics: None,
            daemon,
            credentials: None,
            shipping: None,
        })
    }

    pub fn set_metrics(&mut self, m: Metrics) {
        m.set_sealed(self.is_sealed());
        self.audit.set_metrics(m.clone());
        self.metrics = Some(m);
    }

    /// `status` reports where the fleet shipper's audit copy stands.
    pub fn set_ship_status(&mut self, status: std::sync::Arc<crate::fleet_views::ShipStatus>) {
        self.shipping = Some(status);
    }

    /// Every later change of a secret invalidates its entry in `cache`
    /// before the change is acknowledged (revocation is immediate).
    pub fn set_credential_cache(
        &mut self,
        cache: std::sync::Arc<crate::credentials::CredentialCache>,
    ) {
        self.credentials = Some(cache);
    }

    /// Drops (name, env) from the credential cache after a change.
    fn changed(&self, name: &str, env: &str) {
        if let Some(c) = &self.credentials {
            c.invalidate(name, env);
        }
    }

    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    pub fn is_sealed(&self) -> bool {
        matches!(self.kek, KekState::Sealed(_))
    }

    pub fn seal_config(&self) -> &SealConfig {
        &self.seal
    }

    fn env_or_default(&self, env: Option<&str>) -> Result<String> {
        let env = env.unwrap_or(&self.policy.default_env).to_string();
        validate_env(&env)?;
        Ok(env)
    }

    fn kek(&self) -> Result<&Kek> {
        match &self.kek {
            KekState::Unsealed(k) => Ok(k),
            KekState::Sealed(u) => {
                let p = u.progress();
                Err(Error::sealed(format!(
                    "warden is sealed ({} of {} unseal shares provided): nothing secret is served until `warden unseal` receives {} more",
                    p.provided,
                    p.threshold,
                    p.threshold - p.provided
                )))
            }
        }
    }

    /// Reads a small metadata value (not secret; e.g. frozen workloads).
    pub fn meta_get(&self, key: &str) -> Result<Option<String>> {
        self.store.backend().meta_get(key)
    }

    /// Writes a small metadata value (not secret).
    pub fn meta_set(&mut self, key: &str, value: &str) -> Result<()> {
        self.store.backend_mut().meta_set(key, value)
    }

    /// Updates a metadata value atomically against other nodes' updates.
    pub fn meta_update(
        &mut self,
        key: &str,
        update: &mut dyn FnMut(Option<String>) -> Result<String>,
    ) -> Result<()> {
        self.store.backend_mut().meta_update(key, update)
    }

    /// This node's name when the store is shared by a fleet, else None.
    pub fn fleet_node(&self) -> Option<String> {
        self.store.backend().node().map(str::to_string)
    }

    /// Claims a scheduled job for this node (see
    /// [`crate::store::SecretBackend::claim`]).
    pub fn claim(&mut self, job: &str, ttl: std::time::Duration) -> Result<bool> {
        self.store.backend_mut().claim(job, ttl)
    }

    pub fn release_claim(&mut self, job: &str) -> Result<()> {
        self.store.backend_mut().release_claim(job)
    }

    /// The audit log's owner, for writers that must not take this
    /// service's lock (the session journal).
    pub fn auditor(&self) -> Auditor {
        self.audit.clone()
    }

    /// Appends an audit record; counts it in the metrics.
    pub fn record(&mut self, event: &Event) -> Result<()> {
        self.audit.record(event)
    }

    /// Why the audit log refuses records after a failed background `fsync`.
    pub fn audit_sync_failure(&self) -> Option<String> {
        self.audit.sync_failure()
    }

    /// Records a refusal or a failure. If even that cannot be written the
    /// original error still wins (the action is refused either way).
    fn record_outcome(&mut self, caller: &Caller, action: &str, target: Target, err: &Error) {
        let decision = match err.kind {
            ErrorKind::Denied | ErrorKind::Sealed => Decision::Deny,
            _ => Decision::Error,
        };
        let _ = self.record(&Event {
            actor: caller.actor(),
            action: action.into(),
            target,
            decision,
            reason: err.message.clone(),
        });
    }

    /// Refuses (and audits) a user operation on one of warden's own keys.
    fn refuse_reserved(
        &mut self,
        caller: &Caller,
        action: &str,
        name: &str,
        env: &str,
    ) -> Result<()> {
        check_not_reserved(name).inspect_err(|e| {
            self.record_outcome(caller, action, Self::secret_target(name, env, None), e);
        })
    }

    fn secret_target(name: &str, env: &str, version: Option<u32>) -> Target {
        Target {
            secret: Some(name.into()),
            env: Some(env.into()),
            version,
            ..Target::default()
        }
    }

    pub fn put(
        &mut self,
        caller: &Caller,
        name: &str,
        env: Option<&str>,
        value: &[u8],
    ) -> Result<u32> {
        self.put_from(caller, name, env, value, None)
    }

    /// [`SecretService::put`] for a value `warden import` found in a file:
    /// the audit record's action is `secret.import` and its reason names
    /// `origin` (files, lines and scan rules — never the value).
    pub fn put_from(
        &mut self,
        caller: &Caller,
        name: &str,
        env: Option<&str>,
        value: &[u8],
        origin: Option<&str>,
    ) -> Result<u32> {
        let action = if origin.is_some() {
            "secret.import"
        } else {
            "secret.put"
        };
        let env = self.env_or_default(env)?;
        validate_secret_name(name)?;
        self.refuse_reserved(caller, action, name, &env)?;
        if let Some(e) = self.kek().err() {
            self.record_outcome(caller, action, Self::secret_target(name, &env, None), &e);
            return Err(e);
        }
        let keep = self.policy.keep_for(name);
        let actor = caller.actor();
        let created_by = match &actor.user {
            Some(u) => format!("uid {} ({u})", caller.uid),
            None => format!("uid {}", caller.uid),
        };
        // Split borrows: the commit hook appends to the audit log while the
        // store holds its transaction open.
        let KekState::Unsealed(kek) = &self.kek else {
            return Err(Error::internal("KEK state changed unexpectedly"));
        };
        let audit = &self.audit;
        let mut hook = |version: u32| -> Result<()> {
            audit.record(&Event {
                actor: actor.clone(),
                action: action.into(),
                target: Self::secret_target(name, &env, Some(version)),
                decision: Decision::Allow,
                reason: match origin {
                    Some(o) => {
                        format!("new version {version}; keeping at most {keep}; imported from {o}")
                    }
                    None => format!("new version {version}; keeping at most {keep}"),
                },
            })
        };
        let new = NewVersion {
            name,
            env: &env,
            value,
            created_by: &created_by,
            keep,
        };
        let res = self.store.put(kek, new, &mut hook);
        if res.is_ok() {
            self.changed(name, &env);
        }
        if let Err(e) = &res {
            self.record_outcome(caller, action, Self::secret_target(name, &env, None), e);
        }
        res
    }

    pub fn list(&mut self, caller: &Caller, env: Option<&str>) -> Result<Vec<SecretSummary>> {
        if let Some(e) = env {
            validate_env(e)?;
        }
        let target = Target {
            env: env.map(String::from),
            ..Target::default()
        };
        self.record(&Event {
            actor: caller.actor(),
            action: "secret.list".into(),
            target,
            decision: Decision::Allow,
            reason: String::new(),
        })?;
        let mut list = self.store.backend().list(env)?;
        if env.is_none() {
            // warden's own keys show only when their environment is asked for.
            list.retain(|s| check_not_reserved(&s.name).is_ok());
        }
        Ok(list)
    }

    pub fn versions(
        &mut self,
        caller: &Caller,
        name: &str,
        env: Option<&str>,
    ) -> Result<Vec<VersionInfo>> {
        let env = self.env_or_default(env)?;
        validate_secret_name(name)?;
        self.record(&Event {
            actor: caller.actor(),
            action: "secret.versions".into(),
            target: Self::secret_target(name, &env, None),
            decision: Decision::Allow,
            reason: String::new(),
        })?;
        let v = self.store.backend().versions(name, &env)?;
        if v.is_empty() {
            return Err(Error::not_found(format!(
                "no secret {name:?} in environment {env:?}"
            )));
        }
        Ok(v)
    }

    pub fn remove(&mut self, caller: &Caller, name: &str, env: Option<&str>) -> Result<u32> {
        let env = self.env_or_default(env)?;
        validate_secret_name(name)?;
        self.refuse_reserved(caller, "secret.rm", name, &env)?;
        let actor = caller.actor();
        let audit = &self.audit;
        let mut hook = |removed: u32| -> Result<()> {
            audit.record(&Event {
                actor: actor.clone(),
                action: "secret.rm".into(),
                target: Self::secret_target(name, &env, None),
                decision: Decision::Allow,
                reason: format!("{removed} version(s) removed"),
            })
        };
        let removed = self.store.backend_mut().remove(name, &env, &mut hook)?;
        self.changed(name, &env);
        if removed == 0 {
            let e = Error::not_found(format!("no secret {name:?} in environment {env:?}"));
            self.record_outcome(
                caller,
                "secret.rm",
                Self::secret_target(name, &env, None),
                &e,
            );
            return Err(e);
        }
        Ok(removed)
    }

    /// Returns a secret value to an admin. Audited before the value is released.
    pub fn reveal(
        &mut self,
        caller: &Caller,
        name: &str,
        env: Option<&str>,
        version: Option<u32>,
    ) -> Result<(u32, Zeroizing<Vec<u8>>)> {
        let env = self.env_or_default(env)?;
        validate_secret_name(name)?;
        self.refuse_reserved(caller, "secret.reveal", name, &env)?;
        let target = Self::secret_target(name, &env, version);
        if !caller.is_admin {
            let e = Error::denied(format!(
                "uid {} may not read secret values: `secret get --reveal` is for root or the uid that runs warden",
                caller.uid
            ));
            self.record_outcome(caller, "secret.reveal", target, &e);
            return Err(e);
        }
        let res = self
            .kek()
            .and_then(|kek| self.store.get(kek, name, &env, version));
        match res {
            Ok((v, value)) => {
                self.record(&Event {
                    actor: caller.actor(),
                    action: "secret.reveal".into(),
                    target: Self::secret_target(name, &env, Some(v)),
                    decision: Decision::Allow,
                    reason: "value returned to an admin".into(),
                })?;
                Ok((v, value))
            }
            Err(e) => {
                self.record_outcome(caller, "secret.reveal", target, &e);
                Err(e)
            }
        }
    }

    /// A secret value for injection into an upstream login (not shown to
    /// anyone; the session that uses it is audited by the caller).
    pub fn fetch_for_injection(&self, name: &str, env: &str) -> Result<(u32, Zeroizing<Vec<u8>>)> {
        let kek = self.kek()?;
        self.store.get(kek, name, env, None)
    }

    /// Feeds one unseal share.
    pub fn unseal(&mut self, caller: &Caller, share: &str) -> Result<UnsealProgress> {
        let KekState::Sealed(unsealer) = &mut self.kek else {
            return Ok(UnsealProgress {
                provided: 0,
                threshold: 0,
                unsealed: true,
            });
        };
        let res = unsealer.submit(share);
        match res {
            Ok((progress, Some(kek))) => {
                self.kek = KekState::Unsealed(kek);
                if let Some(m) = &self.metrics {
                    m.set_sealed(false);
                }
                self.record(&Event {
                    actor: caller.actor(),
                    action: "unseal".into(),
                    target: Target::default(),
                    decision: Decision::Allow,
                    reason: format!("unsealed with {} shares", progress.threshold),
                })?;
                Ok(progress)
            }
            Ok((progress, None)) => {
                self.record(&Event {
                    actor: caller.actor(),
                    action: "unseal.share".into(),
                    target: Target::default(),
                    decision: Decision::Allow,
                    reason: format!(
                        "share accepted: {} of {}",
                        progress.provided, progress.threshold
                    ),
                })?;
                Ok(progress)
            }
            Err(e) => {
                self.record_outcome(caller, "unseal.share", Target::default(), &e);
                Err(e)
            }
        }
    }

    /// Store, KEK and audit log for the identity authority; refused while sealed.
    pub fn store_access(&mut self) -> Result<StoreAccess<'_>> {
        let KekState::Unsealed(kek) = &self.kek else {
            return Err(self
                .kek()
                .err()
                .unwrap_or_else(|| Error::sealed("warden is sealed")));
        };
        Ok(StoreAccess {
            store: &mut self.store,
            kek,
            audit: &self.audit,
        })
    }

    /// Runs the identity authority's maintenance (load or create the CA,
    /// refresh SVIDs, rotate CAs) against this store; waits 1 s while
    /// sealed. Returns how long to wait before the next call.
    pub fn maintain_identity(
        &mut self,
        identity: &crate::authority::IdentityHandle,
    ) -> Result<std::time::Duration> {
        if self.is_sealed() {
            return Ok(std::time::Duration::from_secs(1));
        }
        let metrics = self.metrics.clone();
        let access = self.store_access()?;
        identity.maintain(access, metrics.as_ref())
    }

    /// The trust bundle PEM from the store (works while sealed: certificates are public).
    pub fn bundle_pem(&self) -> Result<String> {
        bundle_pem_from_store(&self.store)
    }

    pub fn status(&self) -> Result<Status> {
        // A shared store that cannot be reached does not stop the status
        // (it shows the outage, and the audit copy's lag).
        let (secrets, store_unreachable) = match self.store.backend().list(None) {
            Ok(list) => (
                list.iter()
                    .filter(|s| check_not_reserved(&s.name).is_ok())
                    .count(),
                None,
            ),
            Err(e) if e.kind == crate::error::ErrorKind::Unavailable => (0, Some(e.message)),
            Err(e) => return Err(e),
        };
        Ok(Status {
            data_dir: self.data_dir.clone(),
            sealed: self.is_sealed(),
            kek_source: self.seal.source.to_string(),
            kek_id: self.seal.kek_id.clone(),
            unseal_progress: match &self.kek {
                KekState::Sealed(u) => Some(u.progress()),
                KekState::Unsealed(_) => None,
            },
            secrets,
            default_env: self.policy.default_env.clone(),
            daemon_pid: self.daemon.then(std::process::id),
            fleet_node: match self.fleet_node() {
                // Status answers even when the store does not.
                Some(name) => crate::fleet::record_of(self.store.backend(), &name)
                    .ok()
                    .flatten(),
                None => None,
            },
            audit_copy: self.shipping.as_ref().map(|s| s.report()),
            store_unreachable,
        })
    }

    /// Every user secret with its version count (metadata only, not audited:
    /// for metrics and readiness).
    pub fn inventory(&self) -> Result<Vec<SecretSummary>> {
        let mut list = self.store.backend().list(None)?;
        list.retain(|s| check_not_reserved(&s.name).is_ok());
        Ok(list)
    }

    /// When the current version of `name` in `env` was written (metadata
    /// only, not audited: for metrics).
    pub fn current_version_created_at(&self, name: &str, env: &str) -> Result<Option<String>> {
        let v = self.store.backend().versions(name, env)?;
        Ok(v.into_iter()
            .max_by_key(|v| v.version)
            .map(|v| v.created_at))
    }

    /// Records a daemon lifecycle event.
    /// Registers this node in the fleet's node records at start (a removed
    /// node is refused, naming the fix). Nothing to do on a SQLite store.
    pub fn fleet_register(&mut self) -> Result<Option<crate::fleet::NodeRecord>> {
        let Some(name) = self.fleet_node() else {
            return Ok(None);
        };
        crate::fleet::check_member(self.store.backend_mut(), &name).map(Some)
    }

    fn node_target(detail: String) -> Target {
        Target {
            detail: Some(detail),
            ..Target::default()
        }
    }

    /// `warden node token`: a single-use join token valid for `ttl` (admin
    /// only). The record names the token's id, never its secret.
    pub fn node_token(
        &mut self,
        caller: &Caller,
        ttl: std::time::Duration,
    ) -> Result<crate::fleet::NewToken> {
        let res = (|| {
            if !caller.is_admin {
                return Err(Error::denied(format!(
                    "uid {} may not make join tokens: only root or the daemon's uid may",
                    caller.uid
                )));
            }
            self.kek()?;
            let by = match paths::user_name(caller.uid) {
                Some(u) => format!("uid {} ({u})", caller.uid),
                None => format!("uid {}", caller.uid),
            };
            let KekState::Unsealed(kek) = &self.kek else {
                return Err(Error::internal("KEK state changed unexpectedly"));
            };
            crate::fleet::create_token(self.store.backend_mut(), kek, &self.seal, ttl, &by)
        })();
        match &res {
            Ok(t) => self.record(&Event {
                actor: caller.actor(),
                action: "node.token".into(),
                target: Self::node_target(format!(
                    "join token {} valid until {}{}",
                    t.id,
                    t.expires_at,
                    if t.carries_key {
                        ", carries a wrapped copy of the master key"
                    } else {
                        ""
                    }
                )),
                decision: Decision::Allow,
                reason: "single-use join token made".into(),
            })?,
            Err(e) => self.record_outcome(caller, "node.token", Target::default(), e),
        }
        res
    }

    /// `warden node list`: every node of the fleet (expired tokens' key
    /// copies are erased on the way).
    pub fn node_list(&mut self, caller: &Caller) -> Result<Vec<crate::fleet::NodeRecord>> {
        let list = crate::fleet::list(self.store.backend());
        if list.is_ok() {
            if let Err(e) = crate::fleet::purge_expired_tokens(self.store.backend_mut()) {
                tracing::warn!("expired join tokens not purged: {}", e.message);
            }
        }
        self.record(&Event {
            actor: caller.actor(),
            action: "node.list".into(),
            target: Target::default(),
            decision: if list.is_ok() {
                Decision::Allow
            } else {
                Decision::Error
            },
            reason: String::new(),
        })?;
        list
    }

    /// `warden node remove ID` (admin only): the node is marked removed and
    /// its intermediate CA revoked (see [`crate::fleet::remove`]).
    pub fn node_remove(&mut self, caller: &Caller, id: &str) -> Result<crate::fleet::NodeRecord> {
        let res = if caller.is_admin {
            let by = format!(
                "uid {} on {}",
                caller.uid,
                self.fleet_node().unwrap_or_default()
            );
            crate::fleet::remove(self.store.backend_mut(), id, &by)
        } else {
            Err(Error::denied(format!(
                "uid {} may not remove nodes: only root or the daemon's uid may",
                caller.uid
            )))
        };
        match &res {
            Ok(r) => self.record(&Event {
                actor: caller.actor(),
                action: "node.remove".into(),
                target: Self::node_target(format!(
                    "node {} ({}); revoked intermediate(s): {}",
                    r.id,
                    r.name,
                    if r.revoked_intermediates.is_empty() {
                        "none".to_string()
                    } else {
                        r.revoked_intermediates.join(", ")
                    }
                )),
                decision: Decision::Allow,
                reason: "removed from the fleet".into(),
            })?,
            Err(e) => self.record_outcome(caller, "node.remove", Self::node_target(id.into()), e),
        }
        res
    }

    pub fn record_daemon(&mut self, action: &str, reason: String) -> Result<()> {
        self.record(&Event {
            actor: daemon_actor(),
            action: action.into(),
            target: Target::default(),
            decision: Decision::Allow,
            reason,
        })
    }
}

/// Operations for warden's own writers (rotation, leases): no caller checks,
/// reserved names allowed, every mutation audited inside its transaction.
impl SecretService {
    /// The latest version of (name, env), or None when there is none.
    pub fn latest(&self, name: &str, env: &str) -> Result<Option<(u32, Zeroizing<Vec<u8>>)>> {
        let kek = self.kek()?;
        match self.store.get(kek, name, env, None) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores `value` as the next version of (name, env); `event` (its
    /// version filled in) is appended before the write commits.
    pub fn put_audited(
        &mut self,
        name: &str,
        env: &str,
        value: &[u8],
        created_by: &str,
        event: Event,
    ) -> Result<u32> {
        let KekState::Unsealed(kek) = &self.kek else {
            return Err(self
                .kek()
                .err()
                .unwrap_or_else(|| Error::sealed("warden is sealed")));
        };
        let keep = self.policy.keep_for(name);
        let audit = &self.audit;
        let mut hook = |version: u32| -> Result<()> {
            let mut ev = event.clone();
            ev.target.version = Some(version);
            audit.record(&ev)
        };
        let new = NewVersion {
            name,
            env,
            value,
            created_by,
            keep,
        };
        let version = self.store.put(kek, new, &mut hook)?;
        self.changed(name, env);
        Ok(version)
    }

    /// Removes every version of (name, env), appending `event` before the commit.
    pub fn remove_audited(&mut self, name: &str, env: &str, event: Event) -> Result<u32> {
        let audit = &self.audit;
        let mut hook = |_removed: u32| -> Result<()> { audit.record(&event) };
        let removed = self.store.backend_mut().remove(name, env, &mut hook)?;
        self.changed(name, env);
        Ok(removed)
    }

    /// When the latest version of (name, env) was stored, if it exists.
    pub fn latest_created_at(&self, name: &str, env: &str) -> Result<Option<String>> {
        Ok(self
            .store
            .backend()
            .versions(name, env)?
            .into_iter()
            .max_by_key(|v| v.version)
            .map(|v| v.created_at))
    }

    pub fn lease_put(&mut self, lease: &crate::store::LeaseRow) -> Result<()> {
        self.store.backend_mut().lease_put(lease)
    }

    /// Lease rows in one store transaction (one fsync).
    pub fn lease_put_many(&mut self, leases: &[crate::store::LeaseRow]) -> Result<()> {
        self.store.backend_mut().lease_put_many(leases)
    }

    pub fn lease_delete(&mut self, id: &str) -> Result<()> {
        self.store.backend_mut().lease_delete(id)
    }

    pub fn lease_list(&self) -> Result<Vec<crate::store::LeaseRow>> {
        self.store.backend().lease_list()
    }

    /// Lease `id` held by any node of a fleet, with the node's name.
    pub fn lease_of_any_node(&self, id: &str) -> Result<Option<(String, crate::store::LeaseRow)>> {
        self.store.backend().lease_of_any_node(id)
    }

    /// Every (key, value) of the meta table under `prefix`.
    pub fn meta_list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.store.backend().meta_list(prefix)
    }

    /// Removes a metadata key.
    pub fn meta_delete(&mut self, key: &str) -> Result<()> {
        self.store.backend_mut().meta_delete(key)
    }
}

/// Runs `f` under the service lock with store and audit work (fsyncs) kept
/// off the async workers' hot path: `block_in_place` on a multi-threaded
/// runtime (the daemon's main one, the CLI's); on a single-threaded one (a
/// PostgreSQL session shard, which has no other worker to hand its tasks
/// to) and outside a runtime, in place.
pub fn blocking<T>(
    service: &std::sync::Mutex<SecretService>,
    f: impl FnOnce(&mut SecretService) -> Result<T>,
) -> Result<T> {
    let locked = || {
        let mut s = service
            .lock()
            .map_err(|_| Error::internal("service state poisoned"))?;
        f(&mut s)
    };
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(locked)
    } else {
        locked()
    }
}

/// Recovers the KEK from shares given up front (KEK rotation, offline).
pub fn unseal_offline(seal: &SealConfig, shares: &[Zeroizing<String>]) -> Result<Kek> {
    let mut u = Unsealer::new(seal)?;
    for s in shares {
        if let (_, Some(kek)) = u.submit(s)? {
            return Ok(kek);
        }
    }
    let p = u.progress();
    Err(Error::sealed(format!(
        "only {} of {} unseal shares were given on stdin",
        p.provided, p.threshold
    )))
}
