//! `warden config check` and config errors at start-up: every error names the
//! key path, the problem and the fix.

use warden_tests::Instance;

fn check(toml: &str) -> warden_tests::Output {
    let i = Instance::new();
    let f = i.dir.path().join("check.toml");
    std::fs::write(&f, toml).unwrap();
    i.run(&["config", "check", f.to_str().unwrap()])
}

#[test]
fn shipped_examples_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["quickstart.toml", "full.toml"] {
        let i = Instance::new();
        let p = root.join(name);
        i.run(&["config", "check", p.to_str().unwrap()])
            .ok()
            .stdout_has("OK");
    }
}

#[test]
fn cache_ttl_longer_than_rotation_is_an_error_naming_the_key() {
    let out = check(
        r#"
[[workload]]
name = "reports"
spiffe_id = "spiffe://warden.local/reports"
selectors = { uid = 1001 }

[[secret]]
name = "orders-db/app"
rotation_period = "1h"

[[route]]
name = "orders-db"
kind = "postgres"
listen = "127.0.0.1:15432"
upstream = "127.0.0.1:5432"
credential = { user = "app", secret = "orders-db/app", cache_ttl = "2h" }
allow = ["reports"]
"#,
    );
    out.code(2)
        .stderr_has("route[0].credential.cache_ttl")
        .stderr_has("rotation");
}

#[test]
fn typos_wrong_types_and_references_name_their_keys() {
    check("[metrics]\nlisen = \"127.0.0.1:1\"\n")
        .code(2)
        .stderr_has("metrics.lisen")
        .stderr_has("listen");
    check("[store]\nmax_versions = \"ten\"\n")
        .code(2)
        .stderr_has("store.max_versions");
    check("[[route]]\nname = \"r\"\nkind = \"postgres\"\nlisten = \"127.0.0.1:1\"\nupstream = \"h:1\"\ncredential = { user = \"u\", secret = \"s\" }\nallow = [\"ghost\"]\n")
        .code(2)
        .stderr_has("route[0].allow");
    check("trust_domain = \"Bad Domain\"\n")
        .code(2)
        .stderr_has("trust_domain");
}

#[test]
fn invalid_config_stops_every_verb_with_the_key() {
    let i = Instance::new_with("[identity]\nkey_type = \"rsa\"\n");
    i.run(&["init"]).code(2).stderr_has("identity.key_type");
    i.run(&["up"]).code(2).stderr_has("identity.key_type");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let i = Instance::new();
    i.run(&["config", "check", "/nonexistent/warden.toml"])
        .code(2)
        .stderr_has("/nonexistent/warden.toml");
}

#[test]
fn ambiguous_workload_registrations_are_an_error() {
    let ambiguous = r#"
trust_domain = "example.org"
[[workload]]
name = "by-uid"
spiffe_id = "spiffe://example.org/a"
selectors = { uid = 1001 }
[[workload]]
name = "by-exe"
spiffe_id = "spiffe://example.org/b"
selectors = { exe_path = "/usr/bin/psql" }
"#;
    check(ambiguous)
        .code(2)
        .stderr_has("workload[1].selectors")
        .stderr_has("could match the same process");
    // A strictly more specific registration is preferred, not ambiguous.
    let specific = ambiguous.replace(
        "selectors = { exe_path = \"/usr/bin/psql\" }",
        "selectors = { uid = 1001, exe_path = \"/usr/bin/psql\" }",
    );
    check(&specific).ok();
    // Contradicting uids can never both match.
    check(&ambiguous.replace("exe_path = \"/usr/bin/psql\"", "uid = 1002")).ok();
}

#[test]
fn tls_modes_that_skip_verification_are_warned_about_loudly() {
    let cfg = |mode: &str| {
        format!(
            r#"
trust_domain = "example.org"
[[workload]]
name = "w"
spiffe_id = "spiffe://example.org/w"
selectors = {{ uid = 1001 }}
[[route]]
name = "r"
kind = "postgres"
listen = "127.0.0.1:15432"
upstream = "db.internal:5432"
upstream_tls = {{ mode = "{mode}", ca_file = "/etc/ssl/certs/ca-certificates.crt" }}
credential = {{ user = "u", secret = "s" }}
allow = ["w"]
"#
        )
    };
    check(&cfg("require"))
        .ok()
        .stdout_has("route[0].upstream_tls.mode")
        .stdout_has("does NOT verify");
    check(&cfg("verify-ca"))
        .ok()
        .stdout_has("not that the certificate names db.internal");
    let full = check(&cfg("verify-full"));
    assert!(!full.ok().stdout.contains("warning"), "{full:?}");
}
