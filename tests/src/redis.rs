//! A throw-away `redis-server` (Debian package `redis-server`) for the Redis
//! route tests: its own temp dir, a free port on loopback, no persistence,
//! `requirepass` for the default user and an ACL user `app`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server; killed on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl RedisServer {
    /// Starts redis-server with `requirepass = default_password` and an ACL
    /// user `app` whose password is `app_password`.
    pub fn start(default_password: &str, app_password: &str) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("warden-redis-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let port = crate::free_port();
        let conf = dir.path().join("redis.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsave \"\"\nappendonly no\ndaemonize no\nlogfile {}\nrequirepass {default_password}\nuser app on >{app_password} ~* &* +@all\n",
            dir.path().display(),
            dir.path().join("redis.log").display()
        );
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("write redis.conf: {e}"));
        let child = Command::new(server_bin())
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server (apt-get install redis-server): {e}"));
        let s = RedisServer { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start: {}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// redis-cli straight to the server, logged in as `user` with `password`.
    pub fn cli_as(&self, user: &str, password: &str, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--user",
                user,
            ])
            .env("REDISCLI_AUTH", password)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_bin() -> PathBuf {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// redis-cli to `port` with no password: (exit code, stdout).
pub fn cli(port: u16, args: &[&str]) -> (i32, String) {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .env_remove("REDISCLI_AUTH")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli (apt-get install redis-tools): {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A raw RESP connection.
pub struct Raw(pub TcpStream);

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        Raw(s)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.0
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// Reads until `want` bytes arrived (or EOF/timeout): what came.
    pub fn read_at_least(&mut self, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while got.len() < want {
            match self.0.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        got
    }

    /// Reads until `needle` appears (or EOF/timeout).
    pub fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while !crate::contains_bytes(&got, needle) {
            match self.0.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        got
    }

    /// Everything until the peer closes.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = self.0.read_to_end(&mut got);
        got
    }
}

/// A command as a RESP array.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}
