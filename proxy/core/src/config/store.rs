//! `[store]`: where secrets, versions, metadata and lease rows live — the
//! embedded SQLite file (the default) or a PostgreSQL database shared by
//! several nodes — and how many versions are kept. Its schema, defaults and
//! checks. The filesystem and the network are never consulted here: the
//! password file is read and the server reached when the store is opened.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::address::is_loopback_host;
use super::check::Checker;
use super::duration::format_duration;
use super::globals::{DEFAULT_MAX_VERSIONS, MAX_VERSIONS_LIMIT};

config_enum! {
    /// Which database holds the store (`store.backend`).
    #[derive(Default)]
    StoreBackend {
        /// `store.db` in the data dir (the default).
        #[default]
        Sqlite => "sqlite",
        /// A PostgreSQL database, shareable by several nodes.
        Postgres => "postgres",
    }
}

config_enum! {
    /// TLS towards the PostgreSQL store (`store.tls`).
    #[derive(Default)]
    StoreTls {
        /// Chain and host name checked (the default).
        #[default]
        VerifyFull => "verify-full",
        /// Chain checked, host name not.
        VerifyCa => "verify-ca",
        /// Plaintext: only for a server on this host.
        Disable => "disable",
    }
}

/// Connection parameters warden sets itself, refused inside `store.url`.
const URL_KEYS_OWNED: &[(&str, &str)] = &[
    ("sslmode", "store.tls"),
    ("sslrootcert", "store.ca_file"),
    ("sslcert", "store.tls"),
    ("sslkey", "store.tls"),
    ("sslnegotiation", "store.tls"),
    ("passfile", "store.password_file"),
];

/// `[store]`: the secret store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    /// Versions kept per secret (1..=1000).
    pub max_versions: u32,
    /// `sqlite` (default) or `postgres`.
    pub backend: StoreBackend,
    /// PostgreSQL connection URL or `key=value` string, without a password.
    pub url: Option<String>,
    /// File holding the PostgreSQL password (absolute after loading).
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding the password
    /// (`$CREDENTIALS_DIRECTORY/<name>`).
    pub password_credential: Option<String>,
    /// TLS mode towards the PostgreSQL server.
    pub tls: StoreTls,
    /// CA bundle for `verify-full`/`verify-ca` (absolute after loading); the
    /// system bundle when unset.
    pub ca_file: Option<PathBuf>,
    /// How long past its `cache_ttl` a cached credential is still served
    /// while the PostgreSQL store is unreachable (`0s`: never).
    #[serde(deserialize_with = "super::duration::de_duration")]
    pub stale_if_error: Duration,
}

/// `store.stale_if_error` when unset.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);
/// The longest accepted `store.stale_if_error`.
pub const MAX_STALE_IF_ERROR: Duration = Duration::from_secs(24 * 3600);

impl Default for Store {
    fn default() -> Self {
        Store {
            max_versions: DEFAULT_MAX_VERSIONS,
            backend: StoreBackend::default(),
            url: None,
            password_file: None,
            password_credential: None,
            tls: StoreTls::default(),
            ca_file: None,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
        }
    }
}

/// Where a PostgreSQL store connects to, for checks and messages: every host
/// (a unix socket directory starts with `/`) and port, the database and user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTarget {
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub dbname: String,
    pub user: String,
}

impl StoreTarget {
    /// `host:port[,host:port…]/dbname`, for messages (never a password).
    pub fn display(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = self
                    .ports
                    .get(i)
                    .or(self.ports.first())
                    .copied()
                    .unwrap_or(5432);
                if h.contains(':') && !h.starts_with('/') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                }
            })
            .collect();
        format!("{}/{}", hosts.join(","), self.dbname)
    }

    /// Whether every host is on this machine (loopback or a unix socket).
    pub fn all_local(&self) -> bool {
        self.hosts
            .iter()
            .all(|h| h.starts_with('/') || is_loopback_host(h))
    }

    /// Whether any host is a unix socket directory.
    pub fn any_unix_socket(&self) -> bool {
        self.hosts.iter().any(|h| h.starts_with('/'))
    }
}

