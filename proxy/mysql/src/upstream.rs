//! warden's login upstream: TCP, the server's greeting, TLS when the route
//! asks (SSLRequest, then rustls in the PostgreSQL routes' modes), the
//! handshake response as the route's user with the client's capabilities,
//! database, character set and connection attributes, then the
//! authentication exchange: `mysql_native_password`,
//! `caching_sha2_password` (fast path; full authentication in clear text
//! over TLS, or RSA-encrypted with the server's public key without TLS),
//! MariaDB's `client_ed25519`, `mysql_clear_password` over TLS only, and
//! auth-switch requests between them.

use crate::auth;
use crate::packet::{
    caps, read_packet, write_packet, ErrPacket, Greeting, HandshakeResponse, Packet,
    MAX_HANDSHAKE_PACKET,
};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use warden_core::pgwire::upstream::UpstreamStream;
use zeroize::Zeroizing;

/// Longest the login (after connect) may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(15);

/// Where and how to reach the server.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<ClientConfig>>,
    pub server_name: Option<ServerName<'static>>,
    pub ca_label: String,
    pub connect_timeout: Duration,
}

/// Why the upstream login failed.
#[derive(Debug)]
pub enum Failure {
    /// No connection (refused, timed out, TLS failed, closed early).
    Unreachable(String),
    /// The server refused the stored password (its ERR).
    Rejected(ErrPacket),
    /// The server asked for a method warden will not use here.
    Unsupported(String),
    /// The server spoke something that is not the protocol.
    Protocol(String),
    /// Any other server error, forwarded (e.g. 1049 unknown database,
    /// 1040 too many connections).
    Server(ErrPacket),
}

/// A connected server that has greeted warden.
pub struct Greeted {
    stream: UpstreamStream,
    pub greeting: Greeting,
    pub connect_time: Duration,
}

/// A logged-in connection.
pub struct LoggedIn {
    pub stream: UpstreamStream,
    /// The server's OK packet payload (status, session state).
    pub ok: Vec<u8>,
    pub connect_time: Duration,
    pub auth_time: Duration,
    /// The plugin that finally authenticated.
    pub plugin: String,
    pub tls: bool,
    /// The capabilities warden's handshake response asked for.
    pub capabilities: u32,
    /// The server's id of this connection (its greeting's).
    pub connection_id: u32,
}

fn io_failure(target: &Target, e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Failure::Unreachable(format!(
            "{}:{} closed the connection during login",
            target.host, target.port
        ))
    } else if e.kind() == std::io::ErrorKind::InvalidData {
        Failure::Protocol(format!("{}:{}: {e}", target.host, target.port))
    } else {
        Failure::Unreachable(format!("{}:{}: {e}", target.host, target.port))
    }
}

/// Connects and reads the greeting.
pub async fn connect(target: &Target) -> Result<Greeted, Failure> {
    let t0 = Instant::now();
    let fut = async {
        let bare = target.host.trim_start_matches('[').trim_end_matches(']');
        let mut tcp = TcpStream::connect((bare, target.port)).await.map_err(|e| {
            Failure::Unreachable(format!(
                "Can't connect to MySQL server on '{}:{}' ({e})",
                target.host, target.port
            ))
        })?;
        let _ = tcp.set_nodelay(true);
        let p = read_packet(&mut tcp, MAX_HANDSHAKE_PACKET)
            .await
            .map_err(|e| io_failure(target, e))?;
        if p.payload.first() == Some(&0xff) {
            // e.g. 1040 too many connections, 1129 host blocked.
            return Err(match ErrPacket::parse(&p.payload) {
                Ok(e) => Failure::Server(e),
                Err(e) => Failure::Protocol(e.0),
            });
        }
        let greeting = Greeting::parse(&p.payload).map_err(|e| {
            Failure::Protocol(format!(
                "{}:{} is not a MySQL server: {e}",
                target.host, target.port
            ))
        })?;
        Ok((tcp, greeting))
    };
    let (tcp, greeting) = match tokio::time::timeout(target.connect_timeout, fut).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Failure::Unreachable(format!(
                "no greeting from {}:{} within {} ms (connect_timeout)",
                target.host,
                target.port,
                target.connect_timeout.as_millis()
            )))
        }
    };
    Ok(Greeted {
        stream: UpstreamStream::Plain(tcp),
        greeting,
        connect_time: t0.elapsed(),
    })
}

