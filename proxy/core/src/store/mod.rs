//! The secret store: named, versioned, environment-scoped secrets under envelope
//! encryption.
//!
//! Layering: [`SecretBackend`] is the storage trait (rows of opaque bytes and
//! metadata; SQLite is the embedded default in [`sqlite`], [`postgres`] a
//! database several nodes share). [`SecretStore`] sits on top and does the
//! cryptography, so no backend ever sees a plaintext value or a data key.
//!
//! Envelope scheme, per secret version:
//! - a fresh 256-bit data key (DEK) seals the value with AES-256-GCM, associated
//!   data = `warden.secret.v1 ‖ name ‖ env ‖ version`;
//! - the key-encryption key (KEK) wraps the DEK with AES-256-GCM, associated
//!   data = `warden.dek.v1 ‖ name ‖ env ‖ version ‖ kek id`.
//!
//! Binding (name, env, version) into both layers means a ciphertext or wrapped
//! key copied into another row fails to open instead of yielding the wrong
//! secret. KEK rotation rewraps DEKs and never touches value ciphertexts.

#[cfg(test)]
pub(crate) mod fleet_sqlite;
pub mod health;
pub mod postgres;
pub mod sqlite;

use crate::crypto::Key256;
use crate::error::{Error, Result};
use crate::masterkey::Kek;
use zeroize::Zeroizing;

