//! Dynamic PostgreSQL credentials (a role per workload lease) and automated
//! rotation of static secrets, end to end against real PostgreSQL clusters,
//! real psql and tokio-postgres clients, and a real warden daemon — including
//! SIGKILL of the daemon between every pair of rotation steps.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use warden_tests::my_uid;
use warden_tests::pg::{pg_bin_dir, psql_available, run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{files_containing, free_port, Daemon, Instance};

const ADMIN_PASSWORD: &str = "adm-CANARY-7d1c2a90-admin";
const APP_PASSWORD: &str = "app-CANARY-0f3e5b71-static";

fn skip() -> bool {
    if !psql_available() {
        eprintln!("skipping: PostgreSQL (psql, initdb) not available");
        return true;
    }
    false
}

/// psql through warden (no password anywhere): (ok, stdout, stderr).
fn psql_via(port: u16, db: &str, sql: &str) -> (bool, String, String) {
    let dsn = format!(
        "host=127.0.0.1 port={port} dbname={db} user=ignored connect_timeout=10 sslmode=disable"
    );
    let out = run_psql(&dsn, sql);
    (out.code == 0, out.stdout.trim().to_string(), out.stderr)
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cond()
}

fn audit(w: &Instance) -> String {
    std::fs::read_to_string(w.audit_log()).unwrap_or_default()
}

/// Starts `warden up` with extra environment (fault points); waits for `status`.
fn start_with_env(w: &Instance, env: &[(&str, &str)]) -> Daemon {
    let log = w.dir.path().join("daemon.log");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let errf = logf.try_clone().unwrap();
    let mut cmd = w.command(&["up"]);
    cmd.env("WARDEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(errf);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let mut d = Daemon { child, log };
    let ok = wait_until(Duration::from_secs(30), || {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("warden up exited with {st}: {}", d.log_text());
        }
        w.run(&["status"]).code == 0
    });
    assert!(ok, "daemon not ready: {}", d.log_text());
    d
}

fn sigkill(d: &mut Daemon) {
    let _ = d.child.kill(); // SIGKILL
    let _ = d.child.wait();
}

// ---------------------------------------------------------------------------
// Dynamic credentials

struct Dyn {
    pg: PgCluster,
    warden: Instance,
    port: u16,
}

/// A cluster with an administrative role (CREATEROLE, not superuser) that
/// owns database `shop` with schema `reports` (granted to leases) and table
/// `public.payroll` (not granted), and a warden route with dynamic leases.
fn dyn_setup(ttl: &str, extra_workloads: &str) -> Dyn {
    dyn_setup_with(ttl, extra_workloads, "")
}

/// `dynamic_extra`: more keys for `[route.credential.dynamic]`.
fn dyn_setup_with(ttl: &str, extra_workloads: &str, dynamic_extra: &str) -> Dyn {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.psql_admin(&format!(
        "CREATE ROLE warden_admin LOGIN CREATEROLE PASSWORD '{ADMIN_PASSWORD}';\nCREATE DATABASE shop OWNER warden_admin;"
    ));
    pg.psql_admin_in(
        "shop",
        "CREATE SCHEMA reports AUTHORIZATION warden_admin;\n\
         CREATE TABLE reports.sales(id int, amount int);\n\
         INSERT INTO reports.sales VALUES (1, 10), (2, 32);\n\
         ALTER TABLE reports.sales OWNER TO warden_admin;\n\
         CREATE TABLE public.payroll(name text, salary int);\n\
         ALTER TABLE public.payroll OWNER TO warden_admin;\n\
         ALTER SYSTEM SET log_statement = 'all';\n\
         SELECT pg_reload_conf();",
    );
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}
{extra_workloads}

[[route]]
name = "shop-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
allow = [{allow}]
databases = ["shop"]
connect_timeout = "3s"

[route.credential]
user = "warden_admin"
secret = "shop-db/admin"

[route.credential.dynamic]
ttl = "{ttl}"
max_ttl = "1h"
grants = ["GRANT USAGE ON SCHEMA reports TO {{role}}", "GRANT SELECT ON ALL TABLES IN SCHEMA reports TO {{role}}"]
{dynamic_extra}
"#,
        uid = my_uid(),
        pgport = pg.port,
        allow = if extra_workloads.is_empty() {
            "\"me\""
        } else {
            "\"me\", \"tester\""
        },
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("shop-db/admin", ADMIN_PASSWORD.as_bytes()).ok();
    Dyn { pg, warden, port }
}

