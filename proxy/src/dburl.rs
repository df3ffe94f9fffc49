//! Database URLs as `warden scan` finds them (`postgres://user:pw@host/db`,
//! `redis://:pw@host:6379/0`): the parts `warden import` needs to write a
//! route and the password-free URL of warden's local listener, and the
//! parts `warden scan --verify` needs to try the login. The password is
//! never held here: callers take it from the file text by its byte range.

/// What a URL's scheme says about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DbKind {
    Postgres,
    Redis,
    /// MySQL, MongoDB, …: warden has no route kind for these.
    Other,
}

/// A URL's parts, the password left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbUrl {
    /// As written, e.g. `postgresql+psycopg2`.
    pub scheme: String,
    pub kind: DbKind,
    /// Percent-decoded; empty when the URL has none (`redis://:pw@h`).
    pub user: String,
    /// Without IPv6 brackets.
    pub host: String,
    /// The URL's port or the kind's default.
    pub port: u16,
    /// From the first `/` after the host to `?` or `#` (e.g. `/orders`), as written.
    pub path: String,
    /// `key=value` pairs after `?`, as written.
    pub query: Vec<(String, String)>,
}

impl DbUrl {
    /// Parses `url` (the whole match of a database-URL rule). `None` for
    /// what warden cannot route: no `scheme://`, several hosts, a bad port.
    pub fn parse(url: &str) -> Option<DbUrl> {
        let (scheme, rest) = url.split_once("://")?;
        let base = scheme
            .split('+')
            .next()
            .unwrap_or(scheme)
            .to_ascii_lowercase();
        let kind = match base.as_str() {
            "postgres" | "postgresql" => DbKind::Postgres,
            "redis" | "rediss" => DbKind::Redis,
            _ => DbKind::Other,
        };
        let (userinfo, hostpart) = rest.rsplit_once('@')?;
        let user = percent_decode(userinfo.split(':').next().unwrap_or(""))?;
        let end = hostpart.find(['/', '?', '#']).unwrap_or(hostpart.len());
        let (authority, tail) = hostpart.split_at(end);
        if authority.contains(',') || authority.is_empty() {
            return None;
        }
        let default_port = match kind {
            DbKind::Postgres => 5432,
            DbKind::Redis => 6379,
            DbKind::Other => 0,
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if after.is_empty() => default_port,
                None => return None,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return None;
        }
        let tail = tail.split('#').next().unwrap_or("");
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let query = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), String::new()),
            })
            .collect();
        Some(DbUrl {
            scheme: scheme.to_string(),
            kind,
            user,
            host,
            port,
            path: path.to_string(),
            query,
        })
    }

    /// A query parameter's value.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The database name (PostgreSQL: the path; default: the user).
    pub fn database(&self) -> String {
        let db = self.path.trim_start_matches('/');
        match percent_decode(db) {
            Some(d) if !d.is_empty() => d,
            _ => self.user.clone(),
        }
    }

    /// Whether the host is this machine's loopback.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// `host:port` as a route's `upstream` (IPv6 in brackets).
    pub fn upstream(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL an application uses through warden's listener at `listen`
    /// (`IP:PORT`): no password, plain TCP (the hop is local; warden does
    /// the upstream's TLS), TLS and password parameters dropped.
    pub fn local_url(&self, listen: &str) -> String {
        match self.kind {
            DbKind::Redis => {
                let scheme = if self.scheme.eq_ignore_ascii_case("rediss") {
                    "redis"
                } else {
                    self.scheme.as_str()
                };
                format!("{scheme}://{listen}{}", self.path)
            }
            DbKind::Postgres | DbKind::Other => {
                let user = if self.user.is_empty() {
                    String::new()
                } else {
                    format!("{}@", percent_encode(&self.user))
                };
                let query: Vec<String> = self
                    .query
                    .iter()
                    .filter(|(k, _)| {
                        let k = k.to_ascii_lowercase();
                        !k.starts_with("ssl") && k != "password" && k != "passfile"
                    })
                    .map(|(k, v)| {
                        if v.is_empty() {
                            k.clone()
                        } else {
                            format!("{k}={v}")
                        }
                    })
                    .collect();
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                format!("{}://{user}{listen}{}{query}", self.scheme, self.path)
            }
        }
    }
}

/// `%XX` decoding; `None` for a bad escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    percent_decode_bytes(s.as_bytes()).and_then(|b| String::from_utf8(b).ok())
}

/// `%XX` decoding of raw bytes; `None` for a bad escape.
pub fn percent_decode_bytes(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_url_parts_and_local_form() {
        let u = DbUrl::parse(
            "postgresql://app%40x:pw@db.internal:6543/orders?sslmode=require&application_name=web",
        )
        .unwrap();
        assert_eq!(u.kind, DbKind::Postgres);
        assert_eq!(u.user, "app@x");
        assert_eq!((u.host.as_str(), u.port), ("db.internal", 6543));
        assert_eq!(u.database(), "orders");
        assert_eq!(u.param("sslmode"), Some("require"));
        assert_eq!(
            u.local_url("127.0.0.1:15432"),
            "postgresql://app%40x@127.0.0.1:15432/orders?application_name=web"
        );
        assert!(!u.is_loopback());
        let u = DbUrl::parse("postgres://app:pw@127.0.0.1/db").unwrap();
        assert_eq!(u.port, 5432);
        assert!(u.is_loopback());
        assert_eq!(u.upstream(), "127.0.0.1:5432");
    }

    #[test]
    fn redis_urls_ipv6_and_what_is_not_routable() {
        let u = DbUrl::parse("rediss://:pw@[::1]:6380/2").unwrap();
        assert_eq!(u.kind, DbKind::Redis);
        assert_eq!(u.user, "");
        assert_eq!(u.upstream(), "[::1]:6380");
        assert_eq!(u.local_url("127.0.0.1:16379"), "redis://127.0.0.1:16379/2");
        assert_eq!(DbUrl::parse("mysql://u:p@h/d").unwrap().kind, DbKind::Other);
        assert!(DbUrl::parse("postgres://u:p@h1:5432,h2:5432/d").is_none());
        assert!(DbUrl::parse("postgres://u:p@h:notaport/d").is_none());
        assert!(DbUrl::parse("no url").is_none());
        assert_eq!(percent_decode("p%2Fw%25").as_deref(), Some("p/w%"));
        assert!(percent_decode("bad%zz").is_none());
    }
}
