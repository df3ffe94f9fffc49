//! One PostgreSQL client session: startup → attribute → attest → authorize →
//! credential → upstream login → greet the client → relay → record.
//!
//! Every refusal ends in an ErrorResponse with a real SQLSTATE and a message a
//! human can act on, plus an audit record and a metric. The injected password
//! never reaches the client: the client only ever sees warden's own
//! AuthenticationOk and the upstream's post-auth messages.

use super::kernel::{self, ClientTransport};
use super::protocol::{self, StartupMessage, StartupPacket};
use super::upstream::{self, Login, UpstreamFailure};
use super::{pool, relay};
use super::{CancelTarget, CredentialSource, PgRoute, PgShared};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use warden_core::admission::{Denial, RoutePolicy, SecretRef};
use warden_core::audit::{Decision, Event, Target};
use warden_core::config::ClientTls;
use warden_core::error::ErrorKind;
use warden_core::metrics::AttestVia;
use warden_core::peer::actor;

/// How long a client may take to send its startup packet.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub use warden_core::admission::Peer;

/// Binds libpq's socket file `<dir>/.s.PGSQL.<port>` (mode 0666: attestation decides).
pub fn bind_unix(
    dir: &Path,
    port: u16,
    route: &str,
) -> warden_core::error::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!(".s.PGSQL.{port}"));
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| warden_core::error::Error::io("cannot create", dir, &e))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(warden_core::error::Error::usage(format!(
                "route {route:?}: {} is in use by another process",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(&path);
    }
    let l = tokio::net::UnixListener::bind(&path).map_err(|e| {
        warden_core::error::Error::io(&format!("route {route:?}: cannot bind"), &path, &e)
    })?;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    Ok(l)
}

/// A refusal to send the client: SQLSTATE, message, and the metrics result label.
struct Refusal {
    sqlstate: &'static str,
    message: String,
    detail: Option<String>,
    result: &'static str,
}

impl Refusal {
    fn new(sqlstate: &'static str, result: &'static str, message: String) -> Refusal {
        Refusal {
            sqlstate,
            message,
            detail: None,
            result,
        }
    }
}

async fn send_error<S: AsyncWrite + Unpin>(client: &mut S, r: &Refusal) {
    let msg = protocol::error_response("FATAL", r.sqlstate, &r.message, r.detail.as_deref(), None);
    let _ = client.write_all(&msg).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// Reads the client's startup. SSLRequest and GSSENCRequest are declined with
/// 'N' (the client falls back to plaintext on loopback); a CancelRequest is
/// forwarded and ends the connection (`Ok(None)`).
/// What the client opened with.
enum Opening {
    /// The startup message, and the bytes the client sent after it in the
    /// same reads (a client that did not wait for the greeting): they are
    /// relayed first, as PostgreSQL would read them.
    Startup(StartupMessage, Vec<u8>),
    /// SSLRequest on a route that offers TLS: answer `S` and handshake.
    UpgradeTls,
}

async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    shared: &PgShared,
    offer_tls: bool,
) -> Result<Option<Opening>, Refusal> {
    let mut buf = Vec::with_capacity(512);
    loop {
        match protocol::parse_startup(&buf) {
            Ok(Some((packet, used))) => {
                buf.drain(..used);
                match packet {
                    StartupPacket::Ssl | StartupPacket::GssEnc => {
                        if !buf.is_empty() {
                            return Err(Refusal::new(
                                "08P01",
                                "protocol_error",
                                "warden: unexpected data after the encryption request".into(),
                            ));
                        }
                        if offer_tls && matches!(packet, StartupPacket::Ssl) {
                            return Ok(Some(Opening::UpgradeTls));
                        }
                        client.write_all(b"N").await.map_err(|_| closed())?;
                    }
                    StartupPacket::Cancel {
                        process_id,
                        secret_key,
                    } => {
                        forward_cancel(shared, process_id, &secret_key).await;
                        return Ok(None);
                    }
                    StartupPacket::Startup(m) => return Ok(Some(Opening::Startup(m, buf))),
                }
            }
            Ok(None) => {
                buf.reserve(1024);
                let n = client.read_buf(&mut buf).await.map_err(|_| closed())?;
                if n == 0 {
                    return Err(closed());
                }
            }
            Err(e) => {
                return Err(Refusal::new(
                    e.sqlstate(),
                    "protocol_error",
                    format!("warden: invalid startup packet: {e}"),
                ))
            }
        }
    }
}

fn closed() -> Refusal {
    Refusal::new(
        "08006",
        "client_gone",
        "client closed the connection".into(),
    )
}

async fn forward_cancel(shared: &PgShared, pid: i32, key: &[u8]) {
    match shared.cancels.lookup(pid, key) {
        Some((target, upid, ukey)) => {
            if let Err(UpstreamFailure::Unreachable(e)) =
                upstream::send_cancel(&target, upid, &ukey).await
            {
                tracing::warn!("cancel forward failed: {e}");
            }
            shared.metrics.pg_cancel("forwarded");
        }
        // As PostgreSQL does: an unknown key is ignored silently.
        None => shared.metrics.pg_cancel("unknown_key"),
    }
}

/// The login a session uses: never printed (no Debug), password zeroized.
struct Credential {
    user: String,
    password: zeroize::Zeroizing<Vec<u8>>,
    /// `secret vN` or `lease ID`: for messages and the SCRAM cache.
    label: String,
    version: Option<u32>,
    lease: Option<String>,
    scram_min_iterations: u32,
}

/// Gives a lease's session count back however the session ends.
struct LeaseRelease {
    shared: Arc<PgShared>,
    id: Option<String>,
}

impl Drop for LeaseRelease {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            self.shared.leases.release(id);
        }
    }
}

