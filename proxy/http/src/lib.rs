//! HTTP routes: a reverse proxy in front of one upstream base URL that adds
//! the route's credential (header, Basic auth or query parameter) to every
//! request of an attested, allowed workload.
//!
//! - [`gate`]: strict HTTP/1.1 framing in front of hyper (smuggling defences).
//! - [`inject`]: building the credential, stripping client copies — pure.
//! - [`upstream`]: TCP + rustls connector for hyper-util's pooled client
//!   (verification always on, X25519MLKEM768 first, ALPN h2/http1.1).
//! - [`proxy`]: one request through the data path, with its 403/502/504s.
//! - [`fast`]: the HTTP/1.1 fast path of reverse-proxy connections; hands a
//!   connection to hyper ([`proxy`]) at the first request it does not take.
//! - [`forward`]: forward-proxy mode (`HTTP_PROXY` clients): absolute-form
//!   requests for a route's host get its credential, `CONNECT` tunnels to
//!   the routes' `tunnel` hosts, 403 for everything else.
//!
//! Per client connection the peer is attributed and attested once (the same
//! [`warden_core::peer::Attestor`] the PostgreSQL routes use); the first
//! credentialed request of a connection writes a `session.start` audit record
//! before anything is forwarded (fail closed), and the connection's end a
//! `session.end` with its request count.

pub mod conn;
pub mod fast;
pub mod forward;
pub mod gate;
pub mod headers;
pub mod inject;
pub mod proxy;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warden_core::config::{Config, RouteKind};
use warden_core::error::{Error, Result};
use warden_core::metrics::Metrics;

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
    /// HTTP/1.1-only connections for the fast path ([`fast`]).
    pub h1: upstream::Connector,
    /// Requests may take the fast path: an `http://` upstream and
    /// `fast_path` not set to false.
    pub fast_path: bool,
    /// Serve as a forward proxy (`HTTP_PROXY`) for the upstream's host.
    pub forward_proxy: bool,
    /// forward_proxy: `CONNECT` targets (lowercased host, port) without injection.
    pub tunnel: Vec<(String, u16)>,
    pub connect_timeout: Duration,
    /// The credential ready to add (refreshed after `cache_ttl`).
    pub prepared: Mutex<Option<Arc<proxy::Prepared>>>,
    /// Per-request metric handles, resolved when the route starts serving.
    pub hot: std::sync::OnceLock<warden_core::metrics::HttpRouteMetrics>,
    /// The fast path's idle upstream connections.
    pub idle: fast::IdleUpstreams,
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
            let mut cache_ttl = inject
                .cache_ttl
                .unwrap_or(warden_core::credentials::DEFAULT_CACHE_TTL);
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
                upgrade_client: proxy::client(connector(tls_h1.clone()), true),
                h1: connector(tls_h1),
                fast_path: !https && r.fast_path.unwrap_or(true),
                forward_proxy: r.forward_proxy,
                tunnel: r
                    .tunnel
                    .iter()
                    .enumerate()
                    .map(|(j, t)| {
                        let a: http::uri::Authority = t.trim().parse().map_err(|e| {
                            Error::usage(format!("route[{i}].tunnel[{j}]: {t:?}: {e}"))
                        })?;
                        let port = a.port_u16().ok_or_else(|| {
                            Error::usage(format!("route[{i}].tunnel[{j}]: {t:?} needs a port"))
                        })?;
                        Ok((a.host().to_ascii_lowercase(), port))
                    })
                    .collect::<Result<Vec<_>>>()?,
                connect_timeout: r.connect_timeout(),
                prepared: Mutex::new(None),
                hot: std::sync::OnceLock::new(),
                idle: fast::IdleUpstreams::default(),
            });
        }
        Ok(out)
    }
}

/// State shared by every http route.
pub struct HttpShared {
    /// attest → policy → credential → session records (every front end's).
    pub admission: Arc<warden_core::admission::Admission>,
    pub metrics: Metrics,
}

impl HttpShared {
    pub fn new(admission: Arc<warden_core::admission::Admission>, metrics: Metrics) -> HttpShared {
        HttpShared { admission, metrics }
    }
}

/// A bound listener: one reverse-proxy route, or the forward-proxy routes
/// that share an address.
pub enum Listener {
    Reverse(Arc<HttpRoute>, tokio::net::TcpListener),
    Forward(Vec<Arc<HttpRoute>>, tokio::net::TcpListener),
}

