//! The HTTP proxy bench: wrk against one local upstream (nginx returning a
//! small static body), reached three ways in the same run —
//!
//! - `direct`: wrk talks to the upstream itself;
//! - `warden`: an http route injecting `Authorization: Bearer <secret>`;
//! - `nginx`: a second nginx (`proxy_pass`, upstream keepalive pool)
//!   injecting the same header with `proxy_set_header`.
//!
//! Runs are interleaved (each round runs direct, warden, nginx in turn), the
//! median over rounds is reported with wrk's p50/p99, and warden is printed
//! as ratios against the two baselines measured in this run, with its added
//! p99 over direct. Then [`IDLE_CONNECTIONS`] keep-alive clients each get one
//! answered request and stay connected: warden's RSS and descriptors before,
//! with them and after they leave are printed (target: ≤ 200 MB with 10,000).
//! Every process is stopped when [`Lab`] is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::pg::median;
use crate::{cmd, prereq};

const CONNECTIONS: u32 = 32;
/// Idle keep-alive client connections held at once in the memory step.
const IDLE_CONNECTIONS: usize = 10_000;
/// warden's RSS with [`IDLE_CONNECTIONS`] open, at most (MB).
const IDLE_RSS_TARGET_MB: f64 = 200.0;
const THREADS: u32 = 2;
const SECRET: &str = "bench/api-token";

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Warden,
    Nginx,
}

