//! The top-level keys and the single-table sections: `[admin]`, `[metrics]`,
//! `[identity]`, `[monitor]` and `[audit]` (`[store]` has its own file) — their schema, defaults
//! and limits, and their semantic checks.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::address::is_loopback_ip;
use super::check::{check_socket_path, Checker, SUN_PATH_MAX};
use super::duration::{de_duration, de_opt_duration, format_duration};
use super::names::check_trust_domain;

/// Metrics address used when `metrics.listen` is not set.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9477);
/// `store.max_versions` when not set.
pub const DEFAULT_MAX_VERSIONS: u32 = 10;
/// Upper bound for every `max_versions` key.
pub const MAX_VERSIONS_LIMIT: u32 = 1000;
/// `identity.svid_ttl` when not set.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// `identity.ca_ttl` when not set: 30 days.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Longest accepted `identity.ca_ttl`: 10 years.
pub const MAX_CA_TTL: Duration = Duration::from_secs(3650 * 86_400);
/// Shortest accepted `identity.svid_ttl`.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(60);
/// Longest accepted `identity.svid_ttl`.
pub const MAX_SVID_TTL: Duration = Duration::from_secs(30 * 86_400);

config_enum! {
    /// Signature algorithm of the SVID keys (`identity.key_type`).
    #[derive(Default)]
    KeyType {
        /// ECDSA over NIST P-256 (the default).
        #[default]
        EcP256 => "ec-p256",
        /// Ed25519.
        Ed25519 => "ed25519",
        /// ML-DSA-65 (FIPS 204), post-quantum.
        MlDsa65 => "ml-dsa-65",
    }
}

config_enum! {
    /// When an audit record reaches the disk (`audit.sync`).
    #[derive(Default)]
    AuditSync {
        /// `fsync`ed before the action it records goes on.
        Commit => "commit",
        /// Written to the OS before the action goes on, `fsync`ed within
        /// `audit.sync_interval` (the default).
        #[default]
        Interval => "interval",
    }
}

config_enum! {
    /// Whether the eBPF monitor is loaded (`monitor.ebpf`).
    #[derive(Default)]
    EbpfMode {
        /// Load it if the kernel allows, otherwise run without it (the default).
        #[default]
        Auto => "auto",
        /// Refuse to start without it.
        Required => "required",
        /// Never load it.
        Off => "off",
    }
}

config_enum! {
    /// What to do when processes reach upstreams directly (`monitor.protect_upstreams`).
    #[derive(Default)]
    ProtectMode {
        /// Do nothing.
        Off => "off",
        /// Record direct connections (the default).
        #[default]
        Observe => "observe",
        /// Block direct connections.
        Enforce => "enforce",
    }
}

/// `[admin]`: the admin control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// Admin socket path (absolute after loading).
    pub socket: Option<PathBuf>,
    /// If set, the socket is mode 0660 and owned by this group.
    pub group: Option<String>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Listen address; `None` when the file says `listen = "off"`.
    #[serde(deserialize_with = "de_metrics_listen")]
    pub listen: Option<SocketAddr>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: Some(DEFAULT_METRICS_LISTEN),
        }
    }
}

/// `metrics.listen`: an `IP:PORT`, or `"off"` for no endpoint.
fn de_metrics_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.trim().parse::<SocketAddr>().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "\"{text}\" is neither an IP:PORT address nor \"off\""
        ))
    })
}

/// `[identity]`: SVID issuance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Identity {
    /// Lifetime of issued SVIDs (1m..=30d).
    #[serde(deserialize_with = "de_duration")]
    pub svid_ttl: Duration,
    /// Key algorithm.
    pub key_type: KeyType,
    /// Lifetime of a self-signed CA warden creates (at least 6× `svid_ttl`);
    /// unset means [`Identity::ca_ttl`]'s default.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ca_ttl: Option<Duration>,
    /// SPIFFE Workload API socket (absolute after loading).
    pub workload_api_socket: Option<PathBuf>,
}

impl Identity {
    /// The CA lifetime: as configured, else 30 days (or 6× `svid_ttl` if longer).
    pub fn ca_ttl(&self) -> Duration {
        self.ca_ttl
            .unwrap_or_else(|| DEFAULT_CA_TTL.max(self.svid_ttl.saturating_mul(6)))
    }
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            svid_ttl: DEFAULT_SVID_TTL,
            key_type: KeyType::default(),
            ca_ttl: None,
            workload_api_socket: None,
        }
    }
}

