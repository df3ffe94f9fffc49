//! Fleet mode when the store's database is down, through real daemons: two
//! nodes share a store on one throwaway PostgreSQL cluster and serve a
//! PostgreSQL route to a second, separate "app" cluster. The store cluster
//! is stopped (`pg_ctl stop -m fast`) and started again:
//!
//! - while it is down, node 1 keeps serving sessions with the credential it
//!   cached, past the route's `cache_ttl` (1 s), up to `store.stale_if_error`
//!   (8 s); then it refuses, naming the store and the outage;
//! - a `secret put` fails, naming the store and saying it is unreachable;
//! - `/readyz` answers 503 with the outage, `warden_store_up` is 0 and
//!   `warden_store_unreachable_seconds` grows; stale serves are counted;
//! - session audit records keep being written to the node's local log;
//! - when the cluster is back, the node is ready again by itself and a put
//!   on node 2 reaches node 1's next session.
//!
//! And 30 s without the store under load, on one node with a static route
//! and dynamic (leased) routes: a client loop's sessions with the cached
//! credential and with a lease held before the outage are all served; a
//! workload without a lease is refused with 57P03 naming the store; a lease
//! expiring meanwhile stops being served and is revoked at its expiry; a
//! held lease can be revoked; when the store is back new leases work, the
//! lease rows it missed are caught up, and every audit record the node wrote
//! meanwhile reaches the store's copy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use warden_tests::fleet::{join, store_on, works, NodeSpec, STORE_DB};
use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::prom::sample;
use warden_tests::{free_port, Instance, Output};

const STORE_PASSWORD: &str = "outage-store-PW-51c7";
const PASSWORD: &str = "outage-app-PW-CANARY-7e90";

fn store_cluster() -> (PgCluster, tempfile::TempDir) {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    let dir = store_on(&pg, STORE_PASSWORD);
    (pg, dir)
}

fn node(store: &PgCluster, pw_dir: &tempfile::TempDir, app: &PgCluster, port: u16) -> Instance {
    NodeSpec {
        cache_ttl: "1s",
        url_query: "?connect_timeout=2",
        store_keys: "stale_if_error = \"8s\"",
        ..NodeSpec::new(port, app.port, store.port, pw_dir.path())
    }
    .instance()
}

fn session(port: u16) -> Output {
    run_psql(
        &format!("host=127.0.0.1 port={port} dbname=app user=legacy connect_timeout=5"),
        "select current_user",
    )
}

/// The SQLSTATE of the ErrorResponse node 1's route answers a raw
/// StartupMessage with (field `C`), read off the wire.
fn refusal_sqlstate(port: u16) -> String {
    refusal_sqlstate_of(port, "app")
}

/// [`refusal_sqlstate`] for database `database`.
fn refusal_sqlstate_of(port: u16, database: &str) -> String {
    let mut body = 196608u32.to_be_bytes().to_vec(); // protocol 3.0
    for (k, v) in [("user", "legacy"), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = u32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    msg.extend(body);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(&msg).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let fields = reply.get(5..).unwrap_or_default();
    fields
        .split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

/// Polls `check` every 100 ms until it holds; panics with `what` after `limit`.
fn wait(limit: Duration, what: &str, check: impl FnMut() -> Option<String>) {
    warden_tests::fleet::wait(limit, Duration::from_millis(100), what, check)
}

fn metric(node: &Instance, series: &str) -> Option<f64> {
    let (code, text) = node.http_get("/metrics");
    assert_eq!(code, 200, "{text}");
    sample(&text, series)
}

fn audit_count(node: &Instance, action: &str) -> usize {
    std::fs::read_to_string(node.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"action\":\"{action}\"")))
        .count()
}

