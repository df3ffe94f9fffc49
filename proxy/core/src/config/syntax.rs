//! Stage 1, syntax: a TOML parse error becomes a [`ConfigIssue`] with its line,
//! column and (when it can be found) the key on that line.

use std::collections::HashMap;

use super::report::{one_line, ConfigIssue};

pub(super) fn syntax_issue(text: &str, err: &toml::de::Error) -> ConfigIssue {
    let message = one_line(err.message());
    let (location, key) = match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            (
                format!(" at line {line}, column {column}"),
                key_on_line(text, line),
            )
        }
        None => (String::new(), String::new()),
    };
    let fix = if message.contains("duplicate key") {
        "keep only one of the repeated keys; each key may appear once per table".to_string()
    } else if message.contains("table header") || message.contains("expected `]`") {
        "close the table header with `]` (or `]]` for [[workload]], [[secret]], [[route]])"
            .to_string()
    } else if message.contains("invalid string") || message.contains("expected `\"`") {
        "put text values in double quotes, e.g. name = \"reports\"".to_string()
    } else if message.contains("expected `=`") || message.contains("invalid key") {
        "write each setting as `key = value` on its own line".to_string()
    } else {
        "correct the TOML at that position: text in double quotes, tables as [name], lists of tables as [[name]]"
            .to_string()
    };
    ConfigIssue::new(key, format!("TOML syntax error{location}: {message}"), fix)
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.as_bytes().get(..offset).unwrap_or_default();
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let column = text
        .get(line_start..offset)
        .map_or(1, |s| s.chars().count() + 1);
    (line, column)
}

/// Best-effort key path for a 1-based line: the table header in force plus
/// the key written on that line. Empty when nothing sensible is found.
fn key_on_line(text: &str, line: usize) -> String {
    let mut table = String::new();
    let mut array_counts: HashMap<String, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let content = raw.trim();
        if index + 1 == line {
            if content.starts_with('[') {
                return String::new();
            }
            if let Some((left, _)) = content.split_once('=') {
                let left = left.trim();
                if is_plain_key(left) {
                    return join_key(&table, left);
                }
            }
            return table;
        }
        if let Some(rest) = content.strip_prefix("[[") {
            if let Some(end) = rest.find("]]") {
                let name = rest[..end].trim().to_string();
                let count = array_counts.entry(name.clone()).or_insert(0);
                table = format!("{name}[{count}]");
                *count += 1;
            }
        } else if let Some(rest) = content.strip_prefix('[') {
            if let Some(end) = rest.find(']') {
                let name = rest[..end].trim();
                let (head, tail) = name.split_once('.').unwrap_or((name, ""));
                table = match array_counts.get(head) {
                    Some(count) if *count > 0 && !tail.is_empty() => {
                        format!("{head}[{}].{tail}", count - 1)
                    }
                    _ => name.to_string(),
                };
            }
        }
    }
    String::new()
}

fn is_plain_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn join_key(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::report;

    #[test]
    fn syntax_error_reports_line_and_column() {
        let text = "trust_domain = \"example.org\"\n[store]\nmax_versions = = 3\n";
        let r = report(text);
        assert_eq!(r.errors.len(), 1, "{r}");
        let issue = &r.errors[0];
        assert!(
            issue
                .problem
                .contains("TOML syntax error at line 3, column"),
            "{issue:?}"
        );
        assert_eq!(issue.key, "store.max_versions");

        let r = report("[[route]]\nname = \"a\"\n[[route]]\nname = orders\n");
        assert!(r.errors[0].problem.contains("line 4"), "{r}");
        assert_eq!(r.errors[0].key, "route[1].name");

        let r = report("[store\nmax_versions = 1\n");
        assert!(r.errors[0].problem.contains("line 1"), "{r}");

        let r = report("[store]\nmax_versions = 1\nmax_versions = 2\n");
        assert!(r.errors[0].problem.contains("duplicate key"), "{r}");
        assert!(r.errors[0].problem.contains("line 3"), "{r}");
        assert_eq!(r.errors[0].key, "store.max_versions");
        assert!(!r.to_string().contains('\n'), "one issue, one line: {r}");
    }
}
