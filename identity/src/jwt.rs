//! JWT-SVIDs (SPIFFE JWT-SVID spec): signing with an ES256 key, publishing the
//! public half as a SPIFFE JWKS bundle, and validating a token against such a
//! bundle. Pure crypto and JSON: no I/O, no clock of its own (callers pass
//! `now`), and no key storage (callers keep [`JwtSigner::pkcs8_der`]
//! encrypted).
//!
//! Only ES256 (ECDSA P-256 with SHA-256, the JWS raw `r || s` signature) is
//! issued or accepted; `alg: none`, HMAC and every other algorithm are
//! refused before any key is looked at. Error messages name the claim or
//! header that failed and never contain a token, a signature or key material.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use crate::spiffe_id::SpiffeId;

/// The only JWS algorithm issued and accepted.
pub const ALGORITHM: &str = "ES256";
/// The JWK `use` of JWT-SVID signing keys in a SPIFFE bundle.
pub const JWK_USE: &str = "jwt-svid";
/// `spiffe_refresh_hint` written into bundles by [`jwks`], in seconds.
pub const REFRESH_HINT_SECS: u64 = 300;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Longest token [`validate`] looks at; a JWT-SVID is well under 1 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

const COORD_LEN: usize = 32;
const SIGNATURE_LEN: usize = 64;

/// Why signing or validation failed. Messages are safe to log and to return
/// to a workload: they never include the token, a signature or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("JWT signing key rejected: {0}")]
    InvalidKey(String),
    #[error("could not generate a JWT signing key (the system random source failed)")]
    KeyGeneration,
    #[error("could not sign the JWT-SVID")]
    Signing,
    #[error("cannot issue a JWT-SVID: {0}")]
    InvalidRequest(String),
    #[error("malformed JWT: {0}")]
    Malformed(String),
    #[error("JWT algorithm {0:?} is not accepted; JWT-SVIDs must use ES256")]
    UnsupportedAlgorithm(String),
    #[error("JWT header has no \"kid\"; JWT-SVIDs must name their signing key")]
    MissingKeyId,
    #[error("JWT signing key {0:?} is not in the trust bundle")]
    UnknownKeyId(String),
    #[error("bundle key {kid:?} cannot verify ES256 tokens: {reason}")]
    UnusableKey { kid: String, reason: String },
    #[error("JWT signature does not verify")]
    BadSignature,
    #[error("JWT is missing the {0:?} claim")]
    MissingClaim(&'static str),
    #[error("JWT claim {claim:?} is invalid: {reason}")]
    InvalidClaim { claim: &'static str, reason: String },
    #[error("JWT expired at {expired_at} (unix seconds); it is now {now}")]
    Expired { expired_at: i64, now: i64 },
    #[error("JWT is not valid before {not_before} (unix seconds); it is now {now}")]
    NotYetValid { not_before: i64, now: i64 },
    #[error("JWT audience does not include {0:?}")]
    AudienceMismatch(String),
    #[error("the validation audience must not be empty")]
    EmptyAudience,
    #[error("the clock is before 1970")]
    ClockBeforeEpoch,
}

/// An ES256 key that signs JWT-SVIDs.
pub struct JwtSigner {
    key: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    kid: String,
    x: String,
    y: String,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// A fresh P-256 key from the system random source.
    pub fn generate() -> Result<JwtSigner, JwtError> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| JwtError::KeyGeneration)?;
        JwtSigner::from_pkcs8(doc.as_ref())
    }

    /// Loads a P-256 key from a PKCS#8 (v1 or v2) DER document, as returned
    /// by [`JwtSigner::pkcs8_der`].
    pub fn from_pkcs8(der: &[u8]) -> Result<JwtSigner, JwtError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(|e| {
            JwtError::InvalidKey(format!("not a PKCS#8 ECDSA P-256 private key ({e})"))
        })?;
        let point = key.public_key().as_ref();
        let (x, y) = split_uncompressed_point(point).ok_or_else(|| {
            JwtError::InvalidKey("public key is not an uncompressed P-256 point".into())
        })?;
        let x = URL_SAFE_NO_PAD.encode(x);
        let y = URL_SAFE_NO_PAD.encode(y);
        let kid = thumbprint(&x, &y);
        Ok(JwtSigner {
            key,
            pkcs8: Zeroizing::new(der.to_vec()),
            kid,
            x,
            y,
        })
    }

    /// The private key as PKCS#8 DER, for the caller to store encrypted.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8.clone()
    }

    /// The key ID: the RFC 7638 JWK thumbprint (SHA-256, base64url), so it is
    /// the same for the same key across restarts and hosts.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK entry for a SPIFFE bundle (`use: jwt-svid`).
    pub fn public_jwk(&self) -> Value {
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": self.x,
            "y": self.y,
            "kid": self.kid,
            "use": JWK_USE,
            "alg": ALGORITHM,
        })
    }

    /// Signs a JWT-SVID for `spiffe_id`, valid for `audience` from `now`
    /// until `now + ttl` (whole seconds, at least one).
    pub fn sign_svid(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, JwtError> {
        SpiffeId::parse(spiffe_id).map_err(|e| JwtError::InvalidRequest(e.to_string()))?;
        if audience.is_empty() {
            return Err(JwtError::InvalidRequest(
                "at least one audience is required".into(),
            ));
        }
        if audience.iter().any(|a| a.is_empty()) {
            return Err(JwtError::InvalidRequest(
                "an audience must not be empty".into(),
            ));
        }
        if ttl.as_secs() == 0 {
            return Err(JwtError::InvalidRequest(
                "the lifetime must be at least one second".into(),
            ));
        }
        let iat = unix_seconds(now)?;
        let ttl = i64::try_from(ttl.as_secs())
            .map_err(|_| JwtError::InvalidRequest("the lifetime is too long".into()))?;
        let exp = iat
            .checked_add(ttl)
            .ok_or_else(|| JwtError::InvalidRequest("the lifetime is too long".into()))?;
        let header = json!({ "alg": ALGORITHM, "kid": self.kid, "typ": "JWT" });
        let claims = json!({ "sub": spiffe_id, "aud": audience, "exp": exp, "iat": iat });
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| JwtError::Signing)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }
}

