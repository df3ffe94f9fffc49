//! What is never reported: allowlisted paths, rules and fingerprints, and
//! placeholder values (`changeme`, `<password>`, `${VAR}`, `xxxx…`, and the
//! `warden:secret/NAME` references `warden import --rewrite` writes).

use crate::ScanError;
use std::collections::HashSet;

/// A path glob: `*` and `?` stay within one path component, `**` crosses
/// them (`**/` also matches no directory). A pattern without `/` matches the
/// file name alone.
#[derive(Debug, Clone)]
pub struct Glob {
    pattern: Vec<u8>,
    basename_only: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, ScanError> {
        if pattern.is_empty() {
            return Err(ScanError::Rules {
                source_name: "[allow] paths".into(),
                message: "empty glob".into(),
            });
        }
        Ok(Glob {
            pattern: pattern.as_bytes().to_vec(),
            basename_only: !pattern.contains('/'),
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        let path = path.strip_prefix("./").unwrap_or(path);
        if self.basename_only {
            let name = path.rsplit('/').next().unwrap_or(path);
            return glob_match(&self.pattern, name.as_bytes());
        }
        // Anchored at any directory boundary, so `src/*.rs` matches `repo/src/a.rs`.
        if glob_match(&self.pattern, path.as_bytes()) {
            return true;
        }
        path.match_indices('/')
            .any(|(i, _)| glob_match(&self.pattern, &path.as_bytes()[i + 1..]))
    }
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    if p.is_empty() {
        return s.is_empty();
    }
    if p.starts_with(b"**") {
        let rest = &p[2..];
        let rest_after_slash = rest.strip_prefix(b"/").unwrap_or(rest);
        if glob_match(rest_after_slash, s) {
            return true;
        }
        return (0..s.len()).any(|i| {
            (s[i] == b'/' && glob_match(rest_after_slash, &s[i + 1..]))
                || glob_match(rest, &s[i + 1..])
        });
    }
    match p[0] {
        b'*' => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob_match(&p[1..], &s[i..])),
        b'?' => !s.is_empty() && s[0] != b'/' && glob_match(&p[1..], &s[1..]),
        c => !s.is_empty() && s[0] == c && glob_match(&p[1..], &s[1..]),
    }
}

/// The rules file's `[allow]` section.
#[derive(Debug, Default)]
pub struct Allow {
    paths: Vec<Glob>,
    rules: HashSet<String>,
    fingerprints: HashSet<String>,
}

impl Allow {
    pub fn new(
        paths: Vec<String>,
        rules: Vec<String>,
        fingerprints: Vec<String>,
    ) -> Result<Allow, ScanError> {
        Ok(Allow {
            paths: paths
                .iter()
                .map(|p| Glob::new(p))
                .collect::<Result<_, _>>()?,
            rules: rules.into_iter().collect(),
            fingerprints: fingerprints.into_iter().collect(),
        })
    }
    pub fn path(&self, path: &str) -> bool {
        self.paths.iter().any(|g| g.matches(path))
    }
    pub fn rule(&self, id: &str) -> bool {
        self.rules.contains(id)
    }
    pub fn fingerprint(&self, fp: &str) -> bool {
        self.fingerprints.contains(fp)
    }
}

/// The inline marker that silences findings on its line.
pub const INLINE_ALLOW: &str = "warden:allow";

/// Whether a value is a placeholder rather than a secret: documentation
/// values, template references and masked values.
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    const WORDS: &[&str] = &[
        "changeme",
        "change_me",
        "change-me",
        "example",
        "placeholder",
        "your_",
        "your-",
        "yourpassword",
        "redacted",
        "dummy",
        "sample",
        "notasecret",
        "not_a_secret",
        "insert_",
        "replace_me",
        "replaceme",
        "todo",
        "fixme",
        "xxxx",
        "****",
        "....",
        "…",
        "0000000000",
    ];
    if WORDS.iter().any(|w| lower.contains(w)) {
        return true;
    }
    const EXACT: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "pass",
        "none",
        "null",
        "nil",
        "true",
        "false",
        "undefined",
        "string",
        "empty",
        "test",
        "testing",
        "foobar",
        "admin",
    ];
    if EXACT.contains(&lower.as_str()) {
        return true;
    }
    // A reference `warden import --rewrite` left in place of a value.
    if lower.starts_with("warden:") {
        return true;
    }
    // <password>, ${VAR}, $VAR, {{ var }}, %(name)s, %s, @VAR@, [secret]
    let b = v.as_bytes();
    if (v.starts_with('<') && v.ends_with('>'))
        || v.starts_with("${")
        || v.starts_with("#{")
        || v.contains("{{")
        || v.starts_with("%(")
        || v.starts_with("%s")
        || (v.starts_with('@') && v.ends_with('@'))
        || (v.starts_with('[') && v.ends_with(']'))
        || (b.first() == Some(&b'$') && b.get(1).is_some_and(|c| c.is_ascii_uppercase()))
    {
        return true;
    }
    // One repeated character ("aaaaaaaa", "11111111").
    b.first().is_some_and(|f| b.iter().all(|c| c == f))
}
