//! SQLite backend of the secret store: the embedded default. One file
//! (`store.db`) in the data dir, WAL journal, `synchronous=FULL` so a committed
//! write survives a power cut. Holds only sealed bytes and metadata.

use super::{
    CommitHook, LeaseRow, RewrapFn, SealedVersion, SecretBackend, SecretSummary, VersionInfo,
    VersionRow, WrappedKeyRow,
};
use crate::error::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};

const SCHEMA_VERSION: &str = "1";

pub struct SqliteBackend {
    conn: Connection,
    path: PathBuf,
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| {
        let hint = match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => " (the disk holding the data dir is full)",
            Some(rusqlite::ErrorCode::SystemIoFailure) => {
                " (the data dir's disk failed a write: full, read-only or failing)"
            }
            Some(rusqlite::ErrorCode::ReadOnly) => " (the store is read-only: check permissions)",
            Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked) => {
                " (another process holds the store: is a second warden running?)"
            }
            Some(rusqlite::ErrorCode::NotADatabase)
            | Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
                " (the file is damaged or not a warden store: restore it from backup)"
            }
            _ => "",
        };
        Error::internal(format!("secret store {}: {e}{hint}", path.display()))
    }
}

/// Runs `sql` and maps every row.
fn query_all<T>(
    conn: &Connection,
    path: &Path,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let err = db_err(path);
    let mut stmt = conn.prepare(sql).map_err(&err)?;
    let rows = stmt.query_map(params, map).map_err(&err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&err)
}

fn now() -> String {
    crate::timefmt::now_rfc3339()
}

impl SqliteBackend {
    /// Opens (creating with mode 0600 if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| Error::io("cannot create secret store", path, &e))?;
        }
        let conn = Connection::open(path).map_err(db_err(path))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS meta (
                 key   TEXT PRIMARY KEY,
                 value TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS secrets (
                 name         TEXT NOT NULL,
                 env          TEXT NOT NULL,
                 next_version INTEGER NOT NULL,
                 updated_at   TEXT NOT NULL,
                 PRIMARY KEY (name, env)
             );
             CREATE TABLE IF NOT EXISTS secret_versions (
                 name        TEXT NOT NULL,
                 env         TEXT NOT NULL,
                 version     INTEGER NOT NULL,
                 created_at  TEXT NOT NULL,
                 created_by  TEXT NOT NULL,
                 kek_id      TEXT NOT NULL,
                 wrapped_key BLOB NOT NULL,
                 ciphertext  BLOB NOT NULL,
                 PRIMARY KEY (name, env, version),
                 FOREIGN KEY (name, env) REFERENCES secrets(name, env)
             );
             CREATE TABLE IF NOT EXISTS leases (
                 id             TEXT PRIMARY KEY,
                 route          TEXT NOT NULL,
                 workload       TEXT NOT NULL,
                 role           TEXT NOT NULL,
                 state          TEXT NOT NULL,
                 owner_pid      INTEGER NOT NULL,
                 created_at     INTEGER NOT NULL,
                 expires_at     INTEGER NOT NULL,
                 max_expires_at INTEGER NOT NULL
             );",
        )
        .map_err(db_err(path))?;
        let backend = SqliteBackend {
            conn,
            path: path.to_path_buf(),
        };
        match backend.meta_get("schema_version")? {
            None => {
                backend
                    .conn
                    .execute(
                        "INSERT INTO meta(key, value) VALUES ('schema_version', ?1)",
                        params![SCHEMA_VERSION],
                    )
                    .map_err(db_err(path))?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(Error::usage(format!(
                    "secret store {} has schema version {v}; this warden understands version {SCHEMA_VERSION}: upgrade warden",
                    path.display()
                )))
            }
        }
        Ok(backend)
    }
}