#[test]
fn a_node_rides_out_a_store_outage_and_recovers_by_itself() {
    let (store, pw_dir) = store_cluster();
    let app = PgCluster::start(ClusterOptions::new(Auth::Scram));
    app.create_role("app", PASSWORD);
    let (port1, port2) = (free_port(), free_port());
    let node1 = node(&store, &pw_dir, &app, port1);
    let node2 = node(&store, &pw_dir, &app, port2);
    node1.run(&["init"]).ok();
    join(&node1, &node2);
    node1.put("app-db/app", PASSWORD.as_bytes()).ok();
    let d1 = node1.start_daemon();
    let _d2 = node2.start_daemon();

    // Healthy: ready, store up, a session caches the credential.
    assert_eq!(node1.http_get("/readyz").0, 200);
    // The cache entry is made during this session: not before this instant.
    let cached_at = Instant::now();
    let out = session(port1);
    assert!(works(&out), "{out:?}");
    let session_done = Instant::now();
    assert_eq!(metric(&node1, "warden_store_up"), Some(1.0));
    assert_eq!(
        metric(&node1, "warden_store_unreachable_seconds"),
        Some(0.0)
    );

    // The store's database goes down.
    store.halt();
    wait(
        Duration::from_secs(15),
        "node 1 not ready while the store is down",
        || {
            let (code, body) = node1.http_get("/readyz");
            (code != 503 || !body.contains("is unreachable since"))
                .then(|| format!("{code} {body}"))
        },
    );
    let (_, body) = node1.http_get("/readyz");
    assert!(
        body.contains("PostgreSQL store warden@127.0.0.1:"),
        "{body}"
    );
    assert!(body.contains("writes (secret put/rm/rotate"), "{body}");
    assert_eq!(metric(&node1, "warden_store_up"), Some(0.0));

    // Past the 1 s cache_ttl, sessions are still served from the cache.
    let starts_before = audit_count(&node1, "session.start");
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(session_done.elapsed()));
    for _ in 0..3 {
        let out = session(port1);
        assert!(
            works(&out),
            "stale serve refused: {out:?}\n{}",
            d1.log_text()
        );
    }
    let stale = metric(
        &node1,
        "warden_credentials_stale_served_total{route=\"app-db\"}",
    );
    assert!(stale.is_some_and(|n| n >= 3.0), "{stale:?}");
    assert!(metric(&node1, "warden_store_unreachable_seconds").is_some_and(|s| s > 0.0));
    // Their audit records are in the node's local log.
    assert!(audit_count(&node1, "session.start") >= starts_before + 3);

    // A write fails, naming the store and the outage.
    let out = node1.put("app-db/app", b"written-while-down");
    assert_eq!(out.code, 7, "{out:?}");
    assert!(
        out.stderr.contains("PostgreSQL store warden@127.0.0.1:")
            && out.stderr.contains("unreachable since"),
        "{out:?}"
    );
    assert!(!out.stderr.contains(STORE_PASSWORD), "{out:?}");

    // Past cache_ttl + stale_if_error: refused, naming the cause.
    wait(
        Duration::from_secs(20),
        "refusal once stale_if_error ran out",
        || {
            let out = session(port1);
            (out.code == 0
                || !out.stderr.contains("is unreachable since")
                || !out.stderr.contains("cached credential expired"))
            .then(|| format!("{out:?}"))
        },
    );
    let refused_after = cached_at.elapsed();
    // PostgreSQL's own "cannot connect now": clients retry it.
    assert_eq!(refusal_sqlstate(port1), "57P03");
    assert!(
        refused_after >= Duration::from_secs(9),
        "refused {refused_after:?} after the credential was cached, before cache_ttl + stale_if_error ran out"
    );
    assert!(!d1.log_text().contains(PASSWORD));

    // The database returns: the node is ready again by itself and serves.
    store.resume();
    wait(Duration::from_secs(20), "node 1 ready again", || {
        let (code, body) = node1.http_get("/readyz");
        (code != 200).then(|| format!("{code} {body}"))
    });
    assert_eq!(metric(&node1, "warden_store_up"), Some(1.0));
    let out = session(port1);
    assert!(works(&out), "{out:?}");

    // A change made on node 2 reaches node 1 (by propagation, at the latest
    // when its 1 s cache entry ends).
    node2.put("app-db/app", b"not-the-password").ok();
    wait(
        Duration::from_secs(20),
        "put on node 2 used by node 1",
        || {
            let out = session(port1);
            (out.code == 0 || !out.stderr.contains("app-db/app v2")).then(|| format!("{out:?}"))
        },
    );
    // For reading what the node logged through the outage.
    if let Some(p) = std::env::var_os("WARDEN_TEST_KEEP_LOG") {
        std::fs::write(p, d1.log_text()).unwrap();
    }
}

// ---- 30 s under load, with leases ---------------------------------------------

const LEASE_ADMIN_PASSWORD: &str = "outage-lease-admin-PW-CANARY-93b2";