async fn static_credential(route: &PgRoute, shared: &Arc<PgShared>) -> Result<Credential, Denial> {
    let secret = SecretRef {
        name: &route.secret,
        env: &route.env,
        ttl: route.cache_ttl,
    };
    let v = shared.admission.credential(&route.name, &secret).await?;
    Ok(Credential {
        user: route.user.clone(),
        password: v.value,
        label: format!("{} v{}", route.secret, v.version),
        version: Some(v.version),
        lease: None,
        scram_min_iterations: super::scram::MIN_ITERATIONS,
    })
}

/// The client's answer to a refusal of the admission step (SQLSTATE table
/// of PostgreSQL routes).
fn refusal_of(d: &Denial) -> Refusal {
    let sqlstate = match d {
        Denial::Unattested { .. }
        | Denial::Frozen(_)
        | Denial::NotAllowed { .. }
        | Denial::DatabaseNotAllowed { .. }
        | Denial::NoCredential { .. }
        | Denial::NoLease { .. }
        | Denial::Identity { .. } => "28000",
        // Retry later: warden cannot open credentials now (PostgreSQL's own
        // code for a server that is starting up or shutting down).
        Denial::Sealed { .. } | Denial::StoreUnreachable { .. } => "57P03",
        Denial::AuditFailed => "58000",
        _ => "XX000",
    };
    Refusal::new(sqlstate, d.result(), d.to_string())
}

/// The audit target of a session that used a credential: the secret version,
/// or the lease (never the password).
fn credential_target(route: &PgRoute, cred: &Credential, detail: String) -> Target {
    match &cred.lease {
        None => Target {
            route: Some(route.name.clone()),
            secret: Some(route.secret.clone()),
            env: Some(route.env.clone()),
            version: cred.version,
            detail: Some(detail),
        },
        Some(id) => Target {
            route: Some(route.name.clone()),
            detail: Some(format!("{detail}, lease {id}")),
            ..Target::default()
        },
    }
}

/// Appends an audit record durably (group commit, see [`warden_core::journal`]).
async fn record(shared: &PgShared, event: Event) -> bool {
    shared.admission.audit().record(event).await
}

