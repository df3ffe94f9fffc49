//! MySQL/MariaDB routes (`kind = "mysql"`): a client connects locally with
//! no password; warden attests it and checks the allow list (the admission
//! step in `warden_core::admission`) before reading a byte, connects to the
//! upstream and reads its greeting, then greets the client itself — the
//! server's version, connection id and capabilities (less compression and
//! TLS), and a fresh random scramble of its own. Whatever user and password
//! proof the client answers with are ignored and never forwarded: warden
//! logs in upstream as the route's user with the route's secret
//! ([`upstream`]), carrying over the client's capabilities, database,
//! character set and connection attributes, records the session start,
//! answers the client OK, and relays ([`relay`]). On a pooled route
//! ([`pool`]) a route whose server greeted warden before greets the client
//! with that greeting at once, and a matching idle connection (reset and
//! checked when its last client left) replaces the connect and login.
//!
//! A route with `kernel_relay = true` hands long sessions on plain TCP to
//! the eBPF kernel relay at a quiet moment ([`relay`], [`replies`]).
//!
//! Refusals are ERR packets written after the client's handshake response,
//! so every client shows code, SQLSTATE and text: see [`refusal_of`] (this
//! route kind's one denial-to-wire table) and [`upstream_refusal`].

pub mod auth;
pub mod dynamic;
pub mod kill;
pub mod packet;
pub mod pool;
pub mod relay;
pub mod replies;
pub mod rotate;
pub mod session_state;
pub mod upstream;

use packet::{
    caps, put_packet, read_packet, write_packet, ErrPacket, Greeting, HandshakeResponse,
    MAX_HANDSHAKE_PACKET,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden_core::admission::{
    Admission, Denial, LoginFailure, Peer, RoutePolicy, SecretRef, SessionEnd,
};
use warden_core::audit::Target;
use warden_core::config::{ClientTls, Config, PoolReset, PoolSettings, RouteKind, TlsMode};
use warden_core::credentials::{SecretValue, DEFAULT_CACHE_TTL};
use warden_core::error::{Error, Result};
use warden_core::kernel_relay::{BoxedClient, ClientTransport, Handover};
use warden_core::listen::FirstBytes;
use warden_core::metrics::{AttestVia, Metrics, RelayKind};
use warden_core::peer::Attested;
use warden_core::pgwire::upstream::UpstreamStream;

/// How long a client may take to answer warden's greeting (as PostgreSQL
/// routes wait for a startup packet): an admitted client's upstream
/// connection is already open meanwhile.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything one mysql route needs at run time.
pub struct MysqlRoute {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: upstream::Target,
    pub user: String,
    pub secret: String,
    pub env: String,
    pub cache_ttl: Duration,
    pub allow: Vec<String>,
    /// TLS to clients with a certificate from warden's CA: offered, or
    /// required.
    pub client_tls: ClientTls,
    /// Authenticated upstream connections kept between clients.
    pub pool: PoolSettings,
    /// `credential.dynamic`: sessions log in as their workload's lease user
    /// ([`dynamic`]); `user`/`secret` are the administrative login.
    pub dynamic: bool,
    /// `kernel_relay`: long sessions may be handed to the eBPF kernel
    /// relay (off unless set: see docs/mysql.md).
    pub kernel_relay: bool,
}

impl MysqlRoute {
    pub fn from_config(cfg: &Config) -> Result<Vec<MysqlRoute>> {
        let mut out = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.kind != RouteKind::Mysql {
                continue;
            }
            let cred = r.credential.as_ref().ok_or_else(|| {
                Error::usage(format!(
                    "route[{i}].credential: a mysql route needs credential = {{ user = \"app\", secret = \"NAME\" }}"
                ))
            })?;
            let (host, port) = r
                .upstream_host_port()
                .map_err(|e| Error::usage(format!("route[{i}].upstream: {e}")))?;
            let tls = warden_core::tls::client_config(
                r.upstream_tls.mode,
                r.upstream_tls.ca_file.as_deref(),
                &r.name,
            )?;
            let server_name = match tls {
                Some(_) => Some(warden_core::tls::server_name(
                    host.trim_start_matches('[').trim_end_matches(']'),
                )?),
                None => None,
            };
            let rotation = cfg
                .secrets
                .iter()
                .find(|s| s.name == cred.secret)
                .and_then(|s| s.rotation_period);
            let mut cache_ttl = cred.cache_ttl.unwrap_or(DEFAULT_CACHE_TTL);
            if let Some(rot) = rotation {
                cache_ttl = cache_ttl.min(rot);
            }
            let ca_label = match (&r.upstream_tls.mode, &r.upstream_tls.ca_file) {
                (TlsMode::Disable, _) => "none (TLS disabled)".to_string(),
                (_, Some(f)) => f.display().to_string(),
                (_, None) => "the system bundle".to_string(),
            };
            out.push(MysqlRoute {
                name: r.name.clone(),
                listen: r.listen,
                upstream: upstream::Target {
                    host,
                    port,
                    tls,
                    server_name,
                    ca_label,
                    connect_timeout: r.connect_timeout(),
                },
                user: cred.user.clone(),
                secret: cred.secret.clone(),
                env: cfg.environment.clone(),
                cache_ttl,
                allow: r.allow.clone(),
                client_tls: r.client_tls,
                pool: PoolSettings::from_config(r.pool.as_ref()),
                dynamic: cred.dynamic.is_some(),
                kernel_relay: r.kernel_relay_on(),
            });
        }
        Ok(out)
    }
}

