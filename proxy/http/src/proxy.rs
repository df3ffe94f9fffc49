//! One client connection of an http route, and each request on it:
//! policy (attested workload on the allow list) → credential → audit (first
//! credentialed request of the connection, fail closed) → request rewrite
//! (hop-by-hop headers, Host, client copies of the injected header/parameter
//! removed, credential added) → pooled upstream → response (hop-by-hop
//! headers removed, any header that would carry the secret back dropped).
//!
//! Every refusal is an HTTP status with a plain-text body a developer can act
//! on: 403 policy, 502 upstream/TLS failure (naming the host and the CA),
//! 503 sealed or no credential, 504 upstream timeout.

use super::headers::{is_upgrade, scrub_secret, strip_hop_by_hop};
use super::upstream::{find_connect_error, ConnectError, Connector};
use super::{HttpRoute, HttpShared};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warden_core::admission::{Attestation, Denial, RoutePolicy, SecretRef};
use warden_core::audit::{Decision, Event, Target};
use warden_core::peer::{actor, Attested};
use zeroize::Zeroizing;

pub type Body = Either<Incoming, Full<Bytes>>;
pub type Client = hyper_util::client::legacy::Client<Connector, Incoming>;

/// A pooled upstream client. `h1_only` clients are used for upgrades.
pub fn client(connector: Connector, h1_only: bool) -> Client {
    let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if !h1_only {
        b.http2_adaptive_window(true);
    }
    b.build(connector)
}

/// Per-connection state.
pub(super) struct ConnCtx {
    pub(super) route: Arc<HttpRoute>,
    pub(super) shared: Arc<HttpShared>,
    pub(super) who: Attestation,
    started: Instant,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Secret version recorded in this connection's `session.start`.
    recorded: Option<u32>,
    denial_recorded: bool,
    requests: u64,
}

impl ConnCtx {
    /// The state of one client connection of `route`.
    pub(super) fn new(
        route: &Arc<HttpRoute>,
        shared: &Arc<HttpShared>,
        who: Attestation,
    ) -> Arc<ConnCtx> {
        Arc::new(ConnCtx {
            route: route.clone(),
            shared: shared.clone(),
            who,
            started: Instant::now(),
            state: Mutex::new(ConnState::default()),
        })
    }
}

/// The `session.end` record of a connection that used the credential.
pub(super) async fn finish(ctx: &ConnCtx) {
    let (route, shared) = (&ctx.route, &ctx.shared);
    let (recorded, requests) = match ctx.state.lock() {
        Ok(s) => (s.recorded, s.requests),
        Err(_) => (None, 0),
    };
    if let (Some(version), Ok(who)) = (recorded, &ctx.who) {
        let elapsed = ctx.started.elapsed();
        shared.metrics.session_end(&route.name, elapsed, 0, 0);
        let event = Event {
            actor: actor(Some(who)),
            action: "session.end".into(),
            target: target(
                route,
                Some(version),
                format!("http, {requests} requests, {} ms", elapsed.as_millis()),
            ),
            decision: Decision::Allow,
            reason: "connection closed".into(),
        };
        // Nobody waits for a session's end: it may share a later commit.
        let _ = shared.admission.audit().record_unhurried(event).await;
    }
}

pub(super) fn target(route: &HttpRoute, version: Option<u32>, detail: String) -> Target {
    Target {
        route: Some(route.name.clone()),
        secret: version.map(|_| route.secret.clone()),
        env: version.map(|_| route.env.clone()),
        version,
        detail: Some(detail),
    }
}

/// A plain-text response from warden itself.
pub fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "{message}\n"
    )))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("x-warden-error", HeaderValue::from_static("1"));
    resp
}

/// warden's answer to a refusal (the HTTP table): 403 for policy, 503
/// while sealed or the shared store is unreachable past store.stale_if_error, 502 for a missing credential, 500 when the audit record
/// cannot be written.
pub(super) fn denial_response(d: &Denial) -> Response<Body> {
    let status = match d {
        Denial::Sealed { .. } | Denial::StoreUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Denial::NoCredential { .. } | Denial::NoLease { .. } | Denial::Identity { .. } => {
            StatusCode::BAD_GATEWAY
        }
        Denial::AuditFailed | Denial::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::FORBIDDEN,
    };
    text(status, &d.to_string())
}

/// Refuses a request: counted per request; logged, audited and signalled
/// to the anomaly detector once per connection (the admission step's
/// bookkeeping).
pub(super) async fn deny(ctx: &ConnCtx, denial: Denial) -> Response<Body> {
    let route = &ctx.route;
    ctx.shared
        .metrics
        .http_request(&route.name, denial.result());
    let first = match ctx.state.lock() {
        Ok(mut s) => !std::mem::replace(&mut s.denial_recorded, true),
        Err(_) => false,
    };
    if first {
        ctx.shared
            .admission
            .refuse(&route.name, &ctx.who, &denial, "http".into())
            .await;
    }
    denial_response(&denial)
}

