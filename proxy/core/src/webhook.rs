//! warden's one outbound webhook client: an HTTP/1.1 `POST` over plain TCP
//! or verified TLS (system roots, [`crate::connect::open`]), used by the
//! anomaly alerts and the rotation `webhook` method.
//!
//! The request buffer is zeroized after use (a rotation webhook's body is the
//! new secret value), and nothing from the body ever goes into an error.

use crate::config::TlsMode;
use crate::connect::{self, ConnectError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// Where a POST failed.
#[derive(Debug, Clone)]
pub enum PostError {
    /// Nothing reached the receiver (bad URL, connect or TLS failure).
    NotSent(String),
    /// The request may have been received; its outcome is unknown.
    Unknown(String),
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostError::NotSent(m) | PostError::Unknown(m) => f.write_str(m),
        }
    }
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    https: bool,
    host: String,
    port: u16,
    /// As written (the Host header).
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let lower = url.to_ascii_lowercase();
    let (https, rest) = if let Some(r) = lower.strip_prefix("https://") {
        (true, &url[url.len() - r.len()..])
    } else if let Some(r) = lower.strip_prefix("http://") {
        (false, &url[url.len() - r.len()..])
    } else {
        return Err(format!(
            "{} is not an http(s) URL",
            crate::config::url_for_display(url)
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default_port = if https { 443 } else { 80 };
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("webhook URL port {p:?} is not a number"))
    };
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]` or `[::1]:8080`.
        Some(v6) => {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| "the webhook URL has an unclosed [ in its host".to_string())?;
            match after.strip_prefix(':') {
                Some(p) => (h.to_string(), parse_port(p)?),
                None if after.is_empty() => (h.to_string(), default_port),
                None => return Err(format!("webhook URL host {authority:?} is malformed")),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(p)?),
            None => (authority.to_string(), default_port),
        },
    };
    if host.is_empty() {
        return Err("the webhook URL has no host".into());
    }
    Ok(Target {
        https,
        host,
        port,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

/// POSTs `body` to `url` (`content_type`, plus `headers`) and returns the
/// answer's HTTP status. TLS is verified against the system roots.
pub async fn post(
    url: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, PostError> {
    let t = parse_url(url).map_err(PostError::NotSent)?;
    let mut req = Zeroizing::new(Vec::with_capacity(256 + body.len()));
    req.extend_from_slice(
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: warden\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
            t.path,
            t.authority,
            body.len()
        )
        .as_bytes(),
    );
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    let io = async {
        let tls = match t.https {
            false => None,
            true => crate::tls::client_config(TlsMode::VerifyFull, None, "webhook")
                .map_err(|e| PostError::NotSent(e.message))?,
        };
        let (mut stream, _) =
            connect::open(&t.host, t.port, tls.as_ref(), timeout, "the system bundle")
                .await
                .map_err(|e: ConnectError| PostError::NotSent(e.to_string()))?;
        stream
            .write_all(&req)
            .await
            .map_err(|e| PostError::Unknown(format!("write to {}: {e}", t.authority)))?;
        let mut head = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| PostError::Unknown(format!("read from {}: {e}", t.authority)))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| PostError::Unknown(format!("{} sent no HTTP status line", t.authority)))
    };
    tokio::time::timeout(timeout, io).await.map_err(|_| {
        PostError::Unknown(format!(
            "{} did not answer within {} s",
            t.authority,
            timeout.as_secs()
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_with_default_ports_and_ipv6() {
        let t = parse_url("https://sync.internal/rotate").unwrap();
        assert_eq!(
            (t.https, t.host.as_str(), t.port, t.path.as_str()),
            (true, "sync.internal", 443, "/rotate")
        );
        let t = parse_url("http://127.0.0.1:9000").unwrap();
        assert_eq!((t.port, t.path.as_str()), (9000, "/"));
        let t = parse_url("HTTP://[::1]:8080/a").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        let t = parse_url("http://[::1]/a").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://h:notaport/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[tokio::test]
    async fn posts_and_reads_the_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.ends_with(b"body") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let status = post(
            &format!("http://127.0.0.1:{port}/hook"),
            "application/json",
            &[("X-Test", "1")],
            b"body",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, 202);
        let req = server.await.unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("\r\nX-Test: 1\r\n") && req.contains("Content-Length: 4"));
    }

    #[tokio::test]
    async fn a_closed_port_is_not_sent() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = post(
            &format!("http://127.0.0.1:{port}/"),
            "application/json",
            &[],
            b"{}",
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PostError::NotSent(_)), "{err}");
    }
}
