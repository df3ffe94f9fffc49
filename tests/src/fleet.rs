//! Fleet fixtures: a store database on a throwaway PostgreSQL cluster, node
//! configurations that share it, and nodes that share a master key.

use crate::pg::PgCluster;
use crate::{my_uid, Instance, Output};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The store's database name.
pub const STORE_DB: &str = "fleet";

/// Creates the store database (role `warden` with `password`) on `pg`;
/// the returned dir holds its password file, `store-password` (0600).
pub fn store_on(pg: &PgCluster, password: &str) -> tempfile::TempDir {
    pg.psql_admin(&format!("CREATE ROLE warden LOGIN PASSWORD '{password}'"));
    pg.psql_admin(&format!("CREATE DATABASE {STORE_DB} OWNER warden"));
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("store-password");
    std::fs::write(&pw, password).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

/// A node: workload `me` (this uid), secret `app-db/app` and route `app-db`
/// (user `app`) on `route_port` to the `app` database on `app_port`, the
/// PostgreSQL store on `store_port`; the rest as set.
pub struct NodeSpec<'a> {
    pub route_port: u16,
    pub app_port: u16,
    pub store_port: u16,
    /// The dir [`store_on`] returned.
    pub password_dir: &'a Path,
    pub cache_ttl: &'a str,
    /// Query string of the store URL (e.g. `?connect_timeout=2`).
    pub url_query: &'a str,
    /// More keys of `[store]`.
    pub store_keys: &'a str,
    /// Tables before the route's secret (more workloads or secrets).
    pub before: &'a str,
    /// After the route's keys: more keys or tables.
    pub extra: &'a str,
    /// The `[monitor]` table's keys.
    pub monitor: &'a str,
}

impl<'a> NodeSpec<'a> {
    pub fn new(route_port: u16, app_port: u16, store_port: u16, password_dir: &'a Path) -> Self {
        NodeSpec {
            route_port,
            app_port,
            store_port,
            password_dir,
            cache_ttl: "10m",
            url_query: "",
            store_keys: "",
            before: "",
            extra: "",
            monitor: "ebpf = \"off\"",
        }
    }

    pub fn config(&self) -> String {
        format!(
            r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}
{before}
[[secret]]
name = "app-db/app"

[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{route_port}"
upstream = "127.0.0.1:{app_port}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "app-db/app", cache_ttl = "{cache_ttl}" }}
allow = ["me"]
connect_timeout = "2s"
{extra}

[store]
backend = "postgres"
url = "postgresql://warden@127.0.0.1:{store_port}/{STORE_DB}{url_query}"
password_file = "{pw}"
tls = "disable"
{store_keys}

[monitor]
{monitor}
"#,
            uid = my_uid(),
            before = self.before,
            route_port = self.route_port,
            app_port = self.app_port,
            cache_ttl = self.cache_ttl,
            extra = self.extra,
            store_port = self.store_port,
            url_query = self.url_query,
            pw = self.password_dir.join("store-password").display(),
            store_keys = self.store_keys,
            monitor = self.monitor,
        )
    }

    pub fn instance(&self) -> Instance {
        Instance::new_with(&self.config())
    }
}

/// Gives `next` a copy of `first`'s master key (a node joining its store).
pub fn join(first: &Instance, next: &Instance) {
    std::fs::create_dir_all(&next.data_dir).unwrap();
    std::fs::set_permissions(&next.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = next.data_dir.join("master.key");
    std::fs::copy(first.data_dir.join("master.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A `select current_user` session through the route logged in as `app`.
pub fn works(out: &Output) -> bool {
    out.code == 0 && out.stdout.trim() == "app"
}

/// Polls `check` every `every` until it returns None; panics with `what`
/// and the last answer after `limit`.
pub fn wait(
    limit: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<String>,
) {
    let t0 = Instant::now();
    loop {
        let Some(last) = check() else { return };
        assert!(
            t0.elapsed() < limit,
            "{what}: not seen within {limit:?}; last: {last}"
        );
        std::thread::sleep(every);
    }
}