/// The route's credential, ready to add: the secret and the header value
/// built from it. Rebuilt after the route's cache TTL and after any change
/// of a secret (the credential cache's generation moved).
pub struct Prepared {
    pub(super) version: u32,
    fetched: Instant,
    generation: u64,
    pub(super) secret: Zeroizing<Vec<u8>>,
    pub(super) header: Option<Result<HeaderValue, String>>,
}

/// The route's credential (prepared copy first, then the admission step's
/// credential cache, then the store).
async fn credential(ctx: &ConnCtx) -> Result<Arc<Prepared>, Denial> {
    let route = &ctx.route;
    let admission = &ctx.shared.admission;
    let generation = admission.credentials().generation();
    if let Ok(p) = route.prepared.lock() {
        if let Some(p) = p.as_ref() {
            if p.generation == generation && p.fetched.elapsed() < route.cache_ttl {
                return Ok(p.clone());
            }
        }
    }
    let secret = SecretRef {
        name: &route.secret,
        env: &route.env,
        ttl: route.cache_ttl,
    };
    let v = admission.credential(&route.name, &secret).await?;
    let prepared = Arc::new(Prepared {
        version: v.version,
        fetched: Instant::now(),
        generation: v.generation,
        header: route.injection.header_value(&v.value),
        secret: v.value,
    });
    if let Ok(mut p) = route.prepared.lock() {
        *p = Some(prepared.clone());
    }
    Ok(prepared)
}

/// Writes `session.start` for this connection (and again if the secret
/// version changed) before a credentialed request is forwarded.
async fn ensure_recorded(ctx: &ConnCtx, who: &Attested, version: u32) -> Result<(), Denial> {
    let (needed, first) = match ctx.state.lock() {
        Ok(mut s) => {
            s.requests += 1;
            (s.recorded != Some(version), s.recorded.is_none())
        }
        Err(_) => return Err(Denial::AuditFailed),
    };
    if !needed {
        return Ok(());
    }
    let route = &ctx.route;
    let target = target(
        route,
        Some(version),
        format!("http, upstream {}://{}", route.scheme, route.authority),
    );
    ctx.shared
        .admission
        .record_start(
            who,
            &route.name,
            &route.secret,
            target,
            "credential injected",
            first,
        )
        .await?;
    if let Ok(mut s) = ctx.state.lock() {
        s.recorded = Some(version);
    }
    Ok(())
}

/// The upstream URI for a client request target.
fn upstream_uri(route: &HttpRoute, target: &http::Uri, secret: &[u8]) -> Result<http::Uri, String> {
    if target.scheme().is_some() || target.authority().is_some() {
        return Err(format!(
            "warden: route {:?} is a reverse proxy for {}://{}; send requests to a path (e.g. GET /v1/...), not an absolute URL",
            route.name, route.scheme, route.authority
        ));
    }
    let path = target.path();
    if !path.starts_with('/') {
        return Err("warden: the request target must start with /".into());
    }
    let query = route.injection.rewrite_query(target.query(), secret);
    let mut pq = Zeroizing::new(String::with_capacity(
        route.base_path.len() + path.len() + query.as_ref().map_or(0, |q| q.len() + 1),
    ));
    pq.push_str(&route.base_path);
    pq.push_str(path);
    if let Some(q) = &query {
        pq.push('?');
        pq.push_str(q);
    }
    http::Uri::builder()
        .scheme(route.scheme.clone())
        .authority(route.authority.clone())
        .path_and_query(pq.as_str())
        .build()
        .map_err(|_| "warden: the request target is not a valid URI".to_string())
}

pub(super) async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let prepared = match admit(&ctx).await {
        Ok(p) => p,
        Err(resp) => return Ok(resp),
    };
    Ok(forward(req, &ctx, &prepared, started).await)
}

/// Everything a request needs before it may be forwarded, in order: an
/// attested client, not frozen, on the allow list, the route's credential,
/// and the connection's `session.start` record (fail closed). `Err` is
/// warden's own answer (403/500/502/503), already counted and logged.
pub(super) async fn admit(ctx: &ConnCtx) -> Result<Arc<Prepared>, Response<Body>> {
    let route = &ctx.route;
    let policy = RoutePolicy {
        name: &route.name,
        allow: &route.allow,
    };
    let who = match ctx.shared.admission.authorize(&ctx.who, &policy) {
        Ok(w) => w,
        Err(d) => return Err(deny(ctx, d).await),
    };
    let prepared = match credential(ctx).await {
        Ok(p) => p,
        Err(d) => return Err(deny(ctx, d).await),
    };
    if let Err(d) = ensure_recorded(ctx, who, prepared.version).await {
        return Err(deny(ctx, d).await);
    }
    Ok(prepared)
}

