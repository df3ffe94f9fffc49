//! `cargo xtask bench --only scan`: the secret scanner beside `ripsecrets`
//! (crates.io, `cargo install`) and `detect-secrets` (PyPI, in a venv), both
//! installed by the bench under `<target>/bench-tools/`, in the same run:
//!
//! 1. Throughput and max RSS on a large real source tree (the cargo
//!    registry sources on this machine, or `$WARDEN_BENCH_SCAN_TREE`): warden
//!    and ripsecrets on the whole tree; all three on a subset of it (≥ 30 MB)
//!    because detect-secrets would take many minutes on the whole.
//! 2. `--git` on a generated repository with 10,000 commits (20 secrets added
//!    and later deleted): time, RSS, blobs, history-only secrets found.
//! 3. Recall per family and precision on a labelled corpus (planted secrets of
//!    every family, decoys that must not match, history-only secrets), the
//!    same three tools.
//!
//! warden runs as `scan_bench` (`scan/examples/scan_bench.rs`, release): the
//! engine and walk of `warden scan` without the CLI. Each tool is one child
//! process; wall time from spawn to exit, peak RSS from `/proc/PID/status`
//! (summed over its worker processes).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// A child's outcome: exit code, wall seconds, max RSS (KiB), stdout.
struct Measured {
    code: i32,
    secs: f64,
    max_rss_kib: i64,
    stdout: Vec<u8>,
}

/// Runs `c` to the end, stdout to a file (then read back), measuring wall
/// time and peak RSS: `VmHWM` in `/proc/PID/status` (a high-water mark, so
/// polling every 5 ms loses at most the growth of the last milliseconds) of
/// the child and of its own children (detect-secrets scans in a pool of
/// worker processes), summed — no unsafe `wait4`.
fn measure(c: &mut Command, out_file: &Path) -> Result<Measured> {
    let out = std::fs::File::create(out_file)?;
    c.stdout(out).stderr(Stdio::null()).stdin(Stdio::null());
    let start = Instant::now();
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot start {}", cmd::display(c)))?;
    let mut peaks: std::collections::BTreeMap<u32, i64> = std::collections::BTreeMap::new();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        let mut pids = vec![child.id()];
        if let Ok(list) =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        {
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        for pid in pids {
            if let Some(kib) = hwm_kib(pid) {
                let e = peaks.entry(pid).or_insert(0);
                *e = (*e).max(kib);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let secs = start.elapsed().as_secs_f64();
    Ok(Measured {
        code: status.code().unwrap_or(-1),
        secs,
        max_rss_kib: peaks.values().sum(),
        stdout: std::fs::read(out_file)?,
    })
}

fn hwm_kib(pid: u32) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn tools_dir(repo: &Path) -> PathBuf {
    cmd::target_dir(repo).join("bench-tools")
}

/// `ripsecrets`, installed with `cargo install` under the tools dir if missing.
fn ripsecrets(repo: &Path) -> Result<PathBuf> {
    let dir = tools_dir(repo);
    let bin = dir.join("bin/ripsecrets");
    if !bin.exists() {
        println!("  installing ripsecrets (cargo install --locked ripsecrets)");
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.args(["install", "--locked", "--quiet", "ripsecrets", "--root"])
            .arg(&dir)
            .env("CARGO_TARGET_DIR", dir.join("build"));
        cmd::run(&mut c)?;
    }
    Ok(bin)
}

/// `detect-secrets` from PyPI in a venv under the tools dir, if missing.
fn detect_secrets(repo: &Path) -> Result<PathBuf> {
    let venv = tools_dir(repo).join("venv");
    let bin = venv.join("bin/detect-secrets");
    if !bin.exists() {
        println!("  installing detect-secrets (pip, in a venv)");
        cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("python3 -m venv (Debian package python3-venv)")?;
        cmd::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "detect-secrets",
        ]))?;
    }
    Ok(bin)
}