/// State shared by every mysql route.
pub struct MysqlShared {
    /// attest → policy → credential → session records (every front end's).
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
    /// Client-side TLS per route (routes with `client_tls`).
    pub client_tls: HashMap<String, Arc<rustls::ServerConfig>>,
    /// Idle authenticated upstream connections, every route's.
    pub pool: pool::Pool,
    /// The last greeting of each route's server, for routes without a
    /// pool (a pooled route's pool keeps it).
    greetings: std::sync::Mutex<HashMap<String, Greeting>>,
    /// The lease manager of dynamic routes (shared with PostgreSQL's).
    pub leases: Option<Arc<warden_core::leases::LeaseManager>>,
    /// Pooled sessions' warden-issued connection ids ([`kill`]).
    pub kill_ids: kill::Registry,
    /// The eBPF kernel relay for long sessions (None: user space only).
    pub kernel_relay: Option<Arc<warden_ebpf::KernelRelay>>,
}

impl MysqlShared {
    pub fn new(
        admission: Arc<Admission>,
        metrics: Metrics,
        routes: &[Arc<MysqlRoute>],
        identity: Arc<warden_core::authority::IdentityHandle>,
    ) -> Result<MysqlShared> {
        let mut client_tls = HashMap::new();
        for r in routes.iter().filter(|r| r.kernel_relay) {
            metrics.kernel_relay_declare(RelayKind::Mysql, &r.name);
        }
        for r in routes.iter().filter(|r| r.client_tls.enabled()) {
            client_tls.insert(
                r.name.clone(),
                warden_core::listener_tls::server_config(&r.name, r.listen.ip(), identity.clone())?,
            );
        }
        Ok(MysqlShared {
            admission,
            pool: pool::Pool::new(metrics.clone()),
            metrics,
            client_tls,
            greetings: std::sync::Mutex::new(HashMap::new()),
            leases: None,
            kill_ids: kill::Registry::default(),
            kernel_relay: None,
        })
    }

    /// Sets the kernel relay long sessions are handed to.
    pub fn with_kernel_relay(
        mut self,
        relay: Option<Arc<warden_ebpf::KernelRelay>>,
    ) -> MysqlShared {
        self.kernel_relay = relay;
        self
    }

    /// Sets the lease manager dynamic routes take their users from.
    pub fn with_leases(mut self, leases: Arc<warden_core::leases::LeaseManager>) -> MysqlShared {
        self.leases = Some(leases);
        self
    }

    /// The last greeting of `route`'s server, if it greeted warden before.
    fn known_greeting(&self, route: &MysqlRoute) -> Option<Greeting> {
        if route.pool.enabled() {
            return self.pool.greeting(&route.name);
        }
        self.greetings.lock().ok()?.get(&route.name).cloned()
    }

    fn remember_greeting(&self, route: &MysqlRoute, g: &Greeting) {
        if route.pool.enabled() {
            self.pool.remember_greeting(&route.name, g);
        } else if let Ok(mut m) = self.greetings.lock() {
            m.insert(route.name.clone(), g.clone());
        }
    }
}

/// Binds every mysql route's listeners: `shards` sockets sharing its address
/// (`SO_REUSEPORT`), one per session shard.
pub async fn bind_routes(
    routes: Vec<MysqlRoute>,
    shards: usize,
) -> Result<Vec<(Arc<MysqlRoute>, Vec<std::net::TcpListener>)>> {
    let mut out = Vec::new();
    for r in routes {
        let tcp = warden_core::shard::reuseport_listeners(r.listen, shards)
            .map_err(|e| warden_core::listen::bind_error(&r.name, r.listen, &e))?;
        out.push((Arc::new(r), tcp));
    }
    Ok(out)
}

/// Accepts connections on shard `index`'s listener of a route until the
/// task is dropped (call inside that shard's runtime; see
/// [`warden_core::shard`]). Shard 0 also reaps the route's idle pooled
/// connections.
pub async fn serve_route(
    route: Arc<MysqlRoute>,
    index: usize,
    tcp: std::net::TcpListener,
    shared: Arc<MysqlShared>,
) {
    let tcp = match tokio::net::TcpListener::from_std(tcp) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(route = %route.name, "cannot serve a listener: {e}");
            return;
        }
    };
    let name = route.name.clone();
    // Idle connections past their timeout or lifetime are closed in time.
    let reaper = (index == 0 && route.pool.enabled()).then(|| {
        let (route, shared) = (route.clone(), shared.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                shared.pool.reap(&route.name, &route.pool);
            }
        })
    });
    let _reaper = reaper.map(AbortOnDrop);
    let shed = warden_core::listen::Shed {
        refusal: too_many_connections(&warden_core::listen::overload_message()),
        metrics: Some(shared.metrics.clone()),
    };
    warden_core::listen::accept_loop_shedding(
        &name,
        route.listen,
        &tcp,
        &shed,
        |stream, local, peer| {
            tokio::spawn(session(stream, local, peer, route.clone(), shared.clone()));
        },
    )
    .await;
}

