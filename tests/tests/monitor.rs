//! The eBPF access monitor inside the daemon: `protect_upstreams = "enforce"`
//! against a real PostgreSQL, `warden events`, the monitor metrics, and what a
//! clean stop releases. Needs root (CI runs as root; `WARDEN_REQUIRE_EBPF=1`
//! turns a missing capability into a failure instead of a skip).

use std::time::{Duration, Instant};

use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, have_root, is_root, wait_for, Instance};

const PASSWORD: &str = "pw-CANARY-0c4e7f21-monitor";

fn instance(pg: &PgCluster, port: u16, monitor: &str) -> Instance {
    let cfg = format!(
        r#"
trust_domain = "example.org"

[monitor]
{monitor}

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = 0 }}

[[secret]]
name = "app-db/app"
rotation_period = "24h"

[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "app-db/app" }}
allow = ["me"]
connect_timeout = "5s"
"#,
        pgport = pg.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden
        .run_stdin(&["secret", "put", "app-db/app"], PASSWORD.as_bytes())
        .ok();
    warden
}

/// `warden events --json` lines (parsed) until `pred` holds for one of them.
fn wait_for_event(
    warden: &Instance,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = warden.run(&["events", "--json", "-n", "1000"]);
        assert_eq!(out.code, 0, "warden events: {}", out.stderr);
        let events: Vec<serde_json::Value> = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if let Some(e) = events.iter().find(|e| pred(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {what} event in: {}",
            out.stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn enforce_denies_direct_database_access_but_not_warden() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let direct = pg.dsn_direct("app", "postgres", PASSWORD);
    let before = run_psql(&direct, "select 1");
    assert_eq!(
        before.code, 0,
        "direct access works before warden: {}",
        before.stderr
    );

    let port = free_port();
    let warden = instance(
        &pg,
        port,
        "ebpf = \"required\"\nprotect_upstreams = \"enforce\"",
    );
    let mut daemon = warden.start_daemon();

    // Through warden: works, no password. The client stays a moment, so
    // the event feed (which names processes from /proc when it reads their
    // events) finds it alive even on a loaded machine.
    let via = run_psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable"),
        "select current_user from pg_sleep(0.5)",
    );
    assert_eq!(via.code, 0, "through warden: {}", via.stderr);
    assert_eq!(via.stdout.trim(), "app");

    // Direct, with the real password: the kernel refuses the connect.
    let bypass = run_psql(&direct, "select 1");
    assert_ne!(bypass.code, 0, "direct access must be denied");
    assert!(
        bypass.stderr.contains("Operation not permitted"),
        "psql should report EPERM: {}",
        bypass.stderr
    );

    let denied = wait_for_event(&warden, "bypass_denied", |e| {
        e["verdict"] == "bypass_denied" && e["destination"] == "upstream of route app-db"
    });
    // The kernel records comm; the executable path is read from /proc when
    // the event is read, which a refused process may already have left.
    assert_eq!(denied["comm"], "psql", "{denied}");
    if let Some(exe) = denied["exe"].as_str() {
        assert!(exe.contains("psql"), "{denied}");
    }
    assert_eq!(denied["address"], format!("127.0.0.1:{}", pg.port));
    let attributed = wait_for_event(&warden, "attributed", |e| {
        e["kind"] == "attributed" && e["destination"] == "route app-db"
    });
    assert_eq!(attributed["workload"], "me", "{attributed}");

    // Human-readable output names verdict and destination too.
    let text = warden.run(&["events", "-n", "1000"]);
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("bypass_denied"), "{}", text.stdout);
    assert!(text.stdout.contains("upstream of route app-db"));
    // More than the daemon keeps: said, not silently cut.
    let many = warden.run(&["events", "-n", "100000"]);
    assert_eq!(many.code, 0);
    assert!(
        many.stderr
            .contains("keeps only the last 1024 access events in memory"),
        "{}",
        many.stderr
    );

    let (_, metrics) = warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_monitor_mode{mode=\"ebpf\"} 1"),
        "{metrics}"
    );
    let bypasses = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warden_monitor_bypass_attempts_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(bypasses >= 1.0, "{metrics}");
    assert!(metrics.contains("warden_monitor_events_lost_total 0"));
    assert!(
        metrics.contains("warden_monitor_attributions_total{source=\"ebpf\"} 1"),
        "psql through warden was attributed by the sock_ops map: {metrics}"
    );
    assert!(!metrics.contains(PASSWORD));

    // A clean stop releases enforcement (and its pins).
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
    let after = run_psql(&direct, "select 1");
    assert_eq!(after.code, 0, "clean stop fails open: {}", after.stderr);
    let log = daemon.log_text();
    assert!(log.contains("eBPF monitor detached"), "{log}");
    assert!(!log.contains(PASSWORD));
}

