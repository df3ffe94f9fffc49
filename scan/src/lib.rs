//! `warden-scan`: finds hard-coded secrets in files and in git history —
//! cloud and SaaS tokens, private keys, database URLs with passwords and
//! secret-named assignments — with detectors kept as data (`rules.toml`,
//! extendable with a user's file). It never keeps or prints a secret value:
//! a finding carries a redacted form (at most the first and last two
//! characters) and a fingerprint (SHA-256 of the rule id and the value).
//!
//! Layering: a leaf library with nothing warden-internal; the `warden scan`
//! verb in the binary calls [`scan_paths`] and [`git::scan_history`] and
//! prints with [`report`].

pub mod allow;
pub mod git;
pub mod report;
pub mod rules;
pub mod walk;

pub use rules::RuleSet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// Files larger than this are skipped (counted in the summary).
pub const MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// A NUL byte in this many leading bytes marks a file binary.
pub const BINARY_SNIFF_BYTES: usize = 8192;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("{source_name}: {message}")]
    Rules {
        source_name: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("git: {0}")]
    Git(String),
    #[error("baseline {path}: {message}")]
    Baseline { path: String, message: String },
}

/// One secret found. Holds no secret value. Read back from a `--json`
/// report by `warden import`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub rule_id: String,
    pub description: String,
    pub family: String,
    pub path: String,
    pub line: usize,
    pub column: usize,
    /// At most the first and last two characters.
    pub redacted: String,
    /// Hex SHA-256 of `rule_id`, a NUL byte and the value.
    pub fingerprint: String,
    /// Set for findings that exist only in git history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_date: Option<String>,
    /// `warden scan --verify` only: `live`, `rejected`, `unreachable`, or
    /// why the value was not tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
}

/// What a scan looked at and what it skipped, and why.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    pub files_scanned: u64,
    pub bytes_scanned: u64,
    pub skipped_binary: u64,
    pub skipped_large: u64,
    pub skipped_vendored: u64,
    pub skipped_allowlisted: u64,
    /// `--respect-gitignore` only: files git ignores.
    #[serde(default)]
    pub skipped_gitignored: u64,
    pub unreadable: u64,
    pub git_blobs_scanned: u64,
    pub suppressed_inline: u64,
    pub suppressed_baseline: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.files_scanned += o.files_scanned;
        self.bytes_scanned += o.bytes_scanned;
        self.skipped_binary += o.skipped_binary;
        self.skipped_large += o.skipped_large;
        self.skipped_vendored += o.skipped_vendored;
        self.skipped_allowlisted += o.skipped_allowlisted;
        self.skipped_gitignored += o.skipped_gitignored;
        self.unreadable += o.unreadable;
        self.git_blobs_scanned += o.git_blobs_scanned;
        self.suppressed_inline += o.suppressed_inline;
        self.suppressed_baseline += o.suppressed_baseline;
    }
}

/// A scan's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanResult {
    pub findings: Vec<Finding>,
    pub stats: Stats,
}

