//! The PostgreSQL upstream pool end to end: real PostgreSQL, real psql,
//! pgbench and tokio-postgres through warden. A client session that ends
//! leaves its authenticated upstream connection, reset, for the next session
//! with the same credential and startup parameters; nothing of the first
//! session's state may reach the second.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use warden_tests::pg::{route_setup, Auth, ClusterOptions, RouteOptions, RouteSetup};
use warden_tests::{wait_for, Instance};

const PASSWORD: &str = "pw-CANARY-7c4e19a2-pooled";

type Setup = RouteSetup;

/// A cluster with role `app` (owning database `app` and table `t_pool`), and
/// a warden route `app-db` to it; `secret_extra` goes into the secret's
/// table, `route_extra` into the route's.
fn setup(opts: ClusterOptions, secret_extra: &str, route_extra: &str) -> Setup {
    route_setup(
        opts,
        RouteOptions {
            password: PASSWORD,
            stored_password: PASSWORD,
            allow: "\"me\"",
            cache_ttl: "1h",
            secret_extra,
            route_extra,
            app_sql: "CREATE TABLE t_pool (x int);\nALTER TABLE t_pool OWNER TO app;\n",
        },
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `script` with psql through warden (no password); `conn` adds
/// connection keywords. Lines printed as `name=value` come back as a map.
fn psql(port: u16, conn: &str, script: &str) -> HashMap<String, String> {
    let mut child = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=app user=legacy-app connect_timeout=10 sslmode=disable {conn}"
        ))
        .args(["-q", "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql (Debian package postgresql-client) is required");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "psql failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn backend_pid(port: u16, conn: &str) -> String {
    psql(port, conn, "SELECT 'pid=' || pg_backend_pid();\n")["pid"].clone()
}

fn metrics(w: &Instance) -> String {
    w.http_get("/metrics").1
}

/// The value of one metric line (`name{labels}`), 0 when absent.
fn metric(w: &Instance, series: &str) -> f64 {
    metrics(w)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the route keeps `n` idle connections (the reset runs after
/// the client has gone, so the next session must not race it).
fn wait_idle(w: &Instance, n: usize) {
    let series = "warden_pg_pool_idle_connections{route=\"app-db\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(w);
        if m.lines().any(|l| l == format!("{series} {n}")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never held {n} idle connection(s):\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- a raw protocol client, for what psql does not show ----------------------

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// ParameterStatus values of the greeting.
    params: HashMap<String, String>,
}

impl Raw {
    fn connect(port: u16, application_name: &str) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut body = 196608u32.to_be_bytes().to_vec();
        for (k, v) in [
            ("user", "raw"),
            ("database", "app"),
            ("application_name", application_name),
        ] {
            body.extend(cstr(k));
            body.extend(cstr(v));
        }
        body.push(0);
        let mut startup = (body.len() as u32 + 4).to_be_bytes().to_vec();
        startup.extend(body);
        s.write_all(&startup).unwrap();
        let mut raw = Raw {
            s,
            buf: Vec::new(),
            params: HashMap::new(),
        };
        loop {
            let (tag, body) = raw.next();
            match tag {
                b'S' => {
                    let mut parts = body.split(|&b| b == 0);
                    let k = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
                    let v = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
                    raw.params.insert(k, v);
                }
                b'Z' => return raw,
                b'E' => panic!("login failed: {}", String::from_utf8_lossy(&body)),
                _ => {}
            }
        }
    }

    fn next(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let m: Vec<u8> = self.buf.drain(..len + 1).collect();
                    return (m[0], m[5..].to_vec());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "warden closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Simple query; the first column of the last row.
    fn query(&mut self, sql: &str) -> Option<String> {
        self.s.write_all(&message(b'Q', &cstr(sql))).unwrap();
        let mut value = None;
        loop {
            let (tag, body) = self.next();
            match tag {
                b'D' => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    value = (len >= 0)
                        .then(|| String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
                }
                b'E' => panic!("query failed: {}", String::from_utf8_lossy(&body)),
                b'Z' => return value,
                _ => {}
            }
        }
    }

    fn terminate(mut self) {
        let _ = self.s.write_all(&message(b'X', b""));
    }
}

// ---- tests -------------------------------------------------------------------

#[test]
fn consecutive_sessions_share_a_backend_and_no_session_state_survives() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let first = backend_pid(s.port, "");
    wait_idle(&s.warden, 1);
    // Leave every kind of session state behind, and an open transaction
    // with an uncommitted INSERT (psql ends the script mid-transaction).
    let out = psql(
        s.port,
        "",
        "SET search_path = leak_schema, public;\n\
         SET work_mem = '77MB';\n\
         CREATE TEMP TABLE leak_temp (x int);\n\
         PREPARE leak_stmt AS SELECT 1;\n\
         LISTEN leak_channel;\n\
         SELECT pg_advisory_lock(42);\n\
         SELECT 'pid=' || pg_backend_pid();\n\
         BEGIN;\n\
         INSERT INTO public.t_pool VALUES (1);\n\
         SELECT 'inserted=' || count(*) FROM public.t_pool;\n",
    );
    assert_eq!(out["pid"], first, "the second session reuses the backend");
    assert_eq!(out["inserted"], "1");
    wait_idle(&s.warden, 1);
    let out = psql(
        s.port,
        "",
        "SELECT 'pid=' || pg_backend_pid();\n\
         SELECT 'search_path=' || current_setting('search_path');\n\
         SELECT 'work_mem=' || current_setting('work_mem');\n\
         SELECT 'temp=' || count(*) FROM pg_class WHERE relname = 'leak_temp';\n\
         SELECT 'prepared=' || count(*) FROM pg_prepared_statements;\n\
         SELECT 'listening=' || count(*) FROM pg_listening_channels();\n\
         SELECT 'advisory=' || count(*) FROM pg_locks WHERE locktype = 'advisory';\n\
         SELECT 'rows=' || count(*) FROM t_pool;\n\
         SELECT 'xact=' || (now() = statement_timestamp());\n",
    );
    assert_eq!(out["pid"], first, "the third session reuses it too");
    assert_eq!(out["search_path"], "\"$user\", public");
    assert_eq!(out["work_mem"], "4MB");
    assert_eq!(out["temp"], "0");
    assert_eq!(out["prepared"], "0");
    assert_eq!(out["listening"], "0");
    assert_eq!(out["advisory"], "0");
    assert_eq!(out["rows"], "0", "the abandoned INSERT was rolled back");
    assert_eq!(out["xact"], "true", "no transaction is open");
    assert_eq!(
        s.pg.psql_admin_in("app", "SELECT count(*) FROM t_pool")
            .trim(),
        "0"
    );
    assert!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"hit\",route=\"app-db\"}"
        ) >= 2.0
    );
    assert_eq!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"reset_failed\",route=\"app-db\"}"
        ),
        0.0
    );
    // The audit record says the session used a pooled connection.
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("pooled upstream connection"), "{audit}");
    assert!(!audit.contains(PASSWORD));
}

