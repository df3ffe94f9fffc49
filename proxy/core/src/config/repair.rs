//! Stage 2, shape: deserialise into [`Config`], and after each serde error
//! record it, repair the document (drop the key, or rename a typo to the key it
//! was meant to be) and try again, so several shape errors are reported in one
//! pass without follow-on noise.

use super::report::{one_line, ConfigIssue};
use super::suggest::{closest, friendly_serde_message, key_hint, unknown_key_fix};
use super::syntax::line_column;
use super::{is_under, Config};

const MAX_REPAIR_PASSES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn segs_to_key(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Deserialise, and after each shape error drop the offending key and try
/// again, so several independent mistakes are reported in one go. Returns the
/// config built from the repaired document, or `None` if it could not be
/// repaired. Every shape error is pushed onto `errors`.
pub(super) fn deserialize_repairing(
    text: &str,
    mut table: toml::Table,
    errors: &mut Vec<ConfigIssue>,
    removed: &mut Vec<String>,
) -> Option<Config> {
    // The first pass reads the text itself so the error carries a line number.
    let first: Result<Config, _> = serde_path_to_error::deserialize(toml::Deserializer::new(text));
    let err = match first {
        Ok(config) => return Some(config),
        Err(err) => err,
    };
    let line = err.inner().span().map(|s| line_column(text, s.start).0);
    let (issue, repair) = shape_issue(err.path(), err.inner().message(), line);
    errors.push(issue);
    if !apply_repair(&mut table, repair, removed) {
        return None;
    }

    for _ in 0..MAX_REPAIR_PASSES {
        let pass: Result<Config, _> =
            serde_path_to_error::deserialize(toml::Value::Table(table.clone()));
        let err = match pass {
            Ok(config) => return Some(config),
            Err(err) => err,
        };
        let (issue, repair) = shape_issue(err.path(), err.inner().message(), None);
        if removed.iter().any(|r| is_under(&issue.key, r)) {
            // A consequence of an earlier repair (e.g. a required key now missing).
            return None;
        }
        errors.push(issue);
        if !apply_repair(&mut table, repair, removed) {
            return None;
        }
    }
    None
}

/// How to get past one shape error and look for the next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Repair {
    /// Nothing can be done; stop looking.
    Stop,
    /// Drop the value at this path (it then takes its default, if any).
    Remove(Vec<Seg>),
    /// An unknown key with a likely intended name: move the value there, so
    /// that the consequences of the typo (a "missing" key) are not reported.
    Rename(Vec<Seg>, String),
    /// A misspelt value with a likely intended spelling: use that instead.
    Replace(Vec<Seg>, String),
}

fn apply_repair(table: &mut toml::Table, repair: Repair, removed: &mut Vec<String>) -> bool {
    let (segs, rename, replace) = match repair {
        Repair::Stop => return false,
        Repair::Remove(segs) => (segs, None, None),
        Repair::Rename(segs, to) => (segs, Some(to), None),
        Repair::Replace(segs, with) => (segs, None, Some(with)),
    };
    let Some((Seg::Key(last), parents)) = segs.split_last() else {
        return false;
    };
    let Some(parent) = table_at(table, parents) else {
        return false;
    };
    let Some(value) = parent.remove(last) else {
        return false;
    };
    removed.push(segs_to_key(&segs));
    if let Some(with) = replace {
        parent.insert(last.clone(), toml::Value::String(with));
    }
    if let Some(to) = rename {
        if !parent.contains_key(&to) {
            parent.insert(to.clone(), value);
            let mut renamed = parents.to_vec();
            renamed.push(Seg::Key(to));
            removed.push(segs_to_key(&renamed));
        }
    }
    true
}

/// The table at `segs` (keys and array indexes), if there is one.
fn table_at<'a>(table: &'a mut toml::Table, segs: &[Seg]) -> Option<&'a mut toml::Table> {
    let mut current = table;
    let mut iter = segs.iter().peekable();
    while let Some(seg) = iter.next() {
        let Seg::Key(key) = seg else {
            return None;
        };
        let mut value = current.get_mut(key)?;
        while let Some(Seg::Index(i)) = iter.peek() {
            let toml::Value::Array(items) = value else {
                return None;
            };
            value = items.get_mut(*i)?;
            iter.next();
        }
        let toml::Value::Table(inner) = value else {
            return None;
        };
        current = inner;
    }
    Some(current)
}

