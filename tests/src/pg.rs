//! Throw-away PostgreSQL clusters for the end-to-end tests.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temp dir under `/tmp`, writes
//! `postgresql.conf` (a free TCP port on 127.0.0.1, a private unix socket dir,
//! durability off for speed) and `pg_hba.conf` (`local` trust for the harness,
//! `host`/`hostssl` on 127.0.0.1 with the method under test), optionally makes a
//! test CA and a server certificate with the `openssl` CLI, and starts the
//! server with `pg_ctl`. The harness administers the cluster as the superuser
//! over the unix socket ([`PgCluster::psql_admin`]); clients under test connect
//! over TCP with a password ([`PgCluster::dsn_direct`], [`run_psql`]).
//!
//! The server binaries are taken from `$PG_BIN_DIR` (set by `cargo xtask
//! test`), else the highest `/usr/lib/postgresql/*/bin`, else `pg_config
//! --bindir`. `initdb` and `postgres` refuse to run as root, so when the tests
//! run as root they run as the `postgres` system user (via `setpriv`, or
//! `runuser` when `setpriv` is missing), and the temp dir is handed to it.
//!
//! Every command the harness runs has a deadline. The cluster is stopped and
//! its dir removed by [`PgCluster::stop`] or on drop; should the test process
//! die without unwinding (SIGKILL, a timeout, Ctrl-C), a small watchdog `sh`
//! that waits for EOF on a pipe from the test process shuts the server down
//! and removes the dir. Do not keep clusters in statics: those are never
//! dropped (the watchdog then cleans up when the process exits).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{is_root, Output};

/// The OS account the server runs as when the tests run as root.
const PG_OS_USER: &str = "postgres";
/// The database superuser `initdb` creates (`-U`).
const SUPERUSER: &str = "postgres";
/// `pg_ctl -t`: how long `pg_ctl` waits for start/stop.
const PG_CTL_WAIT: Duration = Duration::from_secs(30);
/// Our own bound on a `pg_ctl` run (its `-t` plus a margin).
const PG_CTL_DEADLINE: Duration = Duration::from_secs(45);
const INITDB_DEADLINE: Duration = Duration::from_secs(90);
const OPENSSL_DEADLINE: Duration = Duration::from_secs(30);
/// Bound on one `psql`/`pgbench` run.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);
/// `connect_timeout` put into DSNs and `PGCONNECT_TIMEOUT` for the harness.
const CONNECT_TIMEOUT_SECS: u32 = 10;
/// How often a start is retried when another process took the port first.
const PORT_ATTEMPTS: usize = 4;

/// The password method for TCP connections (`pg_hba.conf` and `initdb
/// --auth-host`); also decides `password_encryption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `scram-sha-256`, passwords stored as SCRAM verifiers.
    Scram,
    /// `md5`, passwords stored as `md5…` hashes.
    Md5,
    /// `trust`: any (or no) password is accepted; passwords stored as SCRAM.
    Trust,
}

impl Auth {
    /// The `pg_hba.conf` method name.
    pub fn hba_method(self) -> &'static str {
        match self {
            Auth::Scram => "scram-sha-256",
            Auth::Md5 => "md5",
            Auth::Trust => "trust",
        }
    }

    /// The `password_encryption` setting matching the method.
    pub fn password_encryption(self) -> &'static str {
        match self {
            Auth::Md5 => "md5",
            Auth::Scram | Auth::Trust => "scram-sha-256",
        }
    }
}

/// What kind of cluster [`PgCluster::start`] makes.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub auth: Auth,
    /// `ssl = on` with a certificate from a test CA ([`PgCluster::ca_pem`]);
    /// TCP clients must use TLS (`hostssl` only, plain `host` is rejected).
    pub tls: bool,
    /// `max_connections`; note that 3 of them are reserved for the superuser
    /// (`superuser_reserved_connections`), so it must be at least 4.
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            auth: Auth::Scram,
            tls: false,
            max_connections: 100,
        }
    }
}

impl ClusterOptions {
    /// Defaults (no TLS, 100 connections) with the given auth method.
    pub fn new(auth: Auth) -> Self {
        ClusterOptions {
            auth,
            ..Self::default()
        }
    }
}

/// A running throw-away PostgreSQL server; stopped and removed on drop.
pub struct PgCluster {
    /// The TCP port on [`PgCluster::host`] (also the unix socket's suffix).
    pub port: u16,
    /// Always `127.0.0.1`.
    pub host: String,
    /// The private unix socket dir (`psql -h <socket_dir> -p <port>`).
    pub socket_dir: PathBuf,
    /// The database superuser (`postgres`); trusted over the unix socket only.
    pub superuser: String,
    /// TLS clusters: the test CA certificate clients verify the server with.
    pub ca_pem: Option<PathBuf>,
    /// TLS clusters: the server certificate (SAN `DNS:localhost`, `IP:127.0.0.1`).
    pub server_cert_pem: Option<PathBuf>,
    pub auth: Auth,
    pub tls: bool,
    /// The temp dir holding everything below; removed by `stop`.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// The server log (`pg_ctl -l`).
    pub log_file: PathBuf,
    bin_dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// `None` once stopped.
    dir: Option<tempfile::TempDir>,
    watchdog: Option<Child>,
}

