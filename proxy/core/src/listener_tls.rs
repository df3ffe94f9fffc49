//! Client-side TLS of route listeners (`client_tls` on postgres, mysql and
//! redis routes): a rustls server configuration whose certificate, for
//! `localhost` and the listen address, comes from warden's CA and is renewed
//! at half-life. While warden is sealed, handshakes fail.

use crate::error::{Error, Result};
use rustls::pki_types::CertificateDer;
use std::sync::Arc;

/// The server configuration for route `route` listening on `ip`.
pub fn server_config(
    route: &str,
    ip: std::net::IpAddr,
    identity: Arc<crate::authority::IdentityHandle>,
) -> Result<Arc<rustls::ServerConfig>> {
    let resolver = ListenerCertResolver {
        identity,
        key: format!("route/{route}"),
        dns: vec!["localhost".to_string()],
        ips: vec![ip],
        cached: std::sync::Mutex::new(None),
    };
    let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    Ok(Arc::new(config))
}

struct ListenerCertResolver {
    identity: Arc<crate::authority::IdentityHandle>,
    key: String,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    cached: std::sync::Mutex<Option<(String, Arc<rustls::sign::CertifiedKey>)>>,
}

impl std::fmt::Debug for ListenerCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerCertResolver")
            .field("key", &self.key)
            .finish()
    }
}

impl rustls::server::ResolvesServerCert for ListenerCertResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let cert = {
            let mut guard = self.identity.authority.lock().ok()?;
            let authority = guard.as_mut()?;
            authority
                .server_cert(
                    &self.key,
                    &self.dns,
                    &self.ips,
                    time::OffsetDateTime::now_utc(),
                )
                .ok()?
        };
        let mut cached = self.cached.lock().ok()?;
        if let Some((serial, ck)) = cached.as_ref() {
            if *serial == cert.serial_hex {
                return Some(ck.clone());
            }
        }
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pkcs8.to_vec()),
        );
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).ok()?;
        let chain = cert
            .cert_chain_der
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        let ck = Arc::new(rustls::sign::CertifiedKey::new(chain, signer));
        *cached = Some((cert.serial_hex.clone(), ck.clone()));
        Some(ck)
    }
}
