//! Anomaly detection and freezing against a real PostgreSQL, real processes
//! in their own cgroup and the real kernel monitor: a burst of distinct
//! secrets freezes the workload (kernel EPERM, clear PostgreSQL errors, open
//! session closed, webhook alert with evidence), a bystander keeps working,
//! `warden unfreeze` restores access, a manual freeze survives a restart, and
//! a direct database connection raises the bypass rule. Needs root (skips
//! otherwise unless `WARDEN_REQUIRE_EBPF=1`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use warden_tests::cgroup::Cgroup;
use warden_tests::my_uid;

use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, have_root, Instance};

const PASSWORD: &str = "pw-CANARY-5a1d9e03-anomaly";
const ROUTES: usize = 4;

use warden_tests::webhook::{self, wait_alert};

struct Setup {
    pg: PgCluster,
    warden: Instance,
    ports: Vec<u16>,
    cg: Cgroup,
    hook: mpsc::Receiver<serde_json::Value>,
}

fn setup(tag: &str) -> Setup {
    setup_with(
        tag,
        "distinct_secrets_per_minute = { limit = 3, action = \"freeze\" }",
    )
}

fn setup_with(tag: &str, burst_rules: &str) -> Setup {
    setup_full(tag, "", burst_rules)
}

fn setup_full(tag: &str, global_extra: &str, burst_rules: &str) -> Setup {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let cg = Cgroup::new(tag);
    let (hook_port, hook) = webhook::start();
    let ports: Vec<u16> = (0..ROUTES).map(|_| free_port()).collect();
    let mut cfg = format!(
        r#"
trust_domain = "example.org"

[monitor]
ebpf = "required"
protect_upstreams = "observe"

[anomaly]
webhook = "http://127.0.0.1:{hook_port}/alerts"
denials_per_minute = {{ limit = 3, action = "alert" }}
{global_extra}

[anomaly.workloads.burst]
{burst_rules}

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = 0 }}

[[workload]]
name = "burst"
spiffe_id = "spiffe://example.org/burst"
selectors = {{ uid = 0, cgroup = "{cgname}" }}
"#,
        cgname = cg.name
    );
    for (i, port) in ports.iter().enumerate() {
        let unix = if i == 0 {
            "unix_socket = \"pgsock\"\n"
        } else {
            ""
        };
        cfg.push_str(&format!(
            r#"
[[secret]]
name = "db{i}/app"
rotation_period = "24h"

[[route]]
name = "db{i}"
kind = "postgres"
listen = "127.0.0.1:{port}"
{unix}upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "db{i}/app" }}
allow = ["me", "burst"]
connect_timeout = "5s"
"#,
            pgport = pg.port
        ));
    }
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    for i in 0..ROUTES {
        warden
            .run_stdin(
                &["secret", "put", &format!("db{i}/app")],
                PASSWORD.as_bytes(),
            )
            .ok();
    }
    Setup {
        pg,
        warden,
        ports,
        cg,
        hook,
    }
}

fn dsn(port: u16) -> String {
    format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable")
}

fn unix_dsn(w: &Instance, port: u16) -> String {
    format!(
        "host={} port={port} dbname=postgres user=app",
        w.dir.path().join("pgsock").display()
    )
}