impl SecretBackend for SqliteBackend {
    fn meta_get(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err(&self.path))
    }

    fn meta_set(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    fn meta_list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT key, value FROM meta WHERE substr(key, 1, ?2) = ?1 ORDER BY key")
            .map_err(db_err(&self.path))?;
        let rows = stmt
            .query_map(params![prefix, prefix.len() as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(db_err(&self.path))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err(&self.path))
    }

    fn meta_delete(&mut self, key: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM meta WHERE key = ?1", params![key])
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    fn put_version(
        &mut self,
        name: &str,
        env: &str,
        created_by: &str,
        keep: u32,
        seal: &mut dyn FnMut(u32) -> Result<SealedVersion>,
        before_commit: CommitHook<'_>,
    ) -> Result<u32> {
        let path = self.path.clone();
        let err = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let next: Option<u32> = tx
            .query_row(
                "SELECT next_version FROM secrets WHERE name = ?1 AND env = ?2",
                params![name, env],
                |r| r.get(0),
            )
            .optional()
            .map_err(&err)?;
        let version = next.unwrap_or(1);
        let sealed = seal(version)?;
        let ts = now();
        tx.execute(
            "INSERT INTO secrets(name, env, next_version, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name, env) DO UPDATE SET next_version = excluded.next_version, updated_at = excluded.updated_at",
            params![name, env, version + 1, ts],
        )
        .map_err(&err)?;
        tx.execute(
            "INSERT INTO secret_versions(name, env, version, created_at, created_by, kek_id, wrapped_key, ciphertext)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![name, env, version, ts, created_by, sealed.kek_id, sealed.wrapped_key, sealed.ciphertext],
        )
        .map_err(&err)?;
        tx.execute(
            "DELETE FROM secret_versions WHERE name = ?1 AND env = ?2 AND version <= ?3",
            params![name, env, i64::from(version) - i64::from(keep)],
        )
        .map_err(&err)?;
        before_commit(version)?;
        tx.commit().map_err(&err)?;
        Ok(version)
    }

    fn get_version(
        &self,
        name: &str,
        env: &str,
        version: Option<u32>,
    ) -> Result<Option<VersionRow>> {
        let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<VersionRow> {
            Ok(VersionRow {
                version: r.get(0)?,
                sealed: SealedVersion {
                    kek_id: r.get(1)?,
                    wrapped_key: r.get(2)?,
                    ciphertext: r.get(3)?,
                },
            })
        };
        let cols = "version, kek_id, wrapped_key, ciphertext";
        let res = match version {
            Some(v) => self.conn.query_row(
                &format!("SELECT {cols} FROM secret_versions WHERE name = ?1 AND env = ?2 AND version = ?3"),
                params![name, env, v],
                map,
            ),
            None => self.conn.query_row(
                &format!("SELECT {cols} FROM secret_versions WHERE name = ?1 AND env = ?2 ORDER BY version DESC LIMIT 1"),
                params![name, env],
                map,
            ),
        };
        res.optional().map_err(db_err(&self.path))
    }

    fn list(&self, env: Option<&str>) -> Result<Vec<SecretSummary>> {
        query_all(
            &self.conn,
            &self.path,
            "SELECT s.name, s.env, MAX(v.version), COUNT(v.version), s.updated_at
             FROM secrets s JOIN secret_versions v ON v.name = s.name AND v.env = s.env
             WHERE (?1 IS NULL OR s.env = ?1)
             GROUP BY s.name, s.env ORDER BY s.name, s.env",
            params![env],
            |r| {
                Ok(SecretSummary {
                    name: r.get(0)?,
                    env: r.get(1)?,
                    latest_version: r.get(2)?,
                    versions_kept: r.get(3)?,
                    updated_at: r.get(4)?,
                })
            },
        )
    }

    fn versions(&self, name: &str, env: &str) -> Result<Vec<VersionInfo>> {
        query_all(
            &self.conn,
            &self.path,
            "SELECT version, created_at, created_by, kek_id FROM secret_versions
             WHERE name = ?1 AND env = ?2 ORDER BY version",
            params![name, env],
            |r| {
                Ok(VersionInfo {
                    version: r.get(0)?,
                    created_at: r.get(1)?,
                    created_by: r.get(2)?,
                    kek_id: r.get(3)?,
                })
            },
        )
    }

    fn remove(&mut self, name: &str, env: &str, before_commit: CommitHook<'_>) -> Result<u32> {
        let path = self.path.clone();
        let err = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let removed = tx
            .execute(
                "DELETE FROM secret_versions WHERE name = ?1 AND env = ?2",
                params![name, env],
            )
            .map_err(&err)?;
        let removed = u32::try_from(removed).unwrap_or(u32::MAX);
        if removed == 0 {
            return Ok(0);
        }
        // The `secrets` row stays as a tombstone so version numbers never repeat.
        tx.execute(
            "UPDATE secrets SET updated_at = ?3 WHERE name = ?1 AND env = ?2",
            params![name, env, now()],
        )
        .map_err(&err)?;
        before_commit(removed)?;
        tx.commit().map_err(&err)?;
        Ok(removed)
    }

    fn rewrap_all(&mut self, rewrap: RewrapFn<'_>, meta: &[(&str, String)]) -> Result<u64> {
        let path = self.path.clone();
        let err = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let rows: Vec<WrappedKeyRow> = query_all(
            &tx,
            &path,
            "SELECT name, env, version, kek_id, wrapped_key FROM secret_versions",
            [],
            |r| {
                Ok(WrappedKeyRow {
                    name: r.get(0)?,
                    env: r.get(1)?,
                    version: r.get(2)?,
                    kek_id: r.get(3)?,
                    wrapped_key: r.get(4)?,
                })
            },
        )?;
        let mut count = 0u64;
        for row in &rows {
            let (kek_id, wrapped) = rewrap(row)?;
            tx.execute(
                "UPDATE secret_versions SET kek_id = ?4, wrapped_key = ?5
                 WHERE name = ?1 AND env = ?2 AND version = ?3",
                params![row.name, row.env, row.version, kek_id, wrapped],
            )
            .map_err(&err)?;
            count += 1;
        }
        for (k, v) in meta {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![k, v],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(count)
    }

    fn lease_put_many(&mut self, leases: &[LeaseRow]) -> Result<()> {
        let err = db_err(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        for l in leases {
            tx.execute(
                "INSERT OR REPLACE INTO leases(id, route, workload, role, state, owner_pid, created_at, expires_at, max_expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    l.id,
                    l.route,
                    l.workload,
                    l.role,
                    l.state,
                    l.owner_pid,
                    l.created_at,
                    l.expires_at,
                    l.max_expires_at
                ],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn lease_delete(&mut self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM leases WHERE id = ?1", params![id])
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    fn lease_list(&self) -> Result<Vec<LeaseRow>> {
        query_all(
            &self.conn,
            &self.path,
            "SELECT id, route, workload, role, state, owner_pid, created_at, expires_at, max_expires_at
             FROM leases ORDER BY created_at, id",
            [],
            |r| {
                Ok(LeaseRow {
                    id: r.get(0)?,
                    route: r.get(1)?,
                    workload: r.get(2)?,
                    role: r.get(3)?,
                    state: r.get(4)?,
                    owner_pid: r.get(5)?,
                    created_at: r.get(6)?,
                    expires_at: r.get(7)?,
                    max_expires_at: r.get(8)?,
                })
            },
        )
    }
}
