//! Syntax of the names and IDs the file uses: workload and route names,
//! secret names, the SPIFFE trust domain and SPIFFE IDs, HTTP header names. Each
//! check returns the problem and a suggested fix.

use super::DEFAULT_TRUST_DOMAIN;

const NAME_MAX: usize = 63;
const SECRET_NAME_MAX: usize = 128;
const TRUST_DOMAIN_MAX: usize = 255;
const SPIFFE_ID_MAX: usize = 2048;

type Problem = (String, String);

/// Workload and route names: `[a-z0-9][a-z0-9_-]{0,62}`.
pub(super) fn check_name(what: &str, name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err((
            format!("{what} name is empty"),
            format!("set name = \"my-{what}\" (lowercase letters, digits, - and _)"),
        ));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit());
    let rest_ok = name
        .chars()
        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_');
    if first_ok && rest_ok && name.len() <= NAME_MAX {
        return Ok(());
    }
    let problem = if name.len() > NAME_MAX {
        format!(
            "{what} name is {} characters; at most {NAME_MAX} are allowed",
            name.len()
        )
    } else {
        format!("{what} name \"{name}\" may only use lowercase letters, digits, - and _, and must start with a letter or digit")
    };
    Err((
        problem,
        format!("rename it, e.g. \"{}\"", suggest_name(name)),
    ))
}

fn suggest_name(name: &str) -> String {
    let mut out = String::new();
    for ch in name.chars() {
        let ch = ch.to_ascii_lowercase();
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' {
            out.push(ch);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed: String = out
        .trim_start_matches(['-', '_'])
        .trim_end_matches('-')
        .chars()
        .take(NAME_MAX)
        .collect();
    if trimmed.is_empty() {
        "my-name".to_string()
    } else {
        trimmed
    }
}

/// Secret names: `[a-z0-9][a-z0-9._/-]{0,127}`, no `//`, no trailing `/`,
/// no `.` or `..` segments.
pub(super) fn check_secret_name(name: &str) -> Result<(), Problem> {
    let fix = "use lowercase letters, digits, `.`, `_`, `-` and single `/` separators, e.g. \"orders-db/app\"".to_string();
    if name.is_empty() {
        return Err(("secret name is empty".to_string(), fix));
    }
    if name.len() > SECRET_NAME_MAX {
        return Err((
            format!(
                "secret name is {} characters; at most {SECRET_NAME_MAX} are allowed",
                name.len()
            ),
            "shorten the name".to_string(),
        ));
    }
    if let Some(bad) = name.chars().find(|ch| {
        !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '/' | '-'))
    }) {
        return Err((
            format!("secret name \"{name}\" contains `{bad}`, which is not allowed"),
            fix,
        ));
    }
    if name.starts_with(['.', '_', '/', '-']) {
        return Err((
            format!("secret name \"{name}\" must start with a lowercase letter or digit"),
            fix,
        ));
    }
    if name.contains("//") {
        return Err((format!("secret name \"{name}\" contains `//`"), fix));
    }
    if name.ends_with('/') {
        return Err((format!("secret name \"{name}\" ends with `/`"), fix));
    }
    if name.split('/').any(|seg| seg == "." || seg == "..") {
        return Err((
            format!("secret name \"{name}\" contains a `.` or `..` segment"),
            fix,
        ));
    }
    Ok(())
}

/// SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`; 1..=255 chars.
pub(super) fn check_trust_domain(td: &str) -> Result<(), Problem> {
    if td.is_empty() {
        return Err((
            "trust_domain is empty".to_string(),
            format!("set trust_domain = \"example.org\", or remove it to use \"{DEFAULT_TRUST_DOMAIN}\""),
        ));
    }
    if let Some((_, rest)) = td.split_once("://") {
        let bare = rest
            .split(['/', ':'])
            .next()
            .unwrap_or(rest)
            .to_ascii_lowercase();
        return Err((
            format!("trust_domain \"{td}\" includes a scheme"),
            format!("write only the domain, e.g. trust_domain = \"{bare}\""),
        ));
    }
    if td.contains('/') || td.contains(':') {
        let bare = td
            .split(['/', ':'])
            .next()
            .unwrap_or(td)
            .to_ascii_lowercase();
        return Err((
            format!("trust_domain \"{td}\" includes a port or path"),
            format!("write only the domain, e.g. trust_domain = \"{bare}\""),
        ));
    }
    if td.len() > TRUST_DOMAIN_MAX {
        return Err((
            format!(
                "trust_domain is {} characters; at most {TRUST_DOMAIN_MAX} are allowed",
                td.len()
            ),
            "use a shorter domain".to_string(),
        ));
    }
    if td.chars().any(|ch| ch.is_ascii_uppercase()) {
        return Err((
            format!("trust_domain \"{td}\" contains uppercase letters"),
            format!(
                "use lowercase: trust_domain = \"{}\"",
                td.to_ascii_lowercase()
            ),
        ));
    }
    if let Some(bad) = td.chars().find(|ch| {
        !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '-' | '_'))
    }) {
        return Err((
            format!("trust_domain \"{td}\" contains `{bad}`; only lowercase letters, digits, `.`, `-` and `_` are allowed"),
            "use a plain domain name such as \"example.org\"".to_string(),
        ));
    }
    Ok(())
}