/// Stops a background task when its owner ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a MySQL server sends a connection over `max_connections`: ERR 1040
/// as the first packet, in place of the greeting (so without the SQLSTATE
/// marker: no capabilities are agreed yet; clients show 1040 "Too many
/// connections").
pub fn too_many_connections(message: &str) -> Vec<u8> {
    let mut payload = vec![0xff];
    payload.extend_from_slice(&1040u16.to_le_bytes());
    payload.extend_from_slice(message.as_bytes());
    let mut out = Vec::with_capacity(payload.len() + 4);
    put_packet(&mut out, 0, &payload);
    out
}

/// The denial-to-wire table of mysql routes: policy refusals are 1045
/// access denied (SQLSTATE 28000); warden's own failures (sealed, no
/// credential, audit, internal) are 1105 (HY000). Messages name the route
/// and, when known, the workload.
pub fn refusal_of(d: &Denial, route: &str, workload: Option<&str>) -> ErrPacket {
    // No lease user: access denied, as the server says for a login it refuses.
    let (code, state) = if d.is_policy() || matches!(d, Denial::Frozen(_) | Denial::NoLease { .. })
    {
        (1045, "28000")
    } else {
        (1105, "HY000")
    };
    let mut message = d.to_string();
    let route_q = format!("{route:?}");
    if !message.contains(&route_q) {
        message.push_str(&format!(" (route {route_q})"));
    }
    if let Some(w) = workload {
        let w_q = format!("{w:?}");
        if !message.contains(&w_q) {
            message.push_str(&format!(" (workload {w_q})"));
        }
    }
    ErrPacket::new(code, state, message)
}

/// What the client is told when warden's own login upstream failed, and
/// the `result` label it counts under. Unreachable: 1429 (HY000, "unable to
/// connect to foreign data source": a server code, which clients show — the
/// client library's own 2003 in a server's ERR packet is reported by
/// libmariadb as a malformed packet) with MySQL's 2003 wording; the stored password
/// refused: 1045 naming the secret (never its value); a plugin warden does
/// not speak: 1251; a server that is not speaking the protocol: 1043; any
/// other server error (1040 too many connections, 1049 unknown database,
/// ...) is forwarded with its own code and SQLSTATE, prefixed so the
/// client knows warden logged in.
pub fn upstream_refusal(
    f: &upstream::Failure,
    route: &MysqlRoute,
    workload: &str,
    label: &str,
) -> (ErrPacket, &'static str) {
    use upstream::Failure as F;
    let (host, port) = (&route.upstream.host, route.upstream.port);
    match f {
        F::Unreachable(m) => (
            ErrPacket::new(
                1429,
                "HY000",
                format!(
                    "warden: upstream {host}:{port} unreachable for route {:?} (workload {workload:?}): {m}",
                    route.name
                ),
            ),
            "upstream_error",
        ),
        F::Rejected(e) => (
            ErrPacket::new(
                1045,
                "28000",
                format!(
                    "warden: upstream rejected the credential for route {:?} (user {:?}, secret {label}, workload {workload:?}): {}",
                    route.name, route.user, e.message
                ),
            ),
            "upstream_rejected",
        ),
        F::Unsupported(m) => (
            ErrPacket::new(
                1251,
                "08004",
                format!("warden: route {:?} (workload {workload:?}): {m}", route.name),
            ),
            "upstream_error",
        ),
        F::Protocol(m) => (
            ErrPacket::new(
                1043,
                "08S01",
                format!(
                    "warden: upstream {host}:{port} for route {:?} broke the protocol during login: {m}",
                    route.name
                ),
            ),
            "upstream_error",
        ),
        F::Server(e) => (
            ErrPacket {
                code: e.code,
                sqlstate: e.sqlstate,
                message: format!(
                    "warden: upstream {host}:{port} for route {:?}: {}",
                    route.name, e.message
                ),
            },
            "upstream_error",
        ),
    }
}

/// Writes an ERR packet with sequence id `seq`, closes the write side, and
/// reads away what the client sent meanwhile (so the close is not a reset
/// that could discard the error unread).
async fn refuse_client<S>(client: &mut S, seq: u8, e: &ErrPacket)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = write_packet(client, seq, &e.encode()).await;
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// A fresh scramble: 20 random bytes in 1..=127 (no NUL: clients read part
/// of it as a C string). warden never checks the proof a client computes
/// over it, so it protects nothing; it is random so that no client sees a
/// fixed one.
fn fresh_scramble() -> Vec<u8> {
    let mut s = [0u8; 20];
    if aws_lc_rs::rand::fill(&mut s).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        for (i, b) in s.iter_mut().enumerate() {
            *b = (t >> (i % 8 * 8)) as u8 ^ i as u8;
        }
    }
    s.iter().map(|b| (b & 0x7f).max(1)).collect()
}

