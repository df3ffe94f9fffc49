//! HTTP routes: a reverse proxy in front of one upstream base URL that adds
//! the route's credential (header, Basic auth or query parameter) to every
//! request of an attested, allowed workload.
//!
//! - [`gate`]: strict HTTP/1.1 framing in front of hyper (smuggling defences).
//! - [`inject`]: building the credential, stripping client copies — pure.
//! - [`upstream`]: TCP + rustls connector for hyper-util's pooled client
//!   (verification always on, X25519MLKEM768 first, ALPN h2/http1.1).
//! - [`proxy`]: one request through the data path, with its 403/502/504s.
//!
//! Per client connection the peer is attributed and attested once (the same
//! [`crate::peer::Attestor`] the PostgreSQL routes use); the first
//! credentialed request of a connection writes a `session.start` audit record
//! before anything is forwarded (fail closed), and the connection's end a
//! `session.end` with its request count.

pub mod gate;
pub mod inject;
pub mod proxy;
pub mod upstream;

use crate::config::{Config, RouteKind};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::service::SecretService;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long warden waits for an upstream's response headers by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything one http route needs at run time.
pub struct HttpRoute {
    pub name: String,
    pub listen: SocketAddr,
    /// `https` or `http`.
    pub scheme: http::uri::Scheme,
    /// Upstream `host[:port]` as written in the URL.
    pub authority: http::uri::Authority,
    /// Path prefix of the upstream URL, without a trailing `/` ("" for none).
    pub base_path: String,
    pub injection: inject::Injection,
    pub secret: String,
    pub env: String,
    pub cache_ttl: Duration,
    pub allow: Vec<String>,
    pub request_timeout: Duration,
    /// Pooled client (ALPN h2 + http/1.1).
    pub client: proxy::Client,
    /// HTTP/1.1-only client for upgrade (WebSocket) requests.
    pub upgrade_client: proxy::Client,
}

impl HttpRoute {
    pub fn from_config(cfg: &Config) -> Result<Vec<HttpRoute>> {
        let mut out = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.kind != RouteKind::Http {
                continue;
            }
            let inject = r.inject.as_ref().ok_or_else(|| {
                Error::usage(format!("route[{i}].inject: an http route needs inject"))
            })?;
            let injection = inject::Injection::from_config(inject)
                .map_err(|e| Error::usage(format!("route[{i}].inject: {e}")))?;
            let uri: http::Uri = r.upstream.trim().parse().map_err(|e| {
                Error::usage(format!(
                    "route[{i}].upstream: {:?} is not a URL: {e}",
                    r.upstream
                ))
            })?;
            let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
            else {
                return Err(Error::usage(format!(
                    "route[{i}].upstream: {:?} needs a scheme and host, e.g. https://api.internal",
                    r.upstream
                )));
            };
            let https = scheme == http::uri::Scheme::HTTPS;
            let ca_label: Arc<str> = r
                .upstream_tls
                .ca_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the system bundle".into())
                .into();
            let (tls, tls_h1) = if https {
                (
                    Some(upstream::client_config(
                        r.upstream_tls.ca_file.as_deref(),
                        &r.name,
                        true,
                    )?),
                    Some(upstream::client_config(
                        r.upstream_tls.ca_file.as_deref(),
                        &r.name,
                        false,
                    )?),
                )
            } else {
                (None, None)
            };
            let rotation = cfg
                .secrets
                .iter()
                .find(|s| s.name == inject.secret)
                .and_then(|s| s.rotation_period);
            let mut cache_ttl = inject.cache_ttl.unwrap_or(crate::pg::DEFAULT_CACHE_TTL);
            if let Some(rot) = rotation {
                cache_ttl = cache_ttl.min(rot);
            }
            let connector = |tls| upstream::Connector {
                tls,
                connect_timeout: r.connect_timeout(),
                ca_label: ca_label.clone(),
            };
            out.push(HttpRoute {
                name: r.name.clone(),
                listen: r.listen,
                scheme,
                authority,
                base_path: uri.path().trim_end_matches('/').to_string(),
                injection,
                secret: inject.secret.clone(),
                env: cfg.environment.clone(),
                cache_ttl,
                allow: r.allow.clone(),
                request_timeout: r.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
                client: proxy::client(connector(tls), false),
                upgrade_client: proxy::client(connector(tls_h1), true),
            });
        }
        Ok(out)
    }
}

/// State shared by every http route.
pub struct HttpShared {
    pub service: Arc<Mutex<SecretService>>,
    pub attestor: crate::peer::Attestor,
    pub credentials: crate::pg::CredentialCache,
    pub metrics: Metrics,
}

impl HttpShared {
    pub fn new(cfg: &Config, service: Arc<Mutex<SecretService>>, metrics: Metrics) -> HttpShared {
        HttpShared {
            service,
            attestor: crate::peer::Attestor::from_config(cfg),
            credentials: crate::pg::CredentialCache::default(),
            metrics,
        }
    }
}

/// Binds every http route's listener (so a busy port fails the start).
pub async fn bind_routes(
    routes: Vec<HttpRoute>,
) -> Result<Vec<(Arc<HttpRoute>, tokio::net::TcpListener)>> {
    let mut out = Vec::new();
    for r in routes {
        let tcp = tokio::net::TcpListener::bind(r.listen).await.map_err(|e| {
            Error::usage(format!(
                "route {:?}: cannot listen on {}: {e}; fix: choose a free address in route.listen",
                r.name, r.listen
            ))
        })?;
        out.push((Arc::new(r), tcp));
    }
    Ok(out)
}

/// Accepts client connections on one route until the task is dropped.
pub async fn serve_route(
    route: Arc<HttpRoute>,
    tcp: tokio::net::TcpListener,
    shared: Arc<HttpShared>,
) {
    loop {
        match tcp.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let local = stream.local_addr().unwrap_or(route.listen);
                tokio::spawn(proxy::serve_connection(
                    stream,
                    local,
                    peer,
                    route.clone(),
                    shared.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(route = %route.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
