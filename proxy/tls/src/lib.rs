//! TLS origination routes (`kind = "tls"`): a plain TCP client connects
//! locally; warden attests it, checks the allow list, and opens a mutual TLS
//! connection to the upstream presenting *that workload's* X.509-SVID (issued
//! on demand by the authority, replaced when it rotates). The upstream is
//! verified by DNS name (against `upstream_tls.ca_file` or the system bundle)
//! or, with `upstream_tls.spiffe_id`, by SPIFFE ID (chain against warden's
//! trust bundle plus `ca_file`, then the URI SAN must equal the ID). Bytes are
//! then relayed both ways; start, end and refusals are audited and counted.
//!
//! A plain TCP client cannot be told why it was refused: the connection is
//! closed, and the reason goes to the log, the audit record and
//! `warden_sessions_total{result}`.
//!
//! `mode = "server"` is the reverse (module [`server`]): remote workloads
//! connect with mutual TLS, warden verifies their certificate against its
//! trust bundle, authorizes the SPIFFE ID in its URI SAN against `allow`,
//! and forwards plain TCP to a local service.

mod server;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warden_core::admission::{Admission, Denial, Peer, RoutePolicy};
use warden_core::audit::{Decision, Event, Target};
use warden_core::authority::IdentityHandle;
use warden_core::config::{Config, RouteKind};
use warden_core::error::{Error, Result};
use warden_core::metrics::AttestVia;
use warden_core::metrics::Metrics;
use warden_core::peer::{actor, Attested};

/// Everything one tls route needs at run time.
pub struct TlsRoute {
    pub name: String,
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
    /// Verify the upstream by this SPIFFE ID instead of its DNS name.
    pub spiffe_id: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Roots from `ca_file` (or the system bundle when no `spiffe_id`).
    pub roots: Option<Arc<RootCertStore>>,
    pub allow: Vec<String>,
    pub connect_timeout: Duration,
    /// Server mode: the names in the listener's certificate.
    pub server: Option<server::ServerSide>,
}

impl TlsRoute {
    pub fn from_config(cfg: &Config) -> Result<Vec<TlsRoute>> {
        let mut out = Vec::new();
        for (i, r) in cfg.routes.iter().enumerate() {
            if r.kind != RouteKind::Tls {
                continue;
            }
            let (host, port) = r
                .upstream_host_port()
                .map_err(|e| Error::usage(format!("route[{i}].upstream: {e}")))?;
            let server = (r.mode == warden_core::config::TlsRouteMode::Server)
                .then(|| server::ServerSide::new(&r.server_names, r.listen));
            let spiffe_id = r.upstream_tls.spiffe_id.clone();
            let roots = match (&spiffe_id, &r.upstream_tls.ca_file) {
                _ if server.is_some() => None,
                (Some(_), None) => None,
                (_, ca) => Some(Arc::new(warden_core::tls::load_roots(
                    ca.as_deref(),
                    &r.name,
                )?)),
            };
            warden_core::tls::server_name(&host)?;
            out.push(TlsRoute {
                name: r.name.clone(),
                listen: r.listen,
                host,
                port,
                spiffe_id,
                ca_file: r.upstream_tls.ca_file.clone(),
                roots,
                allow: r.allow.clone(),
                connect_timeout: r.connect_timeout(),
                server,
            });
        }
        Ok(out)
    }

    fn ca_label(&self) -> String {
        match (&self.spiffe_id, &self.ca_file) {
            (Some(_), Some(f)) => format!("warden's trust bundle and {}", f.display()),
            (Some(_), None) => "warden's trust bundle".into(),
            (None, Some(f)) => f.display().to_string(),
            (None, None) => "the system bundle".into(),
        }
    }
}

/// A leaf's certificate chain and PKCS#8 key as rustls takes them (the
/// client mode's SVID and the server mode's certificate alike).
fn rustls_identity(
    chain_der: &[Vec<u8>],
    key_pkcs8: &[u8],
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    (chain, key)
}

/// A client configuration and the (SVID serial, bundle) tag it was built from.
type TaggedConfig = (String, Arc<ClientConfig>);

/// State shared by every tls route.
pub struct TlsShared {
    /// attest → policy → session records (every front end's).
    pub admission: Arc<Admission>,
    pub identity: Arc<IdentityHandle>,
    pub metrics: Metrics,
    /// Client configurations by (route, workload), with the SVID serial and
    /// bundle they were built from.
    configs: Mutex<HashMap<(String, String), TaggedConfig>>,
    /// Server-mode listener configurations by route, with their tag.
    server_configs: server::ServerConfigs,
}

impl TlsShared {
    pub fn new(
        admission: Arc<Admission>,
        identity: Arc<IdentityHandle>,
        metrics: Metrics,
    ) -> TlsShared {
        TlsShared {
            admission,
            identity,
            metrics,
            configs: Mutex::new(HashMap::new()),
            server_configs: server::ServerConfigs::default(),
        }
    }

