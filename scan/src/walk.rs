//! Walking the file system. Every file is read, hidden ones included
//! (`.env`, `.npmrc`, `.github/`): `.gitignore` is not obeyed, because
//! ignored files are where secrets sit. The `.git` directory itself is not
//! walked (`--git` reads history through `git`). Skipped, with a count:
//! binary files (a NUL in the first 8 KiB), files over 10 MB, minified
//! and vendored paths, allowlisted paths. Files are scanned on all cores.

use crate::{looks_binary, Finding, ScanError, ScanResult, Scanner, Stats, MAX_FILE_BYTES};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Counters a scan updates as it goes, for a progress display on another
/// thread: files found by the walk, files done, bytes scanned.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// Summed over the scanning threads (each adds what it scanned).
    pub bytes_done: AtomicU64,
    /// Set once the walk has listed every file (totals are final).
    pub walk_done: AtomicBool,
}

/// Directory names whose contents are third-party code.
pub const VENDORED_DIRS: &[&str] = &[
    "node_modules",
    "bower_components",
    "vendor",
    "third_party",
    "site-packages",
    ".venv",
];

/// Whether a file name is minified or generated output.
pub fn is_minified(name: &str) -> bool {
    name.ends_with(".min.js")
        || name.ends_with(".min.css")
        || name.ends_with(".min.mjs")
        || name.ends_with(".js.map")
        || name.ends_with(".css.map")
}

/// Whether a relative path is vendored or minified (used for git blobs).
pub fn is_vendored_path(path: &str) -> bool {
    let mut parts = path.split('/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return is_minified(part);
        }
        if VENDORED_DIRS.contains(&part) {
            return true;
        }
    }
    false
}

/// How the walk chooses files.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkOptions {
    /// Leave out what git ignores (`.gitignore`, `.git/info/exclude`, the
    /// global excludes file), as `git check-ignore` decides; every directory
    /// PATH must then be inside a git work tree. Off by default: ignored
    /// files (`.env`, local configs) are where secrets sit.
    pub respect_gitignore: bool,
}

pub fn scan_paths(
    scanner: &Scanner,
    roots: &[PathBuf],
    progress: Option<&Progress>,
    opts: WalkOptions,
) -> Result<ScanResult, ScanError> {
    let mut files = Vec::new();
    let mut stats = Stats::default();
    for root in roots {
        let meta = std::fs::metadata(root).map_err(|e| ScanError::Io {
            path: root.display().to_string(),
            message: e.to_string(),
        })?;
        if meta.is_dir() {
            let first = files.len();
            collect(scanner, root, &mut files, &mut stats);
            if opts.respect_gitignore {
                let ignored = git_ignored(root, &files[first..])?;
                stats.skipped_gitignored += ignored.len() as u64;
                let mut i = first;
                files.retain(|_| {
                    i += 1;
                    i <= first || !ignored.contains(&(i - 1 - first))
                });
            }
        } else {
            files.push(root.clone());
        }
    }
    if let Some(p) = progress {
        p.files_total.store(files.len() as u64, Ordering::Relaxed);
        p.walk_done.store(true, Ordering::Relaxed);
    }
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: Vec<(Vec<Finding>, Stats)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(files.len()).max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut found = Vec::new();
                    let mut st = Stats::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = files.get(i) else { break };
                        let before = st.bytes_scanned;
                        scan_file(scanner, path, &mut found, &mut st);
                        if let Some(p) = progress {
                            p.files_done.fetch_add(1, Ordering::Relaxed);
                            p.bytes_done
                                .fetch_add(st.bytes_scanned - before, Ordering::Relaxed);
                        }
                    }
                    (found, st)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut findings = Vec::new();
    for (f, st) in results {
        findings.extend(f);
        stats.add(&st);
    }
    findings.sort_by(|a, b| (&a.path, a.line, a.column).cmp(&(&b.path, b.line, b.column)));
    Ok(ScanResult { findings, stats })
}

fn collect(scanner: &Scanner, dir: &Path, out: &mut Vec<PathBuf>, stats: &mut Stats) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        stats.unreadable += 1;
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if ft.is_dir() {
            if name == ".git" {
                continue;
            }
            if VENDORED_DIRS.contains(&name.as_ref()) {
                stats.skipped_vendored += 1;
                continue;
            }
            collect(scanner, &path, out, stats);
        } else if ft.is_file() {
            // Symbolic links are not followed: their targets are scanned
            // where they live, if under a scanned root.
            if is_minified(&name) {
                stats.skipped_vendored += 1;
            } else if scanner.rules.allow.path(&path.to_string_lossy()) {
                stats.skipped_allowlisted += 1;
            } else {
                out.push(path);
            }
        }
    }
}

fn scan_file(scanner: &Scanner, path: &Path, found: &mut Vec<Finding>, st: &mut Stats) {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            st.skipped_large += 1;
            return;
        }
        Ok(_) => {}
        Err(_) => {
            st.unreadable += 1;
            return;
        }
    }
    let Ok(data) = std::fs::read(path) else {
        st.unreadable += 1;
        return;
    };
    if looks_binary(&data) {
        st.skipped_binary += 1;
        return;
    }
    st.files_scanned += 1;
    st.bytes_scanned += data.len() as u64;
    let text = String::from_utf8_lossy(&data);
    found.extend(scanner.scan_text(&path.to_string_lossy(), &text, st));
}

/// Indexes into `files` (all under `root`) that git ignores.
fn git_ignored(
    root: &Path,
    files: &[PathBuf],
) -> Result<std::collections::HashSet<usize>, ScanError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let err = |message: String| ScanError::Io {
        path: root.display().to_string(),
        message,
    };
    let abs: Vec<PathBuf> = files
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let mut child = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["check-ignore", "-z", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("--respect-gitignore needs git: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| err("no stdin for git".into()))?;
    let input: Vec<u8> = abs
        .iter()
        .flat_map(|p| {
            let mut b = p.to_string_lossy().into_owned().into_bytes();
            b.push(0);
            b
        })
        .collect();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| err(format!("git check-ignore: {e}")))?;
    let _ = writer.join();
    // 0: some ignored, 1: none ignored, anything else: not a work tree.
    match out.status.code() {
        Some(0) | Some(1) => {}
        _ => {
            return Err(err(format!(
                "--respect-gitignore: not inside a git work tree ({}); drop the option to scan every file",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
    let ignored: std::collections::HashSet<&[u8]> = out
        .stdout
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    Ok(abs
        .iter()
        .enumerate()
        .filter(|(_, p)| ignored.contains(p.to_string_lossy().as_bytes()))
        .map(|(i, _)| i)
        .collect())
}
