//! The eBPF kernel relay end to end: real PostgreSQL, tokio-postgres and
//! pgbench through a warden whose monitor is loaded (root). A session past
//! its first round trips is spliced in the kernel; every byte must still
//! arrive, in order, both ways; its end, a cancel, an upstream's FATAL and
//! a freeze must reach the client; `kernel_relay = false` keeps it in user space.
//!
//! Needs root (CI runs as root with `WARDEN_REQUIRE_EBPF=1`, so these never
//! skip there).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use warden_tests::cgroup::Cgroup;
use warden_tests::pg::{route_setup, Auth, ClusterOptions, RouteOptions, RouteSetup};
use warden_tests::{byte_counts, have_root, metric, session_ends, wait_for, Instance};

const PASSWORD: &str = "pw-CANARY-3b9d0e51-kernel";
const SPLICED: &str = "warden_pg_kernel_relay_total{result=\"spliced\",route=\"app-db\"}";

fn spliced(w: &Instance) -> f64 {
    metric(w, SPLICED)
}

fn setup(route_extra: &str) -> RouteSetup {
    setup_with("\"me\"", "", route_extra)
}

fn setup_with(allow: &str, secret_extra: &str, route_extra: &str) -> RouteSetup {
    route_setup(
        ClusterOptions::new(Auth::Scram),
        RouteOptions {
            password: PASSWORD,
            stored_password: PASSWORD,
            allow,
            cache_ttl: "1h",
            secret_extra,
            route_extra,
            app_sql: "",
        },
    )
}

type Conn = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

async fn connect(port: u16) -> (tokio_postgres::Client, Conn) {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} dbname=app user=legacy-app"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    (client, tokio::spawn(conn))
}