#[test]
fn different_startup_parameters_never_share_a_backend() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let alpha = backend_pid(s.port, "application_name=alpha");
    wait_idle(&s.warden, 1);
    let beta = backend_pid(s.port, "application_name=beta");
    assert_ne!(alpha, beta);
    wait_idle(&s.warden, 2);
    let out = psql(
        s.port,
        "application_name=alpha options='-c work_mem=5MB'",
        "SELECT 'pid=' || pg_backend_pid();\nSELECT 'work_mem=' || current_setting('work_mem');\n",
    );
    assert_ne!(out["pid"], alpha);
    assert_ne!(out["pid"], beta);
    assert_eq!(out["work_mem"], "5MB");
    wait_idle(&s.warden, 3);
    assert_eq!(backend_pid(s.port, "application_name=alpha"), alpha);
    wait_idle(&s.warden, 3);
    // The startup values come back after a session changed them: the next
    // client's greeting and the server agree.
    let mut raw = Raw::connect(s.port, "gamma");
    assert_eq!(raw.params["application_name"], "gamma");
    raw.query("SET application_name = 'changed'");
    let pid = raw.query("SELECT pg_backend_pid()").unwrap();
    raw.terminate();
    wait_idle(&s.warden, 4);
    let mut raw = Raw::connect(s.port, "gamma");
    assert_eq!(raw.params["application_name"], "gamma");
    assert_eq!(raw.query("SELECT pg_backend_pid()").unwrap(), pid);
    assert_eq!(
        raw.query("SELECT current_setting('application_name')")
            .unwrap(),
        "gamma"
    );
    raw.terminate();
}

