//! PostgreSQL routes: a legacy client connects with no password; warden
//! attributes and attests the peer, checks the route's allow list, logs in to
//! the real database with the injected credential, then relays bytes.
//!
//! The front end is a codec plus a denial-to-SQLSTATE table: attestation,
//! policy, the credential and the session records are the core's admission
//! step ([`warden_core::admission`]); the PostgreSQL client library
//! (protocol codec, SCRAM, upstream login) is [`warden_core::pgwire`],
//! re-exported here as [`protocol`], [`scram`], [`upstream`] and [`sql`].
//!
//! - [`session`]: one client session, from the first byte to the audit record.
//! - [`server_tls`]: `client_tls` routes' certificate from warden's CA.
//! - [`relay`]: the byte relay after the greeting (headers tracked, Terminate kept back).
//! - [`pool`]: idle authenticated upstream connections, reset between clients.
//!
//! This crate owns the per-route listeners and the
//! cancel-key map (warden hands clients its own BackendKeyData and forwards a
//! CancelRequest to the matching upstream session).

pub mod kernel;
pub mod pool;
pub mod relay;
pub mod server_tls;
pub mod session;
pub mod session_state;

pub use warden_core::leases as dynamic;
pub use warden_core::pgwire::{protocol, scram, sql, upstream};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use upstream::UpstreamTarget;
use warden_core::authority::IdentityHandle;
use warden_core::config::{self, Config, RouteKind};
use warden_core::error::{Error, Result};
use warden_core::metrics::Metrics;

pub use warden_core::credentials::{CredentialCache, DEFAULT_CACHE_TTL};

/// Everything one PostgreSQL route needs at run time.
pub struct PgRoute {
    pub name: String,
    pub listen: SocketAddr,
    pub unix_socket: Option<std::path::PathBuf>,
    pub target: UpstreamTarget,
    pub user: String,
    pub secret: String,
    pub env: String,
    pub cache_ttl: Duration,
    pub allow: Vec<String>,
    pub databases: Vec<String>,
    /// Answer SSLRequest with `S` and serve TLS with a certificate from
    /// warden's CA (`Require`: refuse clients that start in plain text).
    pub client_tls: config::ClientTls,
    /// Dynamic credentials: sessions get a lease role from [`dynamic::LeaseManager`];
    /// `user`/`secret` are the administrative login.
    pub dynamic: Option<config::Dynamic>,
    /// Reuse of authenticated upstream connections (`route.pool`).
    pub pool: pool::PoolSettings,
    /// Hand long plain-TCP sessions to the kernel relay (`route.kernel_relay`).
    pub kernel_relay: bool,
}

/// Where a session's login comes from.
pub enum CredentialSource {
    /// `credential = { user, secret }`: the stored secret's latest version.
    Static,
    /// `credential.dynamic`: a per-workload lease role.
    Dynamic,
}

impl PgRoute {
    pub fn source(&self) -> CredentialSource {
        match self.dynamic {
            Some(_) => CredentialSource::Dynamic,
            None => CredentialSource::Static,
        }
    }

    /// The settings of a dynamic route's leases.
    pub fn dynamic_spec(&self, cfg_route: &config::Route) -> Option<dynamic::DynamicSpec> {
        let d = self.dynamic.as_ref()?;
        dynamic::DynamicSpec::new(cfg_route, d, self.target.clone(), &self.env, self.cache_ttl)
    }
}

impl PgRoute {
    pub fn from_config(cfg: &Config) -> Result<Vec<PgRoute>> {
        let mut out = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.kind != RouteKind::Postgres {
                continue;
            }
            let cred = r.credential.as_ref().ok_or_else(|| {
                Error::usage(format!(
                    "route[{i}].credential: a postgres route needs user and secret"
                ))
            })?;
            let rotation = cfg
                .secrets
                .iter()
                .find(|s| s.name == cred.secret)
                .and_then(|s| s.rotation_period);
            let mut cache_ttl = cred.cache_ttl.unwrap_or(DEFAULT_CACHE_TTL);
            if let Some(rot) = rotation {
                cache_ttl = cache_ttl.min(rot);
            }
            out.push(PgRoute {
                name: r.name.clone(),
                listen: r.listen,
                unix_socket: r.unix_socket.clone(),
                target: UpstreamTarget::from_route(r, i)?,
                user: cred.user.clone(),
                secret: cred.secret.clone(),
                env: cfg.environment.clone(),
                cache_ttl,
                allow: r.allow.clone(),
                databases: r.databases.clone(),
                client_tls: r.client_tls,
                dynamic: cred.dynamic.clone(),
                pool: pool::PoolSettings::from_config(r.pool.as_ref()),
                kernel_relay: r.kernel_relay_on(),
            });
        }
        Ok(out)
    }
}

