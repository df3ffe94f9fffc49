//! `cargo xtask demo [start|stop|status]`: warden's daemon on the quickstart
//! config, with its state, log and pid file under `<repo>/.warden-demo/`.
//!
//! When PostgreSQL is installed the demo also runs its own cluster (see
//! [`demo_pg`]) in `<repo>/.warden-demo/pg/` on 127.0.0.1:15433, the upstream
//! of the quickstart route `demo-db`, with a role `app` whose random password
//! only warden holds; `start` then connects `psql` through warden once.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Steps};
use crate::demo_pg::{self, Cluster};
use crate::prereq;

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 40;
/// The secret the quickstart route `demo-db` logs in with.
const DB_SECRET: &str = "demo/db-password";
/// What the user runs to go through warden: no password anywhere.
const PSQL_CONNINFO: &str = "host=127.0.0.1 port=15432 dbname=app user=app";
const PSQL_QUERY: &str = "select current_user";

/// What `cargo xtask demo` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Status,
}

pub fn run(repo: &Path, action: Action) -> Result<ExitCode> {
    let demo = Demo::new(repo);
    match action {
        Action::Start => demo.start().map(|()| ExitCode::SUCCESS),
        Action::Stop => demo.stop().map(|()| ExitCode::SUCCESS),
        Action::Status => demo.status(),
    }
}

/// The demo's files; all paths are absolute.
struct Demo {
    repo: PathBuf,
    warden_bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

impl Demo {
    fn new(repo: &Path) -> Self {
        // The quickstart config puts its data dir and admin socket in
        // `../.warden-demo/`, relative to `examples/`.
        Demo {
            repo: repo.to_path_buf(),
            warden_bin: cmd::warden_bin(repo),
            config: repo.join("examples").join("quickstart.toml"),
            dir: repo.join(".warden-demo"),
        }
    }

    fn store_db(&self) -> PathBuf {
        self.dir.join("data").join("store.db")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("warden.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("warden.pid")
    }

    fn pg_dir(&self) -> PathBuf {
        self.dir.join("pg")
    }

    /// The demo PostgreSQL, or None when PostgreSQL is not installed.
    fn cluster(&self) -> Option<Cluster> {
        Cluster::find(&self.pg_dir())
    }

    /// `warden --config <quickstart> ARGS...`, run from the repository root.
    fn warden(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.warden_bin);
        command
            .current_dir(&self.repo)
            .arg("--config")
            .arg(&self.config)
            .args(args);
        command
    }

    fn start(&self) -> Result<()> {
        let mut steps = Steps::default();
        steps.run("prerequisites", || {
            prereq::ensure_system_packages(prereq::DEMO_REQUIREMENTS).map(drop)
        })?;
        steps.run("build warden", || cmd::build_warden(&self.repo).map(drop))?;
        steps.run("initialise the demo store", || self.init_store_once())?;
        let have_pg = steps.run("demo PostgreSQL", || self.start_postgres())?;
        steps.run("start the daemon", || self.start_daemon())?;
        if have_pg {
            steps.run("connect through warden", || self.try_route())?;
        }
        self.print_next_steps(have_pg);
        Ok(())
    }

