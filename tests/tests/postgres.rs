//! PostgreSQL routes end to end: real PostgreSQL clusters (scram-sha-256, md5,
//! TLS-only), real clients (psql, pgbench, tokio-postgres) connecting to warden
//! with no password, and the failures a user must be able to act on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use warden_tests::my_uid;
use warden_tests::pg::{route_setup, Auth, ClusterOptions, PgCluster, RouteOptions, RouteSetup};
use warden_tests::{free_port, Instance};

const PASSWORD: &str = "pw-CANARY-5b1f0e9d-injected";

type Setup = RouteSetup;

/// A cluster with role `app`, and a warden route to it allowing `allow`.
fn setup(opts: ClusterOptions, allow: &str, stored_password: &str, extra_route: &str) -> Setup {
    route_setup(
        opts,
        RouteOptions {
            password: PASSWORD,
            stored_password,
            allow,
            cache_ttl: "1s",
            secret_extra: "",
            route_extra: extra_route,
            app_sql: "",
        },
    )
}

fn psql(port: u16, sql: &str) -> std::process::Output {
    Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} dbname=app user=legacy-app connect_timeout=10 sslmode=prefer"
        ))
        .args(["-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
        .env_remove("PGPASSWORD")
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .expect("psql (Debian package postgresql-client) is required")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn psql_and_pgbench_work_without_a_password_over_scram() {
    let s = setup(ClusterOptions::new(Auth::Scram), "\"me\"", PASSWORD, "");
    let out = psql(s.port, "select current_user");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
    // pgbench: initialise, then a short run, all through warden.
    let dsn = format!("host=127.0.0.1 port={} dbname=app user=legacy", s.port);
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", &dsn])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let run = Command::new("pgbench")
        .args(["-t", "50", "-c", "2", "-n", &dsn])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    assert!(String::from_utf8_lossy(&run.stdout)
        .contains("number of transactions actually processed: 100"));
    // Audited, with the secret version, never the value.
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("session.start") && audit.contains("session.end"));
    assert!(audit.contains("\"route\":\"app-db\""));
    assert!(!audit.contains(PASSWORD));
    let (_, metrics) = s.warden.http_get("/metrics");
    let allowed = warden_tests::prom::sample(
        &metrics,
        "warden_sessions_total{result=\"allowed\",route=\"app-db\",workload=\"me\"}",
    );
    assert!(allowed.is_some_and(|n| n > 0.0), "{metrics}");
    assert!(metrics.contains("warden_upstream_auth_seconds_bucket"));
    drop(s.pg);
}

#[test]
fn md5_upstream_works() {
    let s = setup(ClusterOptions::new(Auth::Md5), "\"me\"", PASSWORD, "");
    let out = psql(s.port, "select current_user");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
}

#[test]
fn tls_upstream_with_verify_full() {
    let mut opts = ClusterOptions::new(Auth::Scram);
    opts.tls = true;
    let s = setup(opts, "\"me\"", PASSWORD, "");
    let out = psql(
        s.port,
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
}

#[test]
fn workload_not_allowed_gets_28000_with_a_useful_message() {
    let s = setup(ClusterOptions::new(Auth::Scram), "", PASSWORD, "");
    let out = psql(s.port, "select 1");
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("is workload \"me\", which may not use route \"app-db\""),
        "{t}"
    );
    // The SQLSTATE, read off the wire: ErrorResponse field C = 28000.
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.write_all(&startup_bytes(&[("user", "x"), ("database", "app")]))
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    assert!(
        warden_tests::contains_bytes(&reply, b"C28000\0"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("session.deny"));
}

#[test]
fn wrong_stored_password_gets_28p01_naming_route_and_secret() {
    let s = setup(
        ClusterOptions::new(Auth::Scram),
        "\"me\"",
        "not-the-password",
        "",
    );
    let out = psql(s.port, "select 1");
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("upstream rejected the credential for route \"app-db\" (secret app-db/app v1)"),
        "{t}"
    );
    assert!(!t.contains("not-the-password"));
}

#[test]
fn unreachable_upstream_gets_08001_within_the_connect_timeout() {
    let dead = free_port();
    let pg = PgCluster::start(ClusterOptions::new(Auth::Trust));
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"
[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {} }}
[[route]]
name = "dead-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{dead}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "dead/app" }}
allow = ["me"]
connect_timeout = "2s"
"#,
        my_uid()
    );
    let w = Instance::new_with(&cfg);
    w.run(&["init"]).ok();
    w.run_stdin(&["secret", "put", "dead/app"], b"x").ok();
    let _d = w.start_daemon();
    let t0 = Instant::now();
    let out = psql(port, "select 1");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    let t = text(&out);
    assert!(t.contains("cannot reach upstream"), "{t}");
    drop(pg);
}

