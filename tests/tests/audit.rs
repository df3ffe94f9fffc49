//! The audit log through the real CLI: every action is recorded, `audit verify`
//! names the first tampered line, and a record that cannot be written refuses
//! the action (fail closed).

use warden_tests::Instance;

fn instance_with_history() -> Instance {
    let i = Instance::initialised();
    for n in 0..4 {
        i.put(&format!("s{n}"), b"x").ok();
    }
    i.run(&["secret", "list"]).ok();
    i.run(&["secret", "get", "s1", "--reveal"]).ok();
    i.run(&["secret", "rm", "s2"]).ok();
    i
}

fn lines(i: &Instance) -> Vec<String> {
    std::fs::read_to_string(i.audit_log())
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(i: &Instance, l: &[String]) {
    let mut text = l.join("\n");
    text.push('\n');
    std::fs::write(i.audit_log(), text).unwrap();
}

#[test]
fn records_every_action_and_verifies() {
    let i = instance_with_history();
    let out = i.run(&["audit", "verify"]);
    // init + CA key + CA creation + JWT key + JWT key creation, 4 puts, list, reveal, rm.
    out.ok().stdout_has("audit log OK: 12 records");
    let tail = i.run(&["audit", "tail", "-n", "3"]);
    tail.ok()
        .stdout_has("secret.rm")
        .stdout_has("secret.reveal");
    assert_eq!(tail.stdout.lines().count(), 3, "{tail:?}");
    let json = i.run(&["audit", "tail", "--json", "-n", "1"]);
    let rec: serde_json::Value = serde_json::from_str(json.ok().stdout.trim()).unwrap();
    assert_eq!(rec["action"], "secret.rm");
    assert_eq!(rec["target"]["secret"], "s2");
    assert!(rec["hash"].as_str().unwrap().len() == 64);
    // --expect-head pins the log to an externally kept hash.
    let head = rec["hash"].as_str().unwrap().to_string();
    i.run(&["audit", "verify", "--expect-head", &head]).ok();
    i.run(&["audit", "verify", "--expect-head", &"0".repeat(64)])
        .code(6);
}

#[test]
fn any_modified_byte_is_detected_and_named() {
    let i = instance_with_history();
    let orig = lines(&i);
    for (n, line) in orig.iter().enumerate() {
        // A byte in the middle, and one near each end of the line.
        for pos in [line.len() / 2, 12, line.len() - 3] {
            let mut l = orig.clone();
            let mut bytes = l[n].clone().into_bytes();
            bytes[pos] = if bytes[pos] == b'1' { b'2' } else { b'1' };
            l[n] = String::from_utf8_lossy(&bytes).into_owned();
            write_lines(&i, &l);
            i.run(&["audit", "verify"])
                .code(6)
                .stderr_has(&format!("line {}", n + 1));
        }
    }
    write_lines(&i, &orig);
    i.run(&["audit", "verify"]).ok();
}

#[test]
fn removed_inserted_reordered_truncated_are_detected() {
    let i = instance_with_history();
    let orig = lines(&i);
    // Removed.
    let mut l = orig.clone();
    l.remove(3);
    write_lines(&i, &l);
    i.run(&["audit", "verify"]).code(6).stderr_has("line 4");
    // Inserted (a copy of a genuine record).
    let mut l = orig.clone();
    l.insert(5, orig[2].clone());
    write_lines(&i, &l);
    i.run(&["audit", "verify"]).code(6).stderr_has("line 6");
    // Reordered.
    let mut l = orig.clone();
    l.swap(2, 3);
    write_lines(&i, &l);
    i.run(&["audit", "verify"]).code(6).stderr_has("line 3");
    // Last record truncated away: the head anchor notices.
    let mut l = orig.clone();
    l.pop();
    write_lines(&i, &l);
    i.run(&["audit", "verify"]).code(6).stderr_has("removed");
    write_lines(&i, &orig);
    i.run(&["audit", "verify"]).ok();
}

#[test]
fn unwritable_audit_log_refuses_the_action() {
    if !warden_tests::is_root() {
        eprintln!("skipping: needs root to mount a small tmpfs");
        return;
    }
    let i = warden_tests::Instance::initialised();
    let disk = warden_tests::fulldisk::FullDiskLog::mount(&i);
    let d = i.start_daemon();
    i.put("before", b"x").ok();
    disk.fill();
    // Records still fit in the log's last page; once it is full, the next
    // action must be refused, and so must every later one.
    let mut refused = None;
    for n in 0..64 {
        let name = format!("during{n}");
        let out = i.put(&name, b"y");
        if out.code != 0 {
            out.code(1)
                .stderr_has("disk full")
                .stderr_has("refused because it could not be recorded");
            refused = Some(n);
            break;
        }
    }
    let refused = refused.expect("64 puts on a full disk were all recorded");
    eprintln!("the put after {refused} recorded ones was refused");
    i.put("after", b"z")
        .code(1)
        .stderr_has("refused because it could not be recorded");
    let (_, metrics) = i.http_get("/metrics");
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warden_audit_write_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(failures >= 2, "audit write failures not counted: {metrics}");
    disk.free();
    // Nothing was stored without its record, and the log still verifies.
    let list = i.run(&["secret", "list"]);
    list.ok().stdout_has("before");
    for n in 0..refused {
        list.stdout_has(&format!("during{n}"));
    }
    assert!(
        !list.stdout.contains(&format!("during{refused}")) && !list.stdout.contains("after"),
        "{list:?}"
    );
    drop(d);
    i.run(&["audit", "verify"]).ok();
}
