//! `warden doctor` against real things: a PostgreSQL upstream with TLS
//! verified against the right CA (ok) and the wrong one (FAIL, explained),
//! an upstream nobody listens on (FAIL), a data dir file others can read
//! (FAIL with the chmod), exit codes and `--json`.

use std::os::unix::fs::PermissionsExt;

use warden_tests::pg::{Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, Instance};

#[test]
fn doctor_checks_kernel_store_and_each_upstream_and_names_the_fix() {
    let pg = PgCluster::start(ClusterOptions {
        tls: true,
        ..ClusterOptions::new(Auth::Scram)
    });
    let ca = pg.ca_pem.clone().expect("TLS cluster CA");
    let certs = tempfile::tempdir().unwrap();
    let other = warden_tests::pg::make_tls(certs.path());
    let closed = free_port();
    let route = |name: &str, upstream: String, tls: String| {
        format!(
            "[[route]]\nname = \"{name}\"\nkind = \"postgres\"\nlisten = \"127.0.0.1:{}\"\nupstream = \"{upstream}\"\nupstream_tls = {tls}\ncredential = {{ user = \"app\", secret = \"db/app\" }}\nallow = [\"me\"]\n\n",
            free_port()
        )
    };
    let cfg = format!(
        "trust_domain = \"example.org\"\n\n[[workload]]\nname = \"me\"\nspiffe_id = \"spiffe://example.org/me\"\nselectors = {{ uid = 0 }}\n\n{}{}",
        route(
            "good-db",
            format!("localhost:{}", pg.port),
            format!("{{ mode = \"verify-full\", ca_file = \"{}\" }}", ca.display()),
        ),
        route(
            "wrong-ca-db",
            format!("localhost:{}", pg.port),
            format!(
                "{{ mode = \"verify-full\", ca_file = \"{}\" }}",
                other.ca_pem.display()
            ),
        ),
    ) + &route(
        "down-db",
        format!("127.0.0.1:{closed}"),
        "{ mode = \"disable\" }".into(),
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();

    let out = warden.run(&["doctor"]);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, 1, "a failed check exits 1: {text}");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line: {text}"))
            .to_string()
    };
    assert!(line("route good-db").starts_with("ok"), "{text}");
    assert!(line("route good-db").contains("verified"), "{text}");
    let wrong = line("route wrong-ca-db");
    assert!(wrong.starts_with("FAIL"), "{text}");
    assert!(wrong.contains("certificate"), "{wrong}");
    assert!(line("route down-db").starts_with("FAIL"), "{text}");
    assert!(line("route down-db").contains("cannot connect"), "{text}");
    assert!(text.contains("fix: check route.upstream"), "{text}");
    assert!(line("store (sqlite)").starts_with("ok"), "{text}");
    assert!(line("data dir").starts_with("ok"), "{text}");
    assert!(line("daemon").starts_with("WARN"), "not running: {text}");
    assert!(line("kernel: cgroup v2").starts_with("ok"), "{text}");
    // As root (CI): the eBPF programs really load.
    if warden_tests::is_root() {
        assert!(line("kernel: eBPF monitor").starts_with("ok"), "{text}");
    }

    // A data dir file others can read: FAIL with the exact chmod.
    let key = warden.data_dir.join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = warden.run(&["--json", "doctor"]);
    assert_eq!(out.code, 1);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect(&out.stdout);
    let dir = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "data dir")
        .unwrap()
        .clone();
    assert_eq!(dir["status"], "fail", "{dir}");
    assert!(
        dir["detail"].as_str().unwrap().contains("master.key"),
        "{dir}"
    );
    assert!(
        dir["fix"].as_str().unwrap().starts_with("chmod 600"),
        "{dir}"
    );
}
