//! Fleet mode on one PostgreSQL store, through real daemons: two warden
//! nodes (separate data dirs, admin sockets and route ports; the eBPF
//! monitor off) share a store, and
//!
//! - a `secret put` on node 1 is used by the next session through node 2,
//!   whose route caches credentials for ten minutes — only propagation can
//!   explain it (the time it took is printed);
//! - `secret rm` on node 2 refuses node 1's next session;
//! - a freeze on node 2 refuses the workload's next session on node 1, an
//!   unfreeze on node 1 lets node 2 serve it again;
//! - a change made while a node's listener is cut off (its backend
//!   terminated, reconnection held back) reaches it by the reconciliation
//!   when it reconnects;
//! - a rotation due on both nodes at once runs on exactly one;
//! - a node killed mid-rotation holds its claim until it lapses; then the
//!   other node finishes that rotation with the crash-safe steps;
//! - a node joins with a single-use token (replays, expired and mistyped
//!   tokens refused and audited; no key material in the store), each node
//!   signs SVIDs with its own intermediate under the one root, and workloads
//!   of the two nodes verify each other (`openssl verify`, an mTLS
//!   handshake); a removed node stops, cannot start, and its SVIDs are
//!   refused by the other node's mTLS server route;
//! - fleets whose master key is a systemd credential or Shamir shares join
//!   without a key file;
//! - a lease revoked on one node is revoked by the node holding it.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};
use warden_tests::fleet::{join, store_on, works, NodeSpec, STORE_DB};
use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, Daemon, Instance, Output};

const STORE_PASSWORD: &str = "fleet-store-PW-9d3e";
const PASSWORD: &str = "fleet-app-PW-CANARY-41b2";

/// One cluster: the store database `fleet` (role `warden`) and the route's
/// upstream database `app` (role `app`).
struct Cluster {
    pg: PgCluster,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
        let dir = store_on(&pg, STORE_PASSWORD);
        pg.create_role("app", PASSWORD);
        Cluster { pg, dir }
    }

    /// A node's configuration: route `app-db` on its own port, `extra`
    /// (more tables), the shared `[store]`, no eBPF monitor.
    fn node(&self, route_port: u16, extra: &str) -> Instance {
        NodeSpec {
            extra,
            ..NodeSpec::new(route_port, self.pg.port, self.pg.port, self.dir.path())
        }
        .instance()
    }

    fn sql(&self, sql: &str) -> String {
        self.pg.psql_admin_in(STORE_DB, sql)
    }
}

fn session(port: u16) -> Output {
    run_psql(
        &format!("host=127.0.0.1 port={port} dbname=app user=legacy connect_timeout=5"),
        "select current_user",
    )
}

