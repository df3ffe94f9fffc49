//! `warden init`: create a data dir, its store and master key; and
//! `warden init --rotate-kek`: replace the master key, rewrapping every data
//! key (secret values are not re-encrypted).

use crate::audit::{Actor, ActorKind, AuditLog, Decision, Event, Target};
use crate::auditor::Auditor;
use crate::authority::{IdentityAuthority, IdentitySettings, ImportedCa, StoreAccess};
use crate::config::StoreBackend;
use crate::error::{Error, Result};
use crate::masterkey::SealConfig;
use crate::masterkey::{self, Kek, KekPlan, KekSource, KekState, NewKek, SEAL_META_KEY};
use crate::paths;
use crate::service;
use crate::store::postgres::{self, PostgresBackend, PostgresSettings};
use crate::store::sqlite::SqliteBackend;
use crate::store::{SecretBackend, SecretStore};
use std::path::Path;
use zeroize::Zeroizing;

pub struct InitOutcome {
    pub kek_id: String,
    pub source: KekSource,
    pub key_file: Option<std::path::PathBuf>,
    pub shares: Vec<Zeroizing<String>>,
    pub threshold: u8,
    pub rewrapped: Option<u64>,
}

fn admin_actor() -> Actor {
    let uid = paths::euid();
    Actor {
        kind: ActorKind::Admin,
        uid: Some(uid),
        user: paths::user_name(uid),
        pid: Some(std::process::id()),
        exe: None,
        workload: None,
    }
}

/// Initialises `data_dir` (created 0700 if missing; refused if it exists with
/// loose permissions or is already initialised) and the store `[store]`
/// names: the SQLite file in the data dir, or a PostgreSQL database, which
/// must not hold an initialised store yet (further nodes of a PostgreSQL
/// store get a copy of the master key instead, see docs/configuration.md).
pub fn init(
    data_dir: &Path,
    store_config: &crate::config::Store,
    plan: &KekPlan,
    identity: IdentitySettings,
    import: Option<ImportedCa>,
) -> Result<InitOutcome> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if data_dir.join(paths::STORE_FILE).exists() {
        return Err(Error::usage(format!(
            "{} is already initialised; to replace its master key use `warden init --rotate-kek`",
            data_dir.display()
        )));
    }
    if !data_dir.exists() {
        paths::create_private_dir(data_dir)?;
    }
    paths::check_private_dir(data_dir)?;
    let _lock = paths::lock_data_dir(data_dir)?;
    let postgres = match store_config.backend {
        StoreBackend::Sqlite => None,
        StoreBackend::Postgres => {
            let settings = PostgresSettings::from_config(store_config)?;
            let backend = PostgresBackend::open(settings, &postgres::node_name(data_dir))?;
            if let Some(seal) = SecretBackend::meta_get(&backend, SEAL_META_KEY)? {
                return Err(already_initialised(&backend, &seal, data_dir));
            }
            Some(backend)
        }
    };
    let NewKek { kek, seal, shares } = masterkey::create_kek(plan)?;
    let key_file = match plan.source {
        KekSource::File => Some(masterkey::write_key_file(data_dir, &kek, false)?),
        _ => None,
    };
    let store_path = data_dir.join(paths::STORE_FILE);
    let seal_json = seal.to_json()?;
    let created = match postgres {
        None => (|| -> Result<()> {
            let mut backend = SqliteBackend::open(&store_path)?;
            let audit = Auditor::new(AuditLog::open(&data_dir.join(paths::AUDIT_FILE))?);
            record_init(&audit, &seal)?;
            SecretBackend::meta_set(&mut backend, SEAL_META_KEY, &seal_json)?;
            create_identity(Box::new(backend), &kek, &audit, identity, import)
        })()
        .inspect_err(|_| {
            // Leave nothing half-made behind: a later `init` must be able to start over.
            for f in [
                paths::STORE_FILE,
                "store.db-wal",
                "store.db-shm",
                paths::KEY_FILE,
            ] {
                let _ = std::fs::remove_file(data_dir.join(f));
            }
        }),
        Some(mut backend) => {
            // Claimed first: of two nodes initialising one store at once, one wins.
            if !backend.meta_insert_new(SEAL_META_KEY, &seal_json)? {
                if let Some(f) = &key_file {
                    let _ = std::fs::remove_file(f);
                }
                let theirs = SecretBackend::meta_get(&backend, SEAL_META_KEY)?.unwrap_or_default();
                return Err(already_initialised(&backend, &theirs, data_dir));
            }
            let made = (|| -> Result<()> {
                let audit = Auditor::new(AuditLog::open(&data_dir.join(paths::AUDIT_FILE))?);
                record_init(&audit, &seal)?;
                crate::fleet::register(&mut backend, &postgres::node_name(data_dir), "init")?;
                create_identity(Box::new(backend), &kek, &audit, identity, import)
            })();
            if made.is_err() {
                // The store was empty when this init claimed it: empty it again.
                let node = postgres::node_name(data_dir);
                if let Ok(mut b) = PostgresSettings::from_config(store_config)
                    .and_then(|settings| PostgresBackend::connect(settings, &node))
                {
                    let _ = b.discard_everything();
                }
                if let Some(f) = &key_file {
                    let _ = std::fs::remove_file(f);
                }
            }
            made
        }
    };
    created?;
    Ok(InitOutcome {
        kek_id: kek.id().to_string(),
        source: plan.source,
        key_file,
        threshold: plan.threshold,
        shares,
        rewrapped: None,
    })
}