impl PgCluster {
    /// Makes and starts a cluster; panics (with the server log) if it cannot.
    pub fn start(opts: ClusterOptions) -> PgCluster {
        let bin_dir = pg_bin_dir();
        let root = is_root();
        if root {
            assert!(
                os_user_exists(PG_OS_USER),
                "running as root, but there is no `{PG_OS_USER}` system user to run the \
                 PostgreSQL server as (initdb and postgres refuse root): install the \
                 postgresql package or run the tests as an ordinary user"
            );
        }

        let tmp_parent = if Path::new("/tmp").is_dir() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let tmp = tempfile::Builder::new()
            .prefix("warden-pg-")
            .tempdir_in(&tmp_parent)
            .unwrap_or_else(|e| panic!("pg harness: tempdir in {}: {e}", tmp_parent.display()));
        let dir = tmp.path().to_path_buf();
        // The server user must be able to traverse it (tempfile makes it 0700).
        set_mode(&dir, 0o755);
        let data_dir = dir.join("data");
        let socket_dir = dir.join("sock");
        let log_file = dir.join("postgres.log");
        mkdir(&socket_dir, 0o755);

        let mut cluster = PgCluster {
            port: 0,
            host: "127.0.0.1".to_string(),
            socket_dir,
            superuser: SUPERUSER.to_string(),
            ca_pem: None,
            server_cert_pem: None,
            auth: opts.auth,
            tls: opts.tls,
            dir: dir.clone(),
            data_dir,
            log_file,
            bin_dir,
            state: Mutex::new(State {
                dir: Some(tmp),
                watchdog: None,
            }),
        };
        // From here on a panic drops `cluster`, which stops whatever runs and
        // removes the dir.
        cluster.spawn_watchdog();

        let mut tls_files = None;
        if opts.tls {
            let tls_dir = dir.join("tls");
            mkdir(&tls_dir, 0o755);
            let files = make_tls(&tls_dir);
            cluster.ca_pem = Some(files.ca_pem.clone());
            cluster.server_cert_pem = Some(files.server_cert_pem.clone());
            tls_files = Some(files);
        }
        if root {
            let out = run(
                {
                    let mut c = Command::new("chown");
                    c.arg("-R")
                        .arg(format!("{PG_OS_USER}:{PG_OS_USER}"))
                        .arg(&dir);
                    c
                },
                b"",
                OPENSSL_DEADLINE,
                "chown",
            );
            assert_eq!(
                out.code, 0,
                "pg harness: chown -R {PG_OS_USER} failed: {out:#?}"
            );
        }

        cluster.initdb(opts.auth);
        cluster.write_hba(opts.auth, opts.tls);
        cluster.port = cluster.start_server(&opts, tls_files.as_ref());
        cluster.wait_ready();
        cluster
    }

    /// Runs `sql` (any number of statements, psql meta-commands allowed) as the
    /// superuser over the unix socket with `ON_ERROR_STOP`; returns the
    /// unaligned, tuples-only output without the trailing newline. Panics with
    /// psql's stderr on failure.
    pub fn psql_admin(&self, sql: &str) -> String {
        self.admin_in("postgres", sql, sql)
    }

    /// [`PgCluster::psql_admin`] in database `db`.
    pub fn psql_admin_in(&self, db: &str, sql: &str) -> String {
        self.admin_in(db, sql, sql)
    }

    /// `CREATE ROLE name LOGIN PASSWORD …` (stored with the cluster's
    /// `password_encryption`) and a database `name` owned by it, in which it may
    /// create tables (so `pgbench -i` works).
    pub fn create_role(&self, name: &str, password: &str) {
        let role = quote_ident(name);
        let enc = self.auth.password_encryption();
        let sql = format!(
            "SET password_encryption = '{enc}';\n\
             CREATE ROLE {role} LOGIN PASSWORD {pw};\n\
             CREATE DATABASE {role} OWNER {role};\n\
             GRANT ALL PRIVILEGES ON DATABASE {role} TO {role};\n",
            pw = quote_literal(password),
        );
        let shown = format!("create_role({name:?}, <password>)");
        self.admin_in("postgres", &sql, &shown);
        // Since PostgreSQL 15 `public` belongs to the database owner anyway;
        // the grant keeps it explicit (and independent of the server version).
        self.admin_in(
            name,
            &format!("GRANT ALL ON SCHEMA public TO {role};\n"),
            &shown,
        );
    }