/// One dynamic route to database `shop` (admin role `lease_admin`).
fn lease_route(name: &str, port: u16, app: &PgCluster, ttl: &str) -> String {
    format!(
        r#"
[[route]]
name = "{name}"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{app_port}"
upstream_tls = {{ mode = "disable" }}
allow = ["me"]
databases = ["shop"]
connect_timeout = "2s"

[route.credential]
user = "lease_admin"
secret = "shop/admin"

[route.credential.dynamic]
ttl = "{ttl}"
max_ttl = "1h"
grants = ["GRANT CONNECT ON DATABASE shop TO {{role}}"]
"#,
        app_port = app.port,
    )
}

/// A node with the static route `app-db` (`cache_ttl` 1 s, `stale_if_error`
/// 2 min: it covers the outage) and three dynamic routes: `held` (a lease
/// taken before the outage that outlives it), `short` (a 10 s lease that
/// expires during it) and `fresh` (no lease before it).
fn load_node(
    store: &PgCluster,
    pw_dir: &tempfile::TempDir,
    app: &PgCluster,
    ports: [u16; 4],
) -> Instance {
    let routes = [
        lease_route("held", ports[1], app, "2m"),
        lease_route("short", ports[2], app, "10s"),
        lease_route("fresh", ports[3], app, "2m"),
    ]
    .concat();
    NodeSpec {
        cache_ttl: "1s",
        url_query: "?connect_timeout=2",
        store_keys: "stale_if_error = \"2m\"",
        before: "\n[[secret]]\nname = \"shop/admin\"\n",
        extra: &routes,
        ..NodeSpec::new(ports[0], app.port, store.port, pw_dir.path())
    }
    .instance()
}

fn lease_session(port: u16) -> Output {
    run_psql(
        &format!("host=127.0.0.1 port={port} dbname=shop user=legacy connect_timeout=5"),
        "select current_user",
    )
}

