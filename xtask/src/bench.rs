//! `cargo xtask bench`: performance figures, each printed beside a baseline
//! measured in the same run (never compared with numbers from elsewhere).
//!
//! Benchmarks today:
//! - SVID issuance (`identity/examples/svid_bench.rs`): SVIDs per second and
//!   p50/p99 latency per key type, against raw aws-lc-rs P-256 keygen + sign.
//! - PostgreSQL proxying (`bench/pg.rs`): pgbench select-only TPS and p50/p99
//!   latency through warden, beside direct connections to the same throwaway
//!   PostgreSQL and PgBouncer injecting the same credential, interleaved in
//!   one run; persistent connections and a new connection per transaction.
//! - eBPF monitor (`ebpf/examples/connect_cost.rs`, root): ns per loopback
//!   connect+close with no programs, attached but not watched, and to a
//!   watched listener, interleaved rounds.
//! - Anomaly detector (`proxy/core/src/anomaly.rs`, ignored test): ns per event in
//!   `Detector::observe` beside a HashMap name lookup and the data path's
//!   enqueue; and (`tests/tests/anomaly.rs` `bench_freeze_latency`, root)
//!   p50/p99 from the session that crosses a threshold to the kernel's EPERM,
//!   over 20 runs (`WARDEN_BENCH_FREEZE_RUNS`), beside one plain session.
//!
//! - HTTP proxying (`bench/http.rs`): wrk requests/s and p50/p99 through an
//!   http route injecting `Authorization`, beside direct requests to the same
//!   local nginx upstream and a second nginx injecting the same header.
//!
//! - Dynamic credential issuance (`bench/pg/leases.rs`): `warden lease bench`
//!   leases/s and p50/p99 against the same PostgreSQL (fsync on), beside
//!   pgbench running the same CREATE ROLE + GRANT transaction, with Vault's
//!   published 259/s as an anchor.
//!
//! - MySQL proxying (`bench/mysql.rs`): `SELECT 1` queries/s and p50/p99
//!   through a mysql route beside direct connections to the same throwaway
//!   MariaDB, on persistent connections and with a new connection per query
//!   (`proxy/mysql/examples/mysql_bench.rs` drives the load).
//! - Redis proxying (`bench/redis.rs`): redis-benchmark GET/SET req/s and
//!   p50/p99 through a redis route beside direct connections (with `AUTH`)
//!   to the same throwaway redis-server: persistent, 16 pipelined, and a
//!   new connection per request.
//! - Secret scanning (`bench/scan.rs`): throughput and max RSS of the
//!   scanner on the cargo registry sources beside ripsecrets and
//!   detect-secrets, `--git` on 10,000 commits, and recall/precision per
//!   family on a labelled corpus for all three. Not part of a plain `cargo
//!   xtask bench`: `--only scan`.
//! - Fleet (`bench/fleet.rs`): three nodes on one PostgreSQL store — how
//!   fast a `secret put`/`rm`, `freeze` or `unfreeze` on one node shows in
//!   sessions through every node (p50/p99/max), session set-up (`pgbench -S
//!   -C`) on the PostgreSQL store beside the SQLite store, and secret writes
//!   per second with the three nodes writing at once. Only with `--only
//!   fleet`.
//!
//! - Soak (`bench/soak.rs`): as many client sessions held at once as the
//!   descriptor limit allows (10,000 asked), across a postgres and an http
//!   route, with warden's RSS, descriptors and CPU per session; then a mixed
//!   load for `--soak-minutes N` (default 30) with rotations and freezes,
//!   sampling RSS, descriptors, threads and audit log size every 10 s (table
//!   and SVG), PASS/FAIL on growth and `warden audit verify`. Only with
//!   `--only soak`.
//!
//! Arguments: `--pg-seconds N` (seconds per pgbench run, default 10),
//! `--pg-rounds N` (interleaved rounds, default 2; the median is reported);
//! `--http-seconds N` (seconds per wrk run, default 5), `--http-rounds N`
//! (default 3), `--mysql-seconds N` (default 5), `--mysql-rounds N` (default
//! 3), `--fleet-samples N` (propagation samples per kind of change, default
//! 30), `--fleet-seconds N` (seconds per pgbench run and of the write load,
//! default 5), `--fleet-rounds N` (default 5), `--redis-requests N`
//! (requests per persistent run, default 100000), `--redis-rounds N`
//! (default 3), `--soak-minutes N` (default 30), `--only
//! svid|pg|leases|http|mysql|redis|ebpf|anomaly|scan|fleet|soak` (one
//! benchmark);
//! anything else goes to `svid_bench` (e.g. its iteration count).