    /// `ALTER ROLE role PASSWORD …` (with the cluster's `password_encryption`).
    pub fn set_password(&self, role: &str, password: &str) {
        let sql = format!(
            "SET password_encryption = '{}';\nALTER ROLE {} PASSWORD {};\n",
            self.auth.password_encryption(),
            quote_ident(role),
            quote_literal(password)
        );
        let shown = format!("set_password({role:?}, <password>)");
        self.admin_in("postgres", &sql, &shown);
    }

    /// A libpq connection string for connecting straight to the server over
    /// TCP (no warden in between). TLS clusters get `sslmode=verify-full` with
    /// the test CA (the certificate names 127.0.0.1 and localhost); plain
    /// clusters `sslmode=disable`. Keys given twice: the last one wins, so
    /// callers may append overrides.
    pub fn dsn_direct(&self, user: &str, db: &str, password: &str) -> String {
        let port = self.port.to_string();
        let timeout = CONNECT_TIMEOUT_SECS.to_string();
        let mut kv: Vec<(&str, &str)> = vec![
            ("host", &self.host),
            ("port", &port),
            ("user", user),
            ("dbname", db),
            ("password", password),
            ("connect_timeout", &timeout),
        ];
        let ca;
        match &self.ca_pem {
            Some(path) if self.tls => {
                ca = path.to_string_lossy().into_owned();
                kv.push(("sslmode", "verify-full"));
                kv.push(("sslrootcert", &ca));
            }
            _ => kv.push(("sslmode", "disable")),
        }
        conninfo(&kv)
    }