/// Where a cancel request for one of warden's BackendKeyData goes.
pub struct CancelTarget {
    pub target: UpstreamTarget,
    pub process_id: i32,
    pub secret_key: Vec<u8>,
}

/// warden's (pid, key) handed to clients → the upstream session's.
#[derive(Default)]
pub struct CancelMap {
    entries: Mutex<HashMap<(i32, [u8; 4]), CancelTarget>>,
}

thread_local! {
    /// Random bytes for cancel keys, drawn from the system CSPRNG 256 at a
    /// time (one call per 32 sessions instead of one per session).
    static CANCEL_RANDOM: std::cell::RefCell<([u8; 256], usize)> =
        const { std::cell::RefCell::new(([0; 256], 256)) };
}

/// Eight fresh random bytes (never handed out twice).
fn cancel_random() -> [u8; 8] {
    CANCEL_RANDOM.with(|r| {
        let (buf, used) = &mut *r.borrow_mut();
        if *used + 8 > buf.len() {
            let _ = aws_lc_rs::rand::fill(buf);
            *used = 0;
        }
        let mut out = [0u8; 8];
        out.copy_from_slice(&buf[*used..*used + 8]);
        // Spent bytes are overwritten so they cannot be read back.
        buf[*used..*used + 8].fill(0);
        *used += 8;
        out
    })
}

impl CancelMap {
    /// Registers an upstream session; returns the key the client gets.
    pub fn register(&self, target: CancelTarget) -> (i32, [u8; 4]) {
        let Ok(mut map) = self.entries.lock() else {
            // A poisoned map: the key is handed out but cancels nothing.
            let raw = cancel_random();
            return (1, [raw[4], raw[5], raw[6], raw[7]]);
        };
        let mut target = Some(target);
        loop {
            let raw = cancel_random();
            let pid = i32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]).max(1);
            let key = [raw[4], raw[5], raw[6], raw[7]];
            if let std::collections::hash_map::Entry::Vacant(slot) = map.entry((pid, key)) {
                if let Some(t) = target.take() {
                    slot.insert(t);
                }
                return (pid, key);
            }
        }
    }

    pub fn remove(&self, pid: i32, key: &[u8; 4]) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(&(pid, *key));
        }
    }

    fn lookup(&self, pid: i32, key: &[u8]) -> Option<(UpstreamTarget, i32, Vec<u8>)> {
        let key: [u8; 4] = key.try_into().ok()?;
        let map = self.entries.lock().ok()?;
        map.get(&(pid, key))
            .map(|t| (t.target.clone(), t.process_id, t.secret_key.clone()))
    }
}

/// The daemon services a PostgreSQL session consults besides the admission step.
pub struct SessionServices {
    pub leases: Arc<dynamic::LeaseManager>,
    /// The eBPF kernel relay, when the monitor loaded it.
    pub kernel_relay: Option<Arc<warden_ebpf::KernelRelay>>,
}

/// State shared by every PostgreSQL session.
pub struct PgShared {
    /// attest → policy → credential → session records (every front end's).
    pub admission: Arc<warden_core::admission::Admission>,
    pub scram_cache: scram::ScramKeyCache,
    pub leases: Arc<dynamic::LeaseManager>,
    pub cancels: CancelMap,
    pub metrics: Metrics,
    /// Client-side TLS configuration per route (routes with `client_tls`).
    pub client_tls: HashMap<String, Arc<rustls::ServerConfig>>,
    /// Idle authenticated upstream connections.
    pub pool: pool::Pool,
    /// The eBPF kernel relay for long sessions (None: user space only).
    pub kernel_relay: Option<Arc<warden_ebpf::KernelRelay>>,
}

