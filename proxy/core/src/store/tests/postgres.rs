//! The PostgreSQL backend against a real server (a throw-away cluster from
//! the end-to-end tests' harness): the whole backend suite, then what only a
//! shared database has — migrations from several processes, nodes sharing
//! secrets but not leases, a connection that dies.

use super::*;
use crate::config::{Store as StoreConfig, StoreBackend, StoreTls};
use crate::store::postgres::{PostgresBackend, PostgresSettings, MIGRATIONS, SCHEMA_VERSION};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use warden_tests::pg::{Auth, ClusterOptions, PgCluster};

const PASSWORD: &str = "store-pw-3f9a1c";

struct Server {
    pg: Arc<PgCluster>,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
        pg.psql_admin(&format!("CREATE ROLE warden LOGIN PASSWORD '{PASSWORD}'"));
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("store-password");
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        Server {
            pg: Arc::new(pg),
            dir,
        }
    }

    /// A new database owned by the store role, and the `[store]` reaching it.
    fn database(&self, name: &str) -> StoreConfig {
        self.pg
            .psql_admin(&format!("CREATE DATABASE {name} OWNER warden"));
        StoreConfig {
            backend: StoreBackend::Postgres,
            url: Some(format!(
                "postgresql://warden@127.0.0.1:{}/{name}",
                self.pg.port
            )),
            password_file: Some(self.dir.path().join("store-password")),
            tls: StoreTls::Disable,
            ..StoreConfig::default()
        }
    }

    fn open(&self, cfg: &StoreConfig, node: &str) -> PostgresBackend {
        PostgresBackend::open(PostgresSettings::from_config(cfg).unwrap(), node).unwrap()
    }

    fn raw(&self, db: &str) -> ::postgres::Client {
        ::postgres::Config::new()
            .host("127.0.0.1")
            .port(self.pg.port)
            .user("warden")
            .password(PASSWORD)
            .dbname(db)
            .connect(::postgres::NoTls)
            .unwrap()
    }
}

struct PgRaw {
    client: Mutex<::postgres::Client>,
    pg: Arc<PgCluster>,
    db: String,
}

impl Raw for PgRaw {
    fn exec(&self, sql: &str, params: &[&[u8]]) {
        let params: Vec<&(dyn ::postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn ::postgres::types::ToSql + Sync))
            .collect();
        self.client.lock().unwrap().execute(sql, &params).unwrap();
    }
    fn rows(&self, sql: &str) -> Vec<Vec<Vec<u8>>> {
        let rows = self.client.lock().unwrap().query(sql, &[]).unwrap();
        rows.iter()
            .map(|r| (0..r.len()).map(|i| r.get::<_, Vec<u8>>(i)).collect())
            .collect()
    }
    /// A dump of the database, and its files and the WAL on the server's disk.
    fn everything(&self) -> Vec<u8> {
        let oid: u32 = self
            .client
            .lock()
            .unwrap()
            .query_one(
                "SELECT oid FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .unwrap()
            .get(0);
        let mut all = self.pg.pg_dump(&self.db).into_bytes();
        assert!(
            String::from_utf8_lossy(&all).contains("secret_versions"),
            "the dump holds the store's tables"
        );
        for dir in [
            self.pg.data_dir.join("base").join(oid.to_string()),
            self.pg.data_dir.join("pg_wal"),
        ] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    all.extend(std::fs::read(path).unwrap());
                }
            }
        }
        all
    }
}

fn case(server: &Server, db: &str) -> Case {
    let cfg = server.database(db);
    let backend = server.open(&cfg, "node-a");
    Case {
        store: SecretStore::new(Box::new(backend)),
        raw: Box::new(PgRaw {
            client: Mutex::new(server.raw(db)),
            pg: server.pg.clone(),
            db: db.to_string(),
        }),
        _keep: Box::new(()),
    }
}

#[test]
fn postgres_backend() {
    let server = Server::start();
    // The suite every backend passes, each case on a database of its own.
    for (i, (name, run)) in CASES.iter().enumerate() {
        eprintln!("postgres backend: {name}");
        run(case(&server, &format!("suite_{i}")));
    }
    migrations_are_applied_once_by_concurrent_nodes(&server);
    a_schema_newer_than_this_warden_is_refused(&server);
    nodes_share_secrets_and_keep_their_own_leases(&server);
    a_lost_connection_is_remade(&server);
    password_file_problems_name_the_key(&server);
    changes_are_announced_on_commit_only(&server);
    one_node_holds_a_claim_until_it_lapses(&server);
}