#[test]
fn an_extended_batch_without_sync_is_not_committed_by_the_reset() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let mut raw = Raw::connect(s.port, "raw");
    let pid = raw.query("SELECT pg_backend_pid()").unwrap();
    // Parse, Bind, Execute of an INSERT, then Terminate without Sync: a
    // server seeing EOF here rolls back, and so must warden.
    let mut batch = message(
        b'P',
        &[cstr(""), cstr("INSERT INTO t_pool VALUES (7)"), vec![0, 0]].concat(),
    );
    batch.extend(message(
        b'B',
        &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat(),
    ));
    batch.extend(message(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
    raw.s.write_all(&batch).unwrap();
    raw.terminate();
    wait_for("the batch's backend to end", || {
        s.pg.psql_admin(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        ))
        .trim()
            == "0"
    });
    assert_eq!(
        s.pg.psql_admin_in("app", "SELECT count(*) FROM t_pool")
            .trim(),
        "0"
    );
    // The next session gets a fresh backend and works.
    let mut raw = Raw::connect(s.port, "raw");
    assert_ne!(raw.query("SELECT pg_backend_pid()").unwrap(), pid);
    raw.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_on_a_reused_connection() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let dsn = format!(
        "host=127.0.0.1 port={} user=legacy dbname=app connect_timeout=10",
        s.port
    );
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        (client, task)
    };
    let (client, task) = connect().await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(client);
    task.await.unwrap().unwrap();
    let w = &s.warden;
    tokio::task::block_in_place(|| wait_idle(w, 1));
    let (client, task) = connect().await;
    let again: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, pid);
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(30)").await;
        (client, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (client, r) = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the cancel reached the reused backend")
        .unwrap();
    let err = format!("{:?}", r.unwrap_err());
    assert!(err.contains("canceling statement"), "{err}");
    // The session goes on after the cancel, and its backend is pooled again.
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(client);
    task.await.unwrap().unwrap();
    tokio::task::block_in_place(|| wait_idle(w, 1));
}

#[test]
fn a_rotated_secret_never_reuses_a_connection_of_the_old_version() {
    let s = setup(
        ClusterOptions::new(Auth::Scram),
        "rotate = { method = \"postgres\", route = \"app-db\" }",
        "",
    );
    let old = backend_pid(s.port, "");
    wait_idle(&s.warden, 1);
    let out = s.warden.run(&["secret", "rotate", "app-db/app"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("to version 2"), "{}", out.stdout);
    let new = backend_pid(s.port, "");
    assert_ne!(
        new, old,
        "a session after the rotation logs in with version 2"
    );
    // The version-1 connection is closed, not kept.
    wait_for("the version-1 backend to end", || {
        s.pg.psql_admin(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {old}"
        ))
        .trim()
            == "0"
    });
    wait_idle(&s.warden, 1);
    assert_eq!(backend_pid(s.port, ""), new);
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("app-db/app") && audit.contains("\"version\":2"));
}

#[test]
fn pool_false_opens_a_backend_per_session() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "pool = false");
    let a = backend_pid(s.port, "");
    let b = backend_pid(s.port, "");
    assert_ne!(a, b);
    let m = metrics(&s.warden);
    assert!(!m.contains("warden_pg_pool_total{"), "{m}");
    // The client's Terminate still ends the upstream session cleanly.
    wait_for("both backends to end", || {
        s.pg.psql_admin("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
            .trim()
            == "0"
    });
    assert!(!s.pg.log_text().contains("unexpected EOF"));
}

#[test]
fn a_backend_killed_while_idle_is_replaced_without_an_error() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let pid = backend_pid(s.port, "");
    wait_idle(&s.warden, 1);
    s.pg.psql_admin(&format!("SELECT pg_terminate_backend({pid})"));
    wait_for("the terminated backend to end", || {
        s.pg.psql_admin(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        ))
        .trim()
            == "0"
    });
    let next = backend_pid(s.port, "");
    assert_ne!(next, pid);
    assert!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"closed\",route=\"app-db\"}"
        ) >= 1.0
    );
}

