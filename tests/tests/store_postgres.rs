//! The PostgreSQL store (`[store] backend = "postgres"`) through the real CLI
//! and daemon: two nodes (two data dirs, one master key) share one database
//! reached over verified TLS; the database never holds a value in plaintext;
//! `warden store migrate` from several processes at once; and bad `[store]`
//! settings end in a message naming the key, never a panic or a secret.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use warden_tests::pg::{Auth, ClusterOptions, PgCluster};
use warden_tests::{contains_bytes, files_containing, free_port, Instance, Output};

const STORE_PASSWORD: &str = "st0re-PW-e2e-51a7";

/// A TLS cluster with the store role `warden` and a private password file.
struct Store {
    pg: PgCluster,
    dir: tempfile::TempDir,
}

impl Store {
    fn start() -> Store {
        let pg = PgCluster::start(ClusterOptions {
            auth: Auth::Scram,
            tls: true,
            ..ClusterOptions::default()
        });
        pg.psql_admin(&format!(
            "CREATE ROLE warden LOGIN PASSWORD '{STORE_PASSWORD}'"
        ));
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("store-password");
        std::fs::write(&pw, format!("{STORE_PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        Store { pg, dir }
    }

    fn database(&self, name: &str) {
        self.pg
            .psql_admin(&format!("CREATE DATABASE {name} OWNER warden"));
    }

    /// The `[store]` table for database `db`: verify-full against the test CA.
    fn toml(&self, db: &str) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@127.0.0.1:{port}/{db}\"\npassword_file = \"{pw}\"\nca_file = \"{ca}\"\n",
            port = self.pg.port,
            pw = self.dir.path().join("store-password").display(),
            ca = self.pg.ca_pem.as_ref().unwrap().display(),
        )
    }
}

/// No panic, no Debug dump of an error or a config, in a CLI's output.
fn assert_clean(out: &Output) {
    let all = format!("{}{}", out.stdout, out.stderr);
    for bad in [
        "panicked",
        "RUST_BACKTRACE",
        "Error {",
        "kind:",
        "Config {",
        "Some(",
    ] {
        assert!(!all.contains(bad), "{bad:?} in output: {out:#?}");
    }
    assert!(
        !all.contains(STORE_PASSWORD),
        "the store password leaked: {out:#?}"
    );
}

fn reveal(node: &Instance, name: &str) -> Output {
    node.run(&["secret", "get", name, "--reveal"])
}

#[test]
fn two_nodes_share_one_store_which_never_sees_plaintext() {
    let store = Store::start();
    store.database("fleet");
    let node1 = Instance::new_with(&store.toml("fleet"));
    let out = node1.run(&["init"]);
    out.ok();
    assert_clean(&out);

    // A second `init` on the same store is refused with what to do instead.
    let node2 = Instance::new_with(&store.toml("fleet"));
    let out = node2.run(&["init"]);
    out.code(2)
        .stderr_has("already initialised")
        .stderr_has(&format!("127.0.0.1:{}/fleet", store.pg.port))
        .stderr_has("warden node join");
    assert_clean(&out);
    // Node 2 joins the way the message says: a single-use token made on node
    // 1 (offline here: no daemon runs), fed to `node join` on stdin.
    let token = node1.run(&["node", "token", "--ttl", "5m"]);
    token.ok();
    node2
        .run_stdin(&["node", "join"], token.stdout.as_bytes())
        .ok()
        .stderr_has("joined the fleet");
    assert!(node2.data_dir.join("master.key").exists());

    let values: [&[u8]; 4] = [
        b"node1-put-CANARY-3b8e0f",
        b"node2-put-CANARY-a41c9d",
        b"daemon-put-CANARY-77e2b1",
        b"second-version-CANARY-0c5d",
    ];
    // Put through node 1 (offline), read on node 2.
    node1
        .put("orders-db/app", values[0])
        .ok()
        .stdout_has("version 1");
    assert_eq!(
        reveal(&node2, "orders-db/app").ok().stdout.as_bytes(),
        values[0]
    );
    // And the other way, with version numbers continuing across nodes.
    node2.put("payments/token", values[1]).ok();
    node2
        .put("orders-db/app", values[3])
        .ok()
        .stdout_has("version 2");
    assert_eq!(
        reveal(&node1, "payments/token").ok().stdout.as_bytes(),
        values[1]
    );
    assert_eq!(
        reveal(&node1, "orders-db/app").ok().stdout.as_bytes(),
        values[3]
    );
    let list = node1.run(&["secret", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list.ok().stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");

    // Node 1's daemon on the same store: a put through its admin socket is
    // read by node 2's CLI.
    let mut daemon = node1.start_daemon();
    node1.put("via/daemon", values[2]).ok();
    assert_eq!(
        reveal(&node2, "via/daemon").ok().stdout.as_bytes(),
        values[2]
    );
    node2.run(&["secret", "rm", "payments/token"]).ok();
    node1
        .run(&["secret", "get", "payments/token", "--reveal"])
        .code(5);
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());

    // Each node keeps its own audit log, and both verify.
    node1.run(&["audit", "verify"]).ok();
    node2.run(&["audit", "verify"]).ok();

    // A stolen dump of the store database holds no value, as is or as hex.
    let dump = store.pg.pg_dump("fleet");
    assert!(dump.contains("secret_versions"), "the dump holds the store");
    assert!(
        dump.contains("orders-db/app"),
        "names are in the clear, values not"
    );
    for value in values {
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !contains_bytes(dump.as_bytes(), value),
            "a value is in the dump"
        );
        assert!(!dump.contains(&hex), "a value is in the dump as bytea hex");
        // Nor anywhere on the server's disk (tables, WAL), nor in the
        // nodes' data dirs, logs and audit records.
        for dir in [
            &store.pg.data_dir,
            &node1.dir.path().to_path_buf(),
            &node2.dir.path().to_path_buf(),
        ] {
            let hits = files_containing(dir, value);
            assert!(hits.is_empty(), "plaintext in {hits:?}");
        }
    }
}

