//! The admission step shared by every front end, end to end:
//!
//! - revocation is immediate on every route kind: `secret put` of a wrong
//!   value through the running daemon fails the very next PostgreSQL session
//!   with 28P01, `secret rm` refuses the next session naming the secret, and
//!   an HTTP route injects a new value on the next request — with a
//!   credential cache TTL of ten minutes, so nothing here is a TTL expiring;
//! - a burst of distinct secrets through `http` routes, and through a mix of
//!   http and PostgreSQL routes, freezes the workload as a PostgreSQL burst
//!   does (real processes in their own cgroup, real kernel monitor; root);
//! - Workload API refusals count toward the `denials_per_minute` rule;
//! - every configured route's session series, and the soonest SVID expiry,
//!   are exported from the start.

use std::process::Command;
use std::time::{Duration, Instant};
use warden_tests::cgroup::Cgroup;
use warden_tests::pg::{route_setup, run_psql, Auth, ClusterOptions, PgCluster, RouteOptions};
use warden_tests::upstream::{header_values, Upstream};
use warden_tests::webhook::{self, wait_alert};
use warden_tests::{free_port, have_root, my_uid, Instance};

const PASSWORD: &str = "pw-CANARY-3c0a77e1-admission";

/// curl GET through an http route: (status, body).
fn curl(port: u16, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl (Debian package curl) is required");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The Authorization headers the upstream received, in order.
fn received_tokens(up: &Upstream) -> Vec<String> {
    up.records()
        .iter()
        .flat_map(|r| header_values(r, "authorization"))
        .collect()
}

#[test]
fn secret_put_and_rm_through_the_daemon_apply_to_the_next_postgres_session() {
    let s = route_setup(
        ClusterOptions::new(Auth::Scram),
        RouteOptions {
            password: PASSWORD,
            stored_password: PASSWORD,
            allow: "\"me\"",
            // Far longer than this test: only invalidation can explain a change.
            cache_ttl: "10m",
            secret_extra: "",
            route_extra: "",
            app_sql: "",
        },
    );
    let dsn = format!("host=127.0.0.1 port={} dbname=app user=legacy", s.port);
    let ok = run_psql(&dsn, "select current_user");
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(ok.stdout.trim(), "app");

    // A wrong value: the very next session logs in with it and is rejected.
    s.warden.put("app-db/app", b"not-the-password").ok();
    let bad = run_psql(&dsn, "select 1");
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr
            .contains("upstream rejected the credential for route \"app-db\"")
            && bad.stderr.contains("app-db/app v2"),
        "{}",
        bad.stderr
    );

    // The right value again: the next session works at once.
    s.warden.put("app-db/app", PASSWORD.as_bytes()).ok();
    let again = run_psql(&dsn, "select current_user");
    assert_eq!(again.code, 0, "{}", again.stderr);

    // Removed: the next session is refused, naming the secret.
    s.warden.run(&["secret", "rm", "app-db/app"]).ok();
    let gone = run_psql(&dsn, "select 1");
    assert_ne!(gone.code, 0);
    assert!(
        gone.stderr.contains("no credential for route \"app-db\"")
            && gone.stderr.contains("app-db/app"),
        "{}",
        gone.stderr
    );
    // The refusal is audited as a session error.
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"session.error\"") && l.contains("no credential for route")),
        "{audit}"
    );
}

#[test]
fn secret_put_and_rm_through_the_daemon_apply_to_the_next_http_request() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path(), "http", None, None, None);
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "api"
kind = "http"
listen = "127.0.0.1:{port}"
upstream = "http://127.0.0.1:{up}/base"
inject = {{ header = "Authorization", value = "Bearer {{secret}}", secret = "api/token", cache_ttl = "10m" }}
allow = ["me"]
"#,
        uid = my_uid(),
        up = up.port
    );
    let w = Instance::new_with(&cfg);
    w.run(&["init"]).ok();
    w.put("api/token", b"token-one-AAAA").ok();
    let _d = w.start_daemon();
    assert_eq!(curl(port, "/v1").0, 200);
    w.put("api/token", b"token-two-BBBB").ok();
    assert_eq!(curl(port, "/v1").0, 200);
    assert_eq!(
        received_tokens(&up),
        ["Bearer token-one-AAAA", "Bearer token-two-BBBB"]
    );
    w.run(&["secret", "rm", "api/token"]).ok();
    let (status, body) = curl(port, "/v1");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("no credential for route \"api\"") && body.contains("api/token"),
        "{body}"
    );
    assert_eq!(received_tokens(&up).len(), 2, "nothing forwarded after rm");
}