/// What the client asked for at login, carried to the server.
pub struct ClientParams<'a> {
    pub capabilities: u32,
    pub mariadb_caps: u32,
    pub max_packet: u32,
    pub charset: u8,
    pub database: Option<&'a [u8]>,
    pub attrs: Option<&'a [u8]>,
}

/// Logs in as `user` with `password` on a greeted connection.
pub async fn login(
    target: &Target,
    greeted: Greeted,
    client: &ClientParams<'_>,
    user: &str,
    password: &[u8],
) -> Result<LoggedIn, Failure> {
    let t1 = Instant::now();
    let Greeted {
        mut stream,
        greeting,
        connect_time,
    } = greeted;
    let server_caps = greeting.capabilities;
    let connection_id = greeting.connection_id;
    let mut capabilities = (client.capabilities & server_caps & !caps::NOT_RELAYED)
        | caps::PROTOCOL_41
        | caps::SECURE_CONNECTION
        | caps::PLUGIN_AUTH;
    if server_caps & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        capabilities |= caps::PLUGIN_AUTH_LENENC_CLIENT_DATA;
    }
    if client.database.is_some() {
        capabilities |= caps::CONNECT_WITH_DB;
    }
    if client.attrs.is_some() && server_caps & caps::CONNECT_ATTRS != 0 {
        capabilities |= caps::CONNECT_ATTRS;
    } else {
        capabilities &= !caps::CONNECT_ATTRS;
    }
    // MariaDB: the client's extended capabilities the server has too.
    capabilities = (capabilities & !caps::LONG_PASSWORD) | (server_caps & caps::LONG_PASSWORD);
    let mariadb_caps = if server_caps & caps::LONG_PASSWORD == 0 {
        client.mariadb_caps & greeting.mariadb_caps & !caps::MARIADB_NOT_RELAYED
    } else {
        0
    };
    let plugin = if greeting.auth_plugin.is_empty() {
        auth::NATIVE.to_vec()
    } else {
        greeting.auth_plugin.clone()
    };
    let mut response = HandshakeResponse {
        capabilities,
        max_packet: client.max_packet,
        charset: client.charset,
        mariadb_caps,
        user: user.as_bytes().to_vec(),
        auth_response: Zeroizing::new(Vec::new()),
        database: client.database.map(<[u8]>::to_vec),
        auth_plugin: Some(plugin.clone()),
        attrs: client.attrs.map(<[u8]>::to_vec),
    };
    let mut seq: u8 = 1;
    let mut tls = false;
    if let Some(config) = &target.tls {
        if server_caps & caps::SSL == 0 {
            return Err(Failure::Unreachable(format!(
                "{}:{} does not offer TLS but the route requires it (upstream_tls.mode = \"disable\" turns TLS off)",
                target.host, target.port
            )));
        }
        let UpstreamStream::Plain(mut tcp) = stream else {
            return Err(Failure::Protocol("TLS started twice".into()));
        };
        write_packet(&mut tcp, seq, &response.encode_ssl_request())
            .await
            .map_err(|e| io_failure(target, e))?;
        seq = seq.wrapping_add(1);
        let name = target
            .server_name
            .clone()
            .ok_or_else(|| Failure::Protocol("no TLS server name".into()))?;
        let handshake = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp);
        let s = tokio::time::timeout(target.connect_timeout, handshake)
            .await
            .map_err(|_| {
                Failure::Unreachable(format!(
                    "TLS handshake with {}:{} did not finish within {} ms (connect_timeout)",
                    target.host,
                    target.port,
                    target.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| {
                let inner = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .cloned();
                Failure::Unreachable(match inner {
                    Some(re) => {
                        warden_core::connect::explain_tls_error(&re, &target.host, &target.ca_label)
                            .1
                    }
                    None => format!(
                        "TLS handshake with {}:{} failed: {e}",
                        target.host, target.port
                    ),
                })
            })?;
        stream = UpstreamStream::Tls(Box::new(s));
        tls = true;
    }
    let exchange = async {
        let first = match auth::proof(&plugin, password, &greeting.scramble) {
            Some(p) => p,
            // An unknown default plugin: answer for mysql_native_password;
            // the server switches to the account's plugin.
            None => auth::native_password(password, &greeting.scramble),
        };
        response.auth_response = first;
        write_packet(&mut stream, seq, &response.encode())
            .await
            .map_err(|e| io_failure(target, e))?;
        let mut state = Exchange {
            plugin: plugin.clone(),
            scramble: greeting.scramble.clone(),
            tls,
        };
        loop {
            let p = read_packet(&mut stream, MAX_HANDSHAKE_PACKET)
                .await
                .map_err(|e| io_failure(target, e))?;
            seq = p.seq.wrapping_add(1);
            match state.step(&p, password)? {
                Step::Done(ok) => {
                    return Ok((ok, String::from_utf8_lossy(&state.plugin).into_owned()))
                }
                Step::Send(bytes) => write_packet(&mut stream, seq, &bytes)
                    .await
                    .map_err(|e| io_failure(target, e))?,
                Step::Wait => {}
            }
        }
    };
    let (ok, plugin) = tokio::time::timeout(AUTH_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            Failure::Unreachable(format!(
                "{}:{} did not finish the login within {} s",
                target.host,
                target.port,
                AUTH_TIMEOUT.as_secs()
            ))
        })??;
    Ok(LoggedIn {
        stream,
        ok,
        connect_time,
        auth_time: t1.elapsed(),
        plugin,
        tls,
        capabilities,
        connection_id,
    })
}