/// [`record`] for a session-end record: nobody waits for it.
async fn record_end(shared: &PgShared, event: Event) -> bool {
    shared.admission.audit().record_unhurried(event).await
}

/// Reads the opening packet(s), answering protocol errors itself. `None`
/// means the connection is finished (error sent, cancel forwarded, or gone).
async fn opening<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    route: &PgRoute,
    shared: &PgShared,
    offer_tls: bool,
    waiting: Option<&warden_core::listen::Waiting>,
) -> Option<Opening> {
    let read = tokio::time::timeout(STARTUP_TIMEOUT, read_startup(client, shared, offer_tls));
    let Some(read) = warden_core::listen::unless_evicted(waiting, read).await else {
        // Descriptors ran short and this client had sent nothing for the
        // longest: it makes room for a new one (as PostgreSQL's own code
        // for too many connections).
        warden_core::listen::note_evicted(&route.name, &shared.metrics);
        let r = Refusal::new(
            "53300",
            "evicted",
            warden_core::listen::evicted_message("startup packet"),
        );
        send_error(client, &r).await;
        return None;
    };
    match read {
        Ok(Ok(o)) => o,
        Ok(Err(r)) => {
            shared.metrics.session_unattested(&route.name, r.result);
            if r.result != "client_gone" {
                send_error(client, &r).await;
            }
            None
        }
        Err(_) => {
            shared
                .metrics
                .session_unattested(&route.name, "protocol_error");
            let r = Refusal::new(
                "08P01",
                "protocol_error",
                "warden: no startup packet within 10 s".into(),
            );
            send_error(client, &r).await;
            None
        }
    }
}

/// The client's answer to an upstream login failure; a server error after
/// authentication is also returned to be forwarded unchanged.
fn refusal_for(
    f: UpstreamFailure,
    route: &str,
    secret_label: &str,
) -> (Refusal, Option<protocol::ErrorFields>) {
    let upstream = |code, m: String| {
        Refusal::new(
            code,
            "upstream_error",
            format!("warden: route {route:?}: {m}"),
        )
    };
    match f {
        UpstreamFailure::Unreachable(m) => (upstream("08001", m), None),
        UpstreamFailure::Unsupported(m) => (upstream("28000", m), None),
        UpstreamFailure::Protocol(m) => (upstream("08P01", m), None),
        UpstreamFailure::Rejected(m) => {
            let mut r = Refusal::new(
                "28P01",
                "upstream_rejected",
                format!("warden: upstream rejected the credential for route {route:?} (secret {secret_label})"),
            );
            r.detail = Some(m);
            (r, None)
        }
        UpstreamFailure::Server(e) => {
            let r = Refusal::new(
                "XX000",
                "upstream_error",
                e.message().unwrap_or("").to_string(),
            );
            (r, Some(e))
        }
    }
}

/// The FATAL 57P01 a frozen workload's open session ends with.
pub(super) fn frozen_error(f: &warden_core::freeze::FreezeEntry) -> Vec<u8> {
    protocol::error_response(
        "FATAL",
        "57P01",
        &format!(
            "terminating connection: {}",
            warden_core::freeze::frozen_message(f).trim_start_matches("warden: ")
        ),
        None,
        None,
    )
}

/// A PostgreSQL route's own policy step: its `databases` list.
fn check_database(route: &PgRoute, database: &str) -> Result<(), Denial> {
    if route.databases.is_empty() || route.databases.iter().any(|d| d == database) {
        return Ok(());
    }
    Err(Denial::DatabaseNotAllowed {
        route: route.name.clone(),
        database: database.to_string(),
        allowed: route.databases.clone(),
    })
}

