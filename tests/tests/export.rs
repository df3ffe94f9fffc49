//! `[export]` against real receivers: a PostgreSQL session through warden
//! shows up — access events with verdict and ancestry, and the session's
//! audit records exactly as the local log holds them — in a JSON-lines file,
//! an OTLP/HTTP receiver written here, a syslog unix datagram socket
//! (RFC 5424) and a journald-native datagram socket bound by the test. A
//! receiver that stalls or is down never delays a session (drops are
//! counted), and the per-workload rate limit drops and counts.
//!
//! Access events need the eBPF monitor (root); without root the tests skip.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, have_root, Instance};

const PASSWORD: &str = "pw-CANARY-5d1e0a77-export";
const TOKEN: &str = "otlp-TOKEN-CANARY-91c2";

/// A warden with one PostgreSQL route allowed to uid 0 and `export` (TOML
/// with `@DIR@` standing for the instance's directory).
fn instance(pg: &PgCluster, port: u16, export: &str) -> Instance {
    let cfg = format!(
        r#"
trust_domain = "example.org"

[monitor]
ebpf = "required"

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

{export}
"#,
        pgport = pg.port,
    );
    let warden = Instance::new_with(&cfg);
    let dir = warden.dir.path().display().to_string();
    let text = std::fs::read_to_string(&warden.config).unwrap();
    std::fs::write(&warden.config, text.replace("@DIR@", &dir)).unwrap();
    warden.run(&["init"]).ok();
    warden
        .run_stdin(&["secret", "put", "app-db/app"], PASSWORD.as_bytes())
        .ok();
    warden
}

fn session(port: u16) {
    let out = run_psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable"),
        "select current_user from pg_sleep(0.3)",
    );
    assert_eq!(out.code, 0, "session through warden: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "app");
}

/// Waits (30 s at most) until `f` returns Some.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A metric's value in `/metrics` (0 when absent): the series `name` with
/// every one of `labels` (`k="v"`), in whatever order they are printed.
fn metric(warden: &Instance, name: &str, labels: &[&str]) -> f64 {
    let (_, text) = warden.http_get("/metrics");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One HTTP request as the OTLP receiver saw it.
#[derive(Debug, Clone)]
struct Request {
    line: String,
    headers: HashMap<String, String>,
    body: serde_json::Value,
}

/// An OTLP/HTTP receiver: answers 200 to every request, records it.
fn otlp_receiver() -> (u16, Arc<Mutex<Vec<Request>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i);
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.split("\r\n");
            let line = lines.next().unwrap_or("").to_string();
            let headers: HashMap<String, String> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = buf[head_end + 4..].to_vec();
            while body.len() < len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            seen.lock().unwrap().push(Request {
                line,
                headers,
                body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            });
        }
    });
    (port, got)
}

/// A receiver that accepts connections and never answers.
fn stalled_receiver() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// Datagrams arriving on a unix socket bound at `path`.
fn datagram_receiver(path: &Path) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let s = UnixDatagram::bind(path).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = s.recv(&mut buf) {
            seen.lock().unwrap().push(buf[..n].to_vec());
        }
    });
    got
}

/// Fields of a journald native datagram (both value forms).
fn journal_fields(d: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = d;
    while !rest.is_empty() {
        let nl = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            rest = rest.get(nl + 1..).unwrap_or(&[]);
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let len_at = nl + 1;
            let len = u64::from_le_bytes(rest[len_at..len_at + 8].try_into().unwrap()) as usize;
            let value = &rest[len_at + 8..len_at + 8 + len];
            out.insert(name, String::from_utf8_lossy(value).into_owned());
            rest = rest.get(len_at + 8 + len + 1..).unwrap_or(&[]);
        }
    }
    out
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn is_session_event(e: &serde_json::Value) -> bool {
    e["verdict"] == "allowed" && e["destination"] == "route app-db"
}

