//! `warden init`: create a data dir, its store and master key; and
//! `warden init --rotate-kek`: replace the master key, rewrapping every data
//! key (secret values are not re-encrypted).

use crate::audit::{Actor, ActorKind, AuditLog, Decision, Event, Target};
use crate::auditor::Auditor;
use crate::authority::{IdentityAuthority, IdentitySettings, ImportedCa, StoreAccess};
use crate::error::{Error, Result};
use crate::masterkey::{self, Kek, KekPlan, KekSource, KekState, NewKek, SEAL_META_KEY};
use crate::paths;
use crate::service;
use crate::store::sqlite::SqliteBackend;
use crate::store::SecretStore;
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
/// loose permissions or is already initialised).
pub fn init(
    data_dir: &Path,
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
    let NewKek { kek, seal, shares } = masterkey::create_kek(plan)?;
    let key_file = match plan.source {
        KekSource::File => Some(masterkey::write_key_file(data_dir, &kek, false)?),
        _ => None,
    };
    let store_path = data_dir.join(paths::STORE_FILE);
    let created = (|| -> Result<()> {
        let mut backend = SqliteBackend::open(&store_path)?;
        let audit = Auditor::new(AuditLog::open(&data_dir.join(paths::AUDIT_FILE))?);
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
        })?;
        crate::store::SecretBackend::meta_set(&mut backend, SEAL_META_KEY, &seal.to_json()?)?;
        // The CA is created with the store, its key sealed under the new KEK.
        let mut store = SecretStore::new(Box::new(backend));
        let mut access = StoreAccess {
            store: &mut store,
            kek: &kek,
            audit: &audit,
        };
        IdentityAuthority::load_or_create(
            &mut access,
            identity,
            import,
            time::OffsetDateTime::now_utc(),
        )?;
        Ok(())
    })();
    if let Err(e) = created {
        // Leave nothing half-made behind: a later `init` must be able to start over.
        for f in [
            paths::STORE_FILE,
            "store.db-wal",
            "store.db-shm",
            paths::KEY_FILE,
        ] {
            let _ = std::fs::remove_file(data_dir.join(f));
        }
        return Err(e);
    }
    Ok(InitOutcome {
        kek_id: kek.id().to_string(),
        source: plan.source,
        key_file,
        threshold: plan.threshold,
        shares,
        rewrapped: None,
    })
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
    plan: &KekPlan,
    current_shares: &[Zeroizing<String>],
) -> Result<InitOutcome> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    paths::check_private_dir(data_dir)?;
    let _lock = lock_for_rotation(data_dir)?;
    let (mut store, seal, mut audit): (SecretStore, _, AuditLog) = service::open_store(data_dir)?;
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