/// `[monitor]`: process and connection monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Monitor {
    /// eBPF loading policy.
    pub ebpf: EbpfMode,
    /// Reaction to direct upstream connections.
    pub protect_upstreams: ProtectMode,
}

/// `[audit]`: how the proxies' audit records reach the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Audit {
    /// `commit` (default) or `interval`.
    pub sync: AuditSync,
    /// Longest time a record written with `sync = "interval"` waits for its
    /// `fsync` (default [`DEFAULT_AUDIT_SYNC_INTERVAL`]).
    #[serde(deserialize_with = "de_opt_duration")]
    pub sync_interval: Option<Duration>,
}

/// `audit.sync_interval` when not set.
pub const DEFAULT_AUDIT_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Longest accepted `audit.sync_interval`.
pub const MAX_AUDIT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

impl Audit {
    /// How long a proxy's audit record may wait for its `fsync`: `None` means
    /// it is `fsync`ed before the session goes on.
    pub fn sync_window(&self) -> Option<Duration> {
        match self.sync {
            AuditSync::Commit => None,
            AuditSync::Interval => Some(self.sync_interval.unwrap_or(DEFAULT_AUDIT_SYNC_INTERVAL)),
        }
    }
}

/// The top-level keys and `[admin]`, `[metrics]`, `[identity]`
/// (`[audit]` has [`check_audit`]; `[monitor]` has nothing to check beyond its shape).
pub(super) fn check_globals(c: &mut Checker<'_>) {
    let cfg = c.config;

    if let Err((problem, fix)) = check_trust_domain(&cfg.trust_domain) {
        c.error("trust_domain", problem, fix);
    }

    let env = cfg.environment.as_str();
    if env.trim().is_empty() {
        c.error(
            "environment",
            "environment is empty",
            "set environment = \"prod\" (or remove the key to use \"default\")",
        );
    } else if env.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        c.error(
            "environment",
            format!("environment \"{env}\" contains spaces or control characters"),
            "use a single word such as \"prod\"",
        );
    }

    if let Some(n) = cfg.session_threads {
        if n == 0 || n > super::MAX_SESSION_THREADS {
            c.error(
                "session_threads",
                format!("session_threads = {n} is out of range"),
                format!(
                    "use 1..{} (or remove the key: half the cores)",
                    super::MAX_SESSION_THREADS
                ),
            );
        }
    }

    if let Some(dir) = &cfg.data_dir {
        if dir.as_os_str().is_empty() {
            c.error(
                "data_dir",
                "data_dir is empty",
                "set data_dir = \"/var/lib/warden\" or remove the key",
            );
        } else if dir.as_os_str().len() >= SUN_PATH_MAX {
            c.error(
                "data_dir",
                format!(
                    "data_dir {} is {} bytes; unix sockets created inside it would exceed the {SUN_PATH_MAX}-byte sun_path limit",
                    dir.display(),
                    dir.as_os_str().len()
                ),
                "move data_dir to a shorter path such as /var/lib/warden (relative paths are joined to the config file's directory)",
            );
        } else if cfg.admin.socket.is_none()
            && dir.join("admin.sock").as_os_str().len() >= SUN_PATH_MAX
        {
            c.warn(
                "data_dir",
                format!(
                    "when warden falls back to {}/admin.sock for the admin socket, that path is {SUN_PATH_MAX} bytes or longer and cannot be bound",
                    dir.display()
                ),
                "set admin.socket to a short path such as \"/run/warden/admin.sock\", or shorten data_dir",
            );
        }
    }

    if let Some(path) = &cfg.admin.socket {
        check_socket_path(c, "admin.socket", path);
    }
    if let Some(group) = &cfg.admin.group {
        if group.trim().is_empty() {
            c.error(
                "admin.group",
                "admin.group is empty",
                "set group to an existing group such as \"warden-admin\", or remove the key to keep the socket owner-only",
            );
        } else if group
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control() || ch == ':' || ch == '/')
        {
            c.error(
                "admin.group",
                format!("\"{group}\" is not a valid group name"),
                "use a group name from /etc/group, e.g. \"warden-admin\"",
            );
        }
    }

    if let Some(addr) = cfg.metrics.listen {
        if addr.port() == 0 {
            c.error(
                "metrics.listen",
                format!("metrics.listen {addr} uses port 0, which picks a random port that scrapers cannot find"),
                "use a fixed port, e.g. listen = \"127.0.0.1:9477\"",
            );
        } else if !is_loopback_ip(addr.ip()) {
            c.warn(
                "metrics.listen",
                format!("metrics are served on {addr}, which other machines can reach"),
                "bind 127.0.0.1 unless a remote scraper needs it, and firewall the port if so",
            );
        }
    }

    let ttl = cfg.identity.svid_ttl;
    if ttl < MIN_SVID_TTL || ttl > MAX_SVID_TTL {
        c.error(
            "identity.svid_ttl",
            format!(
                "svid_ttl {} is outside the accepted range {} to {}",
                format_duration(ttl),
                format_duration(MIN_SVID_TTL),
                format_duration(MAX_SVID_TTL)
            ),
            "set svid_ttl between \"1m\" and \"30d\" (default \"1h\")",
        );
    }
    let ca_ttl = cfg.identity.ca_ttl();
    let min_ca = ttl.saturating_mul(6);
    let svid_ttl_ok = (MIN_SVID_TTL..=MAX_SVID_TTL).contains(&ttl);
    if svid_ttl_ok && (ca_ttl < min_ca || ca_ttl > MAX_CA_TTL) {
        c.error(
            "identity.ca_ttl",
            format!(
                "ca_ttl {} must be at least 6x svid_ttl ({}) so the CA overlap spans several SVID lifetimes, and at most {}",
                format_duration(ca_ttl),
                format_duration(min_ca),
                format_duration(MAX_CA_TTL)
            ),
            format!(
                "set ca_ttl to at least \"{}\" or shorten svid_ttl",
                format_duration(min_ca)
            ),
        );
    }
    if let Some(path) = &cfg.identity.workload_api_socket {
        check_socket_path(c, "identity.workload_api_socket", path);
    }
}

