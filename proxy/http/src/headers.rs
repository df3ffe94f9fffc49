//! Header rules both HTTP paths share (the hyper path in [`super::proxy`] and
//! the byte-level fast path in [`super::fast`]), written once: which headers
//! are hop-by-hop (RFC 9110 §7.6.1) and never forwarded, and the rule that an
//! upstream header echoing the injected secret is dropped, never passed to
//! the client.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers, beside those a `Connection` header names.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether the comma-separated header value lists `token` (any case).
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether header `name` is hop-by-hop: one of the fixed set, or listed by
/// one of the message's `Connection` header values. Neither is forwarded.
pub fn is_hop_by_hop_in<'a>(name: &str, mut connection: impl Iterator<Item = &'a [u8]>) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || connection.any(|v| has_token(v, name))
}

/// Removes hop-by-hop headers, including those the Connection header names.
/// An upgrade keeps `Upgrade` and `Connection: upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A request asking to switch protocols (`Upgrade` plus `Connection: upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), "upgrade"))
}

/// Whether an upstream header value carries the injected secret; logs the
/// header's name (never its value) when it does. Secrets shorter than 4
/// bytes are not searched for (they would match by accident).
pub fn echoes_secret(value: &[u8], secret: &[u8], route: &str, name: &str) -> bool {
    let echoed = secret.len() >= 4 && value.windows(secret.len()).any(|w| w == secret);
    if echoed {
        tracing::warn!(route, header = %name, "upstream response header contained the injected secret; dropped");
    }
    echoed
}

/// Drops every header whose value contains the secret (an upstream echoing
/// the credential back must not hand it to the client).
pub fn scrub_secret(headers: &mut HeaderMap, secret: &[u8], route: &str) {
    let leaking: Vec<HeaderName> = headers
        .iter()
        .filter(|(n, v)| echoes_secret(v.as_bytes(), secret, route, n.as_str()))
        .map(|(n, _)| n.clone())
        .collect();
    for n in leaking {
        headers.remove(&n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_make_headers_hop_by_hop() {
        let conn: [&[u8]; 1] = [b"close, X-Debug"];
        assert!(is_hop_by_hop_in("x-debug", conn.into_iter()));
        assert!(is_hop_by_hop_in("Keep-Alive", std::iter::empty()));
        assert!(!is_hop_by_hop_in("x-other", conn.into_iter()));
    }

    #[test]
    fn short_secrets_are_not_searched_for() {
        assert!(!echoes_secret(b"abc", b"abc", "r", "x"));
        assert!(echoes_secret(b"Bearer tok-1234", b"tok-1234", "r", "x"));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn secret_echoes_are_scrubbed() {
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("Bearer tok-123456"));
        h.insert("x-ok", HeaderValue::from_static("fine"));
        scrub_secret(&mut h, b"tok-123456", "r");
        assert!(h.get("x-echo").is_none());
        assert!(h.get("x-ok").is_some());
    }
}
