//! The demo's own PostgreSQL cluster, in `<repo>/.warden-demo/pg/`: created
//! once with `initdb`, listening on 127.0.0.1:15433 only (the upstream of the
//! quickstart route `demo-db`), its unix socket in the same folder.
//!
//! `initdb` and `pg_ctl` refuse to run as root, so when we are root they run
//! as the `postgres` user (through `setpriv`) and the folder belongs to it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::prereq;

/// The port reserved for the demo cluster; `examples/quickstart.toml` routes
/// `demo-db` to it.
pub const PORT: u16 = 15433;
/// The role and database the route logs in to.
const APP: &str = "app";
/// The cluster's superuser (`initdb -U`), whoever runs it.
const SUPERUSER: &str = "postgres";
/// The OS user that owns the cluster when we run as root.
const OS_USER: &str = "postgres";
const PASSWORD_LEN: usize = 24;
/// Unix socket paths are limited to 107 bytes on Linux.
const MAX_SOCKET_PATH: usize = 100;

pub struct Cluster {
    /// `<repo>/.warden-demo/pg`: data dir, log and socket live here.
    dir: PathBuf,
    /// PostgreSQL's server binaries (`initdb`, `pg_ctl`, `psql`).
    bin: PathBuf,
}

impl Cluster {
    /// The demo cluster in `dir`, or None when no PostgreSQL server binaries
    /// are installed.
    pub fn find(dir: &Path) -> Option<Self> {
        let bin = existing_cluster_bin(dir).or_else(prereq::find_pg_bin_dir)?;
        Some(Cluster {
            dir: dir.to_path_buf(),
            bin,
        })
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The cluster exists once `initdb` finished (and we configured it).
    pub fn exists(&self) -> bool {
        self.data_dir().join("PG_VERSION").is_file()
    }

    /// `PROGRAM ARGS...` from the server bin dir, as the `postgres` user
    /// when we are root.
    fn server_command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={OS_USER}"))
                .arg(format!("--regid={OS_USER}"))
                .arg("--init-groups")
                .arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir(&self.dir);
        command
    }

    /// Our folder is private (0700): its unix socket admits anyone as the
    /// superuser (`local all all trust`). As root, the `postgres` user that
    /// owns it must still be able to reach it, but `warden init` leaves
    /// `.warden-demo/` at mode 0700; this adds search-only permission for
    /// others there (`chmod o+x`): no listing, and warden's own data dir
    /// inside stays 0700.
    fn let_the_server_user_in(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if self.dir.is_dir() {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("could not chmod {}", self.dir.display()))?;
        }
        let Some(parent) = self.dir.parent() else {
            return Ok(());
        };
        if !is_root() {
            return Ok(());
        }
        let meta = std::fs::metadata(parent)
            .with_context(|| format!("could not stat {}", parent.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o001 == 0 {
            println!(
                "$ chmod o+x {}   # so the postgres user can reach {}",
                cmd::shell_quote(parent),
                self.dir.display()
            );
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("could not chmod {}", parent.display()))?;
        }
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = self.server_command("pg_ctl");
        command.arg("-D").arg(self.data_dir()).args(args);
        command
    }

