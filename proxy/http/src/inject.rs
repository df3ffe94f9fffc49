//! What an http route adds to each request, and what it removes first.
//!
//! Pure functions: the injected header (or query parameter) is built from a
//! template and the secret value, and every client-supplied copy of it is
//! stripped so a client can neither see, forward nor override the credential.

use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use zeroize::Zeroizing;

/// Where the credential goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// A header whose value is `template` with `{secret}` replaced.
    Header { name: HeaderName, template: String },
    /// `Authorization: Basic base64(user:secret)`.
    Basic { user: String },
    /// A query parameter whose value is `template` with `{secret}` replaced
    /// (percent-encoded).
    Query { name: String, template: String },
}

impl Injection {
    pub fn from_config(i: &warden_core::config::Inject) -> Result<Injection, String> {
        let template = i.value.clone().unwrap_or_else(|| "{secret}".to_string());
        if let Some(user) = &i.basic_user {
            return Ok(Injection::Basic { user: user.clone() });
        }
        if let Some(q) = &i.query {
            return Ok(Injection::Query {
                name: q.clone(),
                template,
            });
        }
        let h = i
            .header
            .as_deref()
            .ok_or("inject needs header, query or basic_user")?;
        let name = HeaderName::from_bytes(h.as_bytes()).map_err(|e| e.to_string())?;
        Ok(Injection::Header { name, template })
    }

    /// The header this injection sets, if any.
    pub fn header_name(&self) -> Option<&HeaderName> {
        match self {
            Injection::Header { name, .. } => Some(name),
            Injection::Basic { .. } => Some(&AUTHORIZATION),
            Injection::Query { .. } => None,
        }
    }

    /// The header value for `secret` (marked sensitive), if this is a header injection.
    pub fn header_value(&self, secret: &[u8]) -> Option<Result<HeaderValue, String>> {
        let bytes: Zeroizing<Vec<u8>> = match self {
            Injection::Header { template, .. } => fill(template, secret),
            Injection::Basic { user } => {
                let mut raw = Zeroizing::new(Vec::with_capacity(user.len() + 1 + secret.len()));
                raw.extend_from_slice(user.as_bytes());
                raw.push(b':');
                raw.extend_from_slice(secret);
                let mut v = Zeroizing::new(b"Basic ".to_vec());
                let enc = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*raw));
                v.extend_from_slice(enc.as_bytes());
                v
            }
            Injection::Query { .. } => return None,
        };
        Some(match HeaderValue::from_bytes(&bytes) {
            Ok(mut v) => {
                v.set_sensitive(true);
                Ok(v)
            }
            // Never echo the value: say what is wrong with it.
            Err(_) => Err("the secret contains bytes that are not allowed in an HTTP header (line breaks or control characters)".into()),
        })
    }

    /// Removes every client copy of the injected header.
    pub fn strip_header(&self, headers: &mut HeaderMap) {
        if let Some(name) = self.header_name() {
            headers.remove(name);
        }
    }

    /// The query string to send upstream: the client's, without its copies of
    /// the injected parameter, plus the injected one.
    pub fn rewrite_query(&self, query: Option<&str>, secret: &[u8]) -> Option<Zeroizing<String>> {
        let kept = match self {
            Injection::Query { name, .. } => strip_param(query, name),
            _ => query.map(str::to_string).filter(|q| !q.is_empty()),
        };
        let mut out = Zeroizing::new(kept.unwrap_or_default());
        if let Injection::Query { name, template } = self {
            let value = fill(template, secret);
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&percent_encode(name.as_bytes()));
            out.push('=');
            out.push_str(&percent_encode(&value));
        }
        if out.is_empty() {
            None
        } else {
            Some(out)
        }
    }
}

/// `template` with `{secret}` replaced by the secret's bytes.
fn fill(template: &str, secret: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(template.len() + secret.len()));
    let mut rest = template;
    while let Some(i) = rest.find("{secret}") {
        out.extend_from_slice(&rest.as_bytes()[..i]);
        out.extend_from_slice(secret);
        rest = &rest[i + "{secret}".len()..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

/// The query without any pair whose (percent-decoded) name is `name`.
fn strip_param(query: Option<&str>, name: &str) -> Option<String> {
    let q = query?;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            if pair.is_empty() {
                return false;
            }
            let key = pair.split_once('=').map(|(k, _)| k).unwrap_or(pair);
            percent_decode(key) != name.as_bytes()
        })
        .collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    out
}

fn percent_encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len() * 3);
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, template: &str) -> Injection {
        Injection::Header {
            name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
            template: template.into(),
        }
    }

    #[test]
    fn header_templates_and_basic() {
        let v = header("Authorization", "Bearer {secret}")
            .header_value(b"tok")
            .unwrap()
            .unwrap();
        assert_eq!(v, "Bearer tok");
        assert!(v.is_sensitive());
        let b = Injection::Basic { user: "svc".into() }
            .header_value(b"pw")
            .unwrap()
            .unwrap();
        assert_eq!(b, "Basic c3ZjOnB3");
        assert!(header("X-Api-Key", "{secret}")
            .header_value(b"a\r\nb")
            .unwrap()
            .unwrap_err()
            .contains("not allowed"));
    }

    #[test]
    fn client_copies_are_removed() {
        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("client-1"));
        h.append("X-API-KEY", HeaderValue::from_static("client-2"));
        h.append("accept", HeaderValue::from_static("*/*"));
        header("X-Api-Key", "{secret}").strip_header(&mut h);
        assert!(h.get("x-api-key").is_none());
        assert!(h.get("accept").is_some());
        let mut h = HeaderMap::new();
        h.append(
            AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        Injection::Basic { user: "u".into() }.strip_header(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn query_injection_strips_client_copies_even_encoded() {
        let q = Injection::Query {
            name: "api_key".into(),
            template: "{secret}".into(),
        };
        let out = q
            .rewrite_query(
                Some("a=1&api_key=client&b=2&api%5Fkey=x&api_key"),
                b"s e&cret",
            )
            .unwrap();
        assert_eq!(out.as_str(), "a=1&b=2&api_key=s%20e%26cret");
        assert_eq!(q.rewrite_query(None, b"t").unwrap().as_str(), "api_key=t");
        assert_eq!(
            header("A", "{secret}")
                .rewrite_query(Some("x=1"), b"t")
                .unwrap()
                .as_str(),
            "x=1"
        );
        assert!(header("A", "{secret}")
            .rewrite_query(Some(""), b"t")
            .is_none());
    }

    #[test]
    fn from_config_picks_the_target() {
        let mut c = warden_core::config::Inject {
            header: Some("Authorization".into()),
            query: None,
            basic_user: None,
            value: Some("Bearer {secret}".into()),
            secret: "s".into(),
            cache_ttl: None,
        };
        assert_eq!(
            Injection::from_config(&c).unwrap().header_name(),
            Some(&AUTHORIZATION)
        );
        c.header = None;
        c.query = Some("key".into());
        assert!(Injection::from_config(&c).unwrap().header_name().is_none());
        c.query = None;
        c.basic_user = Some("u".into());
        assert_eq!(
            Injection::from_config(&c).unwrap(),
            Injection::Basic { user: "u".into() }
        );
    }
}