/// A SPIFFE bundle in JWKS form (SPIFFE Trust Domain and Bundle spec):
/// `{"keys": [...], "spiffe_refresh_hint": 300}`, serialized as JSON.
pub fn jwks(keys: &[Value]) -> Vec<u8> {
    json!({ "keys": keys, "spiffe_refresh_hint": REFRESH_HINT_SECS })
        .to_string()
        .into_bytes()
}

/// What a valid JWT-SVID says.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    /// The `sub` claim, a valid SPIFFE ID.
    pub spiffe_id: String,
    /// The trust domain of `spiffe_id` (without `spiffe://`); the caller
    /// checks that the keys it validated with belong to it.
    pub trust_domain: String,
    /// The `kid` of the key that verified the signature.
    pub key_id: String,
    /// Every claim of the payload, as sent.
    pub claims: Map<String, Value>,
}

/// Validates a JWT-SVID: ES256 only, a `kid` found among `jwks_keys` (JWKs
/// as in a SPIFFE bundle; keys whose `use` is not `jwt-svid` are ignored), a
/// good signature, `exp` not past and `nbf` (if any) reached, with
/// [`LEEWAY`] either way, `aud` containing `audience`, and `sub` a SPIFFE ID.
pub fn validate(
    token: &str,
    audience: &str,
    jwks_keys: &[Value],
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed(format!(
            "token is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts (JWS compact serialization)".into(),
        ));
    };

    let header = decode_json_object(header_b64, "header")?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == ALGORITHM => {}
        Some(Value::String(alg)) => return Err(JwtError::UnsupportedAlgorithm(alg.clone())),
        _ => return Err(JwtError::Malformed("header has no \"alg\" string".into())),
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(_) => {
            return Err(JwtError::Malformed(
                "header \"typ\" must be \"JWT\" or \"JOSE\"".into(),
            ))
        }
    }
    if header.contains_key("crit") {
        return Err(JwtError::Malformed(
            "header \"crit\" extensions are not supported".into(),
        ));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        None => return Err(JwtError::MissingKeyId),
        Some(_) => {
            return Err(JwtError::Malformed(
                "header \"kid\" must be a non-empty string".into(),
            ))
        }
    };

    let key = find_key(jwks_keys, &kid)?;
    let signature = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| JwtError::Malformed("signature is not base64url".into()))?;
    if signature.len() != SIGNATURE_LEN {
        return Err(JwtError::BadSignature);
    }
    let signing_input_len = header_b64.len() + 1 + payload_b64.len();
    let signing_input = &token.as_bytes()[..signing_input_len];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key)
        .verify(signing_input, &signature)
        .map_err(|_| JwtError::BadSignature)?;

    // Only now, with the signature good, are the claims worth reading.
    let claims = decode_json_object(payload_b64, "payload")?;
    let now_secs = unix_seconds(now)?;
    let leeway = LEEWAY.as_secs_f64();
    let now_f = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| JwtError::ClockBeforeEpoch)?
        .as_secs_f64();

    let exp = numeric_date(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    if now_f > exp + leeway {
        return Err(JwtError::Expired {
            expired_at: exp as i64,
            now: now_secs,
        });
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")? {
        if now_f + leeway < nbf {
            return Err(JwtError::NotYetValid {
                not_before: nbf as i64,
                now: now_secs,
            });
        }
    }

    let audience_ok = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(list)) => {
            if list.is_empty() || !list.iter().all(Value::is_string) {
                return Err(JwtError::InvalidClaim {
                    claim: "aud",
                    reason: "must be a string or a non-empty array of strings".into(),
                });
            }
            list.iter().any(|a| a.as_str() == Some(audience))
        }
        Some(_) => {
            return Err(JwtError::InvalidClaim {
                claim: "aud",
                reason: "must be a string or a non-empty array of strings".into(),
            })
        }
    };
    if !audience_ok {
        return Err(JwtError::AudienceMismatch(audience.to_string()));
    }

    let sub = match claims.get("sub") {
        None => return Err(JwtError::MissingClaim("sub")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(JwtError::InvalidClaim {
                claim: "sub",
                reason: "must be a string".into(),
            })
        }
    };
    let id = SpiffeId::parse(&sub).map_err(|e| JwtError::InvalidClaim {
        claim: "sub",
        reason: e.to_string(),
    })?;

    Ok(ValidatedJwt {
        trust_domain: id.trust_domain().as_str().to_string(),
        spiffe_id: sub,
        key_id: kid,
        claims,
    })
}

