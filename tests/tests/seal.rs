//! Master key sources: Shamir unseal (K shares unseal, K-1 do not, wrong shares
//! are rejected), systemd credentials, and KEK rotation.

use warden_tests::Instance;

fn shares_of(init_stdout: &str) -> Vec<String> {
    init_stdout
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(_, s)| s.to_string()))
        .filter(|s| s.starts_with("ws1-"))
        .collect()
}

#[test]
fn sealed_daemon_serves_nothing_secret_until_k_shares() {
    let i = Instance::new();
    let init = i.run(&["init", "--unseal-shares", "5", "--unseal-threshold", "3"]);
    init.ok().stderr_has("any 3 unseal it");
    let shares = shares_of(&init.stdout);
    assert_eq!(shares.len(), 5, "{init:?}");
    assert!(
        !i.data_dir.join("master.key").exists(),
        "no key file with shamir"
    );

    // Offline, nothing secret is possible; listing metadata is.
    i.put("a", b"x").code(4).stderr_has("sealed");
    i.run(&["secret", "list"]).ok();

    let _d = i.start_daemon();
    i.run(&["status"]).ok().stdout_has("SEALED (0 of 3");
    assert_eq!(i.http_get("/readyz").0, 503);
    i.put("a", b"x").code(4).stderr_has("0 of 3");
    i.run(&["secret", "get", "a", "--reveal"]).code(4);

    // A share of another installation and a mistyped share are rejected.
    let other = Instance::new();
    let foreign = shares_of(
        &other
            .run(&["init", "--unseal-shares", "3", "--unseal-threshold", "2"])
            .stdout,
    );
    i.run_stdin(&["unseal"], foreign[0].as_bytes())
        .code(3)
        .stderr_has("not one of this store's unseal shares");
    let mut typo = shares[0].clone();
    typo.replace_range(10..11, if &typo[10..11] == "a" { "b" } else { "a" });
    i.run_stdin(&["unseal"], typo.as_bytes()).code(3);
    i.run_stdin(&["unseal"], b"garbage").code(2);

    // K-1 shares: still sealed.
    i.run_stdin(&["unseal"], shares[4].as_bytes())
        .ok()
        .stdout_has("1 of 3");
    i.run_stdin(&["unseal"], shares[4].as_bytes())
        .code(2)
        .stderr_has("already provided");
    i.run_stdin(&["unseal"], shares[1].as_bytes())
        .ok()
        .stdout_has("2 of 3");
    i.put("a", b"x").code(4).stderr_has("2 of 3");
    assert_eq!(i.http_get("/readyz").0, 503);

    // The K-th share unseals.
    i.run_stdin(&["unseal"], shares[2].as_bytes())
        .ok()
        .stdout_has("unsealed");
    assert_eq!(i.http_get("/readyz").0, 200);
    i.put("a", b"after-unseal").ok();
    assert_eq!(
        i.run(&["secret", "get", "a", "--reveal"]).ok().stdout,
        "after-unseal"
    );
    i.run(&["status"]).ok().stdout_has("unsealed");
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(audit.contains("\"unseal\"") && audit.contains("unseal.share"));
    for s in &shares {
        assert!(!audit.contains(s.as_str()), "a share reached the audit log");
    }
}

#[test]
fn several_shares_in_one_unseal_call() {
    let i = Instance::new();
    let shares = shares_of(
        &i.run(&["init", "--unseal-shares", "3", "--unseal-threshold", "2"])
            .ok()
            .stdout,
    );
    let _d = i.start_daemon();
    let input = format!("{}\n{}\n", shares[0], shares[2]);
    i.run_stdin(&["unseal"], input.as_bytes())
        .ok()
        .stdout_has("unsealed");
}

#[test]
fn bad_share_parameters_are_usage_errors() {
    let i = Instance::new();
    i.run(&["init", "--unseal-shares", "2", "--unseal-threshold", "3"])
        .code(2);
    i.run(&["init", "--unseal-shares", "3"]).code(2);
    i.run(&["init", "--kek-source", "shamir"]).code(2);
    i.run(&["init", "--kek-source", "bogus"]).code(2);
    assert!(!i.data_dir.join("store.db").exists());
}

#[test]
fn systemd_credential_source() {
    let i = Instance::new();
    let creds = i.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("warden-kek"), [7u8; 32]).unwrap();
    let with_creds = |args: &[&str], stdin: &[u8]| {
        let mut c = i.command(args);
        c.env("CREDENTIALS_DIRECTORY", &creds);
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(
        with_creds(&["init", "--kek-source", "systemd-credential"], b"")
            .status
            .success()
    );
    assert!(!i.data_dir.join("master.key").exists());
    assert!(with_creds(&["secret", "put", "a"], b"cred-value")
        .status
        .success());
    let got = with_creds(&["secret", "get", "a", "--reveal"], b"");
    assert_eq!(got.stdout, b"cred-value");
    // Without the credential the error says how to provide it.
    i.run(&["secret", "get", "a", "--reveal"])
        .code(2)
        .stderr_has("LoadCredentialEncrypted");
    // A different credential is refused.
    std::fs::write(creds.join("warden-kek"), [8u8; 32]).unwrap();
    let bad = with_creds(&["secret", "get", "a", "--reveal"], b"");
    assert_eq!(bad.status.code(), Some(6));
}

#[test]
fn kek_rotation_rewraps_and_keeps_values() {
    let i = Instance::initialised();
    i.put("a", b"value-a").ok();
    i.put("b", b"value-b").ok();
    let old_key = std::fs::read(i.data_dir.join("master.key")).unwrap();
    let out = i.run(&["init", "--rotate-kek"]);
    // Two secrets, the CA key and the JWT signing key.
    out.ok().stdout_has("4 data key(s) rewrapped");
    let new_key = std::fs::read(i.data_dir.join("master.key")).unwrap();
    assert_ne!(old_key, new_key);
    assert_eq!(
        i.run(&["secret", "get", "a", "--reveal"]).ok().stdout,
        "value-a"
    );
    // The old key no longer opens the store.
    std::fs::write(i.data_dir.join("master.key"), &old_key).unwrap();
    i.run(&["secret", "get", "a", "--reveal"]).code(6);
    std::fs::write(i.data_dir.join("master.key"), &new_key).unwrap();

    // Rotate from a key file to Shamir shares, then back, giving the shares on stdin.
    let out = i.run(&[
        "init",
        "--rotate-kek",
        "--unseal-shares",
        "3",
        "--unseal-threshold",
        "2",
    ]);
    out.ok();
    let shares = shares_of(&out.stdout);
    assert_eq!(shares.len(), 3);
    assert!(
        !i.data_dir.join("master.key").exists(),
        "old key file must be removed"
    );
    i.run_stdin(&["init", "--rotate-kek"], b"").code(4);
    let input = format!("{}\n{}\n", shares[1], shares[2]);
    i.run_stdin(
        &["init", "--rotate-kek", "--kek-source", "file"],
        input.as_bytes(),
    )
    .ok();
    assert_eq!(
        i.run(&["secret", "get", "b", "--reveal"]).ok().stdout,
        "value-b"
    );

    // Rotation refuses to run under a live daemon.
    let _d = i.start_daemon();
    i.run(&["init", "--rotate-kek"])
        .code(7)
        .stderr_has("daemon stopped");
    drop(_d);
    i.run(&["audit", "verify"]).ok();
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert_eq!(audit.matches("kek.rotate").count(), 3, "{audit}");
}

#[test]
fn init_refuses_to_overwrite() {
    let i = Instance::initialised();
    i.run(&["init"]).code(2).stderr_has("already initialised");
}
