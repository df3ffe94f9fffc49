//! Redis routes (`kind = "redis"`): a client connects locally with no
//! password; warden attests it, checks the allow list (the admission step
//! in `warden_core::admission`), connects to the upstream (TCP, or TLS in
//! the PostgreSQL routes' modes), logs in with the route's secret (`AUTH
//! [user] password`), records the session start, then relays RESP2/RESP3
//! both ways ([`relay`]), enforcing `deny_commands` / `allow_commands` on
//! every parsed command. A client's own `AUTH` is answered `+OK` here and
//! `HELLO … AUTH …` carries warden's login instead of the client's: the
//! client's words never reach the server.
//!
//! Refusals are RESP errors naming the workload and route — `-NOPERM` for
//! policy (unattested, not allowed, frozen, a refused command), `-WRONGPASS`
//! when the upstream rejects the stored password (naming the secret, never
//! its value), `-ERR` otherwise (upstream unreachable, sealed, no
//! credential) — then the connection closes. This is the route kind's one
//! denial-to-wire table: [`refusal_of`].
//!
//! With `client_tls` the listener speaks TLS with a certificate from
//! warden's CA. Redis has no in-band upgrade, so warden looks at the
//! client's first byte: a TLS handshake record is answered with TLS, as
//! redis-server's `tls-port` does; anything else is plain RESP, served on
//! `client_tls = true` and refused on `client_tls = "require"` (`client_stream`).
//!
//! On a pooled route (`pool`, on by default) a client that leaves at a
//! command boundary hands its upstream connection back to [`pool`], which
//! resets it (`RESET` + `AUTH`) for the next admitted client.
//!
//! On a dynamic route (`credential.dynamic`) a session logs in as its
//! workload's lease user, an ACL user warden created ([`dynamic`]); the
//! route's `user`/`secret` are then only the administrative login.
//!
//! With `kernel_relay` on (the default; the kernel hands a spliced
//! client's `AUTH`, `HELLO`, `RESET` and the commands its route's list
//! leaves to warden back to [`spliced`]) a long session that qualifies
//! (`kernel_eligible`) is handed to the eBPF kernel relay after
//! [`relay::HANDOVER_AFTER`] answered commands, at a quiet moment (see
//! [`relay`]); `warden_core::kernel_relay` watches it from then on. A
//! freeze of the workload ends any open session.

pub mod dynamic;
pub mod pool;
pub mod relay;
pub mod resp;
pub mod rotate;
pub mod spliced;

use relay::{CommandPolicy, Context};
use resp::{encode_command, error_reply, ReplyScanner};
use rustls::ClientConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden_core::admission::{
    Admission, Denial, LoginFailure, Peer, RoutePolicy, SecretRef, SessionEnd,
};
use warden_core::audit::Target;
use warden_core::config::{ClientTls, Config, PoolSettings, RouteKind, TlsMode};
use warden_core::credentials::{SecretValue, DEFAULT_CACHE_TTL};
use warden_core::error::{Error, Result};
use warden_core::kernel_relay::{BoxedClient, ClientTransport, Handover};
use warden_core::metrics::{AttestVia, Metrics, RelayKind};
use warden_core::peer::Attested;
use warden_core::pgwire::upstream::UpstreamStream;
use zeroize::Zeroizing;

/// Everything one redis route needs at run time.
pub struct RedisRoute {
    pub name: String,
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
    /// None: plain TCP (`upstream_tls.mode = "disable"`).
    pub tls: Option<Arc<ClientConfig>>,
    pub ca_label: String,
    /// ACL user; empty for `AUTH password`.
    pub user: String,
    pub secret: String,
    pub env: String,
    pub cache_ttl: Duration,
    pub allow: Vec<String>,
    pub commands: CommandPolicy,
    pub connect_timeout: Duration,
    /// TLS toward clients (`client_tls`).
    pub client_tls: ClientTls,
    /// Idle authenticated upstream connections kept (`pool`).
    pub pool: PoolSettings,
    /// `credential.dynamic`: sessions log in as their workload's lease user
    /// ([`dynamic`]); `user`/`secret` are the administrative login.
    pub dynamic: bool,
    /// Hand long sessions to the eBPF kernel relay (`kernel_relay`).
    pub kernel_relay: bool,
}

