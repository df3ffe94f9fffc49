//! The fleet bench (`cargo xtask bench --only fleet`): three warden nodes
//! (separate data dirs, admin sockets and route ports) sharing one
//! throwaway PostgreSQL store, plus a single node on the default SQLite
//! store, all routing to the same upstream database. In one run:
//!
//! 1. **Propagation.** A change made through one node's admin socket —
//!    `secret put` of a new value, `secret rm`, `freeze`, `unfreeze`, each
//!    kind on every node in turn — and the time from the admin call's
//!    answer until *each* node's route shows it to a client: every node is
//!    polled by its own thread, back to back (1 ms apart), with a new
//!    PostgreSQL session on the route's unix socket (a startup message;
//!    warden attributes the client by `SO_PEERCRED`, attests it and logs in
//!    upstream; the session reaches ReadyForQuery or is refused with
//!    warden's message). The routes cache credentials for 10 minutes, so
//!    only the store's notifications explain a change showing up.
//!    p50/p99/max of the last of the three nodes. These nodes run without
//!    the eBPF monitor: on one host, the kernel deny that any node adds for
//!    a frozen workload would stop the probes to all of them.
//! 2. **Session set-up.** `pgbench -S -C` through a fourth node on the same
//!    store (joined after the freezes, eBPF monitor on, stopped after) and
//!    through the SQLite node (eBPF monitor on), interleaved rounds,
//!    medians.
//! 3. **Secret writes.** `secret_put` requests straight to the admin
//!    sockets (the CLI's JSON-lines protocol, no process per write), several
//!    writers per node on all three nodes at once; every value is then read
//!    back through another node. Beside it, in the same run: one writer on
//!    one node, and the same load on the SQLite node; the server's WAL
//!    fsyncs, transactions and WAL bytes per write.
//!
//! PostgreSQL runs with its defaults for durability (`fsync`,
//! `synchronous_commit = on`): the store is not tuned. Everything lives in
//! a temp dir; every process is stopped and the dir removed at the end,
//! also on error ([`Lab`]'s `Drop`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::pg::{
    chown_to_postgres, median, parse_pgbench_output, percentile, print_tail, process_cost,
    random_alphanumeric, ratio, run_captured, run_with_stdin, set_mode,
};
use crate::{cmd, prereq};

/// Nodes sharing the PostgreSQL store.
const NODES: usize = 3;
/// The OS user that runs the PostgreSQL server (it refuses root).
const OS_USER: &str = "postgres";
/// The upstream role and database the routes log in to.
const ROLE: &str = "app";
/// The store's role and database.
const STORE_ROLE: &str = "warden";
/// The routes' credential.
const SECRET: &str = "app-db/app";
const WORKLOAD: &str = "me";
/// pgbench clients and threads.
const CLIENTS: u32 = 4;
const THREADS: u32 = 2;
/// Concurrent admin connections writing secrets, per node.
const WRITERS_PER_NODE: usize = 4;
/// A change not seen by a node within this is a failure.
const GIVE_UP: Duration = Duration::from_secs(10);
/// Pause between two probes of one node.
const PROBE_GAP: Duration = Duration::from_millis(1);
/// Propagation targets: p99 of the last node.
const TARGET_P99: Duration = Duration::from_secs(1);
const STRETCH_P99: Duration = Duration::from_millis(250);
/// Session set-up: PostgreSQL store's TPS over the SQLite store's.
const SESSION_TARGET: f64 = 0.9;
/// Secret writes per second, three nodes together.
const WRITE_TARGET: f64 = 500.0;

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    /// Samples per kind of change (`--fleet-samples`).
    pub samples: u64,
    /// Seconds per pgbench run and of the concurrent write load
    /// (`--fleet-seconds`).
    pub seconds: u64,
    /// Interleaved pgbench rounds (`--fleet-rounds`).
    pub rounds: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            samples: 30,
            seconds: 5,
            rounds: 5,
        }
    }
}

pub fn run(repo: &Path, options: &Options) -> Result<()> {
    if super::effective_uid() != Some(0) {
        println!(
            "SKIPPED: the fleet bench must run as root (it runs initdb and pg_ctl as the \
             `{OS_USER}` user through setpriv, and installs missing packages)."
        );
        return Ok(());
    }
    let found = prereq::ensure_system_packages(prereq::BENCH_REQUIREMENTS)?;
    let pg_bin = found
        .pg_bin_dir()
        .context("initdb was found but its directory was not")?
        .to_path_buf();
    cmd::run(cmd::cargo(repo).args(["build", "--release", "-p", "warden"]))?;
    let warden = cmd::target_dir(repo).join("release").join("warden");
    if !warden.is_file() {
        bail!(
            "the build succeeded but {} does not exist",
            warden.display()
        );
    }

    let started = Instant::now();
    let mut lab = Lab::create(pg_bin, warden)?;
    lab.start_postgres()?;
    lab.create_databases()?;
    lab.start_nodes()?;
    println!(
        "{NODES} fleet nodes and the SQLite node up after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let propagation = measure_propagation(&lab, options)?;
    // Node 4 (eBPF monitor) only now that the freezes are over, and only
    // for the session set-up runs.
    let joiner = lab.joiner.clone();
    lab.add_node(&joiner)?;
    let sessions = measure_sessions(&lab, options)?;
    lab.stop_node(&joiner);
    let writes = measure_writes(&lab, options)?;

    println!(
        "\nFleet bench: {NODES} warden nodes on one PostgreSQL {} store (fsync = {}, synchronous_commit = {}: the server's defaults), one warden node on the SQLite store; one machine",
        lab.server_version, lab.fsync, lab.synchronous_commit
    );
    print_propagation(&propagation, options);
    print_sessions(&sessions, options);
    print_writes(&writes, options);
    lab.shutdown();
    Ok(())
}

/// One warden node: its dir (config, data dir, admin socket, log) and route port.
#[derive(Clone, Debug)]
struct Node {
    name: String,
    dir: PathBuf,
    port: u16,
    /// On the shared PostgreSQL store (else the default SQLite store).
    shared_store: bool,
    /// `monitor.ebpf = "auto"` (the default) rather than `"off"`.
    ebpf: bool,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("warden.toml")
    }

    fn admin(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("warden.log")
    }

    /// The route's unix socket (`unix_socket` directory `<dir>/pg`).
    fn socket(&self) -> PathBuf {
        self.dir.join("pg").join(format!(".s.PGSQL.{}", self.port))
    }
}