#[test]
fn pgbench_with_a_connection_per_transaction_runs_clean_on_pooled_connections() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let dsn = format!("host=127.0.0.1 port={} dbname=app user=legacy", s.port);
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", &dsn])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let run = Command::new("pgbench")
        .args(["-n", "-S", "-C", "-c", "2", "-t", "50", &dsn])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        out.contains("number of transactions actually processed: 100"),
        "{out}"
    );
    assert!(!text(&run).contains("error"), "{}", text(&run));
    assert!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"hit\",route=\"app-db\"}"
        ) >= 50.0
    );
    // `-S` sends one plain SELECT per session: no reset needed.
    assert!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"reset_skipped\",route=\"app-db\"}"
        ) >= 50.0
    );
    // Bounded by the pool, not one per transaction.
    let backends: u32 =
        s.pg.psql_admin("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
            .trim()
            .parse()
            .unwrap();
    assert!(backends <= 16, "{backends} backends");
}

#[test]
fn tls_upstream_connections_are_pooled_too() {
    let s = setup(
        ClusterOptions {
            tls: true,
            ..ClusterOptions::new(Auth::Scram)
        },
        "",
        "",
    );
    let a = backend_pid(s.port, "");
    wait_idle(&s.warden, 1);
    let out = psql(
        s.port,
        "",
        "SELECT 'pid=' || pg_backend_pid();\nSELECT 'ssl=' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();\n",
    );
    assert_eq!(out["pid"], a);
    assert_eq!(out["ssl"], "true");
}

#[test]
fn state_free_sessions_skip_the_reset_and_hidden_state_never_survives() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", "");
    let skipped = || {
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"reset_skipped\",route=\"app-db\"}",
        )
    };
    let app = "state-free";
    let session = |sql: &str| {
        let mut c = Raw::connect(s.port, app);
        c.query(sql);
        c.terminate();
        wait_idle(&s.warden, 1);
    };
    // Asking for the backend's pid calls a function: the connection is reset.
    let mut c = Raw::connect(s.port, app);
    let first = c.query("SELECT pg_backend_pid()").unwrap();
    c.terminate();
    wait_idle(&s.warden, 1);
    assert_eq!(skipped(), 0.0);

    // Plain SELECTs and transaction control leave nothing: no reset.
    let mut c = Raw::connect(s.port, app);
    c.query("SELECT x FROM t_pool");
    c.query("BEGIN; SELECT count(*) FROM t_pool WHERE x IN (1, 2); COMMIT");
    c.terminate();
    wait_idle(&s.warden, 1);
    assert_eq!(skipped(), 1.0, "a state-free session skips DISCARD ALL");

    // State hidden behind SELECTs (and behind an E-string that a naive
    // lexer would read as the start of a literal): reset every time.
    session("SELECT set_config('work_mem', '77MB', false)");
    session("SELECT E'\\'', set_config('search_path', 'leak_schema', false) --'");
    session("SELECT x INTO TEMP leak_temp FROM t_pool");
    session("SELECT 1 FROM pg_advisory_lock(42)");
    session("SET application_name = 'leak'");
    // A named prepared statement through the extended protocol.
    let mut c = Raw::connect(s.port, app);
    let parse = [cstr("leak_stmt"), cstr("SELECT 1"), vec![0, 0]].concat();
    c.s.write_all(&[message(b'P', &parse), message(b'S', b"")].concat())
        .unwrap();
    while c.next().0 != b'Z' {}
    c.terminate();
    wait_idle(&s.warden, 1);
    assert_eq!(
        skipped(),
        1.0,
        "only the state-free session skipped the reset"
    );

    let mut c = Raw::connect(s.port, app);
    assert_eq!(c.query("SELECT pg_backend_pid()").unwrap(), first);
    for (sql, want) in [
        ("SELECT current_setting('work_mem')", "4MB"),
        ("SELECT current_setting('search_path')", "\"$user\", public"),
        ("SELECT current_setting('application_name')", app),
        (
            "SELECT count(*) FROM pg_class WHERE relname = 'leak_temp'",
            "0",
        ),
        ("SELECT count(*) FROM pg_prepared_statements", "0"),
        (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            "0",
        ),
    ] {
        assert_eq!(c.query(sql).as_deref(), Some(want), "{sql}");
    }
    c.terminate();
}