/// Turn a serde error into an issue, plus the path to drop to get past it.
fn shape_issue(
    path: &serde_path_to_error::Path,
    message: &str,
    line: Option<usize>,
) -> (ConfigIssue, Repair) {
    let mut segs: Vec<Seg> = Vec::new();
    for seg in path.iter() {
        match seg {
            serde_path_to_error::Segment::Map { key } => segs.push(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => segs.push(Seg::Index(*index)),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    let at_line = line.map(|l| format!(" (line {l})")).unwrap_or_default();
    let quoted = backticked(message);
    let message = one_line(message);

    if message.starts_with("unknown field") {
        let field = quoted.first().cloned().unwrap_or_default();
        if segs.last() != Some(&Seg::Key(field.clone())) {
            segs.push(Seg::Key(field.clone()));
        }
        let key = segs_to_key(&segs);
        let valid: Vec<&str> = quoted.iter().skip(1).map(String::as_str).collect();
        let fix = unknown_key_fix(&field, &valid);
        let issue = ConfigIssue::new(key, format!("unknown key `{field}`{at_line}"), fix);
        let repair = match closest(&field, &valid, 2) {
            Some(best) => Repair::Rename(segs, best.to_string()),
            None => removable(segs),
        };
        return (issue, repair);
    }

    if message.starts_with("missing field") {
        let field = quoted.first().cloned().unwrap_or_default();
        segs.push(Seg::Key(field.clone()));
        let key = segs_to_key(&segs);
        let fix = match key_hint(&key) {
            Some(hint) => format!("add `{field}`: {hint}"),
            None => format!("add `{field} = ...`"),
        };
        let place = if segs.len() > 1 {
            format!(" in {}", segs_to_key(&segs[..segs.len() - 1]))
        } else {
            String::new()
        };
        let issue = ConfigIssue::new(
            key,
            format!("required key `{field}` is missing{place}{at_line}"),
            fix,
        );
        return (issue, Repair::Stop);
    }

    let key = segs_to_key(&segs);
    if message.starts_with("unknown variant") {
        let value = quoted.first().cloned().unwrap_or_default();
        let valid: Vec<&str> = quoted.iter().skip(1).map(String::as_str).collect();
        let list = valid
            .iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let best = closest(&value, &valid, 2);
        let fix = match best {
            Some(best) => format!("did you mean \"{best}\"? accepted values: {list}"),
            None => format!("use one of: {list}"),
        };
        let issue = ConfigIssue::new(key, format!("unknown value \"{value}\"{at_line}"), fix);
        let repair = match best {
            Some(best) if matches!(segs.last(), Some(Seg::Key(_))) => {
                Repair::Replace(segs, best.to_string())
            }
            _ => removable(segs),
        };
        return (issue, repair);
    }

    let problem = format!("{}{at_line}", friendly_serde_message(&message));
    let fix = match key_hint(&key) {
        Some(hint) if key.is_empty() => hint.to_string(),
        Some(hint) => format!("set {} to {hint}", last_key(&key)),
        None if message.contains("invalid duration") => {
            "write a duration such as \"90s\", \"15m\", \"1h30m\" or \"7d\"".to_string()
        }
        None => "correct the value's type".to_string(),
    };
    (ConfigIssue::new(key, problem, fix), removable(segs))
}

/// The path to remove for a shape error. An error inside an array removes
/// the whole array key, so that later array indexes in messages keep matching
/// the file.
fn removable(mut segs: Vec<Seg>) -> Repair {
    while matches!(segs.last(), Some(Seg::Index(_))) {
        segs.pop();
    }
    if segs.is_empty() {
        Repair::Stop
    } else {
        Repair::Remove(segs)
    }
}

pub(super) fn last_key(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Words between backticks in a serde message.
fn backticked(message: &str) -> Vec<String> {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{edit, error_keys, only_error, report};

    #[test]
    fn unknown_key_typo_suggests_the_right_key() {
        let text = edit(
            "listen = \"127.0.0.1:15432\"",
            "lisen = \"127.0.0.1:15432\"",
        );
        let r = report(&text);
        assert_eq!(r.errors[0].key, "route[0].lisen");
        assert!(r.errors[0].problem.contains("unknown key `lisen`"), "{r}");
        assert!(r.errors[0].fix.contains("did you mean `listen`?"), "{r}");
        // The now-missing `listen` is a consequence, not a second report.
        assert_eq!(r.errors.len(), 1, "{r}");
    }

    #[test]
    fn unknown_keys_elsewhere() {
        let issue = only_error("[metric]\nlisten = \"off\"\n", "metric");
        assert!(issue.fix.contains("did you mean `metrics`?"), "{issue:?}");
        let issue = only_error(
            &edit("{ uid = 1001 }", "{ uid = 1001, pid = 4 }"),
            "workload[0].selectors.pid",
        );
        assert!(issue.fix.contains("did you mean `uid`?"), "{issue:?}");
        let issue = only_error("frobnicate = 1\n", "frobnicate");
        assert!(!issue.fix.contains("did you mean"), "{issue:?}");
        assert!(issue.fix.contains("trust_domain"), "{issue:?}");
        let issue = only_error("cache_ttl = \"5m\"\n", "cache_ttl");
        assert!(issue.fix.contains("[[route]] credential"), "{issue:?}");
    }

    #[test]
    fn unknown_enum_value_suggests() {
        let issue = only_error(
            &edit("kind = \"postgres\"", "kind = \"postgress\""),
            "route[0].kind",
        );
        assert!(
            issue.fix.contains("did you mean \"postgres\"?"),
            "{issue:?}"
        );
        let issue = only_error("[identity]\nkey_type = \"rsa\"\n", "identity.key_type");
        assert!(issue.fix.contains("\"ml-dsa-65\""), "{issue:?}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let issue = only_error("[store]\nmax_versions = \"ten\"\n", "store.max_versions");
        assert!(issue.problem.contains("\"ten\""), "{issue:?}");
        assert!(issue.problem.contains("line 2"), "{issue:?}");
        assert!(issue.fix.contains("1 to 1000"), "{issue:?}");
        only_error(
            &edit("uid = 1001", "uid = \"1001\""),
            "workload[0].selectors.uid",
        );
        only_error(&edit("uid = 1001", "uid = -1"), "workload[0].selectors.uid");
        only_error(
            &edit("allow = [\"reports\"]", "allow = \"reports\""),
            "route[0].allow",
        );
        only_error(
            &edit("allow = [\"reports\"]", "allow = [\"reports\", 3]"),
            "route[0].allow[1]",
        );
        let issue = only_error("[route]\nname = \"x\"\n", "route");
        assert!(issue.fix.contains("[[route]]"), "{issue:?}");
        only_error(
            &edit("127.0.0.1:15432", "localhost:15432"),
            "route[0].listen",
        );
        only_error("[metrics]\nlisten = \"nope\"\n", "metrics.listen");
    }

    #[test]
    fn bad_duration_points_at_its_key() {
        let issue = only_error(
            &edit("cache_ttl = \"5m\"", "cache_ttl = \"5 minutes\""),
            "route[0].credential.cache_ttl",
        );
        assert!(issue.problem.contains("invalid duration"), "{issue:?}");
        only_error(
            &edit("rotation_period = \"1h\"", "rotation_period = 3600"),
            "secret[0].rotation_period",
        );
        only_error("[identity]\nsvid_ttl = \"1y\"\n", "identity.svid_ttl");
    }

    #[test]
    fn several_shape_errors_are_reported_together() {
        let text = edit(
            "listen = \"127.0.0.1:15432\"",
            "lisen = \"127.0.0.1:15432\"",
        )
        .replace("kind = \"postgres\"", "kind = \"postgress\"")
            + "upstream_tls = { mode = \"verify_full\" }\n"
            + "\n[store]\nmax_versions = \"ten\"\n[identity]\nkey_typ = \"ed25519\"\n";
        let mut keys = error_keys(&text);
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "identity.key_typ",
                "route[0].kind",
                "route[0].lisen",
                "route[0].upstream_tls.mode",
                "store.max_versions"
            ]
        );
        // A misspelt required value is not also reported as missing, and the
        // corrected guess lets checking go on to the semantic rules.
        let text = edit("kind = \"postgres\"", "kind = \"postgress\"")
            .replace("cache_ttl = \"5m\"", "cache_ttl = \"2h\"");
        let mut keys = error_keys(&text);
        keys.sort();
        assert_eq!(keys, vec!["route[0].credential.cache_ttl", "route[0].kind"]);
        // Without a close spelling a required value cannot be guessed; checking
        // stops there rather than inventing follow-on errors.
        let keys = error_keys(&edit("kind = \"postgres\"", "kind = \"grpc\""));
        assert_eq!(keys, vec!["route[0].kind"]);
    }
}