/// `[audit]`: `sync_interval` only with `sync = "interval"`, and within range.
/// (What `interval` can lose is stated by the daemon at start, not warned
/// about: it is the default.)
pub(super) fn check_audit(c: &mut Checker<'_>) {
    let a = &c.config.audit;
    match (a.sync, a.sync_interval) {
        (AuditSync::Commit, Some(_)) => c.error(
            "audit.sync_interval",
            "sync_interval is set but audit.sync is \"commit\", which fsyncs every record before its session goes on",
            "remove sync_interval, or set sync = \"interval\" to use it",
        ),
        (AuditSync::Interval, Some(d)) if d.is_zero() || d > MAX_AUDIT_SYNC_INTERVAL => c.error(
            "audit.sync_interval",
            format!("sync_interval {} is outside 1ms..1s", format_duration(d)),
            "use a duration from 1ms to 1s, e.g. sync_interval = \"10ms\"",
        ),
        (AuditSync::Interval, _) | (AuditSync::Commit, None) => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::{EbpfMode, KeyType, ProtectMode, DEFAULT_AUDIT_SYNC_INTERVAL};
    use crate::config::route::TlsMode;
    use crate::config::test_util::{ok, only_error, warning_keys};

    #[test]
    fn metrics_off_disables_listener() {
        let c = ok("[metrics]\nlisten = \"off\"\n");
        assert_eq!(c.metrics.listen, None);
        let c = ok("[metrics]\nlisten = \"[::1]:9000\"\n");
        assert_eq!(c.metrics.listen, Some("[::1]:9000".parse().unwrap()));
    }

    #[test]
    fn enum_spellings() {
        let c = ok("[identity]\nkey_type = \"ml-dsa-65\"\n[monitor]\nebpf = \"required\"\nprotect_upstreams = \"enforce\"\n");
        assert_eq!(c.identity.key_type, KeyType::MlDsa65);
        assert_eq!(c.monitor.ebpf, EbpfMode::Required);
        assert_eq!(c.monitor.protect_upstreams, ProtectMode::Enforce);
        let c = ok("[identity]\nkey_type = \"ed25519\"\n");
        assert_eq!(c.identity.key_type, KeyType::Ed25519);
        assert_eq!(TlsMode::VerifyCa.to_string(), "verify-ca");
        assert_eq!(KeyType::MlDsa65.as_str(), "ml-dsa-65");
    }

    #[test]
    fn audit_sync() {
        // `interval` is the default, without a warning.
        let c = ok("");
        assert_eq!(c.audit.sync_window(), Some(DEFAULT_AUDIT_SYNC_INTERVAL));
        assert!(warning_keys(&c).is_empty(), "{:?}", c.warnings);
        assert_eq!(ok("[audit]\nsync = \"commit\"\n").audit.sync_window(), None);
        let c = ok("[audit]\nsync_interval = \"250ms\"\n");
        assert_eq!(c.audit.sync_window(), Some(Duration::from_millis(250)));
        for bad in ["0s", "2s", "1h"] {
            let text = format!("[audit]\nsync = \"interval\"\nsync_interval = \"{bad}\"\n");
            let issue = only_error(&text, "audit.sync_interval");
            assert!(issue.fix.contains("1ms to 1s"), "{issue:?}");
        }
        let issue = only_error(
            "[audit]\nsync = \"commit\"\nsync_interval = \"10ms\"\n",
            "audit.sync_interval",
        );
        assert!(issue.fix.contains("sync = \"interval\""), "{issue:?}");
        let issue = only_error("[audit]\nsync = \"always\"\n", "audit.sync");
        assert!(issue.fix.contains("\"commit\", \"interval\""), "{issue:?}");
        let issue = only_error("[audit]\nfsync = \"commit\"\n", "audit.fsync");
        assert!(issue.fix.contains("did you mean `sync`"), "{issue:?}");
    }

    #[test]
    fn ranges_and_non_empty_values() {
        only_error("[identity]\nsvid_ttl = \"59s\"\n", "identity.svid_ttl");
        only_error("[identity]\nsvid_ttl = \"31d\"\n", "identity.svid_ttl");
        only_error(
            "[identity]\nsvid_ttl = \"1d\"\nca_ttl = \"5d\"\n",
            "identity.ca_ttl",
        );
        ok("[identity]\nsvid_ttl = \"1m\"\n");
        ok("[identity]\nsvid_ttl = \"30d\"\n");
        only_error("[admin]\ngroup = \"\"\n", "admin.group");
        only_error("[store]\nmax_versions = 0\n", "store.max_versions");
        only_error("[store]\nmax_versions = 1001\n", "store.max_versions");
        only_error(
            "[anomaly]\nwebhook = \"http://127.0.0.1:9000/a\"\ndistinct_secrets_per_minute = { limit = 0 }\n",
            "anomaly.distinct_secrets_per_minute.limit",
        );
        only_error("[anomaly]\nwebhook = \"ftp://x\"\n", "anomaly.webhook");
        only_error(
            "[anomaly]\nwebhook = \"https://alerts.example/a\"\n",
            "anomaly.webhook",
        );
        let w = "[anomaly]\nwebhook = \"http://127.0.0.1:9000/a\"\n";
        only_error(
            &format!("{w}session_rate = {{ interval = \"500ms\" }}\n"),
            "anomaly.session_rate.interval",
        );
        only_error(
            &format!("{w}session_rate = {{ warmup = 0 }}\n"),
            "anomaly.session_rate.warmup",
        );
        only_error(
            &format!("{w}denials_per_minute = {{ limit = 20000 }}\n"),
            "anomaly.denials_per_minute.limit",
        );
        let e = only_error(
            &format!("{w}[anomaly.workloads.ghost]\nbypass = {{ action = \"log\" }}\n"),
            "anomaly.workloads.ghost",
        );
        assert!(e.problem.contains("no [[workload]]"), "{e:?}");
        only_error(
            &format!("{w}[anomaly.workloads.ghost]\nnew_executable = {{ stable_after = \"0s\" }}\n[[workload]]\nname = \"ghost\"\nspiffe_id = \"spiffe://warden.local/ghost\"\nselectors = {{ uid = 5 }}\n"),
            "anomaly.workloads.ghost.new_executable.stable_after",
        );
        only_error("environment = \"\"\n", "environment");
        only_error("session_threads = 0\n", "session_threads");
        only_error("session_threads = 65\n", "session_threads");
        only_error("[metrics]\nlisten = \"127.0.0.1:0\"\n", "metrics.listen");
    }
}
