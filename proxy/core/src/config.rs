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
//! `route[].unix_socket`, `route[].upstream_tls.ca_file`) are resolved against
//! the directory that holds the config file. `.` and `..` are removed as text,
//! without asking the filesystem, so the results are absolute paths.
//!
//! Bad input never panics. Every failure is returned as a [`ConfigReport`].

// The rest of the crate uses this API a piece at a time; unused items are not a bug here.
// Route/workload lookups and enum tables are used by the route issues next; until then
// parts of this API have no caller in the binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

// ---------------------------------------------------------------------------
// Defaults and limits
// ---------------------------------------------------------------------------

/// Trust domain used when `trust_domain` is not set.
pub const DEFAULT_TRUST_DOMAIN: &str = "warden.local";
/// Secret environment used when `environment` is not set.
pub const DEFAULT_ENVIRONMENT: &str = "default";
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
/// Shortest accepted `secret[].rotation_period`.
pub const MIN_ROTATION_PERIOD: Duration = Duration::from_secs(60);
/// Size of `sockaddr_un.sun_path`; a socket path must be strictly shorter.
pub const SUN_PATH_MAX: usize = 108;

const NAME_MAX: usize = 63;
const SECRET_NAME_MAX: usize = 128;
const TRUST_DOMAIN_MAX: usize = 255;
const SPIFFE_ID_MAX: usize = 2048;
const MAX_REPAIR_PASSES: usize = 64;

// ---------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------

macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling used in the config file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

config_enum! {
    /// Direction of a tls route (`route.mode`).
    #[derive(Default)]
    TlsRouteMode {
        /// Plain TCP in from local workloads, mTLS out with their SVIDs (the default).
        #[default]
        Client => "client",
        /// mTLS in from remote workloads (authorized by SPIFFE ID), plain TCP
        /// out to a local service.
        Server => "server",
    }
}

config_enum! {
    /// Where a dynamic route's grants go (`route.credential.dynamic.grant_mode`).
    #[derive(Default)]
    GrantMode {
        /// Once, to a NOLOGIN group role per route (named after a hash of
        /// the grants); each lease role is a member (the default).
        #[default]
        Group => "group",
        /// To every lease role in its creation transaction.
        PerLease => "per_lease",
    }
}

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
        /// `fsync`ed before the action it records goes on (the default).
        #[default]
        Commit => "commit",
        /// Written to the OS before the action goes on, `fsync`ed within
        /// `audit.sync_interval`.
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

config_enum! {
    /// Protocol a route speaks (`route[].kind`).
    RouteKind {
        /// PostgreSQL wire protocol; warden logs in with `credential`.
        Postgres => "postgres",
        /// HTTP; warden adds a header from `inject`.
        Http => "http",
        /// Raw TLS passthrough or origination to `upstream`.
        Tls => "tls",
    }
}

config_enum! {
    /// TLS policy towards the upstream (`route[].upstream_tls.mode`), named like libpq's sslmode.
    #[derive(Default)]
    TlsMode {
        /// No TLS.
        Disable => "disable",
        /// TLS, certificate not checked.
        Require => "require",
        /// TLS, certificate chain checked against the CA.
        VerifyCa => "verify-ca",
        /// TLS, chain and host name checked (the default).
        #[default]
        VerifyFull => "verify-full",
    }
}

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

// ---------------------------------------------------------------------------
// The configuration structs
// ---------------------------------------------------------------------------

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
    /// The file this config was read from (or the `origin` given to [`parse_str`]).
    #[serde(skip)]
    pub source: PathBuf,
    /// Problems that do not stop warden from running.
    #[serde(skip)]
    pub warnings: Vec<ConfigIssue>,
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

/// `[store]`: the local secret store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    /// Versions kept per secret (1..=1000).
    pub max_versions: u32,
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

/// One `[[workload]]`: a named set of processes and the SPIFFE ID they get.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Unique name, referenced from `route[].allow`.
    pub name: String,
    /// `spiffe://<trust_domain>/<path>`.
    pub spiffe_id: String,
    /// How processes are matched; all given selectors must match.
    #[serde(default)]
    pub selectors: Selectors,
}

/// Process selectors of a workload. At least one must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selectors {
    /// Effective user id.
    pub uid: Option<u32>,
    /// Effective group id.
    pub gid: Option<u32>,
    /// Absolute path of the executable.
    pub exe_path: Option<PathBuf>,
    /// SHA-256 of the executable, 64 hex characters (lowercased on load).
    pub exe_sha256: Option<String>,
    /// systemd unit name, e.g. `reports.service`.
    pub systemd_unit: Option<String>,
    /// cgroup v2 path, e.g. `/system.slice/reports.service`.
    pub cgroup: Option<String>,
}

impl Selectors {
    /// True when no selector is set.
    pub fn is_empty(&self) -> bool {
        self.uid.is_none()
            && self.gid.is_none()
            && self.exe_path.is_none()
            && self.exe_sha256.is_none()
            && self.systemd_unit.is_none()
            && self.cgroup.is_none()
    }
}

/// One `[[secret]]`: policy for a secret name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretPolicy {
    /// Secret name, e.g. `orders-db/app`.
    pub name: String,
    /// How often the secret is rotated (at least 1m).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rotation_period: Option<Duration>,
    /// Overrides `store.max_versions` for this secret.
    #[serde(default)]
    pub max_versions: Option<u32>,
    /// How warden changes the secret upstream when it rotates it (see `rotation.rs`).
    #[serde(default)]
    pub rotate: Option<Rotate>,
}

config_enum! {
    /// `secret[].rotate.method`.
    RotateMethod {
        /// `ALTER ROLE … PASSWORD` on the route's database, run by warden.
        Postgres => "postgres",
        /// A program that gets the new value on stdin.
        Exec => "exec",
        /// An HTTP POST whose body is the new value.
        Webhook => "webhook",
    }
}

/// `secret[].rotate`: how a rotation reaches the system that checks the secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    pub method: RotateMethod,
    /// postgres: the route whose `credential` uses this secret.
    #[serde(default)]
    pub route: Option<String>,
    /// exec: program and arguments (never the value; that comes on stdin).
    #[serde(default)]
    pub command: Vec<String>,
    /// webhook: `http://` or `https://` URL.
    #[serde(default)]
    pub url: Option<String>,
    /// Longest a hook or webhook may take (default 30 s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

/// One `[[route]]`: a local listener that proxies to an upstream and supplies the credential.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique route name.
    pub name: String,
    /// Protocol.
    pub kind: RouteKind,
    /// Local TCP listen address.
    #[serde(deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// Extra unix socket listener (postgres only; absolute after loading).
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// `host:port` for postgres and tls; an `http://` or `https://` URL for http.
    pub upstream: String,
    /// TLS towards the upstream.
    #[serde(default)]
    pub upstream_tls: UpstreamTls,
    /// Login credential (postgres).
    #[serde(default)]
    pub credential: Option<Credential>,
    /// Header injection (http).
    #[serde(default)]
    pub inject: Option<Inject>,
    /// Names of workloads that may connect; empty means nobody.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Permit a non-loopback `listen` address.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Offer TLS to clients (postgres: answer SSLRequest with `S`), with a
    /// certificate from warden's CA for `localhost` and the listen address.
    #[serde(default)]
    pub client_tls: bool,
    /// Databases clients may ask for (postgres); empty means any.
    #[serde(default)]
    pub databases: Vec<String>,
    /// How long to wait for the upstream's TCP and TLS handshake (default 5 s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// http: serve as a forward proxy (clients set `HTTP_PROXY`): requests
    /// for the upstream's host get the credential; forward_proxy routes may
    /// share one listen address.
    #[serde(default)]
    pub forward_proxy: bool,
    /// http forward_proxy: `host:port`s this route's workloads may reach
    /// through `CONNECT` tunnels (no injection).
    #[serde(default)]
    pub tunnel: Vec<String>,
    /// http: how long to wait for the upstream's response headers (default 30 s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub request_timeout: Option<Duration>,
    /// http with an `http://` upstream: relay common HTTP/1.1 requests on
    /// warden's own fast path (default true); false keeps every request on
    /// the general (hyper) path.
    #[serde(default)]
    pub fast_path: Option<bool>,
    /// tls: `client` (default) or `server`; see [`TlsRouteMode`]. In server
    /// mode `allow` lists SPIFFE IDs.
    #[serde(default)]
    pub mode: TlsRouteMode,
    /// tls server mode: DNS names (and IPs) in the listener's certificate
    /// (default: `localhost` and the listen address).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// postgres: reuse authenticated upstream connections (on by default;
    /// `pool = false` or `max_idle = 0` disables).
    #[serde(default)]
    pub pool: Option<PoolConfig>,
    /// postgres: hand long sessions on plain TCP (client and upstream) to
    /// the eBPF kernel relay. http: let the kernel join warden's local hops
    /// (client ↔ warden, warden ↔ an upstream on this host) socket to
    /// socket. Default true; needs the eBPF monitor loaded.
    #[serde(default)]
    pub kernel_relay: Option<bool>,
}

/// `route.pool`: `true`, `false`, or `{ max_idle, idle_timeout, max_lifetime }`
/// (a table means enabled; unset keys take the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolConfig {
    pub enabled: bool,
    pub max_idle: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolTable {
    #[serde(default)]
    max_idle: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    max_lifetime: Option<Duration>,
}

impl<'de> Deserialize<'de> for PoolConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PoolConfig, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = PoolConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "true, false, or a table such as { max_idle = 16, idle_timeout = \"60s\" }",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, enabled: bool) -> Result<PoolConfig, E> {
                Ok(PoolConfig {
                    enabled,
                    ..PoolConfig::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<PoolConfig, A::Error> {
                let t = PoolTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(PoolConfig {
                    enabled: true,
                    max_idle: t.max_idle,
                    idle_timeout: t.idle_timeout,
                    max_lifetime: t.max_lifetime,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// `route[].connect_timeout` when not set.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Route {
    /// The upstream connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT)
    }

    /// The secret this route hands out, if any.
    pub fn secret_name(&self) -> Option<&str> {
        match (&self.credential, &self.inject) {
            (Some(c), _) => Some(c.secret.as_str()),
            (None, Some(i)) => Some(i.secret.as_str()),
            (None, None) => None,
        }
    }

    /// How long the secret may be cached for this route, if set.
    pub fn cache_ttl(&self) -> Option<Duration> {
        match (&self.credential, &self.inject) {
            (Some(c), _) => c.cache_ttl,
            (None, Some(i)) => i.cache_ttl,
            (None, None) => None,
        }
    }

    /// Host and port of the upstream. For http routes the URL's port, or 80/443 by scheme.
    pub fn upstream_host_port(&self) -> Result<(String, u16), String> {
        match self.kind {
            RouteKind::Http => parse_http_url(&self.upstream).map(|u| (u.host, u.port)),
            RouteKind::Postgres | RouteKind::Tls => split_host_port(&self.upstream),
        }
    }
}

/// `route[].upstream_tls`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTls {
    /// Verification mode (default `verify-full`).
    pub mode: TlsMode,
    /// CA bundle used to verify the upstream (absolute after loading).
    pub ca_file: Option<PathBuf>,
    /// tls routes: the SPIFFE ID the upstream's certificate must carry
    /// (verified against warden's trust bundle, plus `ca_file` if set).
    pub spiffe_id: Option<String>,
}

/// `route[].credential`: the database login warden performs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Database user.
    pub user: String,
    /// Name of the secret holding the password.
    pub secret: String,
    /// How long a fetched secret may be reused.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub cache_ttl: Option<Duration>,
    /// Dynamic credentials: `user`/`secret` are then the administrative login
    /// warden uses to create one role per workload lease.
    #[serde(default)]
    pub dynamic: Option<Dynamic>,
}

/// `route[].credential.dynamic` defaults.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_LEASE_MAX_TTL: Duration = Duration::from_secs(86_400);
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
pub const DEFAULT_ROLE_PREFIX: &str = "warden_";
/// Lease passwords are 256 random bits: stretching adds nothing, and
/// PostgreSQL pays one PBKDF2 at this count per CREATE ROLE.
pub const DEFAULT_LEASE_SCRAM_ITERATIONS: u32 = 16;
/// Most iterations `scram_iterations` may ask for (warden's SCRAM client limit).
pub const MAX_LEASE_SCRAM_ITERATIONS: u32 = 1_000_000;

/// `route[].credential.dynamic`: a role per workload lease.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dynamic {
    /// Lease lifetime without sessions; renewed while sessions are active.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ttl: Option<Duration>,
    /// Hard end of a lease, renewals included.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_ttl: Option<Duration>,
    /// SQL run in the lease's transaction after CREATE ROLE; `{role}` is the
    /// quoted role name.
    #[serde(default)]
    pub grants: Vec<String>,
    /// Database the grants (and DROP OWNED at revocation) run in; default
    /// the first of `databases`, else `postgres`.
    #[serde(default)]
    pub database: Option<String>,
    /// At revocation: REASSIGN OWNED BY the lease role TO this role before
    /// DROP OWNED; unset drops what the role owns.
    #[serde(default)]
    pub reassign_owned_to: Option<String>,
    /// Prefix of lease role names (`<prefix><workload>_<random>`).
    #[serde(default)]
    pub role_prefix: Option<String>,
    /// `group` (default) or `per_lease`: see [`GrantMode`].
    #[serde(default)]
    pub grant_mode: GrantMode,
    /// PBKDF2 iterations in lease roles' SCRAM verifiers (default
    /// [`DEFAULT_LEASE_SCRAM_ITERATIONS`]; see `pg::scram::verifier`).
    #[serde(default)]
    pub scram_iterations: Option<u32>,
}

impl Dynamic {
    pub fn ttl(&self) -> Duration {
        self.ttl.unwrap_or(DEFAULT_LEASE_TTL)
    }
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
            .unwrap_or(DEFAULT_LEASE_MAX_TTL)
            .max(self.ttl())
    }
    pub fn role_prefix(&self) -> &str {
        self.role_prefix.as_deref().unwrap_or(DEFAULT_ROLE_PREFIX)
    }
    pub fn scram_iterations(&self) -> u32 {
        self.scram_iterations
            .unwrap_or(DEFAULT_LEASE_SCRAM_ITERATIONS)
    }
}

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

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: Some(DEFAULT_METRICS_LISTEN),
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Store {
            max_versions: DEFAULT_MAX_VERSIONS,
        }
    }
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

