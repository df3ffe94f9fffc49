//! The SPIFFE Workload API of a running warden, exercised by independent
//! clients: the Rust `spiffe` crate and the Python `spiffe` package (PyPI),
//! with openssl verifying what they received.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use warden_tests::my_uid;
use warden_tests::Instance;

/// A daemon whose only workload is "this uid" (or `uid` when given).
fn instance_for_uid(uid: u32) -> Instance {
    let cfg = format!(
        r#"
trust_domain = "example.org"

[identity]
svid_ttl = "1m"
workload_api_socket = "workload.sock"

[[workload]]
name = "tester"
spiffe_id = "spiffe://example.org/tester"
selectors = {{ uid = {uid} }}
"#
    );
    let i = Instance::new_with(&cfg);
    i.run(&["init"]).ok();
    i
}

fn endpoint(i: &Instance) -> String {
    format!("unix:{}", i.dir.path().join("workload.sock").display())
}

fn openssl_verify(dir: &Path, bundle_der: &[Vec<u8>], leaf_der: &[u8]) -> bool {
    let pem = |der: &[u8]| {
        let out = Command::new("openssl")
            .args(["x509", "-inform", "DER", "-outform", "PEM"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(der)?;
                c.wait_with_output()
            })
            .expect("openssl (Debian package openssl) is required");
        String::from_utf8(out.stdout).unwrap()
    };
    let bundle: String = bundle_der.iter().map(|d| pem(d)).collect();
    std::fs::write(dir.join("wl-bundle.pem"), bundle).unwrap();
    std::fs::write(dir.join("wl-leaf.pem"), pem(leaf_der)).unwrap();
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("wl-bundle.pem"))
        .arg(dir.join("wl-leaf.pem"))
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_spiffe_client_gets_svid_bundle_and_jwt() {
    let i = instance_for_uid(my_uid());
    let _d = i.start_daemon();
    let client = spiffe::WorkloadApiClient::connect_to(endpoint(&i))
        .await
        .unwrap();

    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/tester");
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let bundle: Vec<Vec<u8>> = bundles
        .get(&td)
        .expect("bundle for example.org")
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert!(openssl_verify(
        i.dir.path(),
        &bundle,
        svid.leaf().as_bytes()
    ));
    // The bundle is the one `warden svid bundle` prints.
    assert!(i
        .run(&["svid", "bundle"])
        .ok()
        .stdout
        .contains("BEGIN CERTIFICATE"));

    // JWT-SVID: fetched, validated by the server and locally against the JWT bundle.
    let jwt = client.fetch_jwt_svid(["orders-db"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/tester");
    let remote = client
        .validate_jwt_token("orders-db", jwt.token())
        .await
        .unwrap();
    assert_eq!(
        remote.spiffe_id().to_string(),
        "spiffe://example.org/tester"
    );
    assert!(client
        .validate_jwt_token("payments", jwt.token())
        .await
        .is_err());
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["orders-db"]).unwrap();

    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(
        audit.contains("svid.issue") && audit.contains("jwt.issue"),
        "{audit}"
    );
    // No private key material reaches the audit log or the daemon log.
    let key_hex: String = svid.private_key().as_ref()[36..52]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!audit.contains(&key_hex));
    assert!(!std::fs::read_to_string(&_d.log).unwrap().contains(&key_hex));
}

