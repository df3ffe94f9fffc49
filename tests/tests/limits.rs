//! Running out of file descriptors: warden under a low `RLIMIT_NOFILE`
//! (hard limit too, so raising the soft one cannot help) with hundreds of
//! idle connections keeps serving real clients — psql (with a flood of
//! garbage too), the mariadb CLI, redis-cli, curl and a TLS client: the
//! client that has been silent the longest is closed with its protocol's
//! own error (PostgreSQL FATAL 53300, MySQL ERR 1040, Redis `-ERR max
//! number of clients reached`, HTTP 503; a TLS route closes it) to make
//! room, counted as `result="evicted"`, `accept` never fails in a loop, and
//! once the idle connections go, sessions work as before. (Shedding with no
//! silent client to evict is tested by the MySQL limit test.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, metric, my_uid, warden_bin, Daemon, Instance};

const PASSWORD: &str = "pw-CANARY-3f0c9d12-limits";
/// The daemon's soft and hard descriptor limit in this test.
const NOFILE: u32 = 256;

/// The tests here run one at a time: each crowds a daemon to its limit,
/// and several at once on a small machine would measure the machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn start_limited(warden: &Instance) -> Daemon {
    let log = warden.dir.path().join("daemon.log");
    let logf = std::fs::File::create(&log).expect("log");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(warden_bin())
        .arg("--config")
        .arg(&warden.config)
        .arg("up")
        .env("WARDEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("prlimit (util-linux) is required");
    let mut d = Daemon { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while warden.run(&["status"]).code != 0 {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("warden up exited with {st}: {}", d.log_text());
        }
        assert!(Instant::now() < deadline, "not ready: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    d
}

#[test]
fn near_the_descriptor_limit_silent_clients_make_room_and_nothing_hangs() {
    let _serial = one_at_a_time();
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let cfg = format!(
        r#"trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "app-db/app" }}
allow = ["me"]
"#,
        uid = my_uid(),
        pgport = pg.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("app-db/app", PASSWORD.as_bytes()).ok();
    let daemon = start_limited(&warden);
    let dsn = format!("host=127.0.0.1 port={port} dbname=app user=app sslmode=disable");
    let ok = run_psql(&dsn, "SELECT 'served'");
    assert!(ok.stdout.contains("served"), "{}", ok.stderr);

    // Idle clients that never send a startup packet, more than the limit
    // allows, and a flood of garbage: new connections beyond the budget are
    // shed or make room.
    let mut idle: Vec<TcpStream> = (0..NOFILE + 40)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    for _ in 0..100 {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.write_all(b"\x00\x00\x00\x08garbage!");
        }
    }
    // Once the silent ones have waited past warden's eviction age, more
    // silent clients take whatever descriptors are free, and psql is still
    // served: the longest-silent connections make room.
    std::thread::sleep(Duration::from_millis(1500));
    idle.extend((0..60).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")));
    // Within a few seconds — well before the silent ones' 10 s startup
    // timeout would free their descriptors — psql is served (a burst of
    // accepts can outrun the evicted connections' closes for a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let served = run_psql(&dsn, "SELECT 'served'");
        if served.stdout.contains("served") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stdout: {} stderr: {} log: {}",
            served.stdout,
            served.stderr,
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metric(
            &warden,
            "warden_sessions_total{result=\"evicted\",route=\"app-db\",workload=\"\"}"
        ) >= 1.0
    );
    // The evicted clients were told why, in PostgreSQL's words.
    let mut told = 0;
    for c in &mut idle {
        c.set_nonblocking(true).ok();
        let mut buf = [0u8; 512];
        if let Ok(n) = c.read(&mut buf) {
            let got = &buf[..n];
            if warden_tests::contains_bytes(got, b"53300")
                && warden_tests::contains_bytes(got, b"make room")
            {
                told += 1;
            }
        }
    }
    assert!(told >= 1, "no evicted client got FATAL 53300");
    let log = daemon.log_text();
    assert!(!log.contains("accept failed"), "{log}");

    // The idle clients leave: sessions are served again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = run_psql(&dsn, "SELECT 'served'");
        if again.stdout.contains("served") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {}", again.stderr);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!daemon.log_text().contains(PASSWORD));
}

/// Silent connections to `port`, more than the limit allows; once they have
/// waited past warden's eviction age (1 s), more silent ones take whatever
/// descriptors are free by making the oldest go. Returns them all.
fn crowd(port: u16) -> Vec<TcpStream> {
    let connect = |_| TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut idle: Vec<TcpStream> = (0..NOFILE + 40).map(connect).collect();
    std::thread::sleep(Duration::from_millis(1500));
    idle.extend((0..60).map(connect));
    idle
}

/// Retries `attempt` (a real client) until it is served, for a few seconds
/// — well before any silent connection's own timeout would free its
/// descriptor (a burst of accepts can outrun the evicted connections'
/// closes for a moment).
fn served_soon(w: &Instance, daemon: &Daemon, attempt: impl Fn() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        match attempt() {
            Ok(()) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "not served: {e}\nlog: {}\n{}",
                daemon.log_text(),
                w.http_get("/metrics").1
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many of `idle` got one answer holding every needle.
fn told(idle: &mut [TcpStream], needles: &[&[u8]]) -> usize {
    let mut n = 0;
    for c in idle {
        c.set_nonblocking(true).ok();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(k @ 1..) = c.read(&mut buf) {
            got.extend_from_slice(&buf[..k]);
        }
        if needles
            .iter()
            .all(|x| warden_tests::contains_bytes(&got, x))
        {
            n += 1;
        }
    }
    n
}

/// Silent connections to `route` were evicted, and counted.
fn assert_evicted(w: &Instance, daemon: &Daemon, route: &str) {
    let series =
        format!("warden_sessions_total{{result=\"evicted\",route=\"{route}\",workload=\"\"}}");
    assert!(
        metric(w, &series) >= 1.0,
        "{}\n{}",
        w.http_get("/metrics").1,
        daemon.log_text()
    );
}

/// A command's exit code and output, killed after 10 s (`timeout`).
fn run_for_10s(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new("timeout")
        .arg("10")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("timeout (coreutils)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn workload_toml() -> String {
    format!(
        "trust_domain = \"example.org\"\n\n[[workload]]\nname = \"me\"\n\
         spiffe_id = \"spiffe://example.org/me\"\nselectors = {{ uid = {} }}\n\n\
         [monitor]\nebpf = \"off\"\n",
        my_uid()
    )
}

#[test]
fn mysql_clients_that_never_answer_the_greeting_make_room() {
    let _serial = one_at_a_time();
    const PW: &str = "pw-CANARY-5d1e7a40-limits";
    let server = warden_tests::mysql::MariaDb::start();
    server.admin(&format!("CREATE USER 'app'@'%' IDENTIFIED BY '{PW}';"));
    let port = free_port();
    let cfg = format!(
        "{}\n[[route]]\nname = \"db\"\nkind = \"mysql\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"127.0.0.1:{up}\"\nupstream_tls = {{ mode = \"disable\" }}\n\
         credential = {{ user = \"app\", secret = \"db/app\" }}\nallow = [\"me\"]\n",
        workload_toml(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("db/app", PW.as_bytes()).ok();
    let daemon = start_limited(&warden);
    let mariadb = || {
        warden_tests::mysql::cli_with(
            port,
            "x",
            &["--skip-ssl", "--connect-timeout=5"],
            "SELECT 'served';",
        )
    };
    assert_eq!(mariadb(), (0, "served\n".into()));

    let mut idle = crowd(port);
    served_soon(&warden, &daemon, || match mariadb() {
        (0, out) if out == "served\n" => Ok(()),
        (_, out) => Err(out),
    });
    assert_evicted(&warden, &daemon, "db");
    // Told after warden's greeting, in MySQL's code for too many
    // connections (SQLSTATE 08004).
    let n = told(&mut idle, &[b"\xff\x10\x04#08004", b"make room"]);
    assert!(n >= 1, "no evicted client got ERR 1040");
    let log = daemon.log_text();
    assert!(log.contains("closing silent client connections"), "{log}");
    assert!(!log.contains("accept failed") && !log.contains(PW), "{log}");
}

#[test]
fn redis_clients_that_send_no_command_make_room() {
    let _serial = one_at_a_time();
    const PW: &str = "pw-CANARY-9b3c2e11-limits";
    let server = warden_tests::redis::RedisServer::start(PW, "unused-app-pw");
    let port = free_port();
    let cfg = format!(
        "{}\n[[route]]\nname = \"cache\"\nkind = \"redis\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"127.0.0.1:{up}\"\nupstream_tls = {{ mode = \"disable\" }}\n\
         credential = {{ secret = \"cache/default\" }}\nallow = [\"me\"]\n",
        workload_toml(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("cache/default", PW.as_bytes()).ok();
    let daemon = start_limited(&warden);
    let p = port.to_string();
    let ping = || run_for_10s("redis-cli", &["-h", "127.0.0.1", "-p", &p, "PING"]);
    assert_eq!(ping(), (0, "PONG\n".into()));

    let mut idle = crowd(port);
    served_soon(&warden, &daemon, || match ping() {
        (0, out) if out == "PONG\n" => Ok(()),
        (_, out) => Err(out),
    });
    assert_evicted(&warden, &daemon, "cache");
    let n = told(
        &mut idle,
        &[b"-ERR max number of clients reached (warden: too many connections: this connection sent no command"],
    );
    assert!(n >= 1, "no evicted client got -ERR");
    let log = daemon.log_text();
    assert!(!log.contains("accept failed") && !log.contains(PW), "{log}");
}

#[test]
fn http_clients_that_send_no_request_make_room() {
    let _serial = one_at_a_time();
    const TOKEN: &str = "tok-CANARY-77aa01c3-limits";
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = warden_tests::upstream::Upstream::start(dir.path(), "http", None, None, None);
    let port = free_port();
    let cfg = format!(
        "{}\n[[route]]\nname = \"api\"\nkind = \"http\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"http://127.0.0.1:{up}/base\"\n\
         inject = {{ header = \"X-Api-Key\", secret = \"api/token\" }}\nallow = [\"me\"]\n",
        workload_toml(),
        up = upstream.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("api/token", TOKEN.as_bytes()).ok();
    let daemon = start_limited(&warden);
    let url = format!("http://127.0.0.1:{port}/hello");
    let curl = || {
        run_for_10s(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &url,
            ],
        )
    };
    assert_eq!(curl(), (0, "200".into()));

    let mut idle = crowd(port);
    served_soon(&warden, &daemon, || match curl() {
        (0, out) if out == "200" => Ok(()),
        (_, out) => Err(out),
    });
    assert_evicted(&warden, &daemon, "api");
    let n = told(
        &mut idle,
        &[
            b"HTTP/1.1 503 Service Unavailable\r\n",
            b"connection: close\r\n",
            b"sent no request",
        ],
    );
    assert!(n >= 1, "no evicted client got 503");
    let log = daemon.log_text();
    assert!(
        !log.contains("accept failed") && !log.contains(TOKEN),
        "{log}"
    );
}

#[test]
fn tls_clients_that_send_no_client_hello_make_room() {
    let _serial = one_at_a_time();
    // warden on both ends, as in the tls route tests: a client-mode route
    // presents this process's SVID to a server-mode route (the one crowded)
    // in front of a plain echo service.
    let dir = tempfile::tempdir().expect("tempdir");
    let echo = warden_tests::upstream::Upstream::start(dir.path(), "plain-echo", None, None, None);
    let (out_port, in_port) = (free_port(), free_port());
    let bundle = dir.path().join("bundle.pem");
    let cfg = format!(
        "{}\n[[route]]\nname = \"out\"\nkind = \"tls\"\nlisten = \"127.0.0.1:{out_port}\"\n\
         upstream = \"localhost:{in_port}\"\nupstream_tls = {{ ca_file = \"{b}\" }}\n\
         allow = [\"me\"]\n\n\
         [[route]]\nname = \"in\"\nkind = \"tls\"\nmode = \"server\"\n\
         listen = \"127.0.0.1:{in_port}\"\nupstream = \"127.0.0.1:{e}\"\n\
         allow = [\"spiffe://example.org/me\"]\nconnect_timeout = \"30s\"\n",
        workload_toml(),
        b = bundle.display(),
        e = echo.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    let b = warden.run(&["svid", "bundle"]);
    b.ok();
    std::fs::write(&bundle, &b.stdout).expect("bundle");
    let daemon = start_limited(&warden);
    let echo_through = || -> Result<(), String> {
        let mut c = TcpStream::connect(("127.0.0.1", out_port)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(10))).ok();
        c.write_all(b"over mtls\n").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        match &buf[..n] {
            b"echo:over mtls\n" => Ok(()),
            other => Err(format!("got {:?}", String::from_utf8_lossy(other))),
        }
    };
    assert_eq!(echo_through(), Ok(()));

    // A silent client cannot be told anything before a handshake: it is
    // closed, as a shed one is.
    let _idle = crowd(in_port);
    served_soon(&warden, &daemon, echo_through);
    assert_evicted(&warden, &daemon, "in");
    let log = daemon.log_text();
    assert!(!log.contains("accept failed"), "{log}");
}

/// One `GET` on a kept-alive connection: the status, once the whole
/// response (Content-Length framed) was read.
fn get_kept_alive(c: &mut TcpStream, path: &str) -> u16 {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: warden\r\n\r\n").as_bytes())
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    while got.len() < head_end + len {
        let n = c.read(&mut buf).expect("read");
        assert!(n > 0, "closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

#[test]
fn idle_keep_alive_http_clients_hold_one_descriptor_each() {
    let _serial = one_at_a_time();
    const N: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = warden_tests::upstream::Upstream::start(dir.path(), "http", None, None, None);
    let port = free_port();
    let cfg = format!(
        "{}\n[[route]]\nname = \"api\"\nkind = \"http\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"http://127.0.0.1:{up}/base\"\n\
         inject = {{ header = \"X-Api-Key\", secret = \"api/token\" }}\nallow = [\"me\"]\n",
        workload_toml(),
        up = upstream.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("api/token", b"tok-idle-limits").ok();
    let daemon = start_limited(&warden);
    // prlimit execs warden: the same process.
    let pid = daemon.child.id();
    let mut first = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    assert_eq!(get_kept_alive(&mut first, "/warm"), 200);
    let before = open_fds(pid);

    // N clients, one request each (the fast path), then idle, kept alive.
    let mut clients: Vec<TcpStream> = (0..N)
        .map(|i| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).ok();
            assert_eq!(get_kept_alive(&mut c, &format!("/one/{i}")), 200);
            c
        })
        .collect();
    let grown = open_fds(pid) - before;
    // Each idle client holds its own socket; upstream connections wait in
    // the route's idle set, not one per client.
    assert!(
        (N..N + N / 4).contains(&grown),
        "{N} idle clients: {grown} more descriptors"
    );
    // And each is served again, over the kept connections.
    for c in &mut clients {
        assert_eq!(get_kept_alive(c, "/two"), 200);
    }
    assert_eq!(get_kept_alive(&mut first, "/again"), 200);
    let log = daemon.log_text();
    assert!(!log.contains("tok-idle-limits"), "{log}");
}