    /// `pg_dump` of database `db` (plain SQL, everything: schema and data)
    /// as the superuser over the unix socket. Panics if it fails.
    pub fn pg_dump(&self, db: &str) -> String {
        let sock = self.socket_dir.to_string_lossy();
        let port = self.port.to_string();
        let dsn = conninfo(&[
            ("host", &sock),
            ("port", &port),
            ("user", SUPERUSER),
            ("dbname", db),
        ]);
        let mut c = Command::new(self.bin("pg_dump"));
        client_env(&mut c);
        c.args(["--no-owner", "-d", &dsn]);
        let out = run(c, b"", CLIENT_DEADLINE, "pg_dump");
        assert_eq!(
            out.code, 0,
            "pg harness: pg_dump {db} failed: {}",
            out.stderr
        );
        out.stdout
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Whether the server is (still) running.
    pub fn is_running(&self) -> bool {
        read_postmaster_pid(&self.data_dir).is_some_and(pid_alive)
    }

    /// Stops the server (`pg_ctl stop -m fast`) but keeps the cluster, to
    /// simulate an outage: [`Self::resume`] starts it again on the same port.
    /// Panics if it does not stop.
    pub fn halt(&self) {
        let out = self
            .pg_ctl_stop("fast")
            .unwrap_or_else(|e| panic!("pg harness: pg_ctl stop -m fast: {e}"));
        assert_eq!(
            out.code, 0,
            "pg harness: pg_ctl stop -m fast failed: {out:#?}"
        );
    }

    /// Starts a server stopped by [`Self::halt`] again (same data dir and
    /// port) and waits until it accepts connections. Panics with its log if
    /// it does not start.
    pub fn resume(&self) {
        let mut c = self.server_command("pg_ctl");
        c.arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", &PG_CTL_WAIT.as_secs().to_string(), "-s"]);
        let out = run(c, b"", PG_CTL_DEADLINE, "pg_ctl start");
        assert_eq!(
            out.code,
            0,
            "pg harness: restarting the cluster on port {} failed: {out:#?}\n--- postgres log ---\n{}",
            self.port,
            self.log_text()
        );
        self.wait_ready();
    }

    /// `pg_ctl stop -m fast` (then `-m immediate`, then SIGKILL if need be) and
    /// removes the temp dir. Idempotent; also done on drop. Panics if the
    /// server could not be stopped at all.
    pub fn stop(&self) {
        if let Err(e) = self.shutdown() {
            panic!(
                "pg harness: stopping the cluster on port {}: {e}",
                self.port
            );
        }
    }

    fn shutdown(&self) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tmp) = st.dir.take() else {
            return Ok(());
        };
        let mut problems = Vec::new();
        if let Some(pid) = read_postmaster_pid(&self.data_dir) {
            for mode in ["fast", "immediate"] {
                if !pid_alive(pid) {
                    break;
                }
                match self.pg_ctl_stop(mode) {
                    Ok(out) if out.code == 0 => {}
                    Ok(out) => problems.push(format!(
                        "pg_ctl stop -m {mode} exited {}: {}{}",
                        out.code, out.stdout, out.stderr
                    )),
                    Err(e) => problems.push(format!("pg_ctl stop -m {mode}: {e}")),
                }
            }
            if pid_alive(pid) {
                let _ = try_run(
                    {
                        let mut c = Command::new("kill");
                        c.args(["-KILL", &pid.to_string()]);
                        c
                    },
                    b"",
                    Duration::from_secs(5),
                );
                wait_until(Duration::from_secs(5), || !pid_alive(pid));
            }
            if pid_alive(pid) {
                problems.push(format!("postmaster {pid} still alive after SIGKILL"));
            } else {
                // Orderly enough: forget the earlier complaints.
                problems.clear();
            }
        }
        let path = tmp.path().to_path_buf();
        if let Err(e) = tmp.close() {
            if path.exists() {
                problems.push(format!("removing {}: {e}", path.display()));
            }
        }
        if let Some(mut w) = st.watchdog.take() {
            // EOF on its stdin: it finds no postmaster.pid and exits.
            drop(w.stdin.take());
            if !wait_child(&mut w, Duration::from_secs(5)) {
                let _ = w.kill();
                let _ = w.wait();
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    // --- internals ---------------------------------------------------------

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A command for a server program, as the server's OS user when root.
    fn server_command(&self, name: &str) -> Command {
        let program = self.bin(name);
        let mut c = if is_root() {
            if on_path("setpriv") {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={PG_OS_USER}"))
                    .arg(format!("--regid={PG_OS_USER}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                c
            } else {
                let mut c = Command::new("runuser");
                c.args(["-u", PG_OS_USER, "--"]).arg(program);
                c
            }
        } else {
            Command::new(program)
        };
        clear_pg_env(&mut c);
        // The server user may not be able to enter the caller's cwd.
        c.current_dir(&self.dir);
        c
    }

    fn initdb(&self, auth: Auth) {
        let mut c = self.server_command("initdb");
        c.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--auth-host={}", auth.hba_method()))
            .arg("--auth-local=trust");
        let out = run(c, b"", INITDB_DEADLINE, "initdb");
        assert_eq!(
            out.code,
            0,
            "pg harness: initdb -D {} failed (exit {}):\n{}\n{}",
            self.data_dir.display(),
            out.code,
            out.stdout,
            out.stderr
        );
    }

    fn write_hba(&self, auth: Auth, tls: bool) {
        let method = auth.hba_method();
        let tcp = if tls {
            format!(
                "hostssl all all 127.0.0.1/32 {method}\n\
                 hostnossl all all 127.0.0.1/32 reject\n"
            )
        } else {
            format!("host all all 127.0.0.1/32 {method}\n")
        };
        let text = format!(
            "# Written by the warden-tests pg harness.\n\
             # The harness administers the cluster over its private unix socket.\n\
             local all all trust\n{tcp}"
        );
        // Overwrite in place: the file keeps initdb's owner and mode.
        std::fs::write(self.data_dir.join("pg_hba.conf"), text)
            .unwrap_or_else(|e| panic!("pg harness: write pg_hba.conf: {e}"));
    }

    /// Appends the settings to `postgresql.conf` (later lines win).
    fn append_conf(&self, text: &str) {
        let path = self.data_dir.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("pg harness: open {}: {e}", path.display()));
        f.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("pg harness: write {}: {e}", path.display()));
    }

    /// Writes the configuration and starts the server; returns its port.
    fn start_server(&self, opts: &ClusterOptions, tls: Option<&TlsFiles>) -> u16 {
        // shared_buffers must be ≥ 2 × max_connections buffers; keep it small.
        let buffers = (4 * u64::from(opts.max_connections)).max(2048);
        let mut conf = format!(
            "\n# --- warden-tests pg harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {sock}\n\
             max_connections = {max}\n\
             shared_buffers = {sb}kB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             password_encryption = '{enc}'\n\
             log_connections = on\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            sock = quote_conf(&self.socket_dir),
            max = opts.max_connections,
            sb = buffers * 8,
            enc = opts.auth.password_encryption(),
        );
        if let Some(t) = tls {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\n",
                quote_conf(&t.server_cert_pem),
                quote_conf(&t.server_key)
            ));
        }
        self.append_conf(&conf);

        for attempt in 1..=PORT_ATTEMPTS {
            let port = pick_port();
            self.append_conf(&format!("port = {port}\n"));
            let log_before = std::fs::metadata(&self.log_file).map_or(0, |m| m.len());
            let mut c = self.server_command("pg_ctl");
            c.arg("start")
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t", &PG_CTL_WAIT.as_secs().to_string(), "-s"]);
            let out = run(c, b"", PG_CTL_DEADLINE, "pg_ctl start");
            if out.code == 0 {
                return port;
            }
            let log = self.log_text();
            let new_log = log.get(log_before as usize..).unwrap_or(&log);
            let port_taken = new_log.contains("Address already in use");
            if port_taken && attempt < PORT_ATTEMPTS {
                // Someone took the port between our probe and the bind.
                self.kill_leftover_postmaster();
                continue;
            }
            panic!(
                "pg harness: the PostgreSQL server did not start (pg_ctl exit {}, port {port}, \
                 bin dir {}).\n--- pg_ctl output ---\n{}{}\n--- postgres log {} ---\n{}",
                out.code,
                self.bin_dir.display(),
                out.stdout,
                out.stderr,
                self.log_file.display(),
                log
            );
        }
        unreachable!("the loop returns or panics")
    }

