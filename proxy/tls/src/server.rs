//! tls routes in server mode: terminate mutual TLS from remote workloads,
//! authorize the caller by the SPIFFE ID of its client certificate, forward
//! plain TCP to a local service.
//!
//! The listener presents a server certificate from warden's CA (names from
//! `server_names`, default `localhost` and the listen address; replaced at
//! half-life like every certificate warden issues). A client certificate is
//! required and must chain to warden's trust bundle (the CA warden issues
//! SVIDs with, including a CA kept for rotation); its URI SAN must be one of
//! the route's `allow` entries. The handshake must finish within the route's
//! `connect_timeout`. A refused caller gets a TLS alert or a closed
//! connection; the reason goes to the log, the audit record (for callers that
//! presented a valid certificate) and `warden_sessions_total{result}`.

use super::{target, uri_sans, TlsRoute, TlsShared};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warden_core::audit::{Actor, ActorKind, Decision, Event};

/// The names a server-mode listener's certificate carries.
pub struct ServerSide {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl ServerSide {
    pub fn new(names: &[String], listen: SocketAddr) -> ServerSide {
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        for n in names {
            match n.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(n.clone()),
            }
        }
        if names.is_empty() {
            dns.push("localhost".into());
            if !listen.ip().is_unspecified() {
                ips.push(listen.ip());
            }
        }
        ServerSide { dns, ips }
    }
}

/// Listener configurations by route, tagged with (certificate serial, bundle).
#[derive(Default)]
pub struct ServerConfigs(Mutex<HashMap<String, (String, Arc<ServerConfig>)>>);

