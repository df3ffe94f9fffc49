//! `warden scan`: find hard-coded secrets in files and git history (the
//! `warden-scan` crate does the work). Exit 0 clean, 1 findings, 2 usage.
//! On a terminal a progress line is drawn on stderr while files are
//! scanned (never into the report on stdout). `--verify` tries the login of
//! database URLs against the host the URL names (see [`verify`]).

use crate::dburl::{percent_decode_bytes, DbKind, DbUrl};
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use warden_core::error::{Error, Result};
use warden_scan::walk::Progress;
use warden_scan::{git, report, Finding, RuleSet, ScanResult, Scanner};
use zeroize::Zeroizing;

/// How long `--verify` waits for one server (connect plus login).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct ScanArgs {
    /// Files and directories to scan (hidden files included; .gitignore is not obeyed).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Also scan every blob reachable from any ref of each PATH that is a git repository.
    #[arg(long)]
    git: bool,
    /// SARIF 2.1.0 output (for code-scanning UIs).
    #[arg(long)]
    sarif: bool,
    /// Report only findings whose fingerprint is not in FILE.
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
    /// Write the fingerprints of this scan's findings to FILE.
    #[arg(long, value_name = "FILE")]
    write_baseline: Option<PathBuf>,
    /// Extra rules (TOML, the built-in format): same id replaces, new ids add, [allow] appends.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Leave out files git ignores (.gitignore, .git/info/exclude); each
    /// directory PATH must be in a git work tree. Off by default: ignored
    /// files are where secrets sit.
    #[arg(long)]
    respect_gitignore: bool,
    /// Try the login of each PostgreSQL and Redis URL found in the tree
    /// against the host the URL names (5 s timeout): live, rejected or
    /// unreachable. Off by default; never contacts any other host.
    #[arg(long)]
    verify: bool,
}

/// The scanner with the built-in rules and, if given, a user's rules file.
pub fn build_scanner(rules: Option<&Path>) -> Result<Scanner> {
    let user = match rules {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Error::usage(format!("--rules {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let name = rules.map(|p| p.display().to_string()).unwrap_or_default();
    let rules = RuleSet::load(user.as_deref().map(|t| (t, name.as_str())))
        .map_err(|e| Error::usage(e.to_string()))?;
    Scanner::new(rules).map_err(|e| Error::usage(e.to_string()))
}

/// Run the scan; `Ok(true)` when there are (new) findings.
pub fn run(args: ScanArgs, json: bool) -> Result<bool> {
    if json && args.sarif {
        return Err(Error::usage("--json and --sarif exclude each other"));
    }
    let scanner = build_scanner(args.rules.as_deref())?;
    let baseline = match &args.baseline {
        Some(p) => Some(report::read_baseline(p).map_err(|e| Error::usage(e.to_string()))?),
        None => None,
    };
    let tty = std::io::stderr().is_terminal();
    let opts = warden_scan::walk::WalkOptions {
        respect_gitignore: args.respect_gitignore,
    };
    let mut result = if tty {
        with_progress_line("files", |p| {
            warden_scan::scan_paths_with(&scanner, &args.paths, Some(p), opts)
        })
    } else {
        warden_scan::scan_paths_with(&scanner, &args.paths, None, opts)
    }
    .map_err(|e| Error::usage(e.to_string()))?;
    if args.git {
        let mut history = ScanResult::default();
        for p in args.paths.iter().filter(|p| p.join(".git").exists()) {
            let h = if tty {
                with_progress_line("git blobs", |prog| {
                    git::scan_history_with_progress(&scanner, p, Some(prog))
                })
            } else {
                git::scan_history(&scanner, p)
            }
            .map_err(|e| Error::usage(e.to_string()))?;
            history.findings.extend(h.findings);
            history.stats.add(&h.stats);
        }
        let h = git::history_only(history, &result.findings);
        result.findings.extend(h.findings);
        result.stats.add(&h.stats);
    }
    if let Some(b) = &baseline {
        warden_scan::apply_baseline(&mut result, b);
    }
    if args.verify {
        verify(&scanner, &mut result.findings, &args.paths);
    }
    if let Some(p) = &args.write_baseline {
        let text = serde_json::to_string_pretty(&report::baseline(&result))
            .map_err(|e| Error::internal(e.to_string()))?;
        std::fs::write(p, text + "\n")
            .map_err(|e| Error::usage(format!("--write-baseline {}: {e}", p.display())))?;
    }
    let out = if args.sarif {
        pretty(&report::sarif(&result, &scanner.rules))?
    } else if json {
        pretty(&report::json(&result))?
    } else {
        report::text(&result)
    };
    print!("{out}");
    Ok(!result.findings.is_empty())
}

fn pretty(v: &serde_json::Value) -> Result<String> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| Error::internal(e.to_string()))
}

/// Runs `scan` with a progress line on stderr (a terminal): `what` done of
/// those found (files, git blobs), megabytes and throughput, drawn at the
/// start, redrawn every 200 ms, erased at the end.
fn with_progress_line(
    what: &str,
    scan: impl FnOnce(&Progress) -> std::result::Result<ScanResult, warden_scan::ScanError>,
) -> std::result::Result<ScanResult, warden_scan::ScanError> {
    let progress = Progress::default();
    let done = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut drawn = false;
            let mut err = std::io::stderr();
            // Drawn at once (so a terminal user sees the scan start), then
            // every 200 ms until the scan ends.
            let mut first = true;
            while !done.load(Ordering::Relaxed) {
                if !first {
                    std::thread::sleep(Duration::from_millis(200));
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                }
                first = false;
                let files = progress.files_done.load(Ordering::Relaxed);
                let total = progress.files_total.load(Ordering::Relaxed);
                let mb = progress.bytes_done.load(Ordering::Relaxed) as f64 / 1e6;
                let secs = start.elapsed().as_secs_f64().max(0.001);
                let line = if progress.walk_done.load(Ordering::Relaxed) {
                    let pct = (files * 100).checked_div(total).unwrap_or(100);
                    let width = 24usize;
                    let fill = (pct as usize * width / 100).min(width);
                    format!(
                        "scanning [{}{}] {pct:>3}% {files}/{total} {what}, {mb:.1} MB, {:.1} MB/s",
                        "#".repeat(fill),
                        "-".repeat(width - fill),
                        mb / secs
                    )
                } else {
                    format!("scanning: listing {what}…")
                };
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
                drawn = true;
            }
            if drawn {
                let _ = write!(err, "\r\x1b[2K");
                let _ = err.flush();
            }
        });
        let r = scan(&progress);
        done.store(true, Ordering::Relaxed);
        r
    })
}