/// Non-empty lines of the node's local audit log.
fn local_records(node: &Instance) -> usize {
    std::fs::read_to_string(node.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn thirty_seconds_without_the_store_under_load_refuse_nothing_servable_and_lose_no_record() {
    let (store, pw_dir) = store_cluster();
    let app = PgCluster::start(ClusterOptions::new(Auth::Scram));
    app.create_role("app", PASSWORD);
    app.psql_admin(&format!(
        "CREATE ROLE lease_admin LOGIN CREATEROLE PASSWORD '{LEASE_ADMIN_PASSWORD}';\nCREATE DATABASE shop OWNER lease_admin;"
    ));
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let [p_static, p_held, p_short, p_fresh] = ports;
    let node = load_node(&store, &pw_dir, &app, ports);
    node.run(&["init"]).ok();
    node.put("app-db/app", PASSWORD.as_bytes()).ok();
    node.put("shop/admin", LEASE_ADMIN_PASSWORD.as_bytes()).ok();
    let d = node.start_daemon();
    let roles = |role: &str| {
        app.psql_admin(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
        ))
        .trim()
        .to_string()
    };
    let store_sql = |sql: &str| store.psql_admin_in(STORE_DB, sql).trim().to_string();

    // Before: the static credential is cached, `held` and `short` hold leases.
    assert!(works(&session(p_static)), "{}", d.log_text());
    let held = lease_session(p_held);
    assert_eq!(held.code, 0, "{held:?}\n{}", d.log_text());
    let held_role = held.stdout.trim().to_string();
    let short = lease_session(p_short);
    assert_eq!(short.code, 0, "{short:?}");
    let short_role = short.stdout.trim().to_string();
    assert!(held_role.starts_with("warden_me_") && short_role.starts_with("warden_me_"));
    assert_eq!(
        store_sql(&format!(
            "SELECT count(*) FROM leases WHERE role IN ('{held_role}', '{short_role}')"
        )),
        "2"
    );

    // The store goes down for 30 s while a client keeps opening sessions on
    // the static route and on `held` (both servable throughout).
    store.halt();
    let halted = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let held_role = held_role.clone();
        std::thread::spawn(move || {
            let (mut served, mut failed) = ([0usize; 2], Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = session(p_static);
                if works(&out) {
                    served[0] += 1;
                } else {
                    failed.push(format!("static: {out:?}"));
                }
                let out = lease_session(p_held);
                if out.code == 0 && out.stdout.trim() == held_role {
                    served[1] += 1;
                } else {
                    failed.push(format!("held lease: {out:?}"));
                }
            }
            (served, failed)
        })
    };
    wait(Duration::from_secs(15), "the node sees the outage", || {
        let (code, body) = node.http_get("/readyz");
        (code != 503 || !body.contains("is unreachable since")).then(|| format!("{code} {body}"))
    });

    // A workload without a lease: refused at once, naming the store and the outage.
    let out = lease_session(p_fresh);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("PostgreSQL store warden@127.0.0.1:")
            && out.stderr.contains("is unreachable since")
            && out.stderr.contains("holds no lease on this node"),
        "{out:?}"
    );
    assert_eq!(refusal_sqlstate_of(p_fresh, "shop"), "57P03");
    let log = std::fs::read_to_string(node.audit_log()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"action\":\"session.error\"")
                && l.contains("\"route\":\"fresh\"")
                && l.contains("is unreachable since")),
        "{log}"
    );

    // The 10 s lease expires during the outage: no longer served (a new one
    // cannot be made), and revoked on the database at its expiry anyway.
    wait(
        Duration::from_secs(20),
        "the expired lease refused during the outage",
        || {
            let out = lease_session(p_short);
            (out.code == 0 || !out.stderr.contains("holds no lease on this node"))
                .then(|| format!("{out:?}"))
        },
    );
    wait(
        Duration::from_secs(10),
        "the expired lease's role dropped during the outage",
        || (roles(&short_role) != "0").then(|| roles(&short_role)),
    );
    assert!(
        std::fs::read_to_string(node.audit_log())
            .unwrap()
            .lines()
            .any(|l| l.contains("\"action\":\"lease.revoke\"")
                && l.contains(&short_role)
                && l.contains("deleted once it is back")),
        "no lease.revoke record for {short_role}"
    );
    assert_eq!(roles(&held_role), "1");

    // 30 s of outage in all.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(halted.elapsed()));
    assert_eq!(metric(&node, "warden_store_up"), Some(0.0));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = client.join().unwrap();
    println!(
        "during the 30 s outage: {} static and {} leased sessions served, {} refused",
        served[0],
        served[1],
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "servable sessions refused during the outage: {failed:#?}\n{}",
        d.log_text()
    );
    assert!(served[0] >= 5 && served[1] >= 5, "{served:?}");
    let stale = metric(
        &node,
        "warden_credentials_stale_served_total{route=\"app-db\"}",
    );
    assert!(stale.is_some_and(|n| n >= 1.0), "{stale:?}");

    // `lease revoke` of a lease this node holds works during the outage:
    // its role is dropped now, its row deleted once the store is back.
    let list: serde_json::Value =
        serde_json::from_str(&node.run(&["lease", "list", "--json"]).ok().stdout).unwrap();
    let held_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["role"] == held_role.as_str())
        .and_then(|l| l["id"].as_str())
        .unwrap()
        .to_string();
    node.run(&["lease", "revoke", &held_id]).ok();
    assert_eq!(roles(&held_role), "0");

    // The store returns: ready again, new leases work, the expired lease's
    // row is gone from the store, and every local audit record reaches it.
    store.resume();
    wait(Duration::from_secs(20), "node ready again", || {
        let (code, body) = node.http_get("/readyz");
        (code != 200).then(|| format!("{code} {body}"))
    });
    wait(
        Duration::from_secs(20),
        "a new lease after the outage",
        || {
            let out = lease_session(p_fresh);
            (out.code != 0).then(|| format!("{out:?}"))
        },
    );
    let out = lease_session(p_short);
    assert!(out.code == 0 && out.stdout.trim() != short_role, "{out:?}");
    wait(
        Duration::from_secs(20),
        "the expired and the revoked lease's rows deleted from the store",
        || {
            let n = store_sql(&format!(
                "SELECT count(*) FROM leases WHERE role IN ('{short_role}', '{held_role}')"
            ));
            (n != "0").then_some(n)
        },
    );
    let local = local_records(&node);
    wait(
        Duration::from_secs(30),
        "every local audit record copied to the store",
        || {
            let local = local_records(&node);
            let copied: usize = store_sql("SELECT count(*) FROM audit_records")
                .parse()
                .unwrap_or(0);
            (copied != local).then(|| format!("{copied} in the store, {local} local"))
        },
    );
    let starts = audit_count(&node, "session.start");
    let copied_starts: usize = store_sql(
        "SELECT count(*) FROM audit_records WHERE line LIKE '%\"action\":\"session.start\"%'",
    )
    .parse()
    .unwrap();
    assert!(starts >= served[0] + served[1], "{starts} < {served:?}");
    assert_eq!(copied_starts, starts);
    assert!(local > 0);
    assert!(!d.log_text().contains(PASSWORD) && !d.log_text().contains(LEASE_ADMIN_PASSWORD));
    node.run(&["audit", "verify", "--fleet"]).ok();
}
