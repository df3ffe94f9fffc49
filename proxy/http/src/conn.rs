//! One client connection of an http route: attest the peer once (the
//! admission step), then serve its requests — the HTTP/1.1 fast path first
//! ([`super::fast`]), hyper behind the framing gate for the rest of its life
//! ([`super::proxy`] admits and forwards each request) — and write the
//! connection's `session.end` at its end. Forward-proxy listeners route each
//! request through [`super::forward`].

use super::gate::{Gate, OnRefuse, Refused};
use super::proxy::{self, Body, ConnCtx};
use super::{fast, forward, HttpRoute, HttpShared};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warden_core::admission::{Attestation, Peer};
use warden_core::metrics::AttestVia;

struct GateNotice {
    route: String,
    metrics: warden_core::metrics::Metrics,
    /// Why the gate stopped a request body, for the proxy's 400.
    verdict: proxy::GateVerdict,
}

impl OnRefuse for GateNotice {
    fn refused(&self, r: &Refused) {
        tracing::warn!(route = %self.route, status = r.status, "request refused: {}", r.reason);
        self.metrics.http_request(&self.route, "rejected");
        self.verdict.set(&r.reason);
    }
}

async fn attest(shared: &Arc<HttpShared>, local: SocketAddr, peer: SocketAddr) -> Attestation {
    shared
        .admission
        .attest(Peer::Tcp { local, peer }, AttestVia::Http)
        .await
}

/// Runs hyper's HTTP/1.1 server (keep-alive, upgrades) behind the framing gate.
async fn serve_http1<S, F, Fut>(stream: S, label: &str, shared: &HttpShared, f: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let verdict = proxy::GateVerdict::default();
    let notice = Arc::new(GateNotice {
        route: label.to_string(),
        metrics: shared.metrics.clone(),
        verdict: verdict.clone(),
    });
    let io = TokioIo::new(Gate::new(stream, notice));
    let f = Arc::new(f);
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(verdict.clone());
        // The gate stops checking framing after a request that may switch
        // protocols (any Upgrade header, or CONNECT). If no switch happens,
        // the connection must not carry further requests: close it.
        let may_switch =
            req.method() == http::Method::CONNECT || req.headers().contains_key(header::UPGRADE);
        let connect = req.method() == http::Method::CONNECT;
        let fut = f(req);
        async move {
            let mut resp = fut.await?;
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && resp.status().is_success());
            if may_switch && !switched {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // The gate ends input at a refused request; responses already owed still go out.
        .half_close(true)
        .max_buf_size(super::gate::MAX_HEAD_BYTES * 2)
        .serve_connection(io, svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(route = %label, "client connection ended: {e}");
    }
}

/// Near the descriptor limit, waits for the client's first request bytes
/// (see [`warden_core::listen::first_bytes`]); false when the connection
/// is finished: evicted to make room for a new client (answered 503, like
/// a shed one) or silent past the head timeout (closed, as an idle one).
async fn first_request(stream: &tokio::net::TcpStream, label: &str, shared: &HttpShared) -> bool {
    use warden_core::listen::FirstBytes;
    match warden_core::listen::first_bytes(stream, Some(fast::HEAD_TIMEOUT)).await {
        FirstBytes::Ready => true,
        FirstBytes::Silent => false,
        FirstBytes::Evicted => {
            warden_core::listen::note_evicted(label, &shared.metrics);
            let why = warden_core::listen::evicted_message("request");
            let _ = stream.try_write(&super::overloaded_response(&why));
            false
        }
    }
}

/// Serves one client connection of a reverse-proxy route.
pub async fn serve_connection(
    stream: tokio::net::TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    route: Arc<HttpRoute>,
    shared: Arc<HttpShared>,
) {
    if !first_request(&stream, &route.name, &shared).await {
        return;
    }
    let who = attest(&shared, local, peer).await;
    let ctx = ConnCtx::new(&route, &shared, who);
    let mut stream = stream;
    if let fast::Outcome::Handover(read) = fast::serve(&mut stream, &ctx).await {
        let c2 = ctx.clone();
        let stream = fast::Rewind::new(stream, read);
        serve_http1(stream, &route.name, &shared, move |req| {
            proxy::handle(req, c2.clone())
        })
        .await;
    }
    proxy::finish(&ctx).await;
}

/// Serves one client connection of a forward-proxy listener (`HTTP_PROXY`).
pub async fn serve_forward_connection(
    stream: tokio::net::TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    routes: Arc<Vec<Arc<HttpRoute>>>,
    shared: Arc<HttpShared>,
) {
    // Counted under the listener's label, as a shed connection is.
    let listener = routes
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if !first_request(&stream, &listener, &shared).await {
        return;
    }
    let label = routes.first().map(|r| r.name.clone()).unwrap_or_default();
    let who = attest(&shared, local, peer).await;
    let ctxs: Arc<Vec<Arc<ConnCtx>>> = Arc::new(
        routes
            .iter()
            .map(|r| ConnCtx::new(r, &shared, who.clone()))
            .collect(),
    );
    let c2 = ctxs.clone();
    serve_http1(stream, &label, &shared, move |req| {
        forward::handle(req, c2.clone())
    })
    .await;
    for ctx in ctxs.iter() {
        proxy::finish(ctx).await;
    }
}