/// The uncompressed public point (`04 || x || y`) of the bundle key `kid`.
fn find_key(jwks_keys: &[Value], kid: &str) -> Result<Vec<u8>, JwtError> {
    let key = jwks_keys
        .iter()
        .filter_map(Value::as_object)
        .filter(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
        .find(|k| match k.get("use") {
            None => true,
            Some(u) => u.as_str() == Some(JWK_USE),
        })
        .ok_or_else(|| JwtError::UnknownKeyId(kid.to_string()))?;
    let unusable = |reason: &str| JwtError::UnusableKey {
        kid: kid.to_string(),
        reason: reason.to_string(),
    };
    if key.get("kty").and_then(Value::as_str) != Some("EC") {
        return Err(unusable("\"kty\" is not \"EC\""));
    }
    if key.get("crv").and_then(Value::as_str) != Some("P-256") {
        return Err(unusable("\"crv\" is not \"P-256\""));
    }
    if let Some(alg) = key.get("alg") {
        if alg.as_str() != Some(ALGORITHM) {
            return Err(unusable("\"alg\" is not \"ES256\""));
        }
    }
    let coord = |name: &str| -> Result<Vec<u8>, JwtError> {
        let bytes = key
            .get(name)
            .and_then(Value::as_str)
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .ok_or_else(|| unusable("missing or non-base64url coordinate"))?;
        if bytes.len() != COORD_LEN {
            return Err(unusable("coordinate is not 32 bytes"));
        }
        Ok(bytes)
    };
    let mut point = Vec::with_capacity(1 + 2 * COORD_LEN);
    point.push(0x04);
    point.extend_from_slice(&coord("x")?);
    point.extend_from_slice(&coord("y")?);
    Ok(point)
}

fn decode_json_object(part_b64: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part_b64)
        .map_err(|_| JwtError::Malformed(format!("{what} is not base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
        Err(_) => Err(JwtError::Malformed(format!("{what} is not valid JSON"))),
    }
}

/// A NumericDate claim (seconds since the epoch, possibly fractional).
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if n.is_finite() => Ok(Some(n)),
            _ => Err(JwtError::InvalidClaim {
                claim: name,
                reason: "must be a number of seconds since 1970".into(),
            }),
        },
    }
}

