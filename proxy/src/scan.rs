//! `warden scan`: find hard-coded secrets in files and git history (the
//! `warden-scan` crate does the work). Exit 0 clean, 1 findings, 2 usage.

use clap::Args;
use std::path::PathBuf;
use warden_core::error::{Error, Result};
use warden_scan::{git, report, RuleSet, ScanResult, Scanner};

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
}

/// Run the scan; `Ok(true)` when there are (new) findings.
pub fn run(args: ScanArgs, json: bool) -> Result<bool> {
    if json && args.sarif {
        return Err(Error::usage("--json and --sarif exclude each other"));
    }
    let user = match &args.rules {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Error::usage(format!("--rules {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let name = args
        .rules
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let rules = RuleSet::load(user.as_deref().map(|t| (t, name.as_str())))
        .map_err(|e| Error::usage(e.to_string()))?;
    let scanner = Scanner::new(rules).map_err(|e| Error::usage(e.to_string()))?;
    let baseline = match &args.baseline {
        Some(p) => Some(report::read_baseline(p).map_err(|e| Error::usage(e.to_string()))?),
        None => None,
    };
    let mut result =
        warden_scan::scan_paths(&scanner, &args.paths).map_err(|e| Error::usage(e.to_string()))?;
    if args.git {
        let mut history = ScanResult::default();
        for p in args.paths.iter().filter(|p| p.join(".git").exists()) {
            let h = git::scan_history(&scanner, p).map_err(|e| Error::usage(e.to_string()))?;
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