/// The authentication exchange after the handshake response.
struct Exchange {
    plugin: Vec<u8>,
    scramble: Vec<u8>,
    tls: bool,
}

enum Step {
    Done(Vec<u8>),
    Send(Zeroizing<Vec<u8>>),
    Wait,
}

impl Exchange {
    fn step(&mut self, p: &Packet, password: &[u8]) -> Result<Step, Failure> {
        let body = &p.payload;
        match body.first() {
            Some(0x00) => Ok(Step::Done(body.clone())),
            Some(0xff) => {
                let e = ErrPacket::parse(body).map_err(|e| Failure::Protocol(e.0))?;
                // 1045 access denied; 1698 (MySQL) access denied without password.
                if matches!(e.code, 1045 | 1698) {
                    Err(Failure::Rejected(e))
                } else {
                    Err(Failure::Server(e))
                }
            }
            Some(0xfe) => {
                // Auth switch: plugin name, then its data.
                let mut r = crate::packet::Reader::new(&body[1..]);
                let plugin = r.nul_str_or_rest().to_vec();
                let data = r.rest();
                let data = data.strip_suffix(&[0]).unwrap_or(data).to_vec();
                self.plugin = plugin;
                self.scramble = data;
                match self.plugin.as_slice() {
                    auth::CLEAR if self.tls => {
                        let mut out = Zeroizing::new(password.to_vec());
                        out.push(0);
                        Ok(Step::Send(out))
                    }
                    auth::CLEAR => Err(Failure::Unsupported(
                        "the server asks for the password in clear text (mysql_clear_password) on a connection without TLS; warden sends it only over TLS (set upstream_tls.mode)".into(),
                    )),
                    other => match auth::proof(other, password, &self.scramble) {
                        Some(proof) => Ok(Step::Send(proof)),
                        None => Err(Failure::Unsupported(format!(
                            "the server asks for authentication plugin {:?}, which warden does not speak (it speaks mysql_native_password, caching_sha2_password, client_ed25519, and mysql_clear_password over TLS)",
                            String::from_utf8_lossy(other)
                        ))),
                    },
                }
            }
            Some(0x01) if self.plugin == auth::CACHING_SHA2 => match &body[1..] {
                // Fast authentication succeeded: the OK follows.
                [0x03] => Ok(Step::Wait),
                // Full authentication.
                [0x04] if self.tls => {
                    let mut out = Zeroizing::new(password.to_vec());
                    out.push(0);
                    Ok(Step::Send(out))
                }
                [0x04] => Ok(Step::Send(Zeroizing::new(vec![0x02]))),
                pem if pem.starts_with(b"-----BEGIN") => {
                    auth::rsa_encrypted_password(password, &self.scramble, pem)
                        .map(|v| Step::Send(Zeroizing::new(v)))
                        .map_err(Failure::Protocol)
                }
                other => Err(Failure::Protocol(format!(
                    "unexpected caching_sha2_password message ({} bytes)",
                    other.len()
                ))),
            },
            Some(b) => Err(Failure::Protocol(format!(
                "unexpected packet 0x{b:02x} during authentication with plugin {:?}",
                String::from_utf8_lossy(&self.plugin)
            ))),
            None => Err(Failure::Protocol(
                "an empty packet during authentication".into(),
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use aws_lc_rs::digest::{digest, SHA256};

    /// How the fake MySQL 8 server ends caching_sha2_password.
    #[derive(Clone, Copy, PartialEq)]
    enum Sha2Path {
        Fast,
        FullRsa,
        WrongPassword,
    }

    /// A MySQL 8-like server checking caching_sha2_password as the server
    /// does (from its stored SHA256(SHA256(pw))), then answering per `path`.
    async fn fake_mysql8(path: Sha2Path) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::rsa::{
            KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA1_MGF1SHA1,
        };
        use base64::Engine;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let scramble: Vec<u8> = (0..20u8).map(|i| 33 + i).collect();
            let g = Greeting {
                server_version: b"8.4.0".to_vec(),
                connection_id: 7,
                scramble: scramble.clone(),
                capabilities: caps::LONG_PASSWORD
                    | caps::PROTOCOL_41
                    | caps::SECURE_CONNECTION
                    | caps::PLUGIN_AUTH
                    | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
                    | caps::CONNECT_WITH_DB
                    | caps::CONNECT_ATTRS
                    | caps::DEPRECATE_EOF,
                mariadb_caps: 0,
                charset: 255,
                status: 2,
                auth_plugin: auth::CACHING_SHA2.to_vec(),
            };
            write_packet(&mut s, 0, &g.encode()).await.unwrap();
            let p = read_packet(&mut s, MAX_HANDSHAKE_PACKET).await.unwrap();
            assert_eq!(p.seq, 1);
            let h = HandshakeResponse::parse(&p.payload).unwrap().unwrap();
            assert_eq!(h.user, b"app");
            assert_eq!(h.database.as_deref(), Some(&b"orders"[..]));
            assert_eq!(h.auth_plugin.as_deref(), Some(auth::CACHING_SHA2));
            // The server's check: stored = SHA256(SHA256(pw)).
            let stored = digest(&SHA256, digest(&SHA256, b"s3cret").as_ref());
            let mut ctx = aws_lc_rs::digest::Context::new(&SHA256);
            ctx.update(stored.as_ref());
            ctx.update(&scramble);
            let mix = ctx.finish();
            let p1: Vec<u8> = h
                .auth_response
                .iter()
                .zip(mix.as_ref())
                .map(|(a, b)| a ^ b)
                .collect();
            let proof_ok = digest(&SHA256, &p1).as_ref() == stored.as_ref();
            let ok = crate::packet::ok_packet(2);
            match path {
                Sha2Path::WrongPassword => {
                    assert!(!proof_ok);
                    let e = ErrPacket::new(1045, "28000", "Access denied for user 'app'");
                    write_packet(&mut s, 2, &e.encode()).await.unwrap();
                }
                Sha2Path::Fast => {
                    assert!(proof_ok);
                    write_packet(&mut s, 2, &[1, 3]).await.unwrap();
                    write_packet(&mut s, 3, &ok).await.unwrap();
                }
                Sha2Path::FullRsa => {
                    assert!(proof_ok);
                    write_packet(&mut s, 2, &[1, 4]).await.unwrap();
                    let p = read_packet(&mut s, 1024).await.unwrap();
                    assert_eq!((p.seq, p.payload.as_slice()), (3, &[2u8][..]));
                    let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
                    let der = private.public_key().as_der().unwrap();
                    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
                    let mut pem = b"\x01-----BEGIN PUBLIC KEY-----\n".to_vec();
                    for line in b64.as_bytes().chunks(64) {
                        pem.extend_from_slice(line);
                        pem.push(b'\n');
                    }
                    pem.extend_from_slice(b"-----END PUBLIC KEY-----\n");
                    write_packet(&mut s, 4, &pem).await.unwrap();
                    let p = read_packet(&mut s, 4096).await.unwrap();
                    assert_eq!(p.seq, 5);
                    let key = OaepPrivateDecryptingKey::new(private).unwrap();
                    let mut out = vec![0u8; key.min_output_size()];
                    let plain = key
                        .decrypt(&OAEP_SHA1_MGF1SHA1, &p.payload, &mut out, None)
                        .unwrap();
                    let pw: Vec<u8> = plain
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ scramble[i % 20])
                        .collect();
                    assert_eq!(pw, b"s3cret\0");
                    write_packet(&mut s, 6, &ok).await.unwrap();
                }
            }
            ok
        });
        (port, task)
    }

