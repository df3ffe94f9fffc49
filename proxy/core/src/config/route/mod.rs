//! `[[route]]`: a local listener that proxies to an upstream and supplies the
//! credential — the route schema (kind, listen, upstream, upstream TLS, pool,
//! kind-specific keys) and its checks. The credential (postgres) and inject
//! (http) tables live in [`credential`] and [`inject`].

pub(super) mod credential;
pub(super) mod inject;
pub(super) mod mysql;
pub(super) mod redis;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::address::{is_loopback_host, is_loopback_ip, parse_http_url, split_host_port};
use super::check::{check_socket_path, Checker};
use super::duration::{de_opt_duration, format_duration};
use super::names::check_name;
use super::suggest::closest;
use credential::{check_credential, Credential};
use inject::{check_inject, Inject};

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
    /// Protocol a route speaks (`route[].kind`).
    RouteKind {
        /// PostgreSQL wire protocol; warden logs in with `credential`.
        Postgres => "postgres",
        /// HTTP; warden adds a header from `inject`.
        Http => "http",
        /// Raw TLS passthrough or origination to `upstream`.
        Tls => "tls",
        /// Redis (RESP2/RESP3); warden sends `AUTH` with `credential`.
        Redis => "redis",
        /// MySQL/MariaDB wire protocol; warden logs in with `credential`.
        Mysql => "mysql",
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
    /// Login credential (postgres, redis, mysql).
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
    /// TLS to clients (postgres: answer SSLRequest with `S`; mysql:
    /// CLIENT_SSL in warden's greeting), with a certificate from warden's CA
    /// for `localhost` and the listen address: `true` offers it,
    /// `"require"` refuses clients that do not use it.
    #[serde(default)]
    pub client_tls: ClientTls,
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
    /// postgres, redis, mysql: hand long sessions on plain TCP (client and
    /// upstream) to the eBPF kernel relay. http: let the kernel join warden's local hops
    /// (client ↔ warden, warden ↔ an upstream on this host) socket to
    /// socket. Needs the eBPF monitor loaded. Default: see
    /// [`Route::kernel_relay_on`].
    #[serde(default)]
    pub kernel_relay: Option<bool>,
    /// redis: commands clients may not send (answered with `-NOPERM`).
    #[serde(default)]
    pub deny_commands: Option<Vec<String>>,
    /// redis: the only commands clients may send (others get `-NOPERM`).
    #[serde(default)]
    pub allow_commands: Option<Vec<String>>,
}

/// `route[].connect_timeout` when not set.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Route {
    /// Whether `kernel_relay` is on: as set, else true. A spliced MySQL
    /// session's `COM_CHANGE_USER`, or a spliced Redis session's `AUTH`,
    /// `HELLO` and `RESET`, are caught by the kernel program and handled by
    /// warden (`GUARD_MYSQL`, `GUARD_REDIS`; docs/mysql.md, docs/redis.md).
    pub fn kernel_relay_on(&self) -> bool {
        self.kernel_relay.unwrap_or(true)
    }

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

    /// Host and port of the upstream. For http routes the URL's port, or 80/443 by scheme.
    pub fn upstream_host_port(&self) -> Result<(String, u16), String> {
        match self.kind {
            RouteKind::Http => parse_http_url(&self.upstream).map(|u| (u.host, u.port)),
            RouteKind::Postgres | RouteKind::Tls | RouteKind::Redis | RouteKind::Mysql => {
                split_host_port(&self.upstream)
            }
        }
    }
}

config_enum! {
    /// When a pooled PostgreSQL, MySQL or Redis connection is reset between
    /// clients (`route.pool.reset`).
    #[derive(Default)]
    PoolReset {
        /// Only after a session that may have left state (the default;
        /// each kind's docs say which sessions are state-free).
        #[default]
        Auto => "auto",
        /// After every session.
        Always => "always",
    }
}

/// `route.pool`: `true`, `false`, or `{ max_idle, idle_timeout, max_lifetime,
/// reset }` (a table means enabled; unset keys take the defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolConfig {
    pub enabled: bool,
    pub max_idle: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub reset: PoolReset,
    /// `reset` was written in the file (not the default).
    pub reset_set: bool,
}

/// Pool defaults (PostgreSQL and MySQL routes).
pub const DEFAULT_MAX_IDLE: usize = 16;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// A route's pool limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Idle connections kept for the route (all keys together); 0 disables.
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    /// `auto`: no reset after a state-free session.
    pub reset: PoolReset,
}

impl PoolSettings {
    /// From `route.pool` (unset: enabled with the defaults).
    pub fn from_config(c: Option<&PoolConfig>) -> PoolSettings {
        let enabled = c.is_none_or(|c| c.enabled);
        PoolSettings {
            max_idle: if enabled {
                c.and_then(|c| c.max_idle).unwrap_or(DEFAULT_MAX_IDLE)
            } else {
                0
            },
            idle_timeout: c
                .and_then(|c| c.idle_timeout)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT),
            max_lifetime: c
                .and_then(|c| c.max_lifetime)
                .unwrap_or(DEFAULT_MAX_LIFETIME),
            reset: c.map(|c| c.reset).unwrap_or_default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_idle > 0
    }
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
    #[serde(default)]
    reset: Option<PoolReset>,
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
                    reset: t.reset.unwrap_or_default(),
                    reset_set: t.reset.is_some(),
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// `route.client_tls`: `false` (the default), `true` (offered) or
/// `"require"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientTls {
    #[default]
    Off,
    /// Offered: a client asking for TLS gets it; plain text is served too.
    Offer,
    /// Required: a client that does not ask for TLS is refused.
    Require,
}

