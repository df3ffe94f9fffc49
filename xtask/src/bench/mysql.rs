//! The MySQL proxy bench: a throwaway MariaDB (as the tests make one) and a
//! release warden with two mysql routes to it, one as configured by
//! default (long sessions spliced in the kernel relay, its guard checking
//! every command) and one with `kernel_relay = false` (the relay in user
//! space, as without the eBPF monitor); `SELECT 1` from
//! `proxy/mysql/examples/mysql_bench.rs` (C concurrent clients) straight to
//! the server and through each route, interleaved in each round, on
//! persistent connections and with a new connection per query. The median
//! over rounds is reported with p50/p99 and each route's ratio to direct
//! (HAProxy in TCP mode runs in the same rounds as an anchor: one proxy hop
//! that parses nothing, the client logging in through it) beside issue 23's targets (persistent ≥ 0.9× direct in user space and
//! ≥ 1.0× with the kernel relay; a new connection
//! per query ≥ 1.0×, where warden's pool replaces the server's login — and,
//! the session being state-free, needs no reset). Every process is stopped when [`Lab`] is dropped.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::pg::median;
use crate::{cmd, prereq};

const CONCURRENCY: u32 = 16;
const SECRET: &str = "bench/db";

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub seconds: u64,
    pub rounds: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 5,
            rounds: 3,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    qps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub fn run(repo: &Path, options: &Options) -> Result<()> {
    prereq::ensure_system_packages(prereq::MYSQL_BENCH_REQUIREMENTS)?;
    cmd::run(cmd::cargo(repo).args(["build", "--release", "-p", "warden"]))?;
    cmd::run(cmd::cargo(repo).args([
        "build",
        "--release",
        "-p",
        "warden-mysql",
        "--example",
        "mysql_bench",
    ]))?;
    let release = cmd::target_dir(repo).join("release");
    let client = release.join("examples").join("mysql_bench");
    let mut lab = Lab::create()?;
    let password = random_password()?;
    lab.start_mariadb(&password)?;
    lab.start_warden(&release.join("warden"), &password)?;
    let haproxy = super::start_haproxy(&lab.dir, lab.haproxy_port, lab.db_port)?;
    lab.children.push(("haproxy", haproxy));
    lab.wait_warden(&client)?;
    println!(
        "mysql_bench: {CONCURRENCY} clients, SELECT 1, {}s per run, {} interleaved round(s)",
        options.seconds, options.rounds
    );
    // warden: the route as configured by default (kernel relay: a
    // persistent connection is spliced after its first 32 queries, a new
    // connection per query never is); warden-us: the same route with
    // `kernel_relay = false` (user space only).
    let targets = [
        ("direct", lab.db_port, password.as_str()),
        ("warden", lab.warden_port, ""),
        ("warden-us", lab.warden_us_port, ""),
        ("haproxy", lab.haproxy_port, password.as_str()),
    ];
    for (mode, target) in [("persistent", 0.9_f64), ("reconnect", 1.0)] {
        let mut got: [Vec<Sample>; 4] = Default::default();
        for round in 1..=options.rounds {
            for (t, (name, port, pw)) in targets.iter().enumerate() {
                let s = lab.client(&client, *port, pw, options.seconds, mode)?;
                println!(
                    "  {mode:<10} round {round} {name:<9} {:>8.0} q/s  p50 {:.3} ms  p99 {:.3} ms",
                    s.qps, s.p50_ms, s.p99_ms
                );
                got[t].push(s);
            }
        }
        let med = |v: &[Sample]| Sample {
            qps: median(v.iter().map(|s| s.qps).collect()),
            p50_ms: median(v.iter().map(|s| s.p50_ms).collect()),
            p99_ms: median(v.iter().map(|s| s.p99_ms).collect()),
        };
        let d = med(&got[0]);
        for (t, (name, _, _)) in targets.iter().enumerate().skip(1) {
            let w = med(&got[t]);
            let ratio = if d.qps > 0.0 { w.qps / d.qps } else { 0.0 };
            if *name == "haproxy" {
                let us = med(&got[2]).qps;
                println!(
                    "  {mode}: median haproxy {:.0} q/s (p99 {:.3} ms): haproxy / direct {ratio:.2}x; warden-us / haproxy {:.2}x",
                    w.qps,
                    w.p99_ms,
                    if w.qps > 0.0 { us / w.qps } else { 0.0 }
                );
                continue;
            }
            // Issue 23: 1.0x direct with the kernel relay (the default).
            let target = if t == 1 { target.max(1.0) } else { target };
            println!(
                "  {mode}: median direct {:.0} q/s (p99 {:.3} ms), {name} {:.0} q/s (p99 {:.3} ms): {name} / direct {ratio:.2}x ({} target {target:.2}x{})",
                d.qps,
                d.p99_ms,
                w.qps,
                w.p99_ms,
                if ratio >= target { "meets" } else { "MISSES" },
                if mode == "reconnect" {
                    "; pooled: no login, and no reset after a state-free session"
                } else {
                    ""
                }
            );
        }
    }
    lab.shutdown();
    Ok(())
}