impl PgShared {
    pub fn new(
        admission: Arc<warden_core::admission::Admission>,
        routes: &[Arc<PgRoute>],
        identity: Arc<IdentityHandle>,
        metrics: Metrics,
        services: SessionServices,
    ) -> Result<PgShared> {
        let mut client_tls = HashMap::new();
        for r in routes.iter().filter(|r| r.pool.enabled()) {
            metrics.pg_pool_declare(&r.name);
        }
        for r in routes.iter().filter(|r| r.kernel_relay) {
            metrics.kernel_relay_declare(warden_core::metrics::RelayKind::Postgres, &r.name);
        }
        for r in routes.iter().filter(|r| r.client_tls.enabled()) {
            client_tls.insert(
                r.name.clone(),
                server_tls::server_config(r, identity.clone())?,
            );
        }
        let SessionServices {
            leases,
            kernel_relay,
        } = services;
        Ok(PgShared {
            admission,
            scram_cache: scram::ScramKeyCache::with_capacity(8192),
            leases,
            cancels: CancelMap::default(),
            pool: pool::Pool::new(metrics.clone()),
            metrics,
            client_tls,
            kernel_relay,
        })
    }
}

/// A route's bound listeners: one TCP listener per session shard (sharing
/// the address through `SO_REUSEPORT`) and its unix socket, if any.
pub struct BoundRoute {
    pub route: Arc<PgRoute>,
    pub tcp: Vec<std::net::TcpListener>,
    pub unix: Option<std::os::unix::net::UnixListener>,
}

impl BoundRoute {
    /// The address the route listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp
            .first()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(self.route.listen)
    }
}

/// Binds every PostgreSQL route's listeners, `shards` TCP listeners each
/// (so a busy port fails the start).
pub async fn bind_routes(routes: Vec<PgRoute>, shards: usize) -> Result<Vec<BoundRoute>> {
    let mut out = Vec::new();
    for r in routes {
        let tcp = warden_core::shard::reuseport_listeners(r.listen, shards)
            .map_err(|e| warden_core::listen::bind_error(&r.name, r.listen, &e))?;
        let unix = match &r.unix_socket {
            None => None,
            Some(dir) => {
                let l = session::bind_unix(dir, r.listen.port(), &r.name)?
                    .into_std()
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| {
                        Error::internal(format!("route {:?}: unix socket: {e}", r.name))
                    })?;
                Some(l)
            }
        };
        out.push(BoundRoute {
            route: Arc::new(r),
            tcp,
            unix,
        });
    }
    Ok(out)
}

/// Serves shard `index`'s listener of a bound route (call inside that
/// shard's runtime): shard 0 also serves the unix socket and reaps the
/// route's idle pooled connections.
pub async fn serve_shard(
    route: Arc<PgRoute>,
    index: usize,
    tcp: std::net::TcpListener,
    unix: Option<std::os::unix::net::UnixListener>,
    shared: Arc<PgShared>,
) {
    let tcp = match tokio::net::TcpListener::from_std(tcp) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(route = %route.name, "cannot serve a listener: {e}");
            return;
        }
    };
    if index > 0 {
        loop {
            accept_tcp(&tcp, &route, &shared).await;
        }
    }
    let unix = unix.and_then(|u| match tokio::net::UnixListener::from_std(u) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::error!(route = %route.name, "cannot serve the unix socket: {e}");
            None
        }
    });
    serve_route(route, tcp, unix, shared).await;
}