/// warden's greeting: the server's, with warden's scramble and
/// `mysql_native_password` as the plugin, and the capabilities warden
/// relays (CLIENT_SSL only on `client_tls` routes). Without a server
/// (refusals) a neutral one.
fn client_greeting(server: Option<&Greeting>, offer_tls: bool) -> Greeting {
    let tls = if offer_tls { caps::SSL } else { 0 };
    let relayed = |c: u32| {
        (c & !caps::NOT_RELAYED)
            | caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | tls
    };
    match server {
        Some(g) => Greeting {
            server_version: g.server_version.clone(),
            connection_id: g.connection_id,
            scramble: fresh_scramble(),
            capabilities: relayed(g.capabilities),
            mariadb_caps: g.mariadb_caps & !caps::MARIADB_NOT_RELAYED,
            charset: g.charset,
            status: g.status,
            auth_plugin: auth::NATIVE.to_vec(),
        },
        None => Greeting {
            server_version: b"5.5.5-warden".to_vec(),
            connection_id: 0,
            scramble: fresh_scramble(),
            capabilities: relayed(
                caps::LONG_PASSWORD
                    | caps::CONNECT_WITH_DB
                    | caps::CONNECT_ATTRS
                    | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA,
            ),
            mariadb_caps: 0,
            charset: 0x21,
            status: 2,
            auth_plugin: auth::NATIVE.to_vec(),
        },
    }
}

/// The audit target of a session: the secret version, or on a dynamic
/// route the route alone (the detail names the lease user and lease; the
/// secret is the administrative login's, which the session does not use).
fn credential_target(route: &MysqlRoute, version: Option<u32>, detail: String) -> Target {
    if route.dynamic {
        return Target {
            route: Some(route.name.clone()),
            detail: Some(detail),
            ..Target::default()
        };
    }
    Target::secret_use(&route.name, &route.secret, &route.env, version, detail)
}

/// A client connection: plain TCP, or TLS (see
/// [`warden_core::kernel_relay::ClientIo`]).
type Client = BoxedClient;

/// What the client answered to warden's greeting: its handshake response
/// and the sequence id warden answers with; `Err(Some)`: what to answer
/// instead (then close); `Err(None)`: the client left or timed out.
type Hello = std::result::Result<(HandshakeResponse, u8), Option<(u8, ErrPacket)>>;

async fn read_hello_packet<S: tokio::io::AsyncRead + Unpin>(
    client: &mut S,
    seq_guess: u8,
) -> std::result::Result<packet::Packet, Option<(u8, ErrPacket)>> {
    match tokio::time::timeout(
        CLIENT_HANDSHAKE_TIMEOUT,
        read_packet(client, MAX_HANDSHAKE_PACKET),
    )
    .await
    {
        Err(_) => Err(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Err(Some((
            seq_guess,
            ErrPacket::new(1043, "08S01", format!("Bad handshake: {e}")),
        ))),
        Ok(Err(_)) => Err(None),
        Ok(Ok(p)) => Ok(p),
    }
}

fn parse_hello(p: &packet::Packet, route: &MysqlRoute, tls_offered: bool) -> Hello {
    let seq = p.seq.wrapping_add(1);
    match HandshakeResponse::parse(&p.payload) {
        Ok(Some(h)) => Ok((h, seq)),
        Ok(None) if tls_offered => Err(Some((
            seq,
            ErrPacket::new(1043, "08S01", "Bad handshake: a second SSLRequest"),
        ))),
        Ok(None) => Err(Some((
            seq,
            ErrPacket::new(
                1043,
                "08S01",
                format!(
                    "warden: route {:?} does not offer TLS to clients (client_tls = false; it listens on loopback and warden encrypts toward the server per upstream_tls); connect without TLS, e.g. mariadb --skip-ssl or ssl-mode=DISABLED",
                    route.name
                ),
            ),
        ))),
        Err(e) => Err(Some((
            seq,
            ErrPacket::new(1043, "08S01", format!("Bad handshake: {e}")),
        ))),
    }
}

/// Reads the client's answer to warden's greeting; an SSLRequest on a route
/// with `client_tls` upgrades the connection first. None: the connection is
/// gone (a failed TLS handshake).
/// After warden's greeting: near the descriptor limit, waits for the
/// client's handshake response (see [`warden_core::listen::first_bytes`]).
/// An evicted client is answered and counted here.
async fn wait_for_hello(tcp: &TcpStream, route: &MysqlRoute, metrics: &Metrics) -> FirstBytes {
    let waited = warden_core::listen::first_bytes(tcp, Some(CLIENT_HANDSHAKE_TIMEOUT)).await;
    if waited == FirstBytes::Evicted {
        // Descriptors ran short and this client had not answered the
        // greeting for the longest: it makes room for a new one, told with
        // MySQL's code for too many connections (sequence 2, where the
        // answer to its handshake response would come).
        warden_core::listen::note_evicted(&route.name, metrics);
        let e = ErrPacket::new(
            1040,
            "08004",
            warden_core::listen::evicted_message("handshake response"),
        );
        let mut out = Vec::new();
        put_packet(&mut out, 2, &e.encode());
        let _ = tcp.try_write(&out);
    }
    waited
}

async fn client_hello(
    mut tcp: TcpStream,
    route: &MysqlRoute,
    tls: Option<&Arc<rustls::ServerConfig>>,
    metrics: &Metrics,
) -> Option<(Client, Hello)> {
    match wait_for_hello(&tcp, route, metrics).await {
        FirstBytes::Ready => {}
        FirstBytes::Silent => return Some((Box::new(tcp), Err(None))),
        FirstBytes::Evicted => return None,
    }
    let p = match read_hello_packet(&mut tcp, 2).await {
        Ok(p) => p,
        Err(e) => return Some((Box::new(tcp), Err(e))),
    };
    let Some(config) = tls else {
        let hello = parse_hello(&p, route, false);
        return Some((Box::new(tcp), hello));
    };
    if !matches!(HandshakeResponse::parse(&p.payload), Ok(None)) {
        if route.client_tls == ClientTls::Require {
            // MySQL's own code for require_secure_transport.
            metrics.session_unattested(&route.name, "tls_required");
            let e = ErrPacket::new(
                3159,
                "HY000",
                format!(
                    "warden: route {:?} requires TLS (client_tls = \"require\"); connect with TLS, e.g. mariadb --ssl or ssl-mode=REQUIRED",
                    route.name
                ),
            );
            return Some((Box::new(tcp), Err(Some((p.seq.wrapping_add(1), e)))));
        }
        // TLS offered, not taken: plain TCP on loopback is still served.
        let hello = parse_hello(&p, route, false);
        return Some((Box::new(tcp), hello));
    }
    let accept = tokio_rustls::TlsAcceptor::from(config.clone()).accept(tcp);
    let mut s = match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(route = %route.name, "client TLS handshake failed: {e}");
            metrics.session_unattested(&route.name, "tls_error");
            return None;
        }
        Err(_) => return None,
    };
    let hello = match read_hello_packet(&mut s, 3).await {
        Ok(p) => parse_hello(&p, route, true),
        Err(e) => Err(e),
    };
    Some((Box::new(s), hello))
}