#[test]
fn every_sink_kind_gets_events_and_audit_records() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let (otlp_port, otlp) = otlp_receiver();
    let port = free_port();
    let warden = instance(
        &pg,
        port,
        &format!(
            r#"
[export]
rate_per_workload = 1000

[[export.sink]]
kind = "file"
path = "export.jsonl"

[[export.sink]]
kind = "otlp"
endpoint = "http://127.0.0.1:{otlp_port}/v1/logs"
headers = {{ Authorization = {{ file = "otlp-token" }}, X-Scope-OrgID = "tenant-1" }}

[[export.sink]]
kind = "syslog"
address = "unix:@DIR@/syslog.sock"
facility = "local3"

[[export.sink]]
kind = "journald"
carries = ["audit"]
socket = "journal.sock"
"#
        ),
    );
    let dir = warden.dir.path().to_path_buf();
    std::fs::write(dir.join("otlp-token"), format!("Bearer {TOKEN}\n")).unwrap();
    let syslog = datagram_receiver(&dir.join("syslog.sock"));
    let journal = datagram_receiver(&dir.join("journal.sock"));
    let check = warden.run(&["config", "check"]);
    assert_eq!(check.code, 0, "config check: {check:?}");
    let mut daemon = warden.start_daemon();

    session(port);

    // The file: the session's events with verdict and ancestry, and its
    // audit records exactly as the local log holds them.
    let file = dir.join("export.jsonl");
    let lines = wait_for("the session's event and records in the file", || {
        let lines = json_lines(&file);
        let event = lines.iter().any(is_session_event);
        let end = lines.iter().any(|l| l["action"] == "session.end");
        (event && end).then_some(lines)
    });
    let mode = std::fs::metadata(&file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let me = std::process::id();
    let event = lines
        .iter()
        .find(|e| is_session_event(e) && e["workload"] == "me")
        .unwrap_or_else(|| panic!("no attested event: {lines:?}"));
    assert_eq!(
        event["exe"].as_str().map(|e| e.ends_with("psql")),
        Some(true),
        "{event}"
    );
    let chain = event["ancestry"].as_array().expect("ancestry");
    assert_eq!(
        chain[0]["pid"].as_u64(),
        Some(u64::from(me)),
        "psql's parent is this test: {event}"
    );
    let my_exe = std::env::current_exe().unwrap().display().to_string();
    assert_eq!(chain[0]["exe"].as_str(), Some(my_exe.as_str()), "{event}");
    assert!(chain.len() <= 16, "bounded: {event}");
    let pids: Vec<u64> = chain.iter().filter_map(|a| a["pid"].as_u64()).collect();
    assert_eq!(pids.len(), chain.len(), "{event}");
    assert!(
        pids.windows(2).all(|w| w[0] != w[1]),
        "each ancestor once: {event}"
    );
    let local = std::fs::read_to_string(warden.audit_log()).unwrap();
    let exported: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"hash\":"))
        .map(str::to_string)
        .collect();
    assert!(exported
        .iter()
        .any(|l| l.contains("\"action\":\"daemon.start\"")));
    assert!(exported
        .iter()
        .any(|l| l.contains("\"action\":\"session.start\"")));
    for l in &exported {
        assert!(
            local.lines().any(|x| x == l),
            "an exported record is the log's own line: {l}"
        );
    }
    // `warden events` shows the chain too.
    let text = warden.run(&["events", "-n", "1000"]);
    assert!(text.stdout.contains(" via "), "{}", text.stdout);
    let wide = warden.run(&["events", "-n", "1000", "--wide"]);
    assert!(
        wide.stdout.contains(&format!("{my_exe}[{me}]")),
        "{}",
        wide.stdout
    );
    let json = warden.run(&["events", "--json", "-n", "1000"]);
    assert!(
        json.stdout.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["ancestry"][0]["pid"].as_u64() == Some(u64::from(me))
        }),
        "{}",
        json.stdout
    );

    // OTLP: /v1/logs with the header from the file and the attributes.
    let reqs = wait_for("OTLP requests with the session", || {
        let reqs = otlp.lock().unwrap().clone();
        let body = serde_json::to_string(&reqs.iter().map(|r| &r.body).collect::<Vec<_>>()).ok()?;
        (body.contains("session.end") && body.contains("route app-db")).then_some(reqs)
    });
    for r in &reqs {
        assert_eq!(r.line, "POST /v1/logs HTTP/1.1");
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(
            r.headers.get("x-scope-orgid").map(String::as_str),
            Some("tenant-1")
        );
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
    }
    let records: Vec<&serde_json::Value> = reqs
        .iter()
        .flat_map(|r| {
            r.body["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .collect();
    let attr = |rec: &serde_json::Value, key: &str| -> Option<String> {
        rec["attributes"]
            .as_array()?
            .iter()
            .find(|a| a["key"] == key)
            .and_then(|a| a["value"]["stringValue"].as_str().map(str::to_string))
    };
    let start = records
        .iter()
        .find(|r| attr(r, "warden.action").as_deref() == Some("session.start"))
        .expect("session.start in OTLP");
    assert_eq!(attr(start, "warden.workload").as_deref(), Some("me"));
    assert_eq!(attr(start, "warden.stream").as_deref(), Some("audit"));
    assert_eq!(start["severityText"], "INFO");
    let body = start["body"]["stringValue"].as_str().unwrap();
    assert!(local.lines().any(|l| l == body), "{body}");
    let ev = records
        .iter()
        .find(|r| attr(r, "warden.verdict").as_deref() == Some("allowed"))
        .expect("an event in OTLP");
    assert_eq!(attr(ev, "warden.stream").as_deref(), Some("events"));
    assert!(attr(ev, "warden.ancestry").is_some_and(|a| a.contains(&format!("({me})"))));

    // syslog: RFC 5424 header, structured data, the record as message.
    let msgs = wait_for("syslog messages with the session", || {
        let m: Vec<String> = syslog
            .lock()
            .unwrap()
            .iter()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect();
        m.iter().any(|l| l.contains("session.end")).then_some(m)
    });
    let start = msgs
        .iter()
        .find(|m| m.contains("\"action\":\"session.start\""))
        .expect("session.start over syslog");
    // local3 (19) * 8 + info (6) = 158
    let parts: Vec<&str> = start.splitn(7, ' ').collect();
    assert_eq!(parts[0], "<158>1", "{start}");
    let ts = parts[1].as_bytes();
    assert!(
        ts.len() >= 20
            && ts[4] == b'-'
            && ts[10] == b'T'
            && ts[13] == b':'
            && parts[1].ends_with('Z'),
        "RFC 3339 timestamp in UTC: {start}"
    );
    assert!(!parts[2].is_empty() && !parts[2].contains(' '), "{start}");
    assert_eq!(parts[3], "warden");
    assert_eq!(parts[4], daemon.child.id().to_string());
    assert_eq!(parts[5], "audit");
    assert!(
        parts[6].starts_with("[warden@32473 stream=\"audit\" workload=\"me\""),
        "{start}"
    );
    assert!(start.ends_with('}'), "{start}");
    assert!(msgs
        .iter()
        .any(|m| m.contains(" event [warden@32473 stream=\"events\"")
            && m.contains("verdict=\"allowed\"")));

    // journald: native fields; this sink carries audit records only.
    let entries = wait_for("journald entries with the session", || {
        let e: Vec<HashMap<String, String>> = journal
            .lock()
            .unwrap()
            .iter()
            .map(|d| journal_fields(d))
            .collect();
        e.iter()
            .any(|f| f.get("WARDEN_ACTION").map(String::as_str) == Some("session.end"))
            .then_some(e)
    });
    let start = entries
        .iter()
        .find(|f| f.get("WARDEN_ACTION").map(String::as_str) == Some("session.start"))
        .expect("session.start in the journal");
    assert_eq!(start["WARDEN_WORKLOAD"], "me");
    assert_eq!(start["WARDEN_ROUTE"], "app-db");
    assert_eq!(start["WARDEN_DECISION"], "allow");
    assert_eq!(start["SYSLOG_IDENTIFIER"], "warden");
    assert_eq!(start["PRIORITY"], "6");
    assert!(local.lines().any(|l| l == start["WARDEN_JSON"]));
    assert!(entries.iter().all(|f| f["WARDEN_STREAM"] == "audit"));

    // Counted, and nothing secret anywhere.
    assert!(metric(&warden, "warden_export_sent_total", &["sink=\"file\""]) >= 3.0);
    assert!(metric(&warden, "warden_export_sent_total", &["sink=\"otlp\""]) >= 3.0);
    assert_eq!(
        metric(
            &warden,
            "warden_export_dropped_total",
            &["reason=\"queue_full\"", "sink=\"file\""]
        ),
        0.0
    );
    assert_eq!(daemon.stop(), Some(0));
    // A clean stop flushes the queues: the last record went out too.
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("\"action\":\"daemon.stop\""),
        "daemon.stop exported before the daemon exited"
    );
    let log = daemon.log_text();
    let everything = format!(
        "{log}{}{:?}{:?}",
        std::fs::read_to_string(&file).unwrap(),
        msgs,
        reqs.iter().map(|r| r.body.to_string()).collect::<Vec<_>>()
    );
    assert!(!everything.contains(PASSWORD));
    assert!(!log.contains(TOKEN));
}

#[test]
fn a_stalled_or_dead_receiver_never_delays_sessions() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let stalled = stalled_receiver();
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let port = free_port();
    let warden = instance(
        &pg,
        port,
        &format!(
            r#"
[export]
queue = 4
rate_per_workload = 0

[[export.sink]]
name = "stalled"
kind = "otlp"
endpoint = "http://127.0.0.1:{stalled}/v1/logs"
timeout = "2s"

[[export.sink]]
name = "dead"
kind = "otlp"
endpoint = "http://127.0.0.1:{dead}/v1/logs"
timeout = "1s"

[[export.sink]]
name = "tcp-syslog"
kind = "syslog"
address = "tcp:127.0.0.1:{dead}"
timeout = "1s"
"#
        ),
    );
    let _daemon = warden.start_daemon();
    // Every session completes while the stalled receiver holds the sink's
    // thread in a POST: the data path only queues.
    let began = Instant::now();
    for _ in 0..8 {
        session(port);
    }
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "sessions were held up: {:?}",
        began.elapsed()
    );
    wait_for("queue_full drops on the stalled sink", || {
        (metric(
            &warden,
            "warden_export_dropped_total",
            &["reason=\"queue_full\"", "sink=\"stalled\""],
        ) > 0.0)
            .then_some(())
    });
    wait_for("errors on the dead sinks", || {
        (metric(&warden, "warden_export_errors_total", &["sink=\"dead\""]) > 0.0
            && metric(
                &warden,
                "warden_export_errors_total",
                &["sink=\"tcp-syslog\""],
            ) > 0.0)
            .then_some(())
    });
    assert_eq!(
        metric(&warden, "warden_export_sent_total", &["sink=\"stalled\""]),
        0.0
    );
    // Still serving.
    session(port);
}