    /// After a failed start: make sure no half-started server remains.
    fn kill_leftover_postmaster(&self) {
        if let Some(pid) = read_postmaster_pid(&self.data_dir).filter(|p| pid_alive(*p)) {
            let _ = self.pg_ctl_stop("immediate");
            if pid_alive(pid) {
                let _ = try_run(
                    {
                        let mut c = Command::new("kill");
                        c.args(["-KILL", &pid.to_string()]);
                        c
                    },
                    b"",
                    Duration::from_secs(5),
                );
                wait_until(Duration::from_secs(5), || !pid_alive(pid));
            }
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<Output, String> {
        let mut c = self.server_command("pg_ctl");
        c.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            mode,
            "-w",
            "-t",
            &PG_CTL_WAIT.as_secs().to_string(),
            "-s",
        ]);
        try_run(c, b"", PG_CTL_DEADLINE)
    }

    /// `pg_ctl -w` has seen the server accept connections; check both ways in
    /// anyway (bounded).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.admin_output("postgres", "select 1");
            if out.code == 0 && out.stdout.trim() == "1" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pg harness: server on port {} not answering over its socket: {}\n\
                 --- postgres log {} ---\n{}",
                self.port,
                out.stderr,
                self.log_file.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let ok = wait_until(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        });
        assert!(
            ok,
            "pg harness: server not accepting TCP on {addr}\n--- postgres log {} ---\n{}",
            self.log_file.display(),
            self.log_text()
        );
    }

    fn admin_output(&self, db: &str, sql: &str) -> Output {
        let sock = self.socket_dir.to_string_lossy();
        let port = self.port.to_string();
        let dsn = conninfo(&[
            ("host", &sock),
            ("port", &port),
            ("user", SUPERUSER),
            ("dbname", db),
        ]);
        let mut c = Command::new(psql_bin());
        client_env(&mut c);
        c.args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &dsn,
            "-f",
            "-",
        ]);
        run(c, sql.as_bytes(), CLIENT_DEADLINE, "psql (admin)")
    }

    /// `shown` stands for `sql` in the panic message (no passwords there).
    fn admin_in(&self, db: &str, sql: &str, shown: &str) -> String {
        let out = self.admin_output(db, sql);
        assert_eq!(
            out.code, 0,
            "pg harness: psql as {} on port {} failed (exit {}) running:\n{shown}\n--- stderr ---\n{}",
            self.superuser, self.port, out.code, out.stderr
        );
        out.stdout.trim_end_matches('\n').to_string()
    }

    /// A `sh` that blocks reading a pipe whose write end only this process
    /// holds; on EOF (we stopped the cluster, or this process died) it stops a
    /// server still running and removes the dir.
    fn spawn_watchdog(&self) {
        const SCRIPT: &str = r#"
trap '' INT HUP
while read -r _line; do :; done
pidfile="$1/postmaster.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile")
  if [ -n "$pid" ]; then
    kill -QUIT "$pid" 2>/dev/null
    i=0
    # The postmaster removes its pid file on exit (kill -0 is true for a zombie).
    while [ -f "$pidfile" ] && kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do
      sleep 0.1; i=$((i+1))
    done
    kill -KILL "$pid" 2>/dev/null
  fi
fi
rm -rf "$2"
"#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("warden-pg-watchdog")
            .arg(&self.data_dir)
            .arg(&self.dir)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("pg harness: spawn watchdog sh: {e}"));
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .watchdog = Some(child);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!(
                "pg harness: stopping the cluster on port {}: {e}",
                self.port
            );
        }
    }
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("socket_dir", &self.socket_dir)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Runs `psql` with `dsn` and `-c sql` (`-X -tA -q`, `ON_ERROR_STOP`), bounded;
/// never panics on a failed connection: check `code`/`stderr`. `PG*`
/// variables and `~/.pgpass` are ignored, so only the DSN counts.
pub fn run_psql(dsn: &str, sql: &str) -> Output {
    let mut c = Command::new(psql_bin());
    client_env(&mut c);
    c.args([
        "-X",
        "-q",
        "-t",
        "-A",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        dsn,
        "-c",
        sql,
    ]);
    run(c, b"", CLIENT_DEADLINE, "psql")
}