/// Largest secret value accepted (certificates and key bundles fit easily).
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// The sealed material of one version, as stored.
pub struct SealedVersion {
    pub kek_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

pub struct VersionRow {
    pub version: u32,
    pub sealed: SealedVersion,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct VersionInfo {
    pub version: u32,
    pub created_at: String,
    pub created_by: String,
    pub kek_id: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SecretSummary {
    pub name: String,
    pub env: String,
    pub latest_version: u32,
    pub versions_kept: u32,
    pub updated_at: String,
}

/// One wrapped data key, as handed to a KEK rotation.
pub struct WrappedKeyRow {
    pub name: String,
    pub env: String,
    pub version: u32,
    pub kek_id: String,
    pub wrapped_key: Vec<u8>,
}

/// Called with the version number a write will get, inside the write's
/// transaction; an error aborts the write. Used to append the audit record
/// before the change commits (fail closed).
pub type CommitHook<'a> = &'a mut dyn FnMut(u32) -> Result<()>;

/// Given a row's wrapped key, returns (new kek id, newly wrapped key).
pub type RewrapFn<'a> = &'a mut dyn FnMut(&WrappedKeyRow) -> Result<(String, Vec<u8>)>;

/// A value to store as the next version of (name, env).
pub struct NewVersion<'a> {
    pub name: &'a str,
    pub env: &'a str,
    pub value: &'a [u8],
    /// Who stored it (shown by `secret versions`).
    pub created_by: &'a str,
    /// How many versions to keep, this one included.
    pub keep: u32,
}

/// One dynamic-credential lease as persisted (no password: that lives only
/// in the memory of the process that created the role). Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRow {
    pub id: String,
    pub route: String,
    pub workload: String,
    pub role: String,
    /// `creating` (written before CREATE ROLE), `active`, `revoking`.
    pub state: String,
    /// pid of the warden process that holds the lease's password.
    pub owner_pid: u32,
    pub created_at: i64,
    pub expires_at: i64,
    pub max_expires_at: i64,
}

/// Storage for sealed rows and small metadata. Implementations must make each
/// method atomic (all or nothing) and durable when it returns.
pub trait SecretBackend: Send {
    fn meta_get(&self, key: &str) -> Result<Option<String>>;
    fn meta_set(&mut self, key: &str, value: &str) -> Result<()>;
    /// Every (key, value) whose key starts with `prefix`, by key.
    fn meta_list(&self, prefix: &str) -> Result<Vec<(String, String)>>;
    /// Assigns the next version of (name, env) (numbers never repeat, even after
    /// `remove`), stores what `seal` returns for it, prunes all but the newest
    /// `keep` versions, runs `before_commit`, commits.
    fn put_version(
        &mut self,
        name: &str,
        env: &str,
        created_by: &str,
        keep: u32,
        seal: &mut dyn FnMut(u32) -> Result<SealedVersion>,
        before_commit: CommitHook<'_>,
    ) -> Result<u32>;
    /// The given version, or the latest when `version` is None.
    fn get_version(
        &self,
        name: &str,
        env: &str,
        version: Option<u32>,
    ) -> Result<Option<VersionRow>>;
    fn list(&self, env: Option<&str>) -> Result<Vec<SecretSummary>>;
    fn versions(&self, name: &str, env: &str) -> Result<Vec<VersionInfo>>;
    /// Removes every version of (name, env); returns how many were removed.
    fn remove(&mut self, name: &str, env: &str, before_commit: CommitHook<'_>) -> Result<u32>;
    /// Replaces every wrapped key with `rewrap(row)` and sets `meta` in one
    /// transaction. Returns the number of rows rewrapped.
    fn rewrap_all(&mut self, rewrap: RewrapFn<'_>, meta: &[(&str, String)]) -> Result<u64>;
    /// Inserts or replaces a lease row.
    fn lease_put(&mut self, lease: &LeaseRow) -> Result<()> {
        self.lease_put_many(std::slice::from_ref(lease))
    }
    /// Inserts or replaces lease rows in one durable transaction (group commit).
    fn lease_put_many(&mut self, leases: &[LeaseRow]) -> Result<()>;
    /// Deletes a lease row (no error if absent).
    fn lease_delete(&mut self, id: &str) -> Result<()>;
    /// Every lease row, oldest first.
    fn lease_list(&self) -> Result<Vec<LeaseRow>>;
    /// On a store shared by a fleet: lease `id` of whichever node holds it,
    /// with that node's name. A store only this node uses has no other
    /// node's leases (None).
    fn lease_of_any_node(&self, id: &str) -> Result<Option<(String, LeaseRow)>> {
        let _ = id;
        Ok(None)
    }
    /// Removes meta key `key` (no error if absent).
    fn meta_delete(&mut self, key: &str) -> Result<()>;
    /// Replaces the value of `key` with `update(current)` atomically: writers
    /// on other nodes that update the same key wait for this one.
    fn meta_update(
        &mut self,
        key: &str,
        update: &mut dyn FnMut(Option<String>) -> Result<String>,
    ) -> Result<()> {
        let current = self.meta_get(key)?;
        let value = update(current)?;
        self.meta_set(key, &value)
    }
    /// This node's name when the store is shared by several nodes (a fleet),
    /// None for a store only this node uses.
    fn node(&self) -> Option<&str> {
        None
    }
    /// Claims `job` for this node for `ttl`: true when no other node holds an
    /// unexpired claim on it. A store only this node uses always grants it.
    fn claim(&mut self, job: &str, ttl: std::time::Duration) -> Result<bool> {
        let _ = (job, ttl);
        Ok(true)
    }
    /// Gives up this node's claim on `job` (no error if it holds none).
    fn release_claim(&mut self, job: &str) -> Result<()> {
        let _ = job;
        Ok(())
    }
}

/// Opens the backend `[store]` configures for `data_dir`: the SQLite file in
/// it, or the PostgreSQL database (connected, schema migrated). Returns it
/// with its description for messages.
pub fn open_backend(
    data_dir: &std::path::Path,
    config: &crate::config::Store,
) -> Result<(Box<dyn SecretBackend>, String)> {
    match config.backend {
        crate::config::StoreBackend::Sqlite => {
            let path = data_dir.join(crate::paths::STORE_FILE);
            let backend = sqlite::SqliteBackend::open(&path)?;
            Ok((Box::new(backend), path.display().to_string()))
        }
        crate::config::StoreBackend::Postgres => {
            let settings = postgres::PostgresSettings::from_config(config)?;
            let backend =
                postgres::PostgresBackend::open(settings, &postgres::node_name(data_dir))?;
            let at = backend.describe().to_string();
            Ok((Box::new(backend), at))
        }
    }
}

/// Checks a secret name: `[a-z0-9][a-z0-9._/-]*`, at most 128 bytes, no empty
/// path segment.
pub fn validate_secret_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.len() > 128 || !ok_chars || !first_ok || name.contains("//") || name.ends_with('/') {
        return Err(Error::usage(format!(
            "invalid secret name {name:?}: use lowercase letters, digits and . _ - /, starting with a letter or digit, at most 128 characters, like \"orders-db/app\""
        )));
    }
    Ok(())
}

/// Checks an environment name: `[a-z0-9][a-z0-9_-]*`, at most 32 bytes.
pub fn validate_env(env: &str) -> Result<()> {
    let ok = !env.is_empty()
        && env.len() <= 32
        && env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !env.starts_with(['-', '_']);
    if !ok {
        return Err(Error::usage(format!(
            "invalid environment {env:?}: use lowercase letters, digits, _ and -, at most 32 characters, like \"prod\""
        )));
    }
    Ok(())
}

fn value_aad(name: &str, env: &str, version: u32) -> Vec<u8> {
    format!("warden.secret.v1\0{name}\0{env}\0{version}").into_bytes()
}

fn dek_aad(name: &str, env: &str, version: u32, kek_id: &str) -> Vec<u8> {
    format!("warden.dek.v1\0{name}\0{env}\0{version}\0{kek_id}").into_bytes()
}

/// Envelope encryption over a [`SecretBackend`].
pub struct SecretStore {
    backend: Box<dyn SecretBackend>,
}

impl SecretStore {
    pub fn new(backend: Box<dyn SecretBackend>) -> Self {
        SecretStore { backend }
    }