/// Enough round trips for the hand-over (warden offers it after 32).
async fn warm_up(client: &tokio_postgres::Client) {
    for i in 0..40i32 {
        let row = client.query_one("select $1::int * 2", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
}

/// A route and a tokio-postgres session on it that has been
/// spliced; None without root.
async fn spliced_session() -> Option<(RouteSetup, tokio_postgres::Client, Conn)> {
    if !have_root() {
        return None;
    }
    let s = setup("");
    let (client, conn) = connect(s.port).await;
    warm_up(&client).await;
    // The client's socket joins the kernel's map off the session's thread
    // after the first quiet moment; the splice comes at a later one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while spliced(&s.warden) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the splice"
        );
        client.simple_query("select 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some((s, client, conn))
}

/// Runs `sql` (rows `(i, text)` for i = 1..=n) and checks every row.
async fn expect_rows(
    client: &tokio_postgres::Client,
    sql: &str,
    n: usize,
    text: impl Fn(i32) -> String,
) {
    let rows = client.query(sql, &[]).await.unwrap();
    assert_eq!(rows.len(), n);
    for (k, row) in rows.iter().enumerate() {
        let i = k as i32 + 1;
        assert_eq!(row.get::<_, i32>(0), i);
        assert_eq!(row.get::<_, String>(1), text(i), "row {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_session_is_spliced_and_every_byte_arrives_both_ways() {
    let Some((s, client, conn)) = spliced_session().await else {
        return;
    };

    // Server → client: 20,000 rows of known content, about 2.3 MB.
    expect_rows(
        &client,
        "select i, repeat(i::text, 25) from generate_series(1, 20000) i",
        20_000,
        |i| i.to_string().repeat(25),
    )
    .await;
    // 24 MB at once: past the kernel's window, the rest takes the TCP path
    // through warden (flow-controlled) and still arrives whole, in order.
    expect_rows(
        &client,
        "select i, repeat(chr(65 + i % 26), 2000) from generate_series(1, 12000) i",
        12_000,
        |i| char::from(65 + (i % 26) as u8).to_string().repeat(2000),
    )
    .await;
    // Client → server: 2 MB through COPY, checked on the server.
    client
        .batch_execute("create temp table t (a int, b text)")
        .await
        .unwrap();
    let mut data = String::new();
    for i in 0..20_000 {
        data.push_str(&format!("{i}\t{}\n", "x".repeat(100)));
    }
    let sink = client.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(std::io::Cursor::new(data.into_bytes()))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 20_000);
    let row = client
        .query_one("select count(*), sum(a), sum(length(b)) from t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 20_000);
    assert_eq!(row.get::<_, i64>(1), 199_990_000);
    assert_eq!(row.get::<_, i64>(2), 2_000_000);
    // A cancel still reaches the spliced session's backend.
    let token = client.cancel_token();
    let sleeper = {
        let started = Instant::now();
        let q = client.simple_query("select pg_sleep(30)");
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        };
        let (res, ()) = tokio::join!(q, cancel);
        assert!(started.elapsed() < Duration::from_secs(20));
        res
    };
    let err = sleeper.expect_err("cancelled");
    assert_eq!(
        err.as_db_error().map(|d| d.code().code()),
        Some("57014"),
        "{err}"
    );
    // The role is still the injected one, and many more round trips work.
    for i in 0..500i32 {
        let row = client
            .query_one("select $1::int + 1, current_user", &[&i])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        assert_eq!(row.get::<_, String>(1), "app");
    }
    drop(client);
    conn.await.unwrap().unwrap();
    assert_eq!(spliced(&s.warden), 1.0, "one session, one splice");

    // The end record counts the kernel's bytes too, and says who relayed.
    wait_for("session.end", || !session_ends(&s.warden, None).is_empty());
    let end = session_ends(&s.warden, None).remove(0);
    assert!(end.contains("(kernel relay)"), "{end}");
    assert!(byte_counts(&end).1 > 26_000_000, "{end}");
    // tokio-postgres waits for each answer here: it passes the splice's
    // check, so the kernel (not warden, over TCP) moved the bytes.
    assert_eq!(
        metric(&s.warden, &SPLICED.replace("spliced", "tcp_path")),
        0.0
    );
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(!audit.contains(PASSWORD));
    assert!(!s._daemon.log_text().contains(PASSWORD));

    // pgbench's persistent sessions are spliced too, and run clean.
    let pgbench = |args: &[&str]| {
        let out = Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &s.port.to_string(),
                "-U",
                "legacy-app",
            ])
            .args(args)
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/nonexistent")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    pgbench(&["-i", "-s", "1", "-q", "app"]);
    let before = spliced(&s.warden);
    let text = pgbench(&["-n", "-S", "-c", "2", "-t", "300", "app"]);
    assert!(
        text.contains("number of transactions actually processed: 600/600"),
        "{text}"
    );
    wait_for("pgbench's splices", || spliced(&s.warden) >= before + 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstreams_fatal_reaches_a_spliced_client() {
    // The server ends a spliced session: its FATAL reaches the client.
    let Some((s, client, conn)) = spliced_session().await else {
        return;
    };
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    s.pg.psql_admin(&format!("select pg_terminate_backend({pid})"));
    let err = tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .expect("the connection ends")
        .unwrap()
        .expect_err("the server's FATAL");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    assert_eq!(db.code().code(), "57P01", "{db}");
    assert!(db.message().contains("administrator command"), "{db}");
    drop(client);
}

#[test]
fn a_freeze_ends_a_spliced_session_with_warden_57p01() {
    if !have_root() {
        return;
    }
    // The frozen workload is psql in a cgroup of its own: a freeze also
    // freezes every process attesting to the workload, so never uid 0 alone.
    let cg = Cgroup::new("kernel-relay");
    let workload = format!(
        "\n[[workload]]\nname = \"kr\"\nspiffe_id = \"spiffe://example.org/kr\"\nselectors = {{ uid = 0, cgroup = \"{}\" }}\n",
        cg.name
    );
    let s = setup_with("\"me\", \"kr\"", &workload, "");
    let mut psql = cg
        .command(&format!(
            "psql -X -q -tA -v ON_ERROR_STOP=1 -d 'host=127.0.0.1 port={} dbname=app user=x' -f -",
            s.port
        ))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    for i in 0..40 {
        writeln!(stdin, "select {i};").unwrap();
    }
    stdin.flush().unwrap();
    // More round trips until the splice (it follows the client socket's
    // join, made off the session's thread, at a later quiet moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while spliced(&s.warden) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the splice"
        );
        writeln!(stdin, "select 0;").unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = s
        .warden
        .run(&["freeze", "kr", "--reason", "kernel relay test"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(300));
    let _ = writeln!(stdin, "select 'after the freeze';");
    drop(stdin);
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("39"),
        "the queries before the freeze ran: {stdout}"
    );
    assert!(!stdout.contains("after the freeze"), "{stdout}");
    assert!(stderr.contains("terminating connection"), "{stderr}");
    assert!(stderr.contains("frozen"), "{stderr}");
    wait_for("the frozen session's record", || {
        session_ends(&s.warden, None)
            .iter()
            .any(|e| e.contains("closed: workload frozen"))
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_relay_false_keeps_long_sessions_in_user_space_and_pooled() {
    if !have_root() {
        return;
    }
    let s = setup("kernel_relay = false");
    let (client, conn) = connect(s.port).await;
    warm_up(&client).await;
    drop(client);
    conn.await.unwrap().unwrap();
    wait_for("session.end", || !session_ends(&s.warden, None).is_empty());
    let end = session_ends(&s.warden, None).remove(0);
    assert!(!end.contains("kernel relay"), "{end}");
    assert_eq!(spliced(&s.warden), 0.0);
    // User space saw where the protocol stood: the connection was pooled.
    wait_for("the pooled connection", || {
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"returned\",route=\"app-db\"}",
        ) >= 1.0
    });
}

/// A client that pipelines simple queries (libpq's pipeline mode, pgx,
/// tokio-postgres with concurrent tasks) sends without waiting for
/// ReadyForQuery, so it may send right while warden hands the session to
/// the kernel. Every answer must still be its own query's, in order, with
/// no error: each of many sessions sends `SELECT n` for n = 1, 2, 3, … at
/// a jittered pace from one thread while another reads the rows.
#[test]
fn a_pipelining_client_keeps_its_answers_across_the_hand_over() {
    use std::io::{Read, Write};
    if !have_root() {
        return;
    }
    let s = setup("");
    const SESSIONS: u64 = 24;
    const QUERIES: u64 = 300;
    let message = |tag: u8, body: &[u8]| {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    std::thread::scope(|scope| {
        for session in 0..SESSIONS {
            let port = s.port;
            scope.spawn(move || {
                let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut body = 196_608u32.to_be_bytes().to_vec();
                body.extend_from_slice(b"user\0legacy-app\0database\0app\0\0");
                let mut startup = (body.len() as u32 + 4).to_be_bytes().to_vec();
                startup.extend(body);
                c.write_all(&startup).unwrap();
                fn next(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
                    loop {
                        if buf.len() >= 5 {
                            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                            if buf.len() > len {
                                let m: Vec<u8> = buf.drain(..len + 1).collect();
                                return (m[0], m[5..].to_vec());
                            }
                        }
                        let mut chunk = [0u8; 8192];
                        let n = s.read(&mut chunk).unwrap();
                        assert!(n > 0, "warden closed the connection");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                }
                // The greeting first (a pipelining client starts once the
                // connection is up), then one row and one ReadyForQuery
                // per query.
                let mut buf = Vec::new();
                while next(&mut c, &mut buf).0 != b'Z' {}
                let mut reader = c.try_clone().unwrap();
                let read = std::thread::spawn(move || {
                    let mut next = move || next(&mut reader, &mut buf);
                    for want in 1..=QUERIES {
                        let (tag, body) = loop {
                            let (tag, body) = next();
                            if tag == b'D' || tag == b'E' {
                                break (tag, body);
                            }
                        };
                        assert_eq!(
                            tag,
                            b'D',
                            "session {session}: {}",
                            String::from_utf8_lossy(&body)
                        );
                        let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
                        assert_eq!(
                            &body[6..6 + len],
                            want.to_string().as_bytes(),
                            "session {session}: answer {want} of {QUERIES}"
                        );
                        while next().0 != b'Z' {}
                    }
                });
                for n in 1..=QUERIES {
                    let mut sql = format!("select {n}").into_bytes();
                    sql.push(0);
                    c.write_all(&message(b'Q', &sql)).unwrap();
                    // Gaps from none to about 100 µs: quiet moments come
                    // often, and so do sends that race them.
                    // Now and then a pause: the hand-over's quiet moments
                    // (the client's socket joins the kernel's map at one,
                    // the splice comes at a later one).
                    if n % 30 == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let spin = std::time::Instant::now();
                    let gap = Duration::from_micros((n * 37 + session * 11) % 100);
                    while spin.elapsed() < gap {
                        std::hint::spin_loop();
                    }
                }
                read.join().unwrap();
                let _ = c.write_all(&message(b'X', b""));
            });
        }
    });
    assert!(spliced(&s.warden) >= 1.0, "no session was spliced");
}