/// The PostgreSQL store already has a seal configuration: what to do instead.
fn already_initialised(backend: &PostgresBackend, seal_json: &str, data_dir: &Path) -> Error {
    let kek = SealConfig::from_json(seal_json)
        .map(|s| format!("master key id {}, source {}", s.kek_id, s.source))
        .unwrap_or_else(|_| "an unreadable seal configuration".into());
    Error::usage(format!(
        "the {} is already initialised ({kek}); fix: to add this node, do not run `warden init`: run `warden node token --ttl 10m` on a node of the fleet, then `warden node join --data-dir {} < token-file` here (docs/fleet.md)",
        backend.describe(),
        data_dir.display()
    ))
}

fn record_init(audit: &Auditor, seal: &SealConfig) -> Result<()> {
    audit.record(&Event {
        actor: admin_actor(),
        action: "init".into(),
        target: Target {
            detail: Some(format!(
                "kek source {}, kek id {}",
                seal.source, seal.kek_id
            )),
            ..Target::default()
        },
        decision: Decision::Allow,
        reason: "data dir initialised".into(),
    })
}

/// The CA is created with the store, its key sealed under the new KEK.
fn create_identity(
    backend: Box<dyn SecretBackend>,
    kek: &Kek,
    audit: &Auditor,
    identity: IdentitySettings,
    import: Option<ImportedCa>,
) -> Result<()> {
    let mut store = SecretStore::new(backend);
    let mut access = StoreAccess {
        store: &mut store,
        kek,
        audit,
    };
    IdentityAuthority::load_or_create(
        &mut access,
        identity,
        import,
        time::OffsetDateTime::now_utc(),
    )?;
    Ok(())
}

/// The data dir lock, with a hint that rotation needs the daemon stopped.
pub fn lock_for_rotation(data_dir: &Path) -> Result<paths::DataDirLock> {
    paths::lock_data_dir(data_dir).map_err(|e| {
        Error::new(
            e.kind,
            format!(
                "{}; KEK rotation needs the daemon stopped (systemctl stop warden)",
                e.message
            ),
        )
    })
}