/// The fingerprint of a value under a rule.
pub fn fingerprint(rule_id: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(rule_id.as_bytes());
    h.update([0u8]);
    h.update(value.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// At most the first and last two characters of a value.
pub fn redact(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let keep = match chars.len() {
        0..=7 => 0,
        8..=15 => 1,
        _ => 2,
    };
    if keep == 0 {
        return "…".into();
    }
    let head: String = chars[..keep].iter().collect();
    let tail: String = chars[chars.len() - keep..].iter().collect();
    format!("{head}…{tail}")
}

/// Whether the leading bytes contain a NUL.
pub fn looks_binary(data: &[u8]) -> bool {
    data[..data.len().min(BINARY_SNIFF_BYTES)].contains(&0)
}

/// The compiled engine: rules plus the keyword prefilter (one Aho-Corasick
/// automaton over every rule's keywords).
pub struct Scanner {
    pub rules: RuleSet,
    keywords: aho_corasick::AhoCorasick,
    /// keyword index → rules that need it
    keyword_rules: Vec<Vec<usize>>,
    /// rules that run on every file
    always: Vec<usize>,
}

impl Scanner {
    pub fn new(rules: RuleSet) -> Result<Scanner, ScanError> {
        let mut words: Vec<String> = Vec::new();
        let mut keyword_rules: Vec<Vec<usize>> = Vec::new();
        let mut always = Vec::new();
        for (ri, r) in rules.rules.iter().enumerate() {
            if r.keywords.is_empty() {
                always.push(ri);
            }
            for k in &r.keywords {
                let ki = match words.iter().position(|w| w == k) {
                    Some(i) => i,
                    None => {
                        words.push(k.clone());
                        keyword_rules.push(Vec::new());
                        words.len() - 1
                    }
                };
                keyword_rules[ki].push(ri);
            }
        }
        let keywords = aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(&words)
            .map_err(|e| ScanError::Rules {
                source_name: "keywords".into(),
                message: e.to_string(),
            })?;
        Ok(Scanner {
            rules,
            keywords,
            keyword_rules,
            always,
        })
    }

    /// Findings in one file's text. `path` is what reports show and what
    /// path globs match.
    pub fn scan_text(&self, path: &str, text: &str, stats: &mut Stats) -> Vec<Finding> {
        let mut active = vec![false; self.rules.rules.len()];
        for &ri in &self.always {
            active[ri] = true;
        }
        for m in self.keywords.find_overlapping_iter(text) {
            for &ri in &self.keyword_rules[m.pattern().as_usize()] {
                active[ri] = true;
            }
        }
        let mut line_starts: Option<Vec<usize>> = None;
        let mut found: Vec<(Finding, bool)> = Vec::new();
        for (ri, rule) in self.rules.rules.iter().enumerate() {
            if !active[ri] || self.rules.allow.rule(&rule.id) {
                continue;
            }
            if !rule.paths.is_empty() && !rule.paths.iter().any(|g| g.matches(path)) {
                continue;
            }
            for caps in rule.regex.captures_iter(text) {
                let m = match rule.group {
                    Some(g) => caps.get(g),
                    None => caps.iter().skip(1).flatten().next().or_else(|| caps.get(0)),
                };
                let Some(m) = m else { continue };
                let value = m.as_str().trim();
                if value.len() < rule.min_len || allow::is_placeholder(value) {
                    continue;
                }
                if let Some(min) = self.rules.entropy_min(rule, value) {
                    if rules::shannon_entropy(value) < min {
                        continue;
                    }
                }
                let starts = line_starts.get_or_insert_with(|| {
                    std::iter::once(0)
                        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                        .collect()
                });
                let line_idx = starts.partition_point(|&s| s <= m.start()) - 1;
                let end_idx = starts.partition_point(|&s| s <= m.end().saturating_sub(1)) - 1;
                let line_text = |i: usize| {
                    let s = starts[i];
                    let e = starts.get(i + 1).copied().unwrap_or(text.len());
                    &text[s..e]
                };
                if line_text(line_idx).contains(allow::INLINE_ALLOW)
                    || line_text(end_idx).contains(allow::INLINE_ALLOW)
                {
                    stats.suppressed_inline += 1;
                    continue;
                }
                let fp = fingerprint(&rule.id, value);
                if self.rules.allow.fingerprint(&fp) {
                    continue;
                }
                let finding = Finding {
                    rule_id: rule.id.clone(),
                    description: rule.description.clone(),
                    family: rule.family.clone(),
                    path: path.to_string(),
                    line: line_idx + 1,
                    column: text[starts[line_idx]..m.start()].chars().count() + 1,
                    redacted: redact(value),
                    fingerprint: fp,
                    commit: None,
                    author_date: None,
                    verified: None,
                };
                found.push((finding, rule.generic));
            }
        }
        // A provider rule's match is never hidden by a name-based one: drop a
        // generic finding whose value overlaps a specific finding's on that line.
        let specific_lines: HashSet<usize> = found
            .iter()
            .filter(|(_, generic)| !generic)
            .map(|(f, _)| f.line)
            .collect();
        let mut seen = HashSet::new();
        let mut out: Vec<Finding> = found
            .into_iter()
            .filter(|(f, generic)| !generic || !specific_lines.contains(&f.line))
            .map(|(f, _)| f)
            .filter(|f| seen.insert((f.line, f.fingerprint.clone())))
            .collect();
        // Two generic rules matching the same value on one line: keep one.
        let mut per_line_value = HashSet::new();
        out.retain(|f| per_line_value.insert((f.line, f.redacted.clone(), f.column)));
        out.sort_by_key(|f| (f.line, f.column));
        out
    }
}

/// Where a finding's value sits in a file's text now: byte ranges, so the
/// caller reads the value from its own copy of the text (`warden import`,
/// `warden scan --verify`) and the value never travels in a `Finding`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The secret value (what the fingerprint covers).
    pub value: std::ops::Range<usize>,
    /// The rule's whole match (for a database URL: the URL).
    pub whole: std::ops::Range<usize>,
}

/// Why a finding could not be found again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocateError {
    #[error("rule {0:?} is not in the rule set (was the scan run with other --rules?)")]
    UnknownRule(String),
    #[error("nothing matching rule {rule} starts at line {line}, column {column} any more")]
    Moved {
        rule: String,
        line: usize,
        column: usize,
    },
    #[error("the value at line {line}, column {column} no longer matches the scan's fingerprint")]
    Changed { line: usize, column: usize },
}

