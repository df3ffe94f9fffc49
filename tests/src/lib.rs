//! Harness for warden's end-to-end tests: each test gets a private instance (a
//! temp dir holding the data dir, the admin socket and a config file) and runs
//! the real `warden` binary against it, with real clients (curl, ps, sqlite3,
//! promtool).
//!
//! The binary is `$WARDEN_BIN` when set (as `cargo xtask test` does), else
//! `target/debug/warden` next to this test executable.

pub mod cgroup;
pub mod fleet;
pub mod fulldisk;
pub mod mysql;
pub mod pg;
pub mod prom;
pub mod redis;
pub mod upstream;
pub mod webhook;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the warden binary under test.
pub fn warden_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WARDEN_BIN") {
        return PathBuf::from(p);
    }
    // target/debug/deps/<test-exe> → target/debug/warden
    let exe = std::env::current_exe().unwrap_or_default();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("warden"))
        .unwrap_or_default();
    assert!(
        bin.exists(),
        "warden binary not found at {}: run `cargo xtask test` or `cargo build -p warden` first",
        bin.display()
    );
    bin
}

/// What a finished `warden` invocation produced.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "expected success, got {self:#?}");
        self
    }
    pub fn code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "expected exit code {code}, got {self:#?}");
        self
    }
    pub fn stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        self
    }
    pub fn stdout_has(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}: {self:#?}"
        );
        self
    }
}

/// An exclusive `flock` on `<tmp>/warden-tests-<name>.lock`, held until the
/// file is dropped: what several tests must not do at once takes turns also
/// across processes (nextest runs each test in its own process, so an
/// in-process mutex does not serialise them).
#[allow(clippy::incompatible_msrv)] // File::lock: stable since Rust 1.89
pub fn exclusive_lock(name: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("warden-tests-{name}.lock"));
    let file = lock_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    loop {
        match file.lock() {
            Ok(()) => return file,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("flock {}: {e}", path.display()),
        }
    }
}

/// The file an `flock` is taken on (created if missing, never truncated).
fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// A free TCP port on loopback (bound then released), never one this
/// process handed out before (a test that asks twice — a route and the
/// metrics endpoint — must get two). Ports come from 20000–32767, below the
/// kernel's ephemeral range (32768–60999): a port from that range can be
/// taken meanwhile as the source port of some test's outgoing connection,
/// and the daemon's later bind then fails with "address already in use".
///
/// A port is also reserved across processes until this one exits, by an
/// exclusive `flock` on `<tmp>/warden-tests-ports/<port>.lock` taken without
/// waiting and never released: else two tests running at once could both
/// find a port free before either daemon bound it.
#[allow(clippy::incompatible_msrv)] // File::try_lock: stable since Rust 1.89
pub fn free_port() -> u16 {
    use std::collections::HashMap;
    use std::sync::Mutex;
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_768;
    // Each port's lock file, open for the life of the process: that is the
    // reservation (`None`: no lock file could be made, e.g. in another
    // user's directory; the port is then only checked free).
    static GIVEN: Mutex<Option<HashMap<u16, Option<std::fs::File>>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashMap::new);
    let dir = std::env::temp_dir().join("warden-tests-ports");
    let _ = std::fs::create_dir_all(&dir);
    // Test processes run in parallel: start each at its own place.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let start = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % SPAN;
    for i in 0..SPAN {
        let port = u16::try_from(FIRST + (start + i * 7_919) % SPAN).unwrap_or(0);
        if port == 0 || given.contains_key(&port) {
            continue;
        }
        let path = dir.join(format!("{port}.lock"));
        let file = lock_file(&path).ok();
        if let Some(file) = &file {
            match file.try_lock() {
                Ok(()) => {}
                // Another test process holds it.
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => panic!("flock {}: {e}", path.display()),
            }
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port, file);
            return port;
        }
    }
    0
}

/// A private warden instance in a temp dir.
pub struct Instance {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub metrics_port: u16,
}

impl Instance {
    /// A fresh instance with a config but no `init` yet. `extra_toml` goes after
    /// the top-level keys and before the `[admin]`/`[metrics]` tables, so it may
    /// start with top-level keys and end with tables of its own.
    pub fn new_with(extra_toml: &str) -> Instance {
        let dir = tempfile::Builder::new()
            .prefix("warden-e2e-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let data_dir = dir.path().join("data");
        let socket = dir.path().join("admin.sock");
        let config = dir.path().join("warden.toml");
        let metrics_port = free_port();
        let text = format!(
            "data_dir = \"data\"\nenvironment = \"prod\"\n{extra_toml}\n\n[admin]\nsocket = \"admin.sock\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
        );
        std::fs::write(&config, text).unwrap_or_else(|e| panic!("write config: {e}"));
        Instance {
            dir,
            data_dir,
            socket,
            config,
            metrics_port,
        }
    }

    pub fn new() -> Instance {
        Self::new_with("")
    }

    /// A fresh instance, initialised with the default (file) master key.
    pub fn initialised() -> Instance {
        let i = Self::new();
        i.run(&["init"]).ok();
        i
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(warden_bin());
        c.arg("--config").arg(&self.config).args(args);
        c.env_remove("WARDEN_CONFIG").env("WARDEN_LOG", "warn");
        c
    }

    /// Runs `warden --config <cfg> ARGS` with empty stdin.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, b"")
    }