#[test]
fn observe_reports_but_lets_direct_access_through() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let warden = instance(
        &pg,
        port,
        "ebpf = \"auto\"\nprotect_upstreams = \"observe\"",
    );
    let _daemon = warden.start_daemon();
    let direct = run_psql(&pg.dsn_direct("app", "postgres", PASSWORD), "select 1");
    assert_eq!(direct.code, 0, "observe lets it through: {}", direct.stderr);
    wait_for_event(&warden, "bypass_observed", |e| {
        e["verdict"] == "bypass_observed" && e["destination"] == "upstream of route app-db"
    });
}

#[test]
fn ebpf_off_attributes_through_proc() {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let warden = instance(&pg, port, "ebpf = \"off\"");
    if !is_root() {
        // The workload selector is uid 0.
        eprintln!("skipping: needs root");
        return;
    }
    let daemon = warden.start_daemon();
    let via = run_psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable"),
        "select current_user",
    );
    assert_eq!(via.code, 0, "{}", via.stderr);
    let (_, metrics) = warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_monitor_mode{mode=\"off\"} 1"),
        "{metrics}"
    );
    let events = warden.run(&["events", "--json"]);
    assert_eq!(events.code, 0);
    assert_eq!(events.stdout.trim(), "", "no kernel events without eBPF");
    assert!(daemon.log_text().contains("monitor.ebpf = \"off\""));
}

#[test]
fn events_need_a_running_daemon() {
    let warden = Instance::initialised();
    warden
        .run(&["events"])
        .code(7)
        .stderr_has("start it with `warden up`");
}

/// `warden … up` as root but without the capabilities eBPF needs.
fn up_without_bpf_caps(warden: &Instance) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.arg("--bounding-set=-bpf,-sys_admin,-perfmon,-net_admin")
        .arg("--")
        .arg(warden_tests::warden_bin())
        .arg("--config")
        .arg(&warden.config)
        .arg("up")
        .env("WARDEN_LOG", "info");
    c
}

#[test]
fn without_cap_bpf_required_refuses_to_start_and_auto_falls_back() {
    if !have_root() {
        return;
    }
    let required = Instance::new_with("[monitor]\nebpf = \"required\"\n");
    required.run(&["init"]).ok();
    let out = up_without_bpf_caps(&required)
        .output()
        .expect("setpriv (util-linux) is required");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("monitor.ebpf = \"required\"") && stderr.contains("CAP_BPF"),
        "the refusal names the key and the fix: {stderr}"
    );

    let auto = Instance::new_with("[monitor]\nebpf = \"auto\"\n");
    auto.run(&["init"]).ok();
    let log = auto.dir.path().join("auto.log");
    let logf = std::fs::File::create(&log).expect("log file");
    let mut child = up_without_bpf_caps(&auto)
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("setpriv");
    let deadline = Instant::now() + Duration::from_secs(20);
    while auto.run(&["status"]).code != 0 {
        assert!(Instant::now() < deadline, "daemon did not start");
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "warden up exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = auto.http_get("/metrics");
    assert!(
        metrics.contains("warden_monitor_mode{mode=\"procfs\"} 1"),
        "{metrics}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.matches("falling back to /proc attribution").count(),
        1,
        "one clear warning naming the reason: {text}"
    );
    assert!(text.contains("CAP_BPF"), "{text}");
}