impl Scanner {
    /// Finds `finding`'s value again in `text` (the file as it is now): the
    /// rule's match whose value starts at the finding's line and column and
    /// whose fingerprint is the finding's.
    pub fn locate(&self, text: &str, finding: &Finding) -> Result<Located, LocateError> {
        let rule = self
            .rules
            .rules
            .iter()
            .find(|r| r.id == finding.rule_id)
            .ok_or_else(|| LocateError::UnknownRule(finding.rule_id.clone()))?;
        let line_start = if finding.line <= 1 {
            0
        } else {
            match text.match_indices('\n').nth(finding.line - 2) {
                Some((i, _)) => i + 1,
                None => {
                    return Err(LocateError::Moved {
                        rule: rule.id.clone(),
                        line: finding.line,
                        column: finding.column,
                    })
                }
            }
        };
        let start = text[line_start..]
            .char_indices()
            .nth(finding.column.saturating_sub(1))
            .map(|(i, _)| line_start + i);
        let mut at_place = false;
        if let Some(start) = start {
            for caps in rule.regex.captures_iter(text) {
                let m = match rule.group {
                    Some(g) => caps.get(g),
                    None => caps.iter().skip(1).flatten().next().or_else(|| caps.get(0)),
                };
                let Some(m) = m else { continue };
                let raw = m.as_str();
                let value = raw.trim();
                let vstart = m.start() + (raw.len() - raw.trim_start().len());
                // Lines and columns are where the group starts, before trimming.
                if m.start() != start {
                    continue;
                }
                at_place = true;
                if fingerprint(&rule.id, value) == finding.fingerprint {
                    let whole = caps.get(0).map_or(m.range(), |w| w.range());
                    return Ok(Located {
                        value: vstart..vstart + value.len(),
                        whole,
                    });
                }
            }
        }
        if at_place {
            Err(LocateError::Changed {
                line: finding.line,
                column: finding.column,
            })
        } else {
            Err(LocateError::Moved {
                rule: rule.id.clone(),
                line: finding.line,
                column: finding.column,
            })
        }
    }
}

/// Scan files and directories (see [`walk`] for what is walked and skipped).
pub fn scan_paths(
    scanner: &Scanner,
    paths: &[std::path::PathBuf],
) -> Result<ScanResult, ScanError> {
    walk::scan_paths(scanner, paths, None, walk::WalkOptions::default())
}

/// [`scan_paths`] with walk options and optional progress counters.
pub fn scan_paths_with(
    scanner: &Scanner,
    paths: &[std::path::PathBuf],
    progress: Option<&walk::Progress>,
    opts: walk::WalkOptions,
) -> Result<ScanResult, ScanError> {
    walk::scan_paths(scanner, paths, progress, opts)
}

/// Drop findings whose fingerprint is in `baseline`; returns how many were dropped.
pub fn apply_baseline(result: &mut ScanResult, baseline: &HashSet<String>) {
    let before = result.findings.len();
    result
        .findings
        .retain(|f| !baseline.contains(&f.fingerprint));
    result.stats.suppressed_baseline += (before - result.findings.len()) as u64;
}

#[cfg(test)]
mod tests;