impl Config {
    /// A config with every default and no workloads, secrets or routes.
    pub fn default_for(origin: &Path) -> Config {
        Config {
            data_dir: None,
            trust_domain: default_trust_domain(),
            environment: default_environment(),
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
            source: origin.to_path_buf(),
            warnings: Vec::new(),
        }
    }

    /// The workload with this name.
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// The route with this name.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The `[[secret]]` policy for this secret name.
    pub fn secret_policy(&self, name: &str) -> Option<&SecretPolicy> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// Versions to keep for a secret: its own `max_versions`, else `store.max_versions`.
    pub fn max_versions_for(&self, secret: &str) -> u32 {
        self.secret_policy(secret)
            .and_then(|s| s.max_versions)
            .unwrap_or(self.store.max_versions)
    }
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_environment() -> String {
    DEFAULT_ENVIRONMENT.to_string()
}

// ---------------------------------------------------------------------------
// serde helpers
// ---------------------------------------------------------------------------

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.trim().parse::<SocketAddr>().map_err(|_| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not an IP:PORT address (host names are not accepted here)"
        ))
    })
}

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

// ---------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------

/// One problem in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path such as `route[1].credential.cache_ttl`; empty when the
    /// problem is not tied to a key (unreadable file, some syntax errors).
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl ConfigIssue {
    fn new(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigIssue {
            key: key.into(),
            problem: one_line(&problem.into()),
            fix: one_line(&fix.into()),
        }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{} (fix: {})", self.problem, self.fix)
    }
}

/// Everything wrong with a config file. Returned as the error of [`load`] and [`parse_str`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReport {
    /// The config file.
    pub file: PathBuf,
    /// Problems that stop warden from using the file.
    pub errors: Vec<ConfigIssue>,
    /// Problems that do not.
    pub warnings: Vec<ConfigIssue>,
}

impl ConfigReport {
    /// True when the report holds at least one error.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The first error at exactly this key.
    pub fn error_at(&self, key: &str) -> Option<&ConfigIssue> {
        self.errors.iter().find(|i| i.key == key)
    }
}