/// The throwaway setup. Dropping it stops every process started (by pid;
/// the server with `pg_ctl stop`) and removes the temp dir.
struct Lab {
    dir: PathBuf,
    pg_bin: PathBuf,
    warden: PathBuf,
    pg_port: u16,
    password: String,
    store_password: String,
    /// The fleet's nodes for propagation and writes (eBPF monitor off).
    fleet: Vec<Node>,
    /// A fourth node on the same store with the eBPF monitor, for the
    /// session set-up comparison only (stopped before the freezes).
    joiner: Node,
    /// The single node on the SQLite store (eBPF monitor on).
    single: Node,
    server_version: String,
    fsync: String,
    synchronous_commit: String,
    pg_started: bool,
    children: Vec<(String, Child)>,
    cleaned: bool,
}

impl Lab {
    fn create(pg_bin: PathBuf, warden: PathBuf) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("warden-fleetbench-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("could not remove stale {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        let ports = free_ports(NODES + 3)?;
        let node = |name: &str, port: u16, shared_store: bool, ebpf: bool| Node {
            name: name.to_owned(),
            dir: dir.join(name),
            port,
            shared_store,
            ebpf,
        };
        let fleet: Vec<Node> = (0..NODES)
            .map(|i| node(&format!("node{}", i + 1), ports[i + 1], true, false))
            .collect();
        let joiner = node("node4", ports[NODES + 1], true, true);
        let single = node("sqlite", ports[NODES + 2], false, true);
        let lab = Self {
            dir,
            pg_bin,
            warden,
            pg_port: ports[0],
            password: random_alphanumeric(24)?,
            store_password: random_alphanumeric(24)?,
            fleet,
            joiner,
            single,
            server_version: String::new(),
            fsync: String::new(),
            synchronous_commit: String::new(),
            pg_started: false,
            children: Vec::new(),
            cleaned: false,
        };
        // The postgres user must traverse the top dir; what is secret lives
        // in private subdirectories.
        set_mode(&lab.dir, 0o755)?;
        let mut subs = vec![lab.pg_dir()];
        subs.extend(lab.nodes().map(|n| n.dir.clone()));
        for sub in &subs {
            std::fs::create_dir(sub)?;
            set_mode(sub, 0o700)?;
        }
        chown_to_postgres(&lab.pg_dir())?;
        let password_file = lab.store_password_file();
        std::fs::write(&password_file, &lab.store_password)?;
        set_mode(&password_file, 0o600)?;
        println!(
            "temp dir {}; ports: postgres {}, routes {}, node4 {}, sqlite node {}",
            lab.dir.display(),
            lab.pg_port,
            lab.fleet
                .iter()
                .map(|n| n.port.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            lab.joiner.port,
            lab.single.port
        );
        Ok(lab)
    }

    fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.fleet.iter().chain([&self.joiner, &self.single])
    }

    fn pg_dir(&self) -> PathBuf {
        self.dir.join("pg")
    }

    fn data_dir(&self) -> PathBuf {
        self.pg_dir().join("data")
    }

    fn store_password_file(&self) -> PathBuf {
        self.dir.join("store-password")
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = super::pg::as_postgres(&self.dir, &self.pg_bin.join("pg_ctl"));
        command.arg("-D").arg(self.data_dir()).args(args);
        command
    }

    /// initdb and start, with the server's own durability settings.
    fn start_postgres(&mut self) -> Result<()> {
        self.pg_started = true;
        // Nothing about fsync or synchronous_commit: the defaults.
        // track_wal_io_timing only times the WAL fsyncs for pg_stat_wal.
        super::pg::start_cluster(
            &self.dir,
            &self.pg_bin,
            &self.data_dir(),
            &self.pg_dir(),
            &format!(
                "\n# cargo xtask bench --only fleet\nport = {}\nlisten_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\nmax_connections = 200\n\
                 password_encryption = 'scram-sha-256'\ntrack_wal_io_timing = on\n",
                self.pg_port,
                self.pg_dir().display()
            ),
        )
    }

    /// psql as the superuser over the unix socket (trusted).
    fn psql_admin(&self, database: &str) -> Command {
        let mut psql = Command::new("psql");
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.pg_dir())
            .args(["-p", &self.pg_port.to_string(), "-U", "postgres", "-d"])
            .arg(database);
        psql
    }

