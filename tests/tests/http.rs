//! HTTP routes end to end: curl through warden to a local HTTPS server (test
//! CA from openssl) that records what it receives. Checks the injected
//! credential arrives and the client's copy does not, that the token never
//! reaches the client, the daemon log or the audit log, and that refusals are
//! HTTP statuses with explanations (403, 502, 504, 400, 431).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use warden_tests::my_uid;
use warden_tests::upstream::{header_values, Upstream};
use warden_tests::{contains_bytes, files_containing, free_port, Instance};

const TOKEN: &str = "tok-CANARY-9f2c41d7e0";

struct Setup {
    warden: Instance,
    daemon: warden_tests::Daemon,
    upstream: Upstream,
    _certs: tempfile::TempDir,
    ports: std::collections::HashMap<&'static str, u16>,
}

fn setup() -> Setup {
    setup_with("https")
}

/// The routes against a local upstream speaking `scheme`: `https` (hyper's
/// pooled client) or `http` (warden's own HTTP/1.1 fast path). `api-badca`
/// exists for https only.
fn setup_with(scheme: &str) -> Setup {
    let certs = tempfile::tempdir().unwrap();
    let good = warden_tests::pg::make_tls(certs.path());
    let other_dir = certs.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = warden_tests::pg::make_tls(&other_dir);
    let https = scheme == "https";
    let upstream = if https {
        Upstream::start(
            certs.path(),
            "https",
            Some(&good.server_cert_pem),
            Some(&good.server_key),
            None,
        )
    } else {
        Upstream::start(certs.path(), "http", None, None, None)
    };
    let mut ports = std::collections::HashMap::new();
    let mut routes = String::new();
    for (name, inject, ca, allow, extra) in [
        (
            "api",
            r#"{ header = "Authorization", value = "Bearer {secret}", secret = "api/token" }"#,
            &good.ca_pem,
            "me",
            "request_timeout = \"2s\"",
        ),
        (
            "api-query",
            r#"{ query = "api_key", secret = "api/token" }"#,
            &good.ca_pem,
            "me",
            "",
        ),
        (
            "api-basic",
            r#"{ basic_user = "svc", secret = "api/token" }"#,
            &good.ca_pem,
            "me",
            "",
        ),
        (
            "api-badca",
            r#"{ header = "X-Api-Key", secret = "api/token" }"#,
            &other.ca_pem,
            "me",
            "",
        ),
        (
            "api-denied",
            r#"{ header = "X-Api-Key", secret = "api/token" }"#,
            &good.ca_pem,
            "other",
            "",
        ),
    ] {
        if !https && name == "api-badca" {
            continue;
        }
        let port = free_port();
        ports.insert(name, port);
        let tls = if https {
            format!("upstream_tls = {{ ca_file = \"{}\" }}", ca.display())
        } else {
            String::new()
        };
        routes.push_str(&format!(
            r#"
[[route]]
name = "{name}"
kind = "http"
listen = "127.0.0.1:{port}"
upstream = "{scheme}://localhost:{up}/base"
{tls}
inject = {inject}
allow = ["{allow}"]
connect_timeout = "3s"
{extra}
"#,
            up = upstream.port,
        ));
    }
    if !https {
        // An upstream nobody listens on.
        let port = free_port();
        ports.insert("api-down", port);
        routes.push_str(&format!(
            r#"
[[route]]
name = "api-down"
kind = "http"
listen = "127.0.0.1:{port}"
upstream = "http://127.0.0.1:{down}/base"
inject = {{ header = "X-Api-Key", secret = "api/token" }}
allow = ["me"]
connect_timeout = "3s"
"#,
            down = free_port(),
        ));
    }
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[workload]]
name = "other"
spiffe_id = "spiffe://example.org/other"
selectors = {{ uid = 4242 }}

[[secret]]
name = "api/token"
rotation_period = "24h"
{routes}
"#,
        uid = my_uid()
    );
    let warden = Instance::new_with(&cfg);
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    warden.run(&["init"]).ok();
    warden.put("api/token", TOKEN.as_bytes()).ok();
    let daemon = warden.start_daemon();
    Setup {
        warden,
        daemon,
        upstream,
        _certs: certs,
        ports,
    }
}