impl fmt::Display for ConfigReport {
    /// One issue per line: `FILE: error: KEY: PROBLEM (fix: FIX)`, errors first, then warnings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        let mut first = true;
        for (label, issues) in [("error", &self.errors), ("warning", &self.warnings)] {
            for issue in issues {
                if !first {
                    writeln!(f)?;
                }
                first = false;
                write!(f, "{file}: {label}: {issue}")?;
            }
        }
        if first {
            write!(f, "{file}: no problems found")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigReport {}

fn one_line(s: &str) -> String {
    s.trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Stage 1: syntax errors
// ---------------------------------------------------------------------------

fn syntax_issue(text: &str, err: &toml::de::Error) -> ConfigIssue {
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
fn line_column(text: &str, offset: usize) -> (usize, usize) {
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

// ---------------------------------------------------------------------------
// Stage 2: shape errors
// ---------------------------------------------------------------------------

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
fn deserialize_repairing(
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

fn last_key(key: &str) -> &str {
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

fn friendly_serde_message(message: &str) -> String {
    let mut out = message.to_string();
    for (from, to) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a non-negative whole number"),
        ("expected a sequence", "expected a list [..]"),
        ("expected struct ", "expected a table: "),
        ("invalid type: map", "invalid type: table"),
        ("invalid type: sequence", "invalid type: list"),
    ] {
        out = out.replace(from, to);
    }
    out
}

fn unknown_key_fix(field: &str, valid: &[&str]) -> String {
    let here = if valid.is_empty() {
        String::new()
    } else {
        format!("valid keys here: {}", valid.join(", "))
    };
    if let Some(best) = closest(field, valid, 2) {
        return format!("did you mean `{best}`? {here}");
    }
    let elsewhere: Vec<String> = KEY_HINTS
        .iter()
        .filter(|(shape, _)| last_key(shape) == field && shape.contains('.'))
        .map(|(shape, _)| parent_shape(shape))
        .collect();
    if !elsewhere.is_empty() {
        return format!(
            "`{field}` belongs in {}, not here; move it there or remove it. {here}",
            elsewhere.join(" or ")
        );
    }
    if here.is_empty() {
        "remove it".to_string()
    } else {
        format!("remove it or use one of the {here}")
    }
}

/// "route.credential.cache_ttl" -> "[[route]] credential"; "metrics.listen" -> "[metrics]".
fn parent_shape(shape: &str) -> String {
    let parent = shape.rsplit_once('.').map_or("", |(p, _)| p);
    let (head, tail) = parent.split_once('.').unwrap_or((parent, ""));
    let table = if matches!(head, "workload" | "secret" | "route") {
        format!("[[{head}]]")
    } else {
        format!("[{head}]")
    };
    if tail.is_empty() {
        table
    } else {
        format!("{table} {tail}")
    }
}

/// Expected form of a key, by its path with array indexes removed.
const KEY_HINTS: &[(&str, &str)] = &[
    ("", "a TOML table of settings"),
    ("data_dir", "a directory path in quotes, e.g. data_dir = \"/var/lib/warden\""),
    ("trust_domain", "a domain name in quotes, e.g. trust_domain = \"example.org\""),
    ("environment", "a name in quotes, e.g. environment = \"prod\""),
    ("admin", "a table: [admin] with socket and group"),
    ("admin.socket", "a socket path in quotes, e.g. socket = \"/run/warden/admin.sock\""),
    ("admin.group", "a group name in quotes, e.g. group = \"warden-admin\""),
    ("metrics", "a table: [metrics] with listen"),
    ("metrics.listen", "an IP:PORT in quotes, e.g. listen = \"127.0.0.1:9477\", or \"off\""),
    ("store", "a table: [store] with max_versions"),
    ("store.max_versions", "a whole number from 1 to 1000 without quotes, e.g. max_versions = 10"),
    ("identity", "a table: [identity] with svid_ttl, key_type, ca_ttl, workload_api_socket"),
    ("identity.ca_ttl", "a duration in quotes, at least 6x svid_ttl, e.g. ca_ttl = \"30d\""),
    ("identity.svid_ttl", "a duration in quotes between 1m and 30d, e.g. svid_ttl = \"1h\""),
    ("identity.key_type", "one of \"ec-p256\", \"ed25519\", \"ml-dsa-65\""),
    ("identity.workload_api_socket", "a socket path in quotes, e.g. workload_api_socket = \"/run/warden/workload.sock\""),
    ("monitor", "a table: [monitor] with ebpf and protect_upstreams"),
    ("audit", "a table: [audit] with sync and sync_interval"),
    ("audit.sync", "one of \"commit\", \"interval\""),
    ("audit.sync_interval", "a duration in quotes from 1ms to 1s, e.g. sync_interval = \"10ms\""),
    ("monitor.ebpf", "one of \"auto\", \"required\", \"off\""),
    ("monitor.protect_upstreams", "one of \"off\", \"observe\", \"enforce\""),
    ("workload", "a list of tables: write each one as [[workload]] (double brackets)"),
    ("workload.name", "a name in quotes of lowercase letters, digits, - and _, e.g. name = \"reports\""),
    ("workload.spiffe_id", "a SPIFFE ID in quotes, e.g. spiffe_id = \"spiffe://example.org/reports\""),
    ("workload.selectors", "an inline table, e.g. selectors = { uid = 1001, exe_path = \"/usr/bin/psql\" }"),
    ("workload.selectors.uid", "a numeric user id without quotes, e.g. uid = 1001"),
    ("workload.selectors.gid", "a numeric group id without quotes, e.g. gid = 1001"),
    ("workload.selectors.exe_path", "an absolute path in quotes, e.g. exe_path = \"/usr/bin/psql\""),
    ("workload.selectors.exe_sha256", "the 64 hex characters printed by `sha256sum`, in quotes"),
    ("workload.selectors.systemd_unit", "a unit name in quotes, e.g. systemd_unit = \"reports.service\""),
    ("workload.selectors.cgroup", "a cgroup path in quotes, e.g. cgroup = \"/system.slice/reports.service\""),
    ("secret", "a list of tables: write each one as [[secret]] (double brackets)"),
    ("secret.name", "a secret name in quotes, e.g. name = \"orders-db/app\""),
    ("secret.rotation_period", "a duration in quotes of at least 1m, e.g. rotation_period = \"24h\""),
    ("secret.max_versions", "a whole number from 1 to 1000 without quotes, e.g. max_versions = 5"),
    ("secret.rotate", "an inline table, e.g. rotate = { method = \"postgres\", route = \"orders-db\" }"),
    ("secret.rotate.method", "one of \"postgres\", \"exec\", \"webhook\""),
    ("secret.rotate.route", "the name of a postgres route in quotes, e.g. route = \"orders-db\""),
    ("secret.rotate.command", "a list: program path then arguments, e.g. command = [\"/usr/local/bin/set-token\"]"),
    ("secret.rotate.url", "an http:// or https:// URL in quotes, e.g. url = \"http://127.0.0.1:9000/rotate\""),
    ("secret.rotate.timeout", "a duration in quotes, e.g. timeout = \"30s\""),
    ("route", "a list of tables: write each one as [[route]] (double brackets)"),
    ("route.name", "a name in quotes of lowercase letters, digits, - and _, e.g. name = \"orders-db\""),
    ("route.kind", "one of \"postgres\", \"http\", \"tls\""),
    ("route.listen", "an IP:PORT in quotes, e.g. listen = \"127.0.0.1:15432\""),
    ("route.unix_socket", "a socket path in quotes, e.g. unix_socket = \"/run/warden/pg\""),
    ("route.upstream", "host:port in quotes for postgres and tls (e.g. \"db.internal:5432\"), or an http:// or https:// URL for http"),
    ("route.upstream_tls", "an inline table, e.g. upstream_tls = { mode = \"verify-full\", ca_file = \"/etc/warden/db-ca.pem\" }"),
    ("route.upstream_tls.mode", "one of \"disable\", \"require\", \"verify-ca\", \"verify-full\""),
    ("route.upstream_tls.ca_file", "a file path in quotes, e.g. ca_file = \"/etc/warden/db-ca.pem\""),
    ("route.credential", "an inline table, e.g. credential = { user = \"app\", secret = \"orders-db/app\", cache_ttl = \"5m\" }"),
    ("route.credential.user", "a database user name in quotes, e.g. user = \"app\""),
    ("route.credential.secret", "a secret name in quotes, e.g. secret = \"orders-db/app\""),
    ("route.credential.cache_ttl", "a duration in quotes, e.g. cache_ttl = \"5m\""),
    ("route.credential.dynamic", "a table, e.g. dynamic = { ttl = \"1h\", max_ttl = \"24h\", grants = [\"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}\"] }"),
    ("route.credential.dynamic.ttl", "a duration in quotes, e.g. ttl = \"1h\""),
    ("route.credential.dynamic.max_ttl", "a duration in quotes, at least ttl, e.g. max_ttl = \"24h\""),
    ("route.credential.dynamic.grants", "a list of SQL statements using {role}, e.g. grants = [\"GRANT USAGE ON SCHEMA app TO {role}\"]"),
    ("route.credential.dynamic.database", "a database name in quotes, e.g. database = \"orders\""),
    ("route.credential.dynamic.reassign_owned_to", "a role name in quotes, e.g. reassign_owned_to = \"app_owner\""),
    ("route.credential.dynamic.grant_mode", "\"group\" or \"per_lease\", e.g. grant_mode = \"group\""),
    ("route.credential.dynamic.scram_iterations", "a whole number from 1 to 1000000, e.g. scram_iterations = 16"),
    ("route.credential.dynamic.role_prefix", "lowercase letters, digits and _ in quotes, e.g. role_prefix = \"warden_\""),
    ("route.inject", "an inline table, e.g. inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"payments/api-token\" }"),
    ("route.inject.header", "an HTTP header name in quotes, e.g. header = \"Authorization\""),
    ("route.inject.value", "text in quotes containing {secret}, e.g. value = \"Bearer {secret}\""),
    ("route.inject.secret", "a secret name in quotes, e.g. secret = \"payments/api-token\""),
    ("route.inject.cache_ttl", "a duration in quotes, e.g. cache_ttl = \"5m\""),
    ("route.allow", "a list of workload names, e.g. allow = [\"reports\"]"),
    ("route.allow_non_loopback", "true or false, without quotes"),
    ("route.mode", "\"client\" or \"server\" (tls routes), e.g. mode = \"server\""),
    ("route.server_names", "a list of DNS names or IPs in quotes, e.g. server_names = [\"node1.example.org\"]"),
    ("route.client_tls", "true or false, without quotes"),
    ("route.databases", "a list of database names, e.g. databases = [\"orders\"]"),
    ("route.connect_timeout", "a duration in quotes, e.g. connect_timeout = \"5s\""),
    ("route.forward_proxy", "true or false, without quotes"),
    ("route.tunnel", "a list of host:port in quotes, e.g. tunnel = [\"github.com:443\"]"),
    ("route.request_timeout", "a duration in quotes, e.g. request_timeout = \"30s\""),
    ("route.fast_path", "true or false, without quotes"),
    ("route.kernel_relay", "true or false, without quotes"),
    ("route.pool", "true, false, or an inline table, e.g. pool = { max_idle = 16, idle_timeout = \"60s\", max_lifetime = \"1h\" }"),
    ("route.pool.max_idle", "a whole number without quotes, e.g. max_idle = 16 (0 disables the pool)"),
    ("route.pool.idle_timeout", "a duration in quotes, e.g. idle_timeout = \"60s\""),
    ("route.pool.max_lifetime", "a duration in quotes, e.g. max_lifetime = \"1h\""),
    ("route.upstream_tls.spiffe_id", "a SPIFFE ID in quotes, e.g. spiffe_id = \"spiffe://example.org/logs\""),
    ("route.inject.query", "a query parameter name in quotes, e.g. query = \"api_key\""),
    ("route.inject.basic_user", "a user name in quotes, e.g. basic_user = \"svc-billing\""),
    ("anomaly", "a table: [anomaly] with webhook and distinct_secrets_per_minute"),
    ("anomaly.webhook", "an http:// or https:// URL in quotes, e.g. webhook = \"http://127.0.0.1:9000/alerts\""),
    ("anomaly.distinct_secrets_per_minute", "an inline table, e.g. distinct_secrets_per_minute = { limit = 100, action = \"freeze\" }"),
    ("anomaly.distinct_secrets_per_minute.limit", "a whole number of at least 1 without quotes, e.g. limit = 100"),
    ("anomaly.distinct_secrets_per_minute.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.enabled", "true or false, without quotes"),
    ("anomaly.suspend", "true or false, without quotes"),
    ("anomaly.session_rate", "an inline table, e.g. session_rate = { interval = \"10s\", warmup = 30, sigmas = 4, min_sessions = 20, action = \"alert\" }"),
    ("anomaly.session_rate.interval", "a duration in quotes, e.g. interval = \"10s\""),
    ("anomaly.session_rate.warmup", "a whole number of intervals without quotes, e.g. warmup = 30"),
    ("anomaly.session_rate.sigmas", "a whole number without quotes, e.g. sigmas = 4"),
    ("anomaly.session_rate.min_sessions", "a whole number without quotes, e.g. min_sessions = 20"),
    ("anomaly.session_rate.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.new_executable", "an inline table, e.g. new_executable = { stable_after = \"10m\", action = \"alert\" }"),
    ("anomaly.new_executable.stable_after", "a duration in quotes, e.g. stable_after = \"10m\""),
    ("anomaly.new_executable.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.denials_per_minute", "an inline table, e.g. denials_per_minute = { limit = 10, action = \"alert\" }"),
    ("anomaly.denials_per_minute.limit", "a whole number of at least 1 without quotes, e.g. limit = 10"),
    ("anomaly.denials_per_minute.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.bypass", "an inline table, e.g. bypass = { action = \"alert\" }"),
    ("anomaly.bypass.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.workloads", "a table per workload, e.g. [anomaly.workloads.reports] with the same rule keys as [anomaly]"),
];

/// Hint for a concrete key such as `route[3].credential.cache_ttl`.
fn key_hint(key: &str) -> Option<&'static str> {
    let mut shape = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            _ if !in_index => shape.push(c),
            _ => {}
        }
    }
    KEY_HINTS
        .iter()
        .find(|(s, _)| *s == shape)
        .map(|(_, hint)| *hint)
}

// ---------------------------------------------------------------------------
// Path resolution
// ---------------------------------------------------------------------------

/// Absolute directory that relative paths in the file are resolved against.
fn base_dir(origin: &Path) -> PathBuf {
    let parent = origin.parent().map(Path::to_path_buf).unwrap_or_default();
    let parent = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent
    };
    if parent.is_absolute() {
        return lexical_normalise(&parent);
    }
    match std::env::current_dir() {
        Ok(cwd) => lexical_normalise(&cwd.join(parent)),
        Err(_) => lexical_normalise(&parent),
    }
}

/// Drop `.` and resolve `..` as text, without looking at the filesystem.
fn lexical_normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => out.push(component.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

fn resolve(base: &Path, path: &mut PathBuf) {
    if path.as_os_str().is_empty() {
        return; // reported as an error by validation
    }
    let joined = if path.is_absolute() {
        path.clone()
    } else {
        base.join(&*path)
    };
    *path = lexical_normalise(&joined);
}

/// Resolve relative paths and tidy values before validation.
fn normalise(config: &mut Config, base: &Path) {
    let paths = [
        config.data_dir.as_mut(),
        config.admin.socket.as_mut(),
        config.identity.workload_api_socket.as_mut(),
    ];
    for path in paths.into_iter().flatten() {
        resolve(base, path);
    }
    for route in &mut config.routes {
        if let Some(path) = route.unix_socket.as_mut() {
            resolve(base, path);
        }
        if let Some(path) = route.upstream_tls.ca_file.as_mut() {
            resolve(base, path);
        }
    }
    for workload in &mut config.workloads {
        if let Some(sha) = workload.selectors.exe_sha256.as_mut() {
            *sha = sha.to_ascii_lowercase();
        }
    }
}

// ---------------------------------------------------------------------------
// Stage 3: semantic validation
// ---------------------------------------------------------------------------

struct Checker<'a> {
    config: &'a Config,
    errors: Vec<ConfigIssue>,
    warnings: Vec<ConfigIssue>,
    /// (key, path) of every unix socket, to catch two listeners on one path.
    sockets: Vec<(String, PathBuf)>,
}

impl Checker<'_> {
    fn error(
        &mut self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.errors.push(ConfigIssue::new(key, problem, fix));
    }

    fn warn(&mut self, key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) {
        self.warnings.push(ConfigIssue::new(key, problem, fix));
    }
}

/// Check every rule; returns (errors, warnings).
fn validate(config: &Config) -> (Vec<ConfigIssue>, Vec<ConfigIssue>) {
    let mut c = Checker {
        config,
        errors: Vec::new(),
        warnings: Vec::new(),
        sockets: Vec::new(),
    };
    check_globals(&mut c);
    check_workloads(&mut c);
    check_secrets(&mut c);
    check_routes(&mut c);
    check_anomaly(&mut c);
    check_audit(&mut c);
    check_socket_clashes(&mut c);
    (c.errors, c.warnings)
}

fn check_globals(c: &mut Checker<'_>) {
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

    let max = cfg.store.max_versions;
    if !(1..=MAX_VERSIONS_LIMIT).contains(&max) {
        c.error(
            "store.max_versions",
            format!("store.max_versions is {max}; it must be between 1 and {MAX_VERSIONS_LIMIT}"),
            format!("set max_versions to a value from 1 to {MAX_VERSIONS_LIMIT} (default {DEFAULT_MAX_VERSIONS})"),
        );
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

fn check_socket_path(c: &mut Checker<'_>, key: &str, path: &Path) {
    if path.as_os_str().is_empty() {
        c.error(
            key,
            "socket path is empty",
            "set a path such as \"/run/warden/NAME.sock\", or remove the key",
        );
        return;
    }
    let len = path.as_os_str().len();
    if len >= SUN_PATH_MAX {
        c.error(
            key,
            format!(
                "socket path {} is {len} bytes; unix socket paths must be shorter than {SUN_PATH_MAX} bytes (the sun_path limit)",
                path.display()
            ),
            "use a shorter absolute path such as /run/warden/NAME.sock (relative paths are joined to the config file's directory)",
        );
    }
    c.sockets.push((key.to_string(), path.to_path_buf()));
}

fn check_socket_clashes(c: &mut Checker<'_>) {
    let sockets = std::mem::take(&mut c.sockets);
    for (i, (key, path)) in sockets.iter().enumerate() {
        if let Some((first, _)) = sockets[..i].iter().find(|(_, p)| p == path) {
            c.error(
                key.as_str(),
                format!("socket path {} is also used by {first}", path.display()),
                "give every socket its own path",
            );
        }
    }
}

fn check_workloads(c: &mut Checker<'_>) {
    let cfg = c.config;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, w) in cfg.workloads.iter().enumerate() {
        let k = format!("workload[{i}]");

        if let Err((problem, fix)) = check_name("workload", &w.name) {
            c.error(format!("{k}.name"), problem, fix);
        }
        if let Some(first) = seen.get(w.name.as_str()) {
            c.error(
                format!("{k}.name"),
                format!(
                    "workload name \"{}\" is already used by workload[{first}]",
                    w.name
                ),
                "give every [[workload]] a unique name",
            );
        } else {
            seen.insert(w.name.as_str(), i);
        }

        if let Err((problem, fix)) = check_spiffe_id(&w.spiffe_id, &cfg.trust_domain) {
            c.error(format!("{k}.spiffe_id"), problem, fix);
        }

        let s = &w.selectors;
        if s.is_empty() {
            c.error(
                format!("{k}.selectors"),
                format!("workload \"{}\" has no selectors, so no process can ever match it", w.name),
                "add at least one selector, e.g. selectors = { uid = 1001, exe_path = \"/usr/bin/psql\" }",
            );
        }
        if let Some(path) = &s.exe_path {
            if !path.is_absolute() {
                c.error(
                    format!("{k}.selectors.exe_path"),
                    format!("exe_path \"{}\" is not an absolute path", path.display()),
                    "use the executable's full path, e.g. \"/usr/bin/psql\" (see `readlink -f \"$(command -v NAME)\"`)",
                );
            }
        }
        if let Some(sha) = &s.exe_sha256 {
            if sha.len() != 64 || !sha.chars().all(|ch| ch.is_ascii_hexdigit()) {
                c.error(
                    format!("{k}.selectors.exe_sha256"),
                    format!(
                        "exe_sha256 must be 64 hex characters; got {} characters{}",
                        sha.chars().count(),
                        if sha.chars().all(|ch| ch.is_ascii_hexdigit()) {
                            ""
                        } else {
                            " including non-hex ones"
                        }
                    ),
                    "use the digest printed by `sha256sum /path/to/executable`",
                );
            }
        }
        if let Some(unit) = &s.systemd_unit {
            if unit.trim().is_empty() || unit.chars().any(|ch| ch.is_whitespace() || ch == '/') {
                c.error(
                    format!("{k}.selectors.systemd_unit"),
                    format!("\"{unit}\" is not a systemd unit name"),
                    "use the unit name as shown by `systemctl status`, e.g. \"reports.service\"",
                );
            }
        }
        if let Some(cgroup) = &s.cgroup {
            if !cgroup.starts_with('/') || cgroup.chars().any(char::is_whitespace) {
                c.error(
                    format!("{k}.selectors.cgroup"),
                    format!("\"{cgroup}\" is not a cgroup path; it must start with /"),
                    "use the path after `0::` in /proc/PID/cgroup, e.g. \"/system.slice/reports.service\"",
                );
            }
        }
    }
    check_ambiguous_workloads(c);
}

impl Selectors {
    /// The attestation crate's form of these selectors.
    pub fn to_attest(&self) -> warden_identity::attest::Selectors {
        warden_identity::attest::Selectors {
            uid: self.uid,
            gid: self.gid,
            exe_path: self.exe_path.clone(),
            exe_sha256: self.exe_sha256.clone(),
            cgroup: self.cgroup.clone(),
            systemd_unit: self.systemd_unit.clone(),
        }
    }
}

impl Workload {
    /// The attestation crate's registration for this workload.
    pub fn registration(&self) -> warden_identity::attest::Registration {
        warden_identity::attest::Registration {
            name: self.name.clone(),
            spiffe_id: self.spiffe_id.clone(),
            selectors: self.selectors.to_attest(),
        }
    }
}

/// Two workloads that could match the same process with no way to prefer one
/// (neither's selectors are a strict superset of the other's) are an error:
/// attestation would have to refuse that process at run time.
fn check_ambiguous_workloads(c: &mut Checker<'_>) {
    let cfg = c.config;
    let regs: Vec<_> = cfg.workloads.iter().map(Workload::registration).collect();
    for (a, b) in warden_identity::attest::ambiguous_pairs(&regs) {
        c.error(
            format!("workload[{b}].selectors"),
            format!(
                "workloads \"{}\" (workload[{a}]) and \"{}\" (workload[{b}]) could match the same process, and neither is more specific",
                cfg.workloads[a].name, cfg.workloads[b].name
            ),
            "add a selector that tells them apart (a different uid, exe_sha256 or systemd_unit), or make one's selectors a strict superset of the other's",
        );
    }
}

fn check_secrets(c: &mut Checker<'_>) {
    let cfg = c.config;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, s) in cfg.secrets.iter().enumerate() {
        let k = format!("secret[{i}]");
        if let Err((problem, fix)) = check_secret_name(&s.name) {
            c.error(format!("{k}.name"), problem, fix);
        }
        if let Some(first) = seen.get(s.name.as_str()) {
            c.error(
                format!("{k}.name"),
                format!(
                    "secret \"{}\" already has a policy at secret[{first}]",
                    s.name
                ),
                "merge the two [[secret]] entries into one",
            );
        } else {
            seen.insert(s.name.as_str(), i);
        }
        if let Some(period) = s.rotation_period {
            if period < MIN_ROTATION_PERIOD {
                c.error(
                    format!("{k}.rotation_period"),
                    format!(
                        "rotation_period {} is shorter than the minimum {}",
                        format_duration(period),
                        format_duration(MIN_ROTATION_PERIOD)
                    ),
                    "set rotation_period to at least \"1m\"",
                );
            }
        }
        if let Some(rot) = &s.rotate {
            check_rotate(c, &k, s, rot);
        }
        if let Some(max) = s.max_versions {
            if !(1..=MAX_VERSIONS_LIMIT).contains(&max) {
                c.error(
                    format!("{k}.max_versions"),
                    format!("max_versions is {max}; it must be between 1 and {MAX_VERSIONS_LIMIT}"),
                    format!("set max_versions to a value from 1 to {MAX_VERSIONS_LIMIT}, or remove it to use store.max_versions"),
                );
            }
        }
    }
}

/// Rules for `secret[i].rotate`: each method has exactly the keys it uses.
fn check_rotate(c: &mut Checker<'_>, k: &str, s: &SecretPolicy, rot: &Rotate) {
    let cfg = c.config;
    let m = rot.method;
    let unused = |key: &str| {
        (
            format!("{k}.rotate.{key}"),
            format!("rotate.{key} is not used by method \"{m}\""),
            format!("remove {key} from secret[..].rotate"),
        )
    };
    let mut extra = Vec::new();
    if m != RotateMethod::Postgres && rot.route.is_some() {
        extra.push(unused("route"));
    }
    if m != RotateMethod::Exec && !rot.command.is_empty() {
        extra.push(unused("command"));
    }
    if m != RotateMethod::Webhook && rot.url.is_some() {
        extra.push(unused("url"));
    }
    for (key, problem, fix) in extra {
        c.error(key, problem, fix);
    }
    match m {
        RotateMethod::Postgres => match &rot.route {
            None => c.error(
                format!("{k}.rotate.route"),
                "method \"postgres\" needs the route whose database holds the role",
                "add route = \"NAME\" naming a postgres [[route]] whose credential.secret is this secret",
            ),
            Some(name) => {
                let found = cfg.routes.iter().enumerate().find(|(_, r)| &r.name == name);
                match found {
                    None => c.error(
                        format!("{k}.rotate.route"),
                        format!("there is no route named \"{name}\""),
                        "name a postgres [[route]] defined in this file",
                    ),
                    Some((j, r)) => {
                        let uses = r.kind == RouteKind::Postgres
                            && r.credential.as_ref().is_some_and(|cr| cr.secret == s.name);
                        if !uses {
                            c.error(
                                format!("{k}.rotate.route"),
                                format!("route[{j}] (\"{name}\") is not a postgres route whose credential.secret is \"{}\", so warden would not know which role's password to change", s.name),
                                format!("set route[{j}].credential.secret = \"{}\" or name the route that uses this secret", s.name),
                            );
                        }
                    }
                }
            }
        },
        RotateMethod::Exec => match rot.command.first() {
            None => c.error(
                format!("{k}.rotate.command"),
                "method \"exec\" needs a command",
                "add command = [\"/absolute/path/to/program\", \"arg\"]; the new value arrives on its stdin",
            ),
            Some(prog) if !Path::new(prog).is_absolute() => c.error(
                format!("{k}.rotate.command"),
                format!("program \"{prog}\" is not an absolute path, so which program runs would depend on $PATH"),
                "use an absolute path, e.g. command = [\"/usr/local/bin/set-token\"]",
            ),
            Some(_) => {}
        },
        RotateMethod::Webhook => match &rot.url {
            None => c.error(
                format!("{k}.rotate.url"),
                "method \"webhook\" needs a url",
                "add url = \"https://host/path\"; warden POSTs the new value as the body",
            ),
            Some(u) => match parse_http_url(u) {
                Err(problem) => c.error(
                    format!("{k}.rotate.url"),
                    format!("url \"{}\" {problem}", url_for_display(u)),
                    "use an http:// or https:// URL, e.g. url = \"https://vault-sync.internal/rotate\"",
                ),
                Ok(parsed) if !parsed.https && !is_loopback_host(&parsed.host) => c.error(
                    format!("{k}.rotate.url"),
                    format!("url \"{}\" is plain http to a non-loopback host: the new secret would cross the network unencrypted", url_for_display(u)),
                    "use an https:// URL (or a loopback http:// address)",
                ),
                Ok(_) => {}
            },
        },
    }
    if let Some(t) = rot.timeout {
        if t < Duration::from_secs(1) || t > Duration::from_secs(600) {
            c.error(
                format!("{k}.rotate.timeout"),
                format!("timeout {} is outside 1s..10m", format_duration(t)),
                "set timeout between \"1s\" and \"10m\", or remove it (default 30s)",
            );
        }
    }
    if s.rotation_period.is_none() {
        c.warn(
            format!("{k}.rotation_period"),
            format!("secret \"{}\" has a rotate method but no rotation_period, so it rotates only on `warden secret rotate`", s.name),
            "add rotation_period = \"24h\" (or another period) to rotate it automatically",
        );
    }
}

/// Rules for `route[i].credential.dynamic`.
fn check_dynamic(c: &mut Checker<'_>, k: &str, r: &Route, d: &Dynamic) {
    let k = format!("{k}.credential.dynamic");
    if let Some(ttl) = d.ttl {
        if ttl < MIN_LEASE_TTL {
            c.error(
                format!("{k}.ttl"),
                format!(
                    "ttl {} is shorter than {}",
                    format_duration(ttl),
                    format_duration(MIN_LEASE_TTL)
                ),
                "set ttl to at least \"1s\" (default 1h)",
            );
        }
    }
    if let (Some(max), ttl) = (d.max_ttl, d.ttl()) {
        if max < ttl {
            c.error(
                format!("{k}.max_ttl"),
                format!(
                    "max_ttl {} is shorter than ttl {}",
                    format_duration(max),
                    format_duration(ttl)
                ),
                format!("set max_ttl to at least {}", format_duration(ttl)),
            );
        }
    }
    for (j, g) in d.grants.iter().enumerate() {
        if !g.contains("{role}") {
            c.error(
                format!("{k}.grants[{j}]"),
                format!("grant \"{g}\" does not mention {{role}}, so it would not grant anything to the lease's role"),
                "write the statement with the placeholder, e.g. \"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}\"",
            );
        }
        if g.contains(';') || g.contains('\0') {
            c.error(
                format!("{k}.grants[{j}]"),
                "a grant contains ';' or NUL; each list entry must be one statement",
                "split the text into one list entry per statement",
            );
        }
    }
    let prefix = d.role_prefix();
    let ok_prefix = !prefix.is_empty()
        && prefix.len() <= 20
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !prefix.starts_with("pg_")
        && prefix.as_bytes()[0].is_ascii_lowercase();
    if !ok_prefix {
        c.error(
            format!("{k}.role_prefix"),
            format!("role_prefix \"{prefix}\" must start with a letter, use only a-z, 0-9 and _, be at most 20 characters and not start with pg_ (reserved by PostgreSQL)"),
            "use e.g. role_prefix = \"warden_\"",
        );
    }
    if let Some(n) = d.scram_iterations {
        if n == 0 || n > MAX_LEASE_SCRAM_ITERATIONS {
            c.error(
                format!("{k}.scram_iterations"),
                format!("scram_iterations {n} is outside 1..={MAX_LEASE_SCRAM_ITERATIONS}"),
                format!("remove it (default {DEFAULT_LEASE_SCRAM_ITERATIONS}: lease passwords are 256 random bits) or set e.g. 4096"),
            );
        }
    }
    for (key, v) in [
        ("database", &d.database),
        ("reassign_owned_to", &d.reassign_owned_to),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.len() > 63 || v.contains('\0') {
                c.error(
                    format!("{k}.{key}"),
                    format!("{key} \"{v}\" is not a PostgreSQL name (1 to 63 bytes, no NUL)"),
                    format!("set {key} to an existing name or remove it"),
                );
            }
        }
    }
    if let (Some(db), false) = (&d.database, r.databases.is_empty()) {
        if !r.databases.contains(db) {
            c.warn(
                format!("{k}.database"),
                format!("grants run in database \"{db}\", which is not in this route's databases"),
                "set database to one of route.databases, or add it there",
            );
        }
    }
}

