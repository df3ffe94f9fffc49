//! Loading and checking warden's configuration file.
//!
//! warden reads one TOML file. This module turns it into the typed [`Config`]
//! and checks it, so that `warden config check FILE` can explain every problem
//! with three things: the key path (`route[1].credential.cache_ttl`), what is
//! wrong, and how to fix it.
//!
//! Loading runs in three stages:
//!
//! 1. **Syntax.** The text is parsed as TOML. A syntax error is reported with
//!    its line and column, and with the key on that line when it can be found.
//! 2. **Shape.** The document is deserialised into [`Config`]. Every struct
//!    rejects unknown keys, so typos are caught; an unknown key gets a "did you
//!    mean" suggestion when a valid key is within two edits. serde stops at
//!    the first problem, so after each one the offending key is removed (or,
//!    for a typo, renamed to the key it was probably meant to be) and
//!    deserialisation is retried. That way several typos or wrong types are
//!    reported together, without follow-on noise such as "`listen` is missing"
//!    after "unknown key `lisen`".
//! 3. **Meaning.** The typed config is validated against warden's rules:
//!    names, SPIFFE IDs, listen addresses, references between routes,
//!    workloads and secrets, cache TTLs versus rotation periods, socket path
//!    lengths, and so on. Every problem is collected, not only the first.
//!
//! Relative paths (`data_dir`, `admin.socket`, `identity.workload_api_socket`,
//! `store.password_file`, `store.ca_file`, `route[].unix_socket`,
//! `route[].upstream_tls.ca_file`) are resolved against
//! the directory that holds the config file. `.` and `..` are removed as text,
//! without asking the filesystem, so the results are absolute paths.
//!
//! Bad input never panics. Every failure is returned as a [`ConfigReport`].
//!
//! The code follows those stages and the file's sections:
//!
//! - this file: [`Config`], [`load`] and [`parse_str`];
//! - `syntax`, `repair` and `suggest`: stages 1 and 2 (syntax errors, the
//!   repairing deserialiser, and the wording of fixes: key hints, "did you
//!   mean");
//! - `paths`: resolving relative paths before stage 3;
//! - `check`: stage 3's [`check::Checker`] and the order of the section checks;
//! - one file per section with its schema and its checks: `globals` (top-level
//!   keys, `[admin]`, `[metrics]`, `[identity]`, `[monitor]`, `[audit]`),
//!   `store` (`[store]`: the backend and its connection), `workload`, `secret`, `route` (with `route/credential` and
//!   `route/inject`), `anomaly` and `export`;
//! - value syntax shared by the sections: `names`, `address`, `duration`;
//! - `report`: [`ConfigIssue`] and [`ConfigReport`].

#[macro_use]
mod config_enum;

mod address;
mod anomaly;
mod check;
mod duration;
mod export;
mod globals;
mod names;
mod paths;
mod repair;
mod report;
mod route;
mod secret;
mod store;
mod suggest;
mod syntax;
#[cfg(test)]
mod test_util;
mod workload;

// Re-exported: what the rest of the crate names as `crate::config::X` (in a
// binary crate an unused re-export is a warning). The other schema types are
// reached through `Config`'s fields.
pub use address::url_for_display;
pub use anomaly::{Anomaly, AnomalyAction, AnomalyOverrides};
pub use duration::{format_duration, parse_duration};
pub use export::{
    Export, ExportKind, ExportSink, ExportStream, HeaderValue, SyslogAddress, SyslogFacility,
    DEFAULT_FILE_KEEP, DEFAULT_FILE_MAX_BYTES, DEFAULT_JOURNALD_SOCKET, DEFAULT_SYSLOG_ADDRESS,
};
pub use globals::{Admin, Audit, EbpfMode, Identity, Metrics, Monitor, ProtectMode};
pub use report::{ConfigIssue, ConfigReport};
pub use route::credential::{Dynamic, GrantMode};
pub use route::inject::Inject;
pub use route::redis::acl_rules as redis_acl_rules;
pub use route::{
    ClientTls, PoolConfig, PoolReset, PoolSettings, Route, RouteKind, TlsMode, TlsRouteMode,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_IDLE, DEFAULT_MAX_LIFETIME,
};
pub use secret::{RotateMethod, SecretPolicy};
pub use store::{
    parse_store_url, valid_credential_name, Store, StoreBackend, StoreTarget, StoreTls,
    DEFAULT_STALE_IF_ERROR,
};
pub use workload::Workload;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use check::validate;
use paths::{base_dir, normalise};
use repair::deserialize_repairing;
use syntax::syntax_issue;

