//! Tests only: a SQLite store that says it is shared by a fleet, so the
//! fleet paths (node records, join tokens, node intermediates) run without
//! a PostgreSQL server. Every "node" of a test opens the same file.

use super::sqlite::SqliteBackend;
use super::SecretBackend;
use crate::error::Result;

/// A SQLite store that says it is shared by a fleet, as node `node`
/// (every node of the test shares the one file).
pub struct FleetSqlite {
    inner: SqliteBackend,
    node: String,
}

impl FleetSqlite {
    pub fn open(path: &std::path::Path, node: &str) -> FleetSqlite {
        FleetSqlite {
            inner: SqliteBackend::open(path).unwrap(),
            node: node.into(),
        }
    }
}

impl SecretBackend for FleetSqlite {
    fn meta_get(&self, key: &str) -> Result<Option<String>> {
        self.inner.meta_get(key)
    }
    fn meta_set(&mut self, key: &str, value: &str) -> Result<()> {
        self.inner.meta_set(key, value)
    }
    fn meta_list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.inner.meta_list(prefix)
    }
    fn put_version(
        &mut self,
        name: &str,
        env: &str,
        created_by: &str,
        keep: u32,
        seal: &mut dyn FnMut(u32) -> Result<crate::store::SealedVersion>,
        before_commit: crate::store::CommitHook<'_>,
    ) -> Result<u32> {
        self.inner
            .put_version(name, env, created_by, keep, seal, before_commit)
    }
    fn get_version(
        &self,
        name: &str,
        env: &str,
        version: Option<u32>,
    ) -> Result<Option<crate::store::VersionRow>> {
        self.inner.get_version(name, env, version)
    }
    fn list(&self, env: Option<&str>) -> Result<Vec<crate::store::SecretSummary>> {
        self.inner.list(env)
    }
    fn versions(&self, name: &str, env: &str) -> Result<Vec<crate::store::VersionInfo>> {
        self.inner.versions(name, env)
    }
    fn remove(
        &mut self,
        name: &str,
        env: &str,
        before_commit: crate::store::CommitHook<'_>,
    ) -> Result<u32> {
        self.inner.remove(name, env, before_commit)
    }
    fn rewrap_all(
        &mut self,
        rewrap: crate::store::RewrapFn<'_>,
        meta: &[(&str, String)],
    ) -> Result<u64> {
        self.inner.rewrap_all(rewrap, meta)
    }
    fn lease_put_many(&mut self, leases: &[crate::store::LeaseRow]) -> Result<()> {
        self.inner.lease_put_many(leases)
    }
    fn lease_delete(&mut self, id: &str) -> Result<()> {
        self.inner.lease_delete(id)
    }
    fn lease_list(&self) -> Result<Vec<crate::store::LeaseRow>> {
        self.inner.lease_list()
    }
    fn meta_delete(&mut self, key: &str) -> Result<()> {
        self.inner.meta_delete(key)
    }
    fn node(&self) -> Option<&str> {
        Some(&self.node)
    }
}