    /// The client configuration presenting `who`'s current SVID (blocking:
    /// may issue one). Errors are log/audit messages.
    fn client_config(
        &self,
        route: &TlsRoute,
        who: &Attested,
    ) -> std::result::Result<(Arc<ClientConfig>, String), String> {
        let (svid, fresh, bundle, revoked) = {
            let mut guard = self
                .identity
                .authority
                .lock()
                .map_err(|_| "identity state poisoned".to_string())?;
            let a = guard
                .as_mut()
                .ok_or("warden is sealed or still loading its CA; no SVID can be presented")?;
            let (svid, fresh) = a
                .svid_for(
                    &who.workload,
                    &who.spiffe_id,
                    time::OffsetDateTime::now_utc(),
                )
                .map_err(|e| e.message)?;
            (
                svid,
                fresh,
                a.bundle_der(),
                a.revoked_intermediates().to_vec(),
            )
        };
        if fresh {
            self.identity.wake.notify_one();
            self.metrics.svid_issued();
            self.admission.audit().record_blocking(Event {
                actor: actor(Some(who)),
                action: "svid.issue".into(),
                target: Target {
                    route: Some(route.name.clone()),
                    detail: Some(format!("{} serial {}", who.spiffe_id, svid.serial_hex)),
                    ..Target::default()
                },
                decision: Decision::Allow,
                reason: "X.509-SVID issued for a tls route".into(),
            });
        }
        let bundle_tag: String = bundle
            .iter()
            .map(|b| warden_core::crypto::sha256_hex(b))
            .collect::<Vec<_>>()
            .join(",");
        // A new revocation makes a new configuration.
        let tag = format!("{}/{bundle_tag}/{}", svid.serial_hex, revoked.join(","));
        let key = (route.name.clone(), who.workload.clone());
        if let Ok(map) = self.configs.lock() {
            if let Some((t, c)) = map.get(&key) {
                if *t == tag {
                    return Ok((c.clone(), svid.serial_hex.clone()));
                }
            }
        }
        let provider = warden_core::connect::pq_provider();
        let verifier: Arc<dyn ServerCertVerifier> = match &route.spiffe_id {
            Some(id) => {
                let mut roots = RootCertStore::empty();
                for der in &bundle {
                    roots
                        .add(CertificateDer::from(der.clone()))
                        .map_err(|e| format!("trust bundle: {e}"))?;
                }
                if let Some(extra) = &route.roots {
                    roots.extend(extra.roots.iter().cloned());
                }
                let inner =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| e.to_string())?;
                let expected = id.clone();
                Arc::new(
                    warden_core::tls::ChainVerifier::new(
                        inner,
                        Some(Box::new(move |end_entity: &CertificateDer<'_>| {
                            spiffe_id_check(end_entity, &expected)
                        })),
                    )
                    // On a fleet: not an SVID under a removed node's intermediate.
                    .with_intermediates_check(Box::new(
                        move |above: &[CertificateDer<'_>]| match warden_core::authority::revoked_in(above, &revoked) {
                            Some(serial) => Err(rustls::Error::General(format!(
                                "the upstream's certificate was issued by intermediate CA {serial}, revoked when its node was removed from the fleet"
                            ))),
                            None => Ok(()),
                        },
                    )),
                )
            }
            None => {
                let roots = route.roots.clone().ok_or("no roots")?;
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?
            }
        };
        let (chain, key_der) = rustls_identity(&svid.cert_chain_der, &svid.key_pkcs8);
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| format!("the SVID cannot be used as a TLS client certificate: {e}"))?;
        let config = Arc::new(config);
        if let Ok(mut map) = self.configs.lock() {
            map.insert(key, (tag, config.clone()));
        }
        Ok((config, svid.serial_hex.clone()))
    }
}

/// The URI SANs of a DER certificate.
pub(crate) fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID check of verification by ID: `expected` among the URI SANs.
fn spiffe_id_check(end_entity: &[u8], expected: &str) -> std::result::Result<(), rustls::Error> {
    let sans = uri_sans(end_entity);
    if sans.iter().any(|s| s == expected) {
        return Ok(());
    }
    Err(rustls::Error::General(format!(
        "the upstream's certificate is {}, not the expected SPIFFE ID {expected}",
        if sans.is_empty() {
            "without a URI SAN".to_string()
        } else {
            sans.join(", ")
        }
    )))
}

/// Binds every tls route's listener.
pub async fn bind_routes(
    routes: Vec<TlsRoute>,
) -> Result<Vec<(Arc<TlsRoute>, tokio::net::TcpListener)>> {
    let mut out = Vec::new();
    for r in routes {
        let tcp = warden_core::listen::bind_route(&r.name, r.listen).await?;
        out.push((Arc::new(r), tcp));
    }
    Ok(out)
}

