//! `[anomaly]`: detection of unusual secret access — the global rules, their
//! per-workload overrides, and their checks.

use std::time::Duration;

use serde::Deserialize;

use super::address::parse_http_url;
use super::check::Checker;
use super::duration::de_opt_duration;

config_enum! {
    /// Response when an anomaly rule fires (`anomaly.*.action`).
    #[derive(Default)]
    AnomalyAction {
        /// Write a log line.
        Log => "log",
        /// Log and POST to `anomaly.webhook` (the default).
        #[default]
        Alert => "alert",
        /// Alert and stop handing out secrets to the offending workload.
        Freeze => "freeze",
    }
}

/// `[anomaly]`: detection of unusual secret access.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Anomaly {
    /// URL that alerts are POSTed to.
    pub webhook: Option<String>,
    /// Fires when one workload reads more distinct secrets in a minute than `limit`.
    pub distinct_secrets_per_minute: Option<AnomalyRule>,
    /// `false` turns every rule off (default `true`).
    pub enabled: Option<bool>,
    /// A freeze also suspends the workload's cgroups (`cgroup.freeze`); default `false`.
    pub suspend: Option<bool>,
    /// Session rate above the workload's learned baseline.
    pub session_rate: Option<RateRule>,
    /// A new executable (SHA-256) using an identity that has been stable.
    pub new_executable: Option<ExeRule>,
    /// Policy denials from one process or cgroup in a minute (`limit`).
    pub denials_per_minute: Option<AnomalyRule>,
    /// Direct connection attempts to a protected upstream (eBPF monitor).
    pub bypass: Option<ActionRule>,
    /// Per-workload overrides: `[anomaly.workloads.NAME]`.
    pub workloads: std::collections::BTreeMap<String, AnomalyOverrides>,
}

/// Rules of one workload under `[anomaly.workloads.NAME]` (unset: the global rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyOverrides {
    pub distinct_secrets_per_minute: Option<AnomalyRule>,
    pub session_rate: Option<RateRule>,
    pub new_executable: Option<ExeRule>,
    pub denials_per_minute: Option<AnomalyRule>,
    pub bypass: Option<ActionRule>,
}

/// `anomaly.session_rate`: sessions per `interval` above EWMA mean + `sigmas`·σ.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    /// Width of one counting interval (default 10s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub interval: Option<Duration>,
    /// Intervals learned before the rule may fire (default 30).
    pub warmup: Option<u32>,
    /// How many standard deviations above the mean fire (default 4).
    pub sigmas: Option<u32>,
    /// Never fires below this many sessions in one interval (default 20).
    pub min_sessions: Option<u32>,
    /// Response (default `alert`).
    #[serde(default)]
    pub action: AnomalyAction,
}

/// `anomaly.new_executable`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExeRule {
    /// How long a workload must have used only known executables (default 10m).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub stable_after: Option<Duration>,
    /// Response (default `alert`).
    #[serde(default)]
    pub action: AnomalyAction,
}

/// A rule that only has an action (`anomaly.bypass`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRule {
    /// Response (default `alert`).
    #[serde(default)]
    pub action: AnomalyAction,
}

/// A threshold rule under `[anomaly]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyRule {
    /// Threshold (at least 1).
    pub limit: u32,
    /// Response (default `alert`).
    #[serde(default)]
    pub action: AnomalyAction,
}