/// Parses `store.url` far enough to check it: (problem, fix) on failure.
/// The messages never repeat the URL (it might hold a password).
pub fn parse_store_url(url: &str) -> Result<StoreTarget, (String, String)> {
    let example = "url = \"postgresql://warden@db.example.com:5432/warden\"";
    let lower = url.to_ascii_lowercase();
    for (param, key) in URL_KEYS_OWNED {
        if lower.contains(&format!("{param}=")) {
            return Err((
                format!("store.url sets {param}, which warden sets itself from {key}"),
                format!("remove {param} from the URL and set {key} instead"),
            ));
        }
    }
    let config = tokio_postgres::Config::from_str(url).map_err(|e| {
        (
            format!("store.url is not a PostgreSQL connection URL ({e})"),
            format!("write it as {example} (the password goes into store.password_file)"),
        )
    })?;
    if config.get_password().is_some() {
        return Err((
            "store.url contains a password: anyone who can read the config file could read it"
                .to_string(),
            "remove the password from the URL and put it in a file named by store.password_file (mode 0600), or in a systemd credential named by store.password_credential".to_string(),
        ));
    }
    let mut hosts = Vec::new();
    for h in config.get_hosts() {
        match h {
            tokio_postgres::config::Host::Tcp(name) => hosts.push(name.clone()),
            tokio_postgres::config::Host::Unix(dir) => {
                hosts.push(dir.to_string_lossy().into_owned())
            }
        }
    }
    if hosts.is_empty() {
        return Err((
            "store.url names no host".to_string(),
            format!("name the server, e.g. {example}"),
        ));
    }
    if !config.get_hostaddrs().is_empty() {
        return Err((
            "store.url sets hostaddr, which bypasses the host name TLS verifies".to_string(),
            "remove hostaddr and put the address (or a name that resolves to it) in the host part"
                .to_string(),
        ));
    }
    let user = config.get_user().unwrap_or_default().to_string();
    if user.is_empty() {
        return Err((
            "store.url names no user".to_string(),
            format!("put the role before the host, e.g. {example}"),
        ));
    }
    let dbname = config.get_dbname().unwrap_or_default().to_string();
    if dbname.is_empty() {
        return Err((
            "store.url names no database".to_string(),
            format!("put the database after the host, e.g. {example}"),
        ));
    }
    Ok(StoreTarget {
        hosts,
        ports: config.get_ports().to_vec(),
        dbname,
        user,
    })
}

/// `[store]`: the version limit, and the backend's keys fitting together.
pub(super) fn check_store(c: &mut Checker<'_>) {
    let s = &c.config.store;
    let max = s.max_versions;
    if !(1..=MAX_VERSIONS_LIMIT).contains(&max) {
        c.error(
            "store.max_versions",
            format!("store.max_versions is {max}; it must be between 1 and {MAX_VERSIONS_LIMIT}"),
            format!("set max_versions to a value from 1 to {MAX_VERSIONS_LIMIT} (default {DEFAULT_MAX_VERSIONS})"),
        );
    }

    if s.stale_if_error > MAX_STALE_IF_ERROR {
        c.error(
            "store.stale_if_error",
            format!(
                "store.stale_if_error is {}; it must be at most {}: a node cut off from the store would keep serving credentials that may have been changed or revoked elsewhere",
                format_duration(s.stale_if_error),
                format_duration(MAX_STALE_IF_ERROR)
            ),
            format!(
                "set stale_if_error to a few minutes (default {}), or \"0s\" to refuse sessions as soon as a cached credential's cache_ttl ends",
                format_duration(DEFAULT_STALE_IF_ERROR)
            ),
        );
    }

    if s.backend == StoreBackend::Sqlite {
        let postgres_only = [
            ("store.url", s.url.is_some()),
            ("store.password_file", s.password_file.is_some()),
            ("store.password_credential", s.password_credential.is_some()),
            ("store.ca_file", s.ca_file.is_some()),
            ("store.tls", s.tls != StoreTls::default()),
            (
                "store.stale_if_error",
                s.stale_if_error != DEFAULT_STALE_IF_ERROR,
            ),
        ];
        for (key, set) in postgres_only {
            if set {
                c.error(
                    key,
                    format!("{key} is set but store.backend is \"sqlite\", which does not use it"),
                    "set backend = \"postgres\" to use a PostgreSQL store, or remove the key",
                );
            }
        }
        return;
    }

    let target = match &s.url {
        None => {
            c.error(
                "store.url",
                "store.backend is \"postgres\" but store.url is not set",
                "set url = \"postgresql://warden@db.example.com:5432/warden\"",
            );
            None
        }
        Some(url) => match parse_store_url(url) {
            Ok(t) => Some(t),
            Err((problem, fix)) => {
                c.error("store.url", problem, fix);
                None
            }
        },
    };

    match (&s.password_file, &s.password_credential) {
        (Some(_), Some(_)) => c.error(
            "store.password_credential",
            "both store.password_file and store.password_credential are set",
            "keep one: password_credential for a systemd credential, password_file otherwise",
        ),
        (Some(p), None) if p.as_os_str().is_empty() => c.error(
            "store.password_file",
            "store.password_file is empty",
            "set password_file = \"/etc/warden/store-password\" (mode 0600), or remove the key",
        ),
        (None, Some(name)) if !valid_credential_name(name) => c.error(
            "store.password_credential",
            format!("\"{name}\" is not a systemd credential name"),
            "use a plain name such as \"warden-store-password\" (no / and not . or ..), as given to LoadCredential=",
        ),
        _ => {}
    }

    if let Some(p) = &s.ca_file {
        if p.as_os_str().is_empty() {
            c.error(
                "store.ca_file",
                "store.ca_file is empty",
                "set ca_file = \"/etc/warden/store-ca.pem\", or remove the key to use the system bundle",
            );
        } else if s.tls == StoreTls::Disable {
            c.error(
                "store.ca_file",
                "store.ca_file is set but store.tls is \"disable\"",
                "set tls = \"verify-full\" to use it, or remove ca_file",
            );
        }
    }

    if let Some(t) = target {
        if s.tls == StoreTls::Disable && !t.all_local() {
            c.error(
                "store.tls",
                format!(
                    "store.tls is \"disable\" but the store server {} is not on this host: secrets' sealed rows and the store password would cross the network in plaintext",
                    t.display()
                ),
                "use tls = \"verify-full\" (the default) with ca_file, or \"disable\" only for a server on 127.0.0.1, ::1, localhost or a unix socket",
            );
        }
        if s.tls != StoreTls::Disable && t.any_unix_socket() {
            c.error(
                "store.tls",
                format!(
                    "store.tls is \"{}\" but store.url connects through a unix socket, where PostgreSQL offers no TLS",
                    s.tls
                ),
                "set tls = \"disable\" for a unix socket, or connect over TCP",
            );
        }
    }
}