mod fleet;
mod http;
mod mysql;
mod pg;
mod redis;
mod scan;
mod soak;

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// Options for the PostgreSQL bench, split from the SVID bench's arguments.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    pg: pg::Options,
    http: http::Options,
    mysql: mysql::Options,
    redis: redis::Options,
    fleet: fleet::Options,
    soak: soak::Options,
    /// `--only svid|pg|leases|http|mysql|redis|ebpf|anomaly|scan|fleet|soak`: run just that benchmark.
    only: Option<String>,
    svid_args: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut pg = pg::Options::default();
    let mut http = http::Options::default();
    let mut mysql = mysql::Options::default();
    let mut redis = redis::Options::default();
    let mut fleet = fleet::Options::default();
    let mut soak = soak::Options::default();
    let mut svid_args = Vec::new();
    let mut only = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--only" || arg.starts_with("--only=") {
            let v = match arg.strip_prefix("--only=") {
                Some(v) => v.to_owned(),
                None => iter.next().cloned().context(
                    "`--only` needs svid, pg, leases, http, mysql, redis, ebpf, anomaly, scan, fleet or soak",
                )?,
            };
            if ![
                "svid", "pg", "leases", "http", "mysql", "redis", "ebpf", "anomaly", "scan",
                "fleet", "soak",
            ]
            .contains(&v.as_str())
            {
                bail!(
                    "`--only {v}`: expected svid, pg, leases, http, mysql, redis, ebpf, anomaly, scan, fleet or soak"
                );
            }
            only = Some(v);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value))
                if name.starts_with("--pg-")
                    || name.starts_with("--http-")
                    || name.starts_with("--mysql-")
                    || name.starts_with("--redis-")
                    || name.starts_with("--fleet-")
                    || name.starts_with("--soak-") =>
            {
                (name, Some(value.to_owned()))
            }
            _ => (arg.as_str(), None),
        };
        let slot = match name {
            "--pg-seconds" => &mut pg.seconds,
            "--pg-rounds" => &mut pg.rounds,
            "--http-seconds" => &mut http.seconds,
            "--http-rounds" => &mut http.rounds,
            "--mysql-seconds" => &mut mysql.seconds,
            "--mysql-rounds" => &mut mysql.rounds,
            "--redis-requests" => &mut redis.requests,
            "--redis-rounds" => &mut redis.rounds,
            "--fleet-samples" => &mut fleet.samples,
            "--fleet-seconds" => &mut fleet.seconds,
            "--fleet-rounds" => &mut fleet.rounds,
            "--soak-minutes" => &mut soak.minutes,
            _ => {
                svid_args.push(arg.clone());
                continue;
            }
        };
        let value = match inline {
            Some(value) => value,
            None => iter
                .next()
                .cloned()
                .with_context(|| format!("`{name}` needs a number"))?,
        };
        *slot = value
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("`{name} {value}`: expected a positive whole number"))?;
    }
    if pg.seconds > 600 {
        bail!("`--pg-seconds {}` is more than 600", pg.seconds);
    }
    if http.seconds > 600 {
        bail!("`--http-seconds {}` is more than 600", http.seconds);
    }
    if mysql.seconds > 600 {
        bail!("`--mysql-seconds {}` is more than 600", mysql.seconds);
    }
    if redis.requests > 10_000_000 {
        bail!(
            "`--redis-requests {}` is more than 10000000",
            redis.requests
        );
    }
    if fleet.seconds > 600 {
        bail!("`--fleet-seconds {}` is more than 600", fleet.seconds);
    }
    if soak.minutes > 24 * 60 {
        bail!("`--soak-minutes {}` is more than a day", soak.minutes);
    }
    if fleet.samples > 1000 {
        bail!("`--fleet-samples {}` is more than 1000", fleet.samples);
    }
    Ok(Options {
        pg,
        http,
        mysql,
        redis,
        fleet,
        soak,
        only,
        svid_args,
    })
}