/// The listener configuration for `route` (blocking: may issue a certificate).
fn server_config(route: &TlsRoute, shared: &TlsShared) -> Result<Arc<ServerConfig>, String> {
    let side = route.server.as_ref().ok_or("not a server-mode route")?;
    let (cert, bundle) = {
        let mut guard = shared
            .identity
            .authority
            .lock()
            .map_err(|_| "identity state poisoned".to_string())?;
        let a = guard
            .as_mut()
            .ok_or("warden is sealed or still loading its CA; the listener has no certificate")?;
        let cert = a
            .server_cert(
                &format!("tls-route/{}", route.name),
                &side.dns,
                &side.ips,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(|e| e.message)?;
        (cert, a.bundle_der())
    };
    let tag = format!(
        "{}/{}",
        cert.serial_hex,
        bundle
            .iter()
            .map(|b| warden_core::crypto::sha256_hex(b))
            .collect::<Vec<_>>()
            .join(",")
    );
    if let Ok(map) = shared.server_configs.0.lock() {
        if let Some((t, c)) = map.get(&route.name) {
            if *t == tag {
                return Ok(c.clone());
            }
        }
    }
    let mut roots = RootCertStore::empty();
    for der in &bundle {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    let provider = warden_core::connect::pq_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let (chain, key) = super::rustls_identity(&cert.cert_chain_der, &cert.key_pkcs8);
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("listener certificate: {e}"))?;
    let config = Arc::new(config);
    if let Ok(mut map) = shared.server_configs.0.lock() {
        map.insert(route.name.clone(), (tag, config.clone()));
    }
    Ok(config)
}

/// A remote caller, as the audit log names it.
fn remote_actor(spiffe_id: &str) -> Actor {
    Actor {
        kind: ActorKind::Workload,
        uid: None,
        user: None,
        pid: None,
        exe: None,
        workload: Some(spiffe_id.to_string()),
    }
}

async fn record(shared: &Arc<TlsShared>, event: Event) -> bool {
    shared.admission.audit().record(event).await
}

/// One remote connection of a server-mode route.
pub async fn session(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    route: Arc<TlsRoute>,
    shared: Arc<TlsShared>,
) {
    let started = Instant::now();
    let refuse = |result: &str, message: &str| {
        tracing::warn!(route = %route.name, %peer, "connection refused: {message}");
        shared.metrics.session(&route.name, "", result);
    };
    let handshake_by = tokio::time::Instant::now() + route.connect_timeout;
    let timed_out = || {
        format!(
            "TLS handshake from {peer} did not finish within {} ms (connect_timeout)",
            route.connect_timeout.as_millis()
        )
    };
    // Near the descriptor limit, a client that has not sent its ClientHello
    // may be closed to make room for a new one (nothing can be said before
    // a handshake, as for a shed connection).
    match warden_core::listen::first_bytes(&stream, Some(route.connect_timeout)).await {
        warden_core::listen::FirstBytes::Ready => {}
        warden_core::listen::FirstBytes::Evicted => {
            return warden_core::listen::note_evicted(&route.name, &shared.metrics);
        }
        warden_core::listen::FirstBytes::Silent => return refuse("tls_error", &timed_out()),
    }
    let config = {
        let (r, s) = (route.clone(), shared.clone());
        tokio::task::spawn_blocking(move || server_config(&r, &s))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    };
    let config = match config {
        Ok(c) => c,
        Err(m) => {
            return refuse(
                "identity_error",
                &format!("warden: route {:?}: {m}", route.name),
            )
        }
    };
    let accepted = tokio::time::timeout_at(
        handshake_by,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let mut tls = match accepted {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return refuse(
                "tls_error",
                &format!("TLS handshake from {peer} failed: {e} (a client certificate from warden's CA is required)"),
            )
        }
        Err(_) => return refuse("tls_error", &timed_out()),
    };
    // On a fleet: a leaf under a removed node's intermediate is refused even
    // though it chains to the bundle.
    let revoked = {
        let above_leaf: Vec<Vec<u8>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().skip(1).map(|d| d.as_ref().to_vec()).collect())
            .unwrap_or_default();
        shared
            .identity
            .authority
            .lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(|a| a.revoked_in_chain(&above_leaf)))
    };
    if let Some(serial) = revoked {
        let message = format!(
            "warden: {peer} presented a certificate issued by intermediate CA {serial}, revoked when its node was removed from the fleet (route {:?})",
            route.name
        );
        refuse("denied", &message);
        let _ = record(
            &shared,
            Event {
                actor: remote_actor(""),
                action: "session.deny".into(),
                target: target(&route, format!("mtls from {peer}")),
                decision: Decision::Deny,
                reason: message,
            },
        )
        .await;
        return;
    }
    let sans = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| uri_sans(c))
        .unwrap_or_default();
    let caller = sans.iter().find(|s| s.starts_with("spiffe://")).cloned();
    let Some(id) = caller.filter(|id| route.allow.contains(id)) else {
        let who = if sans.is_empty() {
            "a certificate without a SPIFFE ID".to_string()
        } else {
            sans.join(", ")
        };
        let message = format!(
            "warden: {peer} presented {who}, which may not use route {:?} (allowed: {})",
            route.name,
            route.allow.join(", ")
        );
        refuse("denied", &message);
        let actor = remote_actor(sans.first().map_or("", String::as_str));
        let _ = record(
            &shared,
            Event {
                actor,
                action: "session.deny".into(),
                target: target(&route, format!("mtls from {peer}")),
                decision: Decision::Deny,
                reason: message,
            },
        )
        .await;
        return;
    };
    let connect_started = Instant::now();
    let upstream = tokio::time::timeout(
        route.connect_timeout,
        tokio::net::TcpStream::connect((route.host.as_str(), route.port)),
    )
    .await;
    let mut upstream = match upstream {
        Ok(Ok(u)) => u,
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => format!(
                    "no answer within {} ms (connect_timeout)",
                    route.connect_timeout.as_millis()
                ),
            };
            let message = format!(
                "warden: route {:?}: cannot connect to {}:{}: {why}",
                route.name, route.host, route.port
            );
            tracing::warn!(route = %route.name, "upstream failed: {message}");
            shared.metrics.session(&route.name, &id, "upstream_error");
            let _ = record(
                &shared,
                Event {
                    actor: remote_actor(&id),
                    action: "session.error".into(),
                    target: target(&route, format!("mtls from {peer}")),
                    decision: Decision::Error,
                    reason: message,
                },
            )
            .await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    shared
        .metrics
        .upstream_latency(&route.name, connect_started.elapsed(), Duration::ZERO);
    let detail = format!("mtls from {peer} as {id} to {}:{}", route.host, route.port);
    let recorded = record(
        &shared,
        Event {
            actor: remote_actor(&id),
            action: "session.start".into(),
            target: target(&route, detail.clone()),
            decision: Decision::Allow,
            reason: "client certificate verified, SPIFFE ID allowed".into(),
        },
    )
    .await;
    if !recorded {
        tracing::warn!(route = %route.name, "session refused: the audit record could not be written");
        shared.metrics.session(&route.name, &id, "audit_error");
        return;
    }
    shared.metrics.session(&route.name, &id, "allowed");
    super::relay_and_end(
        &mut tls,
        &mut upstream,
        (&route, &shared),
        remote_actor(&id),
        &detail,
        started,
    )
    .await;
}