#[test]
fn the_rate_limit_per_workload_drops_and_counts() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let warden = instance(
        &pg,
        port,
        r#"
[export]
rate_per_workload = 1
burst = 1

[[export.sink]]
kind = "file"
path = "limited.jsonl"
carries = ["audit"]
"#,
    );
    let _daemon = warden.start_daemon();
    // Sessions side by side: their 16 records arrive within a few seconds,
    // far more than one token a second lets through.
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || session(port)))
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    wait_for("rate_limited drops", || {
        (metric(
            &warden,
            "warden_export_dropped_total",
            &["reason=\"rate_limited\"", "sink=\"file\""],
        ) > 0.0)
            .then_some(())
    });
    let file = warden.dir.path().join("limited.jsonl");
    let lines = wait_for("the exported records", || {
        let l = json_lines(&file);
        (!l.is_empty()).then_some(l)
    });
    let local = std::fs::read_to_string(warden.audit_log()).unwrap();
    let local_sessions = local
        .lines()
        .filter(|l| l.contains("\"workload\":\"me\""))
        .count();
    let exported_sessions = lines
        .iter()
        .filter(|l| l["actor"]["workload"] == "me")
        .count();
    assert!(local_sessions >= 16, "{local}");
    assert!(
        exported_sessions < local_sessions,
        "{exported_sessions} of {local_sessions} records of workload me exported"
    );
    // The daemon's own records are never limited.
    assert!(lines.iter().any(|l| l["action"] == "daemon.start"));
}

#[test]
fn config_check_and_start_name_the_export_key_and_the_fix() {
    let warden = Instance::new_with(
        "[[export.sink]]\nkind = \"otlp\"\n\n[[export.sink]]\nkind = \"journald\"\npath = \"/tmp/x\"\n",
    );
    let out = warden.run(&["config", "check"]);
    assert_eq!(out.code, 2, "{out:?}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("export.sink[0].endpoint"), "{text}");
    assert!(text.contains("http://127.0.0.1:4318/v1/logs"), "{text}");
    assert!(text.contains("export.sink[1].path"), "{text}");
    assert!(text.contains("kind = \"file\""), "{text}");

    // A header file that cannot be read stops the start, naming the key.
    let warden = Instance::new_with(
        "[[export.sink]]\nkind = \"otlp\"\nendpoint = \"http://127.0.0.1:9/v1/logs\"\nheaders = { Authorization = { file = \"missing-token\" } }\n",
    );
    warden.run(&["config", "check"]).ok();
    warden.run(&["init"]).ok();
    let log = warden.dir.path().join("up.log");
    let mut child = warden
        .command(&["up"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("warden up started without its header file");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("export.sink[0].headers.Authorization") && stderr.contains("missing-token"),
        "{stderr}"
    );
}