impl Target {
    const ALL: [Target; 3] = [Target::Direct, Target::Warden, Target::Nginx];
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Warden => "warden",
            Target::Nginx => "nginx",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub fn run(repo: &Path, options: &Options) -> Result<()> {
    prereq::ensure_system_packages(prereq::HTTP_BENCH_REQUIREMENTS)?;
    let nginx = prereq::find_on_path("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .context("nginx not found")?;
    let wrk = prereq::find_on_path("wrk").context("wrk not found on $PATH")?;
    cmd::run(cmd::cargo(repo).args(["build", "--release", "-p", "warden"]))?;
    let warden = cmd::target_dir(repo).join("release").join("warden");
    let mut lab = Lab::create()?;
    lab.start_nginx(&nginx, "upstream", &upstream_conf(&lab.dir, lab.ports[0]))?;
    let token = random_token()?;
    lab.start_nginx(
        &nginx,
        "proxy",
        &proxy_conf(&lab.dir, lab.ports[2], lab.ports[0], &token),
    )?;
    lab.start_warden(&warden, &token)?;
    for t in Target::ALL {
        lab.wait_http(t)?;
    }
    println!(
        "wrk -t{THREADS} -c{CONNECTIONS} -d{}s --latency, {} interleaved round(s)",
        options.seconds, options.rounds
    );
    let mut results: Vec<(Target, Vec<Sample>)> =
        Target::ALL.iter().map(|t| (*t, Vec::new())).collect();
    for round in 1..=options.rounds {
        for (t, samples) in results.iter_mut() {
            let s = lab.wrk(&wrk, *t, options.seconds)?;
            println!(
                "  round {round} {:<7} {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
                t.name(),
                s.rps,
                s.p50_ms,
                s.p99_ms
            );
            samples.push(s);
        }
    }
    let med = |t: Target| {
        let v = &results
            .iter()
            .find(|(x, _)| *x == t)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Sample {
            rps: median(v.iter().map(|s| s.rps).collect()),
            p50_ms: median(v.iter().map(|s| s.p50_ms).collect()),
            p99_ms: median(v.iter().map(|s| s.p99_ms).collect()),
        }
    };
    let (d, w, n) = (med(Target::Direct), med(Target::Warden), med(Target::Nginx));
    println!("\nmedian of {} rounds:", options.rounds);
    for (t, s) in [
        (Target::Direct, &d),
        (Target::Warden, &w),
        (Target::Nginx, &n),
    ] {
        println!(
            "  {:<7} {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
            t.name(),
            s.rps,
            s.p50_ms,
            s.p99_ms
        );
    }
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let vs_direct = ratio(w.rps, d.rps);
    let vs_nginx = ratio(w.rps, n.rps);
    let added = w.p99_ms - d.p99_ms;
    println!(
        "  warden / direct {vs_direct:.2}x ({} target 0.90x)\n  warden / nginx  {vs_nginx:.2}x ({} target 1.00x)\n  warden p99 added over direct {added:.3} ms ({} target 0.5 ms; nginx adds {:.3} ms)",
        verdict(vs_direct >= 0.9),
        verdict(vs_nginx >= 1.0),
        verdict(added <= 0.5),
        n.p99_ms - d.p99_ms
    );
    idle_connections(&lab, IDLE_CONNECTIONS)?;
    lab.shutdown();
    Ok(())
}

/// warden's resident memory (KB) and open descriptors.
fn footprint(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
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

/// `n` clients each send one request over keep-alive, read its 200, and
/// stay connected; warden's footprint is printed before, with them, and
/// after they leave, and a fresh client must still be served.
fn idle_connections(lab: &Lab, n: usize) -> Result<()> {
    use std::io::{Read, Write};
    let pid = lab
        .children
        .iter()
        .find(|(name, _)| *name == "warden")
        .map(|(_, c)| c.id())
        .context("warden is not running")?;
    // On the plain-HTTP fast path each idle client holds two of warden's
    // descriptors (its socket and the upstream connection it owns); warden
    // sheds beyond a 16th below its limit. Fewer clients where the host's
    // hard limit does not allow `n` (the figure per connection still holds).
    let limit = nofile_limit(pid).unwrap_or(1024);
    let fit = ((limit - limit / 16).saturating_sub(512) / 2) as usize;
    let n = if fit < n {
        println!(
            "\n(warden's descriptor limit here is {limit}: holding {fit} idle connections, not {n})"
        );
        fit
    } else {
        n
    };
    let me = std::process::id().to_string();
    let _ = Command::new("prlimit")
        .args(["--pid", &me, &format!("--nofile={limit}:{limit}")])
        .stderr(Stdio::null())
        .status();
    let (rss0, fds0) = footprint(pid)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut buf = [0u8; 4096];
    for i in 0..n {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", lab.port(Target::Warden)))
            .with_context(|| format!("connection {i} of {n}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let got = c
            .read(&mut buf)
            .with_context(|| format!("response {i} of {n}"))?;
        if !buf[..got].starts_with(b"HTTP/1.1 200") {
            bail!(
                "connection {i} of {n} was not served: {}",
                String::from_utf8_lossy(&buf[..got.min(200)])
            );
        }
        held.push(c);
    }
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, fds1) = footprint(pid)?;
    lab.wait_http(Target::Warden)
        .context("a new client while the idle ones are held")?;
    drop(held);
    std::thread::sleep(Duration::from_secs(2));
    let (rss2, fds2) = footprint(pid)?;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let per = (rss1.saturating_sub(rss0)) as f64 / n as f64;
    println!(
        "
{n} idle keep-alive connections (each served one request; opened in {:.1} s):",
        opened.as_secs_f64()
    );
    println!(
        "  warden RSS {:.1} MB before, {:.1} MB with them ({per:.1} KB each), {:.1} MB after they left",
        mb(rss0),
        mb(rss1),
        mb(rss2)
    );
    println!("  warden open descriptors {fds0} before, {fds1} with them, {fds2} after");
    let at_10k = mb(rss0) + per * IDLE_CONNECTIONS as f64 / 1024.0;
    println!(
        "  {} target: RSS with {IDLE_CONNECTIONS} connections <= {IDLE_RSS_TARGET_MB:.0} MB ({at_10k:.1} MB at {per:.1} KB each)",
        if at_10k <= IDLE_RSS_TARGET_MB {
            "meets"
        } else {
            "MISSES"
        }
    );
    Ok(())
}

fn upstream_conf(dir: &Path, port: u16) -> String {
    format!(
        "worker_processes 1;\nuser root root;\npid {d}/upstream.pid;\nerror_log {d}/upstream-error.log warn;\n\
         worker_rlimit_nofile 65536;\nevents {{ worker_connections 30000; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/ub; proxy_temp_path {d}/up; fastcgi_temp_path {d}/uf; uwsgi_temp_path {d}/uu; scgi_temp_path {d}/us;\n\
           keepalive_requests 1000000;\n\
           server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; return 200 \"ok\\n\"; }} }}\n}}\n",
        d = dir.display()
    )
}

fn proxy_conf(dir: &Path, port: u16, upstream: u16, token: &str) -> String {
    format!(
        "worker_processes 2;\nuser root root;\npid {d}/proxy.pid;\nerror_log {d}/proxy-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/pb; proxy_temp_path {d}/pp; fastcgi_temp_path {d}/pf; uwsgi_temp_path {d}/pu; scgi_temp_path {d}/ps;\n\
           keepalive_requests 1000000;\n\
           upstream api {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}\n\
           server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://api; proxy_http_version 1.1; \
           proxy_set_header Connection \"\"; proxy_set_header Authorization \"Bearer {token}\"; }} }}\n}}\n",
        d = dir.display()
    )
}

struct Lab {
    dir: PathBuf,
    /// upstream, warden, nginx proxy
    ports: [u16; 3],
    children: Vec<(&'static str, Child)>,
}

impl Lab {
    fn create() -> Result<Lab> {
        let dir = std::env::temp_dir().join(format!("warden-http-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut ports = [0u16; 3];
        let holders: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        for (i, h) in holders.iter().enumerate() {
            ports[i] = h.local_addr()?.port();
        }
        drop(holders);
        Ok(Lab {
            dir,
            ports,
            children: Vec::new(),
        })
    }

    fn port(&self, t: Target) -> u16 {
        match t {
            Target::Direct => self.ports[0],
            Target::Warden => self.ports[1],
            Target::Nginx => self.ports[2],
        }
    }

    fn start_nginx(&mut self, nginx: &Path, name: &'static str, conf: &str) -> Result<()> {
        let path = self.dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let mut c = Command::new(nginx);
        c.arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null());
        println!("$ {}", cmd::display(&c));
        let child = c.spawn().context("could not start nginx")?;
        self.children.push((name, child));
        Ok(())
    }

    fn start_warden(&mut self, warden: &Path, token: &str) -> Result<()> {
        let route = format!(
            "kind = \"http\"\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"http://127.0.0.1:{up}\"\n\
             inject = {{ header = \"Authorization\", value = \"Bearer {{secret}}\", secret = \"{SECRET}\", cache_ttl = \"10m\" }}",
            listen = self.ports[1],
            up = self.ports[0],
        );
        let started = super::start_bench_warden(
            warden,
            &self.dir.join("warden"),
            &route,
            "",
            SECRET,
            token.as_bytes(),
        )?;
        self.children.push(("warden", started.child));
        Ok(())
    }

    /// Waits until `curl` gets a 200 through `t`.
    fn wait_http(&self, t: Target) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                ])
                .arg(format!("http://127.0.0.1:{}/", self.port(t)))
                .output()?;
            if out.stdout == b"200" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer 200 within 30 s (got {:?}); logs in {}",
                    t.name(),
                    String::from_utf8_lossy(&out.stdout),
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wrk(&self, wrk: &Path, t: Target, seconds: u64) -> Result<Sample> {
        let out = Command::new(wrk)
            .args([
                format!("-t{THREADS}"),
                format!("-c{CONNECTIONS}"),
                format!("-d{seconds}s"),
                "--latency".into(),
                format!("http://127.0.0.1:{}/", self.port(t)),
            ])
            .output()
            .context("wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let s = parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))?;
        if text.contains("Non-2xx") {
            bail!("{} answered non-2xx responses:\n{text}", t.name());
        }
        Ok(s)
    }

    fn shutdown(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            super::stop_child(name, child, Duration::from_secs(5));
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

fn random_token() -> Result<String> {
    let mut f = std::fs::File::open("/dev/urandom")?;
    let mut raw = [0u8; 24];
    std::io::Read::read_exact(&mut f, &mut raw)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// wrk durations: "812.00us", "1.23ms", "2.00s".
fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn parse_wrk(out: &str) -> Option<Sample> {
    let mut s = Sample::default();
    let mut seen = 0;
    for line in out.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Requests/sec:"), Some(v)) => {
                s.rps = v.parse().ok()?;
                seen += 1;
            }
            (Some("50%"), Some(v)) => {
                s.p50_ms = parse_duration_ms(v)?;
                seen += 1;
            }
            (Some("99%"), Some(v)) => {
                s.p99_ms = parse_duration_ms(v)?;
                seen += 1;
            }
            _ => {}
        }
    }
    (seen == 3).then_some(s)
}

fn ratio(v: f64, base: f64) -> f64 {
    if base > 0.0 {
        v / base
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 32 connections\n  Latency Distribution\n     50%  250.00us\n     75%  400.00us\n     90%    1.10ms\n     99%    2.50ms\n  100000 requests in 5.00s, 10.00MB read\nRequests/sec:  20000.50\nTransfer/sec:      2.00MB\n";
        assert_eq!(
            parse_wrk(out),
            Some(Sample {
                rps: 20000.5,
                p50_ms: 0.25,
                p99_ms: 2.5
            })
        );
        assert_eq!(parse_duration_ms("1.5s"), Some(1500.0));
        assert!(parse_wrk("garbage").is_none());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