    /// Creates (once) and starts the demo cluster, with the `app` role whose
    /// password goes to warden. False when PostgreSQL is not installed.
    fn start_postgres(&self) -> Result<bool> {
        let Some(cluster) = self.cluster() else {
            println!(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb), so the \
                 demo runs without a database behind route `demo-db`.\n\
                 To see the route work, install it and run the demo again:\n  \
                 sudo apt-get install postgresql\n  \
                 cargo xtask demo"
            );
            return Ok(false);
        };
        println!(
            "PostgreSQL server binaries: {}",
            cluster.bin_dir().display()
        );
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("could not create {}", self.dir.display()))?;
        cluster.create_once()?;
        cluster.start()?;
        cluster.create_app_role_once(|password| self.store_db_password(password))?;
        Ok(true)
    }

    /// `warden secret put demo/db-password --env dev`, the value on stdin
    /// (never on a command line, never printed).
    fn store_db_password(&self, password: &str) -> Result<()> {
        let mut command = self.warden(&["secret", "put", DB_SECRET, "--env", "dev"]);
        println!(
            "$ {} < (the new password, on stdin)",
            cmd::display(&command)
        );
        demo_pg::pipe_to(&mut command, password.as_bytes())
    }

    /// Runs the psql line from the next steps once, so the user sees the
    /// route work; on failure shows the end of warden's log.
    fn try_route(&self) -> Result<()> {
        let mut command = Command::new("psql");
        command
            .current_dir(&self.repo)
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env("PGCONNECT_TIMEOUT", "10")
            .args([PSQL_CONNINFO, "-c", PSQL_QUERY])
            // Never prompt for a password: warden supplies it.
            .arg("--no-password")
            .stdin(Stdio::null());
        if let Err(err) = cmd::run(&mut command) {
            self.print_log_tail();
            eprintln!(
                "hint: route `demo-db` only admits the workload in {} (exe_path of the real \
                 psql binary, e.g. /usr/lib/postgresql/15/bin/psql); the demo PostgreSQL \
                 logs to {}. warden is still running: `cargo xtask demo stop` stops it.",
                self.config.display(),
                self.pg_dir().join("postgres.log").display()
            );
            return Err(err);
        }
        Ok(())
    }

    /// Runs `warden init` unless the store already exists.
    fn init_store_once(&self) -> Result<()> {
        if !self.config.is_file() {
            bail!("demo config {} does not exist", self.config.display());
        }
        let store = self.store_db();
        if store.exists() {
            println!("{} exists; skipping `warden init`", store.display());
            return Ok(());
        }
        cmd::run(&mut self.warden(&["init"]))
    }

    /// Starts `warden up` unless a daemon already answers.
    fn start_daemon(&self) -> Result<()> {
        if self.daemon_answers() {
            println!("warden is already running (`warden status` answered).");
            return Ok(());
        }
        if let Some(pid) = self.running_pid()? {
            bail!(
                "warden (pid {pid}, from {}) is running but does not answer `warden status`; \
                 see {} or run `cargo xtask demo stop`",
                self.pid_file().display(),
                self.log_file().display()
            );
        }
        let mut child = self.spawn_daemon_detached()?;
        if let Err(err) = self.wait_until_ready(&mut child) {
            self.abandon_start(&mut child);
            self.print_log_tail();
            return Err(err);
        }
        println!(
            "warden is up (pid {}); log: {}",
            child.id(),
            self.log_file().display()
        );
        Ok(())
    }

    /// Whether `warden status` exits 0, i.e. the daemon answers on its socket.
    fn daemon_answers(&self) -> bool {
        cmd::succeeds_quietly(&mut self.warden(&["status"]))
    }

    /// Spawns `warden up` in its own process group with its output appended
    /// to the log, and records its pid.
    fn spawn_daemon_detached(&self) -> Result<Child> {
        use std::os::unix::process::CommandExt;

        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("could not create {}", self.dir.display()))?;
        let log = self.open_log()?;
        let mut command = self.warden(&["up"]);
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        println!(
            "$ {} >> {} 2>&1 &",
            cmd::display(&command),
            cmd::shell_quote(self.log_file())
        );
        let child = command
            .spawn()
            .with_context(|| format!("could not start `{}`", cmd::display(&command)))?;
        let pid_file = self.pid_file();
        std::fs::write(&pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("could not write {}", pid_file.display()))?;
        Ok(child)
    }

    fn open_log(&self) -> Result<File> {
        let path = self.log_file();
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("could not open {}", path.display()))
    }

    /// Polls `warden status` until it answers, the child exits, or we time out.
    fn wait_until_ready(&self, child: &mut Child) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("`warden up` exited early ({status})");
            }
            if self.daemon_answers() {
                return Ok(());
            }
            if started.elapsed() >= START_TIMEOUT {
                bail!(
                    "`warden status` did not answer within {}s",
                    START_TIMEOUT.as_secs()
                );
            }
            sleep(POLL_INTERVAL);
        }
    }

    /// Cleans up after a failed start: stops the child and drops the pid file.
    fn abandon_start(&self, child: &mut Child) {
        if matches!(child.try_wait(), Ok(None)) {
            println!("stopping the unresponsive daemon (pid {})", child.id());
            let _ = send_signal("TERM", child.id());
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(POLL_INTERVAL);
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    fn print_log_tail(&self) {
        let path = self.log_file();
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) => {
                eprintln!("(could not read {}: {err})", path.display());
                return;
            }
        };
        eprintln!(
            "---- last {LOG_TAIL_LINES} lines of {} ----",
            path.display()
        );
        for line in last_lines(&text, LOG_TAIL_LINES) {
            eprintln!("{line}");
        }
        eprintln!("---- end of log ----");
    }

    fn print_next_steps(&self, have_pg: bool) {
        let warden = format!(
            "{} --config {}",
            cmd::shell_quote(&self.warden_bin),
            cmd::shell_quote(&self.config)
        );
        let config = cmd::shell_quote(&self.config);
        let psql = psql_line();
        let psql_note = if have_pg {
            ""
        } else {
            "   # needs PostgreSQL: apt-get install postgresql, then cargo xtask demo"
        };
        println!(
            "\nwhat to try next:\n  \
             {psql}{psql_note}\n  \
             echo -n 's3cr3t-demo' | {warden} secret put demo/scratch --env dev\n  \
             {warden} secret list\n  \
             {warden} audit tail\n  \
             {warden} audit verify\n  \
             {warden} events    # who connected where, seen by the eBPF monitor (as root)\n  \
             {warden} config check {config}\n  \
             curl -s http://127.0.0.1:9477/metrics | head\n  \
             cargo xtask demo stop"
        );
    }

    /// Stops the daemon, then the demo PostgreSQL.
    fn stop(&self) -> Result<()> {
        let daemon = self.stop_daemon();
        let postgres = match self.cluster() {
            Some(cluster) => cluster.stop(),
            None => Ok(()),
        };
        daemon.and(postgres)
    }

    /// Stops the daemon recorded in the pid file.
    fn stop_daemon(&self) -> Result<()> {
        let Some(pid) = self.running_pid()? else {
            self.explain_nothing_to_stop();
            return Ok(());
        };
        println!("stopping warden (pid {pid})");
        send_signal("TERM", pid)?;
        if !wait_for_exit(pid, STOP_TIMEOUT) {
            bail!(
                "warden (pid {pid}) is still running {}s after SIGTERM; \
                 see {} or kill it with `kill -KILL {pid}`",
                STOP_TIMEOUT.as_secs(),
                self.log_file().display()
            );
        }
        self.remove_pid_file()?;
        println!("warden stopped");
        Ok(())
    }

    fn explain_nothing_to_stop(&self) {
        if self.warden_bin.is_file() && self.daemon_answers() {
            println!(
                "a warden daemon answers on the demo's admin socket, but it was not \
                 started by `cargo xtask demo` (no live pid in {}); stop it yourself",
                self.pid_file().display()
            );
        } else {
            println!("warden is not running; nothing to stop");
        }
    }

    /// Relays `warden status`, including its exit code, and reports the
    /// demo PostgreSQL.
    fn status(&self) -> Result<ExitCode> {
        match self.cluster() {
            Some(cluster) => println!("{}", cluster.describe()),
            None => println!("demo PostgreSQL: not installed (apt-get install postgresql)"),
        }
        if !self.warden_bin.is_file() {
            bail!(
                "{} does not exist; run `cargo xtask demo` first",
                self.warden_bin.display()
            );
        }
        let mut command = self.warden(&["status"]);
        let status = command
            .status()
            .with_context(|| format!("could not run `{}`", cmd::display(&command)))?;
        let code = status.code().unwrap_or(1);
        Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
    }

    /// The pid in the pid file if that process still runs warden; a stale
    /// pid file is removed.
    fn running_pid(&self) -> Result<Option<u32>> {
        let path = self.pid_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err).context(format!("could not read {}", path.display())),
        };
        let pid = text.trim().parse::<u32>().ok().filter(|pid| *pid > 0);
        match pid {
            Some(pid) if is_alive(pid) && looks_like_warden(pid) => Ok(Some(pid)),
            _ => {
                println!("removing stale pid file {}", path.display());
                self.remove_pid_file()?;
                Ok(None)
            }
        }
    }

    fn remove_pid_file(&self) -> Result<()> {
        let path = self.pid_file();
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).context(format!("could not remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// The psql command that goes through warden, as the user types it.
fn psql_line() -> String {
    format!(
        "psql {} -c {}",
        cmd::shell_quote(PSQL_CONNINFO).replace('\'', "\""),
        cmd::shell_quote(PSQL_QUERY)
    )
}

/// Sends `SIG<signal>` to `pid` with the `kill` program.
fn send_signal(signal: &str, pid: u32) -> Result<()> {
    cmd::run(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string()),
    )
}

/// `kill -0`: whether a process with this pid exists (and we may signal it).
fn is_alive(pid: u32) -> bool {
    cmd::succeeds_quietly(Command::new("kill").arg("-0").arg(pid.to_string()))
}

/// Guards against pid reuse: the process's command line must mention
/// warden. Where /proc is unavailable, trust the pid file.
fn looks_like_warden(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains("warden"),
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// Polls until `pid` is gone; false if it outlived `timeout`.
fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL_INTERVAL);
    }
    true
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(last_lines("a\nb", 5), ["a", "b"]);
        assert!(last_lines("", 3).is_empty());
    }

    #[test]
    fn demo_paths_live_under_the_repo() {
        let demo = Demo::new(Path::new("/repo"));
        assert_eq!(demo.config, Path::new("/repo/examples/quickstart.toml"));
        assert_eq!(
            demo.store_db(),
            Path::new("/repo/.warden-demo/data/store.db")
        );
        assert_eq!(demo.pid_file(), Path::new("/repo/.warden-demo/warden.pid"));
        assert_eq!(demo.log_file(), Path::new("/repo/.warden-demo/warden.log"));
    }

    #[test]
    fn the_psql_line_has_no_password() {
        assert_eq!(
            psql_line(),
            r#"psql "host=127.0.0.1 port=15432 dbname=app user=app" -c 'select current_user'"#
        );
    }

    #[test]
    fn our_own_process_is_alive() {
        assert!(is_alive(std::process::id()));
    }
}