pub fn run(repo: &Path, args: &[String]) -> Result<()> {
    let options = parse_args(args)?;
    let mut steps = cmd::Steps::default();
    let wanted = |name: &str| options.only.as_deref().is_none_or(|o| o == name);
    if wanted("svid") {
        steps.run("SVID issuance (release build)", || {
            let mut c = cmd::cargo(repo);
            c.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "warden-identity",
                "--example",
                "svid_bench",
                "--",
            ])
            .args(&options.svid_args);
            cmd::run(&mut c)
        })?;
    }
    if wanted("pg") {
        steps.run(
            "PostgreSQL proxy: warden vs direct vs PgBouncer (pgbench)",
            || pg::run(repo, &options.pg),
        )?;
    } else if options.only.as_deref() == Some("leases") {
        steps.run("dynamic credential issuance (warden lease bench)", || {
            let pg = pg::Options {
                leases_only: true,
                ..options.pg
            };
            pg::run(repo, &pg)
        })?;
    }
    if wanted("http") {
        steps.run(
            "HTTP proxy: warden vs direct vs nginx injecting the same header (wrk)",
            || http::run(repo, &options.http),
        )?;
    }
    if wanted("mysql") {
        steps.run(
            "MySQL proxy: warden vs direct to MariaDB (SELECT 1, persistent and per-query connections)",
            || mysql::run(repo, &options.mysql),
        )?;
    }
    if wanted("redis") {
        steps.run(
            "Redis proxy: warden vs direct (redis-benchmark GET/SET: persistent, pipelined, per-request connections)",
            || redis::run(repo, &options.redis),
        )?;
    }
    if wanted("ebpf") {
        steps.run("eBPF monitor: cost per connect() (release build)", || {
            if !crate::prereq::is_root() {
                println!("  skipped: loading eBPF programs needs root");
                return Ok(());
            }
            let mut c = cmd::cargo(repo);
            c.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "warden-ebpf",
                "--example",
                "connect_cost",
            ]);
            cmd::run(&mut c)
        })?;
    }
    if wanted("anomaly") {
        steps.run("anomaly detector: cost per event (release build)", || {
            let mut c = cmd::cargo(repo);
            c.args([
                "test",
                "--release",
                "--quiet",
                "-p",
                "warden-core",
                "--lib",
                "--",
                "--ignored",
                "--exact",
                "anomaly::tests::bench_detector_cost_per_event",
                "--nocapture",
            ]);
            cmd::run(&mut c)
        })?;
        steps.run(
            "anomaly freeze: threshold-crossing event to kernel EPERM (release build)",
            || {
                if !crate::prereq::is_root() {
                    println!("  skipped: the eBPF monitor and cgroups need root");
                    return Ok(());
                }
                let mut c = cmd::cargo(repo);
                c.args(["build", "--release", "--quiet", "-p", "warden"]);
                cmd::run(&mut c)?;
                let mut c = cmd::cargo(repo);
                c.args([
                    "test",
                    "--release",
                    "--quiet",
                    "-p",
                    "warden-tests",
                    "--test",
                    "anomaly",
                    "--",
                    "--ignored",
                    "--exact",
                    "bench_freeze_latency",
                    "--nocapture",
                ]);
                cmd::run(&mut c)
            },
        )?;
    }
    // Installs two other scanners and reads ~300 MB: only when asked for.
    if options.only.as_deref() == Some("scan") {
        steps.run(
            "secret scanning: warden vs ripsecrets vs detect-secrets (throughput, --git, recall/precision)",
            || scan::run(repo),
        )?;
    }
    // Starts four daemons and a PostgreSQL store: only when asked for.
    if options.only.as_deref() == Some("fleet") {
        steps.run(
            "fleet: 3 nodes on one PostgreSQL store (propagation, session set-up vs SQLite, secret writes/s)",
            || fleet::run(repo, &options.fleet),
        )?;
    }
    // Holds 10,000 sessions, then runs for `--soak-minutes`: only when asked for.
    if options.only.as_deref() == Some("soak") {
        steps.run(
            &format!(
                "soak: sessions held at once, then a {}-minute mixed load (growth, audit verify)",
                options.soak.minutes
            ),
            || soak::run(repo, &options.soak),
        )?;
    }
    steps.print_summary();
    Ok(())
}

