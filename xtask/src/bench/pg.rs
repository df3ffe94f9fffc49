//! The PostgreSQL proxy bench: pgbench select-only load against one
//! throwaway PostgreSQL, reached three ways in the same run —
//!
//! - `direct`: pgbench logs in itself (SCRAM, `PGPASSWORD`);
//! - `warden`: pgbench connects with no password, warden attests it and
//!   logs in upstream with the injected credential (the default
//!   `audit.sync = "interval"`: session audit records written to the OS
//!   before the session goes on, fsynced within 10 ms);
//! - `warden-commit`: a second warden, identical but for
//!   `audit.sync = "commit"` (each session record fsynced first);
//! - `pgbouncer`: PgBouncer (session pooling, `auth_type = any`) injects the
//!   same credential from its `[databases]` entry.
//!
//! Two modes: persistent connections, and a new connection per transaction
//! (`pgbench -C`). Runs are interleaved (for each mode, every round runs
//! direct, warden, warden-commit, pgbouncer in turn) and the median over rounds is
//! reported, with p50/p99 latency from pgbench's per-transaction log.
//!
//! Everything lives in a temp dir and every process is stopped at the end,
//! also on error (see [`Lab`]'s `Drop`).

mod leases;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cmd, prereq};

/// pgbench clients and threads, the same for every target.
const CLIENTS: u32 = 4;
const THREADS: u32 = 2;
/// `pgbench -i -s SCALE`: 1M rows in pgbench_accounts.
const SCALE: u32 = 10;
/// The OS user that runs the server and PgBouncer (both refuse root).
const OS_USER: &str = "postgres";
/// The role and database pgbench uses.
const ROLE: &str = "app";
const SECRET: &str = "bench/app";

/// Seconds per pgbench run and interleaved rounds.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub seconds: u64,
    pub rounds: u64,
    /// Only the lease issuance part (`--only leases`).
    pub leases_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 10,
            rounds: 2,
            leases_only: false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Persistent,
    ConnectPerTransaction,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Persistent, Mode::ConnectPerTransaction];

    fn name(self) -> &'static str {
        match self {
            Mode::Persistent => "persistent",
            Mode::ConnectPerTransaction => "conn-per-txn (-C)",
        }
    }

    /// warden's TPS must reach this fraction of direct.
    fn direct_target(self) -> f64 {
        match self {
            Mode::Persistent => 1.1,
            Mode::ConnectPerTransaction => 0.8,
        }
    }

    /// The target against PgBouncer in the same run, per warden variant.
    fn bouncer_target(self, target: Target) -> f64 {
        match (self, target) {
            (Mode::Persistent, _) => 2.0,
            (Mode::ConnectPerTransaction, Target::WardenCommit) => 0.8,
            (Mode::ConnectPerTransaction, _) => 1.2,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Warden,
    /// warden with `audit.sync = "commit"`.
    WardenCommit,
    PgBouncer,
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Direct,
        Target::Warden,
        Target::WardenCommit,
        Target::PgBouncer,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Warden => "warden",
            Target::WardenCommit => "warden-commit",
            Target::PgBouncer => "pgbouncer",
        }
    }

    /// The `[audit]` table of a warden target's config.
    fn audit_toml(self) -> &'static str {
        match self {
            Target::WardenCommit => "\n[audit]\nsync = \"commit\"\n",
            _ => "",
        }
    }

    /// Subdirectory of the lab holding a warden target's state.
    fn warden_dir(self) -> &'static str {
        match self {
            Target::WardenCommit => "warden-commit",
            _ => "warden",
        }
    }
}

/// What one pgbench run measured.
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    pub(super) tps: f64,
    latency_avg_ms: f64,
    /// pgbench's "average connection time" (meaningful with `-C`).
    pub(super) conn_ms: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
    transactions: usize,
    /// The proxy's CPU time per transaction (µs; with `-C` per session),
    /// from its `/proc/PID/stat` before and after the run.
    cpu_us_per_txn: Option<f64>,
    /// The proxy's context switches per transaction (its live threads'
    /// voluntary + involuntary switches).
    switches_per_txn: Option<f64>,
    /// warden's CPU per transaction by thread kind (µs): the session
    /// threads, the audit writer, the rest (eBPF event reader, anomaly
    /// detector, admin socket, timers). None for PgBouncer.
    threads_us: Option<ThreadSplit>,
    /// Where the machine's CPU went per transaction (µs): pgbench, the
    /// PostgreSQL server (postmaster and backends), every core's busy time.
    split: Option<CpuSplit>,
}

/// CPU time per transaction (µs) of the parts of one run, and how busy the
/// machine was: with `-C` this shows what each side costs a session and
/// how much of the machine is left for the proxy.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CpuSplit {
    client_us: f64,
    server_us: f64,
    machine_us: f64,
    /// Busy share of all cores during the run (0–1).
    busy: f64,
}