async fn session(
    tcp: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    route: Arc<MysqlRoute>,
    shared: Arc<MysqlShared>,
) {
    let started = Instant::now();
    let mut tcp = tcp;
    let offer = shared.client_tls.get(&route.name);
    // Near the descriptor limit, a route whose server greeted warden before
    // greets the client with that greeting at once and does nothing more
    // (no attestation, no upstream connection) until the client answers:
    // a client that never does holds one descriptor, and may be closed to
    // make room for a new one.
    let early = warden_core::listen::descriptors_scarce(tcp.as_raw_fd())
        .then(|| shared.known_greeting(&route))
        .flatten();
    if let Some(g) = &early {
        let mut greeting = client_greeting(Some(g), offer.is_some());
        // Which server connection serves the client is known only after
        // its answer: no connection id a driver could later KILL by.
        greeting.connection_id = 0;
        if write_packet(&mut tcp, 0, &greeting.encode()).await.is_err() {
            return;
        }
        match wait_for_hello(&tcp, &route, &shared.metrics).await {
            FirstBytes::Ready => {}
            FirstBytes::Silent | FirstBytes::Evicted => return,
        }
    }
    let admission = &shared.admission;
    let policy = RoutePolicy {
        name: &route.name,
        allow: &route.allow,
    };
    let secret = SecretRef {
        name: &route.secret,
        env: &route.env,
        ttl: route.cache_ttl,
    };
    let (attestation, admitted) = admission
        .admit_with_secret(
            Peer::Tcp { local, peer },
            AttestVia::Mysql,
            &policy,
            &secret,
        )
        .await;
    // A dynamic route logs in as the workload's lease user.
    let admitted = match admitted {
        Ok((who, secret)) if route.dynamic => {
            warden_core::leases::lease_for_session(shared.leases.as_ref(), &route.name, &who)
                .await
                .map(|l| (who, secret, Some(l)))
        }
        a => a.map(|(who, secret)| (who, secret, None)),
    };
    let (who, secret, leased) = match admitted {
        Ok(a) => a,
        Err(d) => {
            // Refused before any byte was read; the client still gets a
            // greeting, so that the ERR comes where every client reads it.
            let workload = attestation.as_ref().ok().map(|w| w.workload.as_str());
            let e = refusal_of(&d, &route.name, workload);
            admission
                .refuse(&route.name, &attestation, &d, "mysql".into())
                .await;
            if early.is_none() {
                let greeting = client_greeting(None, offer.is_some());
                let _ = write_packet(&mut tcp, 0, &greeting.encode()).await;
            }
            if let Some((mut client, Ok((_, seq)) | Err(Some((seq, _))))) =
                client_hello(tcp, &route, offer, &shared.metrics).await
            {
                refuse_client(&mut client, seq, &e).await;
            }
            return;
        }
    };
    let (secret, label, user) = match &leased {
        Some(l) => (
            SecretValue {
                value: l.password.clone(),
                ..secret
            },
            l.label(&who.workload),
            l.user.as_str(),
        ),
        None => {
            let label = format!("{} v{}", route.secret, secret.version);
            (secret, label, route.user.as_str())
        }
    };
    let pooling = route.pool.enabled();
    // A route whose server greeted warden before greets the client with
    // that greeting and reaches the server only on a pool miss (or once
    // the client answered, when greeted early).
    let greeted_early = early.is_some();
    let known = match early {
        Some(g) => Some(g),
        None => pooling.then(|| shared.known_greeting(&route)).flatten(),
    };
    let mut greeted = match known {
        Some(_) => None,
        None => Some(upstream::connect(&route.upstream).await),
    };
    if let Some(Ok(g)) = &greeted {
        shared.remember_greeting(&route, &g.greeting);
    }
    let server_greeting = known.as_ref().or_else(|| {
        greeted
            .as_ref()
            .and_then(|g| g.as_ref().ok())
            .map(|g| &g.greeting)
    });
    // Which server connection serves a pooled route's client is known only
    // after its answer, and it serves others later: the greeting names a
    // warden id, which `KILL` is translated from ([`kill`]). A client
    // greeted early (near the descriptor limit, before attestation) got id
    // 0, which names no connection.
    let kill_id =
        (pooling && !greeted_early).then(|| shared.kill_ids.register(&route.name, &who.workload));
    if !greeted_early {
        let mut greeting = client_greeting(server_greeting, offer.is_some());
        if let Some(k) = &kill_id {
            greeting.connection_id = k.id();
        }
        if write_packet(&mut tcp, 0, &greeting.encode()).await.is_err() {
            return;
        }
    }
    let Some((mut client, hello)) = client_hello(tcp, &route, offer, &shared.metrics).await else {
        return;
    };
    let (hello, seq) = match hello {
        Ok(r) => r,
        Err(answer) => {
            if let Some((seq, e)) = answer {
                tracing::info!(route = %route.name, workload = %who.workload, "bad client handshake: {}", e.message);
                refuse_client(&mut client, seq, &e).await;
            }
            return;
        }
    };
    let key = pool::Key {
        label: label.clone(),
        database: hello.database.clone(),
        charset: hello.charset,
        capabilities: hello.capabilities,
        mariadb_caps: hello.mariadb_caps,
    };
    let pooled = if pooling {
        shared.pool.take(&route.name, &route.pool, &key)
    } else {
        None
    };
    let upstream = match pooled {
        Some(conn) => Upstream {
            stream: conn.stream,
            born: conn.born,
            baseline: Some(conn.baseline),
            capabilities: conn.capabilities,
            plugin: conn.plugin,
            tls: conn.tls,
            ok: packet::ok_packet(SERVER_STATUS_AUTOCOMMIT),
            reused: true,
            server_id: conn.server_id,
        },
        None => {
            let greeted = match greeted.take() {
                Some(g) => g,
                None => {
                    let g = upstream::connect(&route.upstream).await;
                    if let Ok(g) = &g {
                        shared.remember_greeting(&route, &g.greeting);
                    }
                    g
                }
            };
            let logged_in = match greeted {
                Err(f) => Err(f),
                Ok(g) => {
                    let params = upstream::ClientParams {
                        capabilities: hello.capabilities,
                        mariadb_caps: hello.mariadb_caps,
                        max_packet: hello.max_packet,
                        charset: hello.charset,
                        database: hello.database.as_deref(),
                        attrs: hello.attrs.as_deref(),
                    };
                    upstream::login(&route.upstream, g, &params, user, &secret.value).await
                }
            };
            let mut u = match logged_in {
                Ok(u) => u,
                Err(f) => {
                    let (e, result) = upstream_refusal(&f, &route, &who.workload, &label);
                    let failure = LoginFailure {
                        route: &route.name,
                        result,
                        target: credential_target(&route, Some(secret.version), "mysql".into()),
                        secret: &secret.value,
                    };
                    let e = admission
                        .login_failed(&who, failure, e, |e| &mut e.message)
                        .await;
                    refuse_client(&mut client, seq, &e).await;
                    return;
                }
            };
            shared
                .metrics
                .upstream_latency(&route.name, u.connect_time, u.auth_time);
            // What a reset must restore before the connection serves
            // another client.
            let baseline = if pooling {
                match pool::baseline(&mut u.stream, u.capabilities).await {
                    Ok(b) => Some(b),
                    Err(pool::BaselineError::Refused(why)) => {
                        tracing::warn!(route = %route.name, "upstream connection will not be pooled: {why}");
                        None
                    }
                    Err(pool::BaselineError::Broken(why)) => {
                        let e = ErrPacket::new(
                            2013,
                            "HY000",
                            format!(
                                "warden: route {:?}: lost the upstream connection after login ({why})",
                                route.name
                            ),
                        );
                        tracing::warn!(route = %route.name, "session failed: {}", e.message);
                        shared
                            .metrics
                            .session(&route.name, &who.workload, "upstream_error");
                        refuse_client(&mut client, seq, &e).await;
                        return;
                    }
                }
            } else {
                None
            };
            Upstream {
                stream: u.stream,
                born: Instant::now(),
                baseline,
                capabilities: u.capabilities,
                plugin: u.plugin,
                tls: u.tls,
                ok: u.ok,
                reused: false,
                server_id: u.connection_id,
            }
        }
    };
    let detail = format!(
        "mysql to {}:{} as {:?} ({}{}{})",
        route.upstream.host,
        route.upstream.port,
        user,
        upstream.plugin,
        if upstream.tls { ", TLS" } else { "" },
        if upstream.reused {
            ", pooled upstream connection"
        } else {
            ""
        }
    );
    let detail = match &leased {
        Some(l) => format!("{detail}, lease {}", l.id),
        None => detail,
    };
    let started_ok = admission
        .record_start(
            &who,
            &route.name,
            &route.secret,
            credential_target(&route, Some(secret.version), detail.clone()),
            "credential injected (MySQL login)",
            true,
        )
        .await;
    if let Err(d) = started_ok {
        let e = refusal_of(&d, &route.name, Some(&who.workload));
        tracing::warn!(route = %route.name, "session refused: {d}");
        shared
            .metrics
            .session(&route.name, &who.workload, d.result());
        refuse_client(&mut client, seq, &e).await;
        if upstream.baseline.is_some() {
            pool::close(upstream.stream);
        }
        return;
    }
    // The client's own password proof is ignored. A client that answered
    // for another plugin than warden's greeting named is switched to it
    // first (every client follows an auth switch), then told OK.
    let mut seq = seq;
    let plugin_differs = hello.capabilities & caps::PLUGIN_AUTH != 0
        && hello
            .auth_plugin
            .as_deref()
            .is_some_and(|p| p != auth::NATIVE);
    if plugin_differs {
        let scramble = fresh_scramble();
        let ok = async {
            write_packet(
                &mut client,
                seq,
                &packet::auth_switch(auth::NATIVE, &scramble),
            )
            .await?;
            let p = read_packet(&mut client, MAX_HANDSHAKE_PACKET).await?;
            std::io::Result::Ok(p.seq.wrapping_add(1))
        };
        match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, ok).await {
            Ok(Ok(next)) => seq = next,
            _ => {
                end_session(
                    &shared,
                    &route,
                    &who,
                    &secret,
                    &detail,
                    started,
                    &relay::Outcome {
                        how: "client left during login",
                        ..Default::default()
                    },
                )
                .await;
                return;
            }
        }
    }
    let mut ok = Vec::with_capacity(upstream.ok.len() + 4);
    put_packet(&mut ok, seq, &upstream.ok);
    if client.write_all(&ok).await.is_err() {
        end_session(
            &shared,
            &route,
            &who,
            &secret,
            &detail,
            started,
            &relay::Outcome {
                how: "client left during login",
                ..Default::default()
            },
        )
        .await;
        return;
    }
    // How the session's replies are framed (the kernel-relay hand-over and
    // the state tracking walk them).
    let framing = relay::Framing {
        deprecate_eof: upstream.capabilities & caps::DEPRECATE_EOF != 0,
        progress: hello.mariadb_caps & caps::MARIADB_PROGRESS != 0,
    };
    drop(hello);
    if let Some(k) = &kill_id {
        k.set_server(upstream.server_id);
    }
    let ctx = relay::Context {
        route: &route.name,
        workload: &who.workload,
        user,
        pool: upstream.baseline.is_some(),
        kill: kill_id.as_ref().map(|_| kill::Scope {
            registry: &shared.kill_ids,
            route: &route.name,
            workload: &who.workload,
        }),
        // No reset after a session that left no state (`pool.reset =
        // "auto"`, the default).
        track_state: upstream
            .baseline
            .as_ref()
            .filter(|b| b.autocommit && route.pool.reset == PoolReset::Auto)
            .map(|_| framing),
    };
    // A freeze of the workload ends the session at once.
    let stop = frozen_watch(&shared, &who.workload);
    let kernel = kernel_eligible(&shared, &route, &client, &upstream);
    let mut handover = Handover::guarded(RelayKind::Mysql, warden_ebpf::GUARD_MYSQL);
    let (mut outcome, rest) = match &kernel {
        Some(k) => {
            let mut offer = |c: &Client, u: &UpstreamStream, held: usize| {
                handover.offer(k, c.plain_tcp(), u, held, &route.name, &shared.metrics)
            };
            let h = relay::Handover {
                hook: &mut offer,
                framing,
            };
            relay::relay_with(client, upstream.stream, &ctx, stop, Some(h)).await
        }
        None => relay::relay_with(client, upstream.stream, &ctx, stop, None).await,
    };
    let mut frozen = outcome.how == relay::FROZEN;
    let back = match rest {
        relay::Rest::Spliced(client, stream) => {
            // The upstream connection is closed at the end, never pooled:
            // warden no longer knows where its protocol stands.
            let freezer = shared.admission.freezer();
            let mut changes = freezer.subscribe();
            let watch = freezer.until_frozen(&who.workload, &mut changes);
            // Built only now: most sessions are never spliced.
            let guard = relay::SplicedCommands::new(&route.name, &who.workload, user);
            let done = warden_core::kernel_relay::finish(
                client,
                stream,
                handover,
                watch,
                |f| {
                    let mut out = Vec::new();
                    put_packet(&mut out, 1, &frozen_error(f).encode());
                    out
                },
                Some(Box::new(guard)),
            )
            .await;
            outcome.up += done.up;
            outcome.down += done.down;
            outcome.change_user_refused += done.refused;
            outcome.how = match &done.frozen {
                Some(_) => "closed: workload frozen (kernel relay)",
                None if done.error => "connection error (kernel relay)",
                None => "closed (kernel relay)",
            };
            frozen = done.frozen.is_some();
            None
        }
        relay::Rest::Pool(stream, resync) => Some((stream, resync)),
        relay::Rest::Closed => None,
    };
    if frozen {
        shared.metrics.session(&route.name, &who.workload, "frozen");
        tracing::warn!(route = %route.name, workload = %who.workload, "open session ended: the workload is frozen");
    }
    end_session(&shared, &route, &who, &secret, &detail, started, &outcome).await;
    // A revoked lease's connection serves no one.
    let back = match back {
        Some((stream, _)) if leased.as_ref().is_some_and(|l| !l.held()) => {
            pool::close(stream);
            None
        }
        b => b,
    };
    if let (Some((stream, resync)), Some(baseline)) = (back, upstream.baseline) {
        let conn = pool::Conn {
            stream,
            born: upstream.born,
            baseline,
            capabilities: upstream.capabilities,
            plugin: upstream.plugin,
            tls: upstream.tls,
            server_id: upstream.server_id,
        };
        shared
            .pool
            .give_back(
                &route.name,
                &route.pool,
                key,
                conn,
                resync,
                outcome.state_free,
            )
            .await;
    }
}