    pub fn backend(&self) -> &dyn SecretBackend {
        self.backend.as_ref()
    }

    pub fn backend_mut(&mut self) -> &mut dyn SecretBackend {
        self.backend.as_mut()
    }

    /// Stores `value` as a new version of (name, env) and returns its number.
    pub fn put(
        &mut self,
        kek: &Kek,
        new: NewVersion<'_>,
        before_commit: CommitHook<'_>,
    ) -> Result<u32> {
        let NewVersion {
            name,
            env,
            value,
            created_by,
            keep,
        } = new;
        validate_secret_name(name)?;
        validate_env(env)?;
        if value.is_empty() {
            return Err(Error::usage("refusing to store an empty secret value"));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::usage(format!(
                "secret value is {} bytes; the limit is {MAX_VALUE_LEN} bytes",
                value.len()
            )));
        }
        let mut seal = |version: u32| -> Result<SealedVersion> {
            let dek = Key256::generate()?;
            let ciphertext = dek.seal(&value_aad(name, env, version), value)?;
            let wrapped_key = kek
                .key()
                .seal(&dek_aad(name, env, version, kek.id()), dek.as_bytes())?;
            Ok(SealedVersion {
                kek_id: kek.id().to_string(),
                wrapped_key,
                ciphertext,
            })
        };
        self.backend
            .put_version(name, env, created_by, keep.max(1), &mut seal, before_commit)
    }

    /// Decrypts (name, env, version or latest). Any tampering, row swap or wrong
    /// KEK gives an integrity error naming the row, never a wrong value.
    pub fn get(
        &self,
        kek: &Kek,
        name: &str,
        env: &str,
        version: Option<u32>,
    ) -> Result<(u32, Zeroizing<Vec<u8>>)> {
        validate_secret_name(name)?;
        validate_env(env)?;
        let row = self.backend.get_version(name, env, version)?.ok_or_else(|| {
            match version {
                Some(v) => Error::not_found(format!(
                    "secret {name:?} has no version {v} in environment {env:?} (see `warden secret versions {name} --env {env}`)"
                )),
                None => Error::not_found(format!(
                    "no secret {name:?} in environment {env:?} (see `warden secret list --env {env}`)"
                )),
            }
        })?;
        let v = row.version;
        let what = format!("secret {name:?} (env {env:?}, version {v})");
        if row.sealed.kek_id != kek.id() {
            return Err(Error::integrity(format!(
                "{what} is wrapped by master key {:?} but the loaded master key is {}: the row was copied from another store or the master key is wrong",
                row.sealed.kek_id,
                kek.id()
            )));
        }
        let dek_bytes = kek
            .key()
            .open(&dek_aad(name, env, v, kek.id()), &row.sealed.wrapped_key)
            .map_err(|_| {
                Error::integrity(format!(
                    "{what} failed its integrity check: its wrapped data key was modified or belongs to another row"
                ))
            })?;
        let dek = Key256::from_slice(&dek_bytes).ok_or_else(|| {
            Error::integrity(format!("{what}: unwrapped data key has the wrong length"))
        })?;
        let value = dek
            .open(&value_aad(name, env, v), &row.sealed.ciphertext)
            .map_err(|_| {
                Error::integrity(format!(
                    "{what} failed its integrity check: its ciphertext was modified or belongs to another row"
                ))
            })?;
        Ok((v, value))
    }

    /// Rewraps every data key from `old` to `new`, storing `meta` in the same
    /// transaction. Value ciphertexts are untouched.
    pub fn rewrap(&mut self, old: &Kek, new: &Kek, meta: &[(&str, String)]) -> Result<u64> {
        let mut rewrap = |row: &WrappedKeyRow| -> Result<(String, Vec<u8>)> {
            let what = format!(
                "secret {:?} (env {:?}, version {})",
                row.name, row.env, row.version
            );
            if row.kek_id != old.id() {
                return Err(Error::integrity(format!(
                    "{what} is wrapped by master key {:?}, not the current one {}; nothing was changed",
                    row.kek_id,
                    old.id()
                )));
            }
            let dek = old
                .key()
                .open(
                    &dek_aad(&row.name, &row.env, row.version, old.id()),
                    &row.wrapped_key,
                )
                .map_err(|_| {
                    Error::integrity(format!(
                        "{what} failed its integrity check during rewrap; nothing was changed"
                    ))
                })?;
            let wrapped = new
                .key()
                .seal(&dek_aad(&row.name, &row.env, row.version, new.id()), &dek)?;
            Ok((new.id().to_string(), wrapped))
        };
        self.backend.rewrap_all(&mut rewrap, meta)
    }
}

#[cfg(test)]
mod tests;