/// A systemd credential name: a file name inside `$CREDENTIALS_DIRECTORY`.
pub fn valid_credential_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(|ch| ch.is_control() || ch.is_whitespace())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::PathBuf;

    use super::{parse_store_url, StoreBackend, StoreTls};
    use crate::config::test_util::{ok, only_error};

    const PG: &str = "[store]\nbackend = \"postgres\"\n";

    #[test]
    fn sqlite_is_the_default_and_takes_no_postgres_keys() {
        let c = ok("");
        assert_eq!(c.store.backend, StoreBackend::Sqlite);
        assert_eq!(c.store.tls, StoreTls::VerifyFull);
        for key in [
            "url = \"postgresql://w@db/w\"",
            "password_file = \"/p\"",
            "tls = \"disable\"",
        ] {
            let k = key.split(' ').next().unwrap();
            let issue = only_error(&format!("[store]\n{key}\n"), &format!("store.{k}"));
            assert!(issue.fix.contains("backend = \"postgres\""), "{issue:?}");
        }
    }

    #[test]
    fn postgres_store_keys() {
        let c = ok(&format!(
            "{PG}url = \"postgresql://warden@db.example.com:5433/fleet\"\npassword_file = \"store-pw\"\nca_file = \"ca.pem\"\ntls = \"verify-ca\"\n"
        ));
        assert_eq!(c.store.backend, StoreBackend::Postgres);
        assert_eq!(c.store.tls, StoreTls::VerifyCa);
        // Relative paths resolve against the config file's directory.
        assert_eq!(
            c.store.password_file,
            Some(PathBuf::from("/etc/warden/store-pw"))
        );
        assert_eq!(c.store.ca_file, Some(PathBuf::from("/etc/warden/ca.pem")));
        let t = parse_store_url(c.store.url.as_deref().unwrap()).unwrap();
        assert_eq!(t.display(), "db.example.com:5433/fleet");
        assert_eq!(t.user, "warden");
        ok(&format!(
            "{PG}url = \"host=127.0.0.1 user=w dbname=w\"\ntls = \"disable\"\npassword_credential = \"store-pw\"\n"
        ));
        ok(&format!(
            "{PG}url = \"postgresql://w@localhost/w\"\ntls = \"disable\"\n"
        ));
        ok(&format!(
            "{PG}url = \"postgresql://w@[::1]:6000/w\"\ntls = \"disable\"\n"
        ));
        ok(&format!(
            "{PG}url = \"postgresql://w@%2Frun%2Fpostgresql/w\"\ntls = \"disable\"\n"
        ));
    }

    #[test]
    fn stale_if_error_is_a_bounded_duration_for_postgres() {
        let base = format!("{PG}url = \"postgresql://w@localhost/w\"\ntls = \"disable\"\n");
        assert_eq!(
            ok(&base).store.stale_if_error,
            super::DEFAULT_STALE_IF_ERROR
        );
        let c = ok(&format!("{base}stale_if_error = \"30s\"\n"));
        assert_eq!(c.store.stale_if_error, std::time::Duration::from_secs(30));
        ok(&format!("{base}stale_if_error = \"0s\"\n"));
        let e = only_error(
            &format!("{base}stale_if_error = \"25h\"\n"),
            "store.stale_if_error",
        );
        assert!(e.problem.contains("at most 1d"), "{e:?}");
        assert!(e.fix.contains("\"0s\""), "{e:?}");
        only_error(
            &format!("{base}stale_if_error = \"ten minutes\"\n"),
            "store.stale_if_error",
        );
        // Only a shared store has outages to ride out.
        let e = only_error("[store]\nstale_if_error = \"1m\"\n", "store.stale_if_error");
        assert!(e.fix.contains("backend = \"postgres\""), "{e:?}");
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_repeating_it() {
        for url in [
            "postgresql://warden:hunter2-pw@db.example.com/warden",
            "host=db.example.com user=warden password=hunter2-pw dbname=warden",
        ] {
            let issue = only_error(&format!("{PG}url = \"{url}\"\n"), "store.url");
            assert!(issue.problem.contains("password"), "{issue:?}");
            assert!(issue.fix.contains("store.password_file"), "{issue:?}");
            let all = format!("{issue:?}");
            assert!(!all.contains("hunter2"), "{all}");
        }
    }

    #[test]
    fn bad_store_values_name_their_key() {
        let e = only_error(PG, "store.url");
        assert!(e.fix.contains("postgresql://"), "{e:?}");
        let e = only_error(
            &format!("{PG}url = \"postgresql://db.example.com/w\"\n"),
            "store.url",
        );
        assert!(e.problem.contains("no user"), "{e:?}");
        let e = only_error(
            &format!("{PG}url = \"postgresql://w@db.example.com\"\n"),
            "store.url",
        );
        assert!(e.problem.contains("no database"), "{e:?}");
        let e = only_error(
            &format!("{PG}url = \"postgresql://w@db:notaport/w\"\n"),
            "store.url",
        );
        assert!(
            e.problem.contains("not a PostgreSQL connection URL"),
            "{e:?}"
        );
        let e = only_error(
            &format!("{PG}url = \"postgresql://w@db.example.com/w?sslmode=verify-full\"\n"),
            "store.url",
        );
        assert!(e.fix.contains("store.tls"), "{e:?}");
        let e = only_error(
            &format!("{PG}url = \"postgresql://w@db.example.com/w\"\ntls = \"disable\"\n"),
            "store.tls",
        );
        assert!(e.problem.contains("db.example.com:5432/w"), "{e:?}");
        assert!(e.fix.contains("verify-full"), "{e:?}");
        only_error(
            &format!("{PG}url = \"postgresql://w@%2Ftmp/w\"\n"),
            "store.tls",
        );
        only_error(
            &format!("{PG}url = \"postgresql://w@localhost/w\"\ntls = \"disable\"\nca_file = \"/ca.pem\"\n"),
            "store.ca_file",
        );
        only_error(
            &format!("{PG}url = \"postgresql://w@db/w\"\npassword_file = \"/a\"\npassword_credential = \"b\"\n"),
            "store.password_credential",
        );
        only_error(
            &format!("{PG}url = \"postgresql://w@db/w\"\npassword_credential = \"../etc/x\"\n"),
            "store.password_credential",
        );
        let e = only_error(
            &format!("{PG}url = \"postgresql://w@db/w\"\ntls = \"require\"\n"),
            "store.tls",
        );
        assert!(
            e.fix
                .contains("\"verify-full\", \"verify-ca\", \"disable\""),
            "{e:?}"
        );
        let e = only_error("[store]\nbackend = \"mysql\"\n", "store.backend");
        assert!(e.fix.contains("\"sqlite\", \"postgres\""), "{e:?}");
    }
}