/// Four http routes and two PostgreSQL routes, each with its own secret;
/// workload `burst` is this test's cgroup, with a distinct-secrets limit of 3.
struct Burst {
    _pg: PgCluster,
    _up: Upstream,
    _dir: tempfile::TempDir,
    warden: Instance,
    _daemon: warden_tests::Daemon,
    http_ports: Vec<u16>,
    pg_ports: Vec<u16>,
    cg: Cgroup,
}

fn burst_setup(tag: &str) -> Burst {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path(), "http", None, None, None);
    let cg = Cgroup::new(tag);
    let http_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let pg_ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let mut cfg = format!(
        r#"
trust_domain = "example.org"

[monitor]
ebpf = "required"

[anomaly.workloads.burst]
distinct_secrets_per_minute = {{ limit = 3, action = "freeze" }}

[[workload]]
name = "burst"
spiffe_id = "spiffe://example.org/burst"
selectors = {{ uid = 0, cgroup = "{cgname}" }}
"#,
        cgname = cg.name
    );
    for (i, port) in http_ports.iter().enumerate() {
        cfg.push_str(&format!(
            r#"
[[route]]
name = "api{i}"
kind = "http"
listen = "127.0.0.1:{port}"
upstream = "http://127.0.0.1:{up}/base"
inject = {{ header = "Authorization", value = "Bearer {{secret}}", secret = "api{i}/token" }}
allow = ["burst"]
"#,
            up = up.port
        ));
    }
    for (i, port) in pg_ports.iter().enumerate() {
        cfg.push_str(&format!(
            r#"
[[route]]
name = "db{i}"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "db{i}/app" }}
allow = ["burst"]
"#,
            pgport = pg.port
        ));
    }
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    for i in 0..4 {
        warden
            .put(
                &format!("api{i}/token"),
                format!("tok-{i}-CANARY").as_bytes(),
            )
            .ok();
    }
    for i in 0..2 {
        warden.put(&format!("db{i}/app"), PASSWORD.as_bytes()).ok();
    }
    let daemon = warden.start_daemon();
    Burst {
        _pg: pg,
        _up: up,
        _dir: dir,
        warden,
        _daemon: daemon,
        http_ports,
        pg_ports,
        cg,
    }
}