/// `--verify`: for each PostgreSQL or Redis URL in the tree or (history-only
/// findings) in the git blob its commit added, the value is found again
/// (checked against the fingerprint) and the login is tried against the
/// URL's own host and port, with [`VERIFY_TIMEOUT`].
/// Never to another host, never with a value from anywhere else; other
/// findings are left unmarked.
fn verify(scanner: &Scanner, findings: &mut [Finding], roots: &[PathBuf]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        for f in findings.iter_mut() {
            f.verified = Some("not tried: no async runtime".into());
        }
        return;
    };
    for f in findings.iter_mut() {
        if !matches!(
            f.rule_id.as_str(),
            "database-url-password" | "redis-url-password"
        ) {
            continue;
        }
        let text = match &f.commit {
            Some(c) => history_text(roots, &f.path, c),
            None => std::fs::read_to_string(&f.path).ok().map(Zeroizing::new),
        };
        let Some(text) = text else {
            f.verified = Some("not tried: the file (or its git blob) cannot be read now".into());
            continue;
        };
        let at = match scanner.locate(&text, f) {
            Ok(at) => at,
            Err(e) => {
                f.verified = Some(format!("not tried: {e}"));
                continue;
            }
        };
        let Some(url) = DbUrl::parse(&text[at.whole.clone()]) else {
            f.verified = Some("not tried: the URL has no single host and port".into());
            continue;
        };
        let raw = &text.as_bytes()[at.value.clone()];
        let password = Zeroizing::new(percent_decode_bytes(raw).unwrap_or_else(|| raw.to_vec()));
        f.verified = Some(match url.kind {
            DbKind::Postgres => rt.block_on(verify_postgres(&url, password)),
            DbKind::Redis => rt.block_on(verify_redis(&url, &password)),
            DbKind::Other => "not tried: only PostgreSQL and Redis logins are tried".into(),
        });
    }
}

/// The text of `path` (as `--git` reports it: `ROOT/RELATIVE`) at `commit`,
/// from the scanned repository it belongs to.
fn history_text(roots: &[PathBuf], path: &str, commit: &str) -> Option<Zeroizing<String>> {
    let (root, rel) = roots.iter().find_map(|r| {
        let prefix = format!("{}/", r.display());
        path.strip_prefix(&prefix).map(|rel| (r, rel))
    })?;
    if !commit.bytes().all(|b| b.is_ascii_hexdigit()) || rel.starts_with('-') {
        return None;
    }
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["show", &format!("{commit}:{rel}")])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok().map(Zeroizing::new)
}