/// Accepts connections on one route until the task is dropped.
pub async fn serve_route(
    route: Arc<TlsRoute>,
    tcp: tokio::net::TcpListener,
    shared: Arc<TlsShared>,
) {
    let name = route.name.clone();
    // Nothing can be said before a TLS handshake: a shed connection is closed.
    let shed = warden_core::listen::Shed {
        refusal: Vec::new(),
        metrics: Some(shared.metrics.clone()),
    };
    warden_core::listen::accept_loop_shedding(
        &name,
        route.listen,
        &tcp,
        &shed,
        |stream, local, peer| {
            if route.server.is_some() {
                tokio::spawn(server::session(stream, peer, route.clone(), shared.clone()));
            } else {
                tokio::spawn(session(stream, local, peer, route.clone(), shared.clone()));
            }
        },
    )
    .await;
}

fn target(route: &TlsRoute, detail: String) -> Target {
    Target {
        route: Some(route.name.clone()),
        detail: Some(detail),
        ..Target::default()
    }
}

async fn session(
    mut client: tokio::net::TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    route: Arc<TlsRoute>,
    shared: Arc<TlsShared>,
) {
    let started = Instant::now();
    // attest → frozen? → allow list (the admission step), then the
    // caller's SVID (blocking: may issue one).
    let admission = &shared.admission;
    let attestation = admission
        .attest(Peer::Tcp { local, peer }, AttestVia::Tls)
        .await;
    let policy = RoutePolicy {
        name: &route.name,
        allow: &route.allow,
    };
    let prepared = match admission.authorize(&attestation, &policy) {
        Err(d) => Err(d),
        Ok(who) => {
            let (s2, r2, w2) = (shared.clone(), route.clone(), who.clone());
            tokio::task::spawn_blocking(move || s2.client_config(&r2, &w2))
                .await
                .unwrap_or_else(|e| Err(format!("SVID task failed: {e}")))
                .map(|(config, serial)| (who.clone(), config, serial))
                .map_err(|reason| Denial::Identity {
                    route: route.name.clone(),
                    reason,
                })
        }
    };
    let (who, config, serial) = match prepared {
        Ok(p) => p,
        Err(d) => {
            // A plain TCP client cannot be told why: the connection closes.
            admission
                .refuse(&route.name, &attestation, &d, "tls".into())
                .await;
            return;
        }
    };
    let connect_started = Instant::now();
    let upstream = warden_core::connect::open(
        &route.host,
        route.port,
        Some(&config),
        route.connect_timeout,
        &route.ca_label(),
    )
    .await;
    let mut upstream = match upstream {
        Ok((s, _)) => s,
        Err(e) => {
            let message = format!("warden: route {:?}: {e}", route.name);
            tracing::warn!(route = %route.name, "upstream failed: {message}");
            shared
                .metrics
                .session(&route.name, &who.workload, "upstream_error");
            let event = Event {
                actor: actor(Some(&who)),
                action: "session.error".into(),
                target: target(&route, format!("tls as {}", who.spiffe_id)),
                decision: Decision::Error,
                reason: message,
            };
            let _ = shared.admission.audit().record(event).await;
            return;
        }
    };
    shared
        .metrics
        .upstream_latency(&route.name, connect_started.elapsed(), Duration::ZERO);
    let detail = format!(
        "tls to {}:{} as {} (SVID serial {serial})",
        route.host, route.port, who.spiffe_id
    );
    let started_ok = shared
        .admission
        .record_start(
            &who,
            &route.name,
            &route.name,
            target(&route, detail.clone()),
            "workload SVID presented",
            true,
        )
        .await;
    if let Err(d) = started_ok {
        tracing::warn!(route = %route.name, "session refused: {d}");
        shared
            .metrics
            .session(&route.name, &who.workload, d.result());
        return;
    }
    relay_and_end(
        &mut client,
        &mut upstream,
        (&route, &shared),
        actor(Some(&who)),
        &detail,
        started,
    )
    .await;
}

/// Relays both ways until either side closes, then counts the session's
/// bytes and duration and writes its `session.end` record.
async fn relay_and_end<A, B>(
    a: &mut A,
    b: &mut B,
    (route, shared): (&TlsRoute, &Arc<TlsShared>),
    who: warden_core::audit::Actor,
    detail: &str,
    started: Instant,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (up, down, how) = match tokio::io::copy_bidirectional(a, b).await {
        Ok((u, d)) => (u, d, "closed"),
        Err(_) => (0, 0, "connection error"),
    };
    shared
        .metrics
        .session_end(&route.name, started.elapsed(), up, down);
    let event = Event {
        actor: who,
        action: "session.end".into(),
        target: target(
            route,
            format!(
                "{detail}, {up} bytes up, {down} bytes down, {} ms, {how}",
                started.elapsed().as_millis()
            ),
        ),
        decision: Decision::Allow,
        reason: "session ended".into(),
    };
    // Nobody waits for a session's end: it may share a later commit.
    let _ = shared.admission.audit().record_unhurried(event).await;
}
