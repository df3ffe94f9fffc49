//! Fleet views, through real daemons on one throwaway PostgreSQL store:
//!
//! - three nodes; sessions through node 1 and node 2 show up in `warden
//!   audit tail --fleet` on node 3, each line naming its node, and `audit
//!   verify --fleet` finds every node's chain intact; a record changed in the
//!   store is reported as tampered;
//! - with the eBPF monitor (as root), node 1's access events show up in
//!   `warden events --fleet` on node 3, naming node 1;
//! - a freeze made on node 2 is listed by `warden frozen` on every node with
//!   the nodes that applied it; a node whose daemon is stopped is listed as
//!   not having applied a newer one, a removed node as removed;
//! - the store's database is stopped, sessions go through node 1 meanwhile
//!   (their records are only in its local log, and the lag shows in
//!   `/readyz`, `warden status` and the metrics), the database is started
//!   again, and every record written during the outage arrives in the store
//!   with no operator action, the chain intact;
//! - `--fleet` on a single node's SQLite store is refused, saying why.

use std::time::{Duration, Instant};
use warden_tests::fleet::{join, works, NodeSpec, STORE_DB};
use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::prom::sample;
use warden_tests::{free_port, is_root, Instance, Output};

const STORE_PASSWORD: &str = "views-store-PW-3f1a";
const PASSWORD: &str = "views-app-PW-CANARY-8c2d";
/// No eBPF monitor.
const OFF: &str = "ebpf = \"off\"";

/// The store database `fleet` (role `warden`) on `pg`, and its password file.
fn store_on(pg: &PgCluster) -> tempfile::TempDir {
    warden_tests::fleet::store_on(pg, STORE_PASSWORD)
}

/// Frozen in the test: no process runs as this uid, so a freeze applied by
/// node 1's eBPF monitor denies nothing (as root, "me" would be every root
/// process on the host, the other nodes' daemons too).
const IDLE: &str = r#"
[[workload]]
name = "idle"
spiffe_id = "spiffe://example.org/idle"
selectors = { uid = 4242 }
"#;

fn node(
    store: &PgCluster,
    pw: &tempfile::TempDir,
    app: &PgCluster,
    port: u16,
    monitor: &str,
) -> Instance {
    NodeSpec {
        url_query: "?connect_timeout=2",
        before: IDLE,
        monitor,
        ..NodeSpec::new(port, app.port, store.port, pw.path())
    }
    .instance()
}

fn session(port: u16) -> Output {
    run_psql(
        &format!("host=127.0.0.1 port={port} dbname=app user=legacy connect_timeout=5"),
        "select current_user from pg_sleep(0.2)",
    )
}

/// Polls `check` every 200 ms until it returns None; panics with `what` and
/// the last answer after `limit`.
fn wait(limit: Duration, what: &str, check: impl FnMut() -> Option<String>) {
    warden_tests::fleet::wait(limit, Duration::from_millis(200), what, check)
}

/// The node names the store knows (`warden node list --json`), for `inst`.
fn name_of(any: &Instance, inst: &Instance) -> String {
    let out = any.run(&["--json", "node", "list"]);
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let tag = inst
        .dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .find(|n| n.contains(&tag))
        .unwrap_or_else(|| panic!("no node of {tag} in {v}"))
        .to_string()
}

fn id_of(any: &Instance, name: &str) -> String {
    let out = any.run(&["--json", "node", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["id"].as_str())
        .unwrap()
        .to_string()
}

fn local_count(inst: &Instance, action: &str) -> usize {
    std::fs::read_to_string(inst.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"action\":\"{action}\"")))
        .count()
}

fn local_records(inst: &Instance) -> usize {
    std::fs::read_to_string(inst.audit_log())
        .unwrap_or_default()
        .lines()
        .count()
}

/// Records of `name` in the store, straight from the table.
fn stored_count(store: &PgCluster, name: &str, action: &str) -> usize {
    store
        .psql_admin_in(
            STORE_DB,
            &format!(
                "SELECT count(*) FROM audit_records WHERE node = '{name}' AND line LIKE '%\"action\":\"{action}\"%'"
            ),
        )
        .trim()
        .parse()
        .unwrap()
}

/// The `frozen` lines under the entry: label → node list text.
fn frozen_line<'a>(out: &'a str, label: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.trim_start().strip_prefix(label))
}

