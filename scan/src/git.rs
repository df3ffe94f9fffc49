//! `--git`: every blob reachable from any ref, read through the `git` CLI
//! (`git rev-list --all --objects`, `git cat-file --batch`). Each blob is
//! attributed to the oldest commit that introduced it (`git log --raw`), so
//! a finding in history names its commit, author date and path.

use crate::{looks_binary, Finding, ScanError, ScanResult, Scanner, Stats, MAX_FILE_BYTES};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

fn git(repo: &Path, args: &[&str]) -> Result<String, ScanError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| ScanError::Git(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(ScanError::Git(format!(
            "git {} in {}: {}",
            args.first().unwrap_or(&""),
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Origin {
    commit: String,
    date: String,
    path: String,
}

/// Scan every blob in `repo`'s history. Findings carry `commit` and
/// `author_date`; the same value at the same path is reported once (at the
/// oldest commit that has it).
pub fn scan_history(scanner: &Scanner, repo: &Path) -> Result<ScanResult, ScanError> {
    scan_history_with_progress(scanner, repo, None)
}

/// [`scan_history`], counting blobs read (and their bytes) into `progress`.
pub fn scan_history_with_progress(
    scanner: &Scanner,
    repo: &Path,
    progress: Option<&crate::walk::Progress>,
) -> Result<ScanResult, ScanError> {
    use std::sync::atomic::Ordering;
    git(repo, &["rev-parse", "--git-dir"])?;
    // blob → the oldest commit that added or changed a path to it.
    let log = git(
        repo,
        &[
            "log",
            "--all",
            "--root",
            "-m",
            "--raw",
            "--no-abbrev",
            "--no-renames",
            "--format=%x00%H %aI",
        ],
    )?;
    let mut origin: HashMap<String, Origin> = HashMap::new();
    let (mut commit, mut date) = (String::new(), String::new());
    for line in log.lines() {
        if let Some(h) = line.strip_prefix('\0') {
            let mut it = h.splitn(2, ' ');
            commit = it.next().unwrap_or_default().to_string();
            date = it.next().unwrap_or_default().to_string();
        } else if let Some(raw) = line.strip_prefix(':') {
            let Some((meta, path)) = raw.split_once('\t') else {
                continue;
            };
            let f: Vec<&str> = meta.split(' ').collect();
            if f.len() < 5 || f[4].starts_with('D') {
                continue;
            }
            // The log runs newest first: the last write is the oldest commit.
            origin.insert(
                f[3].to_string(),
                Origin {
                    commit: commit.clone(),
                    date: date.clone(),
                    path: path.to_string(),
                },
            );
        }
    }
    let objects = git(
        repo,
        &[
            "rev-list",
            "--all",
            "--objects",
            "--filter=object:type=blob",
        ],
    )?;
    let mut blobs: Vec<(String, String)> = Vec::new();
    let mut seen = HashSet::new();
    for line in objects.lines() {
        let (sha, path) = line.split_once(' ').unwrap_or((line, ""));
        if !path.is_empty() && seen.insert(sha.to_string()) {
            blobs.push((sha.to_string(), path.to_string()));
        }
    }
    if let Some(p) = progress {
        p.files_total.store(blobs.len() as u64, Ordering::Relaxed);
        p.walk_done.store(true, Ordering::Relaxed);
    }

    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| ScanError::Git(format!("cannot run git cat-file: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ScanError::Git("no stdin".into()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ScanError::Git("no stdout".into()))?;
    let shas: Vec<String> = blobs.iter().map(|(s, _)| s.clone()).collect();
    let writer = std::thread::spawn(move || {
        for s in shas {
            if writeln!(stdin, "{s}").is_err() {
                break;
            }
        }
    });

    let display_root = repo.display().to_string();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(threads * 4);
    let rx = std::sync::Mutex::new(rx);
    let mut stats = Stats::default();
    let mut findings: Vec<Finding> = std::thread::scope(|s| -> Result<Vec<Finding>, ScanError> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    let mut st = Stats::default();
                    loop {
                        let next = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => break,
                        };
                        let Ok((i, data)) = next else { break };
                        let (sha, rev_path) = &blobs[i];
                        let o = origin.get(sha);
                        let path = o.map_or(rev_path.as_str(), |o| o.path.as_str());
                        if crate::walk::is_vendored_path(path) {
                            st.skipped_vendored += 1;
                            continue;
                        }
                        let shown = format!("{display_root}/{path}");
                        if scanner.rules.allow.path(&shown) {
                            st.skipped_allowlisted += 1;
                            continue;
                        }
                        st.git_blobs_scanned += 1;
                        st.bytes_scanned += data.len() as u64;
                        let text = String::from_utf8_lossy(&data);
                        for mut f in scanner.scan_text(&shown, &text, &mut st) {
                            f.commit = o.map(|o| o.commit.clone());
                            f.author_date = o.map(|o| o.date.clone());
                            out.push(f);
                        }
                    }
                    (out, st)
                })
            })
            .collect();
        let mut reader = BufReader::new(stdout);
        let mut header = String::new();
        for i in 0..blobs.len() {
            header.clear();
            if reader
                .read_line(&mut header)
                .map_err(|e| ScanError::Git(e.to_string()))?
                == 0
            {
                break;
            }
            let parts: Vec<&str> = header.split_whitespace().collect();
            if parts.get(1) == Some(&"missing") {
                continue;
            }
            let size: u64 = parts.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut data = Vec::new();
            (&mut reader)
                .take(size + 1)
                .read_to_end(&mut data)
                .map_err(|e| ScanError::Git(e.to_string()))?;
            data.truncate(size as usize);
            if let Some(p) = progress {
                p.files_done.fetch_add(1, Ordering::Relaxed);
                p.bytes_done.fetch_add(size, Ordering::Relaxed);
            }
            if size > MAX_FILE_BYTES {
                stats.skipped_large += 1;
            } else if looks_binary(&data) {
                stats.skipped_binary += 1;
            } else if tx.send((i, data)).is_err() {
                break;
            }
        }
        drop(tx);
        let mut all = Vec::new();
        for w in workers {
            if let Ok((f, st)) = w.join() {
                all.extend(f);
                stats.add(&st);
            }
        }
        Ok(all)
    })?;
    let _ = writer.join();
    let _ = child.wait();
    // The same value at the same path in many blob versions: report the oldest.
    findings.sort_by(|a, b| {
        (&a.path, &a.fingerprint, &a.author_date).cmp(&(&b.path, &b.fingerprint, &b.author_date))
    });
    let mut seen = HashSet::new();
    findings.retain(|f| seen.insert((f.path.clone(), f.fingerprint.clone())));
    Ok(ScanResult { findings, stats })
}

/// Keep only history findings whose value is not in the working tree's
/// findings: those are reported once, as current.
pub fn history_only(history: ScanResult, current: &[Finding]) -> ScanResult {
    let now: HashSet<&str> = current.iter().map(|f| f.fingerprint.as_str()).collect();
    ScanResult {
        findings: history
            .findings
            .into_iter()
            .filter(|f| !now.contains(f.fingerprint.as_str()))
            .collect(),
        stats: history.stats,
    }
}
