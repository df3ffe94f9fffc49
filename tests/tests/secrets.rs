//! Secret store through the real CLI, offline and through the daemon: values
//! round-trip, never reach disk, logs or argv in plaintext, and tampering is
//! reported instead of yielding a wrong value.

use std::io::Write;
use std::process::{Command, Stdio};
use warden_tests::{files_containing, Instance};

const CANARY: &str = "CANARY-pl41n-9d1e77-do-not-leak";

#[test]
fn put_list_versions_reveal_rm_offline() {
    let i = Instance::initialised();
    i.put("orders-db/app", b"v1-value\n")
        .ok()
        .stdout_has("version 1");
    i.put("orders-db/app", b"v2-value")
        .ok()
        .stdout_has("version 2");
    i.run_stdin(
        &["secret", "put", "orders-db/app", "--env", "dev"],
        b"dev-value",
    )
    .ok();
    let list = i.run(&["secret", "list", "--json"]);
    list.ok();
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    i.run(&["secret", "versions", "orders-db/app"])
        .ok()
        .stdout_has("uid");
    // Environment scoping: the same name resolves per environment.
    let prod = i.run(&["secret", "get", "orders-db/app", "--reveal"]);
    assert_eq!(prod.ok().stdout, "v2-value");
    let dev = i.run(&["secret", "get", "orders-db/app", "--env", "dev", "--reveal"]);
    assert_eq!(dev.ok().stdout, "dev-value");
    // One trailing newline from stdin is dropped; --version reads history.
    let v1 = i.run(&[
        "secret",
        "get",
        "orders-db/app",
        "--version",
        "1",
        "--reveal",
    ]);
    assert_eq!(v1.ok().stdout, "v1-value");
    i.run(&[
        "secret",
        "get",
        "orders-db/app",
        "--env",
        "staging",
        "--reveal",
    ])
    .code(5)
    .stderr_has("no secret");
    i.run(&["secret", "get", "orders-db/app"])
        .code(2)
        .stderr_has("--reveal");
    i.run(&["secret", "rm", "orders-db/app"])
        .ok()
        .stdout_has("2 version");
    i.run(&["secret", "rm", "orders-db/app"]).code(5);
    i.run(&["audit", "verify"]).ok();
}

#[test]
fn values_from_file_are_exact() {
    let i = Instance::initialised();
    let f = i.dir.path().join("cert.pem");
    std::fs::write(&f, b"line1\nline2\n\n").unwrap();
    i.run(&[
        "secret",
        "put",
        "tls/cert",
        "--from-file",
        f.to_str().unwrap(),
    ])
    .ok();
    let got = i.run(&["secret", "get", "tls/cert", "--reveal"]);
    assert_eq!(got.ok().stdout, "line1\nline2\n\n");
}

#[test]
fn empty_and_invalid_inputs_are_clear_usage_errors() {
    let i = Instance::initialised();
    i.put("a", b"")
        .code(2)
        .stderr_has("never taken from the command line");
    i.put("Bad Name", b"x")
        .code(2)
        .stderr_has("invalid secret name");
    i.run_stdin(&["secret", "put", "a", "--env", "PROD"], b"x")
        .code(2)
        .stderr_has("invalid environment");
}

#[test]
fn no_plaintext_in_store_audit_or_output_files() {
    let i = Instance::initialised();
    i.put("canary/secret", CANARY.as_bytes()).ok();
    i.put("canary/secret", CANARY.as_bytes()).ok();
    let got = i.run(&["secret", "get", "canary/secret", "--reveal"]);
    assert_eq!(got.ok().stdout, CANARY);
    // Through the daemon too (its log must not carry the value either).
    let d = i.start_daemon();
    i.put("canary/other", CANARY.as_bytes()).ok();
    let got = i.run(&["secret", "get", "canary/other", "--reveal"]);
    assert_eq!(got.ok().stdout, CANARY);
    let (_, metrics) = i.http_get("/metrics");
    assert!(!metrics.contains(CANARY));
    drop(d);
    let hits = files_containing(i.dir.path(), CANARY.as_bytes());
    assert!(hits.is_empty(), "plaintext secret found in {hits:?}");
    // The audit log names what was touched, never the value.
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(audit.contains("canary/secret") && audit.contains("secret.reveal"));
    assert!(!audit.contains(CANARY));
}

