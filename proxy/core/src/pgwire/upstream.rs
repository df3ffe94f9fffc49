//! The upstream side of a PostgreSQL route: connect (TCP, then TLS when the
//! route asks), send the client's startup parameters under the injected role,
//! authenticate (SCRAM-SHA-256[-PLUS], md5, cleartext only over TLS, trust),
//! and read up to the first ReadyForQuery.
//!
//! Every failure is classified so the client gets the right SQLSTATE:
//! unreachable → 08001, credential rejected → 28P01, an auth method warden
//! does not speak → 28000, anything malformed → 08P01; a server error after
//! authentication (e.g. 3D000 unknown database) is forwarded as is.

use super::protocol::{self, BackendMessage, ErrorFields, StartupMessage};
use super::scram::{self, ChannelBinding, ScramClient, ScramKeyCache};
use crate::tls;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// Longest the whole upstream login (after connect) may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(15);

/// Where and how to reach a route's database.
#[derive(Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<ClientConfig>>,
    pub server_name: ServerName<'static>,
    pub connect_timeout: Duration,
}

impl UpstreamTarget {
    /// The upstream of a configured postgres route (`route[index]`): host,
    /// port, TLS per `upstream_tls` (verify-full by default), timeout.
    pub fn from_route(
        r: &crate::config::Route,
        index: usize,
    ) -> crate::error::Result<UpstreamTarget> {
        let (host, port) = r
            .upstream_host_port()
            .map_err(|e| crate::error::Error::usage(format!("route[{index}].upstream: {e}")))?;
        let tls = crate::tls::client_config(
            r.upstream_tls.mode,
            r.upstream_tls.ca_file.as_deref(),
            &r.name,
        )?;
        Ok(UpstreamTarget {
            server_name: crate::tls::server_name(&host)?,
            host,
            port,
            tls,
            connect_timeout: r.connect_timeout(),
        })
    }
}

/// The login warden performs: role, password and a tag naming the secret
/// version (used in messages and as the SCRAM cache key).
pub struct Login {
    pub user: String,
    pub password: Zeroizing<Vec<u8>>,
    /// `name vN`, e.g. `orders-db/app v3`.
    pub secret_label: String,
    /// Fewest SCRAM iterations accepted from the server:
    /// [`scram::MIN_ITERATIONS`], or a lease's own count (warden made its
    /// verifier).
    pub scram_min_iterations: u32,
}

pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// The TCP socket under the stream (for the pool's liveness check).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Why the upstream login failed, by the SQLSTATE the client should see.
pub enum UpstreamFailure {
    /// 08001: no connection (refused, timed out, TLS failed).
    Unreachable(String),
    /// 28P01: the server rejected the injected credential.
    Rejected(String),
    /// 28000: the server asked for an auth method warden will not use.
    Unsupported(String),
    /// 08P01: the server spoke something that is not the protocol.
    Protocol(String),
    /// Forwarded unchanged (e.g. 3D000 database does not exist, 53300 too many connections).
    Server(ErrorFields),
}

/// An authenticated upstream session, positioned after its first ReadyForQuery.
pub struct Established {
    pub stream: UpstreamStream,
    /// ParameterStatus messages, in order, to replay to the client.
    pub params: Vec<(String, String)>,
    pub backend_key: Option<(i32, Vec<u8>)>,
    pub ready_status: u8,
    pub auth_method: &'static str,
    pub connect_time: Duration,
    pub auth_time: Duration,
}

fn unreachable(target: &UpstreamTarget, what: impl std::fmt::Display) -> UpstreamFailure {
    UpstreamFailure::Unreachable(format!(
        "cannot reach upstream {}:{}: {what}",
        target.host, target.port
    ))
}