/// Trust domain used when `trust_domain` is not set.
pub const DEFAULT_TRUST_DOMAIN: &str = "warden.local";
/// Secret environment used when `environment` is not set.
pub const DEFAULT_ENVIRONMENT: &str = "default";

/// The whole, checked configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// State directory, resolved to an absolute path against the config file's directory.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// SPIFFE trust domain of every issued identity.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Secret environment the daemon resolves secret names in.
    #[serde(default = "default_environment")]
    pub environment: String,
    /// Threads that serve PostgreSQL, MySQL and Redis sessions (`None`: half the cores, see
    /// [`Config::session_threads`]).
    #[serde(default)]
    pub session_threads: Option<u32>,
    /// `[admin]`
    #[serde(default)]
    pub admin: Admin,
    /// `[metrics]`
    #[serde(default)]
    pub metrics: Metrics,
    /// `[store]`
    #[serde(default)]
    pub store: Store,
    /// `[identity]`
    #[serde(default)]
    pub identity: Identity,
    /// `[monitor]`
    #[serde(default)]
    pub monitor: Monitor,
    /// `[audit]`
    #[serde(default)]
    pub audit: Audit,
    /// `[[workload]]` entries.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<Workload>,
    /// `[[secret]]` entries.
    #[serde(default, rename = "secret")]
    pub secrets: Vec<SecretPolicy>,
    /// `[[route]]` entries.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    /// `[anomaly]`
    #[serde(default)]
    pub anomaly: Anomaly,
    /// `[export]`
    #[serde(default)]
    pub export: Export,
    /// The file this config was read from (or the `origin` given to [`parse_str`]).
    #[serde(skip)]
    pub source: PathBuf,
    /// Problems that do not stop warden from running.
    #[serde(skip)]
    pub warnings: Vec<ConfigIssue>,
}

/// Most `session_threads` accepted.
pub const MAX_SESSION_THREADS: u32 = 64;

impl Config {
    /// Threads serving PostgreSQL, MySQL and Redis sessions: `session_threads`, else half the
    /// cores (at least 1, at most 8). warden shares its node with the
    /// workloads it serves and the databases they use: on a 2-core host one
    /// session thread leaves a core to them and blocks least often (one
    /// event loop sees every client's traffic); more threads help only when
    /// there are cores to spare.
    pub fn session_threads(&self) -> usize {
        match self.session_threads {
            Some(n) => n.clamp(1, MAX_SESSION_THREADS) as usize,
            None => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 8)),
        }
    }

    /// A config with every default and no workloads, secrets or routes.
    pub fn default_for(origin: &Path) -> Config {
        Config {
            data_dir: None,
            trust_domain: default_trust_domain(),
            environment: default_environment(),
            session_threads: None,
            admin: Admin::default(),
            metrics: Metrics::default(),
            store: Store::default(),
            identity: Identity::default(),
            monitor: Monitor::default(),
            audit: Audit::default(),
            workloads: Vec::new(),
            secrets: Vec::new(),
            routes: Vec::new(),
            anomaly: Anomaly::default(),
            export: Export::default(),
            source: origin.to_path_buf(),
            warnings: Vec::new(),
        }
    }
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_environment() -> String {
    DEFAULT_ENVIRONMENT.to_string()
}

/// Read, parse and check the config file at `path`.
///
/// Returns `Err` if the file cannot be read or has any error. Warnings alone
/// still give `Ok`, and are kept in [`Config::warnings`].
pub fn load(path: &Path) -> Result<Config, ConfigReport> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_str(&text, path),
        Err(err) => {
            let shown = path.display();
            let fix = match err.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "check the path {shown}, or create the file (examples/quickstart.toml is a starting point)"
                ),
                std::io::ErrorKind::PermissionDenied => format!(
                    "make {shown} readable by the user running warden (chmod 0640 and chown root:warden, for example)"
                ),
                std::io::ErrorKind::InvalidData => {
                    format!("save {shown} as UTF-8 text")
                }
                _ if path.is_dir() => {
                    format!("{shown} is a directory; pass the config file inside it")
                }
                _ => format!("check that {shown} is a readable regular file"),
            };
            Err(ConfigReport {
                file: path.to_path_buf(),
                errors: vec![ConfigIssue::new(
                    "",
                    format!("cannot read config file {shown}: {err}"),
                    fix,
                )],
                warnings: Vec::new(),
            })
        }
    }
}