/// Rotates the master key of an initialised, stopped data dir. `current_shares`
/// unseal the current KEK when its source is `shamir`.
pub fn rotate_kek(
    data_dir: &Path,
    store_config: &crate::config::Store,
    plan: &KekPlan,
    current_shares: &[Zeroizing<String>],
) -> Result<InitOutcome> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    paths::check_private_dir(data_dir)?;
    let _lock = lock_for_rotation(data_dir)?;
    let (mut store, seal, mut audit): (SecretStore, _, AuditLog) =
        service::open_store(data_dir, store_config)?;
    let old: Kek = match masterkey::load_kek(data_dir, &seal)? {
        KekState::Unsealed(k) => k,
        KekState::Sealed(_) => service::unseal_offline(&seal, current_shares)?,
    };
    let NewKek {
        kek: new,
        seal: new_seal,
        shares,
    } = masterkey::create_kek(plan)?;
    let staged = match plan.source {
        KekSource::File => Some(masterkey::write_key_file(data_dir, &new, true)?),
        _ => None,
    };
    let detail = format!(
        "kek {} ({}) -> {} ({})",
        old.id(),
        seal.source,
        new.id(),
        new_seal.source
    );
    audit.append(&Event {
        actor: admin_actor(),
        action: "kek.rotate".into(),
        target: Target {
            detail: Some(detail.clone()),
            ..Target::default()
        },
        decision: Decision::Allow,
        reason: "rewrapping every data key under the new master key".into(),
    })?;
    let rewrapped = match store.rewrap(&old, &new, &[(SEAL_META_KEY, new_seal.to_json()?)]) {
        Ok(n) => n,
        Err(e) => {
            let _ = audit.append(&Event {
                actor: admin_actor(),
                action: "kek.rotate".into(),
                target: Target {
                    detail: Some(detail),
                    ..Target::default()
                },
                decision: Decision::Error,
                reason: format!("rotation rolled back: {}", e.message),
            });
            if let Some(p) = staged {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    let key_file = if staged.is_some() {
        masterkey::promote_staged_key_file(data_dir)?;
        Some(masterkey::key_file_path(data_dir))
    } else {
        // The old key file no longer opens anything; do not leave it lying around.
        let old_file = masterkey::key_file_path(data_dir);
        if old_file.exists() {
            std::fs::remove_file(&old_file)
                .map_err(|e| Error::io("cannot remove the old key file", &old_file, &e))?;
        }
        None
    };
    Ok(InitOutcome {
        kek_id: new.id().to_string(),
        source: plan.source,
        key_file,
        threshold: plan.threshold,
        shares,
        rewrapped: Some(rewrapped),
    })
}

/// What `warden node join` did.
pub struct JoinOutcome {
    pub node_id: String,
    pub node_name: String,
    pub token_id: String,
    pub source: KekSource,
    /// The key file written (source `file`).
    pub key_file: Option<std::path::PathBuf>,
    /// The master key's raw bytes for the caller to pipe into
    /// `systemd-creds encrypt` (source `systemd-credential`, only when asked).
    pub credential_key: Option<Zeroizing<Vec<u8>>>,
}

/// `warden node join`: makes `data_dir` a node of the fleet whose PostgreSQL
/// store `[store]` names, with a single-use token from `warden node token`
/// (see [`crate::fleet`]). The token is consumed once; whether accepted or
/// refused, the attempt is an audit record in this node's log. With source
/// `file` the master key is written to `master.key` (0600); with
/// `systemd-credential` it is returned for stdout only when
/// `credential_to_stdout` is set (refused before the token is used
/// otherwise); with `shamir` nothing is handed over (unseal with the shares).
pub fn join(
    data_dir: &Path,
    store_config: &crate::config::Store,
    token_text: &str,
    credential_to_stdout: bool,
) -> Result<JoinOutcome> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if store_config.backend != StoreBackend::Postgres {
        return Err(Error::usage(
            "`warden node join` joins a fleet on a shared store, but this configuration's [store] backend is \"sqlite\"; fix: set [store] backend = \"postgres\" with the fleet's url and password_file in this node's configuration (docs/fleet.md)",
        ));
    }
    let token = crate::fleet::parse_token(token_text)?;
    let key_path = masterkey::key_file_path(data_dir);
    if !data_dir.exists() {
        paths::create_private_dir(data_dir)?;
    }
    paths::check_private_dir(data_dir)?;
    let _lock = paths::lock_data_dir(data_dir)?;
    let name = postgres::node_name(data_dir);
    let mut backend = PostgresBackend::open(PostgresSettings::from_config(store_config)?, &name)?;
    let Some(seal_json) = SecretBackend::meta_get(&backend, SEAL_META_KEY)? else {
        return Err(Error::usage(format!(
            "the {} is not initialised, so there is no fleet to join; fix: run `warden init` on the first node",
            backend.describe()
        )));
    };
    let seal = SealConfig::from_json(&seal_json)?;
    // A data dir with this store's key is already a node: only a removed
    // one rejoins, or one whose key is stale (the fleet's key was rotated).
    let rejoin = key_path.exists();
    if rejoin {
        let removed = crate::fleet::record_of(&backend, &name)?
            .is_some_and(|r| r.state == crate::fleet::NodeState::Removed);
        let current = matches!(
            masterkey::load_kek(data_dir, &seal),
            Ok(KekState::Unsealed(_))
        );
        if !removed && current {
            return Err(Error::usage(format!(
                "{} already holds this store's master key ({}): this data dir is already a node of the fleet; the token was not used; fix: join with a new, empty data dir (--data-dir)",
                data_dir.display(),
                key_path.display()
            )));
        }
    }
    if seal.source == KekSource::SystemdCredential && !credential_to_stdout {
        return Err(Error::usage(format!(
            "the fleet's master key comes from a systemd credential ({}); the token was not used; fix: pipe the key straight into systemd-creds: `warden node join --credential-to-stdout --token-file FILE | systemd-creds encrypt --name={} - /etc/credstore.encrypted/{}`",
            seal.credential_name.as_deref().unwrap_or(masterkey::DEFAULT_CREDENTIAL_NAME),
            seal.credential_name.as_deref().unwrap_or(masterkey::DEFAULT_CREDENTIAL_NAME),
            seal.credential_name.as_deref().unwrap_or(masterkey::DEFAULT_CREDENTIAL_NAME),
        )));
    }
    let audit = Auditor::new(AuditLog::open(&data_dir.join(paths::AUDIT_FILE))?);
    let node_id = crate::fleet::node_id(&name);
    let at = backend.describe().to_string();
    let record = |decision: Decision, reason: String| {
        audit.record(&Event {
            actor: admin_actor(),
            action: "node.join".into(),
            target: Target {
                detail: Some(format!(
                    "node {node_id} ({name}) with join token {} on the {}",
                    token.id, at
                )),
                ..Target::default()
            },
            decision,
            reason,
        })
    };
    let joined = match crate::fleet::consume_token(&mut backend, &token, &name, &seal) {
        Ok(j) => j,
        Err(e) => {
            record(Decision::Deny, e.message.clone())?;
            return Err(e);
        }
    };
    let mut key_file = None;
    let mut credential_key = None;
    match (&joined.kek, seal.source) {
        (Some(kek), KekSource::File) if rejoin => {
            // A removed node's (or a stale) key file is replaced atomically.
            masterkey::write_key_file(data_dir, kek, true)?;
            masterkey::promote_staged_key_file(data_dir)?;
            key_file = Some(key_path.clone());
        }
        (Some(kek), KekSource::File) => {
            key_file = Some(masterkey::write_key_file(data_dir, kek, false)?);
        }
        (Some(kek), KekSource::SystemdCredential) => {
            credential_key = Some(Zeroizing::new(kek.key().as_bytes().to_vec()));
        }
        _ => {}
    }
    let via = format!("join token {}", joined.token_id);
    crate::fleet::register(&mut backend, &name, &via)?;
    record(
        Decision::Allow,
        format!(
            "joined the fleet (master key id {}, source {}{})",
            seal.kek_id,
            seal.source,
            if key_file.is_some() {
                ", key file written"
            } else {
                ""
            }
        ),
    )?;
    Ok(JoinOutcome {
        node_id,
        node_name: name,
        token_id: joined.token_id,
        source: seal.source,
        key_file,
        credential_key,
    })
}