#[test]
fn every_node_sees_the_fleet_audit_events_and_freezes() {
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    let pw = store_on(&pg);
    pg.create_role("app", PASSWORD);
    // As root, node 1 runs the eBPF monitor (auto: without it the events
    // part is skipped, said below).
    let monitor1 = if is_root() {
        "ebpf = \"auto\"\nprotect_upstreams = \"off\""
    } else {
        OFF
    };
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let n1 = node(&pg, &pw, &pg, p1, monitor1);
    let n2 = node(&pg, &pw, &pg, p2, OFF);
    let n3 = node(&pg, &pw, &pg, p3, OFF);
    n1.run(&["init"]).ok();
    join(&n1, &n2);
    join(&n1, &n3);
    n1.put("app-db/app", PASSWORD.as_bytes()).ok();
    let _d1 = n1.start_daemon();
    let mut d2 = n2.start_daemon();
    let mut d3 = n3.start_daemon();
    let (name1, name2, name3) = (name_of(&n1, &n1), name_of(&n1, &n2), name_of(&n1, &n3));

    // Each daemon ships on a connection of its own, named for it.
    wait(Duration::from_secs(20), "three shipper connections", || {
        let n = pg.psql_admin_in(
            STORE_DB,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'warden-shipper'",
        );
        (n.trim() != "3").then_some(n)
    });

    // Sessions on node 1 and node 2.
    for port in [p1, p2, p1] {
        let out = session(port);
        assert!(works(&out), "{out:?}");
    }

    // Node 3 sees both nodes' session records, each line naming its node.
    wait(
        Duration::from_secs(30),
        "sessions of nodes 1 and 2 in audit tail --fleet on node 3",
        || {
            let out = n3.run(&["audit", "tail", "--fleet", "-n", "500"]);
            let starts = |name: &str| {
                out.stdout
                    .lines()
                    .filter(|l| l.starts_with(&format!("[{name}] ")) && l.contains("session.start"))
                    .count()
            };
            (out.code != 0 || starts(&name1) < 2 || starts(&name2) < 1).then(|| format!("{out:?}"))
        },
    );
    // JSON: the node and the record as written.
    let out = n3.run(&["--json", "audit", "tail", "--fleet", "-n", "500"]);
    assert_eq!(out.code, 0, "{out:?}");
    let rows: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |name: &str| {
        rows.iter()
            .filter(|r| r["node"] == name)
            .map(|r| r["record"]["seq"].as_u64().unwrap())
            .collect::<Vec<u64>>()
    };
    // Every record of node 1 so far, in order (merged by time, one node's
    // records keep their order); node 3's own daemon.start too.
    let seqs1 = of(&name1);
    assert!(seqs1.len() >= 3, "{rows:?}");
    assert!(seqs1.windows(2).all(|w| w[1] == w[0] + 1), "{seqs1:?}");
    assert!(!of(&name3).is_empty(), "{rows:?}");
    let times: Vec<&str> = rows
        .iter()
        .map(|r| r["record"]["time"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "merged by time");
    assert!(!out.stdout.contains(PASSWORD));
    // No secret value in the copy or the event summaries.
    for table in ["audit_records", "access_events"] {
        let n = pg.psql_admin_in(
            STORE_DB,
            &format!("SELECT count(*) FROM {table} WHERE {table}::text LIKE '%{PASSWORD}%'"),
        );
        assert_eq!(n.trim(), "0", "{table}");
    }
    // -n limits the lines.
    let out = n3.run(&["audit", "tail", "--fleet", "-n", "2"]);
    assert_eq!(out.stdout.lines().count(), 2, "{out:?}");

    // Every chain verifies in the store.
    let out = n2.run(&["audit", "verify", "--fleet"]);
    assert_eq!(out.code, 0, "{out:?}");
    for name in [&name1, &name2, &name3] {
        assert!(
            out.stdout.contains(&format!("node {name}: ")) && !out.stdout.contains("TAMPERED"),
            "{out:?}"
        );
    }

    // --follow prints records shipped after it started.
    let mut follow = n3
        .command(&["audit", "tail", "--fleet", "-n", "0", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let out = session(p2);
    assert!(works(&out), "{out:?}");
    let mut stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(&mut stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let mut followed = Vec::new();
    while !followed
        .iter()
        .any(|l: &String| l.starts_with(&format!("[{name2}] ")) && l.contains("session.start"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "follow printed {followed:?}"
        );
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            followed.push(l);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();

    // Access events of node 1 (eBPF monitor) on node 3.
    let (_, metrics1) = n1.http_get("/metrics");
    if metrics1.contains("warden_monitor_mode{mode=\"ebpf\"} 1") {
        wait(
            Duration::from_secs(30),
            "node 1's events in events --fleet on node 3",
            || {
                let out = n3.run(&["events", "--fleet", "-n", "1000"]);
                let seen = out
                    .stdout
                    .lines()
                    .any(|l| l.starts_with(&format!("[{name1}] ")) && l.contains("route app-db"));
                (out.code != 0 || !seen).then(|| format!("{out:?}"))
            },
        );
        let out = n3.run(&["--json", "events", "--fleet", "-n", "1000"]);
        let ev: serde_json::Value =
            serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
        assert!(
            ev["node"].is_string() && ev["event"]["verdict"].is_string(),
            "{ev}"
        );
        // The node's own view is unchanged.
        let own = n1.run(&["events", "-n", "1000"]);
        assert_eq!(own.code, 0, "{own:?}");
        assert!(own.stdout.contains("route app-db") && !own.stdout.contains(&format!("[{name1}]")));
    } else {
        eprintln!("events --fleet: skipped (no eBPF monitor on node 1)");
    }

    // A freeze on node 2: `frozen` on node 1 names the nodes that applied it.
    n2.run(&["freeze", "idle", "--reason", "views test"]).ok();
    wait(
        Duration::from_secs(20),
        "the freeze applied on all three nodes",
        || {
            let out = n1.run(&["frozen"]);
            let applied = frozen_line(&out.stdout, "applied on:").unwrap_or("");
            ([&name1, &name2, &name3]
                .iter()
                .any(|n| !applied.contains(n.as_str())))
            .then(|| format!("{out:?}"))
        },
    );
    let out = n3.run(&["--json", "frozen"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let nodes = v[0]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{v}");
    assert!(
        nodes
            .iter()
            .all(|n| n["state"] == "applied" && n["applied_at"].is_string()),
        "{v}"
    );

    // Node 2's daemon stops; a new freeze (unfreeze, freeze again) is not
    // applied there until it runs again.
    assert_eq!(d2.stop(), Some(0));
    n1.run(&["unfreeze", "idle"]).ok();
    n1.run(&["freeze", "idle", "--reason", "again"]).ok();
    wait(
        Duration::from_secs(20),
        "node 2 listed as not having applied the new freeze",
        || {
            let out = n3.run(&["frozen"]);
            let pending = frozen_line(&out.stdout, "not yet on:").unwrap_or("");
            let applied = frozen_line(&out.stdout, "applied on:").unwrap_or("");
            (!pending.contains(&name2) || !applied.contains(&name1) || !applied.contains(&name3))
                .then(|| format!("{out:?}"))
        },
    );
    let d2 = n2.start_daemon();
    wait(
        Duration::from_secs(20),
        "node 2 applied it after its start",
        || {
            let out = n3.run(&["frozen"]);
            let applied = frozen_line(&out.stdout, "applied on:").unwrap_or("");
            (!applied.contains(&name2)).then(|| {
                format!(
                    "{out:?}\nacks: {}\nnode 2: {}",
                    pg.psql_admin_in(STORE_DB, "SELECT * FROM freeze_acks"),
                    d2.log_text()
                )
            })
        },
    );

    // Node 3 removed: listed as removed.
    let id3 = id_of(&n1, &name3);
    n1.run(&["node", "remove", &id3]).ok();
    let _ = d3.stop();
    let out = n1.run(&["frozen"]);
    let removed = frozen_line(&out.stdout, "removed:").unwrap_or("");
    assert!(removed.contains(&name3), "{out:?}");
    n1.run(&["unfreeze", "idle"]).ok();

    // A record changed in the store is found by verify --fleet.
    pg.psql_admin_in(
        STORE_DB,
        &format!(
            "UPDATE audit_records SET line = replace(line, '\"reason\":\"', '\"reason\":\"x') WHERE node = '{name2}' AND seq = 2"
        ),
    );
    let out = n1.run(&["audit", "verify", "--fleet"]);
    assert_eq!(out.code, 6, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("node {name2}: TAMPERED: record #2")),
        "{out:?}"
    );
    assert!(out.stdout.contains(&format!("node {name1}: ")), "{out:?}");
}

#[test]
fn records_written_while_the_store_is_down_arrive_when_it_is_back() {
    let store = PgCluster::start(ClusterOptions::new(Auth::Scram));
    let pw = store_on(&store);
    let app = PgCluster::start(ClusterOptions::new(Auth::Scram));
    app.create_role("app", PASSWORD);
    let (p1, p2) = (free_port(), free_port());
    let n1 = node(&store, &pw, &app, p1, OFF);
    let n2 = node(&store, &pw, &app, p2, OFF);
    n1.run(&["init"]).ok();
    join(&n1, &n2);
    n1.put("app-db/app", PASSWORD.as_bytes()).ok();
    let d1 = n1.start_daemon();
    let _d2 = n2.start_daemon();
    let name1 = name_of(&n2, &n1);
    let out = session(p1);
    assert!(works(&out), "{out:?}");
    wait(
        Duration::from_secs(20),
        "node 1 up to date in the store",
        || {
            let local = local_count(&n1, "session.start");
            let stored = stored_count(&store, &name1, "session.start");
            (stored != local).then(|| format!("local {local}, stored {stored}"))
        },
    );

    // The store goes down; sessions go on (cached credential), recorded locally.
    store.halt();
    wait(Duration::from_secs(15), "node 1 sees the outage", || {
        let (code, body) = n1.http_get("/readyz");
        (code != 503).then(|| format!("{code} {body}"))
    });
    let before = local_count(&n1, "session.start");
    for _ in 0..5 {
        let out = session(p1);
        assert!(works(&out), "{out:?}\n{}", d1.log_text());
    }
    assert_eq!(local_count(&n1, "session.start"), before + 5);
    // The lag shows: /readyz, status, metrics.
    wait(Duration::from_secs(15), "the lag in /readyz", || {
        let (_, body) = n1.http_get("/readyz");
        (!body.contains("audit copy in the store: ") || !body.contains("record(s) behind"))
            .then_some(body)
    });
    let (_, metrics) = n1.http_get("/metrics");
    assert!(
        sample(&metrics, "warden_audit_ship_lag_records").is_some_and(|n| n >= 5.0),
        "{metrics}"
    );
    let status = n1.run(&["status"]);
    assert!(
        status.stdout.contains("audit copy:") && status.stdout.contains("record(s) behind"),
        "{status:?}"
    );

    // The store returns: the records arrive by themselves, chain intact.
    store.resume();
    wait(
        Duration::from_secs(60),
        "the outage's records in the store",
        || {
            let local = local_records(&n1);
            let stored: usize = store
                .psql_admin_in(
                    STORE_DB,
                    &format!("SELECT count(*) FROM audit_records WHERE node = '{name1}'"),
                )
                .trim()
                .parse()
                .unwrap_or(0);
            (stored < local).then(|| format!("local {local}, stored {stored}"))
        },
    );
    assert_eq!(
        stored_count(&store, &name1, "session.start"),
        local_count(&n1, "session.start")
    );
    // Byte for byte what node 1 wrote, in its order.
    let stored_lines = store.psql_admin_in(
        STORE_DB,
        &format!("SELECT line FROM audit_records WHERE node = '{name1}' ORDER BY seq"),
    );
    let local_text = std::fs::read_to_string(n1.audit_log()).unwrap();
    let local_lines: Vec<&str> = local_text.lines().collect();
    let stored_lines: Vec<&str> = stored_lines.lines().collect();
    assert_eq!(&local_lines[..stored_lines.len()], &stored_lines[..]);
    let out = n2.run(&["audit", "verify", "--fleet"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!("node {name1}: ")) && out.stdout.contains("chain intact"),
        "{out:?}"
    );
    wait(Duration::from_secs(15), "no lag once shipped", || {
        let (_, body) = n1.http_get("/readyz");
        (!body.contains("audit copy in the store: up to date")).then_some(body)
    });
    assert_eq!(metric_of(&n1, "warden_audit_ship_lag_records"), Some(0.0));
    assert!(metric_of(&n1, "warden_audit_shipped_records_total").is_some_and(|n| n >= 5.0));
    assert!(
        metric_of(&n1, "warden_fleet_ship_errors_total{what=\"audit\"}").is_some_and(|n| n >= 1.0)
            || metric_of(&n1, "warden_fleet_ship_errors_total{what=\"connect\"}")
                .is_some_and(|n| n >= 1.0)
    );
    // On node 2, the outage's sessions are in the fleet's tail.
    let out = n2.run(&["audit", "tail", "--fleet", "-n", "1000"]);
    let starts = out
        .stdout
        .lines()
        .filter(|l| l.starts_with(&format!("[{name1}] ")) && l.contains("session.start"))
        .count();
    assert_eq!(starts, local_count(&n1, "session.start"), "{out:?}");
    assert!(!d1.log_text().contains(PASSWORD));
}

fn metric_of(inst: &Instance, series: &str) -> Option<f64> {
    let (code, text) = inst.http_get("/metrics");
    assert_eq!(code, 200, "{text}");
    sample(&text, series)
}

#[test]
fn fleet_views_need_the_postgres_store() {
    let single = Instance::initialised();
    for args in [
        &["audit", "tail", "--fleet"][..],
        &["audit", "verify", "--fleet"][..],
        &["events", "--fleet"][..],
    ] {
        let out = single.run(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("needs the PostgreSQL store")
                && out.stderr.contains("without --fleet"),
            "{out:?}"
        );
    }
    // `frozen` on a single node: as before.
    let out = single.run(&["frozen"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "no workload is frozen");
}