/// Stops a lab's child process: SIGTERM, then SIGKILL after `grace`.
fn stop_child(name: &str, child: &mut std::process::Child, grace: std::time::Duration) {
    use std::process::{Command, Stdio};
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id().to_string();
    let _ = Command::new("kill")
        .args(["-TERM", &pid])
        .stderr(Stdio::null())
        .status();
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("warning: {name} (pid {pid}) ignored SIGTERM; sending SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
}

/// A bench lab's warden, started by [`start_bench_warden`].
struct BenchWarden {
    child: std::process::Child,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
}

/// Writes `dir/warden.toml` — one `bench` workload (this uid), metrics off,
/// the route `route` (the `[[route]]` keys after `name = "bench"`) and
/// `extra` tables — checks it, initialises the data dir, stores `value`
/// as `secret` (on stdin, never in argv) and starts `warden up` logging to
/// `dir/warden.log`.
fn start_bench_warden(
    warden: &std::path::Path,
    dir: &std::path::Path,
    route: &str,
    extra: &str,
    secret: &str,
    value: &[u8],
) -> anyhow::Result<BenchWarden> {
    use anyhow::Context as _;
    use std::process::{Command, Stdio};
    std::fs::create_dir_all(dir)?;
    let text = format!(
        "data_dir = \"{data}\"\ntrust_domain = \"example.org\"\n\
         \n[admin]\nsocket = \"{admin}\"\n\n[metrics]\nlisten = \"off\"\n\
         \n[[workload]]\nname = \"bench\"\nspiffe_id = \"spiffe://example.org/bench\"\n\
         selectors = {{ uid = {uid} }}\n\
         \n[[route]]\nname = \"bench\"\n{route}\nallow = [\"bench\"]\n{extra}",
        data = dir.join("data").display(),
        admin = dir.join("admin.sock").display(),
        uid = effective_uid().unwrap_or(0),
    );
    let config = dir.join("warden.toml");
    std::fs::write(&config, text)?;
    let warden_cmd = |args: &[&str]| {
        let mut command = Command::new(warden);
        command.arg("--config").arg(&config).args(args);
        command
    };
    let mut check = Command::new(warden);
    check.args(["config", "check"]).arg(&config);
    pg::run_captured(&mut check)?;
    pg::run_captured(&mut warden_cmd(&["init"]))?;
    pg::run_with_stdin(&mut warden_cmd(&["secret", "put", secret]), value)?;
    let log = dir.join("warden.log");
    let file = std::fs::File::create(&log)?;
    let mut up = warden_cmd(&["up"]);
    up.env("WARDEN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    println!("$ {} > {}", crate::cmd::display(&up), log.display());
    let child = up.spawn().context("could not start `warden up`")?;
    Ok(BenchWarden { child, config, log })
}

/// Starts HAProxy in TCP mode (`-db`: in the foreground) forwarding
/// `127.0.0.1:listen` to `127.0.0.1:upstream`: one user-space proxy hop that
/// parses nothing, the anchor the database benches put beside warden's
/// user-space relay. Its configuration and log go in `dir`; the caller
/// stops the child.
fn start_haproxy(
    dir: &std::path::Path,
    listen: u16,
    upstream: u16,
) -> anyhow::Result<std::process::Child> {
    use anyhow::Context as _;
    use std::process::{Command, Stdio};
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        [
            "global".to_string(),
            "  maxconn 4096".into(),
            "defaults".into(),
            "  mode tcp".into(),
            "  timeout connect 5s".into(),
            "  timeout client 120s".into(),
            "  timeout server 120s".into(),
            "listen bench".into(),
            format!("  bind 127.0.0.1:{listen}"),
            format!("  server upstream 127.0.0.1:{upstream}"),
            String::new(),
        ]
        .join("\n"),
    )?;
    let log = std::fs::File::create(dir.join("haproxy.log"))?;
    let mut c = Command::new("haproxy");
    c.arg("-db")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    println!("$ {}", crate::cmd::display(&c));
    let child = c.spawn().context("could not start haproxy")?;
    wait_listening(listen, "haproxy", dir)?;
    Ok(child)
}

/// Waits up to 10 s until something accepts on `127.0.0.1:port`.
fn wait_listening(port: u16, name: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "{name} did not listen on port {port}; its log is in {}",
                dir.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// The effective uid, from /proc (no unsafe `geteuid`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pg_options_are_split_from_svid_arguments() -> Result<()> {
        let options = parse_args(&strings(&["--pg-seconds", "3", "500", "--pg-rounds=3"]))?;
        assert_eq!(options.pg.seconds, 3);
        assert_eq!(options.pg.rounds, 3);
        assert_eq!(options.svid_args, strings(&["500"]));
        assert_eq!(parse_args(&[])?.pg, pg::Options::default());
        let o = parse_args(&strings(&["--http-seconds=2", "--http-rounds", "4"]))?;
        assert_eq!((o.http.seconds, o.http.rounds), (2, 4));
        assert_eq!(
            parse_args(&strings(&["--only", "http"]))?.only.as_deref(),
            Some("http")
        );
        assert_eq!(
            parse_args(&strings(&["--only=scan"]))?.only.as_deref(),
            Some("scan")
        );
        assert!(parse_args(&strings(&["--only=x"])).is_err());
        let o = parse_args(&strings(&[
            "--only=fleet",
            "--fleet-samples",
            "40",
            "--fleet-seconds=3",
            "--fleet-rounds",
            "2",
        ]))?;
        assert_eq!(o.only.as_deref(), Some("fleet"));
        assert_eq!(
            o.fleet,
            fleet::Options {
                samples: 40,
                seconds: 3,
                rounds: 2
            }
        );
        assert!(o.svid_args.is_empty());
        assert_eq!(parse_args(&[])?.fleet, fleet::Options::default());
        assert!(parse_args(&strings(&["--fleet-seconds=601"])).is_err());
        assert!(parse_args(&strings(&["--fleet-samples", "0"])).is_err());
        let o = parse_args(&strings(&[
            "--only",
            "mysql",
            "--mysql-seconds=2",
            "--mysql-rounds",
            "1",
        ]))?;
        assert_eq!(o.only.as_deref(), Some("mysql"));
        assert_eq!((o.mysql.seconds, o.mysql.rounds), (2, 1));
        let o = parse_args(&strings(&["--only", "soak", "--soak-minutes=3"]))?;
        assert_eq!((o.only.as_deref(), o.soak.minutes), (Some("soak"), 3));
        assert_eq!(parse_args(&[])?.soak.minutes, 30);
        assert!(parse_args(&strings(&["--soak-minutes", "0"])).is_err());
        assert!(parse_args(&strings(&["--pg-seconds"])).is_err());
        assert!(parse_args(&strings(&["--pg-seconds", "0"])).is_err());
        assert!(parse_args(&strings(&["--pg-rounds=x"])).is_err());
        Ok(())
    }
}