/// Runs one session to its end. Never panics on client input.
pub async fn run<S: AsyncRead + AsyncWrite + ClientTransport + Unpin + Send + 'static>(
    mut client: S,
    peer: Peer,
    route: Arc<PgRoute>,
    shared: Arc<PgShared>,
) {
    let started = Instant::now();
    let tls_config = shared.client_tls.get(&route.name).cloned();
    // Registered only when descriptors are scarce (see `listen::Waiting`).
    let waiting = client
        .plain_tcp()
        .and_then(|t| warden_core::listen::Waiting::register(t.as_raw_fd()));
    let opened = opening(
        &mut client,
        &route,
        &shared,
        tls_config.is_some(),
        waiting.as_ref(),
    )
    .await;
    drop(waiting);
    match opened {
        None => {}
        // TCP only: libpq never asks for TLS over a unix socket (nor does
        // PostgreSQL offer it there).
        Some(Opening::Startup(..))
            if route.client_tls == ClientTls::Require && matches!(peer, Peer::Tcp { .. }) =>
        {
            // As PostgreSQL's `hostssl` lines refuse a plain connection.
            shared
                .metrics
                .session_unattested(&route.name, "tls_required");
            let r = Refusal::new(
                "28000",
                "tls_required",
                format!(
                    "warden: route {:?} requires TLS (client_tls = \"require\"); connect with sslmode=require or stronger",
                    route.name
                ),
            );
            send_error(&mut client, &r).await;
        }
        Some(Opening::Startup(m, pending)) => {
            serve(client, m, pending, peer, route, shared, started).await
        }
        Some(Opening::UpgradeTls) => {
            let Some(config) = tls_config else { return };
            // Boxed: the TLS handshake and a session over TLS would
            // otherwise make every plain session's future (moved on spawn)
            // as large as theirs.
            Box::pin(serve_tls(client, config, peer, route, shared, started)).await;
        }
    }
}

/// A `client_tls` session after the client's SSLRequest: handshake, then
/// the startup message over TLS and [`serve`].
async fn serve_tls<S: AsyncRead + AsyncWrite + ClientTransport + Unpin + Send + 'static>(
    mut client: S,
    config: Arc<rustls::ServerConfig>,
    peer: Peer,
    route: Arc<PgRoute>,
    shared: Arc<PgShared>,
    started: Instant,
) {
    if client.write_all(b"S").await.is_err() {
        return;
    }
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(client);
    let mut tls = match tokio::time::timeout(STARTUP_TIMEOUT, accept).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(route = %route.name, "client TLS handshake failed: {e}");
            shared.metrics.session_unattested(&route.name, "tls_error");
            return;
        }
        Err(_) => {
            shared.metrics.session_unattested(&route.name, "tls_error");
            return;
        }
    };
    if let Some(Opening::Startup(m, pending)) =
        opening(&mut tls, &route, &shared, false, None).await
    {
        serve(tls, m, pending, peer, route, shared, started).await;
    }
}