/// warden's CPU (µs) by thread kind, from each live thread's
/// `/proc/PID/task/TID/stat` (its `comm` says which kind it is).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ThreadSplit {
    sessions: f64,
    audit: f64,
    rest: f64,
}

impl ThreadSplit {
    /// Sums of the live threads of `pid` so far.
    fn read(pid: u32) -> Option<ThreadSplit> {
        let mut split = ThreadSplit::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let tid = task.file_name();
            let Some(tid) = tid.to_str() else { continue };
            let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
                continue;
            };
            let Some([user, system, _, _]) = stat_times(&format!("{pid}/task/{tid}")) else {
                continue;
            };
            let us = (user + system) as f64;
            match comm.trim() {
                c if c.starts_with("warden-shard") => split.sessions += us,
                "warden-audit" => split.audit += us,
                _ => split.rest += us,
            }
        }
        Some(split)
    }

    /// (after − before) / n.
    fn per(after: ThreadSplit, before: ThreadSplit, n: usize) -> ThreadSplit {
        let per = |a: f64, b: f64| (a - b).max(0.0) / n as f64;
        ThreadSplit {
            sessions: per(after.sessions, before.sessions),
            audit: per(after.audit, before.audit),
            rest: per(after.rest, before.rest),
        }
    }
}

/// Cumulative CPU counters read before and after a run (µs).
#[derive(Clone, Copy)]
struct CpuCounters {
    /// This process's waited-for children (pgbench).
    children_us: u64,
    /// The server's process tree.
    server_us: u64,
    /// Every core's busy and total time.
    busy_us: u64,
    total_us: u64,
}

pub fn run(repo: &Path, options: &Options) -> Result<()> {
    if !is_root() {
        print_skip_notice();
        return Ok(());
    }
    let found = prereq::ensure_system_packages(prereq::BENCH_REQUIREMENTS)?;
    let pg_bin = found
        .pg_bin_dir()
        .context("initdb was found but its directory was not")?
        .to_path_buf();
    let pgbouncer = prereq::find_on_path("pgbouncer").context("pgbouncer not found on $PATH")?;

    cmd::run(cmd::cargo(repo).args(["build", "--release", "-p", "warden"]))?;
    let warden = cmd::target_dir(repo).join("release").join("warden");
    if !warden.is_file() {
        bail!(
            "the build succeeded but {} does not exist",
            warden.display()
        );
    }

    let mut lab = Lab::create(pg_bin)?;
    lab.start_postgres()?;
    if !options.leases_only {
        lab.load_pgbench_data()?;
        lab.start_warden(&warden, Target::Warden)?;
        lab.start_warden(&warden, Target::WardenCommit)?;
        lab.start_pgbouncer(&pgbouncer)?;
        for target in Target::ALL {
            lab.check_login(target)?;
        }
        let results = measure(&lab, options)?;
        print_report(&results, options);
    }
    let leases = leases::run(&lab, &warden)?;
    leases::print(&leases);
    lab.shutdown();
    Ok(())
}