/// Runs `pgbench ARGS` (the DSN goes last, as the database name), bounded,
/// with the same clean environment as [`run_psql`].
pub fn run_pgbench(args: &[&str]) -> Output {
    let bin = find_pg_bin_dir()
        .map(|d| d.join("pgbench"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbench"));
    let mut c = Command::new(bin);
    client_env(&mut c);
    c.args(args);
    run(c, b"", Duration::from_secs(300), "pgbench")
}

/// The PostgreSQL server bin dir (`initdb`, `pg_ctl`, `postgres`): `$PG_BIN_DIR`,
/// else the highest `/usr/lib/postgresql/<version>/bin`, else `pg_config
/// --bindir`. Panics if there is none.
pub fn pg_bin_dir() -> PathBuf {
    find_pg_bin_dir().unwrap_or_else(|| {
        panic!(
            "pg harness: PostgreSQL server binaries (initdb, pg_ctl) not found: set \
             PG_BIN_DIR or install the postgresql package (looked in $PG_BIN_DIR, \
             /usr/lib/postgresql/*/bin and `pg_config --bindir`)"
        )
    })
}

/// True when a cluster can be started here: `psql` runs, the server binaries
/// are found, and (when root) the `postgres` system user exists. Tests skip
/// themselves when this is false.
pub fn psql_available() -> bool {
    let Some(dir) = find_pg_bin_dir() else {
        return false;
    };
    let mut c = Command::new(psql_bin());
    c.arg("--version");
    let psql_ok = try_run(c, b"", Duration::from_secs(20)).is_ok_and(|o| o.code == 0);
    psql_ok
        && ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).exists())
        && (!is_root() || os_user_exists(PG_OS_USER))
}

fn find_pg_bin_dir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("pg_ctl").exists() && d.join("initdb").exists();
    if let Some(d) = std::env::var_os("PG_BIN_DIR").filter(|d| !d.is_empty()) {
        // An explicit choice is not second-guessed.
        return Some(PathBuf::from(d));
    }
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(version) = name
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()
            else {
                continue;
            };
            let bin = e.path().join("bin");
            if has_server(&bin) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Some(bin);
    }
    let mut c = Command::new("pg_config");
    c.arg("--bindir");
    try_run(c, b"", Duration::from_secs(10))
        .ok()
        .filter(|o| o.code == 0)
        .map(|o| PathBuf::from(o.stdout.trim()))
        .filter(|d| has_server(d))
}

/// `psql` from the server bin dir (no Debian wrapper), else from `PATH`.
/// The psql binary the tests run (from `PG_BIN_DIR` or the server install).
pub fn psql_bin() -> PathBuf {
    find_pg_bin_dir()
        .map(|d| d.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"))
}

// --- TLS ---------------------------------------------------------------------

pub struct TlsFiles {
    pub ca_pem: PathBuf,
    pub server_cert_pem: PathBuf,
    pub server_key: PathBuf,
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = warden-tests

[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyAgreement
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
";

/// A test CA (EC P-256) and a server certificate signed by it for
/// `localhost` and 127.0.0.1; the keys are 0600 (chowned with the dir later).
pub fn make_tls(dir: &Path) -> TlsFiles {
    let cnf = dir.join("openssl.cnf");
    std::fs::write(&cnf, OPENSSL_CNF)
        .unwrap_or_else(|e| panic!("pg harness: write {}: {e}", cnf.display()));
    let ca_key = dir.join("ca.key");
    let ca_pem = dir.join("ca.pem");
    let server_key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let server_cert_pem = dir.join("server.pem");
    let serial = {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (nanos ^ (u64::from(std::process::id()) << 32)) & 0x0fff_ffff_ffff_ffff | (1 << 60)
    };
    let steps: Vec<Vec<String>> = vec![
        genpkey_args(&ca_key),
        vec![
            "req".into(),
            "-new".into(),
            "-x509".into(),
            "-config".into(),
            path_arg(&cnf),
            "-extensions".into(),
            "ca_ext".into(),
            "-key".into(),
            path_arg(&ca_key),
            "-sha256".into(),
            "-days".into(),
            "3650".into(),
            "-subj".into(),
            "/CN=warden-tests CA".into(),
            "-out".into(),
            path_arg(&ca_pem),
        ],
    ];
    run_openssl(dir, &cnf, steps);
    let serial = format!("0x{serial:016x}");
    run_openssl(
        dir,
        &cnf,
        server_cert_steps(
            dir,
            &cnf,
            &server_key,
            &csr,
            &server_cert_pem,
            &serial,
            (&cnf, "server_ext"),
            "/CN=localhost",
        ),
    );
    // postgres refuses a key readable by group or others.
    set_mode(&server_key, 0o600);
    set_mode(&ca_key, 0o600);
    TlsFiles {
        ca_pem,
        server_cert_pem,
        server_key,
    }
}

/// Another server certificate from the CA `make_tls` left in `dir`, with
/// `san` as its subjectAltName (e.g. `URI:spiffe://example.org/db,DNS:localhost`).
/// Returns (certificate, key) paths named after `name`.
pub fn issue_server_cert(dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "[ext]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyAgreement\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = {san}\n"
        ),
    )
    .unwrap_or_else(|e| panic!("pg harness: write {}: {e}", ext.display()));
    let (key, csr, cert) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.pem")),
    );
    let cnf = dir.join("openssl.cnf");
    run_openssl(
        dir,
        &cnf,
        server_cert_steps(
            dir,
            &cnf,
            &key,
            &csr,
            &cert,
            "-",
            (&ext, "ext"),
            &format!("/CN={name}"),
        ),
    );
    set_mode(&key, 0o600);
    (cert, key)
}