/// Lease roles (LOGIN; the route's group role is NOLOGIN and stays).
fn lease_roles(pg: &PgCluster) -> Vec<String> {
    pg.psql_admin(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE 'warden\\_%' AND rolcanlogin ORDER BY 1",
    )
    .lines()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty() && l != "warden_admin")
    .collect()
}

#[test]
fn dynamic_lease_creates_a_granted_role_used_by_the_session_and_dropped_at_expiry() {
    if skip() {
        return;
    }
    let s = dyn_setup("3s", "");
    let _d = s.warden.start_daemon();
    // A session held open longer than the TTL: the lease is renewed, not revoked.
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=shop user=x sslmode=disable",
        s.port
    );
    let long = std::thread::spawn(move || run_psql(&dsn, "select current_user, pg_sleep(5)"));
    assert!(wait_until(Duration::from_secs(20), || lease_roles(&s.pg)
        .len()
        == 1));
    let (ok, out, err) = psql_via(
        s.port,
        "shop",
        "select current_user || ' ' || (select sum(amount) from reports.sales)",
    );
    assert!(ok, "{err}");
    let (role, sum) = out.split_once(' ').unwrap();
    assert!(role.starts_with("warden_me_"), "{out}");
    assert_eq!(sum, "42");
    // Least privilege: the grant templates, nothing more.
    let (ok, _, err) = psql_via(s.port, "shop", "select * from public.payroll");
    assert!(!ok && err.contains("permission denied"), "{err}");
    // Visible in pg_roles, with VALID UNTIL, the grants and a comment naming the workload.
    let facts = s.pg.psql_admin_in(
        "shop",
        &format!(
            "SELECT rolvaliduntil IS NOT NULL, rolsuper, has_table_privilege('{role}', 'reports.sales', 'SELECT'), \
             has_table_privilege('{role}', 'public.payroll', 'SELECT'), shobj_description(oid, 'pg_authid') \
             FROM pg_roles WHERE rolname = '{role}'"
        ),
    );
    assert!(
        facts.trim().starts_with("t|f|t|f|warden lease shop-db-"),
        "{facts}"
    );
    assert!(
        facts.contains("for workload me on route shop-db"),
        "{facts}"
    );
    // The server only ever saw a SCRAM verifier, never a password.
    let pglog = s.pg.log_text();
    assert!(pglog.contains("PASSWORD E'SCRAM-SHA-256$16:"), "{pglog}");
    // The grants went once to the route's group role; the lease is a member
    // and holds no privilege of its own (no ACL growth per lease).
    let group = s.pg.psql_admin_in(
        "shop",
        &format!(
            "SELECT g.rolname, g.rolcanlogin, has_table_privilege(g.rolname, 'reports.sales', 'SELECT'), \
             (SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = '{role}') \
             FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles l ON l.oid = m.member \
             WHERE l.rolname = '{role}'"
        ),
    );
    assert!(
        group.trim().starts_with("warden_shop_db_grp") && group.trim().ends_with("|f|t|0"),
        "{group}"
    );
    assert!(!pglog.contains(ADMIN_PASSWORD));
    let long = long.join().unwrap();
    assert_eq!(long.code, 0, "{}", long.stderr);
    assert!(
        long.stdout.starts_with(role),
        "one lease per workload: {}",
        long.stdout
    );
    // Gone after the lease expires (ttl 3 s, no open session).
    assert!(
        wait_until(Duration::from_secs(30), || lease_roles(&s.pg).is_empty()),
        "lease role still there: {:?}",
        lease_roles(&s.pg)
    );
    let a = audit(&s.warden);
    assert!(a.contains("\"action\":\"lease.create\""), "{a}");
    assert!(a.contains("\"action\":\"lease.renew\""), "{a}");
    assert!(
        a.contains("\"action\":\"lease.revoke\"") && a.contains("ttl expired"),
        "{a}"
    );
    assert!(a.contains(&format!("role {role}")));
    assert!(!a.contains(ADMIN_PASSWORD) && !a.contains("SCRAM-SHA-256$"));
    let (_, metrics) = s.warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_leases_created_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warden_leases_revoked_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("warden_leases_active 0"), "{metrics}");
    // The admin password is nowhere in warden's files in plaintext (store, audit, log).
    assert!(files_containing(s.warden.dir.path(), ADMIN_PASSWORD.as_bytes()).is_empty());
    // A new session after expiry simply gets a new lease.
    let (ok, out2, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    assert!(out2.starts_with("warden_me_") && out2 != role, "{out2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_get_two_roles_and_a_workload_reuses_its_lease() {
    if skip() {
        return;
    }
    // This test binary is workload "tester" (more specific than "me").
    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    let extra = format!(
        "[[workload]]\nname = \"tester\"\nspiffe_id = \"spiffe://example.org/tester\"\nselectors = {{ uid = {}, exe_path = \"{}\" }}\n",
        my_uid(),
        exe.display()
    );
    let s = dyn_setup("1h", &extra);
    let _d = s.warden.start_daemon();
    let (ok, psql_role, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    let (ok, again, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    assert_eq!(psql_role, again, "the same workload reuses its lease");
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} dbname=shop user=whoever", s.port),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "select current_user::text, (select count(*) from pg_stat_activity where usename = current_user)",
            &[],
        )
        .await
        .unwrap();
    let tester_role: String = row.get(0);
    assert!(psql_role.starts_with("warden_me_"), "{psql_role}");
    assert!(tester_role.starts_with("warden_tester_"), "{tester_role}");
    assert_ne!(psql_role, tester_role);
    // pg_stat_activity names the workload's role for the open session.
    assert!(row.get::<_, i64>(1) >= 1);
    let roles = lease_roles(&s.pg);
    assert_eq!(roles.len(), 2, "{roles:?}");
    let list = s.warden.run(&["lease", "list", "--json"]);
    assert!(list.code == 0, "{}", list.stderr);
    assert!(
        list.stdout.contains(&tester_role) && list.stdout.contains("\"workload\": \"me\""),
        "{}",
        list.stdout
    );
    drop(client);
}

#[test]
fn an_admin_revokes_a_lease_on_demand_and_the_next_session_gets_a_new_one() {
    if skip() {
        return;
    }
    let s = dyn_setup("1h", "");
    let _d = s.warden.start_daemon();
    let (ok, role, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    let list = s.warden.run(&["lease", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let id = v[0]["id"].as_str().unwrap().to_string();
    let out = s.warden.run(&["lease", "revoke", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("revoked lease {id}")),
        "{}",
        out.stdout
    );
    assert!(lease_roles(&s.pg).is_empty(), "{:?}", lease_roles(&s.pg));
    let again = s.warden.run(&["lease", "revoke", &id]);
    assert_ne!(again.code, 0);
    assert!(
        again.stderr.contains("warden lease list"),
        "{}",
        again.stderr
    );
    let a = audit(&s.warden);
    assert!(
        a.contains("revoked by an admin (`warden lease revoke`)")
            && a.contains("\"kind\":\"admin\""),
        "{a}"
    );
    let (ok, role2, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    assert!(role2.starts_with("warden_me_") && role2 != role, "{role2}");
}

#[test]
fn orphaned_leases_of_a_killed_warden_are_revoked_at_the_next_start() {
    if skip() {
        return;
    }
    let s = dyn_setup("1h", "");
    let mut d = s.warden.start_daemon();
    let (ok, role, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    sigkill(&mut d);
    assert_eq!(
        lease_roles(&s.pg),
        vec![role.clone()],
        "the role outlives the killed daemon"
    );
    let _d2 = s.warden.start_daemon();
    // Revoked before the restarted daemon answered `status`.
    assert!(lease_roles(&s.pg).is_empty(), "{:?}", lease_roles(&s.pg));
    let a = audit(&s.warden);
    assert!(
        a.contains("orphan: left by a previous warden process"),
        "{a}"
    );
    let (_, metrics) = s.warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_leases_revoked_total 1"),
        "{metrics}"
    );
    // And a graceful stop revokes what the daemon holds.
    let (ok, _, err) = psql_via(s.port, "shop", "select 1");
    assert!(ok, "{err}");
    assert_eq!(lease_roles(&s.pg).len(), 1);
    drop(_d2);
    assert!(lease_roles(&s.pg).is_empty(), "{:?}", lease_roles(&s.pg));
}

/// `warden lease bench` on route shop-db: `count` leases from 4 tasks at once
/// (then revoked); its JSON report.
fn lease_bench(s: &Dyn, count: u32) -> serde_json::Value {
    let count = count.to_string();
    let out = s.warden.run(&[
        "lease",
        "bench",
        "--route",
        "shop-db",
        "--count",
        &count,
        "--concurrency",
        "4",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn concurrent_lease_creation_with_grants_on_one_schema_succeeds_and_cleans_up() {
    if skip() {
        return;
    }
    // Group mode (the default): leases join the route's group role, created
    // and granted once even when the first leases race; `lease bench`
    // creates leases from 4 tasks at once against the real database.
    let s = dyn_setup("1h", "");
    let v = lease_bench(&s, 40);
    assert_eq!(v["leases"].as_u64(), Some(40), "{v}");
    assert_eq!(v["revoked"].as_u64(), Some(41), "{v}"); // + the warm-up lease
    assert!(lease_roles(&s.pg).is_empty(), "{:?}", lease_roles(&s.pg));
    let a = audit(&s.warden);
    assert_eq!(a.matches("\"action\":\"lease.create\"").count(), 41);
    assert_eq!(a.matches("\"action\":\"lease.revoke\"").count(), 41);
}

#[test]
fn per_lease_grant_mode_grants_to_each_role_under_the_acl_lock() {
    if skip() {
        return;
    }
    // Concurrent GRANTs on one schema race on its ACL tuple ("tuple
    // concurrently updated") unless warden orders them.
    let s = dyn_setup_with(
        "1h",
        "",
        "grant_mode = \"per_lease\"\nscram_iterations = 4096",
    );
    let v = lease_bench(&s, 24);
    assert_eq!(v["leases"].as_u64(), Some(24), "{v}");
    let _d = s.warden.start_daemon();
    let (ok, role, err) = psql_via(s.port, "shop", "select current_user");
    assert!(ok, "{err}");
    let facts = s.pg.psql_admin_in(
        "shop",
        &format!(
            "SELECT (SELECT count(*) FROM pg_auth_members m JOIN pg_roles l ON l.oid = m.member \
             JOIN pg_roles g ON g.oid = m.roleid WHERE l.rolname = '{role}' AND g.rolname LIKE 'warden\\_%grp%'), \
             has_table_privilege('{role}', 'reports.sales', 'SELECT'), \
             (SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = '{role}'), \
             (SELECT rolpassword LIKE 'SCRAM-SHA-256$4096:%' FROM pg_authid WHERE rolname = '{role}')"
        ),
    );
    assert_eq!(facts.trim(), "0|t|1|t", "{facts}");
}

#[test]
fn a_changed_grants_list_gets_a_new_group_role_and_the_old_one_is_dropped() {
    if skip() {
        return;
    }
    let s = dyn_setup("1h", "");
    let groups = || {
        s.pg.psql_admin(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'warden\\_%grp%' ORDER BY 1",
        )
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
    };
    let d = s.warden.start_daemon();
    let (ok, _, err) = psql_via(s.port, "shop", "select count(*) from reports.sales");
    assert!(ok, "{err}");
    let first = groups();
    assert_eq!(first.len(), 1, "{first:?}");
    drop(d); // a graceful stop revokes the lease: the old group has no members
             // Narrower grants: schema usage only.
    let cfg = std::fs::read_to_string(&s.warden.config).unwrap().replace(
        ", \"GRANT SELECT ON ALL TABLES IN SCHEMA reports TO {role}\"",
        "",
    );
    std::fs::write(&s.warden.config, cfg).unwrap();
    let d = s.warden.start_daemon();
    let (ok, _, err) = psql_via(s.port, "shop", "select count(*) from reports.sales");
    assert!(!ok && err.contains("permission denied"), "{err}");
    assert!(
        wait_until(Duration::from_secs(40), || {
            let g = groups();
            g.len() == 1 && g[0] != first[0]
        }),
        "{:?}\n{}",
        groups(),
        d.log_text()
    );
}

#[test]
fn a_rejected_admin_login_refuses_the_session_with_route_and_secret_named() {
    if skip() {
        return;
    }
    let s = dyn_setup("1h", "");
    s.warden
        .put("shop-db/admin", b"not-the-admin-password")
        .ok();
    let _d = s.warden.start_daemon();
    let (ok, _, err) = psql_via(s.port, "shop", "select 1");
    assert!(!ok);
    assert!(
        err.contains("no lease for workload \"me\" on route \"shop-db\"")
            && err.contains(
                "the administrative login \"warden_admin\" (secret shop-db/admin v2) failed"
            ),
        "{err}"
    );
    assert!(lease_roles(&s.pg).is_empty());
    let a = audit(&s.warden);
    assert!(
        a.contains("\"action\":\"lease.create\"") && a.contains("\"decision\":\"error\""),
        "{a}"
    );
    assert!(!a.contains("not-the-admin-password"));
}

// ---------------------------------------------------------------------------
// Rotation

struct Rot {
    pg: PgCluster,
    warden: Instance,
    port: u16,
}

fn rot_setup(extra: &str) -> Rot {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", APP_PASSWORD);
    pg.psql_admin("ALTER SYSTEM SET log_statement = 'all';\nSELECT pg_reload_conf();");
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[secret]]
name = "app-db/app"
rotation_period = "24h"
rotate = {{ method = "postgres", route = "app-db" }}
{extra}

[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "app-db/app", cache_ttl = "1h" }}
allow = ["me"]
connect_timeout = "3s"
"#,
        uid = my_uid(),
        pgport = pg.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("app-db/app", APP_PASSWORD.as_bytes()).ok();
    Rot { pg, warden, port }
}

fn reveal(w: &Instance, name: &str) -> String {
    let out = w.run(&["secret", "get", name, "--reveal"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
}

fn direct_ok(pg: &PgCluster, password: &str) -> bool {
    run_psql(&pg.dsn_direct("app", "app", password), "select 1").code == 0
}

#[test]
fn rotate_changes_the_role_password_and_clients_through_warden_keep_working() {
    if skip() {
        return;
    }
    let s = rot_setup("");
    let _d = s.warden.start_daemon();
    assert!(psql_via(s.port, "app", "select 1").0);
    // A session open across the rotation is unaffected.
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=app user=x sslmode=disable",
        s.port
    );
    let long =
        std::thread::spawn(move || run_psql(&dsn, "select pg_sleep(2); select current_user"));
    std::thread::sleep(Duration::from_millis(500));
    let out = s.warden.run(&["secret", "rotate", "app-db/app"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("rotated app-db/app (env prod) to version 2 (postgres)"),
        "{}",
        out.stdout
    );
    let long = long.join().unwrap();
    assert_eq!(long.code, 0, "{}", long.stderr);
    // The old password is rejected by PostgreSQL itself; the new one works.
    let new = reveal(&s.warden, "app-db/app");
    assert_ne!(new, APP_PASSWORD);
    assert!(new.len() >= 32);
    let denied = run_psql(&s.pg.dsn_direct("app", "app", APP_PASSWORD), "select 1");
    assert_ne!(denied.code, 0);
    assert!(
        denied.stderr.contains("password authentication failed"),
        "{}",
        denied.stderr
    );
    assert!(direct_ok(&s.pg, &new));
    // New sessions through warden use the new version at once (cache_ttl 1h notwithstanding).
    let (ok, user, err) = psql_via(s.port, "app", "select current_user");
    assert!(ok && user == "app", "{err}");
    // Audited and counted; no value in the audit log, the server log or warden's files.
    let a = audit(&s.warden);
    assert!(a.contains("\"action\":\"secret.rotate.pending\""), "{a}");
    assert!(
        a.contains("\"action\":\"secret.rotate\"") && a.contains("\"version\":2"),
        "{a}"
    );
    assert!(a.contains("\"action\":\"secret.rotate.finish\""), "{a}");
    assert!(a.contains("\"action\":\"session.start\"") && a.contains("app-db/app"));
    for v in [APP_PASSWORD, new.as_str()] {
        assert!(!a.contains(v));
        assert!(
            !s.pg.log_text().contains(v),
            "the server log holds a password"
        );
        assert!(files_containing(s.warden.dir.path(), v.as_bytes()).is_empty());
    }
    assert!(s
        .pg
        .log_text()
        .contains("ALTER ROLE \"app\" PASSWORD E'SCRAM-SHA-256$4096:"));
    let (_, metrics) = s.warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_secret_rotations_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(s.warden.run(&["audit", "verify"]).code == 0);
}

#[test]
fn rotate_works_offline_and_a_secret_without_a_method_is_refused() {
    if skip() {
        return;
    }
    let s = rot_setup("\n[[secret]]\nname = \"other\"\n");
    let out = s.warden.run(&["secret", "rotate", "app-db/app"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let new = reveal(&s.warden, "app-db/app");
    assert!(direct_ok(&s.pg, &new) && !direct_ok(&s.pg, APP_PASSWORD));
    let _d = s.warden.start_daemon();
    assert!(psql_via(s.port, "app", "select 1").0);
    s.warden.put("other", b"v").ok();
    let out = s.warden.run(&["secret", "rotate", "other"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("has no rotation method: add rotate = "),
        "{}",
        out.stderr
    );
}

#[test]
fn sigkill_between_every_pair_of_rotation_steps_never_loses_a_working_credential() {
    if skip() {
        return;
    }
    let s = rot_setup("");
    // (fault point, what the restarted daemon must report, stored version after restart)
    let points = [
        ("rotate.before_pending", None, 1),
        (
            "rotate.pending_written",
            Some("interrupted rotation rolled back: the database kept the current password"),
            1,
        ),
        (
            "rotate.upstream_changed",
            Some("interrupted rotation finished: the database had the new password"),
            2,
        ),
        (
            "rotate.committed",
            Some("interrupted rotation finished (v3 was already committed)"),
            3,
        ),
    ];
    for (point, recovery, version) in points {
        let mut d = start_with_env(&s.warden, &[("WARDEN_FAULT_POINT", point)]);
        let before = s.warden.dir.path().join("daemon.log");
        let cfg = s.warden.config.clone();
        let bin = warden_tests::warden_bin();
        // The rotate request blocks while the daemon sits at the fault point.
        let mut rot = Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .args(["secret", "rotate", "app-db/app"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reached = wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&before)
                .unwrap_or_default()
                .contains(&format!("fault point {point} reached"))
        });
        assert!(reached, "{point}: {}", d.log_text());
        sigkill(&mut d);
        let _ = rot.kill();
        let _ = rot.wait();
        // Restart: whatever step was interrupted, clients connect.
        let d2 = s.warden.start_daemon();
        let (ok, user, err) = psql_via(s.port, "app", "select current_user");
        assert!(
            ok && user == "app",
            "after SIGKILL at {point}: {err}\n{}",
            d2.log_text()
        );
        // And the stored latest version is what PostgreSQL accepts.
        let current = reveal(&s.warden, "app-db/app");
        assert!(
            direct_ok(&s.pg, &current),
            "after SIGKILL at {point}: stored password rejected"
        );
        let log = d2.log_text();
        if let Some(r) = recovery {
            assert!(log.contains(r), "after SIGKILL at {point}: {log}");
        }
        let versions = s
            .warden
            .run(&["secret", "versions", "app-db/app", "--json"]);
        let latest = serde_json::from_str::<serde_json::Value>(&versions.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["version"].as_u64())
            .max();
        assert_eq!(latest, Some(version), "after SIGKILL at {point}");
        drop(d2);
    }
    // Every interruption was resolved (finished or rolled back) and audited.
    let a = audit(&s.warden);
    assert!(
        a.contains("secret.rotate.rollback") || a.contains("recovered an interrupted rotation"),
        "{a}"
    );
    // A normal rotation still works afterwards.
    let _d = s.warden.start_daemon();
    let out = s.warden.run(&["secret", "rotate", "app-db/app"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(psql_via(s.port, "app", "select 1").0);
    assert!(s.warden.run(&["audit", "verify"]).code == 0);
}

#[test]
fn exec_hook_gets_the_new_value_on_stdin_and_a_failing_hook_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("got");
    let args = dir.path().join("args");
    let script = dir.path().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$0 $* $WARDEN_SECRET_NAME\" > {args}\n[ -e {fail} ] && exit 3\ncat > {got}\n",
            args = args.display(),
            got = got.display(),
            fail = dir.path().join("fail").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let w = Instance::new_with(&format!(
        "[[secret]]\nname = \"svc/token\"\nrotate = {{ method = \"exec\", command = [\"{}\", \"--set\"] }}\n",
        script.display()
    ));
    w.run(&["init"]).ok();
    w.put("svc/token", b"first-value").ok();
    let _d = w.start_daemon();
    let out = w.run(&["secret", "rotate", "svc/token"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let value = reveal(&w, "svc/token");
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        value,
        "value on stdin"
    );
    let argv = std::fs::read_to_string(&args).unwrap();
    assert!(
        argv.contains("--set svc/token") && !argv.contains(&value),
        "{argv}"
    );
    // A failing hook: rotation refused, version unchanged, audited and counted.
    std::fs::write(dir.path().join("fail"), b"").unwrap();
    let out = w.run(&["secret", "rotate", "svc/token"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("exited with exit status: 3"),
        "{}",
        out.stderr
    );
    assert_eq!(reveal(&w, "svc/token"), value);
    let a = audit(&w);
    assert!(a.contains("secret.rotate.rollback"), "{a}");
    assert!(!a.contains(&value));
    let (_, metrics) = w.http_get("/metrics");
    assert!(
        metrics.contains("warden_secret_rotations_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warden_secret_rotations_total{result=\"success\"} 1"),
        "{metrics}"
    );
    let _ = pg_bin_dir; // (PostgreSQL is not needed for hooks)
}

#[test]
fn webhook_gets_the_new_value_as_the_body() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = c.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
        c.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&req).to_string()
    });
    let w = Instance::new_with(&format!(
        "[[secret]]\nname = \"svc/hooked\"\nrotate = {{ method = \"webhook\", url = \"http://127.0.0.1:{port}/rotate\" }}\n"
    ));
    w.run(&["init"]).ok();
    w.put("svc/hooked", b"v1").ok();
    let out = w.run(&["secret", "rotate", "svc/hooked"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let req = server.join().unwrap();
    let value = reveal(&w, "svc/hooked");
    assert!(req.starts_with("POST /rotate HTTP/1.1\r\n"), "{req}");
    assert!(req.contains("X-Warden-Secret: svc/hooked"));
    assert!(req.ends_with(&format!("\r\n\r\n{value}")), "{req}");
}
