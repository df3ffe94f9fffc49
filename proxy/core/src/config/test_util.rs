//! Fixtures and helpers shared by the config unit tests: the example files,
//! a small valid config (`BASE`) that rule tests edit, and assertions on reports.

use std::path::PathBuf;

use super::report::{ConfigIssue, ConfigReport};
use super::{parse_str, Config};

pub(super) const FULL: &str = include_str!("../../../../examples/full.toml");
pub(super) const QUICKSTART: &str = include_str!("../../../../examples/quickstart.toml");

/// A small valid config that the rule tests edit.
pub(super) const BASE: &str = r#"
trust_domain = "example.org"

[[workload]]
name = "reports"
spiffe_id = "spiffe://example.org/reports"
selectors = { uid = 1001 }

[[secret]]
name = "orders-db/app"
rotation_period = "1h"

[[route]]
name = "orders-db"
kind = "postgres"
listen = "127.0.0.1:15432"
upstream = "db.internal:5432"
credential = { user = "app", secret = "orders-db/app", cache_ttl = "5m" }
allow = ["reports"]
"#;

pub(super) const HTTP_ROUTE: &str = r#"
[[route]]
name = "payments"
kind = "http"
listen = "127.0.0.1:18080"
upstream = "https://payments.internal"
inject = { header = "Authorization", value = "Bearer {secret}", secret = "payments/token" }
allow = ["reports"]
"#;

pub(super) fn origin() -> PathBuf {
    PathBuf::from("/etc/warden/warden.toml")
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigReport> {
    parse_str(text, &origin())
}

pub(super) fn ok(text: &str) -> Config {
    match parse(text) {
        Ok(config) => config,
        Err(report) => panic!("expected a valid config, got:\n{report}"),
    }
}

pub(super) fn report(text: &str) -> ConfigReport {
    match parse(text) {
        Ok(config) => panic!("expected errors, got a valid config: {config:#?}"),
        Err(report) => report,
    }
}

pub(super) fn error_keys(text: &str) -> Vec<String> {
    report(text).errors.into_iter().map(|i| i.key).collect()
}

/// Exactly one error, at `key`; returns it.
pub(super) fn only_error(text: &str, key: &str) -> ConfigIssue {
    let r = report(text);
    let keys: Vec<&str> = r.errors.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, vec![key], "full report:\n{r}");
    r.errors.into_iter().next().unwrap()
}

/// `BASE` with one textual replacement (which must apply).
pub(super) fn edit(from: &str, to: &str) -> String {
    edit_text(BASE, from, to)
}

pub(super) fn edit_text(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "test bug: {from:?} not in text");
    text.replacen(from, to, 1)
}

pub(super) fn with_http() -> String {
    format!("{BASE}{HTTP_ROUTE}")
}

pub(super) fn warning_keys(config: &Config) -> Vec<&str> {
    config.warnings.iter().map(|i| i.key.as_str()).collect()
}