fn check_routes(c: &mut Checker<'_>) {
    let cfg = c.config;
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut listens: Vec<(SocketAddr, usize)> = Vec::new();
    let workload_names: Vec<&str> = cfg.workloads.iter().map(|w| w.name.as_str()).collect();

    for (i, r) in cfg.routes.iter().enumerate() {
        let k = format!("route[{i}]");

        // name
        if let Err((problem, fix)) = check_name("route", &r.name) {
            c.error(format!("{k}.name"), problem, fix);
        }
        if let Some(first) = names.get(r.name.as_str()) {
            c.error(
                format!("{k}.name"),
                format!(
                    "route name \"{}\" is already used by route[{first}]",
                    r.name
                ),
                "give every [[route]] a unique name",
            );
        } else {
            names.insert(r.name.as_str(), i);
        }

        // listen
        let addr = r.listen;
        if addr.port() == 0 {
            c.error(
                format!("{k}.listen"),
                format!(
                    "listen {addr} uses port 0, which picks a random port that clients cannot find"
                ),
                "use a fixed port, e.g. listen = \"127.0.0.1:15432\"",
            );
        } else if let Some((_, first)) = listens.iter().find(|(other, j)| {
            listen_clash(*other, addr)
                && !(r.forward_proxy
                    && *other == addr
                    && cfg.routes.get(*j).is_some_and(|o| o.forward_proxy))
        }) {
            c.error(
                format!("{k}.listen"),
                format!(
                    "listen address {addr} is already used by route[{first}] (\"{}\")",
                    cfg.routes.get(*first).map_or("", |o| o.name.as_str())
                ),
                "give every route its own port (only forward_proxy routes may share one listen address)",
            );
        } else if cfg.metrics.listen.is_some_and(|m| listen_clash(m, addr)) {
            c.error(
                format!("{k}.listen"),
                format!("listen address {addr} is already used by metrics.listen"),
                "give the route and the metrics endpoint different ports",
            );
        }
        listens.push((addr, i));
        if !is_loopback_ip(addr.ip()) && !r.allow_non_loopback {
            c.error(
                format!("{k}.listen"),
                format!("listen address {addr} is not a loopback address, so other machines could connect and use this route's credential"),
                format!("bind 127.0.0.1 (listen = \"127.0.0.1:{}\"), or set allow_non_loopback = true if remote clients are intended", addr.port()),
            );
        }

        // unix_socket
        if let Some(path) = &r.unix_socket {
            if r.kind != RouteKind::Postgres {
                c.error(
                    format!("{k}.unix_socket"),
                    format!("unix_socket is only supported on kind = \"postgres\" routes; this route is kind = \"{}\"", r.kind),
                    "remove unix_socket from this route",
                );
            }
            check_socket_path(c, &format!("{k}.unix_socket"), path);
        }
        if r.client_tls && r.kind != RouteKind::Postgres {
            c.error(
                format!("{k}.client_tls"),
                format!("client_tls is only supported on kind = \"postgres\" routes; this route is kind = \"{}\"", r.kind),
                "remove client_tls from this route",
            );
        }

        check_route_kind_keys(c, &k, r);
        check_upstream(c, &k, r);
        check_route_secret(c, &k, r);
        if r.kind == RouteKind::Tls && r.mode == TlsRouteMode::Server {
            check_allow_spiffe(c, &k, r);
        } else {
            check_allow(c, &k, r, &workload_names);
        }
    }
}

