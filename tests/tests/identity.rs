//! Workload identity through the real binary: the CA created at init, SVIDs
//! from the daemon checked with openssl, an imported upstream intermediate
//! made with openssl, and the reserved key namespace.

use std::process::Command;
use warden_tests::Instance;

const WORKLOADS: &str = r#"
trust_domain = "example.org"

[[workload]]
name = "reports"
spiffe_id = "spiffe://example.org/reports"
selectors = { uid = 1001 }
"#;

fn openssl(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) is required");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn svids_from_the_daemon_verify_with_openssl() {
    let i = Instance::new_with(WORKLOADS);
    i.run(&["init"]).ok();
    let _d = i.start_daemon();
    let show = i.run(&["svid", "show", "reports", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&show.ok().stdout).unwrap();
    assert_eq!(info["spiffe_id"], "spiffe://example.org/reports");
    assert_eq!(info["key_type"], "ec-p256");
    assert_eq!(info["serial"].as_str().unwrap().len(), 32);
    // Same SVID until its refresh time.
    let again: serde_json::Value =
        serde_json::from_str(&i.run(&["svid", "show", "reports", "--json"]).ok().stdout).unwrap();
    assert_eq!(again["serial"], info["serial"]);

    let dir = i.dir.path();
    let pem = i.run(&["svid", "show", "reports", "--pem"]);
    let chain = &pem.ok().stdout[pem.stdout.find("-----BEGIN").unwrap()..];
    assert!(!chain.contains("PRIVATE KEY"));
    std::fs::write(dir.join("leaf.pem"), chain).unwrap();
    std::fs::write(
        dir.join("bundle.pem"),
        i.run(&["svid", "bundle"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    openssl(&["verify", "-CAfile", "bundle.pem", "leaf.pem"], dir);
    let text = String::from_utf8_lossy(
        &openssl(&["x509", "-in", "leaf.pem", "-noout", "-text"], dir).stdout,
    )
    .into_owned();
    assert!(text.contains("URI:spiffe://example.org/reports"), "{text}");
    assert!(
        text.contains("X509v3 Basic Constraints: critical\n                CA:FALSE"),
        "{text}"
    );
    assert!(
        text.contains("X509v3 Key Usage: critical\n                Digital Signature\n"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"));

    i.run(&["svid", "show", "nobody"])
        .code(5)
        .stderr_has("no workload");
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(audit.contains("ca.create") && audit.contains("svid.issue"));
}

#[test]
fn bundle_is_readable_offline_but_svids_need_the_daemon() {
    let i = Instance::new_with(WORKLOADS);
    i.run(&["init"]).ok();
    i.run(&["svid", "bundle"])
        .ok()
        .stdout_has("BEGIN CERTIFICATE");
    i.run(&["svid", "show", "reports"])
        .code(7)
        .stderr_has("warden up");
}

#[test]
fn reserved_key_names_are_refused() {
    let i = Instance::new_with(WORKLOADS);
    i.run(&["init"]).ok();
    let list = i.run(&["secret", "list", "--env", "system", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list.ok().stdout).unwrap();
    let ca_key = v[0]["name"].as_str().unwrap().to_string();
    assert!(ca_key.starts_with("warden/ca/"));
    i.run(&["secret", "get", &ca_key, "--env", "system", "--reveal"])
        .code(3)
        .stderr_has("reserved");
    i.run(&["secret", "rm", &ca_key, "--env", "system"]).code(3);
    i.put("warden/ca/evil", b"x").code(3);
}

#[test]
fn trust_domain_mismatch_stops_the_daemon_naming_the_key() {
    let i = Instance::new_with(WORKLOADS);
    i.run(&["init", "--trust-domain", "other.org"])
        .ok()
        .stderr_has("set trust_domain");
    i.run(&["up"]).code(2).stderr_has("trust_domain");
}

#[test]
fn ca_survives_kek_rotation() {
    let i = Instance::new_with(WORKLOADS);
    i.run(&["init"]).ok();
    let bundle = i.run(&["svid", "bundle"]).ok().stdout.clone();
    i.run(&["init", "--rotate-kek"]).ok();
    let _d = i.start_daemon();
    assert_eq!(i.run(&["svid", "bundle"]).ok().stdout, bundle);
    i.run(&["svid", "show", "reports"]).ok();
}

#[test]
fn imported_upstream_intermediate_chains_to_the_org_root() {
    let i = Instance::new_with(WORKLOADS);
    let dir = i.dir.path();
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    // An organisation's root and a SPIFFE intermediate, made with openssl.
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-days",
            "30",
            "-subj",
            "/CN=Org Root",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "int.key",
            "-out",
            "int.csr",
            "-subj",
            "/CN=Org SPIFFE CA",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-out",
            "int.pem",
            "-days",
            "20",
            "-extfile",
            "ca.ext",
        ],
        dir,
    );
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    i.run(&[
        "init",
        "--ca-cert",
        &p("int.pem"),
        "--ca-key",
        &p("int.key"),
        "--ca-bundle",
        &p("root.pem"),
    ])
    .ok();
    // The trust bundle is the org root, and SVIDs carry the intermediate.
    let bundle = i.run(&["svid", "bundle"]).ok().stdout.clone();
    assert_eq!(
        bundle.trim(),
        std::fs::read_to_string(dir.join("root.pem"))
            .unwrap()
            .trim()
    );
    let _d = i.start_daemon();
    let pem = i.run(&["svid", "show", "reports", "--pem"]);
    let chain = &pem.ok().stdout[pem.stdout.find("-----BEGIN").unwrap()..];
    let certs: Vec<&str> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .collect();
    assert_eq!(certs.len(), 2, "leaf + intermediate");
    std::fs::write(dir.join("leaf.pem"), certs[0]).unwrap();
    std::fs::write(dir.join("untrusted.pem"), certs[1]).unwrap();
    openssl(
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "untrusted.pem",
            "leaf.pem",
        ],
        dir,
    );

    // A leaf certificate offered as a CA is refused with the reason.
    let j = Instance::new_with(WORKLOADS);
    std::fs::copy(dir.join("leaf.pem"), j.dir.path().join("leaf.pem")).unwrap();
    j.run(&[
        "init",
        "--ca-cert",
        j.dir.path().join("leaf.pem").to_str().unwrap(),
        "--ca-key",
        &p("int.key"),
    ])
    .code(2)
    .stderr_has("not a CA");
    assert!(
        !j.data_dir.join("store.db").exists(),
        "a failed init must leave nothing behind"
    );
}