/// curl with `args`; returns (status of the last response, all stdout bytes, stderr).
fn curl(args: &[&str]) -> (u16, Vec<u8>, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "20",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .expect("curl is required");
    let text = String::from_utf8_lossy(&out.stdout);
    let code = text
        .rsplit_once('\n')
        .and_then(|(_, c)| c.trim().parse().ok())
        .unwrap_or(0);
    (
        code,
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn url(s: &Setup, route: &str, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", s.ports[route])
}

fn assert_no_token_leaks(s: &Setup, client_bytes: &[u8]) {
    assert!(
        !contains_bytes(client_bytes, TOKEN.as_bytes()),
        "the token reached the client: {}",
        String::from_utf8_lossy(client_bytes)
    );
    assert!(
        !s.daemon.log_text().contains(TOKEN),
        "the token is in the daemon log"
    );
    let hits = files_containing(&s.warden.data_dir, TOKEN.as_bytes());
    assert!(hits.is_empty(), "the token is in plaintext in {hits:?}");
}

#[test]
fn http_route_injects_the_credential_and_strips_the_clients() {
    injects_the_credential_and_strips_the_clients(&setup());
}

#[test]
fn plain_http_upstream_fast_path_keeps_every_guarantee() {
    let s = setup_with("http");
    injects_the_credential_and_strips_the_clients(&s);
    let port = s.ports["api"];
    // Responses by every framing, on one pipelined connection: a chunked
    // body (with extensions and a trailer), a HEAD, a header echoing the
    // secret (dropped), then one closed by the upstream (closes the client).
    let resp = raw(
        port,
        b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\nHEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /echo-auth HTTP/1.1\r\nHost: a\r\n\r\nGET /until-close HTTP/1.1\r\nHost: a\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 4, "{resp}");
    assert!(resp.contains("transfer-encoding: chunked\r\n"), "{resp}");
    assert!(resp.contains("seen GET /base/chunked 0\n\r\n"), "{resp}");
    assert!(resp.contains(&"x".repeat(70000)), "chunked body cut short");
    assert!(
        resp.contains("0\r\nx-sum: 3\r\n\r\n"),
        "trailer lost: {resp}"
    );
    assert!(!resp.to_ascii_lowercase().contains("x-echo"), "{resp}");
    assert!(resp.ends_with("until close\n"), "{resp}");
    assert_no_token_leaks(&s, resp.as_bytes());
    // A request the fast path does not take (chunked body) after one it
    // does, on the same connection: hyper serves the rest; both arrive.
    let resp = raw(
        port,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nPOST /second HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    for seen in [
        "seen GET /base/first 0",
        "seen POST /base/second 3",
        "seen GET /base/third 0",
    ] {
        assert!(resp.contains(seen), "{seen}: {resp}");
    }
    // A client's `Connection: close` is answered with one, on the fast path too.
    let resp = raw(
        port,
        b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 1, "{resp}");
    assert!(resp.contains("\r\nconnection: close\r\n\r\n"), "{resp}");
    let recs = s.upstream.records();
    // Every request of route "api" (not the query and Basic routes) carried
    // the injected header, through either path.
    let api = |r: &&serde_json::Value| {
        let p = r["path"].as_str().unwrap_or("");
        p != "/base/b" && !p.starts_with("/base/q")
    };
    for r in recs.iter().filter(api) {
        assert_eq!(
            header_values(r, "authorization"),
            vec![format!("Bearer {TOKEN}")],
            "{r:?}"
        );
    }
    assert!(recs.iter().all(|r| r["path"] != "/base/never"), "{recs:?}");
    // An upstream nobody listens on: 502 naming it.
    let (code, body, _) = curl(&[&url(&s, "api-down", "/x")]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 502, "{text}");
    assert!(text.contains("cannot connect to 127.0.0.1:"), "{text}");
    if warden_tests::is_root() {
        // As root the eBPF monitor is loaded, so the exchanges above ran
        // over hops the kernel joined socket to socket (route.kernel_relay
        // defaults to true); the counter is read from the kernel each second.
        // Not every direction joins: one whose first bytes leave before the
        // far end is established keeps the TCP path (a loaded machine defers
        // that establishment), and upstream connections are reused across
        // clients, so few new hops are made. At least one must be joined.
        let joined = |m: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix("warden_monitor_kernel_hops_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (_, metrics) = s.warden.http_get("/metrics");
            if joined(&metrics) >= 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no hop was joined by the kernel:\n{metrics}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

#[test]
fn a_process_that_changes_uid_between_connections_is_attested_again() {
    if !warden_tests::is_root() {
        eprintln!("skipping: needs root to drop to another uid");
        return;
    }
    let s = setup_with("http");
    // Two connections as this uid (the second reuses the first attestation
    // after revalidating it), then the same process as uid 65534: it must
    // not keep the old identity.
    let script = format!(
        r#"
import http.client, os
def get():
    c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=20)
    c.request("GET", "/who")
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    return "%d %s" % (r.status, body.strip().splitlines()[-1] if body.strip() else "")
print(get())
print(get())
os.setgid(65534)
os.setuid(65534)
print(get())
"#,
        port = s.ports["api"]
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lines[0].starts_with("200 seen GET /base/who"), "{text}");
    assert!(lines[1].starts_with("200 seen GET /base/who"), "{text}");
    assert!(lines[2].starts_with("403 "), "{text}");
    assert!(lines[2].contains("uid 65534"), "{text}");
    let recs = s.upstream.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
}

fn injects_the_credential_and_strips_the_clients(s: &Setup) {
    // Two requests on one keep-alive connection, the client trying to supply its own token.
    let (code, body, err) = curl(&[
        "-v",
        "-H",
        "Authorization: Bearer client-token",
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: drop-me",
        &url(s, "api", "/v1/charges?x=1"),
        &url(s, "api", "/v1/refunds"),
    ]);
    assert_eq!(code, 200, "{}{err}", String::from_utf8_lossy(&body));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("seen GET /base/v1/charges 0"), "{text}");
    assert!(text.contains("seen GET /base/v1/refunds 0"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("x-upstream: python"),
        "{text}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("keep-alive: timeout"),
        "hop-by-hop header forwarded: {text}"
    );
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "no keep-alive: {err}"
    );
    let recs = s.upstream.records();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["path"], "/base/v1/charges?x=1");
    assert_eq!(
        header_values(&recs[0], "authorization"),
        vec![format!("Bearer {TOKEN}")]
    );
    assert_eq!(
        header_values(&recs[0], "host"),
        vec![format!("localhost:{}", s.upstream.port)]
    );
    assert!(header_values(&recs[0], "x-hop").is_empty(), "{:?}", recs[0]);
    assert!(!contains_bytes(&s.upstream.log_bytes(), b"client-token"));

    // A streamed (chunked) request body arrives whole.
    let big = "z".repeat(300_000);
    let file = s.warden.dir.path().join("body.bin");
    std::fs::write(&file, &big).unwrap();
    let (code, body, err) = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", file.display()),
        &url(s, "api", "/v1/upload"),
    ]);
    assert_eq!(code, 200, "{}{err}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("seen POST /base/v1/upload 300000"));

    // Query parameter and Basic auth injection; client copies removed.
    let (code, body, _) = curl(&[&url(s, "api-query", "/q?api_key=evil&a=1&api%5Fkey=evil2")]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (code, _, _) = curl(&["-u", "mallory:pw", &url(s, "api-basic", "/b")]);
    assert_eq!(code, 200);
    let recs = s.upstream.records();
    let q = recs
        .iter()
        .find(|r| r["path"].as_str().unwrap().starts_with("/base/q"))
        .unwrap();
    assert_eq!(q["path"], format!("/base/q?a=1&api_key={TOKEN}"));
    let b = recs.iter().find(|r| r["path"] == "/base/b").unwrap();
    use base64_check::encode;
    assert_eq!(
        header_values(b, "authorization"),
        vec![format!("Basic {}", encode(&format!("svc:{TOKEN}")))]
    );
    assert!(!contains_bytes(&s.upstream.log_bytes(), b"evil"));

    assert_no_token_leaks(s, &body);
    let (_, metrics) = s.warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_http_requests_total{result=\"forwarded\",route=\"api\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("warden_http_request_added_seconds_count{route=\"api\"} 3"));
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("\"session.start\""), "{audit}");
    assert!(!audit.contains(TOKEN));
}

/// Tiny base64 so the test does not trust warden's own encoder.
mod base64_check {
    pub fn encode(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let b = s.as_bytes();
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[test]
fn refusals_explain_themselves() {
    refusals(&setup());
}

#[test]
fn plain_http_upstream_refusals_explain_themselves() {
    refusals(&setup_with("http"));
}

fn refusals(s: &Setup) {
    let https = s.ports.contains_key("api-badca");
    if https {
        // Upstream certificate from a CA the route does not trust → 502 naming host and CA.
        let (code, body, _) = curl(&[&url(s, "api-badca", "/x")]);
        let text = String::from_utf8_lossy(&body);
        assert_eq!(code, 502, "{text}");
        assert!(text.contains("is not signed by a trusted CA"), "{text}");
        assert!(
            text.contains("localhost") && text.contains("other/ca.pem"),
            "{text}"
        );
    }
    // Workload not on the allow list → 403 naming the workload and the route.
    let (code, body, _) = curl(&[&url(s, "api-denied", "/x")]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("is workload \"me\", which may not use route \"api-denied\""),
        "{text}"
    );
    // Upstream too slow → 504.
    let (code, body, _) = curl(&[&url(s, "api", "/slow")]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 504, "{text}");
    assert!(text.contains("did not answer within 2000 ms"), "{text}");
    // Oversized header → 431.
    let big = format!("X-Big: {}", "a".repeat(40_000));
    let (code, body, _) = curl(&["-H", &big, &url(s, "api", "/x")]);
    assert_eq!(code, 431, "{}", String::from_utf8_lossy(&body));
    // Nothing refused reached the upstream (only the slow request did).
    let recs = s.upstream.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let (_, metrics) = s.warden.http_get("/metrics");
    for needle in [
        if https {
            "warden_http_requests_total{result=\"upstream_tls_error\",route=\"api-badca\"} 1"
        } else {
            "warden_http_requests_total{result=\"denied\",route=\"api-denied\"} 1"
        },
        "warden_http_requests_total{result=\"denied\",route=\"api-denied\"} 1",
        "warden_http_requests_total{result=\"upstream_timeout\",route=\"api\"} 1",
        "warden_http_requests_total{result=\"rejected\",route=\"api\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("\"session.deny\""), "{audit}");
    assert_no_token_leaks(s, &body);
}

/// Sends raw bytes on one connection; returns everything read until close.
fn raw(port: u16, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn smuggling_attempts_are_rejected() {
    smuggling(&setup());
}

#[test]
fn plain_http_upstream_smuggling_attempts_are_rejected() {
    smuggling(&setup_with("http"));
}

fn smuggling(s: &Setup) {
    let port = s.ports["api"];
    // CL.TE: a first, valid request is answered; the conflicting one is refused
    // and the request hidden in its body never reaches the upstream.
    let resp = raw(
        port,
        b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("HTTP/1.1 400 Bad Request"), "{resp}");
    assert!(
        resp.contains("both Content-Length and Transfer-Encoding"),
        "{resp}"
    );
    for (req, needle) in [
        (
            &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc"[..],
            "conflicting Content-Length",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            "malformed",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tfolded\r\n\r\n",
            "malformed",
        ),
    ] {
        let resp = raw(port, req);
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
        assert!(resp.contains(needle), "{needle}: {resp}");
    }
    // A broken chunked body is the client's fault: 400, whichever part of
    // the chunk framing is wrong.
    for (body, needle) in [
        (
            &b"FFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n"[..],
            "chunk size",
        ),
        (b"3\nabc\r\n0\r\n\r\n", "CRLF"),
        (b"3\r\nabcX\r\n0\r\n\r\n", "CRLF"),
        (b"zz\r\nabc\r\n0\r\n\r\n", "chunk size"),
    ] {
        let mut req =
            b"POST /chunky HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let resp = raw(port, &req);
        assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
        assert!(resp.contains(needle), "{needle}: {resp}");
        assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "one answer: {resp}");
    }
    // A request that could switch protocols but does not: the connection is
    // closed after its response, so nothing after it escapes the gate.
    let resp = raw(
        port,
        b"GET /maybe HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\n\r\nPOST /hidden HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
    let recs = s.upstream.records();
    let paths: Vec<_> = recs
        .iter()
        .map(|r| r["path"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        paths,
        vec!["/base/ok".to_string(), "/base/maybe".to_string()]
    );
}

/// curl through warden as `http_proxy`/`https_proxy`: (exit code, stdout, stderr).
fn curl_via_proxy(proxy: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-v", "--max-time", "20"])
        .args(args)
        .env("http_proxy", proxy)
        .env("https_proxy", proxy)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .expect("curl is required");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn forward_proxy_mode_injects_tunnels_and_refuses() {
    let certs = tempfile::tempdir().unwrap();
    let tls = warden_tests::pg::make_tls(certs.path());
    let plain_dir = certs.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let plain = Upstream::start(&plain_dir, "http", None, None, None);
    let secure = Upstream::start(
        certs.path(),
        "https",
        Some(&tls.server_cert_pem),
        Some(&tls.server_key),
        None,
    );
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[workload]]
name = "other"
spiffe_id = "spiffe://example.org/other"
selectors = {{ uid = 4242 }}

[[secret]]
name = "api/token"

[[route]]
name = "egress"
kind = "http"
listen = "127.0.0.1:{port}"
forward_proxy = true
upstream = "http://localhost:{plain}"
inject = {{ header = "X-Api-Key", secret = "api/token" }}
tunnel = ["127.0.0.1:{secure}"]
allow = ["me"]

[[route]]
name = "egress-other"
kind = "http"
listen = "127.0.0.1:{port}"
forward_proxy = true
upstream = "http://127.0.0.1:{plain}"
inject = {{ header = "X-Api-Key", secret = "api/token" }}
allow = ["other"]
"#,
        uid = my_uid(),
        plain = plain.port,
        secure = secure.port,
    );
    let warden = Instance::new_with(&cfg);
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    warden.run(&["init"]).ok();
    warden.put("api/token", TOKEN.as_bytes()).ok();
    let daemon = warden.start_daemon();
    let proxy = format!("http://127.0.0.1:{port}");

    // An http:// host with injection: the credential is added, the client's copy removed.
    let (code, out, err) = curl_via_proxy(
        &proxy,
        &[
            "-H",
            "X-Api-Key: client-copy",
            &format!("http://localhost:{}/v1/x?y=2", plain.port),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("seen GET /v1/x 0"), "{out}{err}");
    let recs = plain.records();
    assert_eq!(
        header_values(&recs[0], "x-api-key"),
        vec![TOKEN.to_string()]
    );
    assert_eq!(recs[0]["path"], "/v1/x?y=2");
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN));
    let sessions = |warden: &warden_tests::Instance| -> u64 {
        let (_, metrics) = warden.http_get("/metrics");
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("warden_sessions_total{")
                    && l.contains("route=\"egress\"")
                    && l.contains("result=\"allowed\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before_tunnel = sessions(&warden);

    // A host in the tunnel list: CONNECT, TLS end to end between curl and the upstream.
    let (code, out, err) = curl_via_proxy(
        &proxy,
        &[
            "--cacert",
            &tls.ca_pem.display().to_string(),
            &format!("https://127.0.0.1:{}/t", secure.port),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("seen GET /t 0"), "{out}{err}");
    assert!(header_values(&secure.records()[0], "x-api-key").is_empty());
    // The tunnel went through the admission step's record: audited and
    // counted as a session like any other route's.
    assert_eq!(sessions(&warden), before_tunnel + 1);
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(
        audit.contains(&format!("CONNECT tunnel to 127.0.0.1:{}", secure.port)),
        "{audit}"
    );

    // A host nobody configured → 403 naming the host.
    let (_, out, err) = curl_via_proxy(&proxy, &["http://example.invalid/"]);
    assert!(err.contains("< HTTP/1.1 403"), "{out}{err}");
    assert!(out.contains("may not reach example.invalid:80"), "{out}");
    // A host whose route does not allow this workload → 403 naming workload and route.
    let (_, out, err) = curl_via_proxy(&proxy, &[&format!("http://127.0.0.1:{}/", plain.port)]);
    assert!(err.contains("< HTTP/1.1 403"), "{out}{err}");
    assert!(
        out.contains("which may not use route \"egress-other\""),
        "{out}"
    );
    // CONNECT to a host that gets injection is refused with the way out.
    let (code, _, err) = curl_via_proxy(&proxy, &[&format!("https://localhost:{}/", plain.port)]);
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    assert_eq!(plain.records().len(), 1);

    assert!(!daemon.log_text().contains(TOKEN));
    let (_, metrics) = warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_http_requests_total{result=\"tunnel\",route=\"egress\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warden_http_requests_total{result=\"forwarded\",route=\"egress\"} 1"),
        "{metrics}"
    );
}

#[test]
fn websocket_upgrade_passes_through_with_the_credential() {
    let s = setup();
    let mut c = TcpStream::connect(("127.0.0.1", s.ports["api"])).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer client\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            c.read(&mut byte).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    c.write_all(b"ping frames\n").unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let n = c.read(&mut byte).unwrap();
        assert_eq!(n, 1, "{}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    assert_eq!(got, b"echo:ping frames\n");
    let recs = s.upstream.records();
    assert_eq!(
        header_values(&recs[0], "authorization"),
        vec![format!("Bearer {TOKEN}")]
    );
    assert_eq!(
        header_values(&recs[0], "upgrade"),
        vec!["websocket".to_string()]
    );
    assert!(!head.contains(&TOKEN.to_ascii_lowercase()));
}

fn nginx_bin() -> std::path::PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(p).is_file() {
            return p.into();
        }
    }
    "nginx".into()
}

/// nginx over TLS with HTTP/2 as the upstream: warden negotiates h2 by ALPN
/// and the injected header arrives (nginx answers 200 only for the token).
#[test]
fn http2_upstream_is_negotiated_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let tls = warden_tests::pg::make_tls(dir.path());
    let up_port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\ndaemon off;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         server {{ listen 127.0.0.1:{up_port} ssl http2; ssl_certificate {cert}; ssl_certificate_key {key};\n\
           location / {{ default_type text/plain;\n\
             if ($http_authorization = \"Bearer {TOKEN}\") {{ return 200 \"proto=$server_protocol auth=ok\\n\"; }}\n\
             return 401 \"proto=$server_protocol auth=missing\\n\"; }} }}\n}}\n",
        cert = tls.server_cert_pem.display(),
        key = tls.server_key.display(),
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut nginx = Command::new(nginx_bin())
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("nginx (Debian package nginx) is required");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", up_port)).is_err() {
        if let Ok(Some(st)) = nginx.try_wait() {
            panic!(
                "nginx exited with {st}: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
        }
        assert!(std::time::Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _nginx = Kill(nginx);
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "h2"
kind = "http"
listen = "127.0.0.1:{port}"
upstream = "https://localhost:{up_port}"
upstream_tls = {{ ca_file = "{ca}" }}
inject = {{ header = "Authorization", value = "Bearer {{secret}}", secret = "api/token" }}
allow = ["me"]
"#,
        uid = my_uid(),
        ca = tls.ca_pem.display(),
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("api/token", TOKEN.as_bytes()).ok();
    let _daemon = warden.start_daemon();
    let (code, body, err) = curl(&[
        "-H",
        "Authorization: Bearer client",
        &format!("http://127.0.0.1:{port}/a"),
        &format!("http://127.0.0.1:{port}/b"),
    ]);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, 200, "{text}{err}");
    assert_eq!(text.matches("proto=HTTP/2.0 auth=ok").count(), 2, "{text}");
    assert!(!text.contains(TOKEN));
}
