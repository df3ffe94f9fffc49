//! Opening an upstream connection: TCP, then rustls (verification always
//! on, X25519MLKEM768 preferred), with a typed [`ConnectError`] that says
//! exactly what went wrong — shared by every front end that connects out
//! (http routes, tls routes, the rotation webhook).

use crate::pgwire::upstream::UpstreamStream as Stream;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// rustls with aws-lc-rs, key exchange groups ordered so the post-quantum
/// hybrid X25519MLKEM768 is offered first.
pub fn pq_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    let mut p = aws_lc_rs::default_provider();
    p.kx_groups = vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ];
    Arc::new(p)
}

/// The verified client configuration for an http route's upstream.
pub fn client_config(
    ca_file: Option<&std::path::Path>,
    route: &str,
    alpn_h2: bool,
) -> crate::error::Result<Arc<ClientConfig>> {
    let roots = crate::tls::load_roots(ca_file, route)?;
    let mut config = ClientConfig::builder_with_provider(pq_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::error::Error::internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = if alpn_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// Why an upstream connection could not be opened.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// TCP connect or TLS handshake did not finish in time.
    Timeout(String),
    /// The certificate failed verification.
    Certificate(String),
    /// Any other failure (refused, unreachable, TLS alert...).
    Failed(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout(m) | ConnectError::Certificate(m) | ConnectError::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Finds a [`ConnectError`] in an error's source chain.
pub fn find_connect_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectError> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        cur = err.source();
    }
    None
}

/// A human explanation of a certificate failure.
pub fn explain_tls_error(e: &rustls::Error, host: &str, ca: &str) -> (bool, String) {
    use rustls::CertificateError as C;
    let cert = |why: String| {
        (
            true,
            format!("the certificate presented by {host} {why} (trusted CAs: {ca})"),
        )
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => cert("is not signed by a trusted CA".into()),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                cert(format!("is not valid for the name {host:?}"))
            }
            C::Expired | C::ExpiredContext { .. } => cert("has expired".into()),
            C::NotValidYet | C::NotValidYetContext { .. } => cert("is not valid yet".into()),
            C::Revoked => cert("is revoked".into()),
            C::BadSignature => cert(
                "is not signed by a trusted CA (a trusted CA has its issuer's name, but a different key)".into(),
            ),
            other => cert(format!("failed verification ({other:?})")),
        },
        other => (false, format!("TLS handshake with {host} failed: {other}")),
    }
}

/// Opens one connection (also used for CONNECT-less plain forwarding).
pub async fn open(
    host: &str,
    port: u16,
    tls: Option<&Arc<ClientConfig>>,
    connect_timeout: Duration,
    ca_label: &str,
) -> Result<(Stream, bool), ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let fut = async {
        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|e| ConnectError::Failed(format!("cannot connect to {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let Some(config) = tls else {
            return Ok((Stream::Plain(tcp), false));
        };
        let name = ServerName::try_from(bare.to_string()).map_err(|e| {
            ConnectError::Failed(format!("{host} is not a valid TLS server name: {e}"))
        })?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let inner = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .cloned();
                match inner {
                    Some(re) => {
                        let (is_cert, msg) = explain_tls_error(&re, host, ca_label);
                        if is_cert {
                            ConnectError::Certificate(msg)
                        } else {
                            ConnectError::Failed(msg)
                        }
                    }
                    None => ConnectError::Failed(format!(
                        "TLS handshake with {host}:{port} failed: {e}"
                    )),
                }
            })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok((Stream::Tls(Box::new(tls)), h2))
    };
    match tokio::time::timeout(connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(format!(
            "no connection to {host}:{port} within {} ms (connect_timeout)",
            connect_timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::NamedGroup;
    use warden_identity::ca::{certs_to_pem, CertificateAuthority};

    /// A TLS server on loopback offering `groups`; returns the port and the
    /// group each handshake negotiated.
    async fn server(
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
        dir: &std::path::Path,
    ) -> (u16, tokio::sync::oneshot::Receiver<Option<NamedGroup>>) {
        let td = warden_identity::TrustDomain::parse("example.org").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (ca, material) =
            CertificateAuthority::create_root(&td, Duration::from_secs(3600), now).unwrap();
        let leaf = ca
            .issue_tls_server(&["localhost".into()], &[], Duration::from_secs(600), now)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), certs_to_pem(&[material.cert_der])).unwrap();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = groups;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                leaf.cert_chain_der
                    .iter()
                    .map(|d| CertificateDer::from(d.clone()))
                    .collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_pkcs8.to_vec())),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
                .accept(tcp)
                .await
                .unwrap();
            let _ = tx.send(
                tls.get_ref()
                    .1
                    .negotiated_key_exchange_group()
                    .map(|g| g.name()),
            );
        });
        (port, rx)
    }

    async fn negotiated(
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) -> Option<NamedGroup> {
        let dir = tempfile::tempdir().unwrap();
        let (port, rx) = server(groups, dir.path()).await;
        let config = client_config(Some(&dir.path().join("ca.pem")), "api", true).unwrap();
        let (stream, _) = open(
            "localhost",
            port,
            Some(&config),
            Duration::from_secs(5),
            "test CA",
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
        let Stream::Tls(tls) = stream else {
            panic!("not TLS")
        };
        let client_side = tls
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name());
        let server_side = rx.await.unwrap();
        assert_eq!(client_side, server_side);
        client_side
    }

    #[tokio::test]
    async fn the_post_quantum_hybrid_is_preferred_and_classic_groups_still_work() {
        use rustls::crypto::aws_lc_rs::kx_group;
        // A server offering both (classic first) still ends up on the hybrid:
        // warden's key share is X25519MLKEM768.
        assert_eq!(
            negotiated(vec![kx_group::X25519, kx_group::X25519MLKEM768]).await,
            Some(NamedGroup::X25519MLKEM768)
        );
        // A server without it: X25519, no failure.
        assert_eq!(
            negotiated(vec![kx_group::X25519]).await,
            Some(NamedGroup::X25519)
        );
    }
}
