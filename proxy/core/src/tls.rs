//! TLS towards the upstream database (rustls, aws-lc-rs provider).
//!
//! Modes, as in libpq: `disable` (plaintext), `require` (encrypted, the
//! server's certificate is NOT checked — `config check` warns), `verify-ca`
//! (chain checked against the CA, host name not), `verify-full` (chain and host
//! name; the default). The CA comes from `upstream_tls.ca_file`, else the
//! system bundle.

use crate::config::TlsMode;
use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// rustls with the aws-lc-rs provider and its default key exchange groups.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn load_roots(ca_file: Option<&Path>, route: &str) -> Result<RootCertStore> {
    let path = ca_file.unwrap_or(Path::new(SYSTEM_BUNDLE));
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
        Error::usage(format!(
            "route {route:?}: cannot read upstream_tls.ca_file {}: {e}",
            path.display()
        ))
    })?;
    for c in certs {
        let c = c.map_err(|e| {
            Error::usage(format!(
                "route {route:?}: bad PEM in {}: {e}",
                path.display()
            ))
        })?;
        roots.add(c).map_err(|e| {
            Error::usage(format!(
                "route {route:?}: unusable CA in {}: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::usage(format!(
            "route {route:?}: {} holds no CA certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// The rustls client configuration for a route, or None for `disable`.
pub fn client_config(
    mode: TlsMode,
    ca_file: Option<&Path>,
    route: &str,
) -> Result<Option<Arc<ClientConfig>>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?;
    let config = match mode {
        TlsMode::Disable => return Ok(None),
        TlsMode::VerifyFull => builder
            .with_root_certificates(load_roots(ca_file, route)?)
            .with_no_client_auth(),
        TlsMode::VerifyCa => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(ca_file, route)?),
                provider(),
            )
            .build()
            .map_err(|e| Error::usage(format!("route {route:?}: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainVerifier::new(inner, None)))
                .with_no_client_auth()
        }
        TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// The name presented in SNI and checked in `verify-full`.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        Error::usage(format!(
            "upstream host {host:?} is not a valid TLS server name: {e}"
        ))
    })
}

/// An extra check of the end-entity certificate, after its chain verified.
pub type EndEntityCheck =
    Box<dyn Fn(&CertificateDer<'_>) -> std::result::Result<(), rustls::Error> + Send + Sync>;

/// An extra check of the intermediates a peer presented, after its chain
/// verified (a fleet's revoked node intermediates).
pub type IntermediatesCheck =
    Box<dyn Fn(&[CertificateDer<'_>]) -> std::result::Result<(), rustls::Error> + Send + Sync>;

/// The chain must verify; a host-name mismatch is tolerated; then `check`
/// (if any) must accept the end entity and `above` (if any) the
/// intermediates. `verify-ca` (no check) and the tls routes' verification by
/// SPIFFE ID (a URI SAN check) are both this.
pub struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check: Option<EndEntityCheck>,
    above: Option<IntermediatesCheck>,
}

impl ChainVerifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>, check: Option<EndEntityCheck>) -> ChainVerifier {
        ChainVerifier {
            inner,
            check,
            above: None,
        }
    }

    /// Adds a check of the presented intermediates.
    pub fn with_intermediates_check(mut self, above: IntermediatesCheck) -> ChainVerifier {
        self.above = Some(above);
        self
    }
}

impl std::fmt::Debug for ChainVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainVerifier")
            .field("check", &self.check.is_some())
            .finish()
    }
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        if let Some(check) = &self.check {
            check(end_entity)?;
        }
        if let Some(above) = &self.above {
            above(intermediates)?;
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `require`: encryption without authentication of the server (libpq's
/// meaning). Handshake signatures are still checked against the presented key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// RFC 5929 `tls-server-end-point` binding data: the hash of the server's
/// certificate with its signature's hash (SHA-256 for MD5/SHA-1/SHA-256).
pub fn server_end_point(cert_der: &[u8]) -> Vec<u8> {
    use aws_lc_rs::digest;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let alg = X509Certificate::from_der(cert_der)
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string())
        .unwrap_or_default();
    let algorithm = match alg.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &digest::SHA512,
        _ => &digest::SHA256,
    };
    digest::digest(algorithm, cert_der).as_ref().to_vec()
}