struct Lab {
    dir: PathBuf,
    db_port: u16,
    warden_port: u16,
    /// The same route with `kernel_relay = false`.
    warden_us_port: u16,
    haproxy_port: u16,
    children: Vec<(&'static str, Child)>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bin(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn current_user() -> String {
    if prereq::is_root() {
        "root".into()
    } else {
        std::env::var("USER").unwrap_or_else(|_| "nobody".into())
    }
}

impl Lab {
    fn create() -> Result<Lab> {
        let dir = std::env::temp_dir().join(format!("warden-mysql-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(Lab {
            dir,
            db_port: free_port()?,
            warden_port: free_port()?,
            warden_us_port: free_port()?,
            haproxy_port: free_port()?,
            children: Vec::new(),
        })
    }

    fn start_mariadb(&mut self, password: &str) -> Result<()> {
        let d = &self.dir;
        let user = current_user();
        let out = Command::new(bin("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg("--auth-root-authentication-method=normal")
            .arg(format!("--user={user}"))
            .arg("--skip-test-db")
            .output()
            .context("mariadb-install-db")?;
        if !out.status.success() {
            bail!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let socket = d.join("mysqld.sock");
        let log = std::fs::File::create(d.join("mariadbd.log"))?;
        let mut c = Command::new(bin("mariadbd"));
        c.arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={}", self.db_port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--user={user}"))
            .arg("--skip-log-bin")
            .arg("--max-connections=2000")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("$ {}", cmd::display(&c));
        self.children.push(("mariadbd", c.spawn()?));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.db_port)).is_err() {
            if Instant::now() > deadline {
                bail!("mariadbd did not start; log in {}", d.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The password goes on the client's stdin, never in argv.
        let mut admin = Command::new(bin("mariadb"))
            .arg("--no-defaults")
            .arg("-S")
            .arg(&socket)
            .args(["-u", "root"])
            .stdin(Stdio::piped())
            .spawn()
            .context("mariadb")?;
        if let Some(mut si) = admin.stdin.take() {
            si.write_all(
                format!("CREATE USER 'bench'@'%' IDENTIFIED BY '{password}';\n").as_bytes(),
            )?;
        }
        if !admin.wait()?.success() {
            bail!("creating the bench user failed");
        }
        Ok(())
    }

    fn start_warden(&mut self, warden: &Path, password: &str) -> Result<()> {
        let route = |listen: u16| {
            format!(
                "kind = \"mysql\"\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"127.0.0.1:{up}\"\n\
                 upstream_tls = {{ mode = \"disable\" }}\n\
                 credential = {{ user = \"bench\", secret = \"{SECRET}\", cache_ttl = \"10m\" }}",
                up = self.db_port,
            )
        };
        let us = format!(
            "\n[[route]]\nname = \"bench-us\"\n{}\nkernel_relay = false\nallow = [\"bench\"]\n",
            route(self.warden_us_port)
        );
        let started = super::start_bench_warden(
            warden,
            &self.dir.join("warden"),
            &route(self.warden_port),
            &us,
            SECRET,
            password.as_bytes(),
        )?;
        self.children.push(("warden", started.child));
        Ok(())
    }

    /// Waits until a query through each warden route succeeds.
    fn wait_warden(&self, client: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ports = vec![self.warden_port, self.warden_us_port];
        loop {
            ports.retain(|port| {
                !self
                    .client(client, *port, "", 1, "persistent")
                    .is_ok_and(|s| s.qps > 0.0)
            });
            if ports.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no query through warden within 30 s; logs in {}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn client(
        &self,
        client: &Path,
        port: u16,
        password: &str,
        seconds: u64,
        mode: &str,
    ) -> Result<Sample> {
        let mut c = Command::new(client)
            .args([
                "127.0.0.1".to_string(),
                port.to_string(),
                "bench".into(),
                CONCURRENCY.to_string(),
                seconds.to_string(),
                mode.into(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("mysql_bench")?;
        if let Some(mut si) = c.stdin.take() {
            si.write_all(password.as_bytes())?;
        }
        let out = c.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_sample(&text).with_context(|| {
            format!(
                "cannot read mysql_bench's output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn shutdown(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            super::stop_child(name, child, Duration::from_secs(10));
        }
        self.children.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Letters and digits only: it goes into a SQL literal.
fn random_password() -> Result<String> {
    let mut f = std::fs::File::open("/dev/urandom")?;
    let mut raw = [0u8; 24];
    std::io::Read::read_exact(&mut f, &mut raw)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// `qps=… p50_ms=… p99_ms=… queries=… errors=…`
fn parse_sample(out: &str) -> Option<Sample> {
    let line = out.lines().find(|l| l.starts_with("qps="))?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    Some(Sample {
        qps: field("qps")?,
        p50_ms: field("p50_ms")?,
        p99_ms: field("p99_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_output_is_parsed() {
        let s = parse_sample("qps=1234 p50_ms=0.512 p99_ms=2.000 queries=6170 errors=0\n");
        assert_eq!(
            s,
            Some(Sample {
                qps: 1234.0,
                p50_ms: 0.512,
                p99_ms: 2.0
            })
        );
        assert_eq!(parse_sample("nothing"), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