/// The session after its startup message: attest, authorize, log in upstream, relay.
async fn serve<S: AsyncRead + AsyncWrite + ClientTransport + Unpin + Send + 'static>(
    mut client: S,
    startup: StartupMessage,
    pending: Vec<u8>,
    peer: Peer,
    route: Arc<PgRoute>,
    shared: Arc<PgShared>,
    started: Instant,
) {
    let database = startup
        .get("database")
        .or_else(|| startup.get("user"))
        .unwrap_or("")
        .to_string();
    // attest → frozen? → allow list → database list (the admission step).
    let who = shared.admission.attest(peer, AttestVia::Postgres).await;
    let policy = RoutePolicy {
        name: &route.name,
        allow: &route.allow,
    };
    let admitted = shared
        .admission
        .authorize(&who, &policy)
        .and_then(|w| check_database(&route, &database).map(|()| w.clone()));
    let who = match admitted {
        Ok(w) => w,
        Err(d) => {
            let detail = format!("database {database}");
            shared.admission.refuse(&route.name, &who, &d, detail).await;
            send_error(&mut client, &refusal_of(&d)).await;
            return;
        }
    };

    // Credential: the route's stored secret, or a lease role for this workload.
    let cred = match route.source() {
        CredentialSource::Static => static_credential(&route, &shared).await,
        // Boxed: creating a lease role (an admin login, SQL) would
        // otherwise set the size of every session's future.
        CredentialSource::Dynamic => Box::pin(shared.leases.acquire(
            &route.name,
            &who.workload,
            actor(Some(&who)),
            &shared.scram_cache,
        ))
        .await
        .map(|t| Credential {
            user: t.role.clone(),
            label: t.label(),
            version: None,
            lease: Some(t.id.clone()),
            scram_min_iterations: t.scram_iterations,
            password: t.password,
        })
        .map_err(|e| match e.kind {
            ErrorKind::Sealed => Denial::Sealed {
                route: route.name.clone(),
                reason: e.message,
            },
            // A new lease needs its row in the store first.
            _ => match shared.leases.store_outage() {
                Some((store, outage)) if shared.leases.is_outage(&e) => {
                    Denial::StoreUnreachable {
                        route: route.name.clone(),
                        store,
                        since: outage.describe_since(),
                        reason: format!(
                            "workload {:?} holds no lease on this node, and a new lease is recorded in the store before its role is created (leases already held are used until they expire); sessions resume by themselves once the store is back",
                            who.workload
                        ),
                    }
                }
                _ => Denial::NoLease {
                    route: route.name.clone(),
                    workload: who.workload.clone(),
                    reason: e.message,
                },
            },
        }),
    };
    let cred = match cred {
        Ok(c) => c,
        Err(d) => {
            let attested = Ok(who);
            let detail = format!("database {database}");
            shared
                .admission
                .refuse(&route.name, &attested, &d, detail)
                .await;
            send_error(&mut client, &refusal_of(&d)).await;
            return;
        }
    };
    let lease_guard = LeaseRelease {
        shared: shared.clone(),
        id: cred.lease.clone(),
    };
    let mut upstream_startup = startup.clone();
    // Protocol 3.0 upstream: warden hands clients 4-byte cancel keys anyway,
    // and older servers would answer 3.2 with NegotiateProtocolVersion.
    upstream_startup.protocol = (3, 0);
    upstream_startup.set("user", &cred.user);
    upstream_startup.set("database", &database);

    // An idle connection of the same credential and startup parameters
    // (after the checks above: the pool never skips them).
    let pool_key = route
        .pool
        .enabled()
        .then(|| pool::key(&cred.label, &upstream_startup));
    let pool_cred = pool::Credential {
        label: &cred.label,
        is_static: cred.lease.is_none(),
    };
    let pooled = pool_key
        .as_ref()
        .and_then(|k| shared.pool.take(&route.name, &route.pool, k, &pool_cred));
    let (established, born, reused) = match pooled {
        Some(p) => {
            tracing::debug!(
                route = %route.name,
                backend_pid = p.backend_key.as_ref().map(|k| k.0).unwrap_or(0),
                "session reuses a pooled upstream connection"
            );
            let e = upstream::Established {
                stream: p.stream,
                params: p.params,
                backend_key: p.backend_key,
                ready_status: b'I',
                auth_method: p.auth_method,
                connect_time: Duration::ZERO,
                auth_time: Duration::ZERO,
            };
            (e, p.born, true)
        }
        None => {
            // The password is copied only for a login (a pooled session never
            // holds it).
            let login = Login {
                user: cred.user.clone(),
                password: cred.password.clone(),
                secret_label: cred.label.clone(),
                scram_min_iterations: cred.scram_min_iterations,
            };
            // Boxed: a pool miss's login (TCP, TLS, SCRAM) would otherwise
            // set the size of every session's future.
            match Box::pin(upstream::connect(
                &route.target,
                &upstream_startup,
                &login,
                &shared.scram_cache,
            ))
            .await
            {
                Ok(e) => (e, Instant::now(), false),
                Err(f) => {
                    let (r, forward) = refusal_for(f, &route.name, &login.secret_label);
                    tracing::warn!(route = %route.name, "upstream login failed: {}", r.message);
                    record(
                        &shared,
                        Event {
                            actor: actor(Some(&who)),
                            action: "session.error".into(),
                            target: credential_target(
                                &route,
                                &cred,
                                format!("database {database}"),
                            ),
                            decision: Decision::Error,
                            reason: r.message.clone(),
                        },
                    )
                    .await;
                    shared.metrics.session(&route.name, &who.workload, r.result);
                    match forward {
                        // The server's own error (e.g. 3D000 unknown database) goes to the client as is.
                        Some(e) => {
                            let _ = client.write_all(&e.encode()).await;
                            let _ = client.shutdown().await;
                        }
                        None => send_error(&mut client, &r).await,
                    }
                    return;
                }
            }
        }
    };
    if !reused {
        shared.metrics.upstream_latency(
            &route.name,
            established.connect_time,
            established.auth_time,
        );
    }

    // The credential use is recorded before the client gets the session (fail closed).
    let target = credential_target(
        &route,
        &cred,
        format!(
            "database {database}, role {}, auth {}{}",
            cred.user,
            established.auth_method,
            if reused {
                ", pooled upstream connection"
            } else {
                ""
            }
        ),
    );
    let start = shared.admission.begin_start(
        &who,
        &route.name,
        &route.secret,
        target,
        "credential injected",
    );
    let mut stream = established.stream;
    let refuse_start = |d: &Denial| {
        shared
            .metrics
            .session(&route.name, &who.workload, d.result());
        refusal_of(d)
    };
    // Written inline (interval mode): settled before the greeting.
    let start = match start.decided() {
        Some(_) => {
            if let Err(d) = start.finish().await {
                send_error(&mut client, &refuse_start(&d)).await;
                pool::close(stream);
                return;
            }
            None
        }
        None => Some(start),
    };

    // Greet the client: AuthenticationOk, the server's parameters, warden's cancel key.
    let cancel_key = established.backend_key.as_ref().map(|(upid, ukey)| {
        shared.cancels.register(CancelTarget {
            target: route.target.clone(),
            process_id: *upid,
            secret_key: ukey.clone(),
        })
    });
    let mut greeting = Vec::with_capacity(512);
    greeting.extend_from_slice(&protocol::authentication_ok());
    for (k, v) in &established.params {
        protocol::put_parameter_status(&mut greeting, k, v);
    }
    if let Some((pid, key)) = &cancel_key {
        greeting.extend_from_slice(&protocol::backend_key_data(*pid, key));
    }
    greeting.extend_from_slice(&protocol::ready_for_query(established.ready_status));
    if let Some(start) = start {
        // A group commit is under way (`audit.sync = "commit"`): the
        // greeting overlaps the fsync, and nothing the client sends reaches
        // the upstream before the record is durable (the relay starts
        // after it). A client gone meanwhile is found by the relay.
        let _ = client.write_all(&greeting).await;
        greeting.clear();
        if let Err(d) = start.finish().await {
            send_error(&mut client, &refuse_start(&d)).await;
            if let Some((pid, key)) = &cancel_key {
                shared.cancels.remove(*pid, key);
            }
            pool::close(stream);
            return;
        }
    }
    // A freeze of this workload ends the session with 57P01.
    let mut freezes = shared.admission.freezer().subscribe();
    // Long sessions on plain TCP both ways go to the kernel relay.
    let kernel_relay = shared
        .kernel_relay
        .as_ref()
        .filter(|_| route.kernel_relay)
        .filter(|_| client.plain_tcp().is_some())
        .filter(|_| matches!(stream, upstream::UpstreamStream::Plain(_)))
        .cloned();
    let mut handover = kernel::Handover::new(warden_core::metrics::RelayKind::Postgres);
    let relay = async {
        let mut offer = |c: &S, u: &upstream::UpstreamStream, held: usize| match &kernel_relay {
            Some(k) => handover.offer(k, c.plain_tcp(), u, held, &route.name, &shared.metrics),
            None => relay::Handed::Never,
        };
        let hook: Option<relay::Handover<'_, S, upstream::UpstreamStream>> =
            kernel_relay.is_some().then_some(&mut offer);
        relay::relay(&mut client, &mut stream, &greeting, &pending, hook).await
    };
    let mut freezes2 = freezes.clone();
    let frozen = shared
        .admission
        .freezer()
        .until_frozen(&who.workload, &mut freezes);
    let (mut end, mut closed_by_freeze) = tokio::select! {
        e = relay => (Some(e), None),
        f = frozen => (None, Some(f)),
    };
    // A spliced session: the kernel relays, user space waits for its end.
    let spliced = end.as_ref().is_some_and(|e| e.spliced);
    let stream = match end.as_mut().filter(|e| e.spliced) {
        Some(e) => {
            let frozen = shared
                .admission
                .freezer()
                .until_frozen(&who.workload, &mut freezes2);
            closed_by_freeze = kernel::finish(client, stream, handover, e, frozen).await;
            None
        }
        None => {
            if let Some(f) = &closed_by_freeze {
                let _ = client.write_all(&frozen_error(f)).await;
                let _ = client.flush().await;
                let _ = client.shutdown().await;
            }
            drop(client);
            Some(stream)
        }
    };
    if closed_by_freeze.is_some() {
        shared.metrics.session(&route.name, &who.workload, "frozen");
    }
    if let Some((pid, key)) = &cancel_key {
        shared.cancels.remove(*pid, key);
    }
    let (up, down, how) = match &end {
        Some(e) if closed_by_freeze.is_some() => (e.up, e.down, "closed: workload frozen"),
        None => (0, 0, "closed: workload frozen"),
        Some(e) if e.error && !e.terminated => (e.up, e.down, "connection error"),
        Some(e) => (e.up, e.down, "closed"),
    };
    let via = if spliced { " (kernel relay)" } else { "" };
    // The upstream connection: reset and pooled off the client's path, or
    // closed (a spliced session's `stream` is closed already).
    match (end.and_then(|e| e.resume), pool_key, stream) {
        (_, _, None) => {}
        (Some(resume), Some(key), Some(stream)) => {
            let conn = pool::Pooled {
                stream,
                params: established.params,
                backend_key: established.backend_key,
                auth_method: established.auth_method,
                born,
            };
            let (label, is_static) = (cred.label.clone(), cred.lease.is_none());
            // In this task (the client is gone; nobody waits for it): no
            // spawn, no hand-off to another runtime thread.
            let cred = pool::Credential {
                label: &label,
                is_static,
            };
            shared
                .pool
                .give_back(&route.name, &route.pool, key, &cred, conn, resume)
                .await;
        }
        // Healthy, but no pool: say goodbye for the client.
        (Some(_), None, Some(stream)) => pool::close(stream),
        (None, _, Some(stream)) => drop(stream),
    }
    drop(lease_guard);
    shared
        .metrics
        .session_end(&route.name, started.elapsed(), up, down);
    record_end(
        &shared,
        Event {
            actor: actor(Some(&who)),
            action: "session.end".into(),
            target: credential_target(
                &route,
                &cred,
                format!(
                    "database {database}, {up} bytes up, {down} bytes down, {} ms, {how}{via}",
                    started.elapsed().as_millis()
                ),
            ),
            decision: Decision::Allow,
            reason: "session ended".into(),
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F, A, B, C, D, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every accepted connection's future is moved into its task on spawn:
    /// rare, large steps (a lease role's creation, an upstream login, a TLS
    /// handshake) are boxed so that a pooled session does not copy them.
    #[test]
    fn a_session_future_stays_small() {
        let size = future_size(run::<tokio::net::TcpStream>);
        assert!(
            size <= 6 * 1024,
            "session::run's future is {size} bytes: box the large step that grew it"
        );
    }
}