/// Not root: say what the bench needs and what is missing, and skip.
fn print_skip_notice() {
    println!(
        "SKIPPED: the PostgreSQL bench must run as root (it runs initdb, pg_ctl and \
         pgbouncer as the `{OS_USER}` user through setpriv, and installs missing packages)."
    );
    let pg_bin = prereq::find_pg_bin_dir();
    let mut missing = Vec::new();
    for requirement in prereq::BENCH_REQUIREMENTS {
        let present = match requirement.location {
            prereq::Location::Path => prereq::find_on_path(requirement.binary).is_some(),
            prereq::Location::PgBinDir => pg_bin
                .as_ref()
                .is_some_and(|dir| dir.join(requirement.binary).is_file()),
        };
        if !present {
            missing.push(requirement);
        }
    }
    if missing.is_empty() {
        println!("  every program it needs is installed; rerun as root (e.g. with sudo).");
        return;
    }
    for requirement in &missing {
        println!(
            "  missing  {:<10} (Debian package `{}`: {})",
            requirement.binary, requirement.package, requirement.why
        );
    }
    let mut packages: Vec<&str> = missing.iter().map(|r| r.package).collect();
    packages.sort_unstable();
    packages.dedup();
    println!(
        "  install with: sudo apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );
}

/// The throwaway setup: a temp dir holding the cluster, warden's state and
/// PgBouncer's config, and the processes started. Dropping it stops them
/// (by pid, with `kill`; the server with `pg_ctl stop`) and removes the dir.
struct Lab {
    dir: PathBuf,
    pg_bin: PathBuf,
    pg_port: u16,
    warden_port: u16,
    warden_commit_port: u16,
    bouncer_port: u16,
    password: String,
    pg_started: bool,
    children: Vec<(&'static str, Child)>,
    cleaned: bool,
}

impl Lab {
    fn create(pg_bin: PathBuf) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("warden-pgbench-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("could not remove stale {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        let [pg_port, warden_port, warden_commit_port, bouncer_port] = free_ports()?;
        let lab = Self {
            dir,
            pg_bin,
            pg_port,
            warden_port,
            warden_commit_port,
            bouncer_port,
            password: random_alphanumeric(24)?,
            pg_started: false,
            children: Vec::new(),
            cleaned: false,
        };
        // The postgres user must be able to traverse the top dir; what is
        // secret (the data dir, PgBouncer's ini, warden's store) is private
        // in subdirectories.
        set_mode(&lab.dir, 0o755)?;
        for sub in ["pg", "warden", "warden-commit", "pgbouncer", "logs"] {
            std::fs::create_dir(lab.dir.join(sub))?;
            set_mode(&lab.dir.join(sub), 0o700)?;
        }
        chown_to_postgres(&lab.pg_dir())?;
        chown_to_postgres(&lab.dir.join("pgbouncer"))?;
        println!(
            "temp dir {}; ports: postgres {pg_port}, warden {warden_port}, warden-commit {warden_commit_port}, pgbouncer {bouncer_port}",
            lab.dir.display()
        );
        Ok(lab)
    }

    fn pg_dir(&self) -> PathBuf {
        self.dir.join("pg")
    }

    fn data_dir(&self) -> PathBuf {
        self.pg_dir().join("data")
    }

    fn as_postgres(&self, program: &Path) -> Command {
        as_postgres(&self.dir, program)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = self.as_postgres(&self.pg_bin.join("pg_ctl"));
        command.arg("-D").arg(self.data_dir()).args(args);
        command
    }

    fn start_postgres(&mut self) -> Result<()> {
        self.pg_started = true;
        start_cluster(
            &self.dir,
            &self.pg_bin,
            &self.data_dir(),
            &self.pg_dir(),
            &format!(
                "\n# cargo xtask bench\nport = {}\nlisten_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\nmax_connections = 200\nfsync = off\n\
                 password_encryption = 'scram-sha-256'\n",
                self.pg_port,
                self.pg_dir().display()
            ),
        )
    }

    /// Role and database `app` (over the unix socket, trusted), then
    /// `pgbench -i` as `app` over TCP with the password.
    fn load_pgbench_data(&self) -> Result<()> {
        let mut psql = Command::new("psql");
        psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.pg_dir())
            .args([
                "-p",
                &self.pg_port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ]);
        let sql = format!(
            "CREATE ROLE {ROLE} LOGIN PASSWORD '{}';\nCREATE DATABASE {ROLE} OWNER {ROLE};\n",
            self.password
        );
        run_with_stdin(&mut psql, sql.as_bytes())?;
        let started = Instant::now();
        let mut init = self.pgbench(Target::Direct);
        init.args(["-i", "-q", "-s", &SCALE.to_string(), ROLE]);
        run_captured(&mut init)?;
        println!(
            "loaded pgbench scale {SCALE} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Starts the warden of `target` (one of the warden targets).
    fn start_warden(&mut self, warden: &Path, target: Target) -> Result<()> {
        let route = format!(
            "kind = \"postgres\"\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"127.0.0.1:{pg}\"\n\
             upstream_tls = {{ mode = \"disable\" }}\n\
             credential = {{ user = \"{ROLE}\", secret = \"{SECRET}\", cache_ttl = \"10m\" }}",
            listen = self.port(target),
            pg = self.pg_port,
        );
        let started = super::start_bench_warden(
            warden,
            &self.dir.join(target.warden_dir()),
            &route,
            target.audit_toml(),
            SECRET,
            self.password.as_bytes(),
        )?;
        let (path, log_path) = (started.config, started.log);
        self.children.push((target.name(), started.child));
        let warden_cmd = |args: &[&str]| {
            let mut command = Command::new(warden);
            command.arg("--config").arg(&path).args(args);
            command
        };

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.fail_if_exited(target.name(), &log_path)?;
            if cmd::succeeds_quietly(&mut warden_cmd(&["status"])) {
                return Ok(());
            }
            if Instant::now() > deadline {
                print_tail(&log_path, 20);
                bail!("`warden status` did not succeed within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start_pgbouncer(&mut self, pgbouncer: &Path) -> Result<()> {
        let bdir = self.dir.join("pgbouncer");
        let ini = bdir.join("pgbouncer.ini");
        let log_path = bdir.join("pgbouncer.log");
        let pool = CLIENTS * 2 + 10;
        let text = format!(
            "[databases]\n\
             {ROLE} = host=127.0.0.1 port={pg} dbname={ROLE} user={ROLE} password={pw}\n\
             \n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = any\npool_mode = session\n\
             default_pool_size = {pool}\nmax_client_conn = 200\n\
             logfile = {log}\npidfile = {pid}\n\
             log_connections = 0\nlog_disconnections = 0\n\
             ignore_startup_parameters = extra_float_digits\n",
            pg = self.pg_port,
            pw = self.password,
            port = self.bouncer_port,
            log = log_path.display(),
            pid = bdir.join("pgbouncer.pid").display(),
        );
        std::fs::write(&ini, text)?;
        set_mode(&ini, 0o600)?;
        chown_to_postgres(&bdir)?;

        let mut command = self.as_postgres(pgbouncer);
        command.arg(&ini).stdin(Stdio::null());
        command.stdout(Stdio::null()).stderr(Stdio::null());
        println!("$ {}", cmd::display(&command));
        let child = command.spawn().context("could not start pgbouncer")?;
        self.children.push(("pgbouncer", child));

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            self.fail_if_exited("pgbouncer", &log_path)?;
            if TcpStream::connect(("127.0.0.1", self.bouncer_port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                print_tail(&log_path, 20);
                bail!(
                    "pgbouncer did not listen on 127.0.0.1:{} within 15 s",
                    self.bouncer_port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn fail_if_exited(&mut self, name: &str, log: &Path) -> Result<()> {
        for (child_name, child) in &mut self.children {
            if *child_name == name {
                if let Some(status) = child.try_wait()? {
                    print_tail(log, 20);
                    bail!("{name} exited early ({status}); its log is above");
                }
            }
        }
        Ok(())
    }

    fn port(&self, target: Target) -> u16 {
        match target {
            Target::Direct => self.pg_port,
            Target::Warden => self.warden_port,
            Target::WardenCommit => self.warden_commit_port,
            Target::PgBouncer => self.bouncer_port,
        }
    }

    /// `pgbench -h 127.0.0.1 -p PORT -U app`, with the password only when
    /// going direct. TLS is off everywhere, so no target pays for the
    /// SSLRequest round trip.
    fn pgbench(&self, target: Target) -> Command {
        let mut command = Command::new("pgbench");
        command
            .args(["-h", "127.0.0.1", "-p", &self.port(target).to_string()])
            .args(["-U", ROLE])
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .env_remove("PGSERVICE")
            .env("PGSSLMODE", "disable")
            .env("PGPASSFILE", "/dev/null");
        if target == Target::Direct {
            command.env("PGPASSWORD", &self.password);
        }
        command
    }

    /// One query through `target`, so a broken setup fails before the runs.
    fn check_login(&self, target: Target) -> Result<()> {
        let mut psql = Command::new("psql");
        psql.args(["-X", "-A", "-t", "-h", "127.0.0.1"])
            .args(["-p", &self.port(target).to_string(), "-U", ROLE, "-d", ROLE])
            .args([
                "-c",
                "SELECT current_user || ' ' || count(*) FROM pgbench_branches",
            ])
            .env_remove("PGPASSWORD")
            .env("PGSSLMODE", "disable")
            .env("PGPASSFILE", "/dev/null");
        if target == Target::Direct {
            psql.env("PGPASSWORD", &self.password);
        }
        let out = run_captured(&mut psql)
            .with_context(|| format!("could not query PostgreSQL through {}", target.name()))?;
        println!("  {:<9} ok: {}", target.name(), out.trim());
        Ok(())
    }

    /// One pgbench run against `target`; p50/p99 from its transaction log.
    fn bench_once(&self, target: Target, mode: Mode, seconds: u64, tag: &str) -> Result<Sample> {
        let logs = self.dir.join("logs");
        let prefix = logs.join(tag);
        let mut command = self.pgbench(target);
        command
            .args(["-n", "-S", "-T", &seconds.to_string()])
            .args(["-c", &CLIENTS.to_string(), "-j", &THREADS.to_string()])
            .arg("--log")
            .arg(format!("--log-prefix={}", prefix.display()));
        if mode == Mode::ConnectPerTransaction {
            command.arg("-C");
        }
        command.arg(ROLE).current_dir(&logs);
        let proxy = self.proxy_pid(target);
        let server = self.server_pid();
        let warden = proxy.filter(|_| target != Target::PgBouncer);
        let before = proxy.and_then(process_cost);
        let threads_before = warden.and_then(ThreadSplit::read);
        let counters_before = cpu_counters(server);
        let out = run_captured(&mut command)?;
        let counters_after = cpu_counters(server);
        let threads_after = warden.and_then(ThreadSplit::read);
        let after = proxy.and_then(process_cost);
        let mut sample = parse_pgbench_output(&out)
            .with_context(|| format!("could not read pgbench's summary:\n{out}"))?;
        let mut latencies_us = read_latency_logs(&logs, tag)?;
        latencies_us.sort_unstable();
        sample.transactions = latencies_us.len();
        if let (Some(b), Some(a), n) = (before, after, latencies_us.len()) {
            if n > 0 {
                sample.cpu_us_per_txn = Some(a.0.saturating_sub(b.0) as f64 / n as f64);
                sample.switches_per_txn = Some(a.1.saturating_sub(b.1) as f64 / n as f64);
                if let (Some(tb), Some(ta)) = (threads_before, threads_after) {
                    sample.threads_us = Some(ThreadSplit::per(ta, tb, n));
                }
            }
        }
        let n = latencies_us.len();
        if let (Some(b), Some(a)) = (counters_before, counters_after) {
            let total = a.total_us.saturating_sub(b.total_us);
            if n > 0 && total > 0 {
                let per = |x: u64, y: u64| x.saturating_sub(y) as f64 / n as f64;
                sample.split = Some(CpuSplit {
                    client_us: per(a.children_us, b.children_us),
                    server_us: per(a.server_us, b.server_us),
                    machine_us: per(a.busy_us, b.busy_us),
                    busy: a.busy_us.saturating_sub(b.busy_us) as f64 / total as f64,
                });
            }
        }
        sample.p50_ms = percentile(&latencies_us, 0.50) / 1000.0;
        sample.p99_ms = percentile(&latencies_us, 0.99) / 1000.0;
        Ok(sample)
    }

    /// The postmaster's pid, from its pid file.
    fn server_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The pid of the proxy behind `target` (None: direct).
    fn proxy_pid(&self, target: Target) -> Option<u32> {
        let name = match target {
            Target::Direct => return None,
            Target::PgBouncer => "pgbouncer",
            other => other.name(),
        };
        self.children
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, child)| child.id())
    }

    /// Stops everything and removes the temp dir; idempotent.
    fn shutdown(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        while let Some((name, mut child)) = self.children.pop() {
            super::stop_child(name, &mut child, Duration::from_secs(5));
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
                "stopped warden, pgbouncer and postgres; removed {}",
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

type Results = Vec<(Mode, Target, Vec<Sample>)>;

/// For each mode, `rounds` rounds of every target in turn.
fn measure(lab: &Lab, options: &Options) -> Result<Results> {
    println!(
        "pgbench -n -S -T {} -c {CLIENTS} -j {THREADS} [-C], {} interleaved round(s) per mode",
        options.seconds, options.rounds
    );
    let mut results: Results = Vec::new();
    for mode in Mode::ALL {
        for target in Target::ALL {
            results.push((mode, target, Vec::new()));
        }
        for round in 1..=options.rounds {
            for target in Target::ALL {
                let tag = format!("{}-{}-{round}", mode_tag(mode), target.name());
                let sample = lab
                    .bench_once(target, mode, options.seconds, &tag)
                    .with_context(|| {
                        format!("pgbench {} through {} failed", mode.name(), target.name())
                    })?;
                println!(
                    "  {:<18} round {round} {:<9} {:>9.0} tps  avg {:.3} ms  p50 {:.3} ms  p99 {:.3} ms{}",
                    mode.name(),
                    target.name(),
                    sample.tps,
                    sample.latency_avg_ms,
                    sample.p50_ms,
                    sample.p99_ms,
                    sample
                        .conn_ms
                        .map(|ms| format!("  connect {ms:.3} ms"))
                        .unwrap_or_default()
                );
                if let Some((_, _, samples)) = results
                    .iter_mut()
                    .find(|(m, t, _)| *m == mode && *t == target)
                {
                    samples.push(sample);
                }
            }
        }
    }
    Ok(results)
}

/// CPU time (µs, every thread, exited ones included) and context switches
/// (live threads) of process `pid` so far.
pub(super) fn process_cost(pid: u32) -> Option<(u64, u64)> {
    let [user, system, _, _] = stat_times(&pid.to_string())?;
    let cpu_us = user + system;
    let mut switches = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some((cpu_us, switches))
}

/// utime, stime, cutime, cstime of `/proc/PID/stat` (µs; USER_HZ 100).
fn stat_times(pid: &str) -> Option<[u64; 4]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut out = [0u64; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = fields.get(11 + i)?.parse::<u64>().ok()? * 10_000;
    }
    Some(out)
}

/// The parent pid in `/proc/PID/stat`.
fn parent_of(pid: &str) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU used so far by this process's waited-for children, by the server
/// `server` (the postmaster, its exited backends through its children's
/// times, its live backends), and by the whole machine.
fn cpu_counters(server: Option<u32>) -> Option<CpuCounters> {
    let me = stat_times("self")?;
    let mut server_us = 0;
    if let Some(root) = server {
        let t = stat_times(&root.to_string())?;
        server_us = t.iter().sum();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if parent_of(pid) == Some(root) {
                // A backend that exits between the two reads moves into the
                // postmaster's children's times: counted once either way.
                server_us += stat_times(pid).map_or(0, |t| t[0] + t[1]);
            }
        }
    }
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (USER_HZ ticks).
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3)? + cpu.get(4)?;
    Some(CpuCounters {
        children_us: me[2] + me[3],
        server_us,
        busy_us: (total - idle) * 10_000,
        total_us: total * 10_000,
    })
}

fn mode_tag(mode: Mode) -> &'static str {
    match mode {
        Mode::Persistent => "persistent",
        Mode::ConnectPerTransaction => "connect",
    }
}

/// The per-round medians of each figure.
fn median_sample(samples: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let conns: Vec<f64> = samples.iter().filter_map(|s| s.conn_ms).collect();
    Sample {
        tps: pick(|s| s.tps),
        latency_avg_ms: pick(|s| s.latency_avg_ms),
        conn_ms: (!conns.is_empty()).then(|| median(conns)),
        p50_ms: pick(|s| s.p50_ms),
        p99_ms: pick(|s| s.p99_ms),
        transactions: samples.iter().map(|s| s.transactions).sum(),
        cpu_us_per_txn: median_of(samples.iter().filter_map(|s| s.cpu_us_per_txn).collect()),
        switches_per_txn: median_of(samples.iter().filter_map(|s| s.switches_per_txn).collect()),
        threads_us: median_threads(samples),
        split: median_split(samples),
    }
}

/// Per-field medians of the rounds' thread splits.
fn median_threads(samples: &[Sample]) -> Option<ThreadSplit> {
    let all: Vec<ThreadSplit> = samples.iter().filter_map(|s| s.threads_us).collect();
    let pick = |f: fn(&ThreadSplit) -> f64| median_of(all.iter().map(f).collect());
    Some(ThreadSplit {
        sessions: pick(|t| t.sessions)?,
        audit: pick(|t| t.audit)?,
        rest: pick(|t| t.rest)?,
    })
}

/// Per-field medians of the rounds' CPU splits.
fn median_split(samples: &[Sample]) -> Option<CpuSplit> {
    let splits: Vec<CpuSplit> = samples.iter().filter_map(|s| s.split).collect();
    if splits.is_empty() {
        return None;
    }
    let pick = |f: fn(&CpuSplit) -> f64| median(splits.iter().map(f).collect());
    Some(CpuSplit {
        client_us: pick(|s| s.client_us),
        server_us: pick(|s| s.server_us),
        machine_us: pick(|s| s.machine_us),
        busy: pick(|s| s.busy),
    })
}

fn print_report(results: &Results, options: &Options) {
    let find = |mode: Mode, target: Target| {
        results
            .iter()
            .find(|(m, t, _)| *m == mode && *t == target)
            .map(|(_, _, samples)| median_sample(samples))
            .unwrap_or_default()
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nPostgreSQL proxy bench: median of {} round(s), {} s each, {CLIENTS} clients, {THREADS} threads, select-only",
        options.rounds, options.seconds
    );
    let _ = writeln!(
        table,
        "{:<18} {:<13} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>12}",
        "mode",
        "target",
        "TPS",
        "avg ms",
        "p50 ms",
        "p99 ms",
        "conn ms",
        "vs direct",
        "vs PgBouncer"
    );
    for mode in Mode::ALL {
        let direct = find(mode, Target::Direct);
        let bouncer = find(mode, Target::PgBouncer);
        for target in Target::ALL {
            let s = find(mode, target);
            let _ = writeln!(
                table,
                "{:<18} {:<13} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>9} {:>8.2}x {:>11.2}x",
                mode.name(),
                target.name(),
                s.tps,
                s.latency_avg_ms,
                s.p50_ms,
                s.p99_ms,
                s.conn_ms
                    .map(|ms| format!("{ms:.3}"))
                    .unwrap_or_else(|| "-".into()),
                ratio(s.tps, direct.tps),
                ratio(s.tps, bouncer.tps),
            );
        }
    }
    let _ = writeln!(
        table,
        "(avg ms: pgbench's latency average, which with -C includes reconnecting; \
         p50/p99: per-transaction log, without the connect; conn ms: pgbench's \
         average connection time. PgBouncer and warden (route.pool) keep their \
         server connections across -C client connections, so they skip the \
         backend start and SCRAM login that direct pays each time; warden still \
         attests every client and writes its session audit records: written to the \
         OS before the session goes on and fsynced within 10 ms (warden, the default \
         audit.sync = \"interval\"), or fsynced first (warden-commit, audit.sync = \"commit\").)"
    );
    let _ = writeln!(
        table,
        "\nproxy cost per transaction (with -C: per session), medians; CPU from /proc/PID/stat (10 ms ticks), context switches of the live threads:"
    );
    for mode in Mode::ALL {
        for target in [Target::Warden, Target::WardenCommit, Target::PgBouncer] {
            let s = find(mode, target);
            if let (Some(cpu), Some(sw)) = (s.cpu_us_per_txn, s.switches_per_txn) {
                // Which of warden's threads spent it: the session work
                // PgBouncer also does, and what PgBouncer has no part
                // like (the audit writer; the eBPF event reader, anomaly
                // detector and the rest).
                let threads = match (mode, s.threads_us) {
                    (Mode::ConnectPerTransaction, Some(t)) => format!(
                        "  (session threads {:.0}, audit writer {:.0}, other threads {:.0})",
                        t.sessions, t.audit, t.rest
                    ),
                    _ => String::new(),
                };
                let _ = writeln!(
                    table,
                    "  {:<18} {:<14} {:>8.1} µs CPU  {:>6.2} context switches{threads}",
                    mode.name(),
                    target.name(),
                    cpu,
                    sw
                );
            }
        }
    }
    let _ = writeln!(table, "\ntargets (warden TPS, medians above):");
    for mode in Mode::ALL {
        let direct = find(mode, Target::Direct).tps;
        let bouncer = find(mode, Target::PgBouncer).tps;
        for target in [Target::Warden, Target::WardenCommit] {
            let warden = find(mode, target).tps;
            for (against, baseline, wanted) in [
                ("direct", direct, mode.direct_target()),
                ("PgBouncer", bouncer, mode.bouncer_target(target)),
            ] {
                let got = ratio(warden, baseline);
                let _ = writeln!(
                    table,
                    "  {:<18} {:<13} >= {wanted:.2}x {against:<9}: {got:.2}x ({warden:.0} vs {baseline:.0} tps)  {}",
                    mode.name(),
                    target.name(),
                    if got >= wanted { "met" } else { "MISSED" }
                );
            }
        }
    }
    let w = find(Mode::ConnectPerTransaction, Target::Warden);
    let b = find(Mode::ConnectPerTransaction, Target::PgBouncer);
    print_split(&mut table, &find);
    if let (Some(ws), Some(wc)) = (w.split, w.cpu_us_per_txn) {
        // TPS = busy share × cores / machine CPU per session: at warden's
        // busy share, the target rate fixes the machine CPU a session may
        // take, and the client's, server's and kernel's part of it is not
        // warden's to spend.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wanted = b.tps * Mode::ConnectPerTransaction.bouncer_target(Target::Warden);
        if wanted > 0.0 {
            let machine = ws.busy * cores * 1e6 / wanted;
            let others = ws.machine_us - wc;
            let _ = writeln!(
                table,
                "  at warden's busy share ({:.0}%), {wanted:.0} tps allows {machine:.0} µs of machine CPU per session; \
                 pgbench, the server and the kernel's share outside warden take {others:.0} µs of it, \
                 leaving {:.0} µs for warden (measured {wc:.0} µs)",
                ws.busy * 100.0,
                machine - others
            );
        }
    }
    if let (Some(wc), Some(bc)) = (w.cpu_us_per_txn, b.cpu_us_per_txn) {
        let _ = writeln!(
            table,
            "  {:<18} {:<10} CPU per session <= PgBouncer's: {wc:.0} vs {bc:.0} µs  {}",
            Mode::ConnectPerTransaction.name(),
            Target::Warden.name(),
            if wc <= bc { "met" } else { "MISSED" }
        );
    }
    print!("{table}");
}

/// Where the machine's CPU went per `-C` session, by target.
fn print_split(table: &mut String, find: &dyn Fn(Mode, Target) -> Sample) {
    let _ = writeln!(
        table,
        "\nwhere the machine's CPU goes per -C session (µs, medians; pgbench from its rusage, the server's process tree and every core's busy time from /proc; other: softirq and kernel work not charged to a process, and anything else running on the machine — on a shared machine this figure is not warden's):"
    );
    let _ = writeln!(
        table,
        "  {:<14} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6}",
        "target", "pgbench", "server", "proxy", "other", "machine", "busy"
    );
    for target in Target::ALL {
        let s = find(Mode::ConnectPerTransaction, target);
        let Some(split) = s.split else { continue };
        let proxy = s.cpu_us_per_txn.unwrap_or(0.0);
        let _ = writeln!(
            table,
            "  {:<14} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>5.0}%",
            target.name(),
            split.client_us,
            split.server_us,
            proxy,
            split.machine_us - split.client_us - split.server_us - proxy,
            split.machine_us,
            split.busy * 100.0
        );
    }
}

fn median_of(values: Vec<f64>) -> Option<f64> {
    (!values.is_empty()).then(|| median(values))
}

pub(super) fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        value / baseline
    } else {
        0.0
    }
}

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// TPS, average latency and (with `-C`) connection time from pgbench's
/// summary; fails when transactions failed or the run aborted.
pub(super) fn parse_pgbench_output(out: &str) -> Option<Sample> {
    let number_after = |prefix: &str| {
        out.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    if out.contains("aborted") {
        return None;
    }
    if let Some(failed) = number_after("number of failed transactions:") {
        if failed > 0.0 {
            return None;
        }
    }
    Some(Sample {
        tps: number_after("tps =")?,
        latency_avg_ms: number_after("latency average =")?,
        conn_ms: number_after("average connection time ="),
        ..Sample::default()
    })
}

/// Per-transaction latencies (µs, third field) from the pgbench logs whose
/// names start with `tag`; the logs are deleted once read.
fn read_latency_logs(dir: &Path, tag: &str) -> Result<Vec<u64>> {
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_ours = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(&format!("{tag}.")));
        if !is_ours {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("could not read {}", path.display()))?;
        latencies.extend(parse_latency_log(&text));
        std::fs::remove_file(&path)?;
    }
    if latencies.is_empty() {
        bail!(
            "pgbench wrote no transaction log for {tag} in {}",
            dir.display()
        );
    }
    Ok(latencies)
}

fn parse_latency_log(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.parse().ok())
}

/// Three distinct free TCP ports on 127.0.0.1 (held together while chosen).
pub(super) fn free_ports() -> Result<[u16; 4]> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    let mut ports = [0u16; 4];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

pub(super) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("could not chmod {}", path.display()))
}

pub(super) fn chown_to_postgres(path: &Path) -> Result<()> {
    let mut chown = Command::new("chown");
    chown
        .arg("-R")
        .arg(format!("{OS_USER}:{OS_USER}"))
        .arg(path);
    run_captured(&mut chown).map(drop)
}

/// Echoes `command`, runs it with output captured, fails (showing the
/// output) unless it exits 0; returns stdout.
pub(super) fn run_captured(command: &mut Command) -> Result<String> {
    let line = cmd::display(command);
    println!("$ {line}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Like [`run_captured`], feeding `input` on stdin (kept off the command
/// line, where passwords would show in `ps`).
pub(super) fn run_with_stdin(command: &mut Command, input: &[u8]) -> Result<()> {
    let line = cmd::display(command);
    println!("$ {line} < (stdin)");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .with_context(|| format!("could not write to `{line}`"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub(super) fn print_tail(path: &Path, n: usize) {
    let text = std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("---- last {n} lines of {} ----", path.display());
    for line in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("{line}");
    }
    eprintln!("---- end ----");
}

pub(super) fn is_root() -> bool {
    super::effective_uid() == Some(0)
}

/// `len` random letters and digits from /dev/urandom.
pub(super) fn random_alphanumeric(len: usize) -> Result<String> {
    use std::io::Read as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let limit = 256 - 256 % ALPHABET.len();
    let mut urandom = std::fs::File::open("/dev/urandom").context("could not open /dev/urandom")?;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        urandom.read_exact(&mut buf)?;
        for &byte in &buf {
            if out.len() < len && usize::from(byte) < limit {
                out.push(char::from(ALPHABET[usize::from(byte) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

/// `program` run as the postgres user in `dir`.
pub(super) fn as_postgres(dir: &Path, program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={OS_USER}"))
        .arg(format!("--regid={OS_USER}"))
        .arg("--init-groups")
        .arg(program)
        .current_dir(dir);
    command
}

/// A throwaway cluster for a bench: `initdb` into `data_dir`, `conf`
/// appended to postgresql.conf, password logins over TCP and trusted ones
/// on the unix socket in `socket_dir`, then `pg_ctl start` (in its own
/// process group, out of the terminal's ^C: it is stopped with pg_ctl).
pub(super) fn start_cluster(
    dir: &Path,
    pg_bin: &Path,
    data_dir: &Path,
    socket_dir: &Path,
    conf: &str,
) -> Result<()> {
    let mut initdb = as_postgres(dir, &pg_bin.join("initdb"));
    initdb.arg("-D").arg(data_dir).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]);
    run_captured(&mut initdb)?;
    let path = data_dir.join("postgresql.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("could not open {}", path.display()))?;
    file.write_all(conf.as_bytes())?;
    std::fs::write(
        data_dir.join("pg_hba.conf"),
        "host  all  all  127.0.0.1/32  scram-sha-256\nlocal all  all  trust\n",
    )?;
    let log = socket_dir.join("server.log");
    let mut start = as_postgres(dir, &pg_bin.join("pg_ctl"));
    start
        .arg("-D")
        .arg(data_dir)
        .args(["-w", "-t", "60", "-l"])
        .arg(&log)
        .arg("start");
    std::os::unix::process::CommandExt::process_group(&mut start, 0);
    if let Err(err) = run_captured(&mut start) {
        print_tail(&log, 20);
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_summary_is_parsed() {
        let out = "transaction type: <builtin: select only>\n\
                   number of failed transactions: 0 (0.000%)\n\
                   latency average = 0.412 ms\n\
                   average connection time = 1.250 ms\n\
                   tps = 9701.123456 (including reconnection times)\n";
        let sample = parse_pgbench_output(out);
        assert!(sample.is_some());
        let sample = sample.unwrap_or_default();
        assert!((sample.tps - 9701.123456).abs() < 1e-9);
        assert!((sample.latency_avg_ms - 0.412).abs() < 1e-9);
        assert_eq!(sample.conn_ms, Some(1.25));
        assert!(parse_pgbench_output("tps = 5 (x)\n").is_none());
        assert!(parse_pgbench_output(
            "number of failed transactions: 3 (1%)\nlatency average = 1 ms\ntps = 5 (x)\n"
        )
        .is_none());
    }

    #[test]
    fn latency_log_third_field_is_read() {
        let log = "0 1 250 0 1700000000 1\n1 1 1000 0 1700000000 2\nbad line\n";
        assert_eq!(parse_latency_log(log).collect::<Vec<_>>(), [250, 1000]);
    }

    #[test]
    fn percentiles_and_medians() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
    }
}