/// Longest a client's TLS handshake may take once its first byte came.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl RedisRoute {
    pub fn from_config(cfg: &Config) -> Result<Vec<RedisRoute>> {
        let mut out = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.kind != RouteKind::Redis {
                continue;
            }
            let cred = r.credential.as_ref().ok_or_else(|| {
                Error::usage(format!(
                    "route[{i}].credential: a redis route needs credential = {{ secret = \"NAME\" }}"
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
            if tls.is_some() {
                warden_core::tls::server_name(&host)?;
            }
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
            out.push(RedisRoute {
                name: r.name.clone(),
                listen: r.listen,
                host,
                port,
                tls,
                ca_label,
                user: cred.user.clone(),
                secret: cred.secret.clone(),
                env: cfg.environment.clone(),
                cache_ttl,
                allow: r.allow.clone(),
                commands: CommandPolicy::new(
                    r.deny_commands.as_deref(),
                    r.allow_commands.as_deref(),
                ),
                connect_timeout: r.connect_timeout(),
                client_tls: r.client_tls,
                pool: PoolSettings::from_config(r.pool.as_ref()),
                dynamic: cred.dynamic.is_some(),
                kernel_relay: r.kernel_relay_on(),
            });
        }
        Ok(out)
    }
}

/// State shared by every redis route.
pub struct RedisShared {
    /// attest → policy → credential → session records (every front end's).
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
    /// Client-side TLS per route (routes with `client_tls`).
    pub client_tls: HashMap<String, Arc<rustls::ServerConfig>>,
    /// Idle authenticated upstream connections, every route's.
    pub pool: pool::Pool,
    /// The lease manager of dynamic routes (shared with the other kinds').
    pub leases: Option<Arc<warden_core::leases::LeaseManager>>,
    /// The eBPF kernel relay for long sessions (None: user space only).
    pub kernel_relay: Option<Arc<warden_ebpf::KernelRelay>>,
    /// Routes' command lists as registered with the kernel relay (a route
    /// with a list that is not here is never spliced).
    pub command_lists: HashMap<String, warden_ebpf::CommandList>,
}

impl RedisShared {
    pub fn new(
        admission: Arc<Admission>,
        metrics: Metrics,
        routes: &[Arc<RedisRoute>],
        identity: Arc<warden_core::authority::IdentityHandle>,
    ) -> Result<RedisShared> {
        let mut client_tls = HashMap::new();
        for r in routes.iter().filter(|r| r.kernel_relay) {
            metrics.kernel_relay_declare(RelayKind::Redis, &r.name);
        }
        for r in routes.iter().filter(|r| r.client_tls.enabled()) {
            client_tls.insert(
                r.name.clone(),
                warden_core::listener_tls::server_config(&r.name, r.listen.ip(), identity.clone())?,
            );
        }
        Ok(RedisShared {
            admission,
            pool: pool::Pool::new(metrics.clone()),
            metrics,
            client_tls,
            leases: None,
            kernel_relay: None,
            command_lists: HashMap::new(),
        })
    }

    /// Sets the kernel relay long sessions are handed to, and registers
    /// the command lists of `routes` with it (one id per route: the kernel
    /// hands a spliced client's commands back to user space before the
    /// ones a list leaves to its relay, see `spliced::command_list_names`).
    /// A list the kernel cannot take keeps its route in user space.
    pub fn with_kernel_relay(
        mut self,
        relay: Option<Arc<warden_ebpf::KernelRelay>>,
        routes: &[Arc<RedisRoute>],
    ) -> RedisShared {
        if let Some(k) = &relay {
            let listed = routes
                .iter()
                .filter(|r| r.kernel_relay)
                .filter_map(|r| Some((r, spliced::command_list_names(&r.commands)?)));
            for (i, (route, names)) in listed.enumerate() {
                let list = warden_ebpf::CommandList {
                    id: u16::try_from(i + 1).unwrap_or(0),
                    allow: route.commands.allow.is_some(),
                };
                match k.set_command_list(list.id, &names) {
                    Ok(()) => {
                        self.command_lists.insert(route.name.clone(), list);
                    }
                    Err(e) => tracing::warn!(
                        route = %route.name,
                        "its command list stays in user space (sessions are not handed to the kernel relay): {e}"
                    ),
                }
            }
        }
        self.kernel_relay = relay;
        self
    }

    /// Sets the lease manager dynamic routes take their users from.
    pub fn with_leases(mut self, leases: Arc<warden_core::leases::LeaseManager>) -> RedisShared {
        self.leases = Some(leases);
        self
    }
}

/// Binds every redis route's listeners: `shards` sockets sharing its address
/// (`SO_REUSEPORT`), one per session shard.
pub async fn bind_routes(
    routes: Vec<RedisRoute>,
    shards: usize,
) -> Result<Vec<(Arc<RedisRoute>, Vec<std::net::TcpListener>)>> {
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
    route: Arc<RedisRoute>,
    index: usize,
    tcp: std::net::TcpListener,
    shared: Arc<RedisShared>,
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
    // Redis's own wording for the limit, so clients and tools recognise it.
    let shed = warden_core::listen::Shed {
        refusal: format!(
            "-ERR max number of clients reached ({})\r\n",
            warden_core::listen::overload_message()
        )
        .into_bytes(),
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

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client connection: plain TCP, or TLS (see
/// [`warden_core::kernel_relay::ClientIo`]).
type Client = BoxedClient;

/// The first byte of a TLS handshake record (a ClientHello). RESP starts
/// with `*` or, inline, with text: never with this control byte.
const TLS_HANDSHAKE: u8 = 0x16;

/// The client's stream, decided by its first byte: on a `client_tls` route
/// a TLS handshake is accepted with warden's certificate, and plain RESP
/// is served (`client_tls = true`) or refused with an error in plain RESP
/// (`"require"`); on a route without it a TLS handshake is refused (closed:
/// the client could not read a plain-text error). None: the connection is
/// gone (closed, a failed or timed-out handshake, a refused client);
/// refusals are logged and counted.
async fn client_stream(
    tcp: TcpStream,
    route: &RedisRoute,
    tls: Option<&Arc<rustls::ServerConfig>>,
    metrics: &Metrics,
) -> Option<Client> {
    // No time limit before the first byte: a plain-text client may open
    // its connection long before its first command (connection pools do),
    // as it may on a route without TLS. The handshake itself is timed.
    let mut first = [0u8; 1];
    if !matches!(tcp.peek(&mut first).await, Ok(1)) {
        // Closed or failed before its first byte: nothing to serve.
        return None;
    }
    let Some(config) = tls else {
        if first[0] == TLS_HANDSHAKE {
            // A TLS client would wait for a ServerHello that never comes.
            tracing::info!(route = %route.name, "TLS client refused: the route does not offer TLS (client_tls = false)");
            metrics.session_unattested(&route.name, "tls_not_offered");
            return None;
        }
        return Some(Box::new(tcp));
    };
    if first[0] != TLS_HANDSHAKE {
        if route.client_tls == ClientTls::Require {
            tracing::info!(route = %route.name, "plain-text client refused: the route requires TLS");
            metrics.session_unattested(&route.name, "tls_required");
            let r = Refusal {
                code: "ERR",
                message: format!(
                    "warden: route {:?} requires TLS (client_tls = \"require\"); connect with TLS, e.g. redis-cli --tls --cacert <warden's CA certificate>",
                    route.name
                ),
            };
            refuse_client(Box::new(tcp), &r).await;
            return None;
        }
        // TLS offered, not taken: plain TCP on loopback is still served.
        return Some(Box::new(tcp));
    }
    let accept = tokio_rustls::TlsAcceptor::from(config.clone()).accept(tcp);
    match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(s)) => Some(Box::new(s)),
        Ok(Err(e)) => {
            tracing::info!(route = %route.name, "client TLS handshake failed: {e}");
            metrics.session_unattested(&route.name, "tls_error");
            None
        }
        Err(_) => {
            tracing::info!(route = %route.name, "client TLS handshake timed out");
            metrics.session_unattested(&route.name, "tls_error");
            None
        }
    }
}

/// What the client is told when refused: a RESP error code and message.
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

/// The denial-to-wire table of redis routes. Messages name the route and,
/// when known, the workload.
pub fn refusal_of(d: &Denial, route: &str, workload: Option<&str>) -> Refusal {
    let code = match d {
        Denial::Unattested { .. }
        | Denial::Frozen(_)
        | Denial::NotAllowed { .. }
        | Denial::NotPermitted { .. }
        | Denial::DatabaseNotAllowed { .. }
        // No lease user: no permission, as Redis says for a user it refuses.
        | Denial::NoLease { .. } => "NOPERM",
        _ => "ERR",
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
    Refusal { code, message }
}

/// Why warden's own login upstream failed.
pub(crate) enum UpstreamFailure {
    /// TCP/TLS could not be opened, or the server did not answer.
    Unreachable(String),
    /// The server refused the stored password (its error text).
    Rejected(String),
}

/// Tells a refused client why, then closes: the error is written, the
/// write side shut, and whatever the client sent meanwhile read away (so
/// the close is not a reset that could discard the error unread).
async fn refuse_client(mut client: Client, r: &Refusal) {
    let _ = client.write_all(&error_reply(r.code, &r.message)).await;
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

/// The refusal of a failed upstream login, and its metric result; `what`
/// names the credential (`secret NAME vN`, or a lease and its user).
fn upstream_refusal(
    f: UpstreamFailure,
    route: &RedisRoute,
    workload: &str,
    what: &str,
) -> (Refusal, &'static str) {
    match f {
        UpstreamFailure::Unreachable(m) => (
            Refusal {
                code: "ERR",
                message: format!(
                    "warden: upstream unreachable for route {:?} (workload {workload:?}): {m}",
                    route.name
                ),
            },
            "upstream_error",
        ),
        UpstreamFailure::Rejected(m) => (
            Refusal {
                code: "WRONGPASS",
                message: format!(
                    "warden: upstream rejected the credential for route {:?} ({what}, workload {workload:?}): {m}",
                    route.name
                ),
            },
            "upstream_rejected",
        ),
    }
}

/// The audit target of a session: the secret version, or on a dynamic
/// route the route alone (the detail names the lease user and lease; the
/// secret is the administrative login's, which the session does not use).
fn credential_target(route: &RedisRoute, version: Option<u32>, detail: String) -> Target {
    if route.dynamic {
        return Target {
            route: Some(route.name.clone()),
            detail: Some(detail),
            ..Target::default()
        };
    }
    Target::secret_use(&route.name, &route.secret, &route.env, version, detail)
}

async fn session(
    tcp: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    route: Arc<RedisRoute>,
    shared: Arc<RedisShared>,
) {
    let started = Instant::now();
    // Nothing is done for a client before its first byte (Redis clients
    // speak first): a silent one holds one descriptor and no credential —
    // and near the descriptor limit it may be closed to make room for a
    // new one, in Redis's words for the limit.
    if warden_core::listen::first_bytes(&tcp, None).await
        == warden_core::listen::FirstBytes::Evicted
    {
        warden_core::listen::note_evicted(&route.name, &shared.metrics);
        let why = warden_core::listen::evicted_message("command");
        let reply = error_reply("ERR", &format!("max number of clients reached ({why})"));
        let _ = tcp.try_write(&reply);
        return;
    }
    let offer = shared.client_tls.get(&route.name);
    let Some(client) = client_stream(tcp, &route, offer, &shared.metrics).await else {
        return;
    };
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
            AttestVia::Redis,
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
            let workload = attestation.as_ref().ok().map(|w| w.workload.as_str());
            let r = refusal_of(&d, &route.name, workload);
            admission
                .refuse(&route.name, &attestation, &d, "redis".into())
                .await;
            refuse_client(client, &r).await;
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
    // Admitted first: a pooled connection serves only a client that
    // passed every check a fresh login would have.
    let pooled = if route.pool.enabled() {
        shared.pool.take(&route.name, &route.pool, &label)
    } else {
        None
    };
    let (conn, reused) = match pooled {
        Some(conn) => (conn, true),
        None => match login_as(&route, user, &secret.value).await {
            Ok(u) => {
                shared
                    .metrics
                    .upstream_latency(&route.name, u.connect_time, u.auth_time);
                let conn = pool::Conn {
                    stream: u.stream,
                    born: Instant::now(),
                };
                (conn, false)
            }
            Err(f) => {
                let what = match &leased {
                    Some(l) => format!("lease {}, user {:?}", l.id, l.user),
                    None => format!("secret {label}"),
                };
                let (r, result) = upstream_refusal(f, &route, &who.workload, &what);
                let failure = LoginFailure {
                    route: &route.name,
                    result,
                    target: credential_target(&route, Some(secret.version), "redis".into()),
                    secret: &secret.value,
                };
                let r = admission
                    .login_failed(&who, failure, r, |r| &mut r.message)
                    .await;
                refuse_client(client, &r).await;
                return;
            }
        },
    };
    let detail = format!(
        "redis to {}:{}{}{}",
        route.host,
        route.port,
        if user.is_empty() {
            String::new()
        } else {
            format!(" as ACL user {user:?}")
        },
        if reused {
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
            "credential injected (AUTH)",
            true,
        )
        .await;
    if let Err(d) = started_ok {
        let r = refusal_of(&d, &route.name, Some(&who.workload));
        tracing::warn!(route = %route.name, "session refused: {d}");
        shared
            .metrics
            .session(&route.name, &who.workload, d.result());
        if reused {
            shared.pool.discard(&route.name, conn);
        }
        refuse_client(client, &r).await;
        return;
    }
    let ctx = Context {
        route: &route.name,
        workload: &who.workload,
        policy: &route.commands,
        user,
        password: &secret.value,
    };
    let (mut conn, mut client) = (conn, client);
    let list = shared.command_lists.get(&route.name).copied();
    let kernel = kernel_eligible(&shared, &route, list.is_some(), &client, &conn.stream);
    let list = list.unwrap_or(warden_ebpf::CommandList::NONE);
    let mut handover = Handover::guarded(RelayKind::Redis, warden_ebpf::GUARD_REDIS).listed(list);
    // A freeze of this workload ends the session.
    let mut freezes = shared.admission.freezer().subscribe();
    let mut freezes_spliced = freezes.clone();
    let relayed = async {
        match &kernel {
            Some(k) => {
                let mut offer = |c: &&mut Client, u: &&mut UpstreamStream, held: usize| {
                    handover.offer(k, c.plain_tcp(), u, held, &route.name, &shared.metrics)
                };
                relay::relay_with(&mut client, &mut conn.stream, &ctx, Some(&mut offer)).await
            }
            None => relay::relay(&mut client, &mut conn.stream, &ctx).await,
        }
    };
    let (mut outcome, mut frozen) = tokio::select! {
        o = relayed => (o, None),
        f = shared.admission.freezer().until_frozen(&who.workload, &mut freezes) => {
            let o = relay::Outcome { how: FROZEN, ..relay::Outcome::default() };
            (o, Some(f))
        }
    };
    let via = if outcome.spliced {
        " (kernel relay)"
    } else {
        ""
    };
    let conn = if outcome.spliced {
        let watch = shared
            .admission
            .freezer()
            .until_frozen(&who.workload, &mut freezes_spliced);
        let done = warden_core::kernel_relay::finish(
            client,
            conn.stream,
            handover,
            watch,
            frozen_error,
            // Built only now (it holds a copy of the password): most
            // sessions are never spliced.
            Some(Box::new(
                spliced::SplicedCommands::new(&route.name, &who.workload, user, &secret.value)
                    .with_list(&route.commands),
            )),
        )
        .await;
        outcome.up += done.up;
        outcome.down += done.down;
        outcome.refused_commands += done.refused;
        outcome.how = match &done.frozen {
            Some(_) => FROZEN,
            None if done.ended_by_guard => "closed: RESET refused",
            None if done.error => "connection error",
            None => "closed",
        };
        frozen = done.frozen;
        if let Some(resumed) = done.resumed {
            // A command the route's list leaves to its relay: the rest of
            // the session runs in user space, in step again.
            tracing::debug!(route = %route.name, "spliced session handed back to user space");
            let (mut client, mut upstream) = resumed.into_parts();
            let mut freezes_resumed = shared.admission.freezer().subscribe();
            tokio::select! {
                o = relay::relay(&mut client, &mut upstream, &ctx) => {
                    outcome.up += o.up;
                    outcome.down += o.down;
                    outcome.refused_commands += o.refused_commands;
                    outcome.how = o.how;
                }
                f = shared.admission.freezer().until_frozen(&who.workload, &mut freezes_resumed) => {
                    let _ = client.write_all(&frozen_error(&f)).await;
                    outcome.how = FROZEN;
                    frozen = Some(f);
                }
            }
        }
        // The upstream connection is closed: warden no longer knows
        // where its protocol stands.
        None
    } else {
        if let Some(f) = &frozen {
            let _ = client.write_all(&frozen_error(f)).await;
            let _ = client.shutdown().await;
        }
        drop(client);
        // A session ended by a freeze stopped anywhere: never pooled.
        frozen.is_none().then_some(conn)
    };
    if frozen.is_some() {
        tracing::info!(route = %route.name, workload = %who.workload, "session ended: the workload is frozen");
        shared.metrics.session(&route.name, &who.workload, "frozen");
    }
    end_session(
        &shared, &route, &who, &secret, &detail, started, &outcome, via,
    )
    .await;
    let Some(conn) = conn else {
        return;
    };
    // A revoked lease's connection serves no one.
    if leased.as_ref().is_some_and(|l| !l.held()) {
        if route.pool.enabled() && outcome.at_boundary {
            shared.pool.discard(&route.name, conn);
        }
        return;
    }
    if route.pool.enabled() && outcome.at_boundary {
        let login = pool::Login {
            user,
            password: &secret.value,
        };
        let left = pool::Leftover {
            unsync: outcome.unsync,
            state_free: outcome.state_free,
        };
        shared
            .pool
            .give_back(&route.name, &route.pool, label, conn, &login, left)
            .await;
    }
}

/// How a session a freeze ended is recorded.
const FROZEN: &str = "closed: workload frozen";

/// Whether this session may be handed to the kernel relay (see
/// `docs/redis.md`): the relay is loaded and on for the route, client and
/// upstream are plain TCP (the upstream's far end must be on this host too,
/// which the splice itself checks), and the route has no command list or
/// one the kernel took (`listed`: it hands listed commands back). What the
/// session runs can still rule it out ([`relay`]).
fn kernel_eligible(
    shared: &RedisShared,
    route: &RedisRoute,
    listed: bool,
    client: &Client,
    upstream: &UpstreamStream,
) -> Option<Arc<warden_ebpf::KernelRelay>> {
    let policy = &route.commands;
    shared
        .kernel_relay
        .as_ref()
        .filter(|_| route.kernel_relay)
        .filter(|_| listed || (policy.deny.is_empty() && policy.allow.is_none()))
        .filter(|_| client.plain_tcp().is_some())
        .filter(|_| matches!(upstream, UpstreamStream::Plain(_)))
        .cloned()
}

/// The error a frozen workload's open session ends with.
fn frozen_error(f: &warden_core::freeze::FreezeEntry) -> Vec<u8> {
    error_reply("NOPERM", &warden_core::freeze::frozen_message(f))
}

#[allow(clippy::too_many_arguments)]
async fn end_session(
    shared: &RedisShared,
    route: &RedisRoute,
    who: &Attested,
    secret: &SecretValue,
    detail: &str,
    started: Instant,
    o: &relay::Outcome,
    via: &str,
) {
    let note = if o.refused_commands > 0 {
        format!(", {} commands refused", o.refused_commands)
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
        how: &format!("{}{via}", o.how),
    };
    shared.admission.record_session_end(who, end).await;
}

/// An upstream connection warden has logged in on.
pub(crate) struct LoggedIn {
    stream: warden_core::pgwire::upstream::UpstreamStream,
    connect_time: Duration,
    auth_time: Duration,
}

/// Connects and sends warden's `AUTH`; the server must answer `+OK`.
pub(crate) async fn login(
    route: &RedisRoute,
    password: &[u8],
) -> std::result::Result<LoggedIn, UpstreamFailure> {
    login_as(route, &route.user, password).await
}

/// [`login`] as `user` (empty: `AUTH password`).
pub(crate) async fn login_as(
    route: &RedisRoute,
    user: &str,
    password: &[u8],
) -> std::result::Result<LoggedIn, UpstreamFailure> {
    let t0 = Instant::now();
    let (mut stream, _) = warden_core::connect::open(
        &route.host,
        route.port,
        route.tls.as_ref(),
        route.connect_timeout,
        &route.ca_label,
    )
    .await
    .map_err(|e| UpstreamFailure::Unreachable(e.to_string()))?;
    let connect_time = t0.elapsed();
    let t1 = Instant::now();
    let mut auth = Zeroizing::new(Vec::with_capacity(64 + password.len()));
    if user.is_empty() {
        encode_command(&mut auth, [&b"AUTH"[..], password].into_iter());
    } else {
        encode_command(
            &mut auth,
            [&b"AUTH"[..], user.as_bytes(), password].into_iter(),
        );
    }
    let reply = tokio::time::timeout(route.connect_timeout, async {
        stream
            .write_all(&auth)
            .await
            .map_err(|e| format!("cannot send AUTH to {}:{}: {e}", route.host, route.port))?;
        read_reply(&mut stream, "AUTH").await
    })
    .await
    .map_err(|_| {
        UpstreamFailure::Unreachable(format!(
            "{}:{} did not answer AUTH within {} ms",
            route.host,
            route.port,
            route.connect_timeout.as_millis()
        ))
    })?
    .map_err(UpstreamFailure::Unreachable)?;
    if reply.starts_with(b"+OK") {
        return Ok(LoggedIn {
            stream,
            connect_time,
            auth_time: t1.elapsed(),
        });
    }
    let text = String::from_utf8_lossy(&reply);
    let text = text.trim_end().trim_start_matches('-').to_string();
    // A server never echoes the password, but make sure.
    let secret_text = String::from_utf8_lossy(password);
    let text = if !secret_text.is_empty() && text.contains(secret_text.as_ref()) {
        "(the server's answer is withheld: it contains the secret)".to_string()
    } else {
        text
    };
    if reply.starts_with(b"-") {
        Err(UpstreamFailure::Rejected(text))
    } else {
        Err(UpstreamFailure::Unreachable(format!(
            "unexpected answer to AUTH: {text}"
        )))
    }
}

/// Reads the reply to one command `what` (bounded: login and
/// administration replies are short).
pub(crate) async fn read_reply<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    what: &str,
) -> std::result::Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(256);
    let mut scanner = ReplyScanner::default();
    loop {
        if let Some(n) = scanner
            .advance(&buf)
            .map_err(|e| format!("the upstream is not speaking RESP: {e}"))?
        {
            buf.truncate(n);
            return Ok(buf);
        }
        if buf.len() > 64 * 1024 {
            return Err(format!("the upstream's answer to {what} is too long"));
        }
        let mut chunk = [0u8; 1024];
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer to {what}: {e}"))?;
        if n == 0 {
            return Err(format!("the upstream closed the connection after {what}"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
