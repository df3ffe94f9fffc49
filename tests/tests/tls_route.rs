//! TLS origination routes end to end: a plain TCP client connects to warden,
//! and the upstream (a Python TLS echo server that requires a client
//! certificate from warden's trust bundle) sees a certificate whose URI SAN is
//! the calling workload's SPIFFE ID — a different workload, a different ID.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use warden_tests::my_uid;
use warden_tests::upstream::Upstream;
use warden_tests::{free_port, Instance};

fn python_exe() -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 is required");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn upstream_sees_the_calling_workloads_svid() {
    let certs = tempfile::tempdir().unwrap();
    let tls = warden_tests::pg::make_tls(certs.path());
    let (port, strict_port, by_id_port) = (free_port(), free_port(), free_port());
    // The upstream's port is not known before the bundle exists; reserve one for the config.
    let cfg_for = |up: u16| {
        format!(
            r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[workload]]
name = "py"
spiffe_id = "spiffe://example.org/py-client"
selectors = {{ uid = {uid}, exe_path = "{py}" }}

[[route]]
name = "logs"
kind = "tls"
listen = "127.0.0.1:{port}"
upstream = "localhost:{up}"
upstream_tls = {{ ca_file = "{ca}" }}
allow = ["me", "py"]

[[route]]
name = "logs-by-id"
kind = "tls"
listen = "127.0.0.1:{strict_port}"
upstream = "localhost:{up}"
upstream_tls = {{ ca_file = "{ca}", spiffe_id = "spiffe://example.org/logs" }}
allow = ["me"]

[[route]]
name = "logs-svid"
kind = "tls"
listen = "127.0.0.1:{by_id_port}"
upstream = "localhost:2"
upstream_tls = {{ ca_file = "{ca}", spiffe_id = "spiffe://example.org/logs" }}
allow = ["me"]
"#,
            uid = my_uid(),
            py = python_exe(),
            ca = tls.ca_pem.display(),
        )
    };
    let warden = Instance::new_with(&cfg_for(1));
    warden.run(&["init"]).ok();
    let bundle = warden.run(&["svid", "bundle"]);
    bundle.ok();
    let bundle_path = certs.path().join("bundle.pem");
    std::fs::write(&bundle_path, &bundle.stdout).unwrap();
    let upstream = Upstream::start(
        certs.path(),
        "echo",
        Some(&tls.server_cert_pem),
        Some(&tls.server_key),
        Some(&bundle_path),
    );
    // An upstream whose certificate carries the expected SPIFFE ID.
    let (svid_cert, svid_key) = warden_tests::pg::issue_server_cert(
        certs.path(),
        "logs-svid",
        "URI:spiffe://example.org/logs,DNS:localhost",
    );
    let svid_dir = certs.path().join("svid-upstream");
    std::fs::create_dir(&svid_dir).unwrap();
    let svid_upstream = Upstream::start(
        &svid_dir,
        "echo",
        Some(&svid_cert),
        Some(&svid_key),
        Some(&bundle_path),
    );
    std::fs::write(&warden.config, {
        let text = std::fs::read_to_string(&warden.config).unwrap();
        text.replace("localhost:1\"", &format!("localhost:{}\"", upstream.port))
            .replace(
                "localhost:2\"",
                &format!("localhost:{}\"", svid_upstream.port),
            )
    })
    .unwrap();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();

    // This test process is workload "me".
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"hello over mtls\n").unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"echo:hello over mtls\n",
        "{}",
        daemon.log_text()
    );
    drop(c);

    // python3 is workload "py" (more specific registration).
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import socket; s = socket.create_connection(('127.0.0.1', {port})); s.sendall(b'from py\\n'); print(s.recv(100).decode())"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "echo:from py",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let recs = upstream.records();
    let sans: Vec<String> = recs.iter().map(|r| r["san"].to_string()).collect();
    assert_eq!(sans.len(), 2, "{recs:?}");
    assert!(
        sans[0].contains("[\"URI\",\"spiffe://example.org/me\"]"),
        "{sans:?}"
    );
    assert!(
        sans[1].contains("[\"URI\",\"spiffe://example.org/py-client\"]"),
        "{sans:?}"
    );

    // Verification by SPIFFE ID: the upstream's DNS certificate has no URI SAN → refused.
    let mut c = TcpStream::connect(("127.0.0.1", strict_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(b"x\n");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(upstream.records().len(), 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("not the expected SPIFFE ID") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // … and accepted when the upstream's certificate names it.
    let mut c = TcpStream::connect(("127.0.0.1", by_id_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"to the right peer\n").unwrap();
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        "echo:to the right peer\n",
        "{}",
        daemon.log_text()
    );
    drop(c);
    assert_eq!(svid_upstream.records().len(), 1);

    let (_, metrics) = warden.http_get("/metrics");
    assert_eq!(
        sessions(&metrics, "allowed", "logs"),
        2.0,
        "two allowed sessions (one per workload): {metrics}"
    );
    assert_eq!(
        sessions(&metrics, "upstream_error", "logs-by-id"),
        1.0,
        "{metrics}"
    );
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(audit.contains("spiffe://example.org/py-client"), "{audit}");
}

/// Sum of `warden_sessions_total` over workloads for one route and result.
fn sessions(metrics: &str, result: &str, route: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("warden_sessions_total{"))
        .filter(|l| {
            l.contains(&format!("result=\"{result}\"")) && l.contains(&format!("route=\"{route}\""))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Sends one line through `port` and returns what came back ("" if closed).
fn echo_through(port: u16, line: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(line.as_bytes());
    let mut buf = [0u8; 256];
    let n = c.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn server_mode_terminates_mtls_and_authorizes_by_spiffe_id() {
    // warden on both ends: a client-mode route presents this process's SVID
    // (spiffe://example.org/me) to a server-mode route, which verifies it and
    // forwards plain TCP to a local echo service.
    let dir = tempfile::tempdir().unwrap();
    let echo = Upstream::start(dir.path(), "plain-echo", None, None, None);
    let (out_ok, out_denied, in_ok, in_strict) =
        (free_port(), free_port(), free_port(), free_port());
    let bundle_path = dir.path().join("bundle.pem");
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "out"
kind = "tls"
listen = "127.0.0.1:{out_ok}"
upstream = "localhost:{in_ok}"
upstream_tls = {{ ca_file = "{bundle}" }}
allow = ["me"]

[[route]]
name = "out-to-strict"
kind = "tls"
listen = "127.0.0.1:{out_denied}"
upstream = "localhost:{in_strict}"
upstream_tls = {{ ca_file = "{bundle}" }}
allow = ["me"]

[[route]]
name = "in"
kind = "tls"
mode = "server"
listen = "127.0.0.1:{in_ok}"
upstream = "127.0.0.1:{echo}"
allow = ["spiffe://example.org/me"]

[[route]]
name = "in-strict"
kind = "tls"
mode = "server"
listen = "127.0.0.1:{in_strict}"
upstream = "127.0.0.1:{echo}"
allow = ["spiffe://example.org/billing"]
"#,
        uid = my_uid(),
        bundle = bundle_path.display(),
        echo = echo.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    let bundle = warden.run(&["svid", "bundle"]);
    bundle.ok();
    std::fs::write(&bundle_path, &bundle.stdout).unwrap();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();

    assert_eq!(
        echo_through(out_ok, "over mtls\n"),
        "echo:over mtls\n",
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        echo_through(out_denied, "nope\n"),
        "",
        "{}",
        daemon.log_text()
    );
    // A client without a certificate cannot finish the handshake.
    let no_cert = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{in_ok}"),
            "-CAfile",
        ])
        .arg(&bundle_path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&no_cert.stdout).to_string()
        + &String::from_utf8_lossy(&no_cert.stderr);
    assert!(!text.contains("echo:"), "{text}");
    // The echo service saw exactly the one allowed session, in plain TCP.
    assert_eq!(echo.records().len(), 1);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, m) = warden.http_get("/metrics");
        if sessions(&m, "tls_error", "in") >= 1.0 || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(sessions(&metrics, "allowed", "in"), 1.0, "{metrics}");
    assert_eq!(sessions(&metrics, "denied", "in-strict"), 1.0, "{metrics}");
    assert!(sessions(&metrics, "tls_error", "in") >= 1.0, "{metrics}");
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(
        audit.contains("client certificate verified, SPIFFE ID allowed")
            && audit.contains("\"workload\":\"spiffe://example.org/me\""),
        "{audit}"
    );
    assert!(
        audit.contains(
            "presented spiffe://example.org/me, which may not use route \\\"in-strict\\\""
        ),
        "{audit}"
    );
}