/// Completes when `workload` is (or becomes) frozen, with the ERR an open
/// session ends with: 1927 (70100), MariaDB's "connection was killed",
/// naming the freeze.
async fn frozen_watch(shared: &MysqlShared, workload: &str) -> ErrPacket {
    let freezer = shared.admission.freezer();
    let mut changes = freezer.subscribe();
    frozen_error(&freezer.until_frozen(workload, &mut changes).await)
}

/// The ERR a frozen workload's open session ends with.
pub fn frozen_error(f: &warden_core::freeze::FreezeEntry) -> ErrPacket {
    ErrPacket::new(
        1927,
        "70100",
        format!(
            "Connection was killed: {}",
            warden_core::freeze::frozen_message(f).trim_start_matches("warden: ")
        ),
    )
}

/// Whether this session may be handed to the kernel relay (see
/// `docs/mysql.md`): the relay is loaded and on for the route, client and
/// upstream are plain TCP (the upstream's far end must be on this host too,
/// which the splice itself checks), and the session's result sets have a
/// shape [`replies`] walks (no MySQL 8 optional result-set metadata). What
/// the session sends can still rule it out ([`relay`]).
fn kernel_eligible(
    shared: &MysqlShared,
    route: &MysqlRoute,
    client: &Client,
    upstream: &Upstream,
) -> Option<Arc<warden_ebpf::KernelRelay>> {
    shared
        .kernel_relay
        .as_ref()
        .filter(|_| route.kernel_relay)
        .filter(|_| client.plain_tcp().is_some())
        .filter(|_| matches!(upstream.stream, UpstreamStream::Plain(_)))
        .filter(|_| upstream.capabilities & caps::OPTIONAL_RESULTSET_METADATA == 0)
        .cloned()
}