/// Keys that only some route kinds use (http and tls routes).
fn check_route_kind_keys(c: &mut Checker<'_>, k: &str, r: &Route) {
    if r.request_timeout.is_some() && r.kind != RouteKind::Http {
        c.error(
            format!("{k}.request_timeout"),
            format!("request_timeout is only used by kind = \"http\" routes; this route is kind = \"{}\"", r.kind),
            "remove request_timeout from this route",
        );
    }
    if r.request_timeout == Some(Duration::ZERO) {
        c.error(
            format!("{k}.request_timeout"),
            "request_timeout is zero, so every request would time out",
            "set a duration such as request_timeout = \"30s\"",
        );
    }
    if let Some(p) = &r.pool {
        if r.kind != RouteKind::Postgres {
            c.error(
                format!("{k}.pool"),
                format!(
                    "pool is only used by kind = \"postgres\" routes; this route is kind = \"{}\"",
                    r.kind
                ),
                "remove pool from this route",
            );
        }
        for (key, d) in [
            ("idle_timeout", p.idle_timeout),
            ("max_lifetime", p.max_lifetime),
        ] {
            if d == Some(Duration::ZERO) {
                c.error(
                    format!("{k}.pool.{key}"),
                    format!("pool.{key} is zero, so no connection could ever be reused"),
                    "set a duration such as \"60s\", or pool = false to disable the pool",
                );
            }
        }
    }
    if (r.forward_proxy || !r.tunnel.is_empty()) && r.kind != RouteKind::Http {
        c.error(
            format!("{k}.forward_proxy"),
            format!("forward_proxy and tunnel are only used by kind = \"http\" routes; this route is kind = \"{}\"", r.kind),
            "remove forward_proxy and tunnel from this route",
        );
    }
    if r.kernel_relay.is_some() && !matches!(r.kind, RouteKind::Postgres | RouteKind::Http) {
        c.error(
            format!("{k}.kernel_relay"),
            format!(
                "kernel_relay is only used by kind = \"postgres\" and kind = \"http\" routes; this route is kind = \"{}\"",
                r.kind
            ),
            "remove kernel_relay from this route",
        );
    }
    if r.fast_path.is_some() && (r.kind != RouteKind::Http || r.forward_proxy) {
        c.error(
            format!("{k}.fast_path"),
            "fast_path is only used by kind = \"http\" reverse-proxy routes",
            "remove fast_path from this route",
        );
    }
    if !r.tunnel.is_empty() && !r.forward_proxy {
        c.error(
            format!("{k}.tunnel"),
            "tunnel is only used with forward_proxy = true",
            "add forward_proxy = true, or remove tunnel",
        );
    }
    for (j, t) in r.tunnel.iter().enumerate() {
        if let Err(problem) = split_host_port(t) {
            c.error(
                format!("{k}.tunnel[{j}]"),
                format!("tunnel \"{t}\" {problem}"),
                "write host:port, e.g. tunnel = [\"github.com:443\"]",
            );
        }
    }
    if let Some(id) = &r.upstream_tls.spiffe_id {
        if r.kind != RouteKind::Tls {
            c.error(
                format!("{k}.upstream_tls.spiffe_id"),
                format!(
                    "spiffe_id is only used by kind = \"tls\" routes; this route is kind = \"{}\"",
                    r.kind
                ),
                "remove spiffe_id from upstream_tls",
            );
        }
        if let Err(e) = warden_identity::spiffe_id::SpiffeId::parse(id) {
            c.error(
                format!("{k}.upstream_tls.spiffe_id"),
                format!("\"{id}\" is not a SPIFFE ID: {e}"),
                "write the upstream's ID, e.g. spiffe_id = \"spiffe://example.org/logs\"",
            );
        }
    }
    if r.kind == RouteKind::Tls && r.upstream_tls.mode != TlsMode::VerifyFull {
        c.error(
            format!("{k}.upstream_tls.mode"),
            format!("a tls route always verifies its upstream; mode \"{}\" is not supported here", r.upstream_tls.mode),
            "remove upstream_tls.mode (verify-full is the default); use spiffe_id to verify by SPIFFE ID instead of DNS name",
        );
    }
    if r.kind == RouteKind::Http
        && matches!(r.upstream_tls.mode, TlsMode::Require | TlsMode::VerifyCa)
    {
        c.error(
            format!("{k}.upstream_tls.mode"),
            format!("http routes always verify the upstream's certificate and name; mode \"{}\" is not supported", r.upstream_tls.mode),
            "remove upstream_tls.mode (verify-full is the default); add ca_file for a private CA",
        );
    }
}

fn listen_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

fn check_upstream(c: &mut Checker<'_>, k: &str, r: &Route) {
    let mode = r.upstream_tls.mode;
    match r.kind {
        RouteKind::Postgres | RouteKind::Tls => match split_host_port(&r.upstream) {
            Err(problem) => c.error(
                format!("{k}.upstream"),
                format!("upstream \"{}\" {problem}", r.upstream),
                format!(
                    "for kind = \"{}\" write upstream as host:port, e.g. \"db.internal:5432\"",
                    r.kind
                ),
            ),
            Ok((host, _)) => {
                if mode == TlsMode::Disable && !is_loopback_host(&host) {
                    c.warn(
                        format!("{k}.upstream_tls.mode"),
                        format!("TLS to upstream {host} is disabled, so traffic and the credential cross the network unencrypted"),
                        "set mode = \"verify-full\" (add ca_file if the server uses a private CA)",
                    );
                }
                if mode == TlsMode::Require {
                    c.warn(
                        format!("{k}.upstream_tls.mode"),
                        format!("mode \"require\" encrypts but does NOT verify upstream {host}'s certificate: anyone who can intercept the connection can impersonate the database and receive the injected credential"),
                        "set mode = \"verify-full\" with ca_file pointing at the server's CA",
                    );
                }
                if mode == TlsMode::VerifyCa {
                    c.warn(
                        format!("{k}.upstream_tls.mode"),
                        format!("mode \"verify-ca\" checks the CA but not that the certificate names {host}: any server holding a certificate from that CA can pose as this database"),
                        "set mode = \"verify-full\" (the certificate must name the upstream host)",
                    );
                }
            }
        },
        RouteKind::Http => match parse_http_url(&r.upstream) {
            Err(problem) => c.error(
                format!("{k}.upstream"),
                format!("upstream \"{}\" {problem}", r.upstream),
                "for kind = \"http\" write upstream as an http:// or https:// URL, e.g. \"https://api.internal:8443\"",
            ),
            Ok(url) => {
                if url.https && mode == TlsMode::Disable {
                    c.error(
                        format!("{k}.upstream_tls.mode"),
                        "upstream is an https:// URL but upstream_tls.mode = \"disable\"",
                        "remove upstream_tls.mode (the default is \"verify-full\"), or use an http:// URL",
                    );
                } else if !url.https && !is_loopback_host(&url.host) {
                    c.warn(
                        format!("{k}.upstream"),
                        format!("upstream {} is plain http to {}, so the injected secret crosses the network unencrypted", r.upstream, url.host),
                        "use an https:// URL",
                    );
                }
            }
        },
    }
}

fn check_route_secret(c: &mut Checker<'_>, k: &str, r: &Route) {
    match r.kind {
        RouteKind::Postgres => {
            if r.credential.is_none() {
                c.error(
                    format!("{k}.credential"),
                    format!("postgres route \"{}\" has no credential, so warden cannot log in to the database for its clients", r.name),
                    "add credential = { user = \"app\", secret = \"orders-db/app\" }",
                );
            }
        }
        RouteKind::Http => {
            if r.inject.is_none() {
                c.error(
                    format!("{k}.inject"),
                    format!("http route \"{}\" has no inject, so no secret would be added to requests", r.name),
                    "add inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"NAME\" }",
                );
            }
        }
        RouteKind::Tls => {
            if r.mode == TlsRouteMode::Server
                && (r.upstream_tls.spiffe_id.is_some() || r.upstream_tls.ca_file.is_some())
            {
                c.error(
                    format!("{k}.upstream_tls"),
                    "a tls route in server mode forwards plain TCP to a local service; upstream_tls does not apply",
                    "remove upstream_tls from this route",
                );
            }
        }
    }
    if r.kind != RouteKind::Tls && (r.mode != TlsRouteMode::Client || !r.server_names.is_empty()) {
        c.error(
            format!("{k}.mode"),
            format!("mode and server_names are only used by kind = \"tls\" routes; this route is kind = \"{}\"", r.kind),
            "remove them from this route",
        );
    }
    if r.credential.is_some() && r.kind != RouteKind::Postgres {
        c.error(
            format!("{k}.credential"),
            format!("credential is only used by kind = \"postgres\" routes; this route is kind = \"{}\"", r.kind),
            if r.kind == RouteKind::Http {
                "use inject = { header = ..., value = \"... {secret}\", secret = ... } for http routes"
            } else {
                "remove credential from this route"
            },
        );
    }
    if r.inject.is_some() && r.kind != RouteKind::Http {
        c.error(
            format!("{k}.inject"),
            format!(
                "inject is only used by kind = \"http\" routes; this route is kind = \"{}\"",
                r.kind
            ),
            if r.kind == RouteKind::Postgres {
                "use credential = { user = ..., secret = ... } for postgres routes"
            } else {
                "remove inject from this route"
            },
        );
    }

    if let Some(cred) = &r.credential {
        if cred.user.trim().is_empty() {
            c.error(
                format!("{k}.credential.user"),
                "credential.user is empty",
                "set user to the database role warden logs in as, e.g. user = \"app\"",
            );
        }
        if let Err((problem, fix)) = check_secret_name(&cred.secret) {
            c.error(format!("{k}.credential.secret"), problem, fix);
        }
        check_cache_ttl(
            c,
            format!("{k}.credential.cache_ttl"),
            cred.cache_ttl,
            &cred.secret,
        );
        if let Some(d) = &cred.dynamic {
            check_dynamic(c, k, r, d);
        }
    }

    if let Some(inject) = &r.inject {
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

/// Rule: a cached secret must not outlive its rotation.
fn check_cache_ttl(c: &mut Checker<'_>, key: String, ttl: Option<Duration>, secret: &str) {
    let Some(ttl) = ttl else {
        return;
    };
    let Some((j, policy)) = c
        .config
        .secrets
        .iter()
        .enumerate()
        .find(|(_, s)| s.name == secret)
    else {
        return;
    };
    let Some(period) = policy.rotation_period else {
        return;
    };
    if ttl > period {
        c.error(
            key,
            format!(
                "cache_ttl {} is longer than the rotation period {} of secret \"{secret}\" (secret[{j}].rotation_period): clients would keep using a rotated-out credential",
                format_duration(ttl),
                format_duration(period)
            ),
            format!(
                "set cache_ttl to at most {} or lengthen the rotation period",
                format_duration(period)
            ),
        );
    }
}

/// tls server mode: `allow` holds the SPIFFE IDs of remote callers.
fn check_allow_spiffe(c: &mut Checker<'_>, k: &str, r: &Route) {
    if r.allow.is_empty() {
        c.warn(
            format!("{k}.allow"),
            format!(
                "tls server route \"{}\" allows no SPIFFE ID, so it refuses every caller",
                r.name
            ),
            "list the callers' SPIFFE IDs, e.g. allow = [\"spiffe://example.org/billing\"]",
        );
    }
    for (j, id) in r.allow.iter().enumerate() {
        if warden_identity::SpiffeId::parse(id).is_err() {
            c.error(
                format!("{k}.allow[{j}]"),
                format!("\"{id}\" is not a SPIFFE ID; a tls route in server mode authorizes callers by SPIFFE ID"),
                "write it as spiffe://<trust domain>/<path>, e.g. \"spiffe://example.org/billing\"",
            );
        }
    }
}

fn check_allow(c: &mut Checker<'_>, k: &str, r: &Route, workloads: &[&str]) {
    if r.allow.is_empty() {
        c.warn(
            format!("{k}.allow"),
            format!(
                "route \"{}\" allows no workloads, so the route refuses every client",
                r.name
            ),
            "list the workloads that may use it, e.g. allow = [\"reports\"]",
        );
        return;
    }
    for (j, name) in r.allow.iter().enumerate() {
        let key = format!("{k}.allow[{j}]");
        if r.allow[..j].contains(name) {
            c.warn(
                key,
                format!("workload \"{name}\" is listed twice"),
                "remove the duplicate",
            );
            continue;
        }
        if workloads.contains(&name.as_str()) {
            continue;
        }
        let fix = match closest(name, workloads, 3) {
            Some(best) => format!(
                "did you mean \"{best}\"? declared workloads: {}",
                workloads.join(", ")
            ),
            None if workloads.is_empty() => format!(
                "declare it with a [[workload]] entry named \"{name}\", or remove it from allow"
            ),
            None => format!(
                "declare it with a [[workload]] entry, or use one of: {}",
                workloads.join(", ")
            ),
        };
        c.error(
            key,
            format!("allow names \"{name}\", which is not a declared workload"),
            fix,
        );
    }
}

fn check_audit(c: &mut Checker<'_>) {
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
        (AuditSync::Interval, _) => {
            let window = a.sync_window().unwrap_or(DEFAULT_AUDIT_SYNC_INTERVAL);
            c.warn(
                "audit.sync",
                format!(
                    "audit.sync = \"interval\": a session's audit record is written to the OS before the session starts but reaches the disk up to {} later, so an OS crash or power loss can lose the newest records (a crash of warden itself loses none)",
                    format_duration(window)
                ),
                "keep sync = \"commit\" (the default) where every credential use must be on disk before it happens",
            );
        }
        (AuditSync::Commit, None) => {}
    }
}

fn check_anomaly(c: &mut Checker<'_>) {
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

// ---------------------------------------------------------------------------
// Syntax of names, IDs and addresses
// ---------------------------------------------------------------------------

type Problem = (String, String);

/// Workload and route names: `[a-z0-9][a-z0-9_-]{0,62}`.
fn check_name(what: &str, name: &str) -> Result<(), Problem> {
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
fn check_secret_name(name: &str) -> Result<(), Problem> {
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
fn check_trust_domain(td: &str) -> Result<(), Problem> {
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
fn check_spiffe_id(id: &str, trust_domain: &str) -> Result<(), Problem> {
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

fn is_http_token(s: &str) -> bool {
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

fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(is_loopback_ip)
}

/// Parse `host:port` (IPv6 as `[addr]:port`). The error text follows the value
/// in a message, as in: upstream "db" <error>.
fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty".to_string());
    }
    if s.contains("://") {
        return Err("is a URL; this kind of route needs host:port without a scheme".to_string());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return Err("has an unclosed `[`".to_string());
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "has \"{addr}\" in brackets, which is not an IPv6 address"
            ));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err("has no port".to_string());
        };
        (format!("[{addr}]"), port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err("has no port".to_string());
        };
        if host.contains(':') {
            return Err(
                "looks like an IPv6 address; write it in brackets, e.g. \"[::1]:5432\"".to_string(),
            );
        }
        (host.to_string(), port)
    };
    check_host(&host)?;
    Ok((host, parse_port(port)?))
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("has no host".to_string());
    }
    if host.starts_with('[') {
        return Ok(());
    }
    if let Some(bad) = host
        .chars()
        .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_')))
    {
        return Err(format!("has `{bad}` in its host name"));
    }
    Ok(())
}

fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("has no port".to_string());
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => {
            u16::try_from(p).map_err(|_| "has an invalid port".to_string())
        }
        Ok(p) => Err(format!("has port {p}; ports must be between 1 and 65535")),
        Err(_) => Err(format!(
            "has port \"{port}\", which is not a number from 1 to 65535"
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    https: bool,
    host: String,
    port: u16,
}

/// `url` fit for messages: a user name, password, query or fragment (where a
/// token could sit) is replaced by `…`.
pub fn url_for_display(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => authority.to_string(),
    };
    let path = match tail.find(['?', '#']) {
        Some(i) => format!("{}…", &tail[..i]),
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{path}")
}

/// Parse an `http://` or `https://` URL far enough to check it.
fn parse_http_url(s: &str) -> Result<HttpUrl, String> {
    let s = s.trim();
    let lower = s.to_ascii_lowercase();
    let (https, rest) = if lower.starts_with("https://") {
        (true, &s["https://".len()..])
    } else if lower.starts_with("http://") {
        (false, &s["http://".len()..])
    } else {
        return Err("is not an http:// or https:// URL".to_string());
    };
    if s.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err("contains spaces or control characters".to_string());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err("contains a user name or password; keep credentials out of URLs (use inject for http routes)".to_string());
    }
    if authority.is_empty() {
        return Err("has no host".to_string());
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return Err("has an unclosed `[`".to_string());
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "has \"{addr}\" in brackets, which is not an IPv6 address"
            ));
        }
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return Err("has text after the IPv6 address".to_string()),
        };
        (format!("[{addr}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), parse_port(port)?),
            None => (authority.to_string(), default_port),
        }
    };
    check_host(&host)?;
    Ok(HttpUrl { https, host, port })
}

// ---------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------

const DURATION_FORMS: &str = "write a whole number followed by a unit (ms, s, m, h or d), optionally several from largest to smallest, e.g. \"500ms\", \"90s\", \"15m\", \"1h\", \"1h30m\", \"7d\"";