/// Parse and check config text. `origin` names the file in messages, and
/// relative paths are resolved against its parent directory.
pub fn parse_str(text: &str, origin: &Path) -> Result<Config, ConfigReport> {
    let mut report = ConfigReport {
        file: origin.to_path_buf(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };

    // Stage 1: syntax.
    let table = match text.parse::<toml::Table>() {
        Ok(table) => table,
        Err(err) => {
            report.errors.push(syntax_issue(text, &err));
            return Err(report);
        }
    };

    // Stage 2: shape. `removed` lists keys dropped or renamed to get past a
    // shape error; later findings about those keys are side effects and are
    // left out.
    let mut removed: Vec<String> = Vec::new();
    let Some(mut config) = deserialize_repairing(text, table, &mut report.errors, &mut removed)
    else {
        return Err(report);
    };

    // Stage 3: meaning.
    config.source = origin.to_path_buf();
    normalise(&mut config, &base_dir(origin));
    let (errors, warnings) = validate(&config);
    // A finding at, inside or above a repaired key is a side effect of the repair.
    let relevant = |issue: &ConfigIssue| {
        !removed
            .iter()
            .any(|r| is_under(&issue.key, r) || (!issue.key.is_empty() && is_under(r, &issue.key)))
    };
    report
        .errors
        .extend(errors.into_iter().filter(|i| relevant(i)));
    report
        .warnings
        .extend(warnings.into_iter().filter(|i| relevant(i)));

    if report.errors.is_empty() {
        config.warnings = report.warnings;
        Ok(config)
    } else {
        Err(report)
    }
}

/// True when `key` is `parent` or lies inside it.
fn is_under(key: &str, parent: &str) -> bool {
    match key.strip_prefix(parent) {
        Some(rest) => rest.is_empty() || rest.starts_with('.') || rest.starts_with('['),
        None => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::{load, parse_str, Config};
    use crate::config::anomaly::AnomalyAction;
    use crate::config::globals::{
        AuditSync, EbpfMode, KeyType, ProtectMode, DEFAULT_METRICS_LISTEN,
    };
    use crate::config::route::{RouteKind, TlsMode};
    use crate::config::secret::RotateMethod;
    use crate::config::test_util::{
        edit, error_keys, ok, origin, parse, with_http, BASE, FULL, QUICKSTART,
    };

    #[test]
    fn full_example_parses_with_every_key() {
        let c = ok(FULL);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/warden")));
        assert_eq!(c.trust_domain, "example.org");
        assert_eq!(c.environment, "prod");
        assert_eq!(
            c.admin.socket,
            Some(PathBuf::from("/run/warden/admin.sock"))
        );
        assert_eq!(c.admin.group.as_deref(), Some("warden-admin"));
        assert_eq!(c.metrics.listen, Some(DEFAULT_METRICS_LISTEN));
        assert_eq!(c.store.max_versions, 10);
        assert_eq!(c.identity.svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.identity.key_type, KeyType::EcP256);
        assert_eq!(
            c.identity.workload_api_socket,
            Some(PathBuf::from("/run/warden/workload.sock"))
        );
        assert_eq!(c.monitor.ebpf, EbpfMode::Auto);
        assert_eq!(c.monitor.protect_upstreams, ProtectMode::Observe);
        assert_eq!(c.audit.sync, AuditSync::Interval);
        assert_eq!(
            c.audit.sync_window(),
            Some(std::time::Duration::from_millis(10))
        );

        assert_eq!(c.workloads.len(), 2);
        let w = &c.workloads[0];
        assert_eq!(w.name, "reports");
        assert_eq!(w.spiffe_id, "spiffe://example.org/reports");
        assert_eq!(w.selectors.uid, Some(1001));
        assert_eq!(w.selectors.gid, Some(1001));
        assert_eq!(w.selectors.exe_path, Some(PathBuf::from("/usr/bin/psql")));
        assert_eq!(w.selectors.exe_sha256.as_deref().map(str::len), Some(64));
        assert_eq!(w.selectors.systemd_unit.as_deref(), Some("reports.service"));
        assert_eq!(
            w.selectors.cgroup.as_deref(),
            Some("/system.slice/reports.service")
        );

        assert_eq!(c.secrets.len(), 2);
        assert_eq!(c.secrets[0].name, "orders-db/app");
        assert_eq!(
            c.secrets[0].rotation_period,
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(c.secrets[0].max_versions, Some(5));

        let rot = c.secrets[0].rotate.as_ref().unwrap();
        assert_eq!(rot.method, RotateMethod::Postgres);
        assert_eq!(rot.route.as_deref(), Some("orders-db"));
        assert_eq!(c.routes.len(), 6);
        let d = c.routes[5]
            .credential
            .as_ref()
            .unwrap()
            .dynamic
            .as_ref()
            .unwrap();
        assert_eq!(d.ttl(), Duration::from_secs(3600));
        assert_eq!(d.max_ttl(), Duration::from_secs(86_400));
        assert_eq!(d.grants.len(), 2);
        assert_eq!(d.database.as_deref(), Some("warehouse"));
        assert_eq!(d.reassign_owned_to.as_deref(), Some("warehouse_owner"));
        assert_eq!(d.role_prefix(), "warden_");
        let pg = &c.routes[0];
        assert_eq!(pg.kind, RouteKind::Postgres);
        assert_eq!(pg.listen, "127.0.0.1:15432".parse().unwrap());
        assert_eq!(pg.unix_socket, Some(PathBuf::from("/run/warden/pg")));
        assert_eq!(
            pg.upstream_host_port(),
            Ok(("db.internal".to_string(), 5432))
        );
        assert_eq!(pg.upstream_tls.mode, TlsMode::VerifyFull);
        assert_eq!(
            pg.upstream_tls.ca_file,
            Some(PathBuf::from("/etc/warden/db-ca.pem"))
        );
        let cred = pg.credential.as_ref().unwrap();
        assert_eq!(cred.user, "app");
        assert_eq!(cred.secret, "orders-db/app");
        assert_eq!(cred.cache_ttl, Some(Duration::from_secs(300)));
        assert_eq!(pg.allow, vec!["reports"]);
        assert!(!pg.allow_non_loopback);

        let http = &c.routes[1];
        assert_eq!(http.kind, RouteKind::Http);
        let inject = http.inject.as_ref().unwrap();
        assert_eq!(inject.header.as_deref(), Some("Authorization"));
        assert_eq!(inject.value.as_deref(), Some("Bearer {secret}"));
        assert_eq!(inject.secret, "payments/api-token");
        assert_eq!(inject.cache_ttl, Some(Duration::from_secs(900)));
        assert_eq!(http.secret_name(), Some("payments/api-token"));
        assert_eq!(
            http.upstream_host_port(),
            Ok(("payments.internal".to_string(), 8443))
        );
        assert!(c.routes[2].forward_proxy);
        assert_eq!(c.routes[2].tunnel, vec!["github.com:443".to_string()]);
        assert_eq!(
            c.routes[2].inject.as_ref().and_then(|i| i.query.as_deref()),
            Some("api_key")
        );
        assert_eq!(c.routes[1].request_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.routes[3].kind, RouteKind::Tls);
        assert_eq!(c.routes[3].upstream_tls.mode, TlsMode::VerifyFull);
        assert_eq!(c.routes[4].kind, RouteKind::Mysql);
        assert_eq!(
            c.routes[4].upstream_host_port(),
            Ok(("shop-db.internal".to_string(), 3306))
        );

        assert_eq!(
            c.anomaly.webhook.as_deref(),
            Some("http://127.0.0.1:9000/alerts")
        );
        let rule = c.anomaly.distinct_secrets_per_minute.as_ref().unwrap();
        assert_eq!(rule.limit, 100);
        assert_eq!(rule.action, AnomalyAction::Freeze);
        let x = &c.export;
        assert_eq!(
            (x.queue(), x.rate_per_workload(), x.burst()),
            (8192, 100, 200)
        );
        let kinds: Vec<&str> = x.sinks.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, vec!["file", "journald", "syslog", "otlp"]);
        assert_eq!(x.sinks[3].name(), "collector");
        assert_eq!(c.source, origin());
    }

    #[test]
    fn quickstart_example_is_valid_and_resolves_paths() {
        let c = parse_str(
            QUICKSTART,
            Path::new("/srv/warden/examples/quickstart.toml"),
        )
        .unwrap_or_else(|r| panic!("{r}"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.trust_domain, "warden.local");
        assert_eq!(c.environment, "dev");
        assert_eq!(
            c.data_dir,
            Some(PathBuf::from("/srv/warden/.warden-demo/data"))
        );
        assert_eq!(
            c.admin.socket,
            Some(PathBuf::from("/srv/warden/.warden-demo/admin.sock"))
        );
        assert_eq!(c.workloads[0].name, "demo");
        assert_eq!(c.routes[0].name, "demo-db");
        assert_eq!(c.routes[0].upstream_tls.mode, TlsMode::Disable);
        assert_eq!(
            c.routes[0].credential.as_ref().and_then(|cr| cr.cache_ttl),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = ok("");
        assert_eq!(c, Config::default_for(&origin()));
        assert_eq!(c.trust_domain, "warden.local");
        assert_eq!(c.environment, "default");
        assert_eq!(c.metrics.listen, Some(DEFAULT_METRICS_LISTEN));
        assert_eq!(c.store.max_versions, 10);
        assert_eq!(c.identity.svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.identity.key_type, KeyType::EcP256);
        assert_eq!(c.monitor.ebpf, EbpfMode::Auto);
        assert_eq!(c.monitor.protect_upstreams, ProtectMode::Observe);
        assert_eq!(c.data_dir, None);
        assert!(c.workloads.is_empty() && c.routes.is_empty() && c.secrets.is_empty());
    }

    #[test]
    fn base_fixture_is_valid() {
        let c = ok(BASE);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = ok(&with_http());
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn load_reads_files_and_reports_unreadable_ones() {
        let dir = std::env::temp_dir().join(format!("warden-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("warden.toml");
        std::fs::write(&file, "data_dir = \"data\"\n").unwrap();
        let c = load(&file).unwrap();
        assert_eq!(c.data_dir, Some(dir.join("data")));
        assert_eq!(c.source, file);

        let missing = dir.join("missing.toml");
        let r = load(&missing).unwrap_err();
        assert_eq!(r.file, missing);
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].key, "");
        assert!(r.errors[0].problem.contains("cannot read"), "{r}");
        assert!(r.errors[0].fix.contains("check the path"), "{r}");

        let r = load(&dir).unwrap_err();
        assert!(r.errors[0].problem.contains("cannot read"), "{r}");

        std::fs::write(&file, [0xffu8, 0xfe, 0x00]).unwrap();
        let r = load(&file).unwrap_err();
        assert!(r.errors[0].fix.contains("UTF-8"), "{r}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shape_and_semantic_errors_are_reported_together() {
        let text = edit("[[secret]]", "[store]\nmax_versions = \"ten\"\n[[secret]]")
            .replace("trust_domain = \"example.org\"", "trust_domain = \"Bad\"")
            .replace("allow = [\"reports\"]", "allow = [\"reprots\"]");
        let mut keys = error_keys(&text);
        keys.sort();
        // An invalid trust_domain is not re-reported against every spiffe_id.
        assert_eq!(
            keys,
            vec!["route[0].allow[0]", "store.max_versions", "trust_domain"]
        );
    }

    #[test]
    fn all_semantic_errors_are_reported_together() {
        let text = r#"
trust_domain = "example.org"
[store]
max_versions = 0
[identity]
svid_ttl = "10s"
[[workload]]
name = "Bad Name"
spiffe_id = "spiffe://other.org/x"
[[secret]]
name = "s/one"
rotation_period = "1h"
[[route]]
name = "r"
kind = "postgres"
listen = "0.0.0.0:5000"
upstream = "db"
credential = { user = "app", secret = "s/one", cache_ttl = "2h" }
allow = ["nobody"]
[[route]]
name = "r"
kind = "http"
listen = "127.0.0.1:5000"
upstream = "ftp://x"
unix_socket = "/run/x"
allow = ["Bad Name"]
"#;
        let keys = error_keys(text);
        let expected = [
            "store.max_versions",
            "identity.svid_ttl",
            "workload[0].name",
            "workload[0].spiffe_id",
            "workload[0].selectors",
            "route[0].listen",
            "route[0].upstream",
            "route[0].credential.cache_ttl",
            "route[0].allow[0]",
            "route[1].name",
            "route[1].listen",
            "route[1].unix_socket",
            "route[1].upstream",
            "route[1].inject",
        ];
        let mut got = keys.clone();
        got.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn arbitrary_prefixes_never_panic() {
        for (i, _) in FULL.char_indices() {
            let _ = parse(&FULL[..i]);
        }
        for junk in [
            "\u{0}",
            "[[",
            "=",
            "a.b.c = 1\na = 2",
            "route = 5",
            "[[route]]\n[[route]]",
        ] {
            let _ = parse(junk);
        }
    }
}