/// The release `scan_bench` example.
fn warden_engine(repo: &Path) -> Result<PathBuf> {
    cmd::run(cmd::cargo(repo).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "warden-scan",
        "--example",
        "scan_bench",
    ]))?;
    Ok(cmd::target_dir(repo).join("release/examples/scan_bench"))
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            total += tree_bytes(&e.path());
        } else if ft.is_file() {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub fn run(repo: &Path) -> Result<()> {
    let engine = warden_engine(repo)?;
    let rip = ripsecrets(repo)?;
    let ds = detect_secrets(repo)?;
    let work = tools_dir(repo).join("scan-bench");
    std::fs::create_dir_all(&work)?;
    let mut report = String::new();

    // 1. Throughput.
    let tree = match std::env::var_os("WARDEN_BENCH_SCAN_TREE") {
        Some(t) => PathBuf::from(t),
        None => {
            let home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
                .context("neither CARGO_HOME nor HOME is set")?;
            let src = home.join("registry/src");
            // One index directory holds the crates.
            std::fs::read_dir(&src)
                .with_context(|| format!("{}: set WARDEN_BENCH_SCAN_TREE", src.display()))?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.is_dir())
                .with_context(|| format!("{} is empty", src.display()))?
        }
    };
    let total = tree_bytes(&tree);
    // The subset: whole crate directories, in name order, up to 30 MB.
    let mut crates: Vec<PathBuf> = std::fs::read_dir(&tree)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    crates.sort();
    let mut subset = Vec::new();
    let mut subset_bytes = 0;
    for c in &crates {
        if subset_bytes >= 30_000_000 {
            break;
        }
        subset_bytes += tree_bytes(c);
        subset.push(c.file_name().map(PathBuf::from).unwrap_or_default());
    }
    println!(
        "  tree {} ({:.0} MB, {} crates); subset: {} crates, {:.1} MB",
        tree.display(),
        mb(total),
        crates.len(),
        subset.len(),
        mb(subset_bytes)
    );
    // Warm the page cache so the first tool does not pay for the disk.
    let _ = measure(
        Command::new(&engine).arg("scan").arg(&tree),
        &work.join("warm.json"),
    )?;
    let out = work.join("out");
    let mut rows: Vec<(String, String, f64, i64)> = Vec::new();
    let w_full = measure(Command::new(&engine).arg("scan").arg(&tree), &out)?;
    check_exit("warden", &w_full, &[0, 1])?;
    rows.push((
        "warden scan".into(),
        "whole tree".into(),
        w_full.secs,
        w_full.max_rss_kib,
    ));
    let r_full = measure(Command::new(&rip).arg(&tree), &out)?;
    check_exit("ripsecrets", &r_full, &[0, 1])?;
    rows.push((
        "ripsecrets".into(),
        "whole tree".into(),
        r_full.secs,
        r_full.max_rss_kib,
    ));
    let w_sub = measure(
        Command::new(&engine)
            .arg("scan")
            .args(&subset)
            .current_dir(&tree),
        &out,
    )?;
    check_exit("warden", &w_sub, &[0, 1])?;
    rows.push((
        "warden scan".into(),
        "subset".into(),
        w_sub.secs,
        w_sub.max_rss_kib,
    ));
    let r_sub = measure(Command::new(&rip).args(&subset).current_dir(&tree), &out)?;
    check_exit("ripsecrets", &r_sub, &[0, 1])?;
    rows.push((
        "ripsecrets".into(),
        "subset".into(),
        r_sub.secs,
        r_sub.max_rss_kib,
    ));
    // detect-secrets scans nothing outside the current directory: run it there.
    let d_sub = measure(
        Command::new(&ds)
            .args(["scan", "--all-files"])
            .args(&subset)
            .current_dir(&tree),
        &out,
    )?;
    check_exit("detect-secrets", &d_sub, &[0])?;
    rows.push((
        "detect-secrets".into(),
        "subset".into(),
        d_sub.secs,
        d_sub.max_rss_kib,
    ));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        report,
        "\nThroughput ({cores} cores; whole tree {:.0} MB, subset {:.1} MB; MB/s = tree bytes / wall time):\n",
        mb(total),
        mb(subset_bytes)
    );
    let _ = writeln!(report, "| tool | input | wall s | MB/s | max RSS MiB |");
    let _ = writeln!(report, "|---|---|---:|---:|---:|");
    for (tool, input, secs, rss) in &rows {
        let bytes = if input == "subset" {
            subset_bytes
        } else {
            total
        };
        let _ = writeln!(
            report,
            "| {tool} | {input} | {secs:.2} | {:.1} | {:.0} |",
            mb(bytes) / secs,
            *rss as f64 / 1024.0
        );
    }
    let _ = writeln!(
        report,
        "\nwarden / ripsecrets (whole tree): {:.1}×; warden / detect-secrets (subset): {:.0}×",
        r_full.secs / w_full.secs,
        d_sub.secs / w_sub.secs
    );

    // 2. --git on 10,000 commits.
    let history = work.join("history-10k");
    if !history.join(".git").exists() {
        println!("  building a repository with 10,000 commits (git fast-import)");
        make_history_repo(&history, 10_000)?;
    }
    let g = measure(Command::new(&engine).arg("git").arg(&history), &out)?;
    check_exit("warden --git", &g, &[0, 1])?;
    let v: serde_json::Value = serde_json::from_slice(&g.stdout)?;
    let hist_found = v["findings"]
        .as_array()
        .map(|a| a.iter().filter(|f| f["commit"].is_string()).count())
        .unwrap_or(0);
    let _ = writeln!(
        report,
        "\n`--git` on 10,000 commits: {:.2} s wall, {} blobs scanned, max RSS {:.0} MiB, {hist_found} of 20 history-only secrets found with their commit (ripsecrets and detect-secrets do not read history).",
        g.secs,
        v["stats"]["git_blobs_scanned"],
        g.max_rss_kib as f64 / 1024.0
    );

    // 3. Recall and precision on the labelled corpus.
    let corpus = work.join("corpus");
    let _ = std::fs::remove_dir_all(&corpus);
    let labels = corpus::build(&corpus)?;
    let w = measure(
        Command::new(&engine)
            .args(["git", "."])
            .current_dir(&corpus),
        &out,
    )?;
    check_exit("warden", &w, &[0, 1])?;
    let wv: serde_json::Value = serde_json::from_slice(&w.stdout)?;
    let mut warden_hits = BTreeSet::new();
    let mut warden_hist = BTreeSet::new();
    for f in wv["findings"].as_array().into_iter().flatten() {
        let path = norm(f["path"].as_str().unwrap_or(""));
        let line = f["line"].as_u64().unwrap_or(0) as usize;
        if f["commit"].is_string() {
            warden_hist.insert(path);
        } else {
            warden_hits.insert((path, line));
        }
    }
    let r = measure(Command::new(&rip).arg(".").current_dir(&corpus), &out)?;
    check_exit("ripsecrets", &r, &[0, 1])?;
    let rip_hits: BTreeSet<(String, usize)> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let p = it.next()?;
            let n = it.next()?.parse().ok()?;
            Some((norm(p), n))
        })
        .collect();
    let d = measure(
        Command::new(&ds)
            .args(["scan", "--all-files", "."])
            .current_dir(&corpus),
        &out,
    )?;
    check_exit("detect-secrets", &d, &[0])?;
    let dv: serde_json::Value = serde_json::from_slice(&d.stdout)?;
    let mut ds_hits = BTreeSet::new();
    if let Some(m) = dv["results"].as_object() {
        for (file, list) in m {
            for f in list.as_array().into_iter().flatten() {
                let n = f["line_number"].as_u64().unwrap_or(0) as usize;
                ds_hits.insert((norm(file), n));
            }
        }
    }
    let tools = [
        ("warden", &warden_hits),
        ("ripsecrets", &rip_hits),
        ("detect-secrets", &ds_hits),
    ];
    let families: BTreeSet<&str> = labels.planted.iter().map(|p| p.family).collect();
    let _ = writeln!(
        report,
        "\nLabelled corpus: {} planted secrets in {} families, {} decoy files, {} history-only secrets. Recall per family (found / planted):\n",
        labels.planted.len(),
        families.len(),
        labels.decoys,
        labels.history.len()
    );
    let _ = writeln!(
        report,
        "| family | planted | warden | ripsecrets | detect-secrets |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|---:|");
    let found = |hits: &BTreeSet<(String, usize)>, p: &corpus::Planted| {
        (p.first_line..=p.last_line).any(|l| hits.contains(&(p.path.clone(), l)))
    };
    let mut totals = [0usize; 3];
    for fam in &families {
        let ps: Vec<&corpus::Planted> =
            labels.planted.iter().filter(|p| p.family == *fam).collect();
        let mut cells = Vec::new();
        for (i, (_, hits)) in tools.iter().enumerate() {
            let n = ps.iter().filter(|p| found(hits, p)).count();
            totals[i] += n;
            cells.push(format!(
                "{n}/{} ({:.0}%)",
                ps.len(),
                100.0 * n as f64 / ps.len() as f64
            ));
        }
        let _ = writeln!(report, "| {fam} | {} | {} |", ps.len(), cells.join(" | "));
    }
    let n = labels.planted.len();
    let _ = writeln!(
        report,
        "| **all** | {n} | {} |",
        totals
            .iter()
            .map(|t| format!("{t}/{n} ({:.1}%)", 100.0 * *t as f64 / n as f64))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    // Precision: a reported line is right when it is inside a planted secret.
    let mut prec = Vec::new();
    for (_, hits) in &tools {
        let right = hits
            .iter()
            .filter(|(p, l)| {
                labels
                    .planted
                    .iter()
                    .any(|x| &x.path == p && (x.first_line..=x.last_line).contains(l))
            })
            .count();
        let pct = if hits.is_empty() {
            0.0
        } else {
            100.0 * right as f64 / hits.len() as f64
        };
        prec.push(format!("{right}/{} ({pct:.1}%)", hits.len()));
    }
    let _ = writeln!(
        report,
        "| **precision** (right / reported lines) | | {} |",
        prec.join(" | ")
    );
    let hist_ok = labels
        .history
        .iter()
        .filter(|p| warden_hist.contains(*p))
        .count();
    let _ = writeln!(
        report,
        "| **history-only** (found with commit) | {} | {hist_ok}/{} | not read | not read |",
        labels.history.len(),
        labels.history.len()
    );
    println!("{report}");
    let saved = work.join("report.md");
    std::fs::write(&saved, &report)?;
    println!("  (saved to {})", saved.display());
    Ok(())
}