    fn target(port: u16) -> Target {
        Target {
            host: "127.0.0.1".into(),
            port,
            tls: None,
            server_name: None,
            ca_label: "none".into(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    async fn login_to(port: u16, password: &[u8]) -> Result<LoggedIn, Failure> {
        let t = target(port);
        let g = connect(&t).await?;
        assert_eq!(g.greeting.server_version, b"8.4.0");
        let params = ClientParams {
            capabilities: caps::PROTOCOL_41 | caps::DEPRECATE_EOF | caps::COMPRESS,
            mariadb_caps: 0,
            max_packet: 1 << 24,
            charset: 45,
            database: Some(b"orders"),
            attrs: None,
        };
        login(&t, g, &params, "app", password).await
    }

    #[tokio::test]
    async fn caching_sha2_logs_in_by_the_fast_path_and_by_rsa_without_tls() {
        for path in [Sha2Path::Fast, Sha2Path::FullRsa] {
            let (port, server) = fake_mysql8(path).await;
            let done = login_to(port, b"s3cret").await.unwrap();
            assert_eq!(done.plugin, "caching_sha2_password");
            assert_eq!(done.ok, server.await.unwrap());
            assert!(!done.tls);
        }
        let (port, server) = fake_mysql8(Sha2Path::WrongPassword).await;
        match login_to(port, b"wrong").await {
            Err(Failure::Rejected(e)) => assert_eq!(e.code, 1045),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("logged in with a wrong password"),
        }
        server.await.unwrap();
        // Nobody listening: unreachable, in MySQL's own words.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        match connect(&target(port)).await {
            Err(Failure::Unreachable(m)) => {
                assert!(m.contains("Can't connect to MySQL server"), "{m}")
            }
            _ => panic!("connected to nothing"),
        }
    }

    fn pkt(payload: &[u8]) -> Packet {
        Packet {
            seq: 2,
            payload: payload.to_vec(),
        }
    }

    fn ex(plugin: &[u8], tls: bool) -> Exchange {
        Exchange {
            plugin: plugin.to_vec(),
            scramble: (1..=20).collect(),
            tls,
        }
    }

    #[test]
    fn caching_sha2_full_authentication_goes_clear_over_tls_and_asks_for_the_key_without() {
        let mut e = ex(auth::CACHING_SHA2, false);
        assert!(matches!(e.step(&pkt(&[1, 3]), b"pw").unwrap(), Step::Wait));
        match e.step(&pkt(&[1, 4]), b"pw").unwrap() {
            Step::Send(b) => assert_eq!(&b[..], &[2]),
            _ => panic!("no public key request"),
        }
        let mut e = ex(auth::CACHING_SHA2, true);
        match e.step(&pkt(&[1, 4]), b"pw").unwrap() {
            Step::Send(b) => assert_eq!(&b[..], b"pw\0"),
            _ => panic!("no clear password over TLS"),
        }
        assert!(matches!(
            e.step(&pkt(&[0, 0, 0, 2, 0, 0, 0]), b"pw").unwrap(),
            Step::Done(_)
        ));
    }

    #[test]
    fn auth_switch_answers_for_the_new_plugin_and_refuses_clear_text_without_tls() {
        let mut e = ex(auth::NATIVE, false);
        let mut switch = vec![0xfe];
        switch.extend_from_slice(b"client_ed25519\0");
        switch.extend_from_slice(&[9u8; 32]);
        match e.step(&pkt(&switch), b"pw").unwrap() {
            Step::Send(b) => assert_eq!(&b[..], &auth::ed25519(b"pw", &[9u8; 32])[..]),
            _ => panic!(),
        }
        let mut switch = vec![0xfe];
        switch.extend_from_slice(b"mysql_clear_password\0");
        assert!(matches!(
            e.step(&pkt(&switch), b"pw"),
            Err(Failure::Unsupported(_))
        ));
        let mut switch = vec![0xfe];
        switch.extend_from_slice(b"dialog\0x");
        assert!(matches!(
            e.step(&pkt(&switch), b"pw"),
            Err(Failure::Unsupported(_))
        ));
        let err = ErrPacket::new(1045, "28000", "Access denied for user 'app'").encode();
        assert!(matches!(
            e.step(&pkt(&err), b"pw"),
            Err(Failure::Rejected(_))
        ));
        let err = ErrPacket::new(1049, "42000", "Unknown database 'x'").encode();
        assert!(matches!(e.step(&pkt(&err), b"pw"), Err(Failure::Server(_))));
        assert!(matches!(
            e.step(&pkt(&[]), b"pw"),
            Err(Failure::Protocol(_))
        ));
        assert!(matches!(
            e.step(&pkt(&[7]), b"pw"),
            Err(Failure::Protocol(_))
        ));
    }
}
