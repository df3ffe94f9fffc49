//! Running out of file descriptors: warden under a low `RLIMIT_NOFILE`
//! (hard limit too, so raising the soft one cannot help) with hundreds of
//! idle connections and a flood of garbage keeps serving psql: the client
//! that has been silent the longest is closed with PostgreSQL's FATAL 53300
//! to make room (counted), `accept` never fails in a loop, and once the
//! idle connections go, sessions work as before. (Shedding with no silent
//! client to evict is tested by the MySQL limit test.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, my_uid, warden_bin, Daemon, Instance};

const PASSWORD: &str = "pw-CANARY-3f0c9d12-limits";
/// The daemon's soft and hard descriptor limit in this test.
const NOFILE: u32 = 256;

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

fn metric(w: &Instance, series: &str) -> f64 {
    let (_, body) = w.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn near_the_descriptor_limit_silent_clients_make_room_and_nothing_hangs() {
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
