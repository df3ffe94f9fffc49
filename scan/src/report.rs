//! Output: the readable report, JSON, SARIF 2.1.0 and baseline files. None
//! of them carries a secret value: only the redacted form and fingerprint.

use crate::{Finding, RuleSet, ScanError, ScanResult};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fmt::Write;
use std::path::Path;

/// The human-readable report.
pub fn text(result: &ScanResult) -> String {
    let mut out = String::new();
    for f in &result.findings {
        let _ = writeln!(
            out,
            "{}:{}:{}: {} [{}] {}",
            f.path, f.line, f.column, f.description, f.rule_id, f.redacted
        );
        if let (Some(c), Some(d)) = (&f.commit, &f.author_date) {
            let _ = writeln!(out, "    in history only: commit {c} ({d})");
        }
        if let Some(v) = &f.verified {
            let _ = writeln!(out, "    verify: {v}");
        }
    }
    let s = &result.stats;
    let _ = writeln!(
        out,
        "{} finding(s); {} file(s) and {} git blob(s) scanned ({} bytes); skipped: {} binary, {} over 10 MB, {} minified/vendored, {} allowlisted, {} unreadable; suppressed: {} inline (warden:allow), {} by baseline",
        result.findings.len(),
        s.files_scanned,
        s.git_blobs_scanned,
        s.bytes_scanned,
        s.skipped_binary,
        s.skipped_large,
        s.skipped_vendored,
        s.skipped_allowlisted,
        s.unreadable,
        s.suppressed_inline,
        s.suppressed_baseline,
    );
    if s.skipped_gitignored > 0 {
        let _ = writeln!(
            out,
            "{} file(s) ignored by git were not scanned (--respect-gitignore)",
            s.skipped_gitignored
        );
    }
    out
}

/// `--json`: `{"findings": [...], "stats": {...}}`.
pub fn json(result: &ScanResult) -> Value {
    json!({ "findings": result.findings, "stats": result.stats })
}

/// SARIF 2.1.0 with every rule in `tool.driver.rules`.
pub fn sarif(result: &ScanResult, rules: &RuleSet) -> Value {
    let driver_rules: Vec<Value> = rules
        .rules
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "name": r.id,
                "shortDescription": { "text": r.description },
                "properties": { "family": r.family },
            })
        })
        .collect();
    let results: Vec<Value> = result.findings.iter().map(sarif_result).collect();
    json!({
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [{
            "tool": { "driver": {
                "name": "warden scan",
                "informationUri": "https://github.com/warden/warden/blob/main/docs/scan.md",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": driver_rules,
            }},
            "results": results,
        }],
    })
}

fn sarif_result(f: &Finding) -> Value {
    let mut props = json!({ "redacted": f.redacted, "family": f.family });
    if let (Some(c), Some(d)) = (&f.commit, &f.author_date) {
        props["commit"] = json!(c);
        props["authorDate"] = json!(d);
    }
    if let Some(v) = &f.verified {
        props["verified"] = json!(v);
    }
    json!({
        "ruleId": f.rule_id,
        "level": "error",
        "message": { "text": format!("{} ({})", f.description, f.redacted) },
        "locations": [{ "physicalLocation": {
            "artifactLocation": { "uri": f.path.trim_start_matches("./") },
            "region": { "startLine": f.line, "startColumn": f.column },
        }}],
        "partialFingerprints": { "wardenFingerprint/v1": f.fingerprint },
        "properties": props,
    })
}

/// Read a baseline file: `{"fingerprints": [...]}` (what `--write-baseline`
/// writes; a `--json` report is accepted too).
pub fn read_baseline(path: &Path) -> Result<HashSet<String>, ScanError> {
    let err = |message: String| ScanError::Baseline {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut out = HashSet::new();
    if let Some(list) = v.get("fingerprints").and_then(Value::as_array) {
        out.extend(list.iter().filter_map(Value::as_str).map(String::from));
    } else if let Some(list) = v.get("findings").and_then(Value::as_array) {
        out.extend(
            list.iter()
                .filter_map(|f| f.get("fingerprint").and_then(Value::as_str))
                .map(String::from),
        );
    } else {
        return Err(err("expected {\"fingerprints\": [...]}".into()));
    }
    Ok(out)
}

/// The baseline for `result`: its fingerprints, sorted, with where each was seen.
pub fn baseline(result: &ScanResult) -> Value {
    let mut fps: Vec<&str> = result
        .findings
        .iter()
        .map(|f| f.fingerprint.as_str())
        .collect();
    fps.sort_unstable();
    fps.dedup();
    let seen: Vec<Value> = result
        .findings
        .iter()
        .map(|f| json!({ "fingerprint": f.fingerprint, "rule_id": f.rule_id, "path": f.path, "line": f.line }))
        .collect();
    json!({ "version": 1, "fingerprints": fps, "seen": seen })
}