fn frozen(w: &Instance) -> Vec<serde_json::Value> {
    let out = w.run(&["--json", "frozen"]);
    assert_eq!(out.code, 0, "warden frozen: {}", out.stderr);
    serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn wait_frozen(w: &Instance, workload: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = frozen(w).into_iter().find(|e| e["workload"] == workload) {
            return e;
        }
        assert!(Instant::now() < deadline, "{workload} never got frozen");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bystander_ok(s: &Setup, when: &str) {
    let out = run_psql(&dsn(s.ports[1]), "select current_user");
    assert_eq!(out.code, 0, "bystander {when}: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "app");
}

fn audit_lines(w: &Instance, action: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(w.audit_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["action"] == action)
        .collect()
}

fn spawn_long_session(cg: &Cgroup, port: u16) -> Child {
    cg.command(&format!(
        "timeout 60 psql -X -tA -d '{}' -c 'select pg_sleep(50)'",
        dsn(port)
    ))
    .spawn()
    .unwrap()
}

fn wait_sessions(pg: &PgCluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = pg.psql_admin("select count(*) from pg_stat_activity where query like '%pg_sleep(50)%' and pid <> pg_backend_pid()");
        if c.trim().parse::<usize>().unwrap_or(0) >= n {
            return;
        }
        assert!(Instant::now() < deadline, "long session never started");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn distinct_secret_burst_freezes_the_workload_in_the_kernel_and_in_warden() {
    if !have_root() {
        return;
    }
    let s = setup("burst");
    let w = &s.warden;
    let mut daemon = w.start_daemon();
    bystander_ok(&s, "before");

    // An open session of the workload, to be closed by the freeze.
    let long = spawn_long_session(&s.cg, s.ports[0]);
    wait_sessions(&s.pg, 1);
    // Three more distinct secrets: 4 > limit 3.
    for port in &s.ports[1..3] {
        let (code, out, err) = s.cg.psql(&dsn(*port), "select current_user");
        assert_eq!(code, 0, "burst session before the freeze: {err}");
        assert_eq!(out.trim(), "app");
    }
    // The crossing session itself is served, unless the freeze (which does
    // not wait for it) closes it first.
    let (code, _, err) = s.cg.psql(&dsn(s.ports[3]), "select pg_sleep(0.5)");
    assert!(code == 0 || err.contains("is frozen"), "{err}");
    let entry = wait_frozen(w, "burst");
    assert_eq!(entry["by"], "anomaly rule distinct_secrets_per_minute");
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .contains("4 distinct secrets within 1m (limit 3)"),
        "{entry}"
    );
    assert!(
        entry["kernel"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "cgroup"),
        "the workload's cgroup is in the kernel deny map: {entry}"
    );

    // Next connect() from the cgroup: EPERM in the kernel.
    let (code, _, err) = s.cg.psql(&dsn(s.ports[2]), "select 1");
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    // Over the unix socket (not a connect() the cgroup hook sees): warden's own refusal.
    let (code, _, err) = s.cg.psql(&unix_dsn(w, s.ports[0]), "select 1");
    assert_ne!(code, 0);
    assert!(
        err.contains("workload \"burst\" is frozen") && err.contains("distinct_secrets_per_minute"),
        "{err}"
    );
    // The open session was closed with an error naming the freeze.
    let out = long.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("frozen"), "open session: {err}");
    bystander_ok(&s, "during the freeze");

    // The alert, with its evidence.
    let alert = wait_alert(&s.hook, |v| v["rule"] == "distinct_secrets_per_minute");
    assert_eq!(alert["workload"], "burst");
    assert_eq!(alert["action"], "freeze");
    assert!(
        alert["taken"]
            .as_str()
            .unwrap()
            .starts_with("workload frozen"),
        "{alert}"
    );
    assert_eq!(alert["evidence"]["count"], 4);
    assert_eq!(alert["evidence"]["limit"], 3);
    assert_eq!(alert["evidence"]["window_seconds"], 60);
    assert!(
        !alert["evidence"]["pids"].as_array().unwrap().is_empty(),
        "{alert}"
    );
    assert!(
        alert["evidence"]["exes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["sha256"].as_str().is_some_and(|h| h.len() == 64)),
        "{alert}"
    );
    let (_, metrics) = w.http_get("/metrics");
    assert!(metrics.contains("warden_frozen_workloads 1"), "{metrics}");
    assert!(metrics.contains(
        "warden_anomaly_detections_total{action=\"freeze\",rule=\"distinct_secrets_per_minute\"} 1"
    ));

    // Unfreeze restores access; the audit log names both actors.
    let out = w.run(&["unfreeze", "burst"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(frozen(w).is_empty());
    let (code, out, err) = s.cg.psql(&dsn(s.ports[2]), "select current_user");
    assert_eq!(code, 0, "after unfreeze: {err}");
    assert_eq!(out.trim(), "app");
    let freezes = audit_lines(w, "workload.freeze");
    assert_eq!(freezes.len(), 1, "{freezes:?}");
    assert_eq!(freezes[0]["actor"]["kind"], "daemon");
    let unfreezes = audit_lines(w, "workload.unfreeze");
    assert_eq!(unfreezes.len(), 1);
    assert_eq!(unfreezes[0]["actor"]["kind"], "admin");
    assert_eq!(unfreezes[0]["actor"]["uid"], 0);
    assert!(!audit_lines(w, "anomaly.detect").is_empty());

    // Manual freeze, then a restart: still frozen, in the kernel too.
    let out = w.run(&["freeze", "burst", "--reason", "incident 42"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("incident 42"), "{}", out.stdout);
    assert_eq!(daemon.stop(), Some(0));
    let _daemon = w.start_daemon();
    let e = wait_frozen(w, "burst");
    assert_eq!(e["reason"], "incident 42");
    assert!(e["by"].as_str().unwrap().starts_with("admin uid 0"), "{e}");
    let (code, _, err) = s.cg.psql(&dsn(s.ports[3]), "select 1");
    assert_ne!(code, 0, "still frozen after the restart");
    assert!(err.contains("Operation not permitted"), "{err}");
    let out = w.run(&["frozen"]);
    assert!(out.stdout.contains("burst  frozen since") && out.stdout.contains("incident 42"));
    bystander_ok(&s, "after the restart");
    assert_eq!(w.run(&["unfreeze", "burst"]).code, 0);
    let (code, _, err) = s.cg.psql(&dsn(s.ports[3]), "select 1");
    assert_eq!(code, 0, "{err}");

    // No secret in the audit log or the daemon log.
    let audit = std::fs::read_to_string(w.audit_log()).unwrap();
    assert!(!audit.contains(PASSWORD));
    assert!(!daemon.log_text().contains(PASSWORD));
}

#[test]
fn freeze_is_admin_only_and_validated() {
    if !have_root() {
        return;
    }
    let s = setup("cli");
    let w = &s.warden;
    let _d = w.start_daemon();
    let out = w.run(&["freeze", "nope", "--reason", "x"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("no workload \"nope\""),
        "{}",
        out.stderr
    );
    let out = w.run(&["freeze", "burst", "--reason", " "]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--reason"), "{}", out.stderr);
    let out = w.run(&["unfreeze", "burst"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not frozen"), "{}", out.stderr);
    assert_eq!(w.run(&["freeze", "burst", "--reason", "first"]).code, 0);
    let out = w.run(&["freeze", "burst", "--reason", "second", "--for", "1s"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("already frozen") && out.stderr.contains("first"),
        "{}",
        out.stderr
    );
    assert_eq!(w.run(&["unfreeze", "burst"]).code, 0);
    // Expiry: frozen for 1 s, then thawed by the daemon (audited).
    // (burst: its cgroup is empty here, so nothing else on the host is touched)
    let out = w.run(&["freeze", "burst", "--reason", "short", "--for", "1s"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !frozen(w).is_empty() {
        assert!(Instant::now() < deadline, "freeze never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let thawed = audit_lines(w, "workload.unfreeze");
    let expiry = thawed.last().unwrap();
    assert_eq!(expiry["actor"]["kind"], "daemon", "{thawed:?}");
    assert!(expiry["reason"].as_str().unwrap().contains("expired"));
}

#[test]
fn a_direct_database_connection_raises_the_bypass_rule_and_repeated_refusals_the_denial_rule() {
    if !have_root() {
        return;
    }
    let s = setup("bypass");
    let w = &s.warden;
    let _d = w.start_daemon();
    let direct = s.pg.dsn_direct("app", "postgres", PASSWORD);
    let out = run_psql(&direct, "select 1");
    assert_eq!(out.code, 0, "observe mode lets it through: {}", out.stderr);
    let alert = wait_alert(&s.hook, |v| v["rule"] == "bypass");
    assert_eq!(alert["action"], "alert");
    assert_eq!(alert["workload"], "me");
    assert!(!alert["evidence"]["pids"].as_array().unwrap().is_empty());
    let (_, metrics) = w.http_get("/metrics");
    assert!(metrics.contains("warden_anomaly_detections_total{action=\"alert\",rule=\"bypass\"} 1"));
    assert!(frozen(w).is_empty(), "alert only: nothing frozen");

    // Repeated refusals of an unattested process (uid 65534 matches no
    // workload) raise the denial rule.
    for _ in 0..3 {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "psql",
                "-X",
                "-tA",
                "-d",
            ])
            .arg(dsn(s.ports[0]))
            .args(["-c", "select 1"])
            .env("PGPASSFILE", "/nonexistent")
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refuses unattested clients"), "{err}");
    }
    let alert = wait_alert(&s.hook, |v| v["rule"] == "denials_per_minute");
    assert_eq!(alert["action"], "alert");
    assert!(alert["workload"].is_null(), "{alert}");
    assert_eq!(alert["evidence"]["count"], 3);
    assert_eq!(
        alert["evidence"]["pids"].as_array().unwrap().len(),
        3,
        "{alert}"
    );
}

/// No false freeze: a steady pgbench (new connection per transaction, 20/s,
/// late transactions skipped rather than bunched) for 60 s after a 20 s
/// warm-up triggers nothing, with every rule armed to freeze; then an
/// unthrottled burst from the same workload does trip the rate rule.
#[test]
fn steady_pgbench_never_trips_the_rate_rule_but_a_burst_does() {
    if !have_root() {
        return;
    }
    let s = setup_with(
        "steady",
        "session_rate = { interval = \"5s\", warmup = 4, sigmas = 4, min_sessions = 20, action = \"freeze\" }\n\
         distinct_secrets_per_minute = { limit = 3, action = \"freeze\" }\n\
         new_executable = { stable_after = \"5s\", action = \"freeze\" }",
    );
    let w = &s.warden;
    let _d = w.start_daemon();
    let script = w.dir.path().join("select1.sql");
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let pgbench = |extra: &str| {
        let out =
            s.cg.command(&format!(
                "timeout 200 pgbench -n -C -f {} {extra} '{}'",
                script.display(),
                dsn(s.ports[0])
            ))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = pgbench("-c 2 -j 2 -R 20 -L 1000 -T 80");
    assert_eq!(code, 0, "steady pgbench: {text}");
    assert!(
        text.contains("number of transactions actually processed"),
        "{text}"
    );
    assert!(frozen(w).is_empty(), "false freeze: {:?}", frozen(w));
    assert!(
        audit_lines(w, "anomaly.detect").is_empty(),
        "false detection: {:?}",
        audit_lines(w, "anomaly.detect")
    );
    let (_, metrics) = w.http_get("/metrics");
    assert!(
        metrics
            .contains("warden_sessions_total{result=\"allowed\",route=\"db0\",workload=\"burst\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("warden_anomaly_detections_total{"))
            .all(|l| l.ends_with(" 0")),
        "{metrics}"
    );
    // Control: the same workload, unthrottled, is frozen by the rate rule.
    let (_code, _text) = pgbench("-c 4 -j 2 -T 6");
    let e = wait_frozen(w, "burst");
    assert_eq!(e["by"], "anomaly rule session_rate", "{e}");
}

/// psql from inside the cgroup, timed by a Python wrapper on
/// CLOCK_MONOTONIC (the probe's clock): (start ns, elapsed ns).
fn timed_psql(cg: &Cgroup, dsn: &str) -> (u128, u128) {
    let script = format!(
        "python3 -c 'import subprocess,time\nt=time.monotonic_ns()\nsubprocess.run([\"psql\",\"-X\",\"-tA\",\"-d\",\"{dsn}\",\"-c\",\"select 1\"],capture_output=True,timeout=30)\nprint(t,time.monotonic_ns()-t)'"
    );
    let out = cg.command(&script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|v| v.parse::<u128>().unwrap());
    (it.next().expect("start"), it.next().expect("elapsed"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `cargo xtask bench`: time from the session that crosses the distinct
/// secrets threshold to the kernel denying the next connect(), over repeated
/// runs (one workload and cgroup per run in one daemon), beside the time of
/// one plain session through warden measured in the same runs.
#[test]
#[ignore = "benchmark: run by `cargo xtask bench` (root)"]
fn bench_freeze_latency() {
    if !have_root() {
        return;
    }
    let runs: usize = std::env::var("WARDEN_BENCH_FREEZE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let ports = [free_port(), free_port()];
    let cgs: Vec<Cgroup> = (0..runs)
        .map(|i| Cgroup::new(&format!("bench{i}")))
        .collect();
    let mut cfg =
        String::from("trust_domain = \"example.org\"\n[monitor]\nebpf = \"required\"\n[anomaly]\n");
    for i in 0..runs {
        cfg.push_str(&format!(
            "[anomaly.workloads.b{i}]\ndistinct_secrets_per_minute = {{ limit = 1, action = \"freeze\" }}\n"
        ));
    }
    let names: Vec<String> = (0..runs).map(|i| format!("\"b{i}\"")).collect();
    for (i, cg) in cgs.iter().enumerate() {
        cfg.push_str(&format!(
            "[[workload]]\nname = \"b{i}\"\nspiffe_id = \"spiffe://example.org/b{i}\"\nselectors = {{ uid = 0, cgroup = \"{}\" }}\n",
            cg.name
        ));
    }
    for (i, port) in ports.iter().enumerate() {
        cfg.push_str(&format!(
            "[[secret]]\nname = \"db{i}/app\"\nrotation_period = \"24h\"\n[[route]]\nname = \"db{i}\"\nkind = \"postgres\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"127.0.0.1:{}\"\nupstream_tls = {{ mode = \"disable\" }}\ncredential = {{ user = \"app\", secret = \"db{i}/app\" }}\nallow = [{}]\n",
            pg.port,
            names.join(", ")
        ));
    }
    let w = Instance::new_with(&cfg);
    assert_eq!(w.run(&["init"]).code, 0);
    for i in 0..2 {
        w.run_stdin(
            &["secret", "put", &format!("db{i}/app")],
            PASSWORD.as_bytes(),
        )
        .ok();
    }
    let daemon = w.start_daemon();
    // The probe's target: a local listener that accepts and drops.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let tport = target.local_addr().unwrap().port();
    std::thread::spawn(move || for _s in target.incoming() {});
    let probe = format!(
        "python3 -c 'import socket,time,errno\nwhile True:\n s=socket.socket()\n try:\n  s.connect((\"127.0.0.1\",{tport}))\n except OSError as e:\n  if e.errno==errno.EPERM:\n   print(time.monotonic_ns(),flush=True);break\n s.close()\n time.sleep(0.0002)\n'"
    );
    let mut external = Vec::new();
    let mut session = Vec::new();
    for cg in &cgs {
        let mut p = cg.command(&probe).spawn().unwrap();
        let (_, took) = timed_psql(cg, &dsn(ports[0]));
        session.push(took as f64 / 1e6);
        let (t0, _) = timed_psql(cg, &dsn(ports[1]));
        let mut line = String::new();
        BufReader::new(p.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let _ = p.wait();
        let t1: u128 = line.trim().parse().expect("probe saw EPERM");
        external.push((t1.saturating_sub(t0)) as f64 / 1e6);
    }
    let log = daemon.log_text();
    let mut internal: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            let i = l.find("kernel deny in place ")?;
            let rest = &l[i + "kernel deny in place ".len()..];
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .map(|us| us / 1000.0)
        .collect();
    assert_eq!(internal.len(), runs, "{log}");
    for v in [&mut internal, &mut external, &mut session] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    println!("freeze latency over {runs} runs (ms):");
    println!(
        "  triggering event -> kernel deny map updated (daemon): p50 {:.2}  p99 {:.2}",
        percentile(&internal, 0.5),
        percentile(&internal, 0.99)
    );
    println!(
        "  crossing psql started -> probe's first EPERM (outside, includes the whole session): p50 {:.2}  p99 {:.2}",
        percentile(&external, 0.5),
        percentile(&external, 0.99)
    );
    println!(
        "  baseline: one psql session through warden, start to exit: p50 {:.2}  p99 {:.2}  (outside/baseline p50 ratio {:.2}x)",
        percentile(&session, 0.5),
        percentile(&session, 0.99),
        percentile(&external, 0.5) / percentile(&session, 0.5)
    );
}

/// A frozen workload gets no SVIDs (PermissionDenied naming the freeze) and
/// its open Workload API stream ends; unfreeze serves it again. The eBPF
/// monitor is off here (this workload is "every process of this uid", which
/// must not be frozen in the kernel on a shared test machine), so no root is
/// needed.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_workload_gets_no_svids_and_its_stream_ends() {
    use tokio_stream::StreamExt;
    let cfg = format!(
        r#"
trust_domain = "example.org"

[monitor]
ebpf = "off"

[identity]
workload_api_socket = "workload.sock"

[[workload]]
name = "tester"
spiffe_id = "spiffe://example.org/tester"
selectors = {{ uid = {uid} }}
"#,
        uid = my_uid()
    );
    let w = Instance::new_with(&cfg);
    assert_eq!(w.run(&["init"]).code, 0);
    let _d = w.start_daemon();
    let endpoint = format!("unix:{}", w.dir.path().join("workload.sock").display());
    let client = spiffe::WorkloadApiClient::connect_to(endpoint.clone())
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first SVID")
        .unwrap()
        .unwrap();

    let out = w.run(&["freeze", "tester", "--reason", "leaked token"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // The open stream ends with PermissionDenied.
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream reacts to the freeze");
    match end {
        Some(Err(e)) => {
            let text = e.to_string();
            assert!(
                text.contains("PermissionDenied") || text.contains("frozen"),
                "{text}"
            );
        }
        None => {}
        Some(Ok(_)) => panic!("a frozen workload got a new SVID"),
    }
    let err = client.fetch_x509_svid().await.unwrap_err().to_string();
    assert!(
        err.contains("frozen") && err.contains("leaked token"),
        "{err}"
    );

    assert_eq!(w.run(&["unfreeze", "tester"]).code, 0);
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .unwrap();
    client
        .fetch_x509_svid()
        .await
        .expect("served again after unfreeze");
    let audit = std::fs::read_to_string(w.audit_log()).unwrap();
    assert!(audit.contains("workload.freeze") && audit.contains("workload.unfreeze"));
}

/// `anomaly.suspend = true`: a freeze also stops the workload's processes
/// through the cgroup freezer; unfreeze resumes them.
#[test]
fn suspend_stops_and_resumes_the_workloads_processes() {
    if !have_root() {
        return;
    }
    let s = setup_full("suspend", "suspend = true", "");
    let w = &s.warden;
    let _d = w.start_daemon();
    let mut sleeper = s.cg.command("sleep 60").spawn().unwrap();
    let events = s.cg.dir.join("cgroup.events");
    let state = || std::fs::read_to_string(&events).unwrap();
    assert!(state().contains("frozen 0"));
    let out = w.run(&["freeze", "burst", "--reason", "suspend it"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let e = wait_frozen(w, "burst");
    assert_eq!(e["suspended"][0], s.cg.name.as_str(), "{e}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state().contains("frozen 1") {
        assert!(Instant::now() < deadline, "never suspended: {}", state());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(w.run(&["unfreeze", "burst"]).code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state().contains("frozen 0") {
        assert!(Instant::now() < deadline, "never resumed: {}", state());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