#[tokio::test(flavor = "multi_thread")]
async fn unregistered_caller_gets_permission_denied() {
    // Registered: only uid 65534, so this test process matches nothing.
    let i = instance_for_uid(if my_uid() == 65534 { 65533 } else { 65534 });
    let _d = i.start_daemon();
    let client = spiffe::WorkloadApiClient::connect_to(endpoint(&i))
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err().to_string();
    assert!(
        err.contains("PermissionDenied") || err.to_lowercase().contains("permission"),
        "{err}"
    );
    assert!(client.fetch_jwt_svid(["x"], None).await.is_err());
    let (_, metrics) = i.http_get("/metrics");
    assert!(
        metrics.contains("warden_workload_api_denied_total{op=\"FetchX509SVID\"} 1"),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(i.audit_log()).unwrap();
    assert!(
        audit.contains("svid.deny") && audit.contains("matches no registered workload"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_delivers_the_rotated_svid_before_expiry() {
    let i = instance_for_uid(my_uid());
    let _d = i.start_daemon();
    let client = spiffe::WorkloadApiClient::connect_to(endpoint(&i))
        .await
        .unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    use tokio_stream::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first SVID at once")
        .unwrap()
        .unwrap();
    // svid_ttl = 1m: the refresh comes at 30 s ± 3 s, long before expiry.
    let second = tokio::time::timeout(Duration::from_secs(50), stream.next())
        .await
        .expect("rotated SVID within the half-life window")
        .unwrap()
        .unwrap();
    assert_ne!(first.leaf().as_bytes(), second.leaf().as_bytes());
    let first_na = not_after(first.leaf().as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now < first_na,
        "the rotated SVID arrived after the old one expired"
    );
}

fn not_after(der: &[u8]) -> i64 {
    let out = Command::new("openssl")
        .args([
            "x509", "-inform", "DER", "-noout", "-enddate", "-dateopt", "iso_8601",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(der)?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let date = text.trim().trim_start_matches("notAfter=").to_string();
    let st = Command::new("date")
        .args(["-d", &date, "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&st.stdout).trim().parse().unwrap()
}

/// Python `spiffe` (PyPI) in a venv cached under the temp dir.
fn python_with_spiffe() -> PathBuf {
    let venv = std::env::temp_dir().join("warden-pyspiffe-venv");
    let py = venv.join("bin/python");
    let works = |p: &Path| {
        Command::new(p)
            .args(["-c", "import spiffe, cryptography"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if works(&py) {
        return py;
    }
    let staging = std::env::temp_dir().join(format!("warden-pyspiffe-{}", std::process::id()));
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&staging)
        .status()
        .unwrap()
        .success();
    assert!(ok, "python3 -m venv failed (Debian package python3-venv)");
    let ok = Command::new(staging.join("bin/pip"))
        .args(["install", "--quiet", "spiffe", "cryptography"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "pip install spiffe failed (PyPI must be reachable)");
    let _ = std::fs::rename(&staging, &venv);
    if works(&py) {
        py
    } else {
        staging.join("bin/python")
    }
}

const PY_CLIENT: &str = r#"
import json, sys
from spiffe import WorkloadApiClient, TrustDomain
out = {}
try:
    with WorkloadApiClient(socket_path=sys.argv[1], default_timeout=10) as c:
        svid = c.fetch_x509_svid()
        b = c.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain("example.org"))
        from cryptography.hazmat.primitives import serialization
        out["spiffe_id"] = str(svid.spiffe_id)
        out["leaf"] = svid.leaf.public_bytes(serialization.Encoding.PEM).decode()
        out["bundle"] = "".join(a.public_bytes(serialization.Encoding.PEM).decode() for a in b.x509_authorities)
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

#[test]
fn python_spiffe_client_gets_an_svid_that_openssl_verifies() {
    let py = python_with_spiffe();
    let i = instance_for_uid(my_uid());
    let _d = i.start_daemon();
    let out = Command::new(&py)
        .arg("-c")
        .arg(PY_CLIENT)
        .arg(endpoint(&i))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(v.get("error").is_none(), "{v}");
    assert_eq!(v["spiffe_id"], "spiffe://example.org/tester");
    let dir = i.dir.path();
    std::fs::write(dir.join("py-leaf.pem"), v["leaf"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("py-bundle.pem"), v["bundle"].as_str().unwrap()).unwrap();
    let ok = Command::new("openssl")
        .args(["verify", "-CAfile", "py-bundle.pem", "py-leaf.pem"])
        .current_dir(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Any Workload API request or response, decoded without its fields: enough
/// to see the status of a call.
#[derive(Clone, PartialEq, prost::Message)]
struct Opaque {}

async fn raw_first_message(
    i: &Instance,
    method: &'static str,
    header: Option<&str>,
) -> Result<Opaque, tonic::Status> {
    let endpoint = spiffe::transport::Endpoint::parse(&endpoint(i)).unwrap();
    let channel = spiffe::transport::connect(&endpoint).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(Opaque {});
    if let Some(v) = header {
        req.metadata_mut()
            .insert("workload.spiffe.io", v.parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_static(method);
    let mut stream = grpc
        .server_streaming(
            req,
            path,
            tonic_prost::ProstCodec::<Opaque, Opaque>::default(),
        )
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("stream ended without a message"))
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_the_security_header_are_invalid_arguments() {
    let i = instance_for_uid(my_uid());
    let _d = i.start_daemon();
    for header in [None, Some("yes")] {
        let err = raw_first_message(&i, "/SpiffeWorkloadAPI/FetchX509SVID", header)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{header:?}: {err}"
        );
        assert!(err.message().contains("security header"), "{err}");
    }
    // The same raw client with the header is served.
    raw_first_message(&i, "/SpiffeWorkloadAPI/FetchX509SVID", Some("true"))
        .await
        .unwrap();
    let err = raw_first_message(&i, "/SpiffeWorkloadAPI/NoSuchMethod", Some("true"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_executable_hash_gets_permission_denied() {
    // Right uid, but the registration pins another executable.
    let cfg = format!(
        r#"
trust_domain = "example.org"

[identity]
workload_api_socket = "workload.sock"

[[workload]]
name = "pinned"
spiffe_id = "spiffe://example.org/pinned"
selectors = {{ uid = {}, exe_sha256 = "{}" }}
"#,
        my_uid(),
        "ab".repeat(32)
    );
    let i = Instance::new_with(&cfg);
    i.run(&["init"]).ok();
    let _d = i.start_daemon();
    let client = spiffe::WorkloadApiClient::connect_to(endpoint(&i))
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("permission"), "{err}");
}