    fn sql(&self, sql: &str) -> Result<String> {
        let mut psql = self.psql_admin("postgres");
        psql.args(["-c", sql]);
        let out = psql
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not run psql for `{sql}`"))?;
        if !out.status.success() {
            bail!(
                "`{sql}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The store's role and database, the upstream's, and pgbench's tables.
    fn create_databases(&mut self) -> Result<()> {
        let sql = format!(
            "CREATE ROLE {STORE_ROLE} LOGIN PASSWORD '{}';\n\
             CREATE DATABASE {STORE_ROLE} OWNER {STORE_ROLE};\n\
             CREATE ROLE {ROLE} LOGIN PASSWORD '{}';\n\
             CREATE DATABASE {ROLE} OWNER {ROLE};\n",
            self.store_password, self.password
        );
        run_with_stdin(&mut self.psql_admin("postgres"), sql.as_bytes())?;
        self.server_version = self.sql("SHOW server_version")?;
        self.fsync = self.sql("SHOW fsync")?;
        self.synchronous_commit = self.sql("SHOW synchronous_commit")?;
        let mut init = Command::new("pgbench");
        init.args(["-i", "-q", "-s", "1", "-h", "127.0.0.1"])
            .args(["-p", &self.pg_port.to_string(), "-U", ROLE, ROLE])
            .env("PGPASSWORD", &self.password)
            .env("PGSSLMODE", "disable");
        run_captured(&mut init)?;
        Ok(())
    }

    fn write_config(&self, node: &Node) -> Result<()> {
        let mut config = format!(
            "data_dir = \"{data}\"\n\
             trust_domain = \"example.org\"\n\
             \n[admin]\nsocket = \"{admin}\"\n\
             \n[metrics]\nlisten = \"off\"\n\
             \n[monitor]\nebpf = \"{ebpf}\"\n\
             \n[[workload]]\nname = \"{WORKLOAD}\"\nspiffe_id = \"spiffe://example.org/{WORKLOAD}\"\n\
             selectors = {{ uid = {uid} }}\n\
             \n[[route]]\nname = \"app-db\"\nkind = \"postgres\"\n\
             listen = \"127.0.0.1:{listen}\"\nupstream = \"127.0.0.1:{pg}\"\n\
             upstream_tls = {{ mode = \"disable\" }}\n\
             credential = {{ user = \"{ROLE}\", secret = \"{SECRET}\", cache_ttl = \"10m\" }}\n\
             unix_socket = \"{socket_dir}\"\n\
             allow = [\"{WORKLOAD}\"]\n",
            data = node.dir.join("data").display(),
            admin = node.admin().display(),
            uid = super::effective_uid().unwrap_or(0),
            listen = node.port,
            pg = self.pg_port,
            ebpf = if node.ebpf { "auto" } else { "off" },
            socket_dir = node.dir.join("pg").display(),
        );
        std::fs::create_dir_all(node.dir.join("pg"))?;
        if node.shared_store {
            config.push_str(&format!(
                "\n[store]\nbackend = \"postgres\"\n\
                 url = \"postgresql://{STORE_ROLE}@127.0.0.1:{}/{STORE_ROLE}\"\n\
                 password_file = \"{}\"\ntls = \"disable\"\n",
                self.pg_port,
                self.store_password_file().display()
            ));
        }
        std::fs::write(node.config(), config)?;
        let mut check = Command::new(&self.warden);
        check.args(["config", "check"]).arg(node.config());
        run_captured(&mut check)?;
        Ok(())
    }

    fn warden(&self, node: &Node, args: &[&str]) -> Command {
        let mut command = Command::new(&self.warden);
        command.arg("--config").arg(node.config()).args(args);
        command
    }

    /// Node 1: `init` and the secret; nodes 2 and 3 join (see
    /// [`Self::add_node`]); then the SQLite node. Each daemon is up before
    /// the next node starts.
    fn start_nodes(&mut self) -> Result<()> {
        let fleet = self.fleet.clone();
        for (i, node) in fleet.iter().enumerate() {
            if i == 0 {
                self.write_config(node)?;
                run_captured(&mut self.warden(node, &["init"]))?;
                run_with_stdin(
                    &mut self.warden(node, &["secret", "put", SECRET]),
                    self.password.as_bytes(),
                )?;
                self.start_daemon(node)?;
            } else {
                self.add_node(node)?;
            }
        }
        let single = self.single.clone();
        self.write_config(&single)?;
        run_captured(&mut self.warden(&single, &["init"]))?;
        run_with_stdin(
            &mut self.warden(&single, &["secret", "put", SECRET]),
            self.password.as_bytes(),
        )?;
        self.start_daemon(&single)?;
        for node in self.fleet.iter().chain([&self.single]) {
            check_route(node)?;
        }
        Ok(())
    }

    /// A further fleet node: `node token` on node 1, `node join` with it on
    /// stdin, `up`.
    fn add_node(&mut self, node: &Node) -> Result<()> {
        self.write_config(node)?;
        let token =
            run_captured(&mut self.warden(&self.fleet[0], &["node", "token", "--ttl", "10m"]))?;
        run_with_stdin(
            &mut self.warden(node, &["node", "join"]),
            format!("{}\n", token.trim()).as_bytes(),
        )?;
        self.start_daemon(node)?;
        if node.name == self.joiner.name {
            check_route(node)?;
        }
        Ok(())
    }

    /// Stops one node's daemon (node 4, before the freezes: its eBPF
    /// monitor would deny this host's processes of the frozen workload —
    /// the bench itself — for every node, since they share the host).
    fn stop_node(&mut self, node: &Node) {
        let name = format!("warden {}", node.name);
        if let Some(i) = self.children.iter().position(|(n, _)| *n == name) {
            let (name, mut child) = self.children.remove(i);
            super::stop_child(&name, &mut child, Duration::from_secs(5));
            println!("stopped {name}");
        }
    }

    fn start_daemon(&mut self, node: &Node) -> Result<()> {
        let log = std::fs::File::create(node.log())?;
        let mut up = self.warden(node, &["up"]);
        up.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        println!("$ {} > {}", cmd::display(&up), node.log().display());
        let child = up.spawn().context("could not start `warden up`")?;
        self.children.push((format!("warden {}", node.name), child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((_, child)) = self.children.last_mut() {
                if let Some(status) = child.try_wait()? {
                    print_tail(&node.log(), 20);
                    bail!(
                        "warden {} exited early ({status}); its log is above",
                        node.name
                    );
                }
            }
            if cmd::succeeds_quietly(&mut self.warden(node, &["status"])) {
                return Ok(());
            }
            if Instant::now() > deadline {
                print_tail(&node.log(), 20);
                bail!(
                    "`warden status` on {} did not succeed within 30 s",
                    node.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// WAL syncs and writes (pg_stat_wal) and the store database's commits.
    /// The server's WAL fsyncs so far (pg_stat_wal: reported by each
    /// backend within a second or so of its transactions, at most 10 s when
    /// it then idles), transaction ids assigned (a counter of write
    /// transactions; this query takes one) and WAL bytes (both exact).
    fn wal_counters(&self) -> Result<WalCounters> {
        let out = self.sql(
            "SELECT w.wal_sync, round(w.wal_sync_time * 1000)::bigint, txid_current(), (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint FROM pg_stat_wal w",
        )?;
        let fields: Vec<u64> = out
            .split('|')
            .map(|f| f.trim().parse().unwrap_or(0))
            .collect();
        match fields[..] {
            [syncs, sync_us, xids, wal_bytes] => Ok(WalCounters {
                syncs,
                sync_us,
                xids,
                wal_bytes,
            }),
            _ => bail!("unexpected pg_stat_wal answer {out:?}"),
        }
    }

    /// Stops everything and removes the temp dir; idempotent.
    fn shutdown(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        while let Some((name, mut child)) = self.children.pop() {
            super::stop_child(&name, &mut child, Duration::from_secs(5));
        }
        if self.pg_started {
            let mut stop = self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"]);
            if !cmd::succeeds_quietly(&mut stop) {
                eprintln!("warning: `{}` failed", cmd::display(&stop));
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {err}", self.dir.display());
        } else {
            println!(
                "stopped the warden nodes and postgres; removed {}",
                self.dir.display()
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One session through `node`'s route, over TCP and over its unix socket,
/// must work.
fn check_route(node: &Node) -> Result<()> {
    for (how, seen) in [
        ("tcp", probe(&Endpoint::Tcp(node.port))?),
        ("unix socket", probe(&Endpoint::Unix(node.socket()))?),
    ] {
        if let Seen::Refused(why) = seen {
            bail!("a session through {} ({how}) was refused: {why}", node.name);
        }
    }
    println!(
        "  {:<6} route ok (tcp and unix socket); {}",
        node.name,
        monitor_mode(&node.log(), node.ebpf)
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
struct WalCounters {
    syncs: u64,
    /// Time spent in those fsyncs (µs; track_wal_io_timing).
    sync_us: u64,
    xids: u64,
    wal_bytes: u64,
}

impl WalCounters {
    fn since(self, before: WalCounters) -> WalCounters {
        WalCounters {
            syncs: self.syncs.saturating_sub(before.syncs),
            sync_us: self.sync_us.saturating_sub(before.sync_us),
            // Less the xid the later query took.
            xids: self.xids.saturating_sub(before.xids).saturating_sub(1),
            wal_bytes: self.wal_bytes.saturating_sub(before.wal_bytes),
        }
    }
}

/// What a node's log says of its eBPF monitor.
fn monitor_mode(log: &Path, ebpf: bool) -> &'static str {
    if !ebpf {
        return "monitor.ebpf = off: TCP clients attributed through /proc";
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if text.contains("eBPF access monitor attached") {
        "eBPF monitor attached: clients attributed by the kernel"
    } else if text.contains("falling back to /proc") {
        "eBPF monitor unavailable (see its log): TCP clients attributed through /proc"
    } else {
        "monitor.ebpf = auto (its log does not say yet whether it loaded)"
    }
}

fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

// ---------------------------------------------------------------------------
// The admin socket: one JSON request per line, one response per line (the
// CLI's protocol, `proxy/src/admin.rs`).

struct Admin {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Admin {
    fn connect(path: &Path) -> Result<Admin> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("could not connect to {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        Ok(Admin {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends `request`; the response, or its error as ours.
    fn call(&mut self, request: &Value) -> Result<Value> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            bail!("the daemon closed the admin connection");
        }
        let answer: Value = serde_json::from_str(&answer)
            .with_context(|| format!("malformed admin response {answer:?}"))?;
        if answer["status"] == "error" {
            bail!(
                "admin request {} failed ({}): {}",
                request["op"],
                answer["kind"],
                answer["message"]
            );
        }
        Ok(answer)
    }

    /// `secret put`; the new version.
    fn put(&mut self, name: &str, value: &[u8]) -> Result<u64> {
        let answer = self.call(&json!({
            "op": "secret_put", "name": name, "env": null, "value_b64": base64_encode(value),
        }))?;
        answer["result"]
            .as_u64()
            .with_context(|| format!("secret_put answered {answer}"))
    }

    /// `secret reveal` of the latest version.
    fn reveal(&mut self, name: &str) -> Result<Vec<u8>> {
        let answer = self.call(&json!({
            "op": "secret_reveal", "name": name, "env": null, "version": null,
        }))?;
        answer["value_b64"]
            .as_str()
            .and_then(base64_decode)
            .with_context(|| format!("secret_reveal of {name} answered no value"))
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what the admin API's `value_b64` holds).
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = BASE64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// A client session through a route, on the PostgreSQL wire protocol.

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Logged in: warden's upstream login with the current credential worked
    /// (ReadyForQuery).
    Works,
    /// warden refused the session; its message.
    Refused(String),
}

/// A StartupMessage (protocol 3.0) for `user` and `database`.
fn startup_message(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for (key, value) in [
        ("user", user),
        ("database", database),
        ("application_name", "fleetbench"),
    ] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}

/// The `M` (message) field of an ErrorResponse body.
fn error_message(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if kind == b'M' {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    "(an error without a message)".into()
}

/// Where a client reaches a route.
#[derive(Clone, Debug)]
enum Endpoint {
    Tcp(u16),
    /// The route's unix socket: warden attributes the client with
    /// `SO_PEERCRED`, with no `/proc` search, whatever its monitor mode.
    Unix(PathBuf),
}

/// One session through a route: Works at ReadyForQuery (then Terminate),
/// Refused at an ErrorResponse.
fn probe(endpoint: &Endpoint) -> Result<Seen> {
    let timeout = Some(Duration::from_secs(5));
    match endpoint {
        Endpoint::Tcp(port) => {
            let stream = TcpStream::connect(("127.0.0.1", *port))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(timeout)?;
            session(&stream)
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path)
                .with_context(|| format!("could not connect to {}", path.display()))?;
            stream.set_read_timeout(timeout)?;
            session(&stream)
        }
    }
}

fn session(mut stream: impl Read + Write) -> Result<Seen> {
    stream.write_all(&startup_message(ROLE, ROLE))?;
    loop {
        let mut head = [0u8; 5];
        stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            bail!("message length {len} from the route");
        }
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body)?;
        match head[0] {
            b'E' => return Ok(Seen::Refused(error_message(&body))),
            b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                bail!("the route asked the client for a password")
            }
            b'Z' => {
                let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
                return Ok(Seen::Works);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Propagation.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Change {
    Put,
    Rm,
    Freeze,
    Unfreeze,
}

impl Change {
    const ALL: [Change; 4] = [Change::Put, Change::Rm, Change::Freeze, Change::Unfreeze];

    fn name(self) -> &'static str {
        match self {
            Change::Put => "secret put (new value used)",
            Change::Rm => "secret rm (session refused)",
            Change::Freeze => "freeze (session refused)",
            Change::Unfreeze => "unfreeze (session served)",
        }
    }
}

/// When each node first showed one change, from the admin call's answer.
struct Observed {
    per_node: Vec<Duration>,
    probes: usize,
    probe_time: Duration,
}

impl Observed {
    fn last(&self) -> Duration {
        self.per_node.iter().copied().max().unwrap_or_default()
    }
}

/// Probes every endpoint in its own thread until `want` holds for a
/// session through it.
fn observe(
    endpoints: &[Endpoint],
    t0: Instant,
    want: &(dyn Fn(&Seen) -> bool + Sync),
) -> Result<Observed> {
    let results: Vec<Result<(Duration, usize, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = endpoints
            .iter()
            .map(|endpoint| {
                scope.spawn(move || {
                    let (mut probes, mut spent) = (0usize, Duration::ZERO);
                    loop {
                        let start = Instant::now();
                        let seen = probe(endpoint);
                        spent += start.elapsed();
                        probes += 1;
                        let last = match seen {
                            Ok(seen) if want(&seen) => return Ok((t0.elapsed(), probes, spent)),
                            Ok(seen) => format!("{seen:?}"),
                            Err(err) => format!("error: {err:#}"),
                        };
                        if t0.elapsed() > GIVE_UP {
                            bail!("{endpoint:?} did not show the change within {GIVE_UP:?}; last session: {last}");
                        }
                        std::thread::sleep(PROBE_GAP);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a probe thread panicked")))
            })
            .collect()
    });
    let mut observed = Observed {
        per_node: Vec::new(),
        probes: 0,
        probe_time: Duration::ZERO,
    };
    for result in results {
        let (seen_at, probes, spent) = result?;
        observed.per_node.push(seen_at);
        observed.probes += probes;
        observed.probe_time += spent;
    }
    Ok(observed)
}

/// Each change, the node (index) it was made on, and when each node showed it.
type Propagation = Vec<(Change, usize, Observed)>;

/// `samples` cycles of: put a wrong value (sessions fail naming the new
/// version), put the right one (sessions work), rm (refused), put back
/// (not counted), freeze (refused), unfreeze (served) — each through the
/// next node's admin socket in turn.
fn measure_propagation(lab: &Lab, options: &Options) -> Result<Propagation> {
    println!(
        "\npropagation: {} cycles of put (wrong value), put (right value), rm, put back, freeze, unfreeze; the admin calls rotate over the 3 nodes",
        options.samples
    );
    let mut admins = lab
        .fleet
        .iter()
        .map(|n| Admin::connect(&n.admin()))
        .collect::<Result<Vec<_>>>()?;
    let ports: Vec<Endpoint> = lab
        .fleet
        .iter()
        .map(|n| Endpoint::Unix(n.socket()))
        .collect();
    let right = lab.password.as_bytes();
    let works = |s: &Seen| *s == Seen::Works;
    let refused_with =
        |needle: String| move |s: &Seen| matches!(s, Seen::Refused(m) if m.contains(&needle));
    let mut results: Propagation = Vec::new();
    for cycle in 0..options.samples as usize {
        // Step k of cycle c goes through node (c + k) mod 3: every kind of
        // change is made on each node in turn.
        let on = |step: usize| (cycle + step) % NODES;
        let wrong = format!("not-the-password-{cycle}");
        let v = admins[on(0)].put(SECRET, wrong.as_bytes())?;
        let o = observe(
            &ports,
            Instant::now(),
            &refused_with(format!("{SECRET} v{v}")),
        )
        .context("put of a wrong value")?;
        results.push((Change::Put, on(0), o));

        admins[on(1)].put(SECRET, right)?;
        let o = observe(&ports, Instant::now(), &works).context("put of the right value")?;
        results.push((Change::Put, on(1), o));

        admins[on(2)].call(&json!({"op": "secret_rm", "name": SECRET, "env": null}))?;
        let o = observe(
            &ports,
            Instant::now(),
            &refused_with("no credential for route".into()),
        )
        .context("secret rm")?;
        results.push((Change::Rm, on(2), o));

        admins[on(3)].put(SECRET, right)?;
        observe(&ports, Instant::now(), &works).context("put after rm")?;

        admins[on(4)].call(&json!({
            "op": "freeze", "workload": WORKLOAD, "reason": "fleet bench",
        }))?;
        let o =
            observe(&ports, Instant::now(), &refused_with("is frozen".into())).context("freeze")?;
        results.push((Change::Freeze, on(4), o));

        admins[on(5)].call(&json!({"op": "unfreeze", "workload": WORKLOAD}))?;
        let o = observe(&ports, Instant::now(), &works).context("unfreeze")?;
        results.push((Change::Unfreeze, on(5), o));

        if (cycle + 1) % 10 == 0 {
            println!("  {} cycles done", cycle + 1);
        }
    }
    Ok(results)
}

/// p50, p99 (nearest rank) and max of a set of durations, in ms.
#[derive(Debug, PartialEq)]
struct Spread {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn spread(durations: impl IntoIterator<Item = Duration>) -> Spread {
    let mut us: Vec<u64> = durations
        .into_iter()
        .map(|d| d.as_micros() as u64)
        .collect();
    us.sort_unstable();
    Spread {
        p50_ms: percentile(&us, 0.50) / 1000.0,
        p99_ms: percentile(&us, 0.99) / 1000.0,
        max_ms: us.last().copied().unwrap_or(0) as f64 / 1000.0,
    }
}

/// "met", or by how much it was missed.
fn verdict_at_most(got: f64, limit: f64) -> String {
    if got <= limit {
        "met".into()
    } else {
        format!(
            "MISSED by {:.1} ({:.0}% over)",
            got - limit,
            (got / limit - 1.0) * 100.0
        )
    }
}

fn verdict_at_least(got: f64, wanted: f64) -> String {
    if got >= wanted {
        "met".into()
    } else {
        format!(
            "MISSED by {:.2} ({:.0}% short)",
            wanted - got,
            (1.0 - got / wanted) * 100.0
        )
    }
}

fn print_propagation(results: &Propagation, options: &Options) {
    let probes: usize = results.iter().map(|(_, _, o)| o.probes).sum();
    let probe_time: Duration = results.iter().map(|(_, _, o)| o.probe_time).sum();
    println!(
        "\n1. propagation to {NODES} nodes ({} cycles, each change made on each node in turn): from the admin call's answer to the first new session \
         through each node's route that shows it. Method: client sessions, polled per node back to back {} ms apart on the route's unix socket \
         (startup message; warden attributes the client by SO_PEERCRED, attests it and logs in upstream; the session reaches ReadyForQuery or \
         is refused with warden's message); a session took {:.2} ms on average, the resolution. Nodes 1-3 run with monitor.ebpf = off: on one \
         host a freeze's kernel deny by any node would stop the sessions to all of them.",
        options.samples,
        PROBE_GAP.as_millis(),
        if probes > 0 {
            probe_time.as_secs_f64() * 1000.0 / probes as f64
        } else {
            0.0
        }
    );
    println!(
        "  {:<28} {:>7} {:>10} {:>10} {:>10}   {:>11} {:>11}",
        "change", "samples", "last p50", "last p99", "last max", "issuer p50", "others p50"
    );
    let of = |change: Change| -> Vec<(usize, &Observed)> {
        results
            .iter()
            .filter(|(c, _, _)| *c == change)
            .map(|(_, on, o)| (*on, o))
            .collect()
    };
    for change in Change::ALL {
        let samples = of(change);
        let last = spread(samples.iter().map(|(_, o)| o.last()));
        let issuer = spread(samples.iter().map(|(on, o)| o.per_node[*on]));
        let others = spread(samples.iter().flat_map(|(on, o)| {
            o.per_node
                .iter()
                .enumerate()
                .filter(move |(n, _)| n != on)
                .map(|(_, d)| *d)
        }));
        println!(
            "  {:<28} {:>7} {:>7.1} ms {:>7.1} ms {:>7.1} ms   {:>8.1} ms {:>8.1} ms",
            change.name(),
            samples.len(),
            last.p50_ms,
            last.p99_ms,
            last.max_ms,
            issuer.p50_ms,
            others.p50_ms
        );
    }
    println!(
        "  (last: when the last of the {NODES} nodes showed it; issuer: the node the change was made on; others: the other two. \
         p99 is nearest-rank: below 100 samples it is the largest or next-to-largest)"
    );
    for change in Change::ALL {
        if let Some((on, o)) = of(change).into_iter().max_by_key(|(_, o)| o.last()) {
            let times: Vec<String> = o
                .per_node
                .iter()
                .enumerate()
                .map(|(n, d)| format!("node{} {:.1}", n + 1, d.as_secs_f64() * 1000.0))
                .collect();
            println!(
                "  slowest {:<28} made on node{}: {} ms",
                change.name(),
                on + 1,
                times.join(", ")
            );
        }
    }
    println!("  targets (p99 of the last node):");
    for change in Change::ALL {
        let last = spread(of(change).iter().map(|(_, o)| o.last()));
        println!(
            "    {:<28} <= {} ms: {:.1} ms  {};  stretch <= {} ms: {}",
            change.name(),
            TARGET_P99.as_millis(),
            last.p99_ms,
            verdict_at_most(last.p99_ms, TARGET_P99.as_secs_f64() * 1000.0),
            STRETCH_P99.as_millis(),
            verdict_at_most(last.p99_ms, STRETCH_P99.as_secs_f64() * 1000.0),
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Session set-up: PostgreSQL store vs SQLite store.

struct Sessions {
    shared: Vec<SessionRun>,
    sqlite: Vec<SessionRun>,
}

/// One pgbench -C run through a node.
struct SessionRun {
    tps: f64,
    conn_ms: Option<f64>,
    /// The node's CPU time per session (µs, /proc/PID/stat, 10 ms ticks).
    cpu_us: Option<f64>,
}

fn pgbench_connect(lab: &Lab, node: &Node, seconds: u64) -> Result<SessionRun> {
    let pid = lab
        .children
        .iter()
        .find(|(name, _)| *name == format!("warden {}", node.name))
        .map(|(_, child)| child.id());
    let before = pid.and_then(process_cost);
    let mut command = Command::new("pgbench");
    command
        .args(["-n", "-S", "-C", "-T", &seconds.to_string()])
        .args(["-c", &CLIENTS.to_string(), "-j", &THREADS.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &node.port.to_string(),
            "-U",
            ROLE,
            ROLE,
        ])
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        // No password anywhere (a missing file is skipped silently).
        .env("PGPASSFILE", lab.dir.join("no-pgpass"))
        .env("PGSSLMODE", "disable")
        .current_dir(&lab.dir);
    let out = run_captured(&mut command).map_err(|err| {
        print_tail(&node.log(), 15);
        if format!("{err:#}").contains("Operation not permitted") {
            err.context(format!(
                "the kernel refused pgbench's connections to {} (EPERM): an eBPF deny entry, from a \
                 freeze by this bench's nodes or by another warden on this host with a workload that \
                 matches root's processes; the node's log is above",
                node.name
            ))
        } else {
            err
        }
    })?;
    let after = pid.and_then(process_cost);
    let sample = parse_pgbench_output(&out)
        .with_context(|| format!("could not read pgbench's summary:\n{out}"))?;
    let sessions = sample.tps * seconds as f64;
    let cpu_us = match (before, after) {
        (Some(b), Some(a)) if sessions > 0.0 => Some(a.0.saturating_sub(b.0) as f64 / sessions),
        _ => None,
    };
    Ok(SessionRun {
        tps: sample.tps,
        conn_ms: sample.conn_ms,
        cpu_us,
    })
}

fn measure_sessions(lab: &Lab, options: &Options) -> Result<Sessions> {
    println!(
        "\nsession set-up: pgbench -n -S -C -T {} -c {CLIENTS} -j {THREADS}, {} interleaved round(s)",
        options.seconds, options.rounds
    );
    let mut sessions = Sessions {
        shared: Vec::new(),
        sqlite: Vec::new(),
    };
    for round in 1..=options.rounds {
        // Alternate which goes first.
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for shared in order {
            let (node, label) = if shared {
                (&lab.joiner, "postgres store")
            } else {
                (&lab.single, "sqlite store")
            };
            let sample = pgbench_connect(lab, node, options.seconds)?;
            println!(
                "  round {round} {label:<15} {:>8.0} tps  connect {}  warden CPU {}",
                sample.tps,
                sample
                    .conn_ms
                    .map(|ms| format!("{ms:.3} ms"))
                    .unwrap_or_else(|| "-".into()),
                sample
                    .cpu_us
                    .map(|us| format!("{us:.0} µs/session"))
                    .unwrap_or_else(|| "-".into())
            );
            if shared {
                sessions.shared.push(sample);
            } else {
                sessions.sqlite.push(sample);
            }
        }
    }
    Ok(sessions)
}

fn print_sessions(sessions: &Sessions, options: &Options) {
    let tps = |s: &[SessionRun]| median(s.iter().map(|x| x.tps).collect());
    let conn = |s: &[SessionRun]| median(s.iter().filter_map(|x| x.conn_ms).collect());
    let cpu = |s: &[SessionRun]| median(s.iter().filter_map(|x| x.cpu_us).collect());
    let (shared, sqlite) = (tps(&sessions.shared), tps(&sessions.sqlite));
    println!(
        "\n2. session set-up through a node, pgbench -S -C (a new connection per transaction), {CLIENTS} clients, median of {} interleaved round(s) of {} s, same upstream, both nodes with the eBPF monitor (clients attributed by the kernel):",
        options.rounds, options.seconds
    );
    println!(
        "  {:<34} {:>8.0} tps  connect {:.3} ms  warden CPU {:.0} µs per session",
        "fleet node 4 (PostgreSQL store)",
        shared,
        conn(&sessions.shared),
        cpu(&sessions.shared)
    );
    println!(
        "  {:<34} {:>8.0} tps  connect {:.3} ms  warden CPU {:.0} µs per session",
        "single node (SQLite store)",
        sqlite,
        conn(&sessions.sqlite),
        cpu(&sessions.sqlite)
    );
    let r = ratio(shared, sqlite);
    println!(
        "  target: PostgreSQL store >= {SESSION_TARGET:.2}x the SQLite store: {r:.2}x  {}",
        verdict_at_least(r, SESSION_TARGET)
    );
    println!(
        "  (TPS moves by tens of percent between rounds on this shared host; the CPU warden spends per session is the steadier comparison)"
    );
}

// ---------------------------------------------------------------------------
// 3. Secret writes.

/// One write load: puts per node, the wall time, every put's latency.
struct WriteRun {
    per_node: Vec<usize>,
    elapsed: Duration,
    latencies_us: Vec<u64>,
    /// (node index, name, value) of every write.
    written: Vec<(usize, String, String)>,
}

impl WriteRun {
    fn total(&self) -> usize {
        self.per_node.iter().sum()
    }

    fn rate(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct Writes {
    /// What the nodes' store connections were doing during `fleet`.
    waits: Waits,
    fleet: WriteRun,
    /// The server's WAL fsyncs, write transactions and WAL bytes during
    /// `fleet`.
    wal: WalCounters,
    one_writer: WriteRun,
    sqlite: WriteRun,
    verified: usize,
    verify_time: Duration,
}

/// Samples of the nodes' store backends (listeners excluded): how many
/// samples were taken, and per state the backend-samples in it.
#[derive(Debug, Default, PartialEq)]
struct Waits {
    samples: u64,
    by_state: Vec<(String, u64)>,
}

/// Every 10 ms until `stop`, what each store backend of the nodes is
/// doing (pg_stat_activity's wait event and state), through one psql.
fn sample_waits(lab: &Lab, stop: &AtomicBool) -> Result<Waits> {
    let query = format!(
        "SELECT coalesce(wait_event_type || ':' || wait_event, 'running') || ' (' || state || ')', count(*) \
         FROM pg_stat_activity WHERE datname = '{STORE_ROLE}' AND backend_type = 'client backend' \
         AND application_name <> 'warden-listener' AND pid <> pg_backend_pid() GROUP BY 1;\n"
    );
    let mut psql = lab.psql_admin("postgres");
    psql.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = psql.spawn().context("could not start psql to sample")?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("psql without pipes");
    };
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stdout).read_to_string(&mut text);
        text
    });
    let mut samples = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if stdin.write_all(query.as_bytes()).is_err() {
            break;
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stdin);
    let _ = child.wait();
    let text = reader.join().unwrap_or_default();
    Ok(Waits {
        samples,
        by_state: tally_states(&text),
    })
}

/// Sums psql's `state|count` lines per state, largest first.
fn tally_states(text: &str) -> Vec<(String, u64)> {
    let mut totals: Vec<(String, u64)> = Vec::new();
    for (state, count) in text.lines().filter_map(|l| l.rsplit_once('|')) {
        let Ok(count) = count.trim().parse::<u64>() else {
            continue;
        };
        match totals.iter_mut().find(|(s, _)| s == state) {
            Some((_, total)) => *total += count,
            None => totals.push((state.to_owned(), count)),
        }
    }
    totals.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    totals
}

/// `writers` admin connections on each of `nodes`, each putting new
/// secrets (`fleetbench/<tag>/n<node>w<writer>/<k>`) for `seconds`.
fn write_load(nodes: &[&Node], writers: usize, seconds: f64, tag: &str) -> Result<WriteRun> {
    let nonce = random_alphanumeric(8)?.to_lowercase();
    let barrier = Barrier::new(nodes.len() * writers + 1);
    type Written = (Vec<u64>, Vec<(usize, String, String)>);
    let (start, results) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            for w in 0..writers {
                let (barrier, nonce) = (&barrier, &nonce);
                handles.push(scope.spawn(move || -> Result<Written> {
                    let admin = Admin::connect(&node.admin());
                    barrier.wait();
                    let mut admin = admin?;
                    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
                    let (mut latencies, mut written) = (Vec::new(), Vec::new());
                    let mut k = 0u64;
                    while Instant::now() < deadline {
                        let name = format!("fleetbench/{tag}/n{}w{w}/{k}", n + 1);
                        let value = format!("value-{nonce}-{n}-{w}-{k}");
                        let t = Instant::now();
                        admin.put(&name, value.as_bytes())?;
                        latencies.push(t.elapsed().as_micros() as u64);
                        written.push((n, name, value));
                        k += 1;
                    }
                    Ok((latencies, written))
                }));
            }
        }
        barrier.wait();
        let start = Instant::now();
        let results: Vec<Result<Written>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a writer thread panicked")))
            })
            .collect();
        (start, results)
    });
    let elapsed = start.elapsed();
    let mut run = WriteRun {
        per_node: vec![0; nodes.len()],
        elapsed,
        latencies_us: Vec::new(),
        written: Vec::new(),
    };
    for result in results {
        let (latencies, written) = result?;
        for (n, _, _) in &written {
            run.per_node[*n] += 1;
        }
        run.latencies_us.extend(latencies);
        run.written.extend(written);
    }
    run.latencies_us.sort_unstable();
    Ok(run)
}

/// Reads every value written by node n back through node n+1, with
/// `writers` connections per node; fails on any difference.
fn verify(lab: &Lab, run: &WriteRun, writers: usize) -> Result<usize> {
    let checked: Vec<Result<usize>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for n in 0..NODES {
            let reader = &lab.fleet[(n + 1) % NODES];
            let mine: Vec<&(usize, String, String)> =
                run.written.iter().filter(|(w, _, _)| *w == n).collect();
            let per = mine.len().div_ceil(writers).max(1);
            for part in mine.chunks(per).map(<[_]>::to_vec) {
                handles.push(scope.spawn(move || -> Result<usize> {
                    let mut admin = Admin::connect(&reader.admin())?;
                    for (_, name, value) in &part {
                        let got = admin.reveal(name)?;
                        if got != value.as_bytes() {
                            bail!(
                                "{name}: {} read {:?}, node{} wrote {value:?}",
                                reader.name,
                                String::from_utf8_lossy(&got),
                                n + 1
                            );
                        }
                    }
                    Ok(part.len())
                }));
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader thread panicked")))
            })
            .collect()
    });
    let mut total = 0;
    for c in checked {
        total += c?;
    }
    if total != run.total() {
        bail!("read back {total} values of {}", run.total());
    }
    Ok(total)
}

fn measure_writes(lab: &Lab, options: &Options) -> Result<Writes> {
    let seconds = options.seconds as f64;
    println!("\nsecret writes through the admin sockets:");
    let one_writer = write_load(&[&lab.fleet[0]], 1, 2.0, "one")?;
    println!(
        "  1 writer on node1, 2 s: {} writes, {:.0}/s",
        one_writer.total(),
        one_writer.rate()
    );
    let before = lab.wal_counters()?;
    let nodes: Vec<&Node> = lab.fleet.iter().collect();
    let stop = AtomicBool::new(false);
    let (fleet, waits) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| sample_waits(lab, &stop));
        let fleet = write_load(&nodes, WRITERS_PER_NODE, seconds, "fleet");
        stop.store(true, Ordering::Relaxed);
        let waits = sampler
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the sampler thread panicked")));
        (fleet, waits)
    });
    let fleet = fleet?;
    let waits = waits?;
    println!(
        "  {NODES} nodes x {WRITERS_PER_NODE} writers, {seconds} s: {} writes, {:.0}/s",
        fleet.total(),
        fleet.rate()
    );
    let ended = Instant::now();
    let mut wal = lab.wal_counters()?.since(before);
    let verified = verify(lab, &fleet, WRITERS_PER_NODE)?;
    let verify_time = ended.elapsed();
    // pg_stat_wal: every backend has reported by now (reads made meanwhile
    // flush no WAL).
    std::thread::sleep(Duration::from_secs(11).saturating_sub(ended.elapsed()));
    let late = lab.wal_counters()?.since(before);
    (wal.syncs, wal.sync_us) = (late.syncs, late.sync_us);
    println!(
        "  read back {verified} values, each through another node than the one that wrote it, in {:.1} s: all equal",
        verify_time.as_secs_f64()
    );
    let sqlite = write_load(&[&lab.single], WRITERS_PER_NODE, seconds, "sqlite")?;
    println!(
        "  SQLite node, {WRITERS_PER_NODE} writers, {seconds} s: {} writes, {:.0}/s",
        sqlite.total(),
        sqlite.rate()
    );
    Ok(Writes {
        waits,
        fleet,
        wal,
        one_writer,
        sqlite,
        verified,
        verify_time,
    })
}

fn print_writes(writes: &Writes, options: &Options) {
    let f = &writes.fleet;
    let lat = |r: &WriteRun| {
        format!(
            "put p50 {:.2} ms, p99 {:.2} ms",
            percentile(&r.latencies_us, 0.50) / 1000.0,
            percentile(&r.latencies_us, 0.99) / 1000.0
        )
    };
    println!(
        "\n3. secret writes to the shared store, {NODES} nodes x {WRITERS_PER_NODE} concurrent writers (admin socket, secret_put of a new secret each), {} s:",
        options.seconds
    );
    let per_node: Vec<String> = f
        .per_node
        .iter()
        .enumerate()
        .map(|(n, c)| format!("node{} {:.0}/s", n + 1, *c as f64 / f.elapsed.as_secs_f64()))
        .collect();
    println!(
        "  total {:.0} writes/s ({} writes in {:.2} s; {}); {}",
        f.rate(),
        f.total(),
        f.elapsed.as_secs_f64(),
        per_node.join(", "),
        lat(f)
    );
    let per = |x: u64| x as f64 / f.total().max(1) as f64;
    println!(
        "  PostgreSQL during it, per write: {:.2} write transactions (xids), {:.2} WAL fsyncs (pg_stat_wal), {:.0} bytes of WAL",
        per(writes.wal.xids),
        per(writes.wal.syncs),
        per(writes.wal.wal_bytes)
    );
    let backend_samples: u64 = writes.waits.by_state.iter().map(|(_, n)| n).sum();
    if backend_samples > 0 {
        let share = |n: u64| n as f64 * 100.0 / backend_samples as f64;
        let (big, small): (Vec<_>, Vec<_>) = writes
            .waits
            .by_state
            .iter()
            .partition(|(_, n)| share(*n) >= 1.0);
        let mut shares: Vec<String> = big
            .iter()
            .map(|(state, n)| format!("{state} {:.0}%", share(*n)))
            .collect();
        if !small.is_empty() {
            let rest: u64 = small.iter().map(|(_, n)| n).sum();
            shares.push(format!("{} others {:.1}%", small.len(), share(rest)));
        }
        println!(
            "  the nodes' store connections, sampled every 10 ms ({} samples, pg_stat_activity): {}",
            writes.waits.samples,
            shares.join(", ")
        );
        println!(
            "  (ClientRead (idle in transaction): the server waits for warden inside a write — its statements' round trips, sealing, the audit record's fsync; \
             (idle): between writes; Lock:transactionid: waiting for another node's write to end (the one-row change_counter); IO:WALSync / LWLock:WALWrite: the commit's WAL flush)"
        );
    }
    if writes.wal.syncs > 0 {
        println!(
            "  WAL fsyncs: {:.2} ms each, the WAL being fsynced {:.0}% of the run's wall time (pg_stat_wal.wal_sync_time)",
            writes.wal.sync_us as f64 / writes.wal.syncs as f64 / 1000.0,
            writes.wal.sync_us as f64 / 1e4 / f.elapsed.as_secs_f64()
        );
    }
    println!(
        "  correctness: {} of {} values read back equal through another node ({:.1} s)",
        writes.verified,
        f.total(),
        writes.verify_time.as_secs_f64()
    );
    println!(
        "  same run: 1 writer on node1 {:.0}/s ({}); the SQLite node with {WRITERS_PER_NODE} writers {:.0}/s ({})",
        writes.one_writer.rate(),
        lat(&writes.one_writer),
        writes.sqlite.rate(),
        lat(&writes.sqlite)
    );
    println!(
        "  target >= {WRITE_TARGET:.0} writes/s with {NODES} nodes: {:.0}/s  {}",
        f.rate(),
        verdict_at_least(f.rate(), WRITE_TARGET)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&bytes)), Some(bytes));
        assert_eq!(base64_decode("Zm9v!"), None);
    }

    #[test]
    fn startup_message_is_framed() {
        let m = startup_message("app", "db");
        assert_eq!(
            u32::from_be_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(&m[4..8], &196_608u32.to_be_bytes());
        assert!(m[8..].starts_with(b"user\0app\0database\0db\0"));
        assert_eq!(&m[m.len() - 2..], b"\0\0");
    }

    #[test]
    fn error_message_field_is_read() {
        let body = b"SFATAL\0C28000\0Mwarden: workload \"me\" is frozen\0\0";
        assert_eq!(error_message(body), "warden: workload \"me\" is frozen");
        assert_eq!(error_message(b"SERROR\0\0"), "(an error without a message)");
        assert_eq!(error_message(b"Mno end"), "no end");
    }

    #[test]
    fn states_are_tallied() {
        let text = "Client:ClientRead (idle in transaction)|2\nLock:transactionid (active)|1\n\
                    Client:ClientRead (idle in transaction)|1\nrunning (active)|1\nnoise\nx|y\n";
        assert_eq!(
            tally_states(text),
            [
                ("Client:ClientRead (idle in transaction)".to_owned(), 3),
                ("Lock:transactionid (active)".to_owned(), 1),
                ("running (active)".to_owned(), 1),
            ]
        );
        assert!(tally_states("").is_empty());
    }

    #[test]
    fn spread_and_verdicts() {
        let s = spread((1..=100).map(Duration::from_millis));
        assert_eq!(
            s,
            Spread {
                p50_ms: 50.0,
                p99_ms: 99.0,
                max_ms: 100.0
            }
        );
        let s = spread((1..=30).map(Duration::from_millis));
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (15.0, 30.0, 30.0));
        assert_eq!(spread([]).max_ms, 0.0);
        assert_eq!(verdict_at_most(200.0, 250.0), "met");
        assert_eq!(verdict_at_most(300.0, 250.0), "MISSED by 50.0 (20% over)");
        assert_eq!(
            verdict_at_least(450.0, 500.0),
            "MISSED by 50.00 (10% short)"
        );
        assert_eq!(verdict_at_least(0.95, 0.9), "met");
    }
}