/// Bytes of a StartupMessage for protocol 3.0.
fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn read_until_ready(stream: &mut TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return all;
        }
        all.extend_from_slice(&buf[..n]);
        // Walk complete messages; stop after ReadyForQuery.
        let mut i = 0;
        while i + 5 <= all.len() {
            let len = u32::from_be_bytes([all[i + 1], all[i + 2], all[i + 3], all[i + 4]]) as usize;
            if i + 1 + len > all.len() {
                break;
            }
            if all[i] == b'Z' {
                return all;
            }
            i += 1 + len;
        }
    }
}

#[test]
fn the_client_side_of_the_stream_never_carries_the_password() {
    let s = setup(ClusterOptions::new(Auth::Scram), "\"me\"", PASSWORD, "");
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.write_all(&startup_bytes(&[("user", "x"), ("database", "app")]))
        .unwrap();
    let mut seen = read_until_ready(&mut c);
    assert_eq!(seen.first(), Some(&b'R'), "AuthenticationOk first");
    // A query whose result includes data, then the bytes are checked.
    let q = b"select current_user, version()\0";
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((q.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(q);
    c.write_all(&msg).unwrap();
    seen.extend(read_until_ready(&mut c));
    assert!(warden_tests::contains_bytes(&seen, b"app"));
    assert!(!warden_tests::contains_bytes(&seen, PASSWORD.as_bytes()));
    drop(c);
    // A client that does not wait for the greeting: its query, in the same
    // write as the startup packet, is answered after it (as PostgreSQL
    // would), not dropped.
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let early = [
        startup_bytes(&[("user", "x"), ("database", "app")]),
        msg.clone(),
    ]
    .concat();
    c.write_all(&early).unwrap();
    // The greeting and the answer: two ReadyForQuery messages (they may
    // arrive in one read).
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let ready_count = |all: &[u8]| {
        let (mut i, mut z) = (0, 0);
        while i + 5 <= all.len() {
            let len = u32::from_be_bytes(all[i + 1..i + 5].try_into().unwrap()) as usize;
            if i + 1 + len > all.len() {
                break;
            }
            z += usize::from(all[i] == b'Z');
            i += 1 + len;
        }
        z
    };
    while ready_count(&seen) < 2 {
        let n = c.read(&mut buf).expect("the early query is answered");
        assert!(n > 0, "warden closed the connection");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(seen.first(), Some(&b'R'), "AuthenticationOk first");
    assert!(warden_tests::contains_bytes(&seen, b"PostgreSQL"));
    drop(c);
    let log = std::fs::read_to_string(&s._daemon.log).unwrap();
    assert!(!log.contains(PASSWORD));
}

#[test]
fn malformed_input_gets_an_error_or_a_close_and_other_sessions_go_on() {
    let s = setup(ClusterOptions::new(Auth::Scram), "\"me\"", PASSWORD, "");
    let attempts: Vec<Vec<u8>> = vec![
        vec![0, 0, 0],                            // truncated length
        vec![0, 0, 0, 8],                         // truncated code
        vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0], // absurd length
        vec![0, 0, 0, 8, 0, 9, 0, 0],             // protocol 9.0
        [
            vec![0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f],
            b"garbage after SSLRequest".to_vec(),
        ]
        .concat(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ];
    for bytes in attempts {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = c.write_all(&bytes);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply);
        // Either nothing (closed) or N/ErrorResponse — never a hang (read timeout) and never a session.
        assert!(
            reply.is_empty() || reply[0] == b'E' || reply[0] == b'N',
            "{bytes:?} -> {reply:?}"
        );
    }
    let out = psql(s.port, "select 42");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[test]
fn psql_ctrl_c_cancels_the_query_upstream() {
    let s = setup(ClusterOptions::new(Auth::Scram), "\"me\"", PASSWORD, "");
    let child = Command::new("psql")
        .arg(format!("host=127.0.0.1 port={} dbname=app user=x", s.port))
        .args(["-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20));
    let t = text(&out);
    assert!(t.contains("canceling statement due to user request"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokio_postgres_extended_protocol_copy_and_cancel() {
    let s = setup(ClusterOptions::new(Auth::Scram), "\"me\"", PASSWORD, "");
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} dbname=app user=whoever", s.port),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Extended protocol with parameters.
    let row = client
        .query_one("select $1::int + $2::int, current_user", &[&40i32, &2i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "app");
    // COPY in and out.
    client
        .batch_execute("create temp table t (a int, b text)")
        .await
        .unwrap();
    let sink = client.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes_of("1\tone\n2\ttwo\n")).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 2);
    let n: i64 = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // Cancel through warden's BackendKeyData.
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .unwrap()
        .unwrap();
    let err = format!("{:?}", res.unwrap_err());
    assert!(err.contains("canceling statement"), "{err}");
}

fn bytes_of(s: &str) -> std::io::Cursor<Vec<u8>> {
    std::io::Cursor::new(s.as_bytes().to_vec())
}

#[test]
fn unix_socket_listener_uses_so_peercred() {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let w = Instance::new_with(&format!(
        r#"
trust_domain = "example.org"
[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}
[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
unix_socket = "pgsock"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "app-db/app" }}
allow = ["me"]
"#,
        uid = my_uid(),
        pgport = pg.port
    ));
    w.run(&["init"]).ok();
    w.run_stdin(&["secret", "put", "app-db/app"], PASSWORD.as_bytes())
        .ok();
    let _d = w.start_daemon();
    let dir = w.dir.path().join("pgsock");
    assert!(dir.join(format!(".s.PGSQL.{port}")).exists());
    let out = Command::new("psql")
        .arg(format!(
            "host={} port={port} dbname=app user=x",
            dir.display()
        ))
        .args(["-tA", "-c", "select current_user"])
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
}

#[test]
fn client_tls_with_a_certificate_from_wardens_ca_satisfies_verify_full() {
    let s = setup(
        ClusterOptions::new(Auth::Scram),
        "\"me\"",
        PASSWORD,
        "client_tls = true",
    );
    let bundle = s.warden.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        s.warden.run(&["svid", "bundle"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let dsn = |mode: &str, host: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} dbname=app user=x sslmode={mode} sslrootcert={}",
            s.port,
            bundle.display()
        )
    };
    for host in ["localhost", "127.0.0.1"] {
        let out = Command::new("psql")
            .arg(dsn("verify-full", host))
            .args(["-tA", "-c", "select current_user"])
            .env("PGPASSFILE", "/nonexistent")
            .output()
            .unwrap();
        assert!(out.status.success(), "{host}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
    }
    // A name the certificate does not carry is rejected by the client.
    let out = Command::new("psql")
        .arg(dsn("verify-full", "db.example"))
        .args(["-c", "select 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not match host name"),
        "{}",
        text(&out)
    );
}

#[test]
fn client_tls_require_refuses_plain_text_and_serves_tls() {
    let s = setup(
        ClusterOptions::new(Auth::Scram),
        "\"me\"",
        PASSWORD,
        "client_tls = \"require\"",
    );
    let psql = |mode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} dbname=app user=x sslmode={mode}",
                s.port
            ))
            .args(["-tA", "-c", "select current_user"])
            .env("PGPASSFILE", "/nonexistent")
            .output()
            .unwrap()
    };
    let plain = psql("disable");
    assert!(!plain.status.success());
    assert!(
        text(&plain).contains("requires TLS (client_tls = \"require\")"),
        "{}",
        text(&plain)
    );
    // sslmode=prefer asks for TLS first: served.
    for mode in ["prefer", "require"] {
        let out = psql(mode);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
    }
    let (_, metrics) = s.warden.http_get("/metrics");
    assert!(
        metrics.contains("result=\"tls_required\",route=\"app-db\""),
        "{metrics}"
    );
    // A bad value names the choices.
    let bad = Instance::new_with(
        "[[route]]\nname = \"r\"\nkind = \"postgres\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\nclient_tls = \"always\"\n",
    );
    let out = bad.run(&["config", "check"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("use true, false or \"require\"")
            || out.stdout.contains("use true, false or \"require\""),
        "{} {}",
        out.stdout,
        out.stderr
    );
}

/// `audit.sync = "interval"`: every session is still recorded before it
/// starts, a SIGKILL inside the fsync window leaves a log that verifies
/// (the newest records written, not yet anchored, explained by the flagged
/// anchor), and a restarted warden continues the chain.
#[test]
fn audit_sync_interval_survives_a_kill_inside_the_window() {
    let audit = "\n[audit]\nsync = \"interval\"\nsync_interval = \"1s\"\n";
    let mut s = setup(ClusterOptions::new(Auth::Scram), "\"me\"", PASSWORD, audit);
    let log = s._daemon.log_text();
    assert!(
        log.contains("audit.sync") && log.contains("up to 1s"),
        "{log}"
    );
    let dsn = format!("host=127.0.0.1 port={} dbname=app user=legacy", s.port);
    let script = s.warden.dir.path().join("one.sql");
    std::fs::write(&script, "select 1;\n").unwrap();
    let run = Command::new("pgbench")
        .args(["-n", "-C", "-t", "20", "-c", "2", "-f"])
        .arg(&script)
        .arg(&dsn)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    // Past the window: everything so far is fsynced and anchored.
    std::thread::sleep(Duration::from_millis(1500));
    let clean = s.warden.run(&["audit", "verify"]);
    clean.ok();
    assert!(!clean.stderr.contains("head anchor"), "{clean:?}");
    // Two more sessions open a new window; kill warden inside it.
    for sql in ["select 2", "select 3"] {
        let out = psql(s.port, sql);
        assert!(out.status.success(), "{}", text(&out));
    }
    s._daemon.child.kill().unwrap();
    s._daemon.child.wait().unwrap();
    let records = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    let starts = records.matches("\"action\":\"session.start\"").count();
    assert!(starts >= 42, "{starts} session.start records");
    assert!(!records.contains(PASSWORD));
    let head = std::fs::read_to_string(s.warden.data_dir.join("audit.log.head")).unwrap();
    assert!(head.contains("\"interval\":true"), "{head}");
    let after_kill = s.warden.run(&["audit", "verify"]);
    after_kill
        .ok()
        .stdout_has("chain intact")
        .stderr_has("not yet fsynced and anchored when warden stopped");
    // Restarted, it continues the chain; a clean stop leaves it anchored.
    let mut daemon = s.warden.start_daemon();
    let out = psql(s.port, "select 4");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.stop(), Some(0));
    let verified = s.warden.run(&["audit", "verify"]);
    verified.ok();
    assert!(!verified.stderr.contains("head anchor"), "{verified:?}");
}

#[test]
fn commit_mode_sends_nothing_upstream_before_the_start_record_is_durable() {
    if !warden_tests::is_root() {
        eprintln!("skipping: needs root to mount a small tmpfs");
        return;
    }
    // audit.sync = "commit": the greeting overlaps the record's fsync, and
    // the client's first query waits for it. With the audit log on a full
    // disk, a session whose record cannot be written is refused with 58000
    // and its query never reaches the server.
    let s = route_setup(
        ClusterOptions::new(Auth::Scram),
        RouteOptions {
            password: PASSWORD,
            stored_password: PASSWORD,
            allow: "\"me\"",
            cache_ttl: "1s",
            secret_extra: "",
            route_extra: "\n[audit]\nsync = \"commit\"",
            app_sql: "CREATE TABLE t (n int); GRANT ALL ON t TO app;",
        },
    );
    let RouteSetup {
        pg,
        warden,
        _daemon,
        port,
    } = s;
    drop(_daemon);
    let disk = warden_tests::fulldisk::FullDiskLog::mount(&warden);
    let _daemon = warden.start_daemon();
    let ok = psql(port, "insert into t values (1)");
    assert!(ok.status.success(), "{}", text(&ok));
    disk.fill();
    let mut inserted = 0;
    let mut refused = None;
    for n in 0..64 {
        let out = psql(port, "insert into t values (2)");
        if out.status.success() {
            inserted += 1;
            continue;
        }
        let t = text(&out);
        assert!(
            t.contains("the audit record for this session could not be written"),
            "{t}"
        );
        refused = Some(n);
        break;
    }
    let refused = refused.expect("64 sessions on a full disk were all recorded");
    eprintln!("the session after {refused} recorded ones was refused");
    // The SQLSTATE, read off the wire: ReadyForQuery came first (the
    // greeting overlapped the commit), then FATAL 58000.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(&startup_bytes(&[("user", "x"), ("database", "app")]))
        .unwrap();
    c.write_all(b"Q\0\0\0\x1dinsert into t values (3)\0")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&b'R'), "greeting first: {reply:?}");
    assert!(
        warden_tests::contains_bytes(&reply, b"C58000\0"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // Every refused session's query stayed in warden.
    let rows = pg.psql_admin_in(
        "app",
        "SELECT count(*) FILTER (WHERE n = 2), count(*) FILTER (WHERE n = 3) FROM t",
    );
    assert_eq!(rows.trim(), format!("{inserted}|0"), "rows in t");
    disk.free();
    let again = psql(port, "insert into t values (4)");
    assert!(again.status.success(), "{}", text(&again));
    drop(_daemon);
    warden.run(&["audit", "verify"]).ok();
}