fn check_exit(tool: &str, m: &Measured, ok: &[i32]) -> Result<()> {
    if ok.contains(&m.code) {
        Ok(())
    } else {
        bail!("{tool} exited with {}", m.code)
    }
}

fn norm(p: &str) -> String {
    p.strip_prefix("./").unwrap_or(p).to_string()
}

/// A repository with `commits` commits made by `git fast-import`: 100
/// source files edited in turn; 20 secrets each added in one commit and
/// deleted a few commits later.
fn make_history_repo(dir: &Path, commits: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let git = |args: &[&str]| -> Result<()> {
        cmd::run(Command::new("git").arg("-C").arg(dir).args(args))
    };
    git(&["init", "-q", "-b", "main"])?;
    let mut stream = Vec::new();
    let mut files: Vec<String> = (0..100)
        .map(|i| format!("// module {i}\npub fn f{i}() -> u32 {{ {i} }}\n"))
        .collect();
    let mut secret_live: Option<(usize, usize)> = None; // (secret index, commit added)
    let mut next_secret = 0;
    let mut present = false;
    for c in 0..commits {
        let f = c % 100;
        let _ = writeln!(
            files[f],
            "pub fn g{c}(x: u32) -> u32 {{ x.wrapping_mul({}) }}",
            c * 7 + 1
        );
        let mut extra: Option<String> = None;
        match secret_live {
            None if c % 500 == 250 && next_secret < 20 => {
                extra = Some(format!(
                    "GITHUB_TOKEN=ghp_{}\n",
                    corpus::rnd(corpus::AN, 36, 5000 + next_secret as u64)
                ));
                secret_live = Some((next_secret, c));
                next_secret += 1;
            }
            Some((_, at)) if c >= at + 3 => secret_live = None,
            Some((i, _)) => {
                extra = Some(format!(
                    "GITHUB_TOKEN=ghp_{}\n",
                    corpus::rnd(corpus::AN, 36, 5000 + i as u64)
                ));
            }
            None => {}
        }
        let _ = writeln!(stream, "commit refs/heads/main");
        let _ = writeln!(
            stream,
            "committer bench <bench@example.org> {} +0000",
            1_700_000_000 + c
        );
        let msg = format!("change {c}");
        let _ = writeln!(stream, "data {}\n{msg}", msg.len());
        let _ = writeln!(stream, "M 644 inline src/m{f}.rs\ndata {}", files[f].len());
        stream.extend_from_slice(files[f].as_bytes());
        let _ = writeln!(stream);
        match &extra {
            Some(e) => {
                let _ = writeln!(stream, "M 644 inline deploy/ci.env\ndata {}", e.len());
                stream.extend_from_slice(e.as_bytes());
                let _ = writeln!(stream);
            }
            None if present => {
                let _ = writeln!(stream, "D deploy/ci.env");
            }
            None => {}
        }
        present = extra.is_some();
        let _ = writeln!(stream);
    }
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("fast-import stdin")?
        .write_all(&stream)?;
    if !child.wait()?.success() {
        bail!("git fast-import failed");
    }
    git(&["checkout", "-q", "-f", "main"])
}