async fn forward(
    mut req: Request<Incoming>,
    ctx: &ConnCtx,
    prepared: &Prepared,
    started: Instant,
) -> Response<Body> {
    let secret: &[u8] = &prepared.secret;
    let route = &ctx.route;
    let metrics = &ctx.shared.metrics;
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let verdict = parts.extensions.remove::<GateVerdict>();
    parts.uri = match upstream_uri(route, &parts.uri, secret) {
        Ok(u) => u,
        Err(m) => {
            metrics.http_request(&route.name, "bad_request");
            return text(StatusCode::BAD_REQUEST, &m);
        }
    };
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::HOST);
    route.injection.strip_header(&mut parts.headers);
    if let (Some(name), Some(value)) = (route.injection.header_name(), &prepared.header) {
        match value {
            Ok(v) => {
                parts.headers.insert(name.clone(), v.clone());
            }
            Err(m) => {
                let m = m.clone();
                metrics.http_request(&route.name, "credential_error");
                let msg = format!("warden: route {:?}: {m}", route.name);
                tracing::warn!(route = %route.name, "{msg}");
                return text(StatusCode::BAD_GATEWAY, &msg);
            }
        }
    }
    parts.version = http::Version::HTTP_11;
    let up_req = Request::from_parts(parts, body);
    let client = if upgrade {
        &route.upgrade_client
    } else {
        &route.client
    };
    let before_upstream = Instant::now();
    let answer = tokio::time::timeout(route.request_timeout, client.request(up_req)).await;
    let after_upstream = Instant::now();
    let mut resp = match answer {
        Err(_) => {
            metrics.http_request(&route.name, "upstream_timeout");
            let msg = format!(
                "warden: route {:?}: upstream {} did not answer within {} ms (request_timeout)",
                route.name,
                route.authority,
                route.request_timeout.as_millis()
            );
            tracing::warn!(route = %route.name, "{msg}");
            return text(StatusCode::GATEWAY_TIMEOUT, &msg);
        }
        Ok(Err(e)) => {
            if let Some(why) = client_body_error(&e, verdict.as_ref()) {
                metrics.http_request(&route.name, "bad_request");
                let msg = format!(
                    "warden: route {:?}: malformed request body: {why}",
                    route.name
                );
                tracing::warn!(route = %route.name, "{msg}");
                return text(StatusCode::BAD_REQUEST, &msg);
            }
            return upstream_failure(route, metrics, &e);
        }
        Ok(Ok(r)) => r,
    };
    if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(client_upgrade) = client_upgrade {
            let name = route.name.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => tracing::warn!(route = %name, "upgrade failed: {e}"),
                }
            });
        }
        strip_hop_by_hop(resp.headers_mut(), true);
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    scrub_secret(resp.headers_mut(), secret, &route.name);
    let added = (before_upstream - started) + after_upstream.elapsed();
    count_forwarded(route, metrics, added);
    resp.map(Either::Left)
}

/// Counts a forwarded request and warden's own time on it (the upstream
/// round trip excluded), through the route's resolved handles when it has them.
pub(super) fn count_forwarded(
    route: &HttpRoute,
    metrics: &warden_core::metrics::Metrics,
    added: Duration,
) {
    match route.hot.get() {
        Some(hot) => {
            hot.forwarded.inc();
            hot.added.observe(added.as_secs_f64());
        }
        None => {
            metrics.http_request(&route.name, "forwarded");
            metrics.http_request_added(&route.name, added);
        }
    }
}

/// Why the framing gate stopped a connection's request body (set by the
/// gate, read by the proxy answering that request).
#[derive(Clone, Default)]
pub struct GateVerdict(Arc<Mutex<Option<String>>>);

impl GateVerdict {
    pub fn set(&self, reason: &str) {
        if let Ok(mut v) = self.0.lock() {
            *v = Some(reason.to_string());
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|v| v.clone())
    }
}

/// A forward that failed because the *client's* request body was bad (the
/// gate stopped it, or hyper could not read it): the client's fault, 400
/// with the reason — not the upstream's 502.
fn client_body_error(
    e: &hyper_util::client::legacy::Error,
    verdict: Option<&GateVerdict>,
) -> Option<String> {
    let mut body_failed = false;
    let mut innermost: Option<String> = None;
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            // The upstream request's body (the client's Incoming) failed.
            body_failed |= h.is_user();
        }
        innermost = Some(s.to_string());
        src = s.source();
    }
    if !body_failed {
        return None;
    }
    verdict.and_then(GateVerdict::get).or(innermost)
}

fn upstream_failure(
    route: &HttpRoute,
    metrics: &warden_core::metrics::Metrics,
    e: &hyper_util::client::legacy::Error,
) -> Response<Body> {
    let (status, result, why) = match find_connect_error(e) {
        Some(ConnectError::Timeout(m)) => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", m.clone())
        }
        Some(ConnectError::Certificate(m)) => {
            (StatusCode::BAD_GATEWAY, "upstream_tls_error", m.clone())
        }
        Some(ConnectError::Failed(m)) => (StatusCode::BAD_GATEWAY, "upstream_error", m.clone()),
        None => {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("upstream {} failed: {why}", route.authority),
            )
        }
    };
    metrics.http_request(&route.name, result);
    let msg = format!("warden: route {:?}: {why}", route.name);
    tracing::warn!(route = %route.name, "{msg}");
    text(status, &msg)
}