fn changes_are_announced_on_commit_only(server: &Server) {
    use ::postgres::fallible_iterator::FallibleIterator;
    let cfg = server.database("announce");
    let mut a = server.open(&cfg, "node-a");
    let mut listener = server.raw("announce");
    listener.batch_execute("LISTEN warden_changes").unwrap();
    let counter = |c: &mut ::postgres::Client| -> i64 {
        c.query_one("SELECT value FROM change_counter", &[])
            .unwrap()
            .get(0)
    };
    let before = counter(&mut listener);
    let sealed = |_v: u32| {
        Ok(SealedVersion {
            kek_id: "k".into(),
            wrapped_key: vec![1],
            ciphertext: b"not-a-value".to_vec(),
        })
    };
    // A write whose commit hook fails is neither counted nor announced.
    let err = a.put_version("db/app", "prod", "t", 3, &mut sealed.clone(), &mut |_| {
        Err(Error::internal("audit refused"))
    });
    assert!(err.is_err());
    a.put_version("db/app", "prod", "t", 3, &mut sealed.clone(), &mut |_| {
        Ok(())
    })
    .unwrap();
    a.meta_set("frozen_workloads", "[]").unwrap();
    a.meta_update("frozen_workloads", &mut |cur| {
        assert_eq!(cur.as_deref(), Some("[]"));
        Ok("[ ]".into())
    })
    .unwrap();
    a.remove("db/app", "prod", &mut |_| Ok(())).unwrap();
    let mut got = Vec::new();
    let mut notes = listener.notifications();
    let mut it = notes.timeout_iter(std::time::Duration::from_secs(5));
    while got.len() < 4 {
        match it.next().unwrap() {
            Some(n) => got.push(n.payload().to_string()),
            None => break,
        }
    }
    drop(it);
    drop(notes);
    let expect: Vec<String> = [
        "secret:db/app/prod",
        "meta:frozen_workloads",
        "meta:frozen_workloads",
        "secret:db/app/prod",
    ]
    .iter()
    .enumerate()
    .map(|(i, what)| format!("{}:{what}", before + 1 + i as i64))
    .collect();
    assert_eq!(got, expect);
    assert_eq!(counter(&mut listener), before + 4);
    assert_eq!(
        a.meta_get("frozen_workloads").unwrap().as_deref(),
        Some("[ ]")
    );
}

