//! The soak bench (`cargo xtask bench --only soak`): one release warden in
//! front of a throwaway PostgreSQL and a local nginx, in two parts.
//!
//! 1. **Sessions held at once.** As many client sessions as the descriptor
//!    limit allows (10,000 asked; each session costs warden two descriptors,
//!    its client socket and its upstream connection, and warden sheds new
//!    sessions a 16th below its limit), a fifth of them (at most
//!    [`MAX_PG_SESSIONS`]) on a postgres route and the rest on an http route
//!    injecting `Authorization`. Every session is opened and answered once
//!    (`SELECT <n>` must return `n`; the upstream echoes the injected header,
//!    which must carry the stored token), then, with all of them open, each
//!    one is answered again. warden's RSS, descriptors, threads and CPU time
//!    per session are printed.
//! 2. **Mixed soak** for `--soak-minutes N` (default 30): pgbench select-only
//!    on persistent connections and with a new connection per transaction
//!    (`-C`), and 50 HTTP requests/s on a keep-alive connection and as many
//!    with a new connection each (`Connection: close`), all rate-limited (a
//!    soak looks for growth, not throughput; the audit log stays small),
//!    with the same `-C` load direct to PostgreSQL for the first 55 s as the
//!    run's baseline (and 10 s of it direct and through warden alone before); the PostgreSQL secret is rotated (`warden
//!    secret rotate`, ALTER ROLE) and the HTTP token replaced (`secret put`)
//!    every minute; every five minutes (first at 130 s) a second workload
//!    is frozen, a session of it must be refused, and after the unfreeze
//!    served. A Workload API client (`tests/examples/svid_stream.rs`, the
//!    `spiffe` crate) holds an X.509-SVID stream for the whole soak (SVID
//!    TTL 2 minutes: every rotated SVID must arrive new, valid and from the
//!    bundle's CA), and at every rotation another one starts, takes its SVID
//!    and goes. warden is restarted first (part 1 leaves its heap at a
//!    high-water mark that would hide growth). Every 10 s warden's RSS, open descriptors, threads and audit
//!    log size are sampled; they are printed as a table and plotted in an SVG
//!    written next to the table (under `<target dir>/soak/`). At the end
//!    `warden audit verify` must pass, every load must have succeeded, and
//!    nothing may grow without bound: after the warm-up, the mean RSS of the
//!    last quarter of the samples may exceed that of the first quarter by at
//!    most 5 % (descriptors and threads: 5 % plus 8). The bench prints PASS or
//!    FAIL and fails on FAIL.
//!
//! Every process is stopped and the temp dir removed when [`Lab`] is
//! dropped, also on error.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::pg::{
    as_postgres, chown_to_postgres, free_ports, parse_pgbench_output, print_tail, process_cost,
    random_alphanumeric, run_captured, run_with_stdin, set_mode, start_cluster,
};
use crate::{cmd, prereq};

/// Sessions asked for in part 1 (fewer when the descriptor limit is lower).
const SESSIONS: usize = 10_000;
/// PostgreSQL sessions in part 1 at most (each is a server process).
const MAX_PG_SESSIONS: usize = 1_000;
/// The role and database the postgres route logs in to.
const ROLE: &str = "app";
const PG_SECRET: &str = "soak/app";
const HTTP_SECRET: &str = "soak/api-token";
/// The uid of the workload that gets frozen (`nobody`).
const PROBE_UID: u32 = 65534;
/// Seconds between samples, rotations and freezes.
const SAMPLE_EVERY: u64 = 10;
const ROTATE_EVERY: u64 = 60;
const FREEZE_EVERY: u64 = 300;
const FIRST_FREEZE: u64 = 130;
/// The SVID lifetime of the soak's workloads: a stream gets a rotated SVID
/// about every half of it.
const SVID_TTL_MINUTES: u64 = 2;
/// The SPIFFE ID of workload `bench` (this process's uid).
const BENCH_ID: &str = "spiffe://example.org/bench";
/// Allowed growth from the first to the last quarter after the warm-up.
const MAX_DRIFT: f64 = 0.05;

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub minutes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { minutes: 30 }
    }
}

