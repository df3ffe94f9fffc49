//! What loading reports: [`ConfigIssue`] (key path, problem, fix) and
//! [`ConfigReport`] (every error and warning for one file), with the one-line-per-issue
//! `Display` that `warden config check` prints.

use std::fmt;
use std::path::PathBuf;

/// One problem in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path such as `route[1].credential.cache_ttl`; empty when the
    /// problem is not tied to a key (unreadable file, some syntax errors).
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl ConfigIssue {
    pub(super) fn new(
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConfigIssue {
            key: key.into(),
            problem: one_line(&problem.into()),
            fix: one_line(&fix.into()),
        }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{} (fix: {})", self.problem, self.fix)
    }
}

/// Everything wrong with a config file. Returned as the error of [`load`](super::load) and
/// [`parse_str`](super::parse_str).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReport {
    /// The config file.
    pub file: PathBuf,
    /// Problems that stop warden from using the file.
    pub errors: Vec<ConfigIssue>,
    /// Problems that do not.
    pub warnings: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigReport {
    /// One issue per line: `FILE: error: KEY: PROBLEM (fix: FIX)`, errors first, then warnings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        let mut first = true;
        for (label, issues) in [("error", &self.errors), ("warning", &self.warnings)] {
            for issue in issues {
                if !first {
                    writeln!(f)?;
                }
                first = false;
                write!(f, "{file}: {label}: {issue}")?;
            }
        }
        if first {
            write!(f, "{file}: no problems found")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigReport {}

pub(super) fn one_line(s: &str) -> String {
    s.trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::PathBuf;

    use super::{ConfigIssue, ConfigReport};
    use crate::config::test_util::{edit, report};

    #[test]
    fn report_display_format() {
        let r = ConfigReport {
            file: PathBuf::from("/etc/warden.toml"),
            errors: vec![
                ConfigIssue::new("store.max_versions", "is 0", "set 1..1000"),
                ConfigIssue::new("", "cannot read", "check it"),
            ],
            warnings: vec![ConfigIssue::new("route[0].allow", "empty", "add names")],
        };
        assert_eq!(
            r.to_string(),
            "/etc/warden.toml: error: store.max_versions: is 0 (fix: set 1..1000)\n\
             /etc/warden.toml: error: cannot read (fix: check it)\n\
             /etc/warden.toml: warning: route[0].allow: empty (fix: add names)"
        );
        let as_error: &dyn std::error::Error = &r;
        assert!(as_error.to_string().starts_with("/etc/warden.toml: error:"));
    }

    #[test]
    fn real_report_display_has_one_line_per_issue() {
        let text = edit("allow = [\"reports\"]", "allow = []").replace(
            "trust_domain = \"example.org\"",
            "trust_domain = \"Example.org\"",
        );
        let r = report(&text);
        let shown = r.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), r.errors.len() + r.warnings.len(), "{shown}");
        assert!(
            lines[0].starts_with("/etc/warden/warden.toml: error: trust_domain: "),
            "{shown}"
        );
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with("/etc/warden/warden.toml: warning: route[0].allow: "),
            "{shown}"
        );
        assert!(lines.iter().all(|l| l.contains(" (fix: ")), "{shown}");
    }
}