impl Listener {
    pub fn describe(&self) -> (String, SocketAddr) {
        match self {
            Listener::Reverse(r, _) => (r.name.clone(), r.listen),
            Listener::Forward(rs, _) => (
                rs.iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                rs.first()
                    .map(|r| r.listen)
                    .unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
            ),
        }
    }
}

/// Binds every http route's listener (so a busy port fails the start).
pub async fn bind_routes(routes: Vec<HttpRoute>) -> Result<Vec<Listener>> {
    let bind = |name: String, addr: SocketAddr| async move {
        warden_core::listen::bind_route(&name, addr).await
    };
    let mut out = Vec::new();
    let mut forward: Vec<(SocketAddr, Vec<Arc<HttpRoute>>)> = Vec::new();
    for r in routes {
        if r.forward_proxy {
            match forward.iter_mut().find(|(a, _)| *a == r.listen) {
                Some((_, v)) => v.push(Arc::new(r)),
                None => forward.push((r.listen, vec![Arc::new(r)])),
            }
        } else {
            let tcp = bind(r.name.clone(), r.listen).await?;
            out.push(Listener::Reverse(Arc::new(r), tcp));
        }
    }
    for (addr, routes) in forward {
        let tcp = bind(routes[0].name.clone(), addr).await?;
        out.push(Listener::Forward(routes, tcp));
    }
    Ok(out)
}

/// The 503 a connection turned away near the descriptor limit gets (shed,
/// or evicted while silent), then closed.
fn overloaded_response(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Stops a background task when its owner ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts client connections on one listener until the task is dropped.
pub async fn serve(listener: Listener, shared: Arc<HttpShared>) {
    let (label, listen) = listener.describe();
    let (tcp, reverse, forward) = match listener {
        Listener::Reverse(r, t) => (t, Some(r), Vec::new()),
        Listener::Forward(rs, t) => (t, None, rs),
    };
    for r in reverse.iter().chain(forward.iter()) {
        let _ = r.hot.set(shared.metrics.http_route(&r.name));
    }
    let forward = Arc::new(forward);
    // The fast path's idle upstream connections are closed in time.
    let _reaper = reverse.as_ref().filter(|r| r.fast_path).map(|r| {
        let r = r.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                r.idle.reap();
            }
        }))
    });
    let shed = warden_core::listen::Shed {
        refusal: overloaded_response(&warden_core::listen::overload_message()),
        metrics: Some(shared.metrics.clone()),
    };
    loop {
        match tcp.accept().await {
            Ok((stream, peer)) => {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                if warden_core::listen::shed_if_overloaded(
                    &label,
                    fd,
                    |b| drop(stream.try_write(b)),
                    &shed,
                ) {
                    continue;
                }
                // TCP_NODELAY comes from the listener (`bind_route`).
                let local = warden_core::listen::local_addr_of(&stream, listen);
                match &reverse {
                    Some(route) => {
                        tokio::spawn(conn::serve_connection(
                            stream,
                            local,
                            peer,
                            route.clone(),
                            shared.clone(),
                        ));
                    }
                    None => {
                        tokio::spawn(conn::serve_forward_connection(
                            stream,
                            local,
                            peer,
                            forward.clone(),
                            shared.clone(),
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(route = %label, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(upstream: &str, extra: &str) -> Vec<HttpRoute> {
        let text = format!(
            r#"
trust_domain = "example.org"
[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = 1000 }}
[[route]]
name = "api"
kind = "http"
listen = "127.0.0.1:18080"
upstream = "{upstream}"
inject = {{ header = "X-Api-Key", secret = "api/token" }}
allow = ["me"]
{extra}
"#
        );
        let cfg = warden_core::config::parse_str(&text, std::path::Path::new("test.toml"))
            .unwrap_or_else(|r| panic!("{r:?}"));
        HttpRoute::from_config(&cfg).unwrap()
    }

    #[test]
    fn the_fast_path_is_for_plain_upstreams_unless_switched_off() {
        assert!(routes("http://127.0.0.1:9000/base", "")[0].fast_path);
        assert!(!routes("http://127.0.0.1:9000", "fast_path = false")[0].fast_path);
        assert!(!routes("https://api.example.org", "")[0].fast_path);
        assert!(!routes("https://api.example.org", "fast_path = true")[0].fast_path);
    }
}