/// The labelled corpus: real-looking files with one planted secret each,
/// decoys, and a git history holding secrets that were deleted.
mod corpus {
    use super::*;

    pub const AN: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const HEX: &str = "0123456789abcdef";
    const UP: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

    /// A fixed pseudo-random string (so no real-looking secret is in the source).
    pub fn rnd(alphabet: &str, n: usize, seed: u64) -> String {
        let a: Vec<char> = alphabet.chars().collect();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                a[(x % a.len() as u64) as usize]
            })
            .collect()
    }

    pub struct Planted {
        pub family: &'static str,
        pub path: String,
        pub first_line: usize,
        pub last_line: usize,
    }

    pub struct Labels {
        pub planted: Vec<Planted>,
        pub decoys: usize,
        pub history: Vec<String>,
    }

    /// One secret of `family` from seed `s`: (secret text, the way it is written).
    fn secret(family: &str, s: u64) -> String {
        match family {
            "aws" => format!("AKIA{}", rnd(UP, 16, s)),
            "github" => format!("ghp_{}", rnd(AN, 36, s)),
            "gitlab" => format!("glpat-{}", rnd(AN, 20, s)),
            "slack" => format!(
                "xoxb-{}-{}-{}",
                1_000_000_000 + s,
                1_000_000_000_000 + s,
                rnd(AN, 24, s)
            ),
            "stripe" => format!("sk_live_{}", rnd(AN, 24, s)),
            "sendgrid" => format!("SG.{}.{}", rnd(AN, 22, s), rnd(AN, 43, s + 1)),
            "openai" => format!("sk-proj-{}", rnd(AN, 48, s)),
            "npm" => format!("npm_{}", rnd(AN, 36, s)),
            "pypi" => format!("pypi-AgEIcHlwaS5vcmc{}", rnd(AN, 60, s)),
            "jwt" => format!(
                "eyJ{}.eyJ{}.{}",
                rnd(AN, 20, s),
                rnd(AN, 30, s + 1),
                rnd(AN, 43, s + 2)
            ),
            "twilio" => rnd(HEX, 32, s),
            _ => rnd(AN, 20, s),
        }
    }

    /// (family, file name, text) with the secret in it, and the text's
    /// planted line range. Several contexts per family: env files, code,
    /// YAML, JSON, fallbacks.
    fn samples() -> Vec<(&'static str, String, String)> {
        let mut v: Vec<(&'static str, String, String)> = Vec::new();
        let token_families = [
            ("aws", "AWS_ACCESS_KEY_ID"),
            ("github", "GITHUB_TOKEN"),
            ("gitlab", "GITLAB_TOKEN"),
            ("slack", "SLACK_BOT_TOKEN"),
            ("stripe", "STRIPE_KEY"),
            ("sendgrid", "SENDGRID_API_KEY"),
            ("openai", "OPENAI_API_KEY"),
            ("npm", "NPM_TOKEN"),
            ("jwt", "SESSION"),
        ];
        for (i, (fam, var)) in token_families.iter().enumerate() {
            for k in 0..6u64 {
                let s = secret(fam, 100 * i as u64 + k * 7 + 1);
                let (name, text) = match k {
                    0 => (format!(".env.{fam}"), format!("# settings\n{var}={s}\n")),
                    1 => (format!("src/{fam}_client.py"), format!("import os\n\n{} = os.environ.get(\"{var}\", \"{s}\")\n", var.to_lowercase())),
                    2 => (format!("web/{fam}.js"), format!("const key = process.env.{var} || '{s}';\nmodule.exports = key;\n")),
                    3 => (format!("deploy/{fam}.yml"), format!("env:\n  - name: {var}\n    value: \"{s}\"\n")),
                    4 => (format!("config/{fam}.json"), format!("{{\n  \"{}\": \"{s}\"\n}}\n", var.to_lowercase())),
                    _ => (format!("scripts/{fam}.sh"), format!("#!/bin/sh\nexport {var}={s}\ncurl -H \"X: $TOKEN\" https://api.internal/\n")),
                };
                v.push((fam, name, text));
            }
        }
        for k in 0..4u64 {
            let id = secret("aws", 900 + k);
            let sec = rnd(B64, 40, 950 + k);
            v.push((
                "aws",
                format!("aws/credentials{k}"),
                format!("[default]\naws_access_key_id = {id}\naws_secret_access_key = {sec}\n"),
            ));
        }
        for k in 0..4u64 {
            let s = rnd(HEX, 32, 1000 + k);
            v.push((
                "twilio",
                format!("sms/twilio{k}.py"),
                format!("TWILIO_AUTH_TOKEN = \"{s}\"\n"),
            ));
        }
        for k in 0..4u64 {
            let s = secret("pypi", 1100 + k);
            v.push((
                "pypi",
                format!("pypirc/.pypirc{k}"),
                format!("[pypi]\nusername = __token__\npassword = {s}\n"),
            ));
        }
        for k in 0..6u64 {
            let pw = rnd(AN, 16, 1200 + k);
            let (name, text) = match k {
                0 => ("db/.env".to_string(), format!("DATABASE_URL=postgres://app:{pw}@db.internal:5432/app\n")),
                1 => ("db/settings.py".into(), format!("REDIS = \"redis://:{pw}@cache:6379/0\"\n")),
                2 => ("db/app.properties".into(), format!("spring.datasource.url=jdbc:postgresql://db:5432/app?user=app&password={pw}\n")),
                3 => ("db/dsn.txt".into(), format!("host=db port=5432 dbname=app user=app password={pw}\n")),
                4 => ("db/mysql.yml".into(), format!("url: mysql://root:{pw}@mysql:3306/shop\n")),
                _ => ("db/run.sh".into(), format!("redis-server --requirepass {pw}\n")),
            };
            v.push(("database", name, text));
        }
        for k in 0..4u64 {
            let body: Vec<String> = (0..6).map(|i| rnd(B64, 64, 1300 + k * 10 + i)).collect();
            let kind = [
                "RSA PRIVATE KEY",
                "OPENSSH PRIVATE KEY",
                "PRIVATE KEY",
                "ENCRYPTED PRIVATE KEY",
            ][k as usize];
            v.push((
                "private-key",
                format!("keys/key{k}.pem"),
                format!(
                    "-----BEGIN {kind}-----\n{}\n-----END {kind}-----\n",
                    body.join("\n")
                ),
            ));
        }
        for k in 0..6u64 {
            let s = rnd(AN, 24, 1400 + k);
            let (name, text) = match k {
                0 => (
                    "cfg/.env.production".to_string(),
                    format!("DB_PASSWORD={s}\n"),
                ),
                1 => (
                    "cfg/app.yaml".into(),
                    format!("auth:\n  client_secret: {s}\n"),
                ),
                2 => ("cfg/app.toml".into(), format!("[api]\napi_key = \"{s}\"\n")),
                3 => (
                    "cfg/app.json".into(),
                    format!("{{\"password\": \"{s}\"}}\n"),
                ),
                4 => (
                    "cfg/app.properties".into(),
                    format!("mail.smtp.password={s}\n"),
                ),
                _ => ("cfg/settings.py".into(), format!("SECRET_KEY = '{s}'\n")),
            };
            v.push(("assignment", name, text));
        }
        v
    }

    /// Files that hold nothing secret but look like it.
    fn decoys() -> Vec<(String, String)> {
        let mut v = Vec::new();
        for k in 0..5u64 {
            v.push((
                format!("decoy/ids{k}.json"),
                format!(
                    "{{\"id\": \"{}-{}-4{}-a{}-{}\"}}\n",
                    rnd(HEX, 8, k),
                    rnd(HEX, 4, k + 1),
                    rnd(HEX, 3, k + 2),
                    rnd(HEX, 3, k + 3),
                    rnd(HEX, 12, k + 4)
                ),
            ));
            v.push((
                format!("decoy/Cargo{k}.lock"),
                format!(
                    "[[package]]\nname = \"a{k}\"\nchecksum = \"{}\"\n",
                    rnd(HEX, 64, 20 + k)
                ),
            ));
            v.push((format!("decoy/yarn{k}.lock"), format!("resolved \"https://registry.yarnpkg.com/a/-/a-1.0.{k}.tgz#{}\"\nintegrity sha512-{}==\n", rnd(HEX, 40, 30 + k), rnd(B64, 86, 40 + k))));
            v.push((
                format!("decoy/logo{k}.html"),
                format!(
                    "<img src=\"data:image/png;base64,{}\">\n",
                    rnd(B64, 3000, 50 + k)
                ),
            ));
            v.push((format!("decoy/example{k}.env"), "DB_PASSWORD=changeme\nAPI_TOKEN=<token>\nDATABASE_URL=postgres://u:${DB_PASS}@h/db\nSECRET_KEY={{ secret_key }}\n".to_string()));
            v.push((format!("decoy/docs{k}.md"), "Use `aws_access_key_id = AKIAIOSFODNN7EXAMPLE` and token xxxxxxxxxxxxxxxxxxxx.\npassword: your_password_here\n".to_string()));
            v.push((format!("decoy/code{k}.py"), format!("commit = \"{}\"\npassword = os.environ[\"DB_PASSWORD\"]\ntoken = get_token()\n", rnd(HEX, 40, 60 + k))));
            v.push((format!("decoy/pub{k}.pem"), "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n".to_string()));
        }
        v
    }

    pub fn build(dir: &Path) -> Result<Labels> {
        std::fs::create_dir_all(dir)?;
        let write = |name: &str, text: &str| -> Result<()> {
            let p = dir.join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&p, text)?;
            Ok(())
        };
        let mut planted = Vec::new();
        for (family, name, text) in samples() {
            write(&name, &text)?;
            // The planted range: every non-comment line but a shebang.
            let lines: Vec<&str> = text.lines().collect();
            let first = lines
                .iter()
                .position(|l| !l.starts_with('#') && !l.is_empty() && !l.starts_with("import "))
                .unwrap_or(0)
                + 1;
            planted.push(Planted {
                family,
                path: name,
                first_line: first,
                last_line: lines.len(),
            });
        }
        let decoys = decoys();
        for (name, text) in &decoys {
            write(name, text)?;
        }
        // History: secrets added, then deleted.
        let git = |args: &[&str]| -> Result<()> {
            cmd::run(
                Command::new("git")
                    .arg("-C")
                    .arg(dir)
                    .args([
                        "-c",
                        "user.name=bench",
                        "-c",
                        "user.email=bench@example.org",
                        "-c",
                        "commit.gpgsign=false",
                    ])
                    .args(args),
            )
        };
        git(&["init", "-q", "-b", "main"])?;
        git(&["add", "-A"])?;
        git(&["commit", "-qm", "tree"])?;
        let mut history = Vec::new();
        for k in 0..5u64 {
            let name = format!("old/deploy{k}.sh");
            write(
                &name,
                &format!("export GITLAB_TOKEN=glpat-{}\n", rnd(AN, 20, 1500 + k)),
            )?;
            git(&["add", &name])?;
            git(&["commit", "-qm", "add deploy script"])?;
            git(&["rm", "-q", &name])?;
            git(&["commit", "-qm", "remove deploy script"])?;
            history.push(name);
        }
        Ok(Labels {
            planted,
            decoys: decoys.len(),
            history,
        })
    }
}