/// `spiffe://<trust_domain>/<path>` whose trust domain equals the configured one.
pub(super) fn check_spiffe_id(id: &str, trust_domain: &str) -> Result<(), Problem> {
    let example = format!("spiffe://{trust_domain}/NAME");
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Err((
            format!("spiffe_id \"{id}\" does not start with spiffe://"),
            format!("write it as \"{example}\""),
        ));
    };
    if id.len() > SPIFFE_ID_MAX {
        return Err((
            format!(
                "spiffe_id is {} bytes; at most {SPIFFE_ID_MAX} are allowed",
                id.len()
            ),
            "use a shorter path".to_string(),
        ));
    }
    if id.contains('?') || id.contains('#') {
        return Err((
            format!("spiffe_id \"{id}\" contains a query (?) or fragment (#)"),
            format!(
                "remove them: \"{}\"",
                id.split(['?', '#']).next().unwrap_or(id)
            ),
        ));
    }
    let (td, path) = match rest.find('/') {
        Some(p) => rest.split_at(p),
        None => (rest, ""),
    };
    if let Err((problem, _)) = check_trust_domain(td) {
        return Err((
            format!("spiffe_id \"{id}\" has an invalid trust domain: {problem}"),
            format!("write it as \"{example}\""),
        ));
    }
    // If trust_domain itself is invalid that is reported on its own; comparing
    // against it would only produce a confusing second message.
    if td != trust_domain && check_trust_domain(trust_domain).is_ok() {
        return Err((
            format!("spiffe_id \"{id}\" is in trust domain \"{td}\", but trust_domain is \"{trust_domain}\""),
            format!("use \"spiffe://{trust_domain}{path}\", or change trust_domain"),
        ));
    }
    let path = path.strip_prefix('/').unwrap_or(path);
    if path.is_empty() {
        return Err((
            format!("spiffe_id \"{id}\" has no path; a workload ID needs one"),
            format!("add a path, e.g. \"{example}\""),
        ));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err((
                format!("spiffe_id \"{id}\" has an empty path segment (`//` or a trailing `/`)"),
                "remove the extra `/`".to_string(),
            ));
        }
        if segment == "." || segment == ".." {
            return Err((
                format!("spiffe_id \"{id}\" has a `.` or `..` path segment"),
                "use plain names for every path segment".to_string(),
            ));
        }
        if let Some(bad) = segment
            .chars()
            .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_')))
        {
            return Err((
                format!("spiffe_id \"{id}\" contains `{bad}`; path segments allow only letters, digits, `.`, `-` and `_`"),
                format!("write it as \"{example}\""),
            ));
        }
    }
    Ok(())
}

pub(super) fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|ch| {
            ch.is_ascii_alphanumeric()
                || matches!(
                    ch,
                    '!' | '#'
                        | '$'
                        | '%'
                        | '&'
                        | '\''
                        | '*'
                        | '+'
                        | '-'
                        | '.'
                        | '^'
                        | '_'
                        | '`'
                        | '|'
                        | '~'
                )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{edit, edit_text, ok, only_error, BASE, HTTP_ROUTE};

    #[test]
    fn trust_domain_syntax() {
        for bad in [
            "Example.org",
            "spiffe://example.org",
            "example.org:443",
            "example.org/path",
            "",
            "exa mple.org",
        ] {
            let text = format!("trust_domain = \"{bad}\"\n");
            only_error(&text, "trust_domain");
        }
        let long = format!("trust_domain = \"{}\"\n", "a".repeat(256));
        only_error(&long, "trust_domain");
        ok(&format!("trust_domain = \"{}\"\n", "a".repeat(255)));
        ok("trust_domain = \"prod_1.example-corp.org\"\n");
        let issue = only_error("trust_domain = \"Example.org\"\n", "trust_domain");
        assert!(issue.fix.contains("\"example.org\""), "{issue:?}");
    }

    #[test]
    fn spiffe_id_rules() {
        for bad in [
            "spiffe://other.org/reports",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/reports?x=1",
            "spiffe://example.org/reports#frag",
            "spiffe://example.org/re ports",
            "spiffe://example.org/reports/",
            "https://example.org/reports",
            "spiffe://Example.org/reports",
        ] {
            let text = edit(
                "spiffe_id = \"spiffe://example.org/reports\"",
                &format!("spiffe_id = \"{bad}\""),
            );
            only_error(&text, "workload[0].spiffe_id");
        }
        ok(&edit(
            "spiffe_id = \"spiffe://example.org/reports\"",
            "spiffe_id = \"spiffe://example.org/ns/prod/sa/Reports_1.v2-x\"",
        ));
        let issue = only_error(
            &edit("spiffe://example.org/reports", "spiffe://other.org/reports"),
            "workload[0].spiffe_id",
        );
        assert!(
            issue.fix.contains("spiffe://example.org/reports"),
            "{issue:?}"
        );
    }

    #[test]
    fn referenced_secret_names_are_checked() {
        for bad in [
            "orders//app",
            "/orders",
            "orders/",
            "Orders/app",
            "orders/../app",
            "orders app",
            "",
        ] {
            let text = edit("secret = \"orders-db/app\"", &format!("secret = \"{bad}\""));
            only_error(&text, "route[0].credential.secret");
        }
        let text = format!(
            "{BASE}{}",
            edit_text(HTTP_ROUTE, "\"payments/token\"", "\"payments//token\"")
        );
        only_error(&text, "route[1].inject.secret");
        let long = format!("secret = \"{}\"", "a".repeat(129));
        only_error(
            &edit("secret = \"orders-db/app\"", &long),
            "route[0].credential.secret",
        );
        ok(&edit(
            "secret = \"orders-db/app\"",
            "secret = \"a.b_c-d/e/f9\"",
        ));
    }
}