/// openssl steps for a server key, CSR and certificate signed by the CA in
/// `dir` (`serial` "-" lets openssl pick one), extensions from `ext_file`.
#[allow(clippy::too_many_arguments)]
fn server_cert_steps(
    dir: &Path,
    cnf: &Path,
    key: &Path,
    csr: &Path,
    cert: &Path,
    serial: &str,
    (ext_file, ext_section): (&Path, &str),
    subject: &str,
) -> Vec<Vec<String>> {
    let serial_args: Vec<String> = if serial == "-" {
        vec!["-CAcreateserial".into()]
    } else {
        vec!["-set_serial".into(), serial.into()]
    };
    let mut sign: Vec<String> = vec![
        "x509".into(),
        "-req".into(),
        "-in".into(),
        path_arg(csr),
        "-CA".into(),
        path_arg(&dir.join("ca.pem")),
        "-CAkey".into(),
        path_arg(&dir.join("ca.key")),
    ];
    sign.extend(serial_args);
    sign.extend([
        "-sha256".into(),
        "-days".into(),
        "825".into(),
        "-extfile".into(),
        path_arg(ext_file),
        "-extensions".into(),
        ext_section.into(),
        "-out".into(),
        path_arg(cert),
    ]);
    vec![
        genpkey_args(key),
        vec![
            "req".into(),
            "-new".into(),
            "-config".into(),
            path_arg(cnf),
            "-key".into(),
            path_arg(key),
            "-subj".into(),
            subject.into(),
            "-out".into(),
            path_arg(csr),
        ],
        sign,
    ]
}

fn run_openssl(dir: &Path, cnf: &Path, steps: Vec<Vec<String>>) {
    for args in steps {
        let mut c = Command::new("openssl");
        c.args(&args).env("OPENSSL_CONF", cnf).current_dir(dir);
        let out = run(c, b"", OPENSSL_DEADLINE, "openssl");
        assert_eq!(
            out.code,
            0,
            "pg harness: `openssl {}` failed (exit {}):\n{}{}",
            args.join(" "),
            out.code,
            out.stdout,
            out.stderr
        );
    }
}

fn genpkey_args(out: &Path) -> Vec<String> {
    vec![
        "genpkey".into(),
        "-algorithm".into(),
        "EC".into(),
        "-pkeyopt".into(),
        "ec_paramgen_curve:P-256".into(),
        "-out".into(),
        path_arg(out),
    ]
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

// --- quoting -----------------------------------------------------------------

/// An SQL identifier, always double-quoted (so case and symbols survive).
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL string literal (standard_conforming_strings is on).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A `postgresql.conf` string value.
fn quote_conf(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "''"))
}

/// A libpq `key=value …` string, quoting values where needed.
fn conninfo(kv: &[(&str, &str)]) -> String {
    kv.iter()
        .map(|(k, v)| {
            let plain = !v.is_empty()
                && !v
                    .chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
            if plain {
                format!("{k}={v}")
            } else {
                format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// --- processes ---------------------------------------------------------------

/// Removes every `PG*` variable (PGHOST, PGPORT, PGDATA, PGPASSWORD, PGSSLMODE…)
/// so only what the harness passes counts.
fn clear_pg_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            c.env_remove(k);
        }
    }
}

fn client_env(c: &mut Command) {
    clear_pg_env(c);
    c.env("PGPASSFILE", "/nonexistent/warden-tests-pgpass");
    c.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS.to_string());
}

/// Like [`try_run`], panicking when the program cannot be started.
fn run(c: Command, stdin: &[u8], timeout: Duration, what: &str) -> Output {
    let program = c.get_program().to_string_lossy().into_owned();
    try_run(c, stdin, timeout)
        .unwrap_or_else(|e| panic!("pg harness: {what}: cannot run {program}: {e}"))
}