async fn verify_postgres(url: &DbUrl, password: Zeroizing<Vec<u8>>) -> String {
    use warden_core::config::TlsMode;
    use warden_core::pgwire::protocol::StartupMessage;
    use warden_core::pgwire::scram::{ScramKeyCache, MIN_ITERATIONS};
    use warden_core::pgwire::upstream::{connect, Login, UpstreamFailure, UpstreamTarget};
    let where_ = url.upstream();
    let Ok(server_name) = warden_core::tls::server_name(&url.host) else {
        return format!("not tried: {:?} is not a host name", url.host);
    };
    // libpq's sslmode: prefer (the default) tries TLS, then plain.
    let modes: &[TlsMode] = match url.param("sslmode") {
        Some("disable") => &[TlsMode::Disable],
        Some("require") => &[TlsMode::Require],
        Some("verify-ca") => &[TlsMode::VerifyCa],
        Some("verify-full") => &[TlsMode::VerifyFull],
        _ => &[TlsMode::Require, TlsMode::Disable],
    };
    let startup = StartupMessage {
        protocol: (3, 0),
        params: vec![
            ("user".into(), url.user.clone()),
            ("database".into(), url.database()),
            ("application_name".into(), "warden-scan-verify".into()),
        ],
    };
    let mut last = String::new();
    for &mode in modes {
        let tls = match warden_core::tls::client_config(mode, None, "scan --verify") {
            Ok(t) => t,
            Err(e) => return format!("not tried: {}", e.message),
        };
        let target = UpstreamTarget {
            host: url.host.clone(),
            port: url.port,
            tls,
            server_name: server_name.clone(),
            connect_timeout: VERIFY_TIMEOUT,
        };
        let login = Login {
            user: url.user.clone(),
            password: password.clone(),
            secret_label: "found in the file".into(),
            scram_min_iterations: MIN_ITERATIONS,
        };
        let attempt = tokio::time::timeout(
            VERIFY_TIMEOUT,
            connect(&target, &startup, &login, &ScramKeyCache::default()),
        )
        .await;
        match attempt {
            Err(_) => {
                return format!(
                    "unreachable ({where_}: no answer within {} s)",
                    VERIFY_TIMEOUT.as_secs()
                )
            }
            Ok(Ok(_session)) => return format!("live (login accepted by {where_})"),
            Ok(Err(UpstreamFailure::Rejected(_))) => {
                return format!("rejected (login refused by {where_})")
            }
            Ok(Err(UpstreamFailure::Server(e))) => {
                let code = e.code().unwrap_or("");
                // Authentication comes before the database check: a missing
                // database means the password was accepted.
                return match code {
                    "28P01" | "28000" => format!("rejected (login refused by {where_})"),
                    "3D000" => {
                        format!("live (login accepted by {where_}; the database does not exist)")
                    }
                    _ => format!(
                        "unknown ({where_} answered {code}: {})",
                        e.message().unwrap_or("")
                    ),
                };
            }
            Ok(Err(UpstreamFailure::Unsupported(m))) => return format!("unknown ({m})"),
            Ok(Err(UpstreamFailure::Protocol(m))) => return format!("unknown ({m})"),
            Ok(Err(UpstreamFailure::Unreachable(m))) => last = m,
        }
    }
    format!("unreachable ({last})")
}

/// Redis: `AUTH [user] password`, over TLS (chain and host name verified
/// against the system roots) for `rediss://`, plain TCP for `redis://`.
async fn verify_redis(url: &DbUrl, password: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warden_core::config::TlsMode;
    let where_ = url.upstream();
    let tls = if url.scheme.eq_ignore_ascii_case("rediss") {
        match warden_core::tls::client_config(TlsMode::VerifyFull, None, "scan --verify") {
            Ok(t) => t,
            Err(e) => return format!("not tried: {}", e.message),
        }
    } else {
        None
    };
    let attempt = async {
        let (mut s, _) = warden_core::connect::open(
            &url.host,
            url.port,
            tls.as_ref(),
            VERIFY_TIMEOUT,
            "the system roots",
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if !url.user.is_empty() {
            args.push(url.user.as_bytes());
        }
        args.push(password);
        let mut cmd = Zeroizing::new(format!("*{}\r\n", args.len()).into_bytes());
        for a in &args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
        s.write_all(&cmd).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed the connection".to_string());
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let reply = match tokio::time::timeout(VERIFY_TIMEOUT, attempt).await {
        Err(_) => {
            return format!(
                "unreachable ({where_}: no answer within {} s)",
                VERIFY_TIMEOUT.as_secs()
            )
        }
        Ok(Err(e)) => return format!("unreachable ({where_}: {e})"),
        Ok(Ok(r)) => r,
    };
    if reply.starts_with("+OK") {
        format!("live (login accepted by {where_})")
    } else if reply.starts_with("-WRONGPASS")
        || reply.starts_with("-ERR invalid")
        || reply.contains("AUTH")
    {
        format!("rejected (login refused by {where_})")
    } else {
        let first: String = reply
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        format!("unknown ({where_} answered {first})")
    }
}