    /// Runs `warden --config <cfg> ARGS` feeding `stdin`.
    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn warden: {e}"));
        if let Some(mut si) = child.stdin.take() {
            let _ = si.write_all(stdin);
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait warden: {e}"));
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Stores `value` as `name` (env from the config: prod).
    pub fn put(&self, name: &str, value: &[u8]) -> Output {
        self.run_stdin(&["secret", "put", name], value)
    }

    /// Starts `warden up` and waits until `warden status` answers.
    pub fn start_daemon(&self) -> Daemon {
        let log = self.dir.path().join("daemon.log");
        let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("log: {e}"));
        let errf = logf.try_clone().unwrap_or_else(|e| panic!("log: {e}"));
        let child = self
            .command(&["up"])
            .env("WARDEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn warden up: {e}"));
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.run(&["status"]).code == 0 {
                return d;
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("warden up exited with {st}: {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET http://127.0.0.1:<metrics>/<path> with curl: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{}{path}", self.metrics_port))
            .output()
            .unwrap_or_else(|e| panic!("curl: {e} (is curl installed?)"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn audit_log(&self) -> PathBuf {
        self.data_dir.join("audit.log")
    }
}

impl Default for Instance {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `warden up`; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// True when `haystack` contains `needle` as raw bytes.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if std::fs::read(&p).is_ok_and(|b| contains_bytes(&b, needle)) {
            hits.push(p);
        }
    }
    hits
}

/// This process's effective uid (from `/proc/self/status`).
pub fn my_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

pub fn is_root() -> bool {
    my_uid() == 0
}

/// For tests of the kernel programs: true as root; otherwise prints
/// `skipping: needs root` and returns false — unless `WARDEN_REQUIRE_EBPF`
/// is set (`cargo xtask test` as root, as in CI), where running without root
/// is a failure, so these tests never skip silently there.
pub fn have_root() -> bool {
    if !is_root() {
        assert!(
            std::env::var_os("WARDEN_REQUIRE_EBPF").is_none(),
            "WARDEN_REQUIRE_EBPF is set but the tests do not run as root"
        );
        eprintln!("skipping: needs root");
        return false;
    }
    true
}

/// The value of one metric line of `w`'s `/metrics` (`name{labels}`, labels
/// in the exporter's order), 0 when absent.
pub fn metric(w: &Instance, series: &str) -> f64 {
    w.http_get("/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `ok` every 50 ms; fails the test naming `what` after 20 s.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The `session.end` audit records of `route` (every route: `None`).
pub fn session_ends(w: &Instance, route: Option<&str>) -> Vec<String> {
    let route = route.map(|r| format!("\"route\":\"{r}\""));
    std::fs::read_to_string(w.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"session.end\""))
        .filter(|l| route.as_ref().is_none_or(|r| l.contains(r.as_str())))
        .map(str::to_string)
        .collect()
}

/// The up and down byte counts a session's end record states.
pub fn byte_counts(record: &str) -> (u64, u64) {
    let parse = |s: &str| {
        s.parse()
            .unwrap_or_else(|_| panic!("byte count in {record}"))
    };
    let (before, rest) = record
        .split_once(" bytes up, ")
        .unwrap_or_else(|| panic!("no byte counts in {record}"));
    let up = parse(before.rsplit(' ').next().unwrap_or(""));
    let down = parse(rest.split_once(" bytes down").map_or("", |p| p.0));
    (up, down)
}

/// A warden with two session threads (`session_threads = 2`) and one route
/// named `sharded` of `kind` to `127.0.0.1:upstream` (`route_keys`: its
/// credential and other keys), allowed to this uid, the monitor off;
/// `secret` holds `value`. Checks that the route listens on two sockets
/// (one per shard, `SO_REUSEPORT`) and returns the instance, its daemon and
/// the route's port.
pub fn start_sharded(
    kind: &str,
    upstream: u16,
    route_keys: &str,
    secret: &str,
    value: &[u8],
) -> (Instance, Daemon, u16) {
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"
session_threads = 2

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "sharded"
kind = "{kind}"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{upstream}"
upstream_tls = {{ mode = "disable" }}
{route_keys}
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put(secret, value).ok();
    let daemon = warden.start_daemon();
    let listening = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss");
    let listening = String::from_utf8_lossy(&listening.stdout);
    assert_eq!(listening.lines().count(), 2, "{listening}");
    (warden, daemon, port)
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn a_port_handed_out_is_reserved_for_other_processes_and_not_given_twice() {
        let first = free_port();
        let second = free_port();
        assert_ne!(first, 0);
        assert_ne!(first, second, "one process is never given a port twice");
        // Another process (flock(1)) cannot take the reservation while this
        // one lives.
        for port in [first, second] {
            let lock = std::env::temp_dir()
                .join("warden-tests-ports")
                .join(format!("{port}.lock"));
            let other = std::process::Command::new("flock")
                .arg("--nonblock")
                .arg(&lock)
                .arg("true")
                .status()
                .expect("flock(1)");
            assert!(
                !other.success(),
                "port {port} reserved at {}",
                lock.display()
            );
        }
    }
}
