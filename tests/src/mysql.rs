//! A throw-away MariaDB server (Debian packages `mariadb-server`,
//! `mariadb-client`) for the MySQL route tests: a datadir made by
//! `mariadb-install-db` in a temp dir, `mariadbd` on a free loopback port
//! and a socket in that dir, run as the current user (`--user=root` when
//! that is root). Administration goes over the socket as root with no
//! password; SQL (passwords included) is fed on stdin, never in argv.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running mariadbd; killed on drop.
pub struct MariaDb {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// With TLS: the test CA that signed the server's certificate (for
    /// `localhost` and 127.0.0.1).
    pub ca_pem: Option<PathBuf>,
    child: Option<Child>,
    extra: Vec<String>,
}

fn bin(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

impl MariaDb {
    /// Creates a datadir and starts the server (no TLS).
    pub fn start() -> MariaDb {
        MariaDb::start_opts(false)
    }

    /// Creates a datadir and starts the server with TLS (a certificate from
    /// a test CA, see [`crate::pg::make_tls`]).
    pub fn start_tls() -> MariaDb {
        MariaDb::start_opts(true)
    }

    fn start_opts(tls: bool) -> MariaDb {
        let dir = tempfile::Builder::new()
            .prefix("warden-mariadb-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let user = if crate::is_root() {
            "root".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "nobody".into())
        };
        // Its own tmpdir: two servers bootstrapping at once in /tmp can
        // collide on temporary table names.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("mkdir {}: {e}", tmp.display()));
        let out = Command::new(bin("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg(format!("--user={user}"))
            .arg("--skip-test-db")
            .output()
            .unwrap_or_else(|e| panic!("mariadb-install-db (apt-get install mariadb-server): {e}"));
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port();
        let mut extra = Vec::new();
        let mut ca_pem = None;
        if tls {
            let files = crate::pg::make_tls(dir.path());
            extra.push(format!("--ssl-ca={}", files.ca_pem.display()));
            extra.push(format!("--ssl-cert={}", files.server_cert_pem.display()));
            extra.push(format!("--ssl-key={}", files.server_key.display()));
            ca_pem = Some(files.ca_pem);
        }
        let mut s = MariaDb {
            port,
            dir,
            ca_pem,
            child: None,
            extra,
        };
        s.spawn(&user);
        s
    }

    fn spawn(&mut self, user: &str) {
        let d = self.dir.path();
        let child = Command::new(bin("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--user={user}"))
            .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg("--skip-log-bin")
            .arg("--innodb-buffer-pool-size=16M")
            .arg("--max-allowed-packet=64M")
            .arg("--max-connections=1000")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mariadbd (apt-get install mariadb-server): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Both listeners: mariadbd opens its TCP port a moment before its
        // unix socket (which `admin` uses), a moment that grows under load.
        while TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || std::os::unix::net::UnixStream::connect(self.socket()).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Runs `sql` as root over the socket (fed on stdin): batch output.
    pub fn admin(&self, sql: &str) -> String {
        let mut child = Command::new(bin("mariadb"))
            .arg("--no-defaults")
            .arg("-S")
            .arg(self.socket())
            .args(["-u", "root", "--batch", "--skip-column-names"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("mariadb (apt-get install mariadb-client): {e}"));
        if let Some(mut si) = child.stdin.take() {
            si.write_all(sql.as_bytes())
                .unwrap_or_else(|e| panic!("mariadb stdin: {e}"));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("mariadb: {e}"));
        assert!(
            out.status.success(),
            "admin SQL failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `mariadb` CLI straight to the server over TCP as `user` with
    /// `password` (from a 0600 option file, never argv), running `sql`:
    /// (exit code, stdout + stderr).
    pub fn direct(&self, user: &str, password: &str, sql: &str) -> (i32, String) {
        use std::os::unix::fs::OpenOptionsExt;
        let cnf = self.dir.path().join("direct.cnf");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&cnf)
            .unwrap_or_else(|e| panic!("{}: {e}", cnf.display()));
        writeln!(f, "[client]\npassword={password}").unwrap_or_else(|e| panic!("{e}"));
        drop(f);
        let mut child = Command::new(bin("mariadb"))
            .arg(format!("--defaults-file={}", cnf.display()))
            .args(["-h", "127.0.0.1", "-P", &self.port.to_string(), "-u", user])
            .args(["--batch", "--skip-column-names", "--skip-ssl"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("mariadb: {e}"));
        if let Some(mut si) = child.stdin.take() {
            let _ = si.write_all(sql.as_bytes());
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("mariadb: {e}"));
        let _ = std::fs::remove_file(&cnf);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Stops the server (it can be started again with [`restart`](Self::restart)).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let user = if crate::is_root() {
            "root".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "nobody".into())
        };
        self.spawn(&user);
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `mariadb` CLI to `127.0.0.1:port` with no password, running `sql`
/// (fed on stdin) in batch mode: (exit code, stdout + stderr).
pub fn cli(port: u16, user: &str, sql: &str) -> (i32, String) {
    cli_with(port, user, &["--skip-ssl"], sql)
}

/// [`cli`] with other options (e.g. TLS ones) instead of `--skip-ssl`.
pub fn cli_with(port: u16, user: &str, opts: &[&str], sql: &str) -> (i32, String) {
    let mut child = Command::new(bin("mariadb"))
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", user])
        .args(["--batch", "--skip-column-names"])
        .args(opts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("mariadb (apt-get install mariadb-client): {e}"));
    if let Some(mut si) = child.stdin.take() {
        let _ = si.write_all(sql.as_bytes());
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("mariadb: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Python with PyMySQL (PyPI) in a venv cached under the temp dir (made
/// once per test process: tests run in parallel threads).
pub fn python_with_pymysql() -> PathBuf {
    static PY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PY.get_or_init(make_pymysql_venv).clone()
}

fn make_pymysql_venv() -> PathBuf {
    let venv = std::env::temp_dir().join("warden-pymysql-venv");
    let py = venv.join("bin/python");
    let works = |p: &Path| {
        Command::new(p)
            .args(["-c", "import pymysql"])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if works(&py) {
        return py;
    }
    let staging = std::env::temp_dir().join(format!("warden-pymysql-{}", std::process::id()));
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&staging)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "python3 -m venv failed (Debian package python3-venv)");
    let ok = Command::new(staging.join("bin/pip"))
        .args(["install", "--quiet", "PyMySQL"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "pip install PyMySQL failed (PyPI must be reachable)");
    let _ = std::fs::rename(&staging, &venv);
    if works(&py) {
        py
    } else {
        staging.join("bin/python")
    }
}

/// Runs a Python program with PyMySQL, `stdin` on its standard input (how a
/// password reaches it): (exit code, stdout + stderr).
pub fn python(program: &str, args: &[&str], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(python_with_pymysql())
        .arg("-c")
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python: {e}"));
    if let Some(mut si) = child.stdin.take() {
        let _ = si.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("python: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