/// `SERVER_STATUS_AUTOCOMMIT`: the status of a freshly reset session.
const SERVER_STATUS_AUTOCOMMIT: u16 = 0x0002;

/// The upstream side of a session: a fresh login or a pooled connection.
struct Upstream {
    stream: warden_core::pgwire::upstream::UpstreamStream,
    born: Instant,
    /// Set when the connection may go back to the pool.
    baseline: Option<pool::Baseline>,
    capabilities: u32,
    plugin: String,
    tls: bool,
    /// The OK payload the client gets.
    ok: Vec<u8>,
    reused: bool,
    /// The server's id of the connection.
    server_id: u32,
}

async fn end_session(
    shared: &MysqlShared,
    route: &MysqlRoute,
    who: &Attested,
    secret: &SecretValue,
    detail: &str,
    started: Instant,
    o: &relay::Outcome,
) {
    let note = if o.change_user_refused > 0 {
        format!(", {} COM_CHANGE_USER refused", o.change_user_refused)
    } else {
        String::new()
    };
    let end = SessionEnd {
        route: &route.name,
        target: credential_target(route, Some(secret.version), detail.to_string()),
        started,
        up: o.up,
        down: o.down,
        note,
        how: o.how,
    };
    shared.admission.record_session_end(who, end).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn policy_refusals_are_access_denied_and_name_route_and_workload() {
        let d = Denial::NotAllowed {
            route: "orders".into(),
            workload: "web".into(),
            process: "pid 1 (/bin/x)".into(),
        };
        let e = refusal_of(&d, "orders", Some("web"));
        assert_eq!((e.code, e.sqlstate_str().as_str()), (1045, "28000"));
        assert!(e.message.contains("\"orders\"") && e.message.contains("\"web\""));
        let d = Denial::Sealed {
            route: "orders".into(),
            reason: "sealed".into(),
        };
        assert_eq!(refusal_of(&d, "orders", None).code, 1105);
    }

    #[test]
    fn greetings_offer_no_tls_nor_compression_and_a_fresh_scramble() {
        let a = client_greeting(None, false);
        let b = client_greeting(None, false);
        assert_ne!(a.scramble, b.scramble);
        assert_eq!(a.scramble.len(), 20);
        assert!(a.scramble.iter().all(|&x| (1..=127).contains(&x)));
        assert_eq!(a.capabilities & (caps::SSL | caps::COMPRESS), 0);
        let server = Greeting {
            capabilities: u32::MAX,
            ..a.clone()
        };
        let g = client_greeting(Some(&server), false);
        assert_eq!(g.capabilities & caps::NOT_RELAYED, 0);
        let g = client_greeting(Some(&server), true);
        assert_eq!(g.capabilities & caps::NOT_RELAYED, caps::SSL);
        assert_eq!(g.auth_plugin, auth::NATIVE);
        assert!(Greeting::parse(&g.encode()).is_ok());
    }

    #[test]
    fn shedding_answers_1040_in_place_of_the_greeting() {
        let b = too_many_connections("warden: too many connections");
        assert_eq!(&b[3..7], &[0, 0xff, 0x10, 0x04]);
        assert_eq!(
            u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize,
            b.len() - 4
        );
        assert!(b.ends_with(b"too many connections"));
    }
}