/// Runs a command to completion or until `timeout` (then SIGKILL, code -1 and
/// a note in stderr). Output still held open by a grandchild is given up on
/// two seconds after the child exits.
fn try_run(mut c: Command, stdin: &[u8], timeout: Duration) -> Result<Output, String> {
    c.stdin(if stdin.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| e.to_string())?;
    if let Some(mut si) = child.stdin.take() {
        let data = stdin.to_vec();
        std::thread::spawn(move || {
            let _ = si.write_all(&data);
        });
    }
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());
    let exited = wait_child(&mut child, timeout);
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = child.try_wait().ok().flatten();
    let grace = Duration::from_secs(2);
    let stdout = out_rx.recv_timeout(grace).unwrap_or_default();
    let mut stderr = err_rx.recv_timeout(grace).unwrap_or_default();
    if !exited {
        stderr.push_str(&format!(
            "\n[pg harness: {} killed after {timeout:?}]",
            c.get_program().to_string_lossy()
        ));
    }
    Ok(Output {
        code: if exited {
            status.and_then(|s| s.code()).unwrap_or(-1)
        } else {
            -1
        },
        stdout,
        stderr,
    })
}

/// Reads a pipe to EOF on a thread; the text arrives on the channel.
fn drain<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Waits up to `timeout` for the child to exit; true if it did.
fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(50));
            }
            Err(_) => return false,
        }
    }
}

/// Polls `cond` until true or `timeout`; returns the last result.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The postmaster's pid from `postmaster.pid` (first line), if any.
fn read_postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live process (zombies count as dead).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S …": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x"))
}

fn os_user_exists(user: &str) -> bool {
    let mut c = Command::new("id");
    c.args(["-u", user]);
    try_run(c, b"", Duration::from_secs(10)).is_ok_and(|o| o.code == 0)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
fn pick_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("pg harness: no free port on 127.0.0.1: {e}"))
}

fn mkdir(p: &Path, mode: u32) {
    std::fs::create_dir(p).unwrap_or_else(|e| panic!("pg harness: mkdir {}: {e}", p.display()));
    set_mode(p, mode);
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("pg harness: chmod {:o} {}: {e}", mode, p.display()));
}

// --- a warden route in front of a cluster --------------------------------------

/// A cluster with role `app` (password `password`) and a running warden whose
/// postgres route `app-db` (credential: secret `app-db/app`) reaches it.
pub struct RouteSetup {
    pub pg: PgCluster,
    pub warden: crate::Instance,
    pub _daemon: crate::Daemon,
    pub port: u16,
}

/// What differs between the tests that use [`route_setup`].
pub struct RouteOptions<'a> {
    /// Role `app`'s real password.
    pub password: &'a str,
    /// What warden stores as `app-db/app` (a wrong one tests rejection).
    pub stored_password: &'a str,
    /// The route's `allow` list, TOML inside the brackets, e.g. `"me"`.
    pub allow: &'a str,
    pub cache_ttl: &'a str,
    /// More keys for the `[[secret]]` table and the route.
    pub secret_extra: &'a str,
    pub route_extra: &'a str,
    /// SQL run as the superuser in database `app` after the role exists.
    pub app_sql: &'a str,
}

/// Starts `opts`' cluster and a warden route to it (see [`RouteSetup`]).
pub fn route_setup(opts: ClusterOptions, o: RouteOptions<'_>) -> RouteSetup {
    let pg = PgCluster::start(opts);
    pg.create_role("app", o.password);
    if !o.app_sql.is_empty() {
        pg.psql_admin_in("app", o.app_sql);
    }
    let port = crate::free_port();
    let tls = match &pg.ca_pem {
        Some(ca) => format!(
            "upstream_tls = {{ mode = \"verify-full\", ca_file = \"{}\" }}",
            ca.display()
        ),
        None => "upstream_tls = { mode = \"disable\" }".to_string(),
    };
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[secret]]
name = "app-db/app"
rotation_period = "24h"
{secret_extra}

[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{port}"
upstream = "{host}:{pgport}"
{tls}
credential = {{ user = "app", secret = "app-db/app", cache_ttl = "{cache_ttl}" }}
allow = [{allow}]
connect_timeout = "2s"
{route_extra}
"#,
        uid = crate::my_uid(),
        host = if pg.ca_pem.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        },
        pgport = pg.port,
        secret_extra = o.secret_extra,
        cache_ttl = o.cache_ttl,
        allow = o.allow,
        route_extra = o.route_extra,
    );
    let warden = crate::Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden
        .run_stdin(
            &["secret", "put", "app-db/app"],
            o.stored_password.as_bytes(),
        )
        .ok();
    let daemon = warden.start_daemon();
    RouteSetup {
        pg,
        warden,
        _daemon: daemon,
        port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quotes_what_needs_it() {
        assert_eq!(
            conninfo(&[("host", "127.0.0.1"), ("password", "a b'c\\d"), ("x", "")]),
            r"host=127.0.0.1 password='a b\'c\\d' x=''"
        );
    }

    #[test]
    fn sql_quoting() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn pid_alive_sees_self_and_not_nonsense() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