/// Runs sessions through `port` until `done` says one shows the change;
/// returns how long that took. Panics after `limit`.
fn until(port: u16, limit: Duration, what: &str, done: impl Fn(&Output) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let out = session(port);
        if done(&out) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: not seen within {limit:?}; last session: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn changes_on_one_node_apply_on_the_other() {
    let c = Cluster::start();
    let (port1, port2) = (free_port(), free_port());
    let node1 = c.node(port1, "");
    let node2 = c.node(port2, "");
    node1.run(&["init"]).ok();
    join(&node1, &node2);
    node1.put("app-db/app", PASSWORD.as_bytes()).ok();
    let mut d1 = node1.start_daemon();
    let mut d2 = node2.start_daemon();
    for port in [port1, port2] {
        let out = session(port);
        assert!(works(&out), "{out:?}");
    }

    // A put on node 1 (a wrong value, so its use shows): node 2's next
    // session logs in with it although its cache entry has 10 minutes left.
    node1.put("app-db/app", b"not-the-password").ok();
    let took = until(
        port2,
        Duration::from_secs(30),
        "put on node 1 used by node 2",
        |o| o.code != 0 && o.stderr.contains("app-db/app v2"),
    );
    println!(
        "propagation: secret put on node 1 → used by node 2 after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The right value again, through node 2: node 1 uses it.
    node2.put("app-db/app", PASSWORD.as_bytes()).ok();
    let took = until(
        port1,
        Duration::from_secs(30),
        "put on node 2 used by node 1",
        works,
    );
    println!(
        "propagation: secret put on node 2 → used by node 1 after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // rm on node 2: node 1 refuses the next session, naming the secret.
    node2.run(&["secret", "rm", "app-db/app"]).ok();
    let took = until(
        port1,
        Duration::from_secs(30),
        "rm on node 2 refused on node 1",
        |o| {
            o.code != 0
                && o.stderr.contains("no credential for route \"app-db\"")
                && o.stderr.contains("app-db/app")
        },
    );
    println!(
        "propagation: secret rm on node 2 → refused on node 1 after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    node1.put("app-db/app", PASSWORD.as_bytes()).ok();
    until(port1, Duration::from_secs(10), "put back", works);
    until(port2, Duration::from_secs(10), "put back", works);

    // A freeze on node 2 refuses the workload on node 1.
    node2
        .run(&["freeze", "me", "--reason", "fleet freeze test"])
        .ok();
    let took = until(
        port1,
        Duration::from_secs(30),
        "freeze on node 2 refused on node 1",
        |o| o.code != 0 && o.stderr.contains("is frozen") && o.stderr.contains("fleet freeze test"),
    );
    println!(
        "propagation: freeze on node 2 → refused on node 1 after {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let frozen = node1.run(&["frozen"]);
    frozen.ok().stdout_has("fleet freeze test");
    // Lifted on node 1: node 2 serves it again.
    node1.run(&["unfreeze", "me"]).ok();
    let took = until(
        port2,
        Duration::from_secs(30),
        "unfreeze on node 1 on node 2",
        works,
    );
    println!(
        "propagation: unfreeze on node 1 → served on node 2 after {} ms",
        took.as_millis()
    );
    until(port1, Duration::from_secs(10), "unfrozen on node 1", works);

    // Cut both listeners off: their backends terminated, new connections to
    // the store database refused for now (the daemons' own store
    // connections stay).
    c.pg.psql_admin(&format!(
        "ALTER DATABASE {STORE_DB} ALLOW_CONNECTIONS false"
    ));
    let cut = c.pg.psql_admin(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'warden-listener'",
    );
    assert_eq!(cut.trim(), "2", "one listener per node");
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile a change on node 1, which node 2 cannot hear of.
    node1.put("app-db/app", b"changed-while-cut-off").ok();
    std::thread::sleep(Duration::from_millis(500));
    let out = session(port2);
    assert!(
        works(&out),
        "node 2 still serves its cached value while cut off: {out:?}"
    );
    // Connections allowed again: node 2's listener reconnects and the
    // reconciliation sees the counter moved.
    c.pg.psql_admin(&format!("ALTER DATABASE {STORE_DB} ALLOW_CONNECTIONS true"));
    let took = until(
        port2,
        Duration::from_secs(30),
        "reconciliation after reconnect",
        |o| o.code != 0 && o.stderr.contains("app-db/app v"),
    );
    println!(
        "reconciliation: a change made while node 2's listener was cut off applied {} ms after connections were allowed again",
        took.as_millis()
    );
    let log2 = d2.log_text();
    assert!(log2.contains("change listener reconnected"), "{log2}");
    assert!(
        log2.contains("reconciliation: the store's change counter"),
        "{log2}"
    );
    let listeners = c.pg.psql_admin(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'warden-listener'",
    );
    assert_eq!(listeners.trim(), "2", "both listeners are back");

    // No value in a notification, a log or an audit record.
    for d in [&d1, &d2] {
        let log = d.log_text();
        assert!(!log.contains(PASSWORD) && !log.contains("not-the-password"));
    }
    assert_eq!(d1.stop(), Some(0), "{}", d1.log_text());
    assert_eq!(d2.stop(), Some(0), "{}", d2.log_text());
    for node in [&node1, &node2] {
        node.run(&["audit", "verify"]).ok();
        let audit = std::fs::read_to_string(node.audit_log()).unwrap();
        assert!(!audit.contains(PASSWORD) && !audit.contains("changed-while-cut-off"));
    }
}

#[test]
fn a_rotation_due_on_two_nodes_runs_on_one() {
    let c = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("rotations.log");
    let hook = dir.path().join("hook.sh");
    // Slow enough (6 s) that both nodes' 5 s ticks fall inside it.
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1\" >> {ran}\nsleep 6\ncat > /dev/null\n",
            ran = ran.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = |node: &str| {
        format!(
            "[[secret]]\nname = \"svc/token\"\nrotation_period = \"1m\"\nrotate = {{ method = \"exec\", command = [\"{}\", \"{node}\"] }}\n",
            hook.display()
        )
    };
    let node1 = c.node(free_port(), &secret("node1"));
    let node2 = c.node(free_port(), &secret("node2"));
    node1.run(&["init"]).ok();
    join(&node1, &node2);
    node1.put("svc/token", b"first-token-value").ok();
    // Due now on both nodes.
    c.sql(
        "UPDATE secret_versions SET created_at = '2020-01-01T00:00:00Z' WHERE name = 'svc/token'",
    );
    let mut d1 = node1.start_daemon();
    let mut d2 = node2.start_daemon();
    let t0 = Instant::now();
    let latest = || -> String {
        c.sql("SELECT max(version) FROM secret_versions WHERE name = 'svc/token' AND env = 'prod'")
    };
    while latest().trim() != "2" {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "no rotation: {}\n{}",
            d1.log_text(),
            d2.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Long enough for a second rotation to start and finish (hook 6 s, tick
    // 5 s), well before the next period (1 min).
    std::thread::sleep(Duration::from_secs(14));
    assert_eq!(latest().trim(), "2");
    let hooks = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(hooks.lines().count(), 1, "the hook ran once: {hooks}");
    let committed: usize = [&node1, &node2]
        .iter()
        .map(|n| {
            std::fs::read_to_string(n.audit_log())
                .unwrap()
                .lines()
                .filter(|l| l.contains("\"action\":\"secret.rotate\"") && l.contains("\"allow\""))
                .count()
        })
        .sum();
    assert_eq!(committed, 1, "one rotation record across both nodes");
    assert_eq!(
        c.sql("SELECT count(*) FROM claims").trim(),
        "0",
        "the claim is released"
    );
    assert_eq!(d1.stop(), Some(0), "{}", d1.log_text());
    assert_eq!(d2.stop(), Some(0), "{}", d2.log_text());
}

/// `warden up` for `node` with `WARDEN_FAULT_POINT=point` (debug builds stop
/// there until killed).
fn start_stopping_at(node: &Instance, point: &str) -> Daemon {
    let log = node.dir.path().join("daemon.log");
    let logf = std::fs::File::create(&log).unwrap();
    let errf = logf.try_clone().unwrap();
    let child = node
        .command(&["up"])
        .env("WARDEN_LOG", "info")
        .env("WARDEN_FAULT_POINT", point)
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(errf)
        .spawn()
        .unwrap();
    Daemon { child, log }
}

fn wait_for(limit: Duration, what: &str, log: &Daemon, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < limit,
            "{what}: not within {limit:?}; log: {}",
            log.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_rotation_of_a_killed_node_is_finished_by_another_after_its_claim_lapses() {
    let c = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("rotations.log");
    let hook = dir.path().join("hook.sh");
    // Each run appends its node's name and keeps the value it was given.
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1\" >> {ran}\ncat > {dir}/value.$1\n",
            ran = ran.display(),
            dir = dir.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    // timeout 1s: the claim lasts 2 × 1 s + 60 s.
    let secret = |node: &str| {
        format!(
            "[[secret]]\nname = \"svc/token\"\nrotation_period = \"1m\"\nrotate = {{ method = \"exec\", command = [\"{}\", \"{node}\"], timeout = \"1s\" }}\n",
            hook.display()
        )
    };
    let node1 = c.node(free_port(), &secret("node1"));
    let node2 = c.node(free_port(), &secret("node2"));
    node1.run(&["init"]).ok();
    join(&node1, &node2);
    node1.put("svc/token", b"first-token-value").ok();
    c.sql(
        "UPDATE secret_versions SET created_at = '2020-01-01T00:00:00Z' WHERE name = 'svc/token'",
    );
    let versions = || c.sql("SELECT max(version) FROM secret_versions WHERE name = 'svc/token'");

    // Node 1 rotates, changes the upstream (the hook ran) and stops before
    // committing, holding the claim.
    let mut d1 = start_stopping_at(&node1, "rotate.upstream_changed");
    wait_for(
        Duration::from_secs(40),
        "node 1 at the fault point",
        &d1,
        || {
            d1.log_text()
                .contains("fault point rotate.upstream_changed reached")
        },
    );
    let claimed_at = Instant::now();
    assert_eq!(
        c.sql("SELECT count(*) FROM secret_versions WHERE name = 'warden/rotation/svc/token'")
            .trim(),
        "1",
        "the pending value is stored"
    );
    // Node 2 runs meanwhile; killed, node 1 never releases its claim.
    let mut d2 = node2.start_daemon();
    let _ = d1.child.kill(); // SIGKILL
    let _ = d1.child.wait();
    // While the claim lasts, node 2 leaves the rotation alone.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(versions().trim(), "1", "{}", d2.log_text());
    assert_eq!(std::fs::read_to_string(&ran).unwrap().trim(), "node1");
    // After it lapses, node 2 claims the job and finishes the rotation with
    // the crash-safe steps: the hook re-run with the pending value, which
    // is committed as version 2 — one new version, not two.
    wait_for(
        Duration::from_secs(120),
        "node 2 finishes the rotation",
        &d2,
        || versions().trim() == "2",
    );
    let finished_after = claimed_at.elapsed();
    println!(
        "a killed node's rotation finished by another node {} s after the claim was taken",
        finished_after.as_secs()
    );
    assert!(
        finished_after >= Duration::from_secs(55),
        "{finished_after:?}"
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(versions().trim(), "2", "no second rotation");
    let hooks = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(
        hooks.lines().collect::<Vec<_>>(),
        ["node1", "node2"],
        "{hooks}"
    );
    let given1 = std::fs::read(dir.path().join("value.node1")).unwrap();
    let given2 = std::fs::read(dir.path().join("value.node2")).unwrap();
    assert_eq!(
        given1, given2,
        "the recovery re-ran the hook with the pending value"
    );
    let stored = node2.run(&["secret", "get", "svc/token", "--reveal"]);
    assert_eq!(stored.ok().stdout.as_bytes(), &given2[..]);
    assert_eq!(
        c.sql("SELECT count(*) FROM secret_versions WHERE name = 'warden/rotation/svc/token'")
            .trim(),
        "0",
        "the pending value is gone"
    );
    let audit = std::fs::read_to_string(node2.audit_log()).unwrap();
    assert!(
        audit.contains("recovered an interrupted rotation"),
        "{audit}"
    );
    assert_eq!(d2.stop(), Some(0), "{}", d2.log_text());
}

// ---- one trust domain, joining with a token, removal ------------------------

/// openssl with `args` in `dir`; the output (success or not).
fn openssl(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) is required")
}

/// DER → PEM through openssl (`kind` x509 or pkey).
fn to_pem(dir: &std::path::Path, kind: &str, der: &[u8]) -> String {
    let input = dir.join("in.der");
    std::fs::write(&input, der).unwrap();
    let out = openssl(dir, &[kind, "-inform", "DER", "-in", "in.der"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// What a workload of one node received through its Workload API.
struct Fetched {
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    key: Vec<u8>,
    bundle: Vec<Vec<u8>>,
}

fn fetch_svid(node: &Instance) -> Fetched {
    let endpoint = format!("unix:{}", node.dir.path().join("workload.sock").display());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .unwrap();
        let svid = client.fetch_x509_svid().await.unwrap();
        assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/me");
        let bundles = client.fetch_x509_bundles().await.unwrap();
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        Fetched {
            leaf: svid.leaf().as_bytes().to_vec(),
            intermediates: svid.cert_chain()[1..]
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
            key: svid.private_key().as_ref().to_vec(),
            bundle: bundles
                .get(&td)
                .expect("bundle for example.org")
                .authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
        }
    })
}

/// Writes a node's SVID as `<tag>-leaf.pem`, `<tag>-chain.pem` (its
/// intermediate), `<tag>-key.pem` and `<tag>-bundle.pem` in `dir`.
fn write_pems(dir: &std::path::Path, tag: &str, f: &Fetched) {
    std::fs::write(
        dir.join(format!("{tag}-leaf.pem")),
        to_pem(dir, "x509", &f.leaf),
    )
    .unwrap();
    let chain: String = f
        .intermediates
        .iter()
        .map(|c| to_pem(dir, "x509", c))
        .collect();
    std::fs::write(dir.join(format!("{tag}-chain.pem")), chain).unwrap();
    std::fs::write(
        dir.join(format!("{tag}-key.pem")),
        to_pem(dir, "pkey", &f.key),
    )
    .unwrap();
    let bundle: String = f.bundle.iter().map(|c| to_pem(dir, "x509", c)).collect();
    std::fs::write(dir.join(format!("{tag}-bundle.pem")), bundle).unwrap();
}

/// An mTLS handshake between node `server`'s workload (openssl s_server with
/// its SVID) and node `client`'s (s_client with its own), each trusting only
/// the bundle its own node served. True when both sides verified the other.
fn mtls(dir: &std::path::Path, server: &str, client: &str) -> bool {
    let port = free_port().to_string();
    let mut srv = std::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_server",
            "-accept",
            &port,
            "-naccept",
            "1",
            "-verify_return_error",
        ])
        .args(["-Verify", "3"])
        .args(["-cert", &format!("{server}-leaf.pem")])
        .args(["-key", &format!("{server}-key.pem")])
        .args(["-cert_chain", &format!("{server}-chain.pem")])
        .args(["-CAfile", &format!("{server}-bundle.pem")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let out = loop {
        std::thread::sleep(Duration::from_millis(200));
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-verify_return_error", "-verify", "3", "-brief"])
            .args(["-cert", &format!("{client}-leaf.pem")])
            .args(["-key", &format!("{client}-key.pem")])
            .args(["-cert_chain", &format!("{client}-chain.pem")])
            .args(["-CAfile", &format!("{client}-bundle.pem")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if !text.contains("Connection refused") || t0.elapsed() > Duration::from_secs(10) {
            break out;
        }
    };
    let _ = srv.kill();
    let srv_out = srv.wait_with_output().unwrap();
    let client_text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let server_text = String::from_utf8_lossy(&srv_out.stderr).into_owned()
        + &String::from_utf8_lossy(&srv_out.stdout);
    let ok = client_text.contains("Verification: OK")
        && client_text.contains("CONNECTION ESTABLISHED")
        && server_text.contains("Client certificate")
        && !server_text.contains("verify error");
    if !ok {
        println!("mTLS {client} → {server}: client: {client_text}\nserver: {server_text}");
    }
    ok
}

/// What node `tag`'s workload reads through an mTLS server route on `port`
/// (s_client with its SVID; stdout and stderr).
fn through_mtls_route(dir: &std::path::Path, port: u16, tag: &str) -> String {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-quiet",
        ])
        .args(["-cert", &format!("{tag}-leaf.pem")])
        .args(["-key", &format!("{tag}-key.pem")])
        .args(["-cert_chain", &format!("{tag}-chain.pem")])
        .args(["-CAfile", &format!("{tag}-bundle.pem")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn token_of(out: &Output) -> String {
    let t = out.stdout.trim().to_string();
    assert!(t.starts_with("wj1."), "{out:?}");
    t
}

const IDENTITY: &str = "\n[identity]\nworkload_api_socket = \"workload.sock\"\n";

#[test]
fn a_node_joins_with_a_token_and_both_nodes_share_one_trust_domain() {
    let c = Cluster::start();
    let (port1, port2) = (free_port(), free_port());
    // Node 1 also terminates mTLS for a local service (a greeting).
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in service.incoming() {
            use std::io::Write;
            let _ = s.and_then(|mut s| s.write_all(b"hello from node 1's service\n"));
        }
    });
    let mtls_port = free_port();
    // ... and originates TLS to a service of node 2's workload, verified by
    // SPIFFE ID (an openssl s_server with that workload's SVID, started below).
    let (out_port, b_service_port) = (free_port(), free_port());
    let node1 = c.node(
        port1,
        &format!(
            "[[route]]\nname = \"in\"\nkind = \"tls\"\nmode = \"server\"\nlisten = \"127.0.0.1:{mtls_port}\"\nupstream = \"127.0.0.1:{service_port}\"\nallow = [\"spiffe://example.org/me\"]\n\n[[route]]\nname = \"out\"\nkind = \"tls\"\nlisten = \"127.0.0.1:{out_port}\"\nupstream = \"localhost:{b_service_port}\"\nupstream_tls = {{ spiffe_id = \"spiffe://example.org/me\" }}\nallow = [\"me\"]\nconnect_timeout = \"3s\"\n{IDENTITY}"
        ),
    );
    let node2 = c.node(port2, IDENTITY);
    let node3 = c.node(free_port(), IDENTITY);
    node1.run(&["init"]).ok();
    node1.put("app-db/app", PASSWORD.as_bytes()).ok();
    let mut d1 = node1.start_daemon();

    // A token from the running node 1 (stdout: the token only).
    let out = node1.run(&["node", "token", "--ttl", "10m"]);
    out.ok().stderr_has("single use");
    let token = token_of(&out);
    // Node 2 joins with it on stdin: the master key arrives wrapped and is
    // written 0600; nothing was copied by hand.
    node2
        .run_stdin(&["node", "join"], format!("{token}\n").as_bytes())
        .ok()
        .stderr_has("joined the fleet as node");
    let key2 = node2.data_dir.join("master.key");
    assert_eq!(
        std::fs::metadata(&key2).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read(&key2).unwrap(),
        std::fs::read(node1.data_dir.join("master.key")).unwrap()
    );
    // The same token again (a replay, on another host): refused, audited there.
    node3
        .run_stdin(&["node", "join"], token.as_bytes())
        .code(3)
        .stderr_has("already used");
    assert!(!node3.data_dir.join("master.key").exists());
    let audit3 = std::fs::read_to_string(node3.audit_log()).unwrap();
    assert!(
        audit3.contains("node.join") && audit3.contains("already used"),
        "{audit3}"
    );
    // An expired token (its expiry moved into the past): refused.
    let out = node1.run(&["node", "token", "--ttl", "1m", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.ok().stdout).unwrap();
    let (expired, expired_id) = (
        v["token"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    );
    c.sql(&format!(
        "UPDATE meta SET value = jsonb_set(value::jsonb, '{{expires_at}}', '1')::text WHERE key = 'join/{expired_id}'"
    ));
    let file = node3.dir.path().join("token");
    std::fs::write(&file, &expired).unwrap();
    node3
        .run(&["node", "join", "--token-file", file.to_str().unwrap()])
        .code(3)
        .stderr_has("expired");
    // A mistyped token: refused, nothing handed over; a token for the argv
    // path works once too (argv is accepted, documented as visible in ps).
    let fresh = token_of(&node1.run(&["node", "token"]));
    let mut typo = fresh.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == '0' { '1' } else { '0' });
    node3
        .run(&["node", "join", &typo])
        .code(3)
        .stderr_has("does not match");
    node3
        .run(&["node", "join", "not-a-token"])
        .code(2)
        .stderr_has("not a join token");
    let audit3 = std::fs::read_to_string(node3.audit_log()).unwrap();
    assert_eq!(audit3.matches("\"node.join\"").count(), 3, "{audit3}");
    // Two hosts racing with one token: exactly one joins.
    let raced = token_of(&node1.run(&["node", "token"]));
    let (node4, node5) = (c.node(free_port(), ""), c.node(free_port(), ""));
    let racers: Vec<std::process::Child> = [&node4, &node5]
        .iter()
        .map(|n| {
            let mut child = n
                .command(&["node", "join"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(raced.as_bytes())
                .unwrap();
            child
        })
        .collect();
    let codes: Vec<Option<i32>> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code())
        .collect();
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![Some(0), Some(3)], "{codes:?}");
    assert_ne!(
        node4.data_dir.join("master.key").exists(),
        node5.data_dir.join("master.key").exists()
    );
    let winner = if node4.data_dir.join("master.key").exists() {
        &node4
    } else {
        &node5
    };
    // The store holds neither the master key nor a token's secret; nor do
    // the audit logs or the daemon's log.
    let dump = c.pg.pg_dump(STORE_DB);
    let kek_hex = std::fs::read_to_string(node1.data_dir.join("master.key")).unwrap();
    let logs: String = [&node1, &node2, &node3]
        .iter()
        .map(|n| std::fs::read_to_string(n.audit_log()).unwrap_or_default())
        .chain([d1.log_text()])
        .collect();
    assert!(logs.contains("node.token") && logs.contains("node.join"));
    for needle in [kek_hex.trim(), &token[21..], &expired[21..], &fresh[21..]] {
        assert!(
            !dump.contains(needle) && !logs.contains(needle),
            "the store dump or a log contains key material"
        );
    }

    // Node 2 serves the secret put on node 1.
    let mut d2 = node2.start_daemon();
    let out = session(port2);
    assert!(works(&out), "{out:?}");

    // One trust domain: each node's workload gets an SVID signed by that
    // node's own intermediate; both nodes serve the same bundle (the root).
    let a = fetch_svid(&node1);
    let b = fetch_svid(&node2);
    assert_eq!(
        a.bundle, b.bundle,
        "every node serves the same trust bundle"
    );
    assert_eq!(a.intermediates.len(), 1, "leaf + node intermediate");
    assert_eq!(b.intermediates.len(), 1);
    assert_ne!(a.intermediates, b.intermediates, "an intermediate per node");
    assert!(!a.bundle.contains(&a.intermediates[0]));
    let dir = c.dir.path();
    write_pems(dir, "a", &a);
    write_pems(dir, "b", &b);
    for (bundle, node) in [("a", "b"), ("b", "a")] {
        let out = openssl(
            dir,
            &[
                "verify",
                "-CAfile",
                &format!("{bundle}-bundle.pem"),
                "-untrusted",
                &format!("{node}-chain.pem"),
                &format!("{node}-leaf.pem"),
            ],
        );
        assert!(
            out.status.success(),
            "node {node}'s SVID with node {bundle}'s bundle: {out:?}"
        );
        // Without its intermediate the leaf does not verify: the root signed
        // only the intermediate.
        let out = openssl(
            dir,
            &[
                "verify",
                "-CAfile",
                &format!("{bundle}-bundle.pem"),
                &format!("{node}-leaf.pem"),
            ],
        );
        assert!(!out.status.success());
    }
    assert!(
        mtls(dir, "b", "a"),
        "mTLS: node 1's workload → node 2's workload"
    );
    assert!(
        mtls(dir, "a", "b"),
        "mTLS: node 2's workload → node 1's workload"
    );
    // Node 1's mTLS server route admits node 2's workload.
    let greeting = through_mtls_route(dir, mtls_port, "b");
    assert!(
        greeting.contains("hello from node 1's service"),
        "{greeting}"
    );
    // Node 1's tls route verifies node 2's workload as its upstream.
    let mut b_service = std::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_server",
            "-accept",
            &b_service_port.to_string(),
            "-rev",
            "-quiet",
        ])
        .args([
            "-cert",
            "b-leaf.pem",
            "-key",
            "b-key.pem",
            "-cert_chain",
            "b-chain.pem",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reversed = |port: u16| -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"to node two\n");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let t0 = Instant::now();
    let mut echoed = reversed(out_port);
    while !echoed.contains("owt edon ot") && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        echoed = reversed(out_port);
    }
    assert!(
        echoed.contains("owt edon ot"),
        "{echoed:?}: {}",
        d1.log_text()
    );

    // The node list: both nodes, how they joined, their intermediates.
    let list: serde_json::Value =
        serde_json::from_str(&node2.run(&["node", "list", "--json"]).ok().stdout).unwrap();
    let nodes = list.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "nodes 1, 2 and the racer that won: {list}");
    let id_of = |node: &Instance| {
        let name = format!(
            ":{}",
            std::fs::canonicalize(&node.data_dir).unwrap().display()
        );
        nodes
            .iter()
            .find(|n| n["name"].as_str().unwrap().ends_with(&name))
            .unwrap_or_else(|| panic!("{name} not in {list}"))
            .clone()
    };
    let (n1, n2) = (id_of(&node1), id_of(&node2));
    assert_eq!(n1["joined_via"], "init");
    assert!(n2["joined_via"]
        .as_str()
        .unwrap()
        .starts_with("join token "));
    assert_eq!(n2["state"], "active");
    let int2 = n2["intermediate"]["serial"].as_str().unwrap().to_string();
    let serial_of = |der: &[u8]| {
        let out = {
            std::fs::write(dir.join("s.der"), der).unwrap();
            openssl(
                dir,
                &[
                    "x509", "-inform", "DER", "-in", "s.der", "-noout", "-serial",
                ],
            )
        };
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .trim_start_matches("serial=")
            .to_lowercase()
    };
    assert_eq!(serial_of(&b.intermediates[0]), int2);
    node1
        .run(&["node", "list"])
        .ok()
        .stdout_has("INTERMEDIATE EXPIRES");
    node2
        .run(&["status"])
        .ok()
        .stdout_has(&format!("fleet node:    {}", n2["id"].as_str().unwrap()))
        .stdout_has(&format!("serial {int2}"));

    // Removal: not of the node the command runs on; node 2, from node 1.
    let id2 = n2["id"].as_str().unwrap().to_string();
    let id1 = n1["id"].as_str().unwrap().to_string();
    node1
        .run(&["node", "remove", &id1])
        .code(2)
        .stderr_has("on another node");
    node1
        .run(&["node", "remove", &id2])
        .ok()
        .stdout_has("removed node");
    // Node 2 stops by itself, saying why, and cannot start again.
    let t0 = Instant::now();
    let code = loop {
        if let Ok(Some(st)) = d2.child.try_wait() {
            break st.code();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "node 2 still runs after its removal: {}",
            d2.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "removal: node 2 stopped {} ms after `node remove`",
        t0.elapsed().as_millis()
    );
    assert_eq!(code, Some(3), "{}", d2.log_text());
    assert!(d2.log_text().contains("removed from the fleet"));
    assert!(session(port2).code != 0, "a removed node serves nothing");
    node2
        .run(&["up"])
        .code(3)
        .stderr_has("removed from the fleet");
    // Offline verbs on it are refused too.
    node2
        .run(&["secret", "list"])
        .code(3)
        .stderr_has("removed from the fleet");
    let list: serde_json::Value =
        serde_json::from_str(&node1.run(&["node", "list", "--json"]).ok().stdout).unwrap();
    let removed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id2.as_str())
        .unwrap()
        .clone();
    assert_eq!(removed["state"], "removed");
    assert_eq!(removed["revoked_intermediates"][0], int2.as_str());
    // Node 1 now refuses the SVID node 2 issued before its removal, although
    // it still chains to the bundle.
    let t0 = Instant::now();
    loop {
        let out = through_mtls_route(dir, mtls_port, "b");
        if !out.contains("hello") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still admitted: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "removal: node 1 refuses node 2's SVIDs {} ms after",
        t0.elapsed().as_millis()
    );
    assert!(
        d1.log_text().contains("revoked when its node was removed"),
        "{}",
        d1.log_text()
    );
    assert!(through_mtls_route(dir, mtls_port, "a").contains("hello"));
    // ... and its tls route no longer accepts node 2's workload as upstream.
    assert_eq!(reversed(out_port), "", "{}", d1.log_text());
    assert!(
        d1.log_text()
            .contains("the upstream's certificate was issued by intermediate CA"),
        "{}",
        d1.log_text()
    );
    let _ = b_service.kill();
    let _ = b_service.wait();
    let audit1 = std::fs::read_to_string(node1.audit_log()).unwrap();
    for action in ["node.token", "node.remove", "node.ca.issue"] {
        assert!(audit1.contains(action), "{action} not audited");
    }
    // A new token brings it back; a node that was not removed cannot join
    // again (the token stays usable).
    let again = token_of(&node1.run(&["node", "token"]));
    winner
        .run_stdin(&["node", "join"], again.as_bytes())
        .code(2)
        .stderr_has("the token was not used");
    node2.run_stdin(&["node", "join"], again.as_bytes()).ok();
    let mut d2 = node2.start_daemon();
    assert!(works(&session(port2)));
    assert_eq!(d2.stop(), Some(0), "{}", d2.log_text());
    assert_eq!(d1.stop(), Some(0), "{}", d1.log_text());

    // After a master key rotation (offline: every daemon stopped) a node
    // with the old key is refused by the store, and a new token brings it
    // the new key in place.
    node1.run(&["init", "--rotate-kek"]).ok();
    node2.run(&["secret", "list"]).code(6);
    let rotated = token_of(&node1.run(&["node", "token"]));
    node2
        .run_stdin(&["node", "join"], rotated.as_bytes())
        .ok()
        .stderr_has("master key written");
    node2.run(&["secret", "list"]).ok().stdout_has("app-db/app");
}

// ---- lease revocation across nodes -------------------------------------------

const LEASE_ADMIN_PASSWORD: &str = "fleet-lease-admin-PW-5e71";

/// A route with dynamic leases on database `shop` (admin role `lease_admin`).
fn lease_route(port: u16, pgport: u16) -> String {
    format!(
        r#"
[[route]]
name = "shop-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{pgport}"
upstream_tls = {{ mode = "disable" }}
allow = ["me"]
databases = ["shop"]
connect_timeout = "3s"

[route.credential]
user = "lease_admin"
secret = "shop-db/admin"

[route.credential.dynamic]
ttl = "1h"
max_ttl = "1h"
grants = ["GRANT CONNECT ON DATABASE shop TO {{role}}"]
"#
    )
}

fn lease_session(port: u16) -> Output {
    run_psql(
        &format!("host=127.0.0.1 port={port} dbname=shop user=legacy connect_timeout=5"),
        "select current_user",
    )
}

#[test]
fn a_lease_revoked_on_one_node_is_revoked_by_the_node_holding_it() {
    let c = Cluster::start();
    c.pg.psql_admin(&format!(
        "CREATE ROLE lease_admin LOGIN CREATEROLE PASSWORD '{LEASE_ADMIN_PASSWORD}';\nCREATE DATABASE shop OWNER lease_admin;"
    ));
    let (shop1, shop2) = (free_port(), free_port());
    let node1 = c.node(free_port(), &lease_route(shop1, c.pg.port));
    let node2 = c.node(free_port(), &lease_route(shop2, c.pg.port));
    node1.run(&["init"]).ok();
    node1
        .put("shop-db/admin", LEASE_ADMIN_PASSWORD.as_bytes())
        .ok();
    let token = token_of(&node1.run(&["node", "token"]));
    node2.run_stdin(&["node", "join"], token.as_bytes()).ok();
    let mut d1 = node1.start_daemon();
    let mut d2 = node2.start_daemon();

    // A session through node 2 gets a lease: node 2 holds it, node 1 does not.
    let out = lease_session(shop2);
    assert_eq!(out.code, 0, "{out:?}");
    let role = out.stdout.trim().to_string();
    assert!(role.starts_with("warden_me_"), "{role}");
    let list: serde_json::Value =
        serde_json::from_str(&node2.run(&["lease", "list", "--json"]).ok().stdout).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        node1.run(&["lease", "list", "--json"]).ok().stdout.trim(),
        "[]"
    );

    // Revoked from node 1: node 2 revokes it (role dropped) before the
    // command returns, and node 2's next session gets a new lease.
    let t0 = Instant::now();
    node1
        .run(&["lease", "revoke", &id])
        .ok()
        .stdout_has(&format!("revoked lease {id} on node"));
    println!(
        "propagation: lease revoke on node 1 → revoked by node 2 in {} ms",
        t0.elapsed().as_millis()
    );
    let roles = c.pg.psql_admin(&format!(
        "SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
    ));
    assert_eq!(roles.trim(), "0", "the lease's role is still there");
    let out = lease_session(shop2);
    assert_eq!(out.code, 0, "{out:?}");
    let again = out.stdout.trim().to_string();
    assert!(again.starts_with("warden_me_") && again != role, "{again}");
    // Node 2's record names node 1's admin; node 1 recorded the request.
    let a2 = std::fs::read_to_string(node2.audit_log()).unwrap();
    assert!(
        a2.contains("\"lease.revoke\"") && a2.contains("revoked by an admin on node"),
        "{a2}"
    );
    let a1 = std::fs::read_to_string(node1.audit_log()).unwrap();
    assert!(a1.contains("\"lease.revoke.request\""), "{a1}");
    // The request is gone; an unknown lease is "not found" on every node.
    assert_eq!(
        c.sql("SELECT count(*) FROM meta WHERE key LIKE 'lease-revoke/%'")
            .trim(),
        "0"
    );
    node1
        .run(&["lease", "revoke", &id])
        .code(5)
        .stderr_has("warden lease list");

    // Node 2 killed: the request cannot be served and says so; it stays in
    // the store, and node 2's restart (which revokes every lease its earlier
    // process left) clears it.
    let list: serde_json::Value =
        serde_json::from_str(&node2.run(&["lease", "list", "--json"]).ok().stdout).unwrap();
    let id2 = list[0]["id"].as_str().unwrap().to_string();
    d2.child.kill().unwrap();
    d2.child.wait().unwrap();
    node1
        .run(&["lease", "revoke", &id2])
        .code(7)
        .stderr_has("has not revoked it within 10 s");
    let pending = || c.sql("SELECT count(*) FROM meta WHERE key LIKE 'lease-revoke/%'");
    assert_eq!(pending().trim(), "1");
    let d2 = node2.start_daemon();
    let t0 = Instant::now();
    while pending().trim() != "0" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "request not cleared: {}",
            d2.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        c.pg.psql_admin(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{again}'"
        ))
        .trim(),
        "0"
    );
    assert_eq!(d1.stop(), Some(0), "{}", d1.log_text());
}

// ---- joining fleets whose master key is not a key file -----------------------

/// `node`'s command with `$CREDENTIALS_DIRECTORY`, fed `stdin`; the raw output.
fn with_credentials(
    node: &Instance,
    creds: &std::path::Path,
    args: &[&str],
    stdin: &[u8],
) -> std::process::Output {
    use std::io::Write;
    let mut child = node
        .command(args)
        .env("CREDENTIALS_DIRECTORY", creds)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn systemd_credential_and_shamir_fleets_join_without_a_key_file() {
    // systemd-credential: the key goes to stdout only when asked (for
    // `systemd-creds encrypt`), and a join without the flag is refused before
    // the token is used.
    let c = Cluster::start();
    let creds = c.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let kek: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    std::fs::write(creds.join("warden-kek"), &kek).unwrap();
    let node1 = c.node(free_port(), "");
    let node2 = c.node(free_port(), "");
    let out = with_credentials(
        &node1,
        &creds,
        &["init", "--kek-source", "systemd-credential"],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let out = with_credentials(&node1, &creds, &["node", "token"], b"");
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let out = node2.run_stdin(&["node", "join"], token.as_bytes());
    out.code(2)
        .stderr_has("--credential-to-stdout")
        .stderr_has("the token was not used");
    let out = {
        use std::io::Write;
        let mut child = node2
            .command(&["node", "join", "--credential-to-stdout"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(token.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, kek, "the key's raw bytes, for systemd-creds");
    assert!(!node2.data_dir.join("master.key").exists());
    // With the credential in place, node 2 reads the store.
    let out = with_credentials(&node2, &creds, &["secret", "list"], b"");
    assert!(out.status.success(), "{out:?}");
    let dump = c.pg.pg_dump(STORE_DB);
    assert!(!dump.contains(&hex(&kek)) && !dump.contains(&token.trim()[21..]));

    // Shamir: the token hands over nothing; the joined node is unsealed with
    // the fleet's shares.
    let c = Cluster::start();
    let node1 = c.node(free_port(), "");
    let node2 = c.node(free_port(), "");
    let init = node1.run(&["init", "--unseal-shares", "3", "--unseal-threshold", "2"]);
    init.ok();
    let shares: Vec<String> = init
        .stdout
        .lines()
        .chain(init.stderr.lines())
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("ws1-")))
        .map(str::to_string)
        .collect();
    assert_eq!(shares.len(), 3, "{init:?}");
    let mut d1 = node1.start_daemon();
    node1
        .run_stdin(
            &["unseal"],
            format!("{}\n{}\n", shares[0], shares[1]).as_bytes(),
        )
        .ok();
    let out = node1.run(&["node", "token", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.ok().stdout).unwrap();
    assert_eq!(v["carries_key"], false);
    node2
        .run_stdin(&["node", "join"], v["token"].as_str().unwrap().as_bytes())
        .ok()
        .stderr_has("warden unseal");
    assert!(!node2.data_dir.join("master.key").exists());
    let mut d2 = node2.start_daemon();
    node2
        .run_stdin(
            &["unseal"],
            format!("{}\n{}\n", shares[1], shares[2]).as_bytes(),
        )
        .ok()
        .stdout_has("unsealed");
    let list: serde_json::Value =
        serde_json::from_str(&node2.run(&["node", "list", "--json"]).ok().stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(d2.stop(), Some(0), "{}", d2.log_text());
    assert_eq!(d1.stop(), Some(0), "{}", d1.log_text());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
