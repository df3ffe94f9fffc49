//! Local upstream servers for the http and tls route tests: a small Python
//! (standard library only) HTTPS or HTTP server that records every request it
//! receives (method, target, headers, body size) as JSON lines, and a TLS echo
//! server that requires a client certificate and records its subjectAltName.
//! Certificates come from the openssl test CA in [`crate::pg::make_tls`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER_PY: &str = r#"
import http.server, json, socketserver, ssl, sys, time
mode, port_file, log_path, cert, key, ca = sys.argv[1:7]

def record(obj):
    with open(log_path, "a") as f:
        f.write(json.dumps(obj) + "\n")

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def one(self):
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(n)
                self.rfile.readline()
        elif self.headers.get("Content-Length"):
            body = self.rfile.read(int(self.headers["Content-Length"]))
        record({"method": self.command, "path": self.path, "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.items()], "body_len": len(body)})
        if "/slow" in self.path:
            time.sleep(4)
        if "/ws" in self.path and self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            line = self.rfile.readline()
            self.wfile.write(b"echo:" + line)
            self.wfile.flush()
            self.close_connection = True
            return
        out = ("seen %s %s %d\n" % (self.command, self.path.split("?")[0], len(body))).encode()
        if "/chunked" in self.path:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "x-sum")
            self.end_headers()
            for piece in (out, b"second piece\n", b"x" * 70000):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\nx-sum: 3\r\n\r\n")
            return
        if "/until-close" in self.path:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(out + b"until close\n")
            self.close_connection = True
            return
        self.send_response(200)
        if "/echo-auth" in self.path:
            self.send_header("X-Echo", self.headers.get("Authorization", ""))
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Upstream", "python")
        self.send_header("Keep-Alive", "timeout=5")
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = one
    def do_HEAD(self):
        record({"method": "HEAD", "path": self.path, "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.items()], "body_len": 0})
        self.send_response(200)
        self.send_header("Content-Length", "12")
        self.end_headers()

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        peer = self.request.getpeercert() if hasattr(self.request, "getpeercert") else None
        record({"san": [list(x) for x in peer.get("subjectAltName", ())] if peer else []})
        for line in self.rfile:
            self.wfile.write(b"echo:" + line)
            self.wfile.flush()

def tls_context(require_client):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca)
    return ctx

if mode in ("echo", "plain-echo"):
    class S(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
    srv = S(("127.0.0.1", 0), Echo)
    if mode == "echo":
        srv.socket = tls_context(True).wrap_socket(srv.socket, server_side=True)
else:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    if mode == "https":
        srv.socket = tls_context(False).wrap_socket(srv.socket, server_side=True)
with open(port_file + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os
os.rename(port_file + ".tmp", port_file)
srv.serve_forever()
"#;

/// A running upstream server; killed on drop.
pub struct Upstream {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Upstream {
    /// `mode`: "http", "https" (server cert/key), "plain-echo" (TCP echo) or
    /// "echo" (TLS echo that
    /// requires a client certificate issued by `client_ca`).
    pub fn start(
        dir: &Path,
        mode: &str,
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Upstream {
        let script = dir.join("upstream.py");
        std::fs::write(&script, SERVER_PY).unwrap_or_else(|e| panic!("write script: {e}"));
        let port_file = dir.join(format!("upstream-{mode}.port"));
        let log = dir.join(format!("upstream-{mode}.jsonl"));
        let s = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let child = Command::new("python3")
            .arg(&script)
            .args([
                mode,
                &s(Some(&port_file)),
                &s(Some(&log)),
                &s(cert),
                &s(key),
                &s(client_ca),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 (Debian package python3) is required: {e}"));
        let mut u = Upstream {
            child,
            port: 0,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                if let Ok(p) = text.trim().parse() {
                    u.port = p;
                    return u;
                }
            }
            if let Ok(Some(st)) = u.child.try_wait() {
                panic!("upstream server exited with {st}");
            }
            assert!(Instant::now() < deadline, "upstream server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every record written so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Raw bytes of the record log.
    pub fn log_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.log).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The values of header `name` (case-insensitive) in a recorded request.
pub fn header_values(rec: &serde_json::Value, name: &str) -> Vec<String> {
    rec["headers"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
                .filter_map(|h| h[1].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
