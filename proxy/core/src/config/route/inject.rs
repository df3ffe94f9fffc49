//! `route[].inject`: the HTTP header, query parameter or Basic login that an
//! http route adds, with its checks.

use std::time::Duration;

use serde::Deserialize;

use super::check_cache_ttl;
use crate::config::check::Checker;
use crate::config::duration::de_opt_duration;
use crate::config::names::{check_secret_name, is_http_token};

/// `route[].inject`: the HTTP header (or query parameter) warden adds.
/// Exactly one of `header`, `query`, `basic_user`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inject {
    /// Header name.
    #[serde(default)]
    pub header: Option<String>,
    /// Query parameter name (instead of a header).
    #[serde(default)]
    pub query: Option<String>,
    /// HTTP Basic auth: this user, the secret as password (`Authorization: Basic …`).
    #[serde(default)]
    pub basic_user: Option<String>,
    /// Header or parameter value; `{secret}` is replaced by the secret
    /// (default `"{secret}"`; not used with `basic_user`).
    #[serde(default)]
    pub value: Option<String>,
    /// Name of the secret.
    pub secret: String,
    /// How long a fetched secret may be reused.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub cache_ttl: Option<Duration>,
}

/// `route[i].inject`: the target, the value, the secret and its cache TTL.
pub(super) fn check_inject(c: &mut Checker<'_>, k: &str, inject: &Inject) {
    check_inject_target(c, k, inject);
    let value = inject.value.as_deref().unwrap_or("{secret}");
    if inject.basic_user.is_some() && inject.value.is_some() {
        c.error(
            format!("{k}.inject.value"),
            "value is not used with basic_user (the header is Basic base64(user:secret))",
            "remove value, or remove basic_user and write the whole header value",
        );
    } else if !value.contains("{secret}") {
        c.error(
            format!("{k}.inject.value"),
            format!(
                "value \"{value}\" does not contain {{secret}}, so the secret would never be sent"
            ),
            "include the placeholder, e.g. value = \"Bearer {secret}\"",
        );
    }
    if value
        .chars()
        .any(|ch| ch == '\r' || ch == '\n' || ch == '\0')
    {
        c.error(
            format!("{k}.inject.value"),
            "value contains a line break or NUL, which would corrupt the HTTP request",
            "remove the control characters from value",
        );
    }
    if let Err((problem, fix)) = check_secret_name(&inject.secret) {
        c.error(format!("{k}.inject.secret"), problem, fix);
    }
    check_cache_ttl(
        c,
        format!("{k}.inject.cache_ttl"),
        inject.cache_ttl,
        &inject.secret,
    );
}

/// `inject`: exactly one of header, query, basic_user, each well formed.
fn check_inject_target(c: &mut Checker<'_>, k: &str, inject: &Inject) {
    let set = [
        inject.header.is_some() && inject.basic_user.is_none(),
        inject.query.is_some(),
        inject.basic_user.is_some(),
    ];
    if set.iter().filter(|b| **b).count() != 1 {
        c.error(
            format!("{k}.inject"),
            "inject needs exactly one of header, query or basic_user",
            "write inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"NAME\" }, or query = \"api_key\", or basic_user = \"USER\"",
        );
    }
    if let Some(h) = &inject.header {
        if !is_http_token(h) {
            c.error(
                format!("{k}.inject.header"),
                format!("\"{h}\" is not a valid HTTP header name"),
                "use letters, digits and - only, e.g. header = \"Authorization\"",
            );
        }
    }
    if let Some(q) = &inject.query {
        if q.is_empty()
            || !q
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.~".contains(ch))
        {
            c.error(
                format!("{k}.inject.query"),
                format!("\"{q}\" is not a plain query parameter name"),
                "use letters, digits, -, _, . and ~ only, e.g. query = \"api_key\"",
            );
        }
    }
    if let Some(u) = &inject.basic_user {
        if u.is_empty() || u.contains(':') || u.chars().any(|ch| ch.is_control()) {
            c.error(
                format!("{k}.inject.basic_user"),
                format!("basic_user \"{u}\" is empty or contains ':' or control characters"),
                "set the user name the API expects, e.g. basic_user = \"svc-billing\"",
            );
        }
    }
}