/// Accepts sessions on one route until the task is dropped.
pub async fn serve_route(
    route: Arc<PgRoute>,
    tcp: tokio::net::TcpListener,
    unix: Option<tokio::net::UnixListener>,
    shared: Arc<PgShared>,
) {
    if let Some(unix) = unix {
        let (route, shared) = (route.clone(), shared.clone());
        tokio::spawn(async move {
            loop {
                match unix.accept().await {
                    Ok((stream, _)) => {
                        if shed(&route, &shared, &stream) {
                            continue;
                        }
                        let pid = stream
                            .peer_cred()
                            .ok()
                            .and_then(|c| c.pid())
                            .and_then(|p| u32::try_from(p).ok());
                        let (route, shared) = (route.clone(), shared.clone());
                        tokio::spawn(session::run(
                            stream,
                            session::Peer::Unix {
                                pid,
                                accepted_ns: Some(warden_core::peer::boottime_ns()),
                            },
                            route,
                            shared,
                        ));
                    }
                    Err(e) => {
                        tracing::warn!("route accept (unix) failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    let accept = async {
        loop {
            accept_tcp(&tcp, &route, &shared).await;
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = reap_pool(route.clone(), shared.clone()) => {}
    }
}

/// Closes idle pooled connections that timed out, died or lost their lease.
async fn reap_pool(route: Arc<PgRoute>, shared: Arc<PgShared>) {
    if !route.pool.enabled() {
        return std::future::pending().await;
    }
    let every =
        (route.pool.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let leases = route.dynamic.as_ref().map(|_| {
            shared
                .leases
                .list()
                .into_iter()
                .map(|l| format!("lease {}", l.id))
                .collect::<std::collections::HashSet<String>>()
        });
        shared.pool.reap(&route.name, &route.pool, leases.as_ref());
    }
}

/// Turns away a connection when warden is close to its descriptor limit:
/// FATAL 53300 (too_many_connections), before reading its startup packet.
fn shed<S: std::os::fd::AsRawFd + ShedWrite>(
    route: &PgRoute,
    shared: &PgShared,
    stream: &S,
) -> bool {
    use std::sync::OnceLock;
    static REFUSAL: OnceLock<Vec<u8>> = OnceLock::new();
    let refusal = REFUSAL.get_or_init(|| {
        protocol::error_response(
            "FATAL",
            "53300",
            &warden_core::listen::overload_message(),
            None,
            None,
        )
    });
    let how = warden_core::listen::Shed {
        refusal: refusal.clone(),
        metrics: Some(shared.metrics.clone()),
    };
    let fd = stream.as_raw_fd();
    if !warden_core::listen::over_fd_budget_now(fd) {
        return false;
    }
    warden_core::listen::shed_if_overloaded(&route.name, fd, |b| stream.shed_write(b), &how)
}

/// One non-blocking write to a freshly accepted socket.
trait ShedWrite {
    fn shed_write(&self, b: &[u8]);
}

impl ShedWrite for tokio::net::TcpStream {
    fn shed_write(&self, b: &[u8]) {
        let _ = self.try_write(b);
    }
}

impl ShedWrite for tokio::net::UnixStream {
    fn shed_write(&self, b: &[u8]) {
        let _ = self.try_write(b);
    }
}

/// Accepts one TCP session (a failed accept waits a little).
async fn accept_tcp(tcp: &tokio::net::TcpListener, route: &Arc<PgRoute>, shared: &Arc<PgShared>) {
    match tcp.accept().await {
        Ok((stream, peer)) => {
            if shed(route, shared, &stream) {
                return;
            }
            // TCP_NODELAY comes from the listener (`warden_core::shard::reuseport_listeners`).
            let local = warden_core::listen::local_addr_of(&stream, route.listen);
            let (route, shared) = (route.clone(), shared.clone());
            // Boxed once here: the task then moves a pointer, not the
            // session's few KiB (on spawn, into the task cell, and again
            // when the finished stage overwrites it).
            tokio::spawn(Box::pin(session::run(
                stream,
                session::Peer::Tcp { local, peer },
                route,
                shared,
            )));
        }
        Err(e) => {
            tracing::warn!(route = %route.name, "accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The lease settings of every dynamic PostgreSQL route in `cfg`.
pub fn dynamic_specs(cfg: &Config) -> Result<Vec<dynamic::DynamicSpec>> {
    let routes = PgRoute::from_config(cfg)?;
    let mut out = Vec::new();
    for r in &routes {
        if let Some(c) = cfg.routes.iter().find(|c| c.name == r.name) {
            if let Some(spec) = r.dynamic_spec(c) {
                out.push(spec);
            }
        }
    }
    Ok(out)
}