#[test]
fn value_on_argv_is_impossible_and_ps_never_shows_it() {
    let i = Instance::initialised();
    // There is no positional value nor a --value flag.
    i.run(&["secret", "put", "a", CANARY]).code(2);
    i.run(&["secret", "put", "a", "--value", CANARY]).code(2);
    // While `put` waits for its value on stdin, no process's argv shows it.
    let mut child = i
        .command(&["secret", "put", "ps/check"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(CANARY.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let ps = Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ps.stdout);
    assert!(
        listing.contains("ps/check"),
        "put not visible in ps: {listing}"
    );
    assert!(!listing.contains(CANARY), "secret visible in ps");
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let env = std::fs::read(format!("/proc/{}/environ", std::process::id())).unwrap();
    assert!(!warden_tests::contains_bytes(&env, CANARY.as_bytes()));
}

#[test]
fn swapped_or_flipped_rows_give_integrity_errors() {
    let i = Instance::initialised();
    i.put("alpha", b"value-alpha").ok();
    i.put("beta", b"value-beta").ok();
    let db = i.data_dir.join("store.db");
    // Swap the sealed material of the two rows with the real sqlite3 client.
    let sql = "BEGIN;
        CREATE TEMP TABLE t AS SELECT name, wrapped_key, ciphertext FROM secret_versions;
        UPDATE secret_versions SET wrapped_key = (SELECT wrapped_key FROM t WHERE t.name != secret_versions.name),
                                   ciphertext  = (SELECT ciphertext  FROM t WHERE t.name != secret_versions.name);
        COMMIT;";
    let st = Command::new("sqlite3").arg(&db).arg(sql).status().unwrap();
    assert!(st.success());
    for name in ["alpha", "beta"] {
        let out = i.run(&["secret", "get", name, "--reveal"]);
        out.code(6).stderr_has("integrity");
        assert!(
            !out.stdout.contains("value-"),
            "a wrong value was served: {out:?}"
        );
    }
    // Flip one byte of a ciphertext.
    i.put("gamma", b"value-gamma").ok();
    let st = Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE secret_versions SET ciphertext = CAST(zeroblob(length(ciphertext)) AS BLOB) WHERE name = 'gamma';")
        .status()
        .unwrap();
    assert!(st.success());
    i.run(&["secret", "get", "gamma", "--reveal"]).code(6);
    // Denied reads are audited too.
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(audit.contains("\"decision\":\"error\""), "{audit}");
}

#[test]
fn wrong_master_key_is_refused() {
    let i = Instance::initialised();
    i.put("a", b"x").ok();
    let other = Instance::initialised();
    let key = std::fs::read(other.data_dir.join("master.key")).unwrap();
    std::fs::write(i.data_dir.join("master.key"), key).unwrap();
    i.run(&["secret", "get", "a", "--reveal"])
        .code(6)
        .stderr_has("does not match this store");
}

#[test]
fn loose_permissions_are_refused_naming_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let i = Instance::initialised();
    let key = i.data_dir.join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    i.run(&["secret", "get", "a", "--reveal"])
        .code(3)
        .stderr_has(key.to_str().unwrap())
        .stderr_has("chmod 600");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&i.data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for args in [&["secret", "list"][..], &["up"][..]] {
        i.run(args)
            .code(3)
            .stderr_has(i.data_dir.to_str().unwrap())
            .stderr_has("chmod 700");
    }
}

#[test]
fn daemon_serves_cli_and_metrics_and_stops_cleanly() {
    let i = Instance::initialised();
    let mut d = i.start_daemon();
    // While the daemon runs, the CLI goes through it (the data dir is locked).
    i.put("svc/token", b"tok").ok();
    i.run(&["status"]).ok().stdout_has("unsealed");
    let (code, body) = i.http_get("/readyz");
    assert_eq!((code, body.trim()), (200, "ready"));
    assert_eq!(i.http_get("/healthz").0, 200);
    assert_eq!(i.http_get("/nope").0, 404);
    let (code, metrics) = i.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("warden_admin_requests_total{op=\"secret_put\",result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("warden_audit_records_written_total"));
    // promtool accepts the exposition.
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is required");
    p.stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A second daemon on the same data dir is refused.
    let second = i.run(&["up"]);
    assert_ne!(second.code, 0);
    assert_eq!(d.stop(), Some(0), "{}", d.log_text());
    assert!(!i.socket.exists(), "socket left behind");
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(audit.contains("daemon.start") && audit.contains("daemon.stop"));
    // Offline again after the daemon stopped.
    let v = i.run(&["secret", "get", "svc/token", "--reveal"]);
    assert_eq!(v.ok().stdout, "tok");
    i.run(&["status"]).code(7);
}

#[test]
fn non_admin_uid_is_refused_by_the_admin_socket() {
    if !warden_tests::is_root() {
        eprintln!("skipping: needs root to run a client as another uid");
        return;
    }
    let i = Instance::initialised();
    let _d = i.start_daemon();
    // Make the socket reachable, then connect as nobody: SO_PEERCRED decides.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(i.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&i.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&i.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(warden_tests::warden_bin())
        .arg("--config")
        .arg(&i.config)
        .args(["secret", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("uid 65534 may not use the warden admin socket"),
        "{stderr}"
    );
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(
        audit.contains("admin.connect") && audit.contains("\"deny\""),
        "{audit}"
    );
}

#[test]
fn admin_group_members_manage_but_cannot_reveal() {
    if !warden_tests::is_root() {
        eprintln!("skipping: needs root to run a client as another uid");
        return;
    }
    // `nogroup` (gid 65534) exists on Debian; uid 65534 is `nobody`.
    let i = Instance::new_with("");
    let cfg = std::fs::read_to_string(&i.config).unwrap();
    std::fs::write(
        &i.config,
        cfg.replace("[admin]\n", "[admin]\ngroup = \"nogroup\"\n"),
    )
    .unwrap();
    i.run(&["init"]).ok();
    i.put("shared/token", b"group-visible-name-only").ok();
    let _d = i.start_daemon();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = std::fs::metadata(&i.socket).unwrap();
    assert_eq!(md.mode() & 0o777, 0o660, "group socket must be 0660");
    assert_eq!(md.gid(), 65534);
    std::fs::set_permissions(i.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&i.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(warden_tests::warden_bin())
            .arg("--config")
            .arg(&i.config)
            .args(args)
            .output()
            .unwrap()
    };
    let list = as_nobody(&["secret", "list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains("shared/token"));
    let reveal = as_nobody(&["secret", "get", "shared/token", "--reveal"]);
    assert_eq!(reveal.status.code(), Some(3));
    assert!(!String::from_utf8_lossy(&reveal.stdout).contains("group-visible"));
}

#[test]
fn daemon_notifies_systemd_when_ready() {
    let i = Instance::initialised();
    let notify = i.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut child = i
        .command(&["up"])
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means the admin socket answers.
    i.run(&["status"]).ok();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
}
