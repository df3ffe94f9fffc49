//! SPIFFE IDs and trust domains, parsed by the rules of the SPIFFE ID spec:
//! `spiffe://<trust domain>/<path>`, trust domain of lowercase letters, digits,
//! `.`, `-`, `_`; path segments of letters, digits, `.`, `-`, `_`, none empty,
//! `.` or `..`; no query, fragment, port or user info.

use crate::IdentityError;

const MAX_ID_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<TrustDomain, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
            });
        if !ok {
            return Err(IdentityError::InvalidId(format!(
                "invalid trust domain {s:?}: use lowercase letters, digits, '.', '-' and '_' (like \"example.org\")"
            )));
        }
        Ok(TrustDomain(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`, the trust domain's own ID (used in bundles).
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl std::fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload's SPIFFE ID (never the bare trust domain: SVIDs need a path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        let bad = |why: &str| {
            IdentityError::InvalidId(format!(
                "invalid SPIFFE ID {s:?}: {why} (expected spiffe://trust.domain/path)"
            ))
        };
        if s.len() > MAX_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("the scheme must be spiffe://"))?;
        if rest.contains(['?', '#']) {
            return Err(bad("query and fragment are not allowed"));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let trust_domain =
            TrustDomain::parse(td).map_err(|_| bad("the trust domain is invalid"))?;
        if path.is_empty() || path == "/" {
            return Err(bad("a workload ID needs a path"));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("path segments cannot be empty, '.' or '..'"));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            {
                return Err(bad(
                    "path segments may use letters, digits, '.', '-' and '_' only",
                ));
            }
        }
        Ok(SpiffeId {
            trust_domain,
            path: path.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_roundtrip() {
        for s in [
            "spiffe://example.org/reports",
            "spiffe://a-b_c.d/x/y.z/W-1",
            "spiffe://td/ns/prod/sa/api",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/a/b").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/a/b");
    }

    #[test]
    fn invalid_ids_are_rejected() {
        for s in [
            "",
            "http://example.org/a",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://Example.org/a",
            "spiffe://example.org:8080/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a b",
            "spiffe:///a",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s:?} accepted");
        }
        assert!(SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(3000))).is_err());
    }

    #[test]
    fn trust_domains() {
        TrustDomain::parse("example.org").unwrap();
        for bad in ["", "Example.org", "a/b", "a:1", "spiffe://x"] {
            assert!(TrustDomain::parse(bad).is_err(), "{bad:?}");
        }
    }
}