#[test]
fn events_follow_streams_new_access_as_it_happens() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let warden = instance(&pg, port, "ebpf = \"required\"");
    let _daemon = warden.start_daemon();
    let mut follow = warden
        .command(&["events", "--follow", "--json", "-n", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("warden events -f");
    let stdout = follow.stdout.take().expect("stdout");
    // Give the subscription a moment, then make some traffic.
    std::thread::sleep(Duration::from_millis(300));
    let via = run_psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable"),
        "select 1",
    );
    assert_eq!(via.code, 0, "{}", via.stderr);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a live event within 20 s");
    let event: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(event["destination"], "route app-db", "{event}");
    let _ = follow.kill();
    let _ = follow.wait();
}

fn pin_dir_of(warden: &Instance) -> std::path::PathBuf {
    let canonical = warden.data_dir.canonicalize().expect("data dir");
    let hex: String = canonical
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::path::PathBuf::from("/sys/fs/bpf/warden").join(format!("d-{hex}"))
}

#[test]
fn a_crashed_daemon_keeps_enforcing_until_restart_and_orphans_are_released() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let direct = pg.dsn_direct("app", "postgres", PASSWORD);
    let port = free_port();
    let warden = instance(
        &pg,
        port,
        "ebpf = \"required\"\nprotect_upstreams = \"enforce\"",
    );
    let via_dsn = format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable");

    let mut daemon = warden.start_daemon();
    assert_ne!(run_psql(&direct, "select 1").code, 0, "enforced");
    let pins = pin_dir_of(&warden);
    assert!(pins.exists(), "pinned at {}", pins.display());
    // SIGKILL: no clean-up runs, as in a crash.
    daemon.child.kill().expect("kill");
    let _ = daemon.child.wait();
    let after_crash = run_psql(&direct, "select 1");
    assert_ne!(after_crash.code, 0, "fail closed after a crash");
    assert!(
        after_crash.stderr.contains("Operation not permitted"),
        "{}",
        after_crash.stderr
    );

    // The restart takes over (its own upstream connection works) and a clean
    // stop releases everything.
    let mut restarted = warden.start_daemon();
    let via = run_psql(&via_dsn, "select current_user");
    assert_eq!(via.code, 0, "through the restarted warden: {}", via.stderr);
    assert_ne!(run_psql(&direct, "select 1").code, 0, "still enforced");
    assert_eq!(restarted.stop(), Some(0));
    assert_eq!(
        run_psql(&direct, "select 1").code,
        0,
        "clean stop fails open"
    );
    assert!(!pins.exists(), "pins removed on a clean stop");

    // A crashed instance whose data dir is deleted can never restart: the
    // next daemon on the host releases its pins.
    let mut again = warden.start_daemon();
    again.child.kill().expect("kill");
    let _ = again.child.wait();
    assert_ne!(run_psql(&direct, "select 1").code, 0);
    std::fs::remove_dir_all(&warden.data_dir).expect("remove data dir");
    let other = Instance::new_with("[monitor]\nebpf = \"required\"\n");
    other.run(&["init"]).ok();
    let other_daemon = other.start_daemon();
    assert!(
        !pins.exists(),
        "orphaned pins released: {}",
        other_daemon.log_text()
    );
    // The log line may reach the file a moment after the daemon answers. Only
    // this daemon can have released them: the test runs alone
    // (`.config/nextest.toml`), since any daemon starting on the host would.
    let released = format!(
        "released the eBPF pins of a crashed warden whose data dir {} no longer exists",
        warden.data_dir.display()
    );
    wait_for(&released, || other_daemon.log_text().contains(&released));
    assert_eq!(
        run_psql(&direct, "select 1").code,
        0,
        "the orphan's enforcement is gone"
    );
}
