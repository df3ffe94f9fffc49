//! Addresses: `host:port` for postgres and tls upstreams, `http(s)://` URLs
//! for http upstreams and webhooks, loopback tests, and [`url_for_display`], which
//! keeps credentials out of messages.

use std::net::{IpAddr, Ipv6Addr};

pub(super) fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

pub(super) fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(is_loopback_ip)
}

/// Parse `host:port` (IPv6 as `[addr]:port`). The error text follows the value
/// in a message, as in: upstream "db" <error>.
pub(super) fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty".to_string());
    }
    if s.contains("://") {
        return Err("is a URL; this kind of route needs host:port without a scheme".to_string());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return Err("has an unclosed `[`".to_string());
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "has \"{addr}\" in brackets, which is not an IPv6 address"
            ));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err("has no port".to_string());
        };
        (format!("[{addr}]"), port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err("has no port".to_string());
        };
        if host.contains(':') {
            return Err(
                "looks like an IPv6 address; write it in brackets, e.g. \"[::1]:5432\"".to_string(),
            );
        }
        (host.to_string(), port)
    };
    check_host(&host)?;
    Ok((host, parse_port(port)?))
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("has no host".to_string());
    }
    if host.starts_with('[') {
        return Ok(());
    }
    if let Some(bad) = host
        .chars()
        .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_')))
    {
        return Err(format!("has `{bad}` in its host name"));
    }
    Ok(())
}

fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("has no port".to_string());
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => {
            u16::try_from(p).map_err(|_| "has an invalid port".to_string())
        }
        Ok(p) => Err(format!("has port {p}; ports must be between 1 and 65535")),
        Err(_) => Err(format!(
            "has port \"{port}\", which is not a number from 1 to 65535"
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HttpUrl {
    pub(super) https: bool,
    pub(super) host: String,
    pub(super) port: u16,
}

/// `url` fit for messages: a user name, password, query or fragment (where a
/// token could sit) is replaced by `…`.
pub fn url_for_display(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => authority.to_string(),
    };
    let path = match tail.find(['?', '#']) {
        Some(i) => format!("{}…", &tail[..i]),
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{path}")
}

/// Parse an `http://` or `https://` URL far enough to check it.
pub(super) fn parse_http_url(s: &str) -> Result<HttpUrl, String> {
    let s = s.trim();
    let lower = s.to_ascii_lowercase();
    let (https, rest) = if lower.starts_with("https://") {
        (true, &s["https://".len()..])
    } else if lower.starts_with("http://") {
        (false, &s["http://".len()..])
    } else {
        return Err("is not an http:// or https:// URL".to_string());
    };
    if s.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err("contains spaces or control characters".to_string());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err("contains a user name or password; keep credentials out of URLs (use inject for http routes)".to_string());
    }
    if authority.is_empty() {
        return Err("has no host".to_string());
    }
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let Some((addr, after)) = inner.split_once(']') else {
            return Err("has an unclosed `[`".to_string());
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "has \"{addr}\" in brackets, which is not an IPv6 address"
            ));
        }
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => default_port,
            None => return Err("has text after the IPv6 address".to_string()),
        };
        (format!("[{addr}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), parse_port(port)?),
            None => (authority.to_string(), default_port),
        }
    };
    check_host(&host)?;
    Ok(HttpUrl { https, host, port })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::url_for_display;
    use crate::config::test_util::{edit, edit_text, ok, only_error, report, BASE, HTTP_ROUTE};

    #[test]
    fn urls_in_messages_carry_no_credentials() {
        assert_eq!(
            url_for_display("https://bob:hunter2@sync.internal/rotate?token=s3cr3t#x"),
            "https://…@sync.internal/rotate…"
        );
        assert_eq!(
            url_for_display("http://127.0.0.1:8080/r"),
            "http://127.0.0.1:8080/r"
        );
        let text = edit_text(
            BASE,
            "[[route]]",
            "[[secret]]\nname = \"w\"\nrotation_period = \"1d\"\nrotate = { method = \"webhook\", url = \"http://bob:hunter2@sync.internal/r?token=s3cr3t\" }\n\n[[route]]",
        );
        let r = report(&text).to_string();
        assert!(
            r.contains("rotate.url") && !r.contains("hunter2") && !r.contains("s3cr3t"),
            "{r}"
        );
    }

    #[test]
    fn upstream_port_rules() {
        for bad in [
            "db.internal",
            "db.internal:0",
            "db.internal:70000",
            "db.internal:pg",
            "postgres://db.internal:5432",
            "::1:5432",
            ":5432",
        ] {
            let text = edit("\"db.internal:5432\"", &format!("\"{bad}\""));
            only_error(&text, "route[0].upstream");
        }
        ok(&edit("\"db.internal:5432\"", "\"[::1]:5432\""));
        ok(&edit("\"db.internal:5432\"", "\"10.0.0.5:65535\""));
        let text = format!(
            "{BASE}{}",
            edit_text(
                HTTP_ROUTE,
                "\"https://payments.internal\"",
                "\"https://payments.internal:0/x\""
            )
        );
        only_error(&text, "route[1].upstream");
    }
}
