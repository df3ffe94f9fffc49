//! Forward-proxy mode for clients that honour `HTTP_PROXY`: the routes with
//! `forward_proxy = true` that share a listen address form one proxy.
//!
//! - `GET http://api.internal/v1/...` (absolute form): the route whose
//!   upstream host is `api.internal` handles it exactly like a reverse-proxy
//!   request — attested workload on its allow list, credential injected, TLS
//!   to an `https://` upstream opened and verified by warden.
//! - `CONNECT host:port`: a byte tunnel, only to the `tunnel` entries of a
//!   route that allows the workload; no credential is added.
//! - Anything else is a 403 that says which host was refused and why.

use super::proxy::{self, deny, target, text, Body, ConnCtx};
use super::upstream::{open, ConnectError};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use warden_core::admission::{Denial, RoutePolicy};
use warden_core::peer::describe;

/// One request on a forward-proxy connection.
pub(super) async fn handle(
    mut req: Request<Incoming>,
    ctxs: Arc<Vec<Arc<ConnCtx>>>,
) -> Result<Response<Body>, Infallible> {
    let Some(first) = ctxs.first() else {
        return Ok(text(StatusCode::INTERNAL_SERVER_ERROR, "warden: no routes"));
    };
    if req.method() == Method::CONNECT {
        return Ok(connect(req, &ctxs).await);
    }
    let uri = req.uri().clone();
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        first
            .shared
            .metrics
            .http_request(&first.route.name, "bad_request");
        return Ok(text(
            StatusCode::BAD_REQUEST,
            &format!(
                "warden: {} is a forward proxy: send absolute URLs (set HTTP_PROXY=http://{})",
                first.route.listen, first.route.listen
            ),
        ));
    };
    if scheme != "http" {
        first
            .shared
            .metrics
            .http_request(&first.route.name, "bad_request");
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "warden: only http:// URLs can be sent to the proxy directly; https:// goes through CONNECT",
        ));
    }
    let host = authority.host();
    let Some(ctx) = ctxs
        .iter()
        .find(|c| c.route.authority.host().eq_ignore_ascii_case(host))
    else {
        return Ok(refuse_host(first, host, authority.port_u16().unwrap_or(80)).await);
    };
    let origin = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match origin.parse() {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "warden: the request target is not a valid URI",
            ))
        }
    }
    proxy::handle(req, ctx.clone()).await
}

async fn refuse_host(ctx: &ConnCtx, host: &str, port: u16) -> Response<Body> {
    let reason = match &ctx.who {
        Ok(who) => format!(
            "warden: {} (workload {:?}) may not reach {host}:{port} through this proxy: no route injects a credential for it or lists it in tunnel",
            describe(&who.facts),
            who.workload
        ),
        Err(u) => format!("{} — this proxy refuses unattested clients", u.reason),
    };
    deny(ctx, Denial::NotPermitted { reason }).await
}

async fn connect(req: Request<Incoming>, ctxs: &[Arc<ConnCtx>]) -> Response<Body> {
    let first = &ctxs[0];
    let Some((host, port)) = req
        .uri()
        .authority()
        .and_then(|a| a.port_u16().map(|p| (a.host().to_ascii_lowercase(), p)))
    else {
        return text(StatusCode::BAD_REQUEST, "warden: CONNECT needs host:port");
    };
    let who = match &first.who {
        Ok(w) => w,
        Err(u) => {
            let reason = format!("{} — this proxy refuses unattested clients", u.reason);
            return deny(first, Denial::NotPermitted { reason }).await;
        }
    };
    let candidates: Vec<&Arc<ConnCtx>> = ctxs
        .iter()
        .filter(|c| c.route.tunnel.contains(&(host.clone(), port)))
        .collect();
    if candidates.is_empty() {
        if let Some(c) = ctxs
            .iter()
            .find(|c| c.route.authority.host().eq_ignore_ascii_case(&host))
        {
            let reason = format!(
                "warden: route {:?} injects the credential for {host}: request http://{host}/... through the proxy instead of a CONNECT tunnel (warden opens the connection to {}://{} itself)",
                c.route.name, c.route.scheme, c.route.authority
            );
            return deny(c, Denial::NotPermitted { reason }).await;
        }
        return refuse_host(first, &host, port).await;
    }
    // The admission step's policy, against each route that lists the host.
    let admission = &first.shared.admission;
    let mut refusal = None;
    let mut allowed = None;
    for c in &candidates {
        let policy = RoutePolicy {
            name: &c.route.name,
            allow: &c.route.allow,
        };
        match admission.authorize_workload(who, &policy) {
            Ok(()) => {
                allowed = Some(*c);
                break;
            }
            Err(d) => {
                if refusal.is_none() {
                    refusal = Some((*c, d));
                }
            }
        }
    }
    let Some(ctx) = allowed else {
        let (c, d) = refusal.unwrap_or_else(|| {
            let reason = "warden: no route allows this tunnel".to_string();
            (candidates[0], Denial::NotPermitted { reason })
        });
        return deny(c, d).await;
    };
    let route = &ctx.route;
    let metrics = &ctx.shared.metrics;
    let stream = match open(&host, port, None, route.connect_timeout, "").await {
        Ok((s, _)) => s,
        Err(e) => {
            let status = match e {
                ConnectError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            };
            metrics.http_request(&route.name, "upstream_error");
            return text(status, &format!("warden: route {:?}: {e}", route.name));
        }
    };
    // Through the admission step's record: the tunnel is audited, counted
    // and seen by the anomaly detector like any other route's session.
    let started = ctx
        .shared
        .admission
        .record_start(
            who,
            &route.name,
            &route.name,
            target(route, None, format!("CONNECT tunnel to {host}:{port}")),
            "tunnel opened (no credential)",
            true,
        )
        .await;
    if started.is_err() {
        metrics.http_request(&route.name, "audit_error");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "warden: the audit record for this tunnel could not be written; refusing",
        );
    }
    metrics.http_request(&route.name, "tunnel");
    let on_upgrade = hyper::upgrade::on(req);
    let name = route.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let (mut up, mut stream) = (TokioIo::new(up), stream);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut stream).await;
            }
            Err(e) => tracing::warn!(route = %name, "CONNECT upgrade failed: {e}"),
        }
    });
    Response::new(Either::Right(Full::new(Bytes::new())))
}