fn one_node_holds_a_claim_until_it_lapses(server: &Server) {
    let cfg = server.database("claims");
    let mut a = server.open(&cfg, "node-a");
    let mut b = server.open(&cfg, "node-b");
    let long = std::time::Duration::from_secs(600);
    assert!(a.claim("rotation:x/prod", long).unwrap());
    assert!(!b.claim("rotation:x/prod", long).unwrap(), "held by a");
    assert!(
        a.claim("rotation:x/prod", long).unwrap(),
        "a renews its own"
    );
    assert!(
        b.claim("rotation:y/prod", long).unwrap(),
        "another job is free"
    );
    // b cannot release a's claim; a can.
    b.release_claim("rotation:x/prod").unwrap();
    assert!(!b.claim("rotation:x/prod", long).unwrap());
    a.release_claim("rotation:x/prod").unwrap();
    assert!(b.claim("rotation:x/prod", long).unwrap());
    // A claim of a node that died lapses at its expiry.
    assert!(a
        .claim("rotation:z/prod", std::time::Duration::from_millis(200))
        .unwrap());
    assert!(!b.claim("rotation:z/prod", long).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert!(b.claim("rotation:z/prod", long).unwrap(), "lapsed");
}

fn migrations_are_applied_once_by_concurrent_nodes(server: &Server) {
    let cfg = server.database("migrations");
    let results: Vec<_> = (0..4)
        .map(|i| {
            let settings = PostgresSettings::from_config(&cfg).unwrap();
            std::thread::spawn(move || {
                PostgresBackend::connect(settings, &format!("node-{i}")).and_then(|b| b.migrate())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let applied = results
        .iter()
        .filter(|r| matches!(r, Ok((0, v)) if *v == SCHEMA_VERSION))
        .count();
    for r in &results {
        let (_, after) = r.as_ref().unwrap();
        assert_eq!(*after, SCHEMA_VERSION);
    }
    assert_eq!(
        applied, 1,
        "exactly one node applies the migrations: {results:?}"
    );
    let mut raw = server.raw("migrations");
    let rows = raw
        .query("SELECT version FROM warden_schema ORDER BY version", &[])
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=MIGRATIONS.len() as i32).collect::<Vec<_>>());
    // Opening again changes nothing.
    let b = server.open(&cfg, "node-9");
    assert_eq!(b.migrate().unwrap(), (SCHEMA_VERSION, SCHEMA_VERSION));
    assert_eq!(b.schema_version().unwrap(), SCHEMA_VERSION);
}

fn a_schema_newer_than_this_warden_is_refused(server: &Server) {
    let cfg = server.database("newer");
    drop(server.open(&cfg, "node-a"));
    server
        .raw("newer")
        .execute(
            "INSERT INTO warden_schema (version, applied_by) VALUES ($1, 'a later warden')",
            &[&(SCHEMA_VERSION + 1)],
        )
        .unwrap();
    let settings = PostgresSettings::from_config(&cfg).unwrap();
    let e = PostgresBackend::open(settings, "node-a")
        .err()
        .expect("a newer schema must be refused");
    assert_eq!(e.kind, ErrorKind::Usage, "{e}");
    assert!(e.message.contains("upgrade warden"), "{e}");
    assert!(e.message.contains("127.0.0.1"), "{e}");
}

fn nodes_share_secrets_and_keep_their_own_leases(server: &Server) {
    let cfg = server.database("fleet");
    let kek = new_kek();
    let mut a = SecretStore::new(Box::new(server.open(&cfg, "node-a")));
    let mut b = SecretStore::new(Box::new(server.open(&cfg, "node-b")));
    put(&mut a, &kek, "shared", "prod", b"from-a", 100);
    assert_eq!(
        b.get(&kek, "shared", "prod", None).unwrap().1.as_slice(),
        b"from-a"
    );

    // Two nodes writing one secret at once: every version number once.
    let mut threads = Vec::new();
    for node in ["node-a", "node-b"] {
        let settings = PostgresSettings::from_config(&cfg).unwrap();
        let kek = Kek::from_key(Key256::from_slice(kek.key().as_bytes()).unwrap());
        let node = node.to_string();
        threads.push(std::thread::spawn(move || {
            let backend = PostgresBackend::open(settings, &node).unwrap();
            let mut store = SecretStore::new(Box::new(backend));
            (0..15)
                .map(|i| {
                    let value = format!("{node}-{i}");
                    put(&mut store, &kek, "shared", "prod", value.as_bytes(), 100)
                })
                .collect::<Vec<u32>>()
        }));
    }
    let mut versions: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (2..=31).collect::<Vec<u32>>());
    assert_eq!(b.backend().versions("shared", "prod").unwrap().len(), 31);

    // Lease rows: each node sees, sweeps and deletes only its own.
    let lease = LeaseRow {
        id: "lease-of-a".into(),
        route: "orders-db".into(),
        workload: "reports".into(),
        role: "warden_lease_1".into(),
        state: "active".into(),
        owner_pid: 1,
        created_at: 1,
        expires_at: 2,
        max_expires_at: 3,
    };
    a.backend_mut().lease_put(&lease).unwrap();
    assert!(b.backend().lease_list().unwrap().is_empty());
    b.backend_mut().lease_delete("lease-of-a").unwrap();
    assert_eq!(a.backend().lease_list().unwrap(), vec![lease]);
}

fn a_lost_connection_is_remade(server: &Server) {
    let cfg = server.database("reconnect");
    let mut backend = server.open(&cfg, "node-a");
    backend.meta_set("k", "v").unwrap();
    // The server ends every warden connection (a restart, a failover, a
    // proxy dropping idle connections looks the same to the client).
    server.pg.psql_admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'warden'",
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(backend.meta_get("k").unwrap().as_deref(), Some("v"));
    backend.meta_set("k", "w").unwrap();
    // A transaction whose connection dies half-way fails and keeps nothing.
    let kek = new_kek();
    let mut store = SecretStore::new(Box::new(backend));
    let pg = server.pg.clone();
    let e = store
        .put(&kek, nv("cut", "prod", b"cut-value", 10), &mut |_| {
            pg.psql_admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'warden'",
            );
            Ok(())
        })
        .unwrap_err();
    assert!(e.message.contains("127.0.0.1"), "{e}");
    assert!(store.backend().list(None).unwrap().is_empty());
    assert_eq!(put(&mut store, &kek, "cut", "prod", b"v", 10), 1);
}

fn password_file_problems_name_the_key(server: &Server) {
    let mut cfg = server.database("passwords");
    let pw = server.dir.path().join("loose");
    std::fs::write(&pw, PASSWORD).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    cfg.password_file = Some(pw.clone());
    let e = PostgresSettings::from_config(&cfg).err().unwrap();
    assert!(
        e.message.contains("store.password_file") && e.message.contains("chmod 600"),
        "{e}"
    );
    std::fs::write(&pw, "wrong-password").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = PostgresBackend::open(PostgresSettings::from_config(&cfg).unwrap(), "node-a")
        .err()
        .unwrap();
    assert!(e.message.contains("store.password_file"), "{e}");
    assert!(
        e.message.contains(&format!("127.0.0.1:{}", server.pg.port)),
        "{e}"
    );
    assert!(!e.message.contains("wrong-password"), "{e}");
    cfg.password_file = Some(server.dir.path().join("absent"));
    let e = PostgresSettings::from_config(&cfg).err().unwrap();
    assert!(e.message.contains("store.password_file"), "{e}");
}