fn unix_seconds(t: SystemTime) -> Result<i64, JwtError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| JwtError::ClockBeforeEpoch)?
        .as_secs();
    i64::try_from(secs).map_err(|_| JwtError::InvalidRequest("the clock is out of range".into()))
}

fn split_uncompressed_point(point: &[u8]) -> Option<(&[u8], &[u8])> {
    match point {
        [0x04, rest @ ..] if rest.len() == 2 * COORD_LEN => Some(rest.split_at(COORD_LEN)),
        _ => None,
    }
}

/// RFC 7638 thumbprint of an EC P-256 JWK: SHA-256 over the required members
/// in lexicographic order with no whitespace, base64url without padding.
fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const ID: &str = "spiffe://example.org/web";

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn aud(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn signed(signer: &JwtSigner) -> String {
        signer
            .sign_svid(ID, &aud(&["db", "cache"]), Duration::from_secs(300), t0())
            .unwrap()
    }

    fn b64json(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// Replaces one part of a token, keeping the others.
    fn with_part(token: &str, index: usize, part: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = part;
        parts.join(".")
    }

    fn decode_part(token: &str, index: usize) -> Value {
        let part = token.split('.').nth(index).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn roundtrip_sign_and_validate() {
        let signer = JwtSigner::generate().unwrap();
        let token = signed(&signer);
        let header = decode_part(&token, 0);
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": signer.key_id(), "typ": "JWT"})
        );
        let keys = [signer.public_jwk()];
        let v = validate(&token, "cache", &keys, t0() + Duration::from_secs(10)).unwrap();
        assert_eq!(v.spiffe_id, ID);
        assert_eq!(v.trust_domain, "example.org");
        assert_eq!(v.key_id, signer.key_id());
        assert_eq!(v.claims["aud"], json!(["db", "cache"]));
        assert_eq!(v.claims["iat"], json!(1_700_000_000));
        assert_eq!(v.claims["exp"], json!(1_700_000_300));
        assert_eq!(v.claims["sub"], json!(ID));
    }

    #[test]
    fn pkcs8_roundtrip_keeps_key_and_kid() {
        let a = JwtSigner::generate().unwrap();
        let b = JwtSigner::from_pkcs8(&a.pkcs8_der()).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.public_jwk(), b.public_jwk());
        // A token signed by the reloaded key verifies with the original JWK.
        let token = signed(&b);
        validate(&token, "db", &[a.public_jwk()], t0()).unwrap();
        let other = JwtSigner::generate().unwrap();
        assert_ne!(a.key_id(), other.key_id());
        assert!(matches!(
            JwtSigner::from_pkcs8(b"not a key"),
            Err(JwtError::InvalidKey(_))
        ));
    }

    #[test]
    fn public_jwk_shape_and_debug_hides_key() {
        let s = JwtSigner::generate().unwrap();
        let jwk = s.public_jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["kid"], s.key_id());
        assert_eq!(s.key_id().len(), 43);
        assert!(
            jwk.get("d").is_none(),
            "public JWK must not carry the private key"
        );
        let dbg = format!("{s:?}");
        assert!(dbg.contains(s.key_id()));
        assert!(!dbg.contains(&URL_SAFE_NO_PAD.encode(&*s.pkcs8_der())));
    }

    #[test]
    fn jwks_follows_spiffe_bundle_shape() {
        let s = JwtSigner::generate().unwrap();
        let doc: Value = serde_json::from_slice(&jwks(&[s.public_jwk()])).unwrap();
        assert_eq!(doc["keys"], json!([s.public_jwk()]));
        assert_eq!(doc["spiffe_refresh_hint"], json!(300));
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let signer = JwtSigner::generate().unwrap();
        let token = signed(&signer);
        let mut claims = decode_part(&token, 1);
        claims["sub"] = json!("spiffe://example.org/admin");
        let forged = with_part(&token, 1, &b64json(&claims));
        assert_eq!(
            validate(&forged, "db", &[signer.public_jwk()], t0()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn tampered_signature_is_rejected() {
        let signer = JwtSigner::generate().unwrap();
        let token = signed(&signer);
        let sig_b64 = token.rsplit('.').next().unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig_b64).unwrap();
        sig[10] ^= 0x01;
        let forged = with_part(&token, 2, &URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            validate(&forged, "db", &[signer.public_jwk()], t0()),
            Err(JwtError::BadSignature)
        );
        let truncated = with_part(&token, 2, &URL_SAFE_NO_PAD.encode(&sig[..63]));
        assert_eq!(
            validate(&truncated, "db", &[signer.public_jwk()], t0()),
            Err(JwtError::BadSignature)
        );
        // A signature by another key under the same kid fails too.
        let other = JwtSigner::generate().unwrap();
        let mut jwk = other.public_jwk();
        jwk["kid"] = json!(signer.key_id());
        assert_eq!(
            validate(&token, "db", &[jwk], t0()),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn wrong_audience_is_rejected() {
        let signer = JwtSigner::generate().unwrap();
        let token = signed(&signer);
        let keys = [signer.public_jwk()];
        assert_eq!(
            validate(&token, "payments", &keys, t0()),
            Err(JwtError::AudienceMismatch("payments".into()))
        );
        assert_eq!(
            validate(&token, "", &keys, t0()),
            Err(JwtError::EmptyAudience)
        );
    }

    #[test]
    fn expiry_honours_leeway() {
        let signer = JwtSigner::generate().unwrap();
        let token = signed(&signer);
        let keys = [signer.public_jwk()];
        // exp = t0 + 300; 30 s leeway.
        validate(&token, "db", &keys, t0() + Duration::from_secs(329)).unwrap();
        assert_eq!(
            validate(&token, "db", &keys, t0() + Duration::from_secs(331)),
            Err(JwtError::Expired {
                expired_at: 1_700_000_300,
                now: 1_700_000_331
            })
        );
        let msg = JwtError::Expired {
            expired_at: 1,
            now: 2,
        }
        .to_string();
        assert!(msg.contains("expired"), "{msg}");
    }

    /// Signs arbitrary header and claims with `signer`, for forged tokens.
    fn sign_raw(signer: &JwtSigner, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64json(header), b64json(claims));
        let sig = signer
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn good_claims() -> Value {
        json!({"sub": ID, "aud": ["db"], "exp": 1_700_000_300, "iat": 1_700_000_000})
    }

    #[test]
    fn alg_none_and_hmac_are_rejected() {
        let signer = JwtSigner::generate().unwrap();
        let keys = [signer.public_jwk()];
        let none = format!(
            "{}.{}.",
            b64json(&json!({"alg": "none", "kid": signer.key_id()})),
            b64json(&good_claims())
        );
        assert_eq!(
            validate(&none, "db", &keys, t0()),
            Err(JwtError::UnsupportedAlgorithm("none".into()))
        );
        let hs = sign_raw(
            &signer,
            &json!({"alg": "HS256", "kid": signer.key_id()}),
            &good_claims(),
        );
        assert_eq!(
            validate(&hs, "db", &keys, t0()),
            Err(JwtError::UnsupportedAlgorithm("HS256".into()))
        );
        let no_alg = sign_raw(&signer, &json!({"kid": signer.key_id()}), &good_claims());
        assert!(matches!(
            validate(&no_alg, "db", &keys, t0()),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_or_missing_kid_is_rejected() {
        let signer = JwtSigner::generate().unwrap();
        let other = JwtSigner::generate().unwrap();
        let token = signed(&signer);
        assert_eq!(
            validate(&token, "db", &[other.public_jwk()], t0()),
            Err(JwtError::UnknownKeyId(signer.key_id().to_string()))
        );
        assert_eq!(
            validate(&token, "db", &[], t0()),
            Err(JwtError::UnknownKeyId(signer.key_id().to_string()))
        );
        // A key published for X.509-SVIDs does not verify JWTs.
        let mut x509_use = signer.public_jwk();
        x509_use["use"] = json!("x509-svid");
        assert_eq!(
            validate(&token, "db", &[x509_use], t0()),
            Err(JwtError::UnknownKeyId(signer.key_id().to_string()))
        );
        let no_kid = sign_raw(&signer, &json!({"alg": "ES256"}), &good_claims());
        assert_eq!(
            validate(&no_kid, "db", &[signer.public_jwk()], t0()),
            Err(JwtError::MissingKeyId)
        );
    }

    #[test]
    fn claims_are_checked() {
        let signer = JwtSigner::generate().unwrap();
        let keys = [signer.public_jwk()];
        let header = json!({"alg": "ES256", "kid": signer.key_id(), "typ": "JWT"});
        let check = |edit: &dyn Fn(&mut Value)| {
            let mut claims = good_claims();
            edit(&mut claims);
            validate(&sign_raw(&signer, &header, &claims), "db", &keys, t0())
        };
        assert!(check(&|_| {}).is_ok());
        assert!(check(&|c| c["aud"] = json!("db")).is_ok());
        assert_eq!(
            check(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            Err(JwtError::MissingClaim("exp"))
        );
        assert_eq!(
            check(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            Err(JwtError::MissingClaim("aud"))
        );
        assert_eq!(
            check(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
            Err(JwtError::MissingClaim("sub"))
        );
        assert!(matches!(
            check(&|c| c["sub"] = json!("https://example.org/web")),
            Err(JwtError::InvalidClaim { claim: "sub", .. })
        ));
        assert!(matches!(
            check(&|c| c["exp"] = json!("tomorrow")),
            Err(JwtError::InvalidClaim { claim: "exp", .. })
        ));
        assert!(matches!(
            check(&|c| c["aud"] = json!([])),
            Err(JwtError::InvalidClaim { claim: "aud", .. })
        ));
        assert_eq!(
            check(&|c| c["nbf"] = json!(1_700_000_100)),
            Err(JwtError::NotYetValid {
                not_before: 1_700_000_100,
                now: 1_700_000_000
            })
        );
        assert!(check(&|c| c["nbf"] = json!(1_700_000_020)).is_ok());
    }

    #[test]
    fn malformed_tokens_are_rejected_without_echoing_them() {
        let signer = JwtSigner::generate().unwrap();
        let keys = [signer.public_jwk()];
        let token = signed(&signer);
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.e30.AAAA",
            &format!("{token}.extra"),
            &with_part(&token, 0, &URL_SAFE_NO_PAD.encode("[1]")),
        ] {
            let err = validate(bad, "db", &keys, t0()).unwrap_err();
            assert!(matches!(err, JwtError::Malformed(_)), "{bad:?}: {err}");
        }
        // No error message contains the token or its signature.
        let sig = token.rsplit('.').next().unwrap();
        for err in [
            validate(&token, "other", &keys, t0()).unwrap_err(),
            validate(&token, "db", &[], t0()).unwrap_err(),
            validate(&token, "db", &keys, t0() + Duration::from_secs(9999)).unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(!msg.contains(sig) && !msg.contains(&token), "{msg}");
        }
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            validate(&huge, "db", &keys, t0()),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn signing_rejects_bad_requests() {
        let s = JwtSigner::generate().unwrap();
        let ttl = Duration::from_secs(60);
        assert!(matches!(
            s.sign_svid("not-an-id", &aud(&["a"]), ttl, t0()),
            Err(JwtError::InvalidRequest(_))
        ));
        assert!(matches!(
            s.sign_svid(ID, &[], ttl, t0()),
            Err(JwtError::InvalidRequest(_))
        ));
        assert!(matches!(
            s.sign_svid(ID, &aud(&[""]), ttl, t0()),
            Err(JwtError::InvalidRequest(_))
        ));
        assert!(matches!(
            s.sign_svid(ID, &aud(&["a"]), Duration::from_millis(500), t0()),
            Err(JwtError::InvalidRequest(_))
        ));
    }

    // ---- Interop with an independent implementation (PyJWT + cryptography).

    /// A Python interpreter that can `import jwt, cryptography`: the one named
    /// by `WARDEN_TEST_PYTHON`, else `python3`, else a venv this test makes
    /// under the temp dir. `None` (the test is skipped) only when there is no
    /// python3 or it cannot make a venv with pip.
    fn python_with_pyjwt() -> Option<PathBuf> {
        let imports_ok = |py: &Path| {
            Command::new(py)
                .args(["-c", "import jwt, cryptography"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        let first = std::env::var_os("WARDEN_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("python3"));
        if imports_ok(&first) {
            return Some(first);
        }
        let venv = std::env::temp_dir().join("warden-test-pyjwt-venv");
        let venv_py = venv.join("bin").join("python");
        if imports_ok(&venv_py) {
            return Some(venv_py);
        }
        let have_venv = Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !have_venv {
            eprintln!("SKIPPED: python3 with venv/pip is not available for the PyJWT interop test");
            return None;
        }
        // Build in a private directory, then move into place: concurrent test
        // processes never see a half-made venv.
        let staging = tempfile::Builder::new()
            .prefix("warden-pyjwt-")
            .tempdir()
            .unwrap()
            .keep();
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&staging)
            .status()
            .unwrap()
            .success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(staging.join("bin").join("pip"))
            .args(["install", "-q", "PyJWT", "cryptography"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install PyJWT cryptography failed");
        // A venv still runs after a move; if another process put its venv in
        // place first, keep using ours where it is.
        if std::fs::rename(&staging, &venv).is_ok() {
            Some(venv_py)
        } else {
            Some(staging.join("bin").join("python"))
        }
    }

    const PY_INTEROP: &str = r#"
import base64, hashlib, json, sys, time
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

inp = json.load(sys.stdin)
jwk = inp["jwk"]

# 1. Verify the Rust-signed token with PyJWT (ES256 only).
key = jwt.PyJWK(jwk).key
claims = jwt.decode(inp["token"], key=key, algorithms=["ES256"], audience=inp["audience"])
header = jwt.get_unverified_header(inp["token"])

# 2. The kid is the RFC 7638 thumbprint, computed independently here.
canon = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
thumb = base64.urlsafe_b64encode(hashlib.sha256(canon.encode()).digest()).rstrip(b"=").decode()

# 3. Sign a token in Python for the Rust validator.
priv = ec.generate_private_key(ec.SECP256R1())
pub_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(priv.public_key()))
pub_jwk["kid"] = "py-key"
pub_jwk["use"] = "jwt-svid"
now = int(time.time())
py_token = jwt.encode({"sub": "spiffe://example.org/python", "aud": ["rust"], "exp": now + 300, "iat": now},
                      priv, algorithm="ES256", headers={"kid": "py-key", "typ": "JWT"})
# 4. A wrong-audience decode must fail in PyJWT as well.
try:
    jwt.decode(inp["token"], key=key, algorithms=["ES256"], audience="someone-else")
    wrong_aud = "accepted"
except jwt.InvalidAudienceError:
    wrong_aud = "rejected"
print(json.dumps({"claims": claims, "header": header, "thumbprint": thumb,
                  "py_token": py_token, "py_jwk": pub_jwk, "wrong_aud": wrong_aud}))
"#;

    #[test]
    fn interop_with_pyjwt() {
        let Some(python) = python_with_pyjwt() else {
            return;
        };
        let signer = JwtSigner::generate().unwrap();
        let now = SystemTime::now();
        let token = signer
            .sign_svid(ID, &aud(&["db", "cache"]), Duration::from_secs(300), now)
            .unwrap();
        let input = json!({"jwk": signer.public_jwk(), "token": token, "audience": "cache"});
        let mut child = Command::new(&python)
            .args(["-c", PY_INTEROP])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.to_string().as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "python interop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(result["claims"]["sub"], ID);
        assert_eq!(result["claims"]["aud"], json!(["db", "cache"]));
        assert_eq!(result["header"]["kid"], signer.key_id());
        assert_eq!(result["header"]["alg"], "ES256");
        assert_eq!(result["thumbprint"], signer.key_id());
        assert_eq!(result["wrong_aud"], "rejected");

        let py_token = result["py_token"].as_str().unwrap();
        let py_jwk = result["py_jwk"].clone();
        let v = validate(py_token, "rust", std::slice::from_ref(&py_jwk), now).unwrap();
        assert_eq!(v.spiffe_id, "spiffe://example.org/python");
        assert_eq!(v.key_id, "py-key");
        assert_eq!(
            validate(py_token, "cache", &[py_jwk], now),
            Err(JwtError::AudienceMismatch("cache".into()))
        );
    }
}