    /// Runs `initdb` and configures the cluster, unless it already exists.
    pub fn create_once(&self) -> Result<()> {
        if self.exists() {
            println!(
                "{} exists; skipping `initdb`",
                self.data_dir().join("PG_VERSION").display()
            );
            return Ok(());
        }
        let socket = self.dir.join(format!(".s.PGSQL.{PORT}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the demo's socket path {} is too long for a unix socket; \
                 move the repository to a shorter path",
                socket.display()
            );
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("could not create {}", self.dir.display()))?;
        if is_root() {
            cmd::run(
                Command::new("chown")
                    .arg(format!("{OS_USER}:"))
                    .arg(&self.dir),
            )?;
        }
        self.let_the_server_user_in()?;
        let data = self.data_dir();
        if data.exists() {
            // A leftover from an interrupted `initdb`: no PG_VERSION, no data.
            println!("removing the incomplete cluster in {}", data.display());
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("could not remove {}", data.display()))?;
        }
        let created = cmd::run(
            self.server_command("initdb")
                .arg("-D")
                .arg(&data)
                .arg(format!("--username={SUPERUSER}"))
                .arg("--auth-local=trust")
                .arg("--auth-host=scram-sha-256")
                .arg("--encoding=UTF8")
                .stdout(Stdio::null()),
        )
        .and_then(|()| self.configure());
        if created.is_err() {
            let _ = std::fs::remove_dir_all(&data);
        }
        created
    }

    /// Port, listen address, socket dir and pg_hba for the demo.
    fn configure(&self) -> Result<()> {
        let data = self.data_dir();
        let conf = data.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("could not open {}", conf.display()))?;
        write!(
            file,
            "\n# Added by `cargo xtask demo`.\n\
             port = {PORT}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             password_encryption = 'scram-sha-256'\n",
            self.dir.display().to_string().replace('\'', "''")
        )
        .with_context(|| format!("could not write {}", conf.display()))?;
        let hba = data.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "# Written by `cargo xtask demo`: warden logs in over TCP with a password;\n\
             # local (unix socket) connections, used to set the demo up, are trusted.\n\
             host  all  all  127.0.0.1/32  scram-sha-256\n\
             local all  all                trust\n",
        )
        .with_context(|| format!("could not write {}", hba.display()))?;
        println!(
            "configured {}: 127.0.0.1:{PORT} only, socket in {}",
            data.display(),
            self.dir.display()
        );
        Ok(())
    }

    /// Whether `pg_ctl status` says the server runs.
    pub fn is_running(&self) -> bool {
        self.exists() && cmd::succeeds_quietly(&mut self.pg_ctl(&["status"]))
    }

    /// `pg_ctl -w -l <log> start`, unless it already runs.
    pub fn start(&self) -> Result<()> {
        self.let_the_server_user_in()?;
        if self.is_running() {
            println!("the demo PostgreSQL is already running on 127.0.0.1:{PORT}");
            return Ok(());
        }
        use std::os::unix::process::CommandExt;
        let log = self.log_file().display().to_string();
        let mut command = self.pg_ctl(&["-w", "-l", &log, "start"]);
        // Keep the server out of our process group (and the terminal's ^C).
        command.process_group(0);
        if let Err(err) = cmd::run(&mut command) {
            print_tail(&self.log_file(), 20);
            return Err(err);
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast`, if it runs.
    pub fn stop(&self) -> Result<()> {
        if !self.exists() {
            println!(
                "no demo PostgreSQL in {}; nothing to stop",
                self.dir.display()
            );
            return Ok(());
        }
        if !self.is_running() {
            println!("the demo PostgreSQL is not running; nothing to stop");
            return Ok(());
        }
        cmd::run(&mut self.pg_ctl(&["-w", "-m", "fast", "stop"]))
    }

    /// One line on the cluster's state, for `cargo xtask demo status`.
    pub fn describe(&self) -> String {
        if !self.exists() {
            format!(
                "demo PostgreSQL: not created yet ({} will hold it)",
                self.dir.display()
            )
        } else if self.is_running() {
            format!(
                "demo PostgreSQL: running on 127.0.0.1:{PORT} (data {}, log {})",
                self.data_dir().display(),
                self.log_file().display()
            )
        } else {
            format!(
                "demo PostgreSQL: stopped (data {})",
                self.data_dir().display()
            )
        }
    }

    /// `psql` as the superuser over the cluster's unix socket.
    fn admin_psql(&self) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .current_dir(&self.dir)
            .env_remove("PGPASSWORD")
            .arg("-X")
            .arg("-q")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("-h")
            .arg(&self.dir)
            .arg("-p")
            .arg(PORT.to_string())
            .arg("-U")
            .arg(SUPERUSER)
            .arg("-d")
            .arg("postgres");
        command
    }

    /// The output of one query, trimmed.
    fn query(&self, sql: &str) -> Result<String> {
        let mut command = self.admin_psql();
        command.arg("-tAc").arg(sql).stdin(Stdio::null());
        let line = cmd::display(&command);
        let output = command
            .output()
            .with_context(|| format!("could not start `{line}`"))?;
        if !output.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Runs `sql` fed on stdin, so nothing in it shows on a command line.
    fn run_sql_from_stdin(&self, sql: &str) -> Result<()> {
        let mut command = self.admin_psql();
        command.stdin(Stdio::piped());
        let line = cmd::display(&command);
        println!("$ {line} < (CREATE ROLE {APP} LOGIN PASSWORD '...', on stdin)");
        pipe_to(&mut command, sql.as_bytes())
    }

    /// Creates the `app` role (LOGIN, random password) and the `app`
    /// database it owns, once: when the role does not exist yet. The new
    /// password goes to warden first (`store_secret` gets it on stdin), so
    /// a role never exists with a password warden does not hold.
    pub fn create_app_role_once(
        &self,
        store_secret: impl FnOnce(&str) -> Result<()>,
    ) -> Result<()> {
        let exists = self.query(&format!("select 1 from pg_roles where rolname = '{APP}'"))?;
        if exists == "1" {
            println!("role `{APP}` exists; keeping its password");
        } else {
            let password = random_alphanumeric(PASSWORD_LEN)?;
            store_secret(&password)?;
            self.run_sql_from_stdin(&format!(
                "SET password_encryption = 'scram-sha-256';\n\
                 CREATE ROLE {APP} LOGIN PASSWORD '{password}';\n"
            ))?;
            println!("created role `{APP}` with a random password (stored in warden only)");
        }
        let db_exists = self.query(&format!(
            "select 1 from pg_database where datname = '{APP}'"
        ))?;
        if db_exists == "1" {
            println!("database `{APP}` exists");
        } else {
            cmd::run(
                self.admin_psql()
                    .arg("-c")
                    .arg(format!("CREATE DATABASE {APP} OWNER {APP}")),
            )?;
        }
        Ok(())
    }
}

/// Feeds `input` to `command`'s stdin and fails unless it exits 0.
pub fn pipe_to(command: &mut Command, input: &[u8]) -> Result<()> {
    let line = cmd::display(command);
    let mut child = command
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(input).map_err(anyhow::Error::from),
        None => Err(anyhow::anyhow!("no stdin pipe")),
    };
    let status = child
        .wait()
        .with_context(|| format!("could not wait for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    written.with_context(|| format!("could not write to `{line}`"))
}

/// The bin dir of the version that created an existing cluster, so a newer
/// PostgreSQL installed later does not meet an older data dir.
fn existing_cluster_bin(dir: &Path) -> Option<PathBuf> {
    let version = std::fs::read_to_string(dir.join("data").join("PG_VERSION")).ok()?;
    let bin = Path::new("/usr/lib/postgresql")
        .join(version.trim())
        .join("bin");
    bin.join("pg_ctl").is_file().then_some(bin)
}

fn is_root() -> bool {
    // The effective uid (second field of `Uid:`), from /proc rather than
    // `libc::geteuid`, which would need an unsafe block.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `len` random ASCII letters and digits from /dev/urandom (rejection
/// sampling keeps them uniform).
pub fn random_alphanumeric(len: usize) -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    // The largest multiple of 62 that fits a byte: 248.
    let limit = 256 - 256 % ALPHABET.len();
    let mut urandom = std::fs::File::open("/dev/urandom").context("could not open /dev/urandom")?;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        urandom
            .read_exact(&mut buf)
            .context("could not read /dev/urandom")?;
        for &byte in &buf {
            if out.len() == len {
                break;
            }
            if usize::from(byte) < limit {
                out.push(char::from(ALPHABET[usize::from(byte) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

/// Prints the last `n` lines of a log file to stderr.
pub fn print_tail(path: &Path, n: usize) {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(err) => {
            eprintln!("(could not read {}: {err})", path.display());
            return;
        }
    };
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("---- last {n} lines of {} ----", path.display());
    for line in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("{line}");
    }
    eprintln!("---- end of log ----");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_alphanumeric_and_differ() {
        let a = random_alphanumeric(PASSWORD_LEN).unwrap();
        let b = random_alphanumeric(PASSWORD_LEN).unwrap();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn cluster_files_live_in_its_folder() {
        let cluster = Cluster {
            dir: PathBuf::from("/repo/.warden-demo/pg"),
            bin: PathBuf::from("/usr/lib/postgresql/15/bin"),
        };
        assert_eq!(cluster.data_dir(), Path::new("/repo/.warden-demo/pg/data"));
        assert_eq!(
            cluster.log_file(),
            Path::new("/repo/.warden-demo/pg/postgres.log")
        );
        assert!(!cluster.exists());
    }
}