/// Parse a duration such as `"90s"`, `"15m"`, `"1h"`, `"7d"`, `"1h30m"` or `"500ms"`.
///
/// Units are `d`, `h`, `m`, `s` and `ms`. Several may be combined, each at
/// most once and from largest to smallest. Fractions, signs and spaces are
/// rejected. The error text says which forms are accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration \"{s}\": {why}; {DURATION_FORMS}");
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u64 = 0;
    let mut previous_rank: Option<u8> = None;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            let ch = s[i..].chars().next().unwrap_or(' ');
            return Err(match ch {
                '-' => bad("negative durations are not allowed"),
                '+' => bad("write the number without a sign"),
                _ if ch.is_whitespace() => bad("it contains spaces"),
                _ => bad(&format!("expected a number but found `{ch}`")),
            });
        }
        let number: u64 = s[start..i]
            .parse()
            .map_err(|_| bad("the number is too large"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &s[unit_start..i];
        if unit.is_empty() {
            let next = s[i..].chars().next();
            return Err(match next {
                None => bad(&format!("`{number}` has no unit")),
                Some('.') | Some(',') => {
                    bad("fractions are not supported; combine units instead, e.g. \"1h30m\"")
                }
                Some(ch) if ch.is_whitespace() => bad("it contains spaces"),
                Some(ch) => bad(&format!("unexpected `{ch}`")),
            });
        }
        let (rank, unit_ms): (u8, u64) = match unit {
            "d" => (5, 86_400_000),
            "h" => (4, 3_600_000),
            "m" => (3, 60_000),
            "s" => (2, 1_000),
            "ms" => (1, 1),
            _ => return Err(bad(&format!("unknown unit `{unit}`"))),
        };
        if previous_rank.is_some_and(|prev| rank >= prev) {
            return Err(bad(
                "units must go from largest to smallest, each at most once",
            ));
        }
        previous_rank = Some(rank);
        total_ms = number
            .checked_mul(unit_ms)
            .and_then(|part| total_ms.checked_add(part))
            .ok_or_else(|| bad("the duration is too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Format a duration in the config's own notation, e.g. `1h30m`, `500ms`, `2d`.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Suggestions
// ---------------------------------------------------------------------------

/// Optimal string alignment distance (Levenshtein plus adjacent transposition).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// The candidate nearest to `word`, if within `max` edits (first wins ties).
fn closest<'a>(word: &str, candidates: &[&'a str], max: usize) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(dist, _)| *dist <= max)
        .min_by_key(|(dist, _)| *dist)
        .map(|(_, c)| c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const FULL: &str = include_str!("../../../examples/full.toml");
    const QUICKSTART: &str = include_str!("../../../examples/quickstart.toml");

    /// A small valid config that the rule tests edit.
    const BASE: &str = r#"
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

    const HTTP_ROUTE: &str = r#"
[[route]]
name = "payments"
kind = "http"
listen = "127.0.0.1:18080"
upstream = "https://payments.internal"
inject = { header = "Authorization", value = "Bearer {secret}", secret = "payments/token" }
allow = ["reports"]
"#;

    fn origin() -> PathBuf {
        PathBuf::from("/etc/warden/warden.toml")
    }

    fn parse(text: &str) -> Result<Config, ConfigReport> {
        parse_str(text, &origin())
    }

    fn ok(text: &str) -> Config {
        match parse(text) {
            Ok(config) => config,
            Err(report) => panic!("expected a valid config, got:\n{report}"),
        }
    }

    fn report(text: &str) -> ConfigReport {
        match parse(text) {
            Ok(config) => panic!("expected errors, got a valid config: {config:#?}"),
            Err(report) => report,
        }
    }

    fn error_keys(text: &str) -> Vec<String> {
        report(text).errors.into_iter().map(|i| i.key).collect()
    }

    /// Exactly one error, at `key`; returns it.
    fn only_error(text: &str, key: &str) -> ConfigIssue {
        let r = report(text);
        let keys: Vec<&str> = r.errors.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec![key], "full report:\n{r}");
        r.errors.into_iter().next().unwrap()
    }

    /// `BASE` with one textual replacement (which must apply).
    fn edit(from: &str, to: &str) -> String {
        edit_text(BASE, from, to)
    }

    fn edit_text(text: &str, from: &str, to: &str) -> String {
        assert!(text.contains(from), "test bug: {from:?} not in text");
        text.replacen(from, to, 1)
    }

    fn with_http() -> String {
        format!("{BASE}{HTTP_ROUTE}")
    }

    fn warning_keys(config: &Config) -> Vec<&str> {
        config.warnings.iter().map(|i| i.key.as_str()).collect()
    }

    // ----- whole files -----------------------------------------------------

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
        assert_eq!(c.audit.sync, AuditSync::Commit);
        assert_eq!(c.audit.sync_window(), None);

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
        assert_eq!(c.max_versions_for("orders-db/app"), 5);
        assert_eq!(c.max_versions_for("payments/api-token"), 10);

        let rot = c.secrets[0].rotate.as_ref().unwrap();
        assert_eq!(rot.method, RotateMethod::Postgres);
        assert_eq!(rot.route.as_deref(), Some("orders-db"));
        assert_eq!(c.routes.len(), 5);
        let d = c.routes[4]
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

        assert_eq!(
            c.anomaly.webhook.as_deref(),
            Some("http://127.0.0.1:9000/alerts")
        );
        let rule = c.anomaly.distinct_secrets_per_minute.as_ref().unwrap();
        assert_eq!(rule.limit, 100);
        assert_eq!(rule.action, AnomalyAction::Freeze);
        assert_eq!(c.source, origin());
    }

    #[test]
    fn rotate_methods_are_checked_with_key_and_fix() {
        let with = |rotate: &str| {
            edit(
                "rotation_period = \"1h\"\n",
                &format!("rotation_period = \"1h\"\nrotate = {rotate}\n"),
            )
        };
        ok(&with("{ method = \"postgres\", route = \"orders-db\" }"));
        let i = only_error(&with("{ method = \"postgres\" }"), "secret[0].rotate.route");
        assert!(i.fix.contains("route = \"NAME\""), "{i:?}");
        let i = only_error(
            &with("{ method = \"postgres\", route = \"nope\" }"),
            "secret[0].rotate.route",
        );
        assert!(i.problem.contains("no route named \"nope\""), "{i:?}");
        let i = only_error(
            &with("{ method = \"exec\", command = [\"set-token\"] }"),
            "secret[0].rotate.command",
        );
        assert!(i.problem.contains("not an absolute path"), "{i:?}");
        only_error(&with("{ method = \"exec\" }"), "secret[0].rotate.command");
        ok(&with(
            "{ method = \"exec\", command = [\"/usr/local/bin/set-token\", \"x\"] }",
        ));
        let i = only_error(
            &with("{ method = \"webhook\", url = \"http://hooks.example.org/r\" }"),
            "secret[0].rotate.url",
        );
        assert!(i.problem.contains("unencrypted"), "{i:?}");
        ok(&with(
            "{ method = \"webhook\", url = \"https://hooks.example.org/r\" }",
        ));
        ok(&with(
            "{ method = \"webhook\", url = \"http://127.0.0.1:9000/r\" }",
        ));
        only_error(
            &with("{ method = \"exec\", command = [\"/bin/x\"], url = \"https://a\" }"),
            "secret[0].rotate.url",
        );
        only_error(
            &with("{ method = \"exec\", command = [\"/bin/x\"], timeout = \"0s\" }"),
            "secret[0].rotate.timeout",
        );
        let r = report(&with("{ method = \"ldap\" }"));
        assert!(r.to_string().contains("secret[0].rotate.method"), "{r}");
        // A method without a period is allowed, with a warning.
        let c = ok(&edit(
            "rotation_period = \"1h\"\n",
            "rotate = { method = \"exec\", command = [\"/bin/x\"] }\n",
        ));
        assert_eq!(c.warnings[0].key, "secret[0].rotation_period");
    }

    #[test]
    fn dynamic_credentials_are_checked_with_key_and_fix() {
        let with = |d: &str| {
            edit(
                "cache_ttl = \"5m\" }",
                &format!("cache_ttl = \"5m\", dynamic = {d} }}"),
            )
        };
        ok(&with(
            "{ ttl = \"1h\", grants = [\"GRANT SELECT ON t TO {role}\"] }",
        ));
        let i = only_error(
            &with("{ grants = [\"GRANT SELECT ON t TO app\"] }"),
            "route[0].credential.dynamic.grants[0]",
        );
        assert!(i.problem.contains("does not mention {role}"), "{i:?}");
        only_error(
            &with("{ grants = [\"GRANT x TO {role}; DROP TABLE y\"] }"),
            "route[0].credential.dynamic.grants[0]",
        );
        let i = only_error(
            &with("{ ttl = \"2h\", max_ttl = \"1h\" }"),
            "route[0].credential.dynamic.max_ttl",
        );
        assert!(i.fix.contains("at least 2h"), "{i:?}");
        only_error(
            &with("{ role_prefix = \"pg_x\" }"),
            "route[0].credential.dynamic.role_prefix",
        );
        only_error(
            &with("{ role_prefix = \"Bad-\" }"),
            "route[0].credential.dynamic.role_prefix",
        );
        let r = report(&with("{ tll = \"1h\" }"));
        assert!(r.to_string().contains("did you mean `ttl`"), "{r}");
    }

    #[test]
    fn urls_in_messages_carry_no_credentials() {
        assert_eq!(
            url_for_display("https://bob:hunter2@sync.internal/rotate?token=s3cr3t#x"),
            "https://…@sync.internal/rotate…"
        );
        assert_eq!(
            url_for_display("http://127.0.0.1:8080/r"),
            "http://127.0.0.1:8080/r"
        );
        let text = edit_text(
            BASE,
            "[[route]]",
            "[[secret]]\nname = \"w\"\nrotation_period = \"1d\"\nrotate = { method = \"webhook\", url = \"http://bob:hunter2@sync.internal/r?token=s3cr3t\" }\n\n[[route]]",
        );
        let r = report(&text).to_string();
        assert!(
            r.contains("rotate.url") && !r.contains("hunter2") && !r.contains("s3cr3t"),
            "{r}"
        );
    }

    #[test]
    fn tls_server_mode_authorizes_spiffe_ids_and_is_for_tls_routes_only() {
        let base = "trust_domain = \"example.org\"\n\
            [[route]]\nname = \"in\"\nkind = \"tls\"\nmode = \"server\"\n\
            listen = \"127.0.0.1:8443\"\nupstream = \"127.0.0.1:5000\"\n";
        let c = ok(&format!(
            "{base}allow = [\"spiffe://example.org/billing\"]\n"
        ));
        assert_eq!(c.routes[0].mode, TlsRouteMode::Server);
        let i = only_error(
            &format!("{base}allow = [\"billing\"]\n"),
            "route[0].allow[0]",
        );
        assert!(i.problem.contains("not a SPIFFE ID"), "{i:?}");
        only_error(
            &format!("{base}allow = [\"spiffe://example.org/b\"]\nupstream_tls = {{ spiffe_id = \"spiffe://example.org/x\" }}\n"),
            "route[0].upstream_tls",
        );
        let r = report(
            &format!("{base}allow = [\"spiffe://example.org/b\"]\n")
                .replace("kind = \"tls\"", "kind = \"postgres\""),
        );
        assert!(r.errors.iter().any(|e| e.key == "route[0].mode"), "{r}");
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
        assert_eq!(c.routes[0].cache_ttl(), Some(Duration::from_secs(300)));
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
        assert_eq!(KeyType::ALL.len(), 3);
    }

    #[test]
    fn audit_sync() {
        assert_eq!(ok("").audit.sync_window(), None);
        let c = ok("[audit]\nsync = \"interval\"\n");
        assert_eq!(c.audit.sync_window(), Some(DEFAULT_AUDIT_SYNC_INTERVAL));
        // Choosing to lose records on an OS crash is stated, with the window.
        assert_eq!(warning_keys(&c), vec!["audit.sync"]);
        assert!(
            c.warnings[0].problem.contains("up to 10ms"),
            "{:?}",
            c.warnings
        );
        let c = ok("[audit]\nsync = \"interval\"\nsync_interval = \"250ms\"\n");
        assert_eq!(c.audit.sync_window(), Some(Duration::from_millis(250)));
        assert!(
            c.warnings[0].problem.contains("up to 250ms"),
            "{:?}",
            c.warnings
        );
        for bad in ["0s", "2s", "1h"] {
            let text = format!("[audit]\nsync = \"interval\"\nsync_interval = \"{bad}\"\n");
            let issue = only_error(&text, "audit.sync_interval");
            assert!(issue.fix.contains("1ms to 1s"), "{issue:?}");
        }
        let issue = only_error("[audit]\nsync_interval = \"10ms\"\n", "audit.sync_interval");
        assert!(issue.fix.contains("sync = \"interval\""), "{issue:?}");
        let issue = only_error("[audit]\nsync = \"always\"\n", "audit.sync");
        assert!(issue.fix.contains("\"commit\", \"interval\""), "{issue:?}");
        let issue = only_error("[audit]\nfsync = \"commit\"\n", "audit.fsync");
        assert!(issue.fix.contains("did you mean `sync`"), "{issue:?}");
    }

    // ----- rule 1: trust_domain ---------------------------------------------

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

    // ----- rule 2: workloads ------------------------------------------------

    #[test]
    fn workload_names_unique_and_valid() {
        let dup = format!(
            "{BASE}\n[[workload]]\nname = \"reports\"\nspiffe_id = \"spiffe://example.org/other\"\nselectors = {{ uid = 7 }}\n"
        );
        let issue = only_error(&dup, "workload[1].name");
        assert!(issue.problem.contains("workload[0]"), "{issue:?}");

        // Renaming the workload also leaves route[0].allow pointing at nothing.
        let r = report(&edit("name = \"reports\"", "name = \"Reports DB\""));
        let keys: Vec<&str> = r.errors.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec!["workload[0].name", "route[0].allow[0]"]);
        assert!(r.errors[0].fix.contains("\"reports-db\""), "{r}");
        let long = "a".repeat(64);
        for bad in ["-reports", "_x", "", "r\u{e9}ports", long.as_str()] {
            let text = edit("name = \"reports\"", &format!("name = \"{bad}\""))
                .replace("allow = [\"reports\"]", &format!("allow = [\"{bad}\"]"));
            only_error(&text, "workload[0].name");
        }
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
    fn selectors_required_and_checked() {
        only_error(
            &edit("selectors = { uid = 1001 }\n", ""),
            "workload[0].selectors",
        );
        only_error(&edit("{ uid = 1001 }", "{}"), "workload[0].selectors");
        only_error(
            &edit("{ uid = 1001 }", "{ exe_path = \"bin/psql\" }"),
            "workload[0].selectors.exe_path",
        );
        only_error(
            &edit("{ uid = 1001 }", "{ exe_sha256 = \"abc123\" }"),
            "workload[0].selectors.exe_sha256",
        );
        let not_hex = format!("{{ exe_sha256 = \"{}\" }}", "g".repeat(64));
        only_error(
            &edit("{ uid = 1001 }", &not_hex),
            "workload[0].selectors.exe_sha256",
        );
        only_error(
            &edit("{ uid = 1001 }", "{ cgroup = \"system.slice/x.service\" }"),
            "workload[0].selectors.cgroup",
        );
        only_error(
            &edit("{ uid = 1001 }", "{ systemd_unit = \"\" }"),
            "workload[0].selectors.systemd_unit",
        );
        let upper = format!("{{ exe_sha256 = \"{}\" }}", "AB".repeat(32));
        let c = ok(&edit("{ uid = 1001 }", &upper));
        assert_eq!(
            c.workloads[0].selectors.exe_sha256,
            Some("ab".repeat(32)),
            "digest is lowercased"
        );
    }

    // ----- rule 3: routes ---------------------------------------------------

    #[test]
    fn route_names_unique_and_valid() {
        let dup = format!(
            "{BASE}{}",
            edit_text(HTTP_ROUTE, "name = \"payments\"", "name = \"orders-db\"")
        );
        only_error(&dup, "route[1].name");
        only_error(
            &edit("name = \"orders-db\"", "name = \"Orders\""),
            "route[0].name",
        );
    }

    #[test]
    fn listen_addresses_unique() {
        let text = format!(
            "{BASE}{}",
            edit_text(HTTP_ROUTE, "127.0.0.1:18080", "127.0.0.1:15432")
        );
        let issue = only_error(&text, "route[1].listen");
        assert!(issue.problem.contains("route[0]"), "{issue:?}");
        let issue = only_error(
            &edit(
                "listen = \"127.0.0.1:15432\"",
                "listen = \"127.0.0.1:9477\"",
            ),
            "route[0].listen",
        );
        assert!(issue.problem.contains("metrics.listen"), "{issue:?}");
        // Same port on another loopback address is a different socket.
        ok(&edit(
            "listen = \"127.0.0.1:15432\"",
            "listen = \"127.0.0.2:9477\"",
        ));
    }

    #[test]
    fn non_loopback_listen_needs_opt_in() {
        let text = edit("listen = \"127.0.0.1:15432\"", "listen = \"0.0.0.0:15432\"");
        let issue = only_error(&text, "route[0].listen");
        assert!(issue.fix.contains("127.0.0.1"), "{issue:?}");
        assert!(issue.fix.contains("allow_non_loopback = true"), "{issue:?}");
        ok(&format!("{text}allow_non_loopback = true\n"));
        ok(&edit(
            "listen = \"127.0.0.1:15432\"",
            "listen = \"[::1]:15432\"",
        ));
        only_error(
            &edit("listen = \"127.0.0.1:15432\"", "listen = \"127.0.0.1:0\""),
            "route[0].listen",
        );
    }

    #[test]
    fn allow_must_name_declared_workloads() {
        let issue = only_error(
            &edit("allow = [\"reports\"]", "allow = [\"reprots\"]"),
            "route[0].allow[0]",
        );
        assert!(issue.fix.contains("did you mean \"reports\""), "{issue:?}");
        let keys = error_keys(&edit(
            "allow = [\"reports\"]",
            "allow = [\"reports\", \"ghost\"]",
        ));
        assert_eq!(keys, vec!["route[0].allow[1]"]);
    }

    #[test]
    fn empty_allow_is_a_warning() {
        let c = ok(&edit("allow = [\"reports\"]", "allow = []"));
        assert_eq!(warning_keys(&c), vec!["route[0].allow"]);
        assert!(c.warnings[0].problem.contains("refuses every client"));
        let c = ok(&edit("allow = [\"reports\"]\n", ""));
        assert_eq!(warning_keys(&c), vec!["route[0].allow"]);
    }

    #[test]
    fn postgres_route_needs_credential() {
        only_error(
            &edit(
                "credential = { user = \"app\", secret = \"orders-db/app\", cache_ttl = \"5m\" }\n",
                "",
            ),
            "route[0].credential",
        );
        let issue = only_error(&edit("user = \"app\", ", ""), "route[0].credential.user");
        assert!(issue.problem.contains("missing"), "{issue:?}");
        only_error(
            &edit("secret = \"orders-db/app\", ", ""),
            "route[0].credential.secret",
        );
        only_error(
            &edit("user = \"app\"", "user = \"\""),
            "route[0].credential.user",
        );
    }

    #[test]
    fn kernel_relay_is_a_postgres_route_bool() {
        assert_eq!(ok(BASE).routes[0].kernel_relay, None);
        let with = |v: &str| {
            edit(
                "allow = [\"reports\"]\n",
                &format!("allow = [\"reports\"]\nkernel_relay = {v}\n"),
            )
        };
        assert_eq!(ok(&with("false")).routes[0].kernel_relay, Some(false));
        let r = report(&with("\"yes\""));
        assert!(r.to_string().contains("kernel_relay"), "{r}");
    }

    #[test]
    fn postgres_route_pool_is_a_bool_or_a_table() {
        assert_eq!(ok(BASE).routes[0].pool, None);
        let with = |v: &str| {
            edit(
                "allow = [\"reports\"]\n",
                &format!("allow = [\"reports\"]\npool = {v}\n"),
            )
        };
        let p = ok(&with("false")).routes[0].pool.clone().unwrap();
        assert!(!p.enabled);
        let p = ok(&with(
            "{ max_idle = 4, idle_timeout = \"30s\", max_lifetime = \"10m\" }",
        ))
        .routes[0]
            .pool
            .clone()
            .unwrap();
        assert_eq!(
            p,
            PoolConfig {
                enabled: true,
                max_idle: Some(4),
                idle_timeout: Some(Duration::from_secs(30)),
                max_lifetime: Some(Duration::from_secs(600)),
            }
        );
        only_error(
            &with("{ idle_timeout = \"0s\" }"),
            "route[0].pool.idle_timeout",
        );
        let r = report(&with("{ max_idel = 4 }"));
        assert!(r.to_string().contains("max_idel"), "{r}");
        let r = report(&with("\"yes\""));
        assert!(r.to_string().contains("true, false, or a table"), "{r}");
    }

    #[test]
    fn http_route_needs_inject_and_url() {
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"payments/token\" }\n",
                "",
            )
        );
        only_error(&text, "route[1].inject");
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "\"https://payments.internal\"",
                "\"payments.internal:443\""
            )
        );
        only_error(&text, "route[1].upstream");
        let text = format!(
            "{BASE}{}",
            edit_text(HTTP_ROUTE, "\"Bearer {secret}\"", "\"Bearer token\"")
        );
        only_error(&text, "route[1].inject.value");
        let text = format!(
            "{BASE}{}",
            edit_text(HTTP_ROUTE, "\"Authorization\"", "\"Bad Header\"")
        );
        only_error(&text, "route[1].inject.header");
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "\"https://payments.internal\"",
                "\"https://user:pw@payments.internal\""
            )
        );
        only_error(&text, "route[1].upstream");
    }

    #[test]
    fn http_and_tls_route_keys_are_checked() {
        let inj = "inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"payments/token\" }";
        let http = |to: &str| format!("{BASE}{}", edit_text(HTTP_ROUTE, inj, to));
        only_error(
            &http("inject = { header = \"A\", query = \"k\", secret = \"payments/token\" }"),
            "route[1].inject",
        );
        only_error(
            &http("inject = { basic_user = \"svc\", value = \"{secret}\", secret = \"payments/token\" }"),
            "route[1].inject.value",
        );
        only_error(
            &http("inject = { basic_user = \"a:b\", secret = \"payments/token\" }"),
            "route[1].inject.basic_user",
        );
        only_error(
            &http("inject = { query = \"a b\", secret = \"payments/token\" }"),
            "route[1].inject.query",
        );
        ok(&http(
            "inject = { query = \"api_key\", secret = \"payments/token\" }",
        ));
        only_error(
            &http(&format!("{inj}\ntunnel = [\"github.com:443\"]")),
            "route[1].tunnel",
        );
        only_error(
            &http(&format!(
                "{inj}\nforward_proxy = true\ntunnel = [\"github.com\"]"
            )),
            "route[1].tunnel[0]",
        );
        only_error(
            &http(&format!("{inj}\nupstream_tls = {{ mode = \"require\" }}")),
            "route[1].upstream_tls.mode",
        );
        only_error(
            &http(&format!("{inj}\nrequest_timeout = \"0s\"")),
            "route[1].request_timeout",
        );
        ok(&http(&format!("{inj}\nfast_path = false")));
        // http routes take kernel_relay (joined local hops), tls routes do not.
        ok(&http(&format!("{inj}\nkernel_relay = false")));
        only_error(
            &http(&format!("{inj}\nforward_proxy = true\nfast_path = false")),
            "route[1].fast_path",
        );
        // Two forward proxies may share a listener; a reverse proxy may not.
        let second = HTTP_ROUTE.replace("\"payments\"", "\"payments-2\"");
        let fwd = |t: &str| t.replace("allow = [", "forward_proxy = true\nallow = [");
        ok(&format!("{BASE}{}{}", fwd(HTTP_ROUTE), fwd(&second)));
        only_error(
            &format!("{BASE}{}{}", fwd(HTTP_ROUTE), second),
            "route[2].listen",
        );
        // tls routes: verification always on, spiffe_id well formed and tls-only.
        let tls = "\n[[route]]\nname = \"logs\"\nkind = \"tls\"\nlisten = \"127.0.0.1:16514\"\nupstream = \"logs.internal:6514\"\nallow = [\"reports\"]\n";
        let with_tls = |extra: &str| format!("{BASE}{tls}{extra}\n");
        ok(&with_tls(
            "upstream_tls = { spiffe_id = \"spiffe://example.org/logs\" }",
        ));
        only_error(&with_tls("kernel_relay = true"), "route[1].kernel_relay");
        only_error(
            &with_tls("upstream_tls = { spiffe_id = \"https://x\" }"),
            "route[1].upstream_tls.spiffe_id",
        );
        let r = report(&with_tls("upstream_tls = { mode = \"require\" }"));
        assert!(
            r.errors
                .iter()
                .any(|i| i.key == "route[1].upstream_tls.mode"),
            "{r}"
        );
        only_error(
            &http(&format!(
                "{inj}\nupstream_tls = {{ spiffe_id = \"spiffe://example.org/x\" }}"
            )),
            "route[1].upstream_tls.spiffe_id",
        );
    }

    #[test]
    fn credential_and_inject_belong_to_their_kinds() {
        let text = edit(
            "allow = [\"reports\"]",
            "allow = [\"reports\"]\ninject = { header = \"X\", value = \"{secret}\", secret = \"a\" }",
        );
        only_error(&text, "route[0].inject");
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "allow = [\"reports\"]",
                "allow = [\"reports\"]\ncredential = { user = \"u\", secret = \"a\" }"
            )
        );
        only_error(&text, "route[1].credential");
    }

    #[test]
    fn upstream_port_rules() {
        for bad in [
            "db.internal",
            "db.internal:0",
            "db.internal:70000",
            "db.internal:pg",
            "postgres://db.internal:5432",
            "::1:5432",
            ":5432",
        ] {
            let text = edit("\"db.internal:5432\"", &format!("\"{bad}\""));
            only_error(&text, "route[0].upstream");
        }
        ok(&edit("\"db.internal:5432\"", "\"[::1]:5432\""));
        ok(&edit("\"db.internal:5432\"", "\"10.0.0.5:65535\""));
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "\"https://payments.internal\"",
                "\"https://payments.internal:0/x\""
            )
        );
        only_error(&text, "route[1].upstream");
    }

    #[test]
    fn tls_disable_to_remote_host_is_a_warning() {
        let text = edit(
            "upstream = \"db.internal:5432\"",
            "upstream = \"db.internal:5432\"\nupstream_tls = { mode = \"disable\" }",
        );
        let c = ok(&text);
        assert_eq!(warning_keys(&c), vec!["route[0].upstream_tls.mode"]);
        let text = edit(
            "upstream = \"db.internal:5432\"",
            "upstream = \"127.0.0.1:5432\"\nupstream_tls = { mode = \"disable\" }",
        );
        assert!(ok(&text).warnings.is_empty());
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "\"https://payments.internal\"",
                "\"http://payments.internal\""
            )
        );
        assert_eq!(warning_keys(&ok(&text)), vec!["route[1].upstream"]);
    }

    #[test]
    fn unix_socket_only_for_postgres() {
        let c = ok(&edit(
            "allow = [\"reports\"]",
            "allow = [\"reports\"]\nunix_socket = \"pg\"",
        ));
        assert_eq!(
            c.routes[0].unix_socket,
            Some(PathBuf::from("/etc/warden/pg"))
        );
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "allow = [\"reports\"]",
                "allow = [\"reports\"]\nunix_socket = \"/run/warden/x\""
            )
        );
        only_error(&text, "route[1].unix_socket");
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

    // ----- rule 4: cache TTL versus rotation --------------------------------

    #[test]
    fn cache_ttl_longer_than_rotation_is_an_error() {
        let issue = only_error(
            &edit("cache_ttl = \"5m\"", "cache_ttl = \"2h\""),
            "route[0].credential.cache_ttl",
        );
        assert_eq!(
            issue.problem,
            "cache_ttl 2h is longer than the rotation period 1h of secret \"orders-db/app\" (secret[0].rotation_period): clients would keep using a rotated-out credential"
        );
        assert_eq!(
            issue.fix,
            "set cache_ttl to at most 1h or lengthen the rotation period"
        );
        // Equal is fine; no rotation period means no limit.
        ok(&edit("cache_ttl = \"5m\"", "cache_ttl = \"60m\""));
        ok(&edit("rotation_period = \"1h\"\n", ""));
    }

    #[test]
    fn inject_cache_ttl_is_checked_too() {
        let text = format!(
            "{BASE}\n[[secret]]\nname = \"payments/token\"\nrotation_period = \"10m\"\n{}",
            edit_text(
                HTTP_ROUTE,
                "secret = \"payments/token\"",
                "secret = \"payments/token\", cache_ttl = \"11m\""
            )
        );
        let issue = only_error(&text, "route[1].inject.cache_ttl");
        assert!(
            issue.problem.contains("(secret[1].rotation_period)"),
            "{issue:?}"
        );
    }

    // ----- rule 5: secrets --------------------------------------------------

    #[test]
    fn secret_policies() {
        let dup = format!("{BASE}\n[[secret]]\nname = \"orders-db/app\"\n");
        only_error(&dup, "secret[1].name");
        only_error(
            &edit("name = \"orders-db/app\"", "name = \"orders-db//app\""),
            "secret[0].name",
        );
        let text = edit("rotation_period = \"1h\"", "rotation_period = \"30s\"")
            .replace("cache_ttl = \"5m\"", "cache_ttl = \"10s\"");
        only_error(&text, "secret[0].rotation_period");
        ok(&edit(
            "rotation_period = \"1h\"",
            "rotation_period = \"1m\"\nmax_versions = 1000",
        )
        .replace("cache_ttl = \"5m\"", "cache_ttl = \"1m\""));
        only_error(
            &edit(
                "rotation_period = \"1h\"",
                "rotation_period = \"1h\"\nmax_versions = 0",
            ),
            "secret[0].max_versions",
        );
        only_error(
            &edit(
                "rotation_period = \"1h\"",
                "rotation_period = \"1h\"\nmax_versions = 1001",
            ),
            "secret[0].max_versions",
        );
    }

    // ----- rule 6: ranges ---------------------------------------------------

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
        only_error("[metrics]\nlisten = \"127.0.0.1:0\"\n", "metrics.listen");
    }

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

    // ----- rule 7: socket path length ---------------------------------------

    #[test]
    fn socket_paths_must_fit_sun_path() {
        let long = format!("/run/{}.sock", "s".repeat(100)); // 110 bytes
        only_error(&format!("[admin]\nsocket = \"{long}\"\n"), "admin.socket");
        only_error(
            &format!("[identity]\nworkload_api_socket = \"{long}\"\n"),
            "identity.workload_api_socket",
        );
        only_error(&format!("data_dir = \"{long}\"\n"), "data_dir");
        // A data_dir that only just fits leaves no room for the fallback admin socket.
        let near = format!("/{}", "d".repeat(100));
        assert_eq!(
            warning_keys(&ok(&format!("data_dir = \"{near}\"\n"))),
            vec!["data_dir"]
        );
        let with_socket = format!("data_dir = \"{near}\"\n[admin]\nsocket = \"/run/a.sock\"\n");
        assert!(ok(&with_socket).warnings.is_empty());
        only_error(
            &edit(
                "allow = [\"reports\"]",
                &format!("allow = [\"reports\"]\nunix_socket = \"{long}\""),
            ),
            "route[0].unix_socket",
        );
        // 107 bytes is the longest that fits.
        let fits = format!("/{}", "s".repeat(106));
        ok(&format!("[admin]\nsocket = \"{fits}\"\n"));
        let too_long = format!("/{}", "s".repeat(107));
        only_error(
            &format!("[admin]\nsocket = \"{too_long}\"\n"),
            "admin.socket",
        );
        // Relative paths count after resolution against the config directory.
        let deep = Path::new("/").join("d".repeat(100)).join("warden.toml");
        let report = parse_str("[admin]\nsocket = \"admin.sock\"\n", &deep).unwrap_err();
        assert_eq!(report.errors[0].key, "admin.socket");
    }

    #[test]
    fn sockets_must_not_share_a_path() {
        let text = "[admin]\nsocket = \"/run/w.sock\"\n[identity]\nworkload_api_socket = \"/run/w.sock\"\n";
        let issue = only_error(text, "identity.workload_api_socket");
        assert!(issue.problem.contains("admin.socket"), "{issue:?}");
    }

    // ----- shape errors -----------------------------------------------------

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

    // ----- durations --------------------------------------------------------

    #[test]
    fn duration_parser_accepts() {
        let cases = [
            ("90s", 90_000),
            ("15m", 900_000),
            ("1h", 3_600_000),
            ("24h", 86_400_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("0s", 0),
            ("1d2h3m4s5ms", 93_784_005),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn duration_parser_rejects() {
        for text in [
            "",
            "10",
            "h",
            "1x",
            "1.5h",
            "-1h",
            "+1h",
            "1 h",
            " 1h",
            "1h ",
            "30m1h",
            "1h1h",
            "1H",
            "1hour",
            "99999999999999999999d",
            "213503982335d",
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("\"1h30m\""), "{text}: {err}");
            assert!(err.contains("ms, s, m, h or d"), "{text}: {err}");
        }
    }

    #[test]
    fn duration_formatting_round_trips() {
        for text in ["2h", "1h30m", "500ms", "1d", "7d", "1m1s", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
    }

    // ----- paths ------------------------------------------------------------

    #[test]
    fn relative_data_dir_resolves_against_config_dir() {
        let c = parse_str(
            "data_dir = \"state\"\n",
            Path::new("/opt/warden/conf/warden.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/opt/warden/conf/state")));
        let c = parse_str(
            "data_dir = \"../state/./x\"\n",
            Path::new("/opt/warden/conf/warden.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/opt/warden/state/x")));
        let c = parse_str(
            "data_dir = \"/abs\"\n",
            Path::new("/opt/warden/conf/warden.toml"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Some(PathBuf::from("/abs")));
        // A relative origin is taken relative to the current directory.
        let c = parse_str("data_dir = \"state\"\n", Path::new("warden.toml")).unwrap();
        let expected = std::env::current_dir().unwrap().join("state");
        assert_eq!(c.data_dir, Some(lexical_normalise(&expected)));
        let c = parse_str(
            "[identity]\nworkload_api_socket = \"w.sock\"\n",
            Path::new("/a/b/c.toml"),
        )
        .unwrap();
        assert_eq!(
            c.identity.workload_api_socket,
            Some(PathBuf::from("/a/b/w.sock"))
        );
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

    // ----- display ----------------------------------------------------------

    #[test]
    fn report_display_format() {
        let r = ConfigReport {
            file: PathBuf::from("/etc/warden.toml"),
            errors: vec![
                ConfigIssue::new("store.max_versions", "is 0", "set 1..1000"),
                ConfigIssue::new("", "cannot read", "check it"),
            ],
            warnings: vec![ConfigIssue::new("route[0].allow", "empty", "add names")],
        };
        assert_eq!(
            r.to_string(),
            "/etc/warden.toml: error: store.max_versions: is 0 (fix: set 1..1000)\n\
             /etc/warden.toml: error: cannot read (fix: check it)\n\
             /etc/warden.toml: warning: route[0].allow: empty (fix: add names)"
        );
        let as_error: &dyn std::error::Error = &r;
        assert!(as_error.to_string().starts_with("/etc/warden.toml: error:"));
    }

    #[test]
    fn real_report_display_has_one_line_per_issue() {
        let text = edit("allow = [\"reports\"]", "allow = []").replace(
            "trust_domain = \"example.org\"",
            "trust_domain = \"Example.org\"",
        );
        let r = report(&text);
        let shown = r.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), r.errors.len() + r.warnings.len(), "{shown}");
        assert!(
            lines[0].starts_with("/etc/warden/warden.toml: error: trust_domain: "),
            "{shown}"
        );
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with("/etc/warden/warden.toml: warning: route[0].allow: "),
            "{shown}"
        );
        assert!(lines.iter().all(|l| l.contains(" (fix: ")), "{shown}");
    }

    // ----- helpers ----------------------------------------------------------

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("lsiten", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("uplink", &["upstream", "listen"], 2), None);
        assert_eq!(closest("alow", &["allow", "listen"], 2), Some("allow"));
    }
}
