//! The scanner as `cargo xtask bench --only scan` runs it (release build):
//! the same engine and walk as `warden scan`, without the CLI around it, so
//! the bench needs no release build of the whole daemon.
//!
//! - `scan_bench scan PATH...`: scan files, print `warden scan --json`'s JSON.
//! - `scan_bench git REPO`: the working tree and every blob of the history
//!   (as `warden scan --git`), same JSON.

use std::path::PathBuf;
use warden_scan::{git, report, RuleSet, ScanResult, Scanner};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, paths)) = args.split_first() else {
        eprintln!("usage: scan_bench scan PATH... | scan_bench git REPO");
        std::process::exit(2);
    };
    let scanner = match RuleSet::builtin().and_then(Scanner::new) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("scan_bench: rules: {e}");
            std::process::exit(2);
        }
    };
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    let result = match mode.as_str() {
        "scan" => warden_scan::scan_paths(&scanner, &paths),
        "git" => warden_scan::scan_paths(&scanner, &paths).and_then(|mut r| {
            let mut history = ScanResult::default();
            for p in &paths {
                let h = git::scan_history(&scanner, p)?;
                history.findings.extend(h.findings);
                history.stats.add(&h.stats);
            }
            let h = git::history_only(history, &r.findings);
            r.findings.extend(h.findings);
            r.stats.add(&h.stats);
            Ok(r)
        }),
        other => {
            eprintln!("scan_bench: unknown mode {other:?} (scan or git)");
            std::process::exit(2);
        }
    };
    match result {
        Ok(r) => println!("{}", report::json(&r)),
        Err(e) => {
            eprintln!("scan_bench: {e}");
            std::process::exit(2);
        }
    }
}