pub(super) fn check_anomaly(c: &mut Checker<'_>) {
    let cfg = c.config;
    if let Some(url) = &cfg.anomaly.webhook {
        match parse_http_url(url) {
            Err(problem) => c.error(
                "anomaly.webhook",
                format!("webhook \"{url}\" {problem}"),
                "use an http:// or https:// URL, e.g. webhook = \"http://127.0.0.1:9000/alerts\"",
            ),
            Ok(u) if u.https => c.error(
                "anomaly.webhook",
                format!(
                    "webhook \"{url}\" uses https://, which alert delivery does not support yet"
                ),
                "use an http:// URL (e.g. a local relay on 127.0.0.1) for now",
            ),
            Ok(_) => {}
        }
    }
    let a = &cfg.anomaly;
    let global = AnomalyOverrides {
        distinct_secrets_per_minute: a.distinct_secrets_per_minute.clone(),
        session_rate: a.session_rate.clone(),
        new_executable: a.new_executable.clone(),
        denials_per_minute: a.denials_per_minute.clone(),
        bypass: a.bypass.clone(),
    };
    check_anomaly_rules(c, "anomaly", &global);
    for (name, rules) in &a.workloads {
        let prefix = format!("anomaly.workloads.{name}");
        if !cfg.workloads.iter().any(|w| &w.name == name) {
            c.error(
                prefix.clone(),
                format!("no [[workload]] is named {name:?}"),
                "use the name of a [[workload]], or remove the table",
            );
        }
        check_anomaly_rules(c, &prefix, rules);
    }
}

fn check_anomaly_rules(c: &mut Checker<'_>, prefix: &str, r: &AnomalyOverrides) {
    let no_webhook = c.config.anomaly.webhook.is_none();
    let mut actions: Vec<(&str, AnomalyAction)> = Vec::new();
    for (key, rule) in [
        (
            "distinct_secrets_per_minute",
            &r.distinct_secrets_per_minute,
        ),
        ("denials_per_minute", &r.denials_per_minute),
    ] {
        if let Some(rule) = rule {
            if rule.limit == 0 {
                c.error(
                    format!("{prefix}.{key}.limit"),
                    "limit is 0, so the rule would fire on every event",
                    "set limit to at least 1, e.g. limit = 100",
                );
            } else if rule.limit > 10_000 {
                c.error(
                    format!("{prefix}.{key}.limit"),
                    format!("limit {} is above the maximum of 10000", rule.limit),
                    "set limit to at most 10000",
                );
            }
            actions.push((key, rule.action));
        }
    }
    if let Some(rate) = &r.session_rate {
        if rate.interval.is_some_and(|d| d < Duration::from_secs(1)) {
            c.error(
                format!("{prefix}.session_rate.interval"),
                "interval is shorter than 1s",
                "set interval to at least \"1s\", e.g. interval = \"10s\"",
            );
        }
        if rate.warmup == Some(0) {
            c.error(
                format!("{prefix}.session_rate.warmup"),
                "warmup = 0 would judge the rate before any baseline is learned",
                "set warmup to at least 1 interval, e.g. warmup = 30",
            );
        }
        if rate.sigmas == Some(0) {
            c.error(
                format!("{prefix}.session_rate.sigmas"),
                "sigmas = 0 fires whenever the rate is above its mean",
                "set sigmas to at least 1, e.g. sigmas = 4",
            );
        }
        actions.push(("session_rate", rate.action));
    }
    if let Some(exe) = &r.new_executable {
        if exe.stable_after == Some(Duration::ZERO) {
            c.error(
                format!("{prefix}.new_executable.stable_after"),
                "stable_after = 0 treats the first executable as an anomaly",
                "set a duration, e.g. stable_after = \"10m\"",
            );
        }
        actions.push(("new_executable", exe.action));
    }
    if let Some(b) = &r.bypass {
        actions.push(("bypass", b.action));
    }
    for (key, action) in actions {
        if action == AnomalyAction::Alert && no_webhook {
            c.warn(
                format!("{prefix}.{key}.action"),
                "action = \"alert\" but anomaly.webhook is not set, so alerts only reach the log",
                "set anomaly.webhook, or use action = \"log\"",
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{ok, warning_keys};

    #[test]
    fn alert_without_webhook_and_public_metrics_warn() {
        let c = ok("[anomaly]\ndistinct_secrets_per_minute = { limit = 5 }\n[metrics]\nlisten = \"0.0.0.0:9477\"\n");
        let mut keys = warning_keys(&c);
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                "anomaly.distinct_secrets_per_minute.action",
                "metrics.listen"
            ]
        );
    }
}