/// TCP connect and, for TLS routes, SSLRequest + handshake. Returns the stream
/// and, with TLS, the server certificate (for channel binding).
pub async fn open(
    target: &UpstreamTarget,
) -> Result<(UpstreamStream, Option<Vec<u8>>), UpstreamFailure> {
    let connect = async {
        let mut tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| unreachable(target, e))?;
        let _ = tcp.set_nodelay(true);
        let Some(config) = &target.tls else {
            return Ok((UpstreamStream::Plain(tcp), None));
        };
        tcp.write_all(&protocol::ssl_request())
            .await
            .map_err(|e| unreachable(target, e))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| unreachable(target, e))?;
        if answer[0] != b'S' {
            return Err(unreachable(
                target,
                "the server does not accept TLS but the route requires it (upstream_tls.mode)",
            ));
        }
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| unreachable(target, format!("TLS handshake failed: {e}")))?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        Ok((UpstreamStream::Tls(Box::new(tls)), cert))
    };
    match tokio::time::timeout(target.connect_timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(
            target,
            format!(
                "no answer within the connect timeout ({} ms)",
                target.connect_timeout.as_millis()
            ),
        )),
    }
}

/// Reads one backend message, buffering in `buf`.
async fn read_message(
    stream: &mut UpstreamStream,
    buf: &mut Vec<u8>,
) -> Result<BackendMessage, UpstreamFailure> {
    loop {
        match protocol::parse_backend(buf) {
            Ok(Some((msg, used))) => {
                buf.drain(..used);
                return Ok(msg);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(UpstreamFailure::Protocol(format!(
                    "upstream sent an invalid message: {e}"
                )))
            }
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.map_err(|e| {
            UpstreamFailure::Unreachable(format!("upstream connection failed during login: {e}"))
        })?;
        if n == 0 {
            return Err(UpstreamFailure::Unreachable(
                "upstream closed the connection during login".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn send(stream: &mut UpstreamStream, bytes: &[u8]) -> Result<(), UpstreamFailure> {
    stream.write_all(bytes).await.map_err(|e| {
        UpstreamFailure::Unreachable(format!("upstream write failed during login: {e}"))
    })
}

fn rejected(login: &Login, e: &ErrorFields) -> UpstreamFailure {
    UpstreamFailure::Rejected(format!(
        "upstream rejected the credential (secret {}): {}",
        login.secret_label,
        e.message().unwrap_or("no message")
    ))
}

/// Connects, authenticates as `login` and reads up to ReadyForQuery.
pub async fn connect(
    target: &UpstreamTarget,
    startup: &StartupMessage,
    login: &Login,
    cache: &ScramKeyCache,
) -> Result<Established, UpstreamFailure> {
    let t0 = Instant::now();
    let (mut stream, server_cert) = open(target).await?;
    let connect_time = t0.elapsed();
    let t1 = Instant::now();
    let result = tokio::time::timeout(AUTH_TIMEOUT, async {
        send(&mut stream, &startup.encode()).await?;
        let mut buf = Vec::new();
        let mut method: &'static str = "trust";
        let mut scram: Option<ScramClient> = None;
        // Authentication exchange.
        loop {
            match read_message(&mut stream, &mut buf).await? {
                BackendMessage::AuthenticationOk => {
                    // A server that skips SCRAM's final step never proved it
                    // knows the verifier (nor, with -PLUS, the channel binding).
                    if scram.as_ref().is_some_and(|c| !c.server_verified()) {
                        return Err(UpstreamFailure::Protocol(
                            "the upstream ended SCRAM without proving its identity (no server signature); refusing the session".into(),
                        ));
                    }
                    break;
                }
                BackendMessage::NegotiateProtocolVersion { .. } => {}
                BackendMessage::AuthenticationCleartextPassword => {
                    if server_cert.is_none() {
                        return Err(UpstreamFailure::Unsupported(
                            "the upstream asks for a cleartext password over an unencrypted connection; warden refuses (enable TLS: upstream_tls.mode)".into(),
                        ));
                    }
                    method = "password";
                    let mut pw = Zeroizing::new(login.password.to_vec());
                    pw.push(0);
                    send(&mut stream, &protocol::password_message(&pw)).await?;
                }
                BackendMessage::AuthenticationMd5Password { salt } => {
                    method = "md5";
                    let hashed = Zeroizing::new(scram::md5_password(&login.user, &login.password, salt));
                    let mut body = Zeroizing::new(hashed.as_bytes().to_vec());
                    body.push(0);
                    send(&mut stream, &protocol::password_message(&body)).await?;
                }
                BackendMessage::AuthenticationSasl { mechanisms } => {
                    let plus = server_cert.is_some() && mechanisms.iter().any(|m| m == "SCRAM-SHA-256-PLUS");
                    if !plus && !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(UpstreamFailure::Unsupported(format!(
                            "the upstream offers SASL mechanisms {mechanisms:?}; warden speaks SCRAM-SHA-256"
                        )));
                    }
                    let binding = match (&server_cert, plus) {
                        (Some(cert), true) => ChannelBinding::TlsServerEndPoint(tls::server_end_point(cert)),
                        (Some(_), false) => ChannelBinding::SupportedButNotUsed,
                        (None, _) => ChannelBinding::None,
                    };
                    let mut client = ScramClient::new(&login.password, binding, cache, &login.secret_label)
                        .with_min_iterations(login.scram_min_iterations);
                    method = client.mechanism();
                    let first = client.client_first();
                    send(&mut stream, &protocol::sasl_initial_response(client.mechanism(), &first)).await?;
                    scram = Some(client);
                }
                BackendMessage::AuthenticationSaslContinue { data } => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| UpstreamFailure::Protocol("SASLContinue before SASL".into()))?;
                    let fin = client
                        .handle_server_first(&data)
                        .map_err(|e| UpstreamFailure::Protocol(format!("SCRAM: {e}")))?;
                    send(&mut stream, &protocol::sasl_response(&fin)).await?;
                }
                BackendMessage::AuthenticationSaslFinal { data } => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| UpstreamFailure::Protocol("SASLFinal before SASL".into()))?;
                    client.handle_server_final(&data).map_err(|e| {
                        UpstreamFailure::Protocol(format!("SCRAM: the server's signature did not verify ({e}); refusing the session"))
                    })?;
                }
                BackendMessage::AuthenticationOther { code } => {
                    return Err(UpstreamFailure::Unsupported(format!(
                        "the upstream asks for authentication method {} ({code}), which warden does not support; configure scram-sha-256, md5 or (over TLS) password in pg_hba.conf",
                        protocol::auth_method_name(code)
                    )));
                }
                BackendMessage::ErrorResponse(e) => {
                    return Err(match e.code() {
                        Some("28P01") | Some("28000") => rejected(login, &e),
                        _ => UpstreamFailure::Server(e),
                    });
                }
                BackendMessage::NoticeResponse(_) => {}
                other => {
                    return Err(UpstreamFailure::Protocol(format!(
                        "unexpected message during authentication: {}",
                        other.describe()
                    )))
                }
            }
        }
        // Start-up parameters until the first ReadyForQuery.
        let mut params = Vec::new();
        let mut backend_key = None;
        loop {
            match read_message(&mut stream, &mut buf).await? {
                BackendMessage::ParameterStatus { name, value } => params.push((name, value)),
                BackendMessage::BackendKeyData { process_id, secret_key } => backend_key = Some((process_id, secret_key)),
                BackendMessage::ReadyForQuery { status } => {
                    if !buf.is_empty() {
                        return Err(UpstreamFailure::Protocol("upstream sent data after ReadyForQuery before any query".into()));
                    }
                    return Ok((params, backend_key, status, method));
                }
                BackendMessage::ErrorResponse(e) => return Err(UpstreamFailure::Server(e)),
                BackendMessage::NoticeResponse(_) => {}
                other => {
                    return Err(UpstreamFailure::Protocol(format!(
                        "unexpected message during start-up: {}",
                        other.describe()
                    )))
                }
            }
        }
    })
    .await;
    let (params, backend_key, ready_status, auth_method) = match result {
        Ok(r) => r?,
        Err(_) => {
            return Err(UpstreamFailure::Unreachable(format!(
                "upstream {}:{} did not finish the login within {} s",
                target.host,
                target.port,
                AUTH_TIMEOUT.as_secs()
            )))
        }
    };
    Ok(Established {
        stream,
        params,
        backend_key,
        ready_status,
        auth_method,
        connect_time,
        auth_time: t1.elapsed(),
    })
}

/// Forwards a cancel request for an upstream session.
pub async fn send_cancel(
    target: &UpstreamTarget,
    process_id: i32,
    secret_key: &[u8],
) -> Result<(), UpstreamFailure> {
    let (mut stream, _) = open(target).await?;
    send(
        &mut stream,
        &protocol::cancel_request(process_id, secret_key),
    )
    .await?;
    let _ = stream.shutdown().await;
    Ok(())
}
