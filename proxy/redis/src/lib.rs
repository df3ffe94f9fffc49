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

pub mod relay;
pub mod resp;

use relay::{CommandPolicy, Context};
use resp::{encode_command, error_reply, ReplyScanner};
use rustls::ClientConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warden_core::admission::{Admission, Denial, Peer, RoutePolicy, SecretRef, SessionEnd};
use warden_core::audit::Target;
use warden_core::config::{Config, RouteKind, TlsMode};
use warden_core::credentials::{SecretValue, DEFAULT_CACHE_TTL};
use warden_core::error::{Error, Result};
use warden_core::metrics::{AttestVia, Metrics};
use warden_core::peer::Attested;
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
}

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
}

/// Binds every redis route's listener.
pub async fn bind_routes(
    routes: Vec<RedisRoute>,
) -> Result<Vec<(Arc<RedisRoute>, tokio::net::TcpListener)>> {
    let mut out = Vec::new();
    for r in routes {
        let tcp = warden_core::listen::bind_route(&r.name, r.listen).await?;
        out.push((Arc::new(r), tcp));
    }
    Ok(out)
}

/// Accepts connections on one route until the task is dropped.
pub async fn serve_route(
    route: Arc<RedisRoute>,
    tcp: tokio::net::TcpListener,
    shared: Arc<RedisShared>,
) {
    let name = route.name.clone();
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
        | Denial::DatabaseNotAllowed { .. } => "NOPERM",
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
enum UpstreamFailure {
    /// TCP/TLS could not be opened, or the server did not answer.
    Unreachable(String),
    /// The server refused the stored password (its error text).
    Rejected(String),
}

/// Tells a refused client why, then closes: the error is written, the
/// write side shut, and whatever the client sent meanwhile read away (so
/// the close is not a reset that could discard the error unread).
async fn refuse_client(mut client: TcpStream, r: &Refusal) {
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

fn credential_target(route: &RedisRoute, version: Option<u32>, detail: String) -> Target {
    Target::secret_use(&route.name, &route.secret, &route.env, version, detail)
}

async fn session(
    client: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    route: Arc<RedisRoute>,
    shared: Arc<RedisShared>,
) {
    let started = Instant::now();
    // Nothing is done for a client before its first command (Redis clients
    // speak first): a silent one holds one descriptor and no credential —
    // and near the descriptor limit it may be closed to make room for a
    // new one, in Redis's words for the limit.
    if warden_core::listen::first_bytes(&client, None).await
        == warden_core::listen::FirstBytes::Evicted
    {
        warden_core::listen::note_evicted(&route.name, &shared.metrics);
        let why = warden_core::listen::evicted_message("command");
        let reply = error_reply("ERR", &format!("max number of clients reached ({why})"));
        let _ = client.try_write(&reply);
        return;
    }
    warden_core::listen::arrived(&client).await;
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
    let (who, secret) = match admitted {
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
    let label = format!("{} v{}", route.secret, secret.version);
    let upstream = match login(&route, &secret).await {
        Ok(u) => u,
        Err(f) => {
            let (code, result, message) = match f {
                UpstreamFailure::Unreachable(m) => (
                    "ERR",
                    "upstream_error",
                    format!(
                        "warden: upstream unreachable for route {:?} (workload {:?}): {m}",
                        route.name, who.workload
                    ),
                ),
                UpstreamFailure::Rejected(m) => (
                    "WRONGPASS",
                    "upstream_rejected",
                    format!(
                        "warden: upstream rejected the credential for route {:?} (secret {label}, workload {:?}): {m}",
                        route.name, who.workload
                    ),
                ),
            };
            tracing::warn!(route = %route.name, "session failed: {message}");
            shared.metrics.session(&route.name, &who.workload, result);
            admission
                .record_session_error(
                    &who,
                    credential_target(&route, Some(secret.version), "redis".into()),
                    message.clone(),
                )
                .await;
            refuse_client(client, &Refusal { code, message }).await;
            return;
        }
    };
    shared
        .metrics
        .upstream_latency(&route.name, upstream.connect_time, upstream.auth_time);
    let detail = format!(
        "redis to {}:{}{}",
        route.host,
        route.port,
        if route.user.is_empty() {
            String::new()
        } else {
            format!(" as ACL user {:?}", route.user)
        }
    );
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
        refuse_client(client, &r).await;
        return;
    }
    let ctx = Context {
        route: &route.name,
        workload: &who.workload,
        policy: &route.commands,
        user: &route.user,
        password: &secret.value,
    };
    let outcome = relay::relay(client, upstream.stream, &ctx).await;
    end_session(&shared, &route, &who, &secret, &detail, started, &outcome).await;
}

async fn end_session(
    shared: &RedisShared,
    route: &RedisRoute,
    who: &Attested,
    secret: &SecretValue,
    detail: &str,
    started: Instant,
    o: &relay::Outcome,
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
        how: o.how,
    };
    shared.admission.record_session_end(who, end).await;
}

/// An upstream connection warden has logged in on.
struct LoggedIn {
    stream: warden_core::pgwire::upstream::UpstreamStream,
    connect_time: Duration,
    auth_time: Duration,
}

/// Connects and sends warden's `AUTH`; the server must answer `+OK`.
async fn login(
    route: &RedisRoute,
    secret: &SecretValue,
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
    let mut auth = Zeroizing::new(Vec::with_capacity(64 + secret.value.len()));
    if route.user.is_empty() {
        encode_command(&mut auth, [&b"AUTH"[..], &secret.value].into_iter());
    } else {
        encode_command(
            &mut auth,
            [&b"AUTH"[..], route.user.as_bytes(), &secret.value].into_iter(),
        );
    }
    let reply = tokio::time::timeout(route.connect_timeout, async {
        stream
            .write_all(&auth)
            .await
            .map_err(|e| format!("cannot send AUTH to {}:{}: {e}", route.host, route.port))?;
        read_reply(&mut stream).await
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
    let secret_text = String::from_utf8_lossy(&secret.value);
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

/// Reads one reply (bounded: a login reply is short).
async fn read_reply<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
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
            return Err("the upstream's answer to AUTH is too long".into());
        }
        let mut chunk = [0u8; 1024];
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer to AUTH: {e}"))?;
        if n == 0 {
            return Err("the upstream closed the connection after AUTH".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