impl Burst {
    /// curl from inside the burst cgroup: the HTTP status, 0 when curl
    /// could not connect (a frozen process's connect() fails with EPERM).
    fn curl_in_cgroup(&self, port: u16) -> u16 {
        let out = self
            .cg
            .command(&format!(
                "curl -s -o /dev/null --noproxy '*' --max-time 10 -w '%{{http_code}}' http://127.0.0.1:{port}/v1"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn psql_in_cgroup(&self, port: u16) -> (i32, String) {
        let dsn = format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable");
        let (code, _, err) = self.cg.psql(&dsn, "select 1");
        (code, err)
    }

    fn wait_frozen(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.warden.run(&["--json", "frozen"]);
            assert_eq!(out.code, 0, "{}", out.stderr);
            let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
            if let Some(e) = list.into_iter().find(|e| e["workload"] == "burst") {
                return e;
            }
            assert!(Instant::now() < deadline, "workload burst never got frozen");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_distinct_secret_burst_through_http_routes_freezes_the_workload() {
    if !have_root() {
        return;
    }
    let b = burst_setup("adm-http");
    for port in &b.http_ports[..3] {
        assert_eq!(b.curl_in_cgroup(*port), 200);
    }
    // The fourth distinct secret in a minute crosses the limit of 3.
    let _ = b.curl_in_cgroup(b.http_ports[3]);
    let entry = b.wait_frozen();
    assert!(
        entry["by"]
            .as_str()
            .unwrap_or("")
            .contains("distinct_secrets_per_minute"),
        "{entry}"
    );
    // Frozen: the kernel refuses its connects, so no request gets through.
    assert_eq!(b.curl_in_cgroup(b.http_ports[0]), 0);
    b.warden.run(&["unfreeze", "burst"]).ok();
    assert_eq!(b.curl_in_cgroup(b.http_ports[0]), 200);
}

#[test]
fn a_distinct_secret_burst_across_http_and_postgres_routes_freezes_the_workload() {
    if !have_root() {
        return;
    }
    let b = burst_setup("adm-mix");
    for port in &b.http_ports[..2] {
        assert_eq!(b.curl_in_cgroup(*port), 200);
    }
    let (code, err) = b.psql_in_cgroup(b.pg_ports[0]);
    assert_eq!(code, 0, "{err}");
    // Two http secrets and two database secrets: four distinct.
    let _ = b.psql_in_cgroup(b.pg_ports[1]);
    let entry = b.wait_frozen();
    assert!(
        entry["by"]
            .as_str()
            .unwrap_or("")
            .contains("distinct_secrets_per_minute"),
        "{entry}"
    );
    let (code, err) = b.psql_in_cgroup(b.pg_ports[0]);
    assert_ne!(code, 0, "a frozen workload's session went through");
    assert!(
        err.contains("Operation not permitted") || err.contains("is frozen"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workload_api_refusals_count_as_denials() {
    let (hook_port, hook) = webhook::start();
    // Registered: only another uid, so this test process matches nothing.
    let other = if my_uid() == 65534 { 65533 } else { 65534 };
    let cfg = format!(
        r#"
trust_domain = "example.org"

[identity]
workload_api_socket = "workload.sock"

[anomaly]
webhook = "http://127.0.0.1:{hook_port}/alerts"
denials_per_minute = {{ limit = 3, action = "alert" }}

[[workload]]
name = "someone-else"
spiffe_id = "spiffe://example.org/someone-else"
selectors = {{ uid = {other} }}
"#
    );
    let i = Instance::new_with(&cfg);
    i.run(&["init"]).ok();
    let _d = i.start_daemon();
    let endpoint = format!("unix:{}", i.dir.path().join("workload.sock").display());
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .unwrap();
    for _ in 0..4 {
        assert!(client.fetch_x509_svid().await.is_err());
    }
    let alert = tokio::task::spawn_blocking(move || {
        wait_alert(&hook, |v| v["rule"] == "denials_per_minute")
    })
    .await
    .unwrap();
    assert!(
        alert["evidence"]["count"].as_u64().unwrap_or(0) >= 3,
        "{alert}"
    );
    let (_, metrics) = i.http_get("/metrics");
    assert!(
        metrics.contains("warden_workload_api_denied_total{op=\"FetchX509SVID\"} 4"),
        "{metrics}"
    );
}

#[test]
fn every_route_exports_its_session_series_from_the_start() {
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "quiet-db"
kind = "postgres"
listen = "127.0.0.1:{p1}"
upstream = "127.0.0.1:{p2}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "quiet-db/app" }}
allow = ["me"]

[[route]]
name = "quiet-api"
kind = "http"
listen = "127.0.0.1:{p3}"
upstream = "http://127.0.0.1:{p2}"
inject = {{ header = "X-Key", secret = "quiet-api/key" }}
allow = ["me"]
"#,
        uid = my_uid(),
        p1 = free_port(),
        p2 = free_port(),
        p3 = free_port()
    );
    let i = Instance::new_with(&cfg);
    i.run(&["init"]).ok();
    let _d = i.start_daemon();
    let (status, m) = i.http_get("/metrics");
    assert_eq!(status, 200);
    for route in ["quiet-db", "quiet-api"] {
        for series in [
            format!("warden_session_duration_seconds_count{{route=\"{route}\"}} 0"),
            format!("warden_relayed_bytes_total{{direction=\"up\",route=\"{route}\"}} 0"),
            format!("warden_relayed_bytes_total{{direction=\"down\",route=\"{route}\"}} 0"),
            format!(
                "warden_sessions_total{{result=\"allowed\",route=\"{route}\",workload=\"me\"}} 0"
            ),
        ] {
            assert!(m.contains(&series), "missing {series}:\n{m}");
        }
    }
    assert!(
        m.contains("warden_svid_soonest_expiry_seconds 3600"),
        "no SVID held yet: {m}"
    );
}

/// A PostgreSQL server and an initialised warden (monitor required) whose
/// route "db" admits only the program `exe` run by root; `route_extra` goes
/// into the route table. Returns them with the route's port.
fn one_program_route(exe: &std::path::Path, route_extra: &str) -> (PgCluster, Instance, u16) {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[monitor]
ebpf = "required"

[[workload]]
name = "one-program"
spiffe_id = "spiffe://example.org/one-program"
selectors = {{ uid = 0, exe_path = "{exe}" }}

[[route]]
name = "db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "db/app" }}
allow = ["one-program"]
{route_extra}"#,
        exe = exe.display(),
        pgport = pg.port
    );
    let w = Instance::new_with(&cfg);
    w.run(&["init"]).ok();
    w.put("db/app", PASSWORD.as_bytes()).ok();
    (pg, w, port)
}

/// The connect-then-exec race (issue: a process that is not allowed
/// connects, forks, and the parent exec's the allowed psql while the child
/// speaks on the inherited socket): with the monitor on, warden knows the
/// process exec'd after it connected and refuses with 28000 instead of
/// granting the session as psql.
#[test]
fn a_process_that_exec_d_after_connecting_is_refused() {
    if !have_root() {
        return;
    }
    let psql = std::fs::canonicalize(warden_tests::pg::psql_bin()).unwrap();
    let (_pg, w, port) = one_program_route(&psql, "unix_socket = \"pgsock\"\n");
    let _d = w.start_daemon();
    // The allowed program itself gets in.
    let ok = run_psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app"),
        "select 1",
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    // A listener that never answers keeps the exec'd psql alive and waiting.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = blackhole.local_addr().unwrap().port();
    // The same trick over TCP and over the route's unix socket.
    let unix_path = w.dir.path().join("pgsock").join(format!(".s.PGSQL.{port}"));
    // TCP: the kernel records the connect time, so even an exec right after
    // connect() is caught. Unix sockets: warden knows when it accepted the
    // connection, not when the client connected, so the parent waits until
    // the accept has surely happened (an exec inside that gap is a known
    // limit, see docs/security-model.md).
    for (connect, settle) in [
        (
            format!("socket.create_connection((\"127.0.0.1\", {port}))"),
            "0",
        ),
        (
            format!(
                "socket.socket(socket.AF_UNIX); s.connect(\"{}\")",
                unix_path.display()
            ),
            "0.3",
        ),
    ] {
        let script = format!(
            r#"
import os, socket, struct, sys, time
s = {connect}
if os.fork() == 0:
    time.sleep(1.5)  # the parent has exec'd psql by now
    body = b"user\0app\0database\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
    s.settimeout(10)
    sys.stdout.buffer.write(s.recv(4096))
    sys.stdout.flush()
    os._exit(0)
os.set_inheritable(s.fileno(), True)
time.sleep({settle})
os.environ["PGCONNECT_TIMEOUT"] = "4"
os.execv("{psql}", ["psql", "-X", "-h", "127.0.0.1", "-p", "{hole}", "-c", "select 1"])
"#,
            psql = psql.display()
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 (Debian package python3) is required");
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            reply.starts_with('E') && reply.contains("28000"),
            "{connect}: expected a 28000 ErrorResponse, got {reply:?} (stderr {})",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(reply.contains("started a new program (exec)"), "{reply}");
    }
    drop(blackhole);
}

/// A kept attestation is reused without /proc while the kernel counts no
/// exec or exit of the process; an exec ends that. python3 (allowed)
/// connects twice — the second time from the kept attestation — then
/// exec's psql (not allowed) on the same pid, which must be refused.
#[test]
fn a_kept_attestation_does_not_survive_an_exec() {
    if !have_root() {
        return;
    }
    let psql = std::fs::canonicalize(warden_tests::pg::psql_bin()).unwrap();
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let (_pg, w, port) = one_program_route(&python, "");
    let _d = w.start_daemon();
    let script = format!(
        r#"
import os, socket, struct, sys
for _ in range(3):
    s = socket.create_connection(("127.0.0.1", {port}))
    body = b"user\0app\0database\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
    s.settimeout(10)
    reply = s.recv(4096)
    sys.stdout.write("python:" + reply.decode(errors="replace") + "\n")
    s.close()
sys.stdout.flush()
os.environ["PGCONNECT_TIMEOUT"] = "10"
os.execv("{psql}", ["psql", "-X", "-h", "127.0.0.1", "-p", "{port}", "-U", "app", "-d", "postgres", "-c", "select 1"])
"#,
        psql = psql.display()
    );
    let out = Command::new(&python)
        .args(["-c", &script])
        .output()
        .expect("python3 (Debian package python3) is required");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // AuthenticationOk ('R') three times: attested, then kept.
    assert_eq!(
        stdout.matches("python:R").count(),
        3,
        "python is allowed: {stdout} / {stderr}"
    );
    assert_ne!(out.status.code(), Some(0), "psql must be refused: {stdout}");
    assert!(
        stderr.contains("28000") || stderr.contains("not allowed") || stderr.contains("warden"),
        "psql on python's pid gets warden's refusal: {stderr}"
    );
    assert!(!stdout.contains("(1 row)"), "{stdout}");
}