pub fn run(repo: &Path, options: &Options) -> Result<()> {
    if !super::pg::is_root() {
        println!("  skipped: the soak bench runs PostgreSQL as `postgres` and probes as `nobody`: run it as root");
        return Ok(());
    }
    let found = prereq::ensure_system_packages(prereq::BENCH_REQUIREMENTS)?;
    prereq::ensure_system_packages(prereq::HTTP_BENCH_REQUIREMENTS)?;
    let pg_bin = found
        .pg_bin_dir()
        .context("initdb was found but its directory was not")?
        .to_path_buf();
    let nginx = prereq::find_on_path("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .context("nginx not found")?;
    cmd::run(cmd::cargo(repo).args(["build", "--release", "-p", "warden"]))?;
    let warden = cmd::target_dir(repo).join("release").join("warden");
    // The Workload API client of the soak's SVID streams: the independent
    // `spiffe` crate (a debug build is plenty for a few updates a minute).
    cmd::run(cmd::cargo(repo).args(["build", "-p", "warden-tests", "--example", "svid_stream"]))?;
    let svid_client = cmd::target_dir(repo)
        .join("debug")
        .join("examples")
        .join("svid_stream");
    let out_dir = cmd::target_dir(repo).join("soak");
    std::fs::create_dir_all(&out_dir)?;

    // Children inherit this: nginx and PostgreSQL hold as many sockets as warden.
    let limit = raise_own_nofile()?;
    let mut lab = Lab::create(pg_bin, warden, svid_client)?;
    lab.start_postgres()?;
    lab.start_nginx(&nginx)?;
    lab.start_warden()?;
    let warden_limit = nofile_limit(lab.warden_pid()?).unwrap_or(limit);
    // A PostgreSQL session holds two of warden's descriptors (client and
    // upstream), an idle HTTP keep-alive client one (its upstream
    // connection goes back to the route's idle set).
    let budget = (warden_limit - warden_limit / 16).saturating_sub(512) as usize;
    let pg_sessions = MAX_PG_SESSIONS.min(SESSIONS / 5).min(budget / 2);
    let http_sessions = (SESSIONS - pg_sessions).min(budget - 2 * pg_sessions);
    println!(
        "descriptor limits: hard {limit} here, warden {warden_limit}: {} sessions fit \
         (2 warden descriptors per PostgreSQL session, 1 per idle HTTP client), \
         {pg_sessions} PostgreSQL + {http_sessions} HTTP",
        pg_sessions + http_sessions
    );
    held_sessions(&lab, pg_sessions, http_sessions)?;
    // The allocator keeps part 1's high-water mark; the soak starts afresh.
    lab.restart_warden()?;
    let verdict = soak(&mut lab, options, &out_dir)?;
    lab.shutdown();
    if !verdict {
        bail!("the soak FAILED (see above)");
    }
    Ok(())
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns it.
fn raise_own_nofile() -> Result<u64> {
    let me = std::process::id();
    let hard = std::fs::read_to_string(format!("/proc/{me}/limits"))?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse::<u64>().ok())
        .context("reading the hard descriptor limit")?;
    let status = Command::new("prlimit")
        .args(["--pid", &me.to_string(), &format!("--nofile={hard}:{hard}")])
        .status()
        .context("running prlimit")?;
    if !status.success() || nofile_limit(me) != Some(hard) {
        bail!("could not raise the soft descriptor limit to {hard}");
    }
    Ok(hard)
}

/// The soft `RLIMIT_NOFILE` of process `pid`.
fn nofile_limit(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// One sample of warden's footprint.
#[derive(Clone, Copy, Debug, Default)]
struct Footprint {
    rss_kb: u64,
    fds: usize,
    threads: u64,
}

fn footprint(pid: u32) -> Result<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("warden (pid {pid}) is gone"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    Ok(Footprint {
        rss_kb: field("VmRSS:").context("VmRSS")?,
        threads: field("Threads:").context("Threads")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
    })
}

// --- part 1: sessions held at once -------------------------------------------

fn held_sessions(lab: &Lab, pg: usize, http: usize) -> Result<()> {
    let pid = lab.warden_pid()?;
    let before = footprint(pid)?;
    let cpu0 = process_cost(pid).map(|c| c.0).unwrap_or(0);
    let started = Instant::now();
    let mut pg_held = Vec::with_capacity(pg);
    for i in 0..pg {
        let mut s = pg_login(lab.ports.warden_pg)
            .with_context(|| format!("PostgreSQL session {i} of {pg}"))?;
        pg_select(&mut s, i as u64).with_context(|| format!("PostgreSQL session {i} of {pg}"))?;
        pg_held.push(s);
    }
    let pg_opened = started.elapsed();
    let mut http_held = Vec::with_capacity(http);
    for i in 0..http {
        let mut s = TcpStream::connect(("127.0.0.1", lab.ports.warden_http))
            .with_context(|| format!("HTTP session {i} of {http}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        http_get(&mut s, &lab.token, true)
            .with_context(|| format!("HTTP session {i} of {http}"))?;
        http_held.push(s);
    }
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let with = footprint(pid)?;
    // All open at once: each answers again.
    for (i, s) in pg_held.iter_mut().enumerate() {
        pg_select(s, (i + pg) as u64).with_context(|| format!("PostgreSQL session {i} again"))?;
    }
    for (i, s) in http_held.iter_mut().enumerate() {
        http_get(s, &lab.token, true).with_context(|| format!("HTTP session {i} again"))?;
    }
    let cpu1 = process_cost(pid).map(|c| c.0).unwrap_or(0);
    let again = footprint(pid)?;
    drop(pg_held);
    drop(http_held);
    std::thread::sleep(Duration::from_secs(3));
    let after = footprint(pid)?;
    let n = pg + http;
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "\n{n} sessions held at once ({pg} PostgreSQL, {http} HTTP keep-alive), opened in {:.1} s \
         ({:.1} s for PostgreSQL), each answered twice, every answer checked:",
        opened.as_secs_f64(),
        pg_opened.as_secs_f64()
    );
    println!(
        "  {:<22} {:>10} {:>8} {:>8}",
        "warden", "RSS MB", "fds", "threads"
    );
    for (name, f) in [
        ("before", before),
        ("all open", with),
        ("all answered again", again),
        ("after they closed", after),
    ] {
        println!(
            "  {name:<22} {:>10.1} {:>8} {:>8}",
            mb(f.rss_kb),
            f.fds,
            f.threads
        );
    }
    println!(
        "  per session: {:.1} KB RSS, {:.2} descriptors, {:.0} µs CPU (open + two answers)",
        with.rss_kb.saturating_sub(before.rss_kb) as f64 / n as f64,
        with.fds.saturating_sub(before.fds) as f64 / n as f64,
        cpu1.saturating_sub(cpu0) as f64 / n as f64
    );
    Ok(())
}

/// A PostgreSQL session through warden (no password: warden logs in).
fn pg_login(port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for (k, v) in [("user", ROLE), ("database", ROLE)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet)?;
    loop {
        let (tag, body) = pg_message(&mut s)?;
        match tag {
            b'Z' => return Ok(s),
            b'E' => bail!("refused: {}", pg_error_text(&body)),
            _ => {}
        }
    }
}

/// `SELECT n` must return `n`.
fn pg_select(s: &mut TcpStream, n: u64) -> Result<()> {
    let sql = format!("SELECT {n}\0");
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    s.write_all(&q)?;
    let want = n.to_string();
    let mut seen = false;
    loop {
        let (tag, body) = pg_message(s)?;
        match tag {
            // DataRow: 1 column, its length, the text.
            b'D' => seen = body.get(6..) == Some(want.as_bytes()),
            b'E' => bail!("query failed: {}", pg_error_text(&body)),
            b'Z' if seen => return Ok(()),
            b'Z' => bail!("`SELECT {n}` did not return {n}"),
            _ => {}
        }
    }
}

fn pg_message(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        bail!("bad message length {len}");
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// The SQLSTATE and message of an ErrorResponse.
fn pg_error_text(body: &[u8]) -> String {
    let field = |code: u8| {
        body.split(|b| *b == 0)
            .find(|f| f.first() == Some(&code))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    };
    format!("{} {}", field(b'C'), field(b'M'))
}

/// One GET; the upstream echoes `Authorization`, which must carry `token`
/// (any token when `exact` is false: the soak replaces it every minute).
fn http_get(s: &mut TcpStream, token: &str, exact: bool) -> Result<()> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed after {} bytes", buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 16 * 1024 {
                bail!("response head too long");
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no Content-Length")?;
        if buf.len() < end + 4 + len {
            continue;
        }
        if !head.starts_with("http/1.1 200") {
            bail!("not served: {}", head.lines().next().unwrap_or(""));
        }
        let body = &buf[end + 4..end + 4 + len];
        let ok = if exact {
            body == format!("Bearer {token}\n").as_bytes()
        } else {
            body.starts_with(b"Bearer ") && body.len() > 8
        };
        if !ok {
            bail!("the upstream did not get the stored token");
        }
        return Ok(());
    }
}

// --- part 2: the mixed soak --------------------------------------------------

/// One quantity of a [`Sample`], as a number.
type Metric = fn(&Sample) -> f64;

struct Sample {
    at_s: u64,
    f: Footprint,
    audit_bytes: u64,
}

fn soak(lab: &mut Lab, options: &Options, out_dir: &Path) -> Result<bool> {
    let secs = options.minutes * 60;
    let pid = lab.warden_pid()?;
    println!(
        "\nmixed soak for {} min: pgbench -S -R 200 (4 persistent clients), pgbench -S -C -R 20 \
         (4 clients), {HTTP_RATE} HTTP requests/s on a keep-alive connection and {HTTP_RATE}/s \
         with Connection: close, an X.509-SVID stream (SVID TTL {SVID_TTL_MINUTES} min); rotations every \
         {ROTATE_EVERY} s, a freeze of workload `probe` every {FREEZE_EVERY} s (first at {FIRST_FREEZE} s)",
        options.minutes
    );
    // The rate-limited -C load, 10 s direct and through warden, for scale.
    for (name, via_warden) in [("direct", false), ("warden", true)] {
        let mut c = lab.pgbench();
        if !via_warden {
            c.args(["-p", &lab.ports.pg.to_string()])
                .env("PGPASSWORD", &lab.password);
        }
        c.args([
            "-n", "-S", "-C", "-R", "20", "-c", "4", "-j", "2", "-T", "10", ROLE,
        ]);
        let out = run_captured(&mut c)?;
        let sample = parse_pgbench_output(&out)
            .with_context(|| format!("could not read pgbench's summary:\n{out}"))?;
        println!(
            "  pgbench -S -C -R 20, 10 s, {name}: {:.1} TPS, average connection time {:.2} ms",
            sample.tps,
            sample.conn_ms.unwrap_or(f64::NAN)
        );
    }
    let mut loads: Vec<(&str, PathBuf, Child)> = Vec::new();
    // The -C load also runs direct (same rate), as this run's baseline,
    // until just before the first rotation changes the password it knows.
    let pgbench_loads = [
        ("pgbench persistent", false, false),
        ("pgbench -C", true, false),
        ("pgbench -C direct (baseline, first 55 s)", true, true),
    ];
    for (name, per_txn, direct) in pgbench_loads {
        let mut c = lab.pgbench();
        if direct {
            c.args(["-p", &lab.ports.pg.to_string()])
                .env("PGPASSWORD", &lab.password);
        }
        let run_for = if direct {
            secs.min(ROTATE_EVERY - 5)
        } else {
            secs
        };
        c.args(["-n", "-S", "-c", "4", "-j", "2", "-T", &run_for.to_string()])
            .args(["-R", if per_txn { "20" } else { "200" }]);
        if per_txn {
            c.arg("-C");
        }
        // Into files, not pipes: nothing reads a pipe until the end, and a
        // full one would stall pgbench (and show as slow connections).
        let log = lab.dir.join(format!("load-{}.out", loads.len()));
        let file = std::fs::File::create(&log)?;
        c.arg(ROLE).stdout(file.try_clone()?).stderr(file);
        let child = c.spawn().with_context(|| format!("starting {name}"))?;
        loads.push((name, log, child));
    }
    // One X.509-SVID stream held for the whole soak (each rotated SVID must
    // arrive valid and new), and at every rotation a workload that starts,
    // takes its SVID and goes.
    let stream_log = lab.dir.join("svid-stream.out");
    let stream = {
        let file = std::fs::File::create(&stream_log)?;
        lab.svid_client(secs)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting the Workload API client")?
    };
    let (mut fetches, mut fetches_failed) = (0u32, 0u32);
    let stop = Arc::new(AtomicBool::new(false));
    let http_loads: Vec<(&str, HttpLoad)> = vec![
        (
            "HTTP keep-alive",
            HttpLoad::start(lab.ports.warden_http, true, stop.clone()),
        ),
        (
            "HTTP Connection: close",
            HttpLoad::start(lab.ports.warden_http, false, stop.clone()),
        ),
    ];
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let (mut rotations, mut freezes) = (0u32, 0u32);
    let mut next_sample = 0;
    let mut next_rotate = ROTATE_EVERY;
    let mut next_freeze = FIRST_FREEZE;
    println!(
        "  {:>6} {:>9} {:>6} {:>8} {:>11}",
        "t (s)", "RSS MB", "fds", "threads", "audit MB"
    );
    while started.elapsed().as_secs() <= secs {
        let now = started.elapsed().as_secs();
        if now >= next_sample {
            let f = footprint(pid)?;
            let audit_bytes = lab.audit_bytes();
            println!(
                "  {now:>6} {:>9.1} {:>6} {:>8} {:>11.2}",
                f.rss_kb as f64 / 1024.0,
                f.fds,
                f.threads,
                audit_bytes as f64 / 1048576.0
            );
            samples.push(Sample {
                at_s: now,
                f,
                audit_bytes,
            });
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_rotate && now < secs {
            if let Err(e) = lab.rotate() {
                problems.push(format!("rotation at {now} s: {e:#}"));
            }
            rotations += 1;
            fetches += 1;
            if let Err(e) = run_captured(&mut lab.svid_client(0)) {
                fetches_failed += 1;
                problems.push(format!("SVID fetch at {now} s: {e:#}"));
            }
            next_rotate += ROTATE_EVERY;
        }
        if now >= next_freeze && now + 20 < secs {
            if let Err(e) = lab.freeze_probe() {
                problems.push(format!("freeze at {now} s: {e:#}"));
            }
            freezes += 1;
            next_freeze += FREEZE_EVERY;
        }
        if let Some(at) = [next_sample, next_rotate, next_freeze].into_iter().min() {
            let wait = at.saturating_sub(started.elapsed().as_secs()).clamp(0, 1);
            std::thread::sleep(Duration::from_millis(200 + 800 * wait));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for (name, load) in http_loads {
        let (served, failed) = load.finish();
        println!("  {name}: {served} requests served, {failed} failed");
        if failed > 0 || served == 0 {
            problems.push(format!(
                "{name}: {failed} of {} requests failed",
                served + failed
            ));
        }
    }
    for (name, log, mut child) in loads {
        let status = child.wait()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let ok = status.success() && parse_pgbench_output(&text).is_some();
        let summary: Vec<&str> = text
            .lines()
            .filter(|l| {
                [
                    "actually processed",
                    "latency average",
                    "connection time",
                    "tps =",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .map(str::trim)
            .collect();
        let summary = summary.join("; ");
        println!("  {name}: {} {summary}", if ok { "ok" } else { "FAILED" });
        if !ok {
            problems.push(format!("{name} failed:\n{text}"));
        }
    }
    println!("  rotations: {rotations}, freezes: {freezes}");
    match svid_stream_verdict(stream, &stream_log, secs) {
        Ok(line) => println!("  {line}"),
        Err(e) => problems.push(format!("{e:#}")),
    }
    println!("  X.509-SVID fetches by a starting workload: {fetches}, {fetches_failed} failed");
    match lab.audit_verify() {
        Ok(text) => println!(
            "  warden audit verify: ok ({})",
            text.lines().next().unwrap_or("").trim()
        ),
        Err(e) => problems.push(format!("warden audit verify: {e:#}")),
    }

    // Growth: first vs last quarter after the warm-up.
    let warmup = 60.max(secs / 10);
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.at_s >= warmup).collect();
    if steady.len() < 4 {
        problems.push(format!(
            "only {} samples after the {warmup} s warm-up: run longer",
            steady.len()
        ));
    } else {
        let q = steady.len() / 4;
        let mean = |part: &[&Sample], f: Metric| {
            part.iter().map(|s| f(s)).sum::<f64>() / part.len() as f64
        };
        let (first, last) = (&steady[..q], &steady[steady.len() - q..]);
        let checks: [(&str, Metric, f64); 3] = [
            ("RSS", |s| s.f.rss_kb as f64, 0.0),
            ("descriptors", |s| s.f.fds as f64, 8.0),
            ("threads", |s| s.f.threads as f64, 8.0),
        ];
        for (name, f, slack) in checks {
            let (a, b) = (mean(first, f), mean(last, f));
            let drift = if a > 0.0 { (b - a) / a } else { 0.0 };
            let ok = b <= a * (1.0 + MAX_DRIFT) + slack;
            println!(
                "  {name}: first quarter {a:.0}, last quarter {b:.0} ({:+.1} %) {}",
                drift * 100.0,
                if ok { "ok" } else { "GROWS" }
            );
            if !ok {
                problems.push(format!(
                    "{name} grew {:+.1} % after the warm-up",
                    drift * 100.0
                ));
            }
        }
    }
    let stamp = started_stamp();
    let table = out_dir.join(format!("soak-{stamp}.txt"));
    let svg = out_dir.join(format!("soak-{stamp}.svg"));
    std::fs::write(&table, sample_table(&samples))?;
    std::fs::write(&svg, plot(&samples, warmup))?;
    println!(
        "  samples: {}\n  plot:    {}",
        table.display(),
        svg.display()
    );
    for p in &problems {
        println!("  problem: {p}");
    }
    let pass = problems.is_empty();
    println!("\nsoak: {}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}

/// Waits for the soak's SVID stream client and checks what it saw: it ran
/// to the end without an error (each update valid on arrival, new, from the
/// bundle's CA, never two minutes without one), with a rotated SVID about
/// every half of [`SVID_TTL_MINUTES`].
fn svid_stream_verdict(mut client: Child, log: &Path, secs: u64) -> Result<String> {
    // It stops on its own `secs` after it started (a moment after the soak).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = client.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            let _ = client.wait();
            bail!("the X.509-SVID stream client did not stop at the end of the soak");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let updates: Vec<&str> = text.lines().filter(|l| l.starts_with("update ")).collect();
    if !status.success() {
        let last = text.lines().last().unwrap_or("(no output)");
        bail!(
            "the X.509-SVID stream failed after {} updates: {last}",
            updates.len()
        );
    }
    let refresh = SVID_TTL_MINUTES * 60 / 2;
    let expected = (secs / refresh).saturating_sub(1);
    if (updates.len() as u64) < expected {
        bail!(
            "the X.509-SVID stream got {} updates in {secs} s, expected at least {expected} \
             (SVID TTL {SVID_TTL_MINUTES} min)",
            updates.len()
        );
    }
    // How long the SVID each rotation replaced still had to live.
    let margins: Vec<i64> = updates
        .iter()
        .filter_map(|l| l.split_whitespace().nth(4)?.parse::<i64>().ok())
        .collect();
    let margin = match (margins.iter().min(), margins.iter().max()) {
        (Some(lo), Some(hi)) => {
            format!("; each rotation came with {lo}–{hi} s of the old SVID's lifetime left")
        }
        _ => String::new(),
    };
    Ok(format!(
        "X.509-SVID stream held {secs} s: {} updates, each new, from the bundle's CA and valid \
         on arrival{margin}",
        updates.len()
    ))
}

/// A client thread making [`HTTP_RATE`] requests per second through the
/// http route, on one keep-alive connection (reopened if it breaks) or on
/// a new connection each (`Connection: close`); every answer is checked.
struct HttpLoad {
    thread: std::thread::JoinHandle<()>,
    served: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

/// Requests per second of each HTTP load of the soak.
const HTTP_RATE: u64 = 50;

impl HttpLoad {
    fn start(port: u16, keep_alive: bool, stop: Arc<AtomicBool>) -> HttpLoad {
        let served = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (ok, bad) = (served.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let connect = || -> Result<TcpStream> {
                let s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                Ok(s)
            };
            let mut conn: Option<TcpStream> = None;
            let period = Duration::from_micros(1_000_000 / HTTP_RATE);
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let result = if keep_alive {
                    match conn.take().map_or_else(connect, Ok) {
                        Ok(mut s) => http_get(&mut s, "", false).map(|()| conn = Some(s)),
                        Err(e) => Err(e),
                    }
                } else {
                    connect().and_then(|mut s| http_get_close(&mut s))
                };
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => bad.fetch_add(1, Ordering::Relaxed),
                };
                next += period;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        HttpLoad {
            thread,
            served,
            failed,
        }
    }

    /// (served, failed), once the thread has seen the stop flag.
    fn finish(self) -> (u64, u64) {
        let _ = self.thread.join();
        (
            self.served.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn http_get_close(s: &mut TcpStream) -> Result<()> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    if !buf.starts_with(b"HTTP/1.1 200") || !buf[end + 4..].starts_with(b"Bearer ") {
        bail!("not served");
    }
    Ok(())
}

/// UTC time of day as `YYYYMMDD-HHMMSS`, from `date`.
fn started_stamp() -> String {
    Command::new("date")
        .args(["-u", "+%Y%m%d-%H%M%S"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| std::process::id().to_string())
}

fn sample_table(samples: &[Sample]) -> String {
    let mut t = String::from("t_s\trss_kb\tfds\tthreads\taudit_bytes\n");
    for s in samples {
        let _ = writeln!(
            t,
            "{}\t{}\t{}\t{}\t{}",
            s.at_s, s.f.rss_kb, s.f.fds, s.f.threads, s.audit_bytes
        );
    }
    t
}

/// Four small line charts (RSS, descriptors, threads, audit log) over time,
/// each scaled from zero to its maximum; the warm-up is shaded.
fn plot(samples: &[Sample], warmup: u64) -> String {
    const W: f64 = 640.0;
    const H: f64 = 130.0;
    const LEFT: f64 = 70.0;
    let t_max = samples.last().map(|s| s.at_s).unwrap_or(1).max(1) as f64;
    let series: [(&str, Metric, &str); 4] = [
        ("RSS (MB)", |s| s.f.rss_kb as f64 / 1024.0, "#1f77b4"),
        ("open descriptors", |s| s.f.fds as f64, "#ff7f0e"),
        ("threads", |s| s.f.threads as f64, "#2ca02c"),
        (
            "audit log (MB)",
            |s| s.audit_bytes as f64 / 1048576.0,
            "#d62728",
        ),
    ];
    let height = series.len() as f64 * (H + 30.0) + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        LEFT + W + 20.0
    );
    for (i, (name, value, color)) in series.iter().enumerate() {
        let top = 20.0 + i as f64 * (H + 30.0);
        let max = samples.iter().map(value).fold(0.0f64, f64::max).max(1e-9);
        let x = |t: u64| LEFT + W * t as f64 / t_max;
        let y = |v: f64| top + H - H * v / max;
        let _ = writeln!(
            svg,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{:.1}\" height=\"{H}\" fill=\"#eee\"/>\
             <rect x=\"{LEFT}\" y=\"{top}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#999\"/>\
             <text x=\"{LEFT}\" y=\"{:.1}\">{name} (max {max:.1}; x: 0–{t_max:.0} s, shaded: warm-up)</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{max:.1}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">0</text>",
            x(warmup.min(t_max as u64)) - LEFT,
            top - 5.0,
            LEFT - 5.0,
            top + 10.0,
            LEFT - 5.0,
            top + H
        );
        let points: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.at_s), y(value(s))))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

// --- the lab -----------------------------------------------------------------

struct Ports {
    pg: u16,
    nginx: u16,
    warden_pg: u16,
    warden_http: u16,
}

/// PostgreSQL, nginx and warden in a temp dir; dropping it stops them (by
/// pid; the server with `pg_ctl stop`) and removes the dir.
struct Lab {
    dir: PathBuf,
    pg_bin: PathBuf,
    warden: PathBuf,
    /// `tests/examples/svid_stream.rs`, built.
    svid_client: PathBuf,
    ports: Ports,
    password: String,
    token: String,
    pg_started: bool,
    children: Vec<(&'static str, Child)>,
    cleaned: bool,
}

impl Lab {
    fn create(pg_bin: PathBuf, warden: PathBuf, svid_client: PathBuf) -> Result<Lab> {
        let dir = std::env::temp_dir().join(format!("warden-soak-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir(&dir)?;
        set_mode(&dir, 0o755)?;
        for sub in ["pg", "warden", "nginx"] {
            std::fs::create_dir(dir.join(sub))?;
            set_mode(&dir.join(sub), 0o700)?;
        }
        chown_to_postgres(&dir.join("pg"))?;
        let [pg, nginx, warden_pg, warden_http] = free_ports()?;
        println!(
            "temp dir {}; ports: postgres {pg}, nginx {nginx}, warden postgres {warden_pg}, warden http {warden_http}",
            dir.display()
        );
        Ok(Lab {
            dir,
            pg_bin,
            warden,
            svid_client,
            ports: Ports {
                pg,
                nginx,
                warden_pg,
                warden_http,
            },
            password: random_alphanumeric(24)?,
            token: random_alphanumeric(32)?,
            pg_started: false,
            children: Vec::new(),
            cleaned: false,
        })
    }

    fn start_postgres(&mut self) -> Result<()> {
        let pg_dir = self.dir.join("pg");
        self.pg_started = true;
        start_cluster(
            &self.dir,
            &self.pg_bin,
            &pg_dir.join("data"),
            &pg_dir,
            &format!(
                "\n# cargo xtask bench --only soak\nport = {}\nlisten_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\nmax_connections = {}\nfsync = off\n\
                 password_encryption = 'scram-sha-256'\n",
                self.ports.pg,
                pg_dir.display(),
                MAX_PG_SESSIONS + 100
            ),
        )?;
        let mut psql = Command::new("psql");
        psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&pg_dir)
            .args([
                "-p",
                &self.ports.pg.to_string(),
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
        let mut init = Command::new("pgbench");
        init.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.ports.pg.to_string(),
            "-U",
            ROLE,
        ])
        .args(["-i", "-q", "-s", "1", ROLE])
        .env("PGPASSWORD", &self.password)
        .env("PGSSLMODE", "disable")
        .env("PGPASSFILE", "/dev/null");
        run_captured(&mut init)?;
        Ok(())
    }

    fn start_nginx(&mut self, nginx: &Path) -> Result<()> {
        let d = self.dir.join("nginx");
        let conf = format!(
            "worker_processes 1;\nuser root root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 19000; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/b; proxy_temp_path {d}/p; \
             fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n  \
             keepalive_requests 1000000; keepalive_timeout 3600s;\n  \
             server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; \
             return 200 \"$http_authorization\\n\"; }} }}\n}}\n",
            d = d.display(),
            port = self.ports.nginx
        );
        let path = d.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let mut c = Command::new(nginx);
        c.arg("-p")
            .arg(&d)
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null());
        println!("$ {}", cmd::display(&c));
        self.children
            .push(("nginx", c.spawn().context("starting nginx")?));
        Ok(())
    }

    fn workload_api_socket(&self) -> PathBuf {
        self.dir.join("warden").join("workload.sock")
    }

    /// The soak's Workload API client, attested as workload `bench`: holds
    /// one X.509-SVID stream for `seconds`, or takes one SVID when 0.
    fn svid_client(&self, seconds: u64) -> Command {
        let mut c = Command::new(&self.svid_client);
        c.arg(self.workload_api_socket())
            .arg(BENCH_ID)
            .arg(seconds.to_string());
        c
    }

    fn config(&self) -> PathBuf {
        self.dir.join("warden").join("warden.toml")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("warden").join("data")
    }

    fn warden_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.warden);
        c.arg("--config").arg(self.config()).args(args);
        c
    }

    fn start_warden(&mut self) -> Result<()> {
        let wdir = self.dir.join("warden");
        let config = format!(
            "data_dir = \"{data}\"\ntrust_domain = \"example.org\"\n\
             \n[admin]\nsocket = \"{admin}\"\n\n[metrics]\nlisten = \"off\"\n\
             \n[identity]\nsvid_ttl = \"{SVID_TTL_MINUTES}m\"\nworkload_api_socket = \"{workload_api}\"\n\
             \n[[workload]]\nname = \"bench\"\nspiffe_id = \"{BENCH_ID}\"\nselectors = {{ uid = {uid} }}\n\
             \n[[workload]]\nname = \"probe\"\nspiffe_id = \"spiffe://example.org/probe\"\nselectors = {{ uid = {PROBE_UID} }}\n\
             \n[[secret]]\nname = \"{PG_SECRET}\"\nrotate = {{ method = \"postgres\", route = \"pg\" }}\n\
             \n[[route]]\nname = \"pg\"\nkind = \"postgres\"\nlisten = \"127.0.0.1:{wpg}\"\n\
             upstream = \"127.0.0.1:{pg}\"\nupstream_tls = {{ mode = \"disable\" }}\n\
             credential = {{ user = \"{ROLE}\", secret = \"{PG_SECRET}\", cache_ttl = \"10m\" }}\n\
             allow = [\"bench\", \"probe\"]\n\
             \n[[route]]\nname = \"http\"\nkind = \"http\"\nlisten = \"127.0.0.1:{whttp}\"\n\
             upstream = \"http://127.0.0.1:{nginx}\"\n\
             inject = {{ header = \"Authorization\", value = \"Bearer {{secret}}\", secret = \"{HTTP_SECRET}\", cache_ttl = \"10m\" }}\n\
             allow = [\"bench\", \"probe\"]\n",
            data = self.data_dir().display(),
            admin = wdir.join("admin.sock").display(),
            workload_api = self.workload_api_socket().display(),
            uid = super::effective_uid().unwrap_or(0),
            wpg = self.ports.warden_pg,
            pg = self.ports.pg,
            whttp = self.ports.warden_http,
            nginx = self.ports.nginx,
        );
        std::fs::write(self.config(), config)?;
        run_captured(&mut self.warden_cmd(&["config", "check"]))?;
        run_captured(&mut self.warden_cmd(&["init"]))?;
        run_with_stdin(
            &mut self.warden_cmd(&["secret", "put", PG_SECRET]),
            self.password.as_bytes(),
        )?;
        run_with_stdin(
            &mut self.warden_cmd(&["secret", "put", HTTP_SECRET]),
            self.token.as_bytes(),
        )?;
        self.spawn_warden()
    }

    /// `warden up` (the store initialised), waiting until it answers.
    fn spawn_warden(&mut self) -> Result<()> {
        let log_path = self.dir.join("warden").join("warden.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut up = self.warden_cmd(&["up"]);
        up.env("WARDEN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("$ {}", cmd::display(&up));
        self.children
            .push(("warden", up.spawn().context("starting warden")?));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cmd::succeeds_quietly(&mut self.warden_cmd(&["status"])) {
            if let Some((_, c)) = self.children.iter_mut().find(|(n, _)| *n == "warden") {
                if let Some(status) = c.try_wait()? {
                    print_tail(&log_path, 20);
                    bail!("warden exited early ({status}); its log is above");
                }
            }
            if Instant::now() > deadline {
                print_tail(&log_path, 20);
                bail!("`warden status` did not succeed within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Stops warden and starts it again on the same data dir.
    fn restart_warden(&mut self) -> Result<()> {
        if let Some(i) = self.children.iter().position(|(n, _)| *n == "warden") {
            let (name, mut child) = self.children.remove(i);
            super::stop_child(name, &mut child, Duration::from_secs(10));
        }
        self.spawn_warden()
    }

    fn warden_pid(&self) -> Result<u32> {
        self.children
            .iter()
            .find(|(n, _)| *n == "warden")
            .map(|(_, c)| c.id())
            .context("warden is not running")
    }

    /// pgbench through warden's postgres route (no password).
    fn pgbench(&self) -> Command {
        let mut c = Command::new("pgbench");
        c.args(["-h", "127.0.0.1", "-p", &self.ports.warden_pg.to_string()])
            .args(["-U", ROLE])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env("PGSSLMODE", "disable")
            // A path that does not exist: libpq warns on every connection
            // about /dev/null ("not a plain file").
            .env("PGPASSFILE", self.dir.join("no-passfile"));
        c
    }

    /// Rotates the PostgreSQL password (ALTER ROLE) and replaces the token.
    fn rotate(&self) -> Result<()> {
        run_captured(&mut self.warden_cmd(&["secret", "rotate", PG_SECRET]))?;
        let token = random_alphanumeric(32)?;
        run_with_stdin(
            &mut self.warden_cmd(&["secret", "put", HTTP_SECRET]),
            token.as_bytes(),
        )
    }

    /// Freezes workload `probe`: its session must be refused; after the
    /// unfreeze, served.
    fn freeze_probe(&self) -> Result<()> {
        run_captured(&mut self.warden_cmd(&[
            "freeze",
            "probe",
            "--reason",
            "soak bench",
            "--for",
            "2m",
        ]))?;
        let refused = !self.probe_succeeds();
        run_captured(&mut self.warden_cmd(&["unfreeze", "probe"]))?;
        let served = self.probe_succeeds();
        println!(
            "  freeze: probe session {} while frozen, {} after the unfreeze",
            if refused { "refused" } else { "SERVED" },
            if served { "served" } else { "REFUSED" }
        );
        if !refused || !served {
            bail!("freeze refused the probe: {refused}, unfreeze let it in again: {served}");
        }
        Ok(())
    }

    /// `SELECT 1` through the postgres route as the `probe` workload.
    fn probe_succeeds(&self) -> bool {
        let mut c = Command::new("runuser");
        c.args([
            "-u",
            "nobody",
            "--",
            "psql",
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &self.ports.warden_pg.to_string(),
            "-U",
            ROLE,
            "-d",
            ROLE,
        ])
        .args(["-c", "SELECT 1"])
        .current_dir("/")
        .env_remove("PGPASSWORD")
        .env("PGSSLMODE", "disable")
        .env("PGPASSFILE", "/dev/null")
        .env("PGCONNECT_TIMEOUT", "10");
        cmd::succeeds_quietly(&mut c)
    }

    fn audit_bytes(&self) -> u64 {
        std::fs::read_dir(self.data_dir())
            .map(|dir| {
                dir.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("audit"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn audit_verify(&self) -> Result<String> {
        run_captured(&mut self.warden_cmd(&["audit", "verify"]))
    }

    fn shutdown(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        while let Some((name, mut child)) = self.children.pop() {
            super::stop_child(name, &mut child, Duration::from_secs(5));
        }
        if self.pg_started {
            let mut stop = as_postgres(&self.dir, &self.pg_bin.join("pg_ctl"));
            stop.arg("-D")
                .arg(self.dir.join("pg").join("data"))
                .args(["-m", "fast", "-w", "-t", "30", "stop"]);
            if !cmd::succeeds_quietly(&mut stop) {
                eprintln!("warning: `{}` failed", cmd::display(&stop));
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {err}", self.dir.display());
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_and_table_have_every_sample() {
        let samples: Vec<Sample> = (0..5)
            .map(|i| Sample {
                at_s: i * 10,
                f: Footprint {
                    rss_kb: 1000 + i,
                    fds: 20,
                    threads: 8,
                },
                audit_bytes: i * 100,
            })
            .collect();
        let svg = plot(&samples, 20);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(sample_table(&samples).lines().count(), 6);
    }
}