#[test]
fn store_migrate_from_two_processes_at_once() {
    let store = Store::start();
    store.database("migrations");
    let node = Instance::new_with(&store.toml("migrations"));
    let children: Vec<_> = (0..2)
        .map(|_| {
            node.command(&["store", "migrate"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut migrated = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("schema version 3"), "{stdout}");
        if stdout.contains("migrated from 0") {
            migrated += 1;
        }
    }
    assert_eq!(migrated, 1, "exactly one process applies the migration");
    assert_eq!(
        store.pg.psql_admin_in(
            "migrations",
            "SELECT count(*), max(version) FROM warden_schema"
        ),
        "3|3"
    );
    node.run(&["store", "migrate"])
        .ok()
        .stdout_has("schema version 3 (up to date)");
    let json = node.run(&["store", "migrate", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.ok().stdout).unwrap();
    assert_eq!(v["schema_version"], 3, "{v}");

    // A schema from a newer warden is refused, by migrate and by every verb.
    store.pg.psql_admin_in(
        "migrations",
        "INSERT INTO warden_schema (version, applied_by) VALUES (4, 'a newer warden')",
    );
    for args in [&["store", "migrate"][..], &["init"][..]] {
        let out = node.run(args);
        out.code(2).stderr_has("upgrade warden");
        assert_clean(&out);
    }

    // The embedded store needs no migrate.
    Instance::new()
        .run(&["store", "migrate"])
        .code(2)
        .stderr_has("backend = \"postgres\"");
}

#[test]
fn bad_store_settings_name_the_key_and_the_fix() {
    let store = Store::start();
    store.database("w");
    let pw = store.dir.path().join("store-password");
    let ca = store.pg.ca_pem.clone().unwrap();
    let port = store.pg.port;
    // A node whose data dir exists, so that a verb gets as far as the store.
    let with = |store_toml: &str| -> Output {
        let node = Instance::new_with(store_toml);
        std::fs::create_dir(&node.data_dir).unwrap();
        std::fs::set_permissions(&node.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let out = node.run(&["secret", "list"]);
        assert_clean(&out);
        out
    };

    // A password inside the URL: refused at config load, not repeated.
    let out = with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden:{STORE_PASSWORD}@127.0.0.1:{port}/w\"\n"
    ));
    out.code(2)
        .stderr_has("store.url")
        .stderr_has("store.password_file");

    // Plaintext to a server on another host.
    let out = with(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@db.example.com/w\"\ntls = \"disable\"\n",
    );
    out.code(2)
        .stderr_has("store.tls")
        .stderr_has("db.example.com:5432/w")
        .stderr_has("verify-full");

    // Nobody listens on the port: unreachable (an outage, exit 7), not a
    // misconfiguration the server reported.
    let closed = free_port();
    let out = with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@127.0.0.1:{closed}/w\"\ntls = \"disable\"\n"
    ));
    out.code(7)
        .stderr_has(&format!("127.0.0.1:{closed}/w"))
        .stderr_has("store.url")
        .stderr_has("unreachable since");

    // A host name that does not resolve.
    let out = with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@no-such-host.invalid/w\"\nca_file = \"{}\"\n",
        ca.display()
    ));
    out.code(1).stderr_has("no-such-host.invalid:5432/w");

    // The server's certificate does not chain to the configured CA (here: the
    // system bundle).
    let out = with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@127.0.0.1:{port}/w\"\npassword_file = \"{}\"\n",
        pw.display()
    ));
    out.code(1)
        .stderr_has("store.ca_file")
        .stderr_has("certificate");

    // A wrong password.
    let wrong = store.dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-password").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@127.0.0.1:{port}/w\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
        wrong.display(),
        ca.display()
    ));
    out.code(1)
        .stderr_has("store.password_file")
        .stderr_has("28P01");
    assert!(!out.stderr.contains("not-the-password"), "{out:#?}");

    // A systemd credential outside systemd.
    let out = with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@127.0.0.1:{port}/w\"\npassword_credential = \"store-pw\"\nca_file = \"{}\"\n",
        ca.display()
    ));
    out.code(2)
        .stderr_has("store.password_credential")
        .stderr_has("LoadCredential=");

    // The same through $CREDENTIALS_DIRECTORY works (and an uninitialised
    // store says so).
    let node = Instance::new_with(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://warden@127.0.0.1:{port}/w\"\npassword_credential = \"store-password\"\nca_file = \"{}\"\n",
        ca.display()
    ));
    let out = node
        .command(&["store", "migrate"])
        .env("CREDENTIALS_DIRECTORY", store.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::create_dir(&node.data_dir).unwrap();
    std::fs::set_permissions(&node.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new(warden_tests::warden_bin())
        .arg("--config")
        .arg(&node.config)
        .args(["secret", "list"])
        .env("CREDENTIALS_DIRECTORY", store.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not initialised") && stderr.contains("warden init"),
        "{stderr}"
    );
}