impl ClientTls {
    /// TLS is offered (or required).
    pub fn enabled(self) -> bool {
        self != ClientTls::Off
    }
}

impl<'de> Deserialize<'de> for ClientTls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ClientTls, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = ClientTls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"require\"")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<ClientTls, E> {
                Ok(if on { ClientTls::Offer } else { ClientTls::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClientTls, E> {
                match v {
                    "require" => Ok(ClientTls::Require),
                    _ => Err(E::custom(format!(
                        "\"{v}\" is not a client_tls setting: use true, false or \"require\""
                    ))),
                }
            }
        }
        d.deserialize_any(Visit)
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

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.trim().parse::<SocketAddr>().map_err(|_| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not an IP:PORT address (host names are not accepted here)"
        ))
    })
}

/// Every `[[route]]`: unique names, listen addresses that do not clash,
/// kind-specific keys, upstream, secret table and `allow`.
pub(super) fn check_routes(c: &mut Checker<'_>) {
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
        if r.client_tls.enabled()
            && !matches!(
                r.kind,
                RouteKind::Postgres | RouteKind::Mysql | RouteKind::Redis
            )
        {
            c.error(
                format!("{k}.client_tls"),
                format!("client_tls is only supported on kind = \"postgres\", \"mysql\" and \"redis\" routes; this route is kind = \"{}\"", r.kind),
                "remove client_tls from this route",
            );
        }

        check_route_kind_keys(c, &k, r);
        redis::check_redis_keys(c, &k, r);
        mysql::check_mysql_keys(c, &k, r);
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
        if !matches!(
            r.kind,
            RouteKind::Postgres | RouteKind::Mysql | RouteKind::Redis
        ) {
            c.error(
                format!("{k}.pool"),
                format!(
                    "pool is only used by kind = \"postgres\", \"mysql\" and \"redis\" routes; this route is kind = \"{}\"",
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
    if r.kernel_relay.is_some()
        && !matches!(
            r.kind,
            RouteKind::Postgres | RouteKind::Http | RouteKind::Redis | RouteKind::Mysql
        )
    {
        c.error(
            format!("{k}.kernel_relay"),
            format!(
                "kernel_relay is only used by kind = \"postgres\", \"redis\", \"mysql\" and \"http\" routes; this route is kind = \"{}\"",
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
        RouteKind::Postgres | RouteKind::Tls | RouteKind::Redis | RouteKind::Mysql => match split_host_port(
            &r.upstream,
        ) {
            Err(problem) => c.error(
                format!("{k}.upstream"),
                format!("upstream \"{}\" {problem}", r.upstream),
                format!(
                    "for kind = \"{}\" write upstream as host:port, e.g. \"{}\"",
                    r.kind,
                    match r.kind {
                        RouteKind::Redis => "cache.internal:6379",
                        RouteKind::Mysql => "db.internal:3306",
                        _ => "db.internal:5432",
                    }
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

/// The secret table a route's kind needs (postgres: `credential`, http:
/// `inject`), keys its kind does not use, then that table's own checks.
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
        RouteKind::Redis => {
            if r.credential.is_none() {
                c.error(
                    format!("{k}.credential"),
                    format!("redis route \"{}\" has no credential, so warden cannot log in to Redis for its clients", r.name),
                    "add credential = { secret = \"cache/app\" } (and user = \"app\" for a Redis ACL user)",
                );
            }
        }
        RouteKind::Mysql => {
            if r.credential.is_none() {
                c.error(
                    format!("{k}.credential"),
                    format!("mysql route \"{}\" has no credential, so warden cannot log in to the database for its clients", r.name),
                    "add credential = { user = \"app\", secret = \"orders-db/app\" }",
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
    if r.credential.is_some()
        && !matches!(
            r.kind,
            RouteKind::Postgres | RouteKind::Redis | RouteKind::Mysql
        )
    {
        c.error(
            format!("{k}.credential"),
            format!("credential is only used by kind = \"postgres\", \"redis\" and \"mysql\" routes; this route is kind = \"{}\"", r.kind),
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
            if matches!(
                r.kind,
                RouteKind::Postgres | RouteKind::Redis | RouteKind::Mysql
            ) {
                "use credential = { user = ..., secret = ... } for postgres, redis and mysql routes"
            } else {
                "remove inject from this route"
            },
        );
    }

    if let Some(cred) = &r.credential {
        check_credential(c, k, r, cred);
    }

    if let Some(inject) = &r.inject {
        check_inject(c, k, inject);
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
