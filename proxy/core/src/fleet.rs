//! Fleet membership on a shared store: node records, single-use join tokens
//! and removal.
//!
//! **Node records** live in the store's meta table under `node/<id>` (JSON,
//! no key material): the node's name (host name and data dir, as on its
//! lease rows), when and how it joined, when it was last seen, the serial
//! and expiry of its current intermediate CA, and whether it was removed
//! (with the serials of the intermediates that removal revoked). The id is
//! derived from the name, so a node finds its own record without a local
//! file. Each write goes through `meta_update` (an advisory lock on
//! PostgreSQL) and is announced like every meta change, so a removal reaches
//! the removed node at once.
//!
//! **Join tokens** (`warden node token`) carry a random 256-bit secret `S`
//! that never enters the store. The store keeps, under `join/<id>`:
//! `HMAC(S, "verify" ‖ id)` (to recognise the token) and, for a key file or
//! systemd-credential master key, the master key sealed with AES-256-GCM
//! under `HMAC(S, "wrap" ‖ id)` (associated data: id and master key id).
//! Neither reveals `S` or the master key to whoever reads the database.
//! `warden node join` consumes the record in one `meta_update`: a token
//! already used, expired or not matching is refused (the record keeps the
//! failed attempts), and a valid one is marked used and its wrapped copy
//! erased in the same transaction, so two joins racing with one token cannot
//! both succeed. Expired tokens' wrapped copies are erased by any running
//! node within 30 s (its identity maintenance), and by `node token` and
//! `node list`.

use crate::crypto::{sha256_hex, Key256};
use crate::error::{Error, ErrorKind, Result};
use crate::masterkey::{Kek, KekSource, SealConfig};
use crate::store::SecretBackend;
use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// Meta keys of node records.
pub const NODE_PREFIX: &str = "node/";
/// Meta keys of join tokens.
pub const TOKEN_PREFIX: &str = "join/";
/// Meta key of the serials of every intermediate CA revoked by a removal (a
/// JSON list): one key, so its change wakes every node.
pub const REVOKED_KEY: &str = "fleet/revoked";
/// What a printed join token starts with.
const TOKEN_TEXT_PREFIX: &str = "wj1.";
/// Shortest and longest token lifetime accepted by `warden node token`.
pub const TOKEN_TTL_MIN: std::time::Duration = std::time::Duration::from_secs(30);
pub const TOKEN_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

const VERIFY_LABEL: &str = "warden.join.verify.v1";
const WRAP_LABEL: &str = "warden.join.wrap.v1";

/// A node's id: 12 hex digits derived from its name (host name and data dir).
pub fn node_id(name: &str) -> String {
    let mut h = sha256_hex(format!("warden.node.v1\0{name}").as_bytes());
    h.truncate(12);
    h
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn now_text() -> String {
    crate::timefmt::now_rfc3339()
}

fn fmt_unix(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .map(crate::timefmt::format_rfc3339)
        .unwrap_or_else(|_| secs.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Active,
    Removed,
}

/// A node's current intermediate CA (public facts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntermediateInfo {
    pub serial: String,
    pub not_after: String,
}

/// One node of the fleet, as `warden node list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// Host name and data dir.
    pub name: String,
    pub hostname: String,
    pub joined_at: String,
    /// `init`, `join token <id>`, or `first start` (a node whose master key
    /// was copied by hand).
    pub joined_via: String,
    pub last_seen: String,
    #[serde(default)]
    pub intermediate: Option<IntermediateInfo>,
    pub state: NodeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_by: Option<String>,
    /// Serials of this node's intermediates revoked by its removal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_intermediates: Vec<String>,
}

/// A join token as stored (no secret: a verifier and a wrapped key copy).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    verifier: String,
    /// The master key sealed under the token's wrapping key (base64), until
    /// the token is used or expires. None for a Shamir-sealed store (a new
    /// node is unsealed with the shares, nothing is handed over).
    #[serde(default)]
    wrapped_kek: Option<String>,
    kek_id: String,
    created_at: String,
    /// Unix seconds.
    expires_at: i64,
    created_by: String,
    created_on: String,
    #[serde(default)]
    used_at: Option<String>,
    #[serde(default)]
    used_by: Option<String>,
    #[serde(default)]
    failed_attempts: u32,
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("fleet record: {e}")))
}

/// A join-token record read back. It holds the sealed master key copy, so
/// a damaged one is reported by position only: serde's messages can quote
/// the text they choke on.
fn token_from_json(key: &str, j: &str) -> Result<TokenRecord> {
    serde_json::from_str(j).map_err(|e| {
        Error::integrity(format!(
            "join token record {key} is damaged (not a token record at line {} column {}); fix: make a new token with `warden node token`",
            e.line(),
            e.column()
        ))
    })
}

fn node_from_json(key: &str, j: &str) -> Result<NodeRecord> {
    serde_json::from_str(j)
        .map_err(|e| Error::integrity(format!("the store's node record {key} is unreadable: {e}")))
}

/// The fleet store, or a usage error naming the fix.
fn fleet_name(backend: &dyn SecretBackend, verb: &str) -> Result<String> {
    backend.node().map(str::to_string).ok_or_else(|| {
        Error::usage(format!(
            "`warden node {verb}` needs a store shared by a fleet: this node uses its own SQLite store; fix: set [store] backend = \"postgres\" (see docs/fleet.md)"
        ))
    })
}

/// Registers the node named `name` (host and data dir) as running, or
/// refreshes its record. A removed node is refused unless `via` is a join
/// (a new token re-admits it). Returns the record.
pub fn register(backend: &mut dyn SecretBackend, name: &str, via: &str) -> Result<NodeRecord> {
    let id = node_id(name);
    let key = format!("{NODE_PREFIX}{id}");
    let rejoin = via.starts_with("join token");
    let mut out: Option<Result<NodeRecord>> = None;
    backend.meta_update(&key, &mut |cur| {
        let now = now_text();
        let rec = match cur {
            Some(j) => {
                let mut r = node_from_json(&key, &j)?;
                if r.state == NodeState::Removed && !rejoin {
                    out = Some(Err(removed_error(&r)));
                    return Ok(j);
                }
                if rejoin {
                    r.state = NodeState::Active;
                    r.removed_at = None;
                    r.removed_by = None;
                    r.joined_at = now.clone();
                    r.joined_via = via.to_string();
                }
                r.hostname = host_name();
                r.last_seen = now;
                r
            }
            None => NodeRecord {
                id: id.clone(),
                name: name.to_string(),
                hostname: host_name(),
                joined_at: now.clone(),
                joined_via: via.to_string(),
                last_seen: now,
                intermediate: None,
                state: NodeState::Active,
                removed_at: None,
                removed_by: None,
                revoked_intermediates: Vec::new(),
            },
        };
        let j = json(&rec)?;
        out = Some(Ok(rec));
        Ok(j)
    })?;
    out.unwrap_or_else(|| Err(Error::internal("node record not written")))
}

fn removed_error(r: &NodeRecord) -> Error {
    Error::denied(format!(
        "this node ({} {}) was removed from the fleet at {} by {}: it serves nothing and its intermediate CA is revoked; fix: to bring it back run `warden node token` on a fleet node, then `warden node join` here",
        r.id,
        r.name,
        r.removed_at.as_deref().unwrap_or("?"),
        r.removed_by.as_deref().unwrap_or("?")
    ))
}

/// The record of node `name`, if any.
pub fn record_of(backend: &dyn SecretBackend, name: &str) -> Result<Option<NodeRecord>> {
    let key = format!("{NODE_PREFIX}{}", node_id(name));
    backend
        .meta_get(&key)?
        .map(|j| node_from_json(&key, &j))
        .transpose()
}

/// Checks that node `name` is still a member: Err (denied, naming the
/// removal and the fix) once it was removed. A missing record (a store
/// restored from an older backup) is written again.
pub fn check_member(backend: &mut dyn SecretBackend, name: &str) -> Result<NodeRecord> {
    match record_of(backend, name)? {
        Some(r) if r.state == NodeState::Removed => Err(removed_error(&r)),
        Some(r) => Ok(r),
        None => register(backend, name, "first start"),
    }
}

/// Updates node `name`'s last-seen time (and, when given, its current
/// intermediate). Refuses (denied) a removed node.
pub fn touch(
    backend: &mut dyn SecretBackend,
    name: &str,
    intermediate: Option<IntermediateInfo>,
) -> Result<NodeRecord> {
    let key = format!("{NODE_PREFIX}{}", node_id(name));
    let mut out: Option<Result<NodeRecord>> = None;
    let updated = backend.meta_update(&key, &mut |cur| {
        let Some(j) = cur else {
            // Nothing is written: the transaction ends with this error.
            return Err(Error::not_found("no node record"));
        };
        let mut r = node_from_json(&key, &j)?;
        if r.state == NodeState::Removed {
            out = Some(Err(removed_error(&r)));
            return Ok(j);
        }
        r.last_seen = now_text();
        if let Some(i) = &intermediate {
            r.intermediate = Some(i.clone());
        }
        let j = json(&r)?;
        out = Some(Ok(r));
        Ok(j)
    });
    match (updated, out) {
        (Err(e), _) if e.kind == ErrorKind::NotFound => register(backend, name, "first start"),
        (Err(e), _) => Err(e),
        (Ok(()), Some(r)) => r,
        (Ok(()), None) => Err(Error::internal("node record not written")),
    }
}

/// Every node record, by id.
pub fn list(backend: &dyn SecretBackend) -> Result<Vec<NodeRecord>> {
    fleet_name(backend, "list")?;
    backend
        .meta_list(NODE_PREFIX)?
        .into_iter()
        .map(|(k, v)| node_from_json(&k, &v))
        .collect()
}

/// Marks node `id` removed (by `by`), revoking its intermediate: it is not
/// renewed, the node refuses to serve and to start. Refuses the node the
/// command runs on (remove it from another node).
pub fn remove(backend: &mut dyn SecretBackend, id: &str, by: &str) -> Result<NodeRecord> {
    let own = fleet_name(backend, "remove")?;
    if node_id(&own) == id {
        return Err(Error::usage(format!(
            "node {id} is the node this command runs on ({own}); fix: run `warden node remove {id}` on another node of the fleet"
        )));
    }
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::usage(format!(
            "{id:?} is not a node id (12 hex digits, as `warden node list` shows)"
        )));
    }
    let key = format!("{NODE_PREFIX}{id}");
    let mut out: Option<Result<NodeRecord>> = None;
    let mut serials = Vec::new();
    backend.meta_update(&key, &mut |cur| {
        let Some(j) = cur else {
            return Err(Error::not_found(format!(
                "no node {id} in this fleet (see `warden node list`)"
            )));
        };
        let mut r = node_from_json(&key, &j)?;
        if r.state == NodeState::Removed {
            out = Some(Err(Error::usage(format!(
                "node {id} was already removed at {} by {}",
                r.removed_at.as_deref().unwrap_or("?"),
                r.removed_by.as_deref().unwrap_or("?")
            ))));
            return Ok(j);
        }
        r.state = NodeState::Removed;
        r.removed_at = Some(now_text());
        r.removed_by = Some(by.to_string());
        if let Some(i) = r.intermediate.take() {
            r.revoked_intermediates.push(i.serial);
        }
        serials = r.revoked_intermediates.clone();
        let j = json(&r)?;
        out = Some(Ok(r));
        Ok(j)
    })?;
    // Every node's mTLS server routes refuse leaves under these from now on.
    if !serials.is_empty() {
        backend.meta_update(REVOKED_KEY, &mut |cur| {
            let mut all: Vec<String> = match cur {
                Some(j) => serde_json::from_str(&j)
                    .map_err(|e| Error::integrity(format!("{REVOKED_KEY} is unreadable: {e}")))?,
                None => Vec::new(),
            };
            for s in &serials {
                if !all.contains(s) {
                    all.push(s.clone());
                }
            }
            json(&all)
        })?;
    }
    out.unwrap_or_else(|| Err(Error::internal("node record not written")))
}

/// The serials of every intermediate revoked by a node's removal.
pub fn revoked_intermediates(backend: &dyn SecretBackend) -> Result<Vec<String>> {
    match backend.meta_get(REVOKED_KEY)? {
        None => Ok(Vec::new()),
        Some(j) => serde_json::from_str(&j)
            .map_err(|e| Error::integrity(format!("{REVOKED_KEY} is unreadable: {e}"))),
    }
}

fn derive(secret: &Key256, label: &str, id: &str) -> hmac::Tag {
    let k = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::sign(&k, format!("{label}\0{id}").as_bytes())
}

fn wrap_aad(id: &str, kek_id: &str) -> Vec<u8> {
    format!("warden.join.kek.v1\0{id}\0{kek_id}").into_bytes()
}

/// A new join token: its text (print it once, never log it) and its id.
pub struct NewToken {
    pub text: Zeroizing<String>,
    pub id: String,
    pub expires_at: String,
    /// Whether the token hands over the master key (false for Shamir).
    pub carries_key: bool,
}

/// Creates a single-use join token valid for `ttl` (see the module docs).
pub fn create_token(
    backend: &mut dyn SecretBackend,
    kek: &Kek,
    seal: &SealConfig,
    ttl: std::time::Duration,
    created_by: &str,
) -> Result<NewToken> {
    let own = fleet_name(backend, "token")?;
    if !(TOKEN_TTL_MIN..=TOKEN_TTL_MAX).contains(&ttl) {
        return Err(Error::usage(format!(
            "--ttl {}s: a join token lives between 30s and 24h; fix: e.g. --ttl 10m",
            ttl.as_secs()
        )));
    }
    let _ = purge_expired_tokens(backend);
    let secret = Key256::generate()?;
    let mut idb = [0u8; 8];
    aws_lc_rs::rand::fill(&mut idb).map_err(|_| Error::internal("system RNG failed"))?;
    let id = hex::encode(idb);
    let verifier = hex::encode(derive(&secret, VERIFY_LABEL, &id).as_ref());
    let carries_key = seal.source != KekSource::Shamir;
    let wrapped_kek = if carries_key {
        let tag = derive(&secret, WRAP_LABEL, &id);
        let wrap = Key256::from_slice(tag.as_ref())
            .ok_or_else(|| Error::internal("HMAC output has the wrong length"))?;
        let sealed = wrap.seal(&wrap_aad(&id, kek.id()), kek.key().as_bytes())?;
        Some(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            sealed,
        ))
    } else {
        None
    };
    let expires = OffsetDateTime::now_utc().unix_timestamp() + ttl.as_secs() as i64;
    let rec = TokenRecord {
        id: id.clone(),
        verifier,
        wrapped_kek,
        kek_id: kek.id().to_string(),
        created_at: now_text(),
        expires_at: expires,
        created_by: created_by.to_string(),
        created_on: node_id(&own),
        used_at: None,
        used_by: None,
        failed_attempts: 0,
    };
    backend.meta_set(&format!("{TOKEN_PREFIX}{id}"), &json(&rec)?)?;
    let text = Zeroizing::new(format!("{TOKEN_TEXT_PREFIX}{id}.{}", &*secret.to_hex()));
    Ok(NewToken {
        text,
        id,
        expires_at: fmt_unix(expires),
        carries_key,
    })
}

/// Erases the wrapped key copies of expired tokens (the records stay, so a
/// late attempt is told "expired"). Returns how many were erased.
pub fn purge_expired_tokens(backend: &mut dyn SecretBackend) -> Result<usize> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut n = 0;
    for (key, j) in backend.meta_list(TOKEN_PREFIX)? {
        let Ok(rec) = serde_json::from_str::<TokenRecord>(&j) else {
            continue;
        };
        if rec.wrapped_kek.is_none() || rec.expires_at > now {
            continue;
        }
        backend.meta_update(&key, &mut |cur| {
            let Some(j) = cur else {
                return Err(Error::not_found(format!(
                    "join token record {key} vanished"
                )));
            };
            let mut r = token_from_json(&key, &j)?;
            r.wrapped_kek = None;
            json(&r)
        })?;
        n += 1;
    }
    Ok(n)
}

/// A parsed join token: its id and secret.
pub struct TokenText {
    pub id: String,
    secret: Key256,
}

/// Reads a token as printed by `warden node token` (surrounding whitespace
/// ignored).
pub fn parse_token(text: &str) -> Result<TokenText> {
    let text = text.trim();
    let bad = || {
        Error::usage(
            "this is not a join token: one looks like wj1.<16 hex>.<64 hex>, as printed by `warden node token` (copied only in part?)",
        )
    };
    let rest = text.strip_prefix(TOKEN_TEXT_PREFIX).ok_or_else(bad)?;
    let (id, secret) = rest.split_once('.').ok_or_else(bad)?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let secret = Key256::from_hex(secret).ok_or_else(bad)?;
    Ok(TokenText {
        id: id.to_ascii_lowercase(),
        secret,
    })
}

/// What a consumed token hands the joining node.
pub struct Joined {
    pub token_id: String,
    /// The master key, when the store's key is a file or a systemd
    /// credential (None for Shamir: unseal with the shares).
    pub kek: Option<Kek>,
}

/// Consumes token `token` for the node `joiner` (see the module docs):
/// refused when unknown, already used, expired or not matching; otherwise
/// marked used, its wrapped copy erased, and the master key unwrapped and
/// checked against `seal`.
pub fn consume_token(
    backend: &mut dyn SecretBackend,
    token: &TokenText,
    joiner: &str,
    seal: &SealConfig,
) -> Result<Joined> {
    let id = token.id.clone();
    let key = format!("{TOKEN_PREFIX}{id}");
    let mut outcome: Option<Result<Option<String>>> = None;
    backend.meta_update(&key, &mut |cur| {
        let Some(j) = cur else {
            return Err(Error::denied(format!(
                "join token {id} is not known to this store: it was made for another fleet's store, or the store was restored from an older backup; fix: make a new one with `warden node token --ttl 10m` on a node of this fleet"
            )));
        };
        let mut r = token_from_json(&key, &j)?;
        let expected = hex::decode(&r.verifier).unwrap_or_default();
        let given = derive(&token.secret, VERIFY_LABEL, &id);
        let matches =
            aws_lc_rs::constant_time::verify_slices_are_equal(&expected, given.as_ref()).is_ok();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let refusal = if !matches {
            r.failed_attempts = r.failed_attempts.saturating_add(1);
            Some(Error::denied(format!(
                "join token {id} does not match what the store holds for it (mistyped or altered); nothing was handed over; fix: copy the whole token, or make a new one with `warden node token`"
            )))
        } else if let Some(at) = &r.used_at {
            r.failed_attempts = r.failed_attempts.saturating_add(1);
            Some(Error::denied(format!(
                "join token {id} was already used at {at} by {}: a token works once (a replay is refused); fix: make a new one with `warden node token --ttl 10m` on a node of the fleet",
                r.used_by.as_deref().unwrap_or("?")
            )))
        } else if now >= r.expires_at {
            r.failed_attempts = r.failed_attempts.saturating_add(1);
            r.wrapped_kek = None;
            Some(Error::denied(format!(
                "join token {id} expired at {}; fix: make a new one with `warden node token --ttl 10m` on a node of the fleet and use it before it expires",
                fmt_unix(r.expires_at)
            )))
        } else {
            None
        };
        match refusal {
            Some(e) => outcome = Some(Err(e)),
            None => {
                r.used_at = Some(now_text());
                r.used_by = Some(joiner.to_string());
                outcome = Some(Ok(r.wrapped_kek.take()));
            }
        }
        json(&r)
    })?;
    let wrapped = outcome.unwrap_or_else(|| Err(Error::internal("join token not read")))?;
    let kek = match wrapped {
        None if seal.source == KekSource::Shamir => None,
        None => {
            return Err(Error::integrity(format!(
                "join token {id} holds no master key copy although the store's key source is {}; the token is used up; fix: make a new one with `warden node token`",
                seal.source
            )))
        }
        Some(b64) => {
            let sealed = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                .map_err(|_| Error::integrity(format!("join token {id}: its key copy is not base64")))?;
            let tag = derive(&token.secret, WRAP_LABEL, &id);
            let wrap = Key256::from_slice(tag.as_ref())
                .ok_or_else(|| Error::internal("HMAC output has the wrong length"))?;
            let raw = wrap.open(&wrap_aad(&id, &seal.kek_id), &sealed).map_err(|_| {
                Error::integrity(format!(
                    "join token {id}: the master key copy failed its integrity check (altered in the store, or the store's master key was rotated after the token was made); fix: make a new token"
                ))
            })?;
            let key = Key256::from_slice(&raw)
                .ok_or_else(|| Error::integrity("the unwrapped master key has the wrong length"))?;
            let kek = Kek::from_key(key);
            seal.verify(&kek, &format!("join token {id}"))?;
            Some(kek)
        }
    };
    Ok(Joined { token_id: id, kek })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masterkey::{create_kek, KekPlan, DEFAULT_CREDENTIAL_NAME};

    fn plan(source: KekSource) -> KekPlan {
        KekPlan {
            source,
            shares: 3,
            threshold: 2,
            credential_name: DEFAULT_CREDENTIAL_NAME.into(),
        }
    }

    #[test]
    fn token_text_roundtrip_and_bad_texts() {
        let t = parse_token(&format!(" wj1.0123456789abcdef.{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(t.id, "0123456789abcdef");
        for bad in [
            "",
            "wj1.",
            "wj2.0123456789abcdef.00",
            "wj1.0123.00",
            &format!("wj1.0123456789abcdef.{}", "ab".repeat(31)),
        ] {
            let e = parse_token(bad).err().unwrap();
            assert!(e.message.contains("not a join token"), "{e}");
        }
    }

    #[test]
    fn a_damaged_token_record_is_reported_without_its_content() {
        let damaged = r#"{"id":"0123456789abcdef","verifier":"v","wrapped_kek":17,"kek_id":"SEALED-KEY-COPY-CANARY"}"#;
        let Err(e) = token_from_json("join-token/0123456789abcdef", damaged) else {
            panic!("a damaged record was accepted");
        };
        assert!(
            e.message.contains("join-token/0123456789abcdef"),
            "{}",
            e.message
        );
        assert!(e.message.contains("line 1 column"), "{}", e.message);
        assert!(!e.message.contains("CANARY"), "{}", e.message);
        assert!(!e.message.contains("17"), "{}", e.message);
    }

    #[test]
    fn node_ids_are_stable_and_short() {
        assert_eq!(node_id("h:/var/lib/warden"), node_id("h:/var/lib/warden"));
        assert_ne!(node_id("h:/a"), node_id("h:/b"));
        assert_eq!(node_id("x").len(), 12);
    }

    fn set_expiry(b: &mut dyn SecretBackend, id: &str, expires_at: i64) {
        let key = format!("{TOKEN_PREFIX}{id}");
        let mut r: TokenRecord = serde_json::from_str(&b.meta_get(&key).unwrap().unwrap()).unwrap();
        r.expires_at = expires_at;
        b.meta_set(&key, &json(&r).unwrap()).unwrap();
    }

    fn record(b: &dyn SecretBackend, id: &str) -> TokenRecord {
        serde_json::from_str(&b.meta_get(&format!("{TOKEN_PREFIX}{id}")).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn a_token_hands_over_the_key_once_and_refuses_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut b1 = crate::store::fleet_sqlite::FleetSqlite::open(&path, "h:/n1");
        let mut b2 = crate::store::fleet_sqlite::FleetSqlite::open(&path, "h:/n2");
        let new = create_kek(&plan(KekSource::File)).unwrap();
        let ttl = std::time::Duration::from_secs(600);
        // Lifetimes outside 30s..24h are refused, naming the flag.
        for bad in [10, 2 * 86400] {
            let e = create_token(
                &mut b1,
                &new.kek,
                &new.seal,
                std::time::Duration::from_secs(bad),
                "t",
            )
            .err()
            .unwrap();
            assert!(e.message.contains("--ttl"), "{e}");
        }
        let t = create_token(&mut b1, &new.kek, &new.seal, ttl, "uid 0 (root)").unwrap();
        assert!(t.carries_key);
        // The store holds no secret: neither the token's nor the key's.
        let stored = b1
            .meta_get(&format!("{TOKEN_PREFIX}{}", t.id))
            .unwrap()
            .unwrap();
        let secret_hex = t.text.rsplit('.').next().unwrap().to_string();
        assert!(!stored.contains(&secret_hex));
        assert!(!stored.contains(&*new.kek.key().to_hex()));
        let token = parse_token(&t.text).unwrap();
        // A mistyped secret: refused and counted, nothing handed over.
        let mut typo = t.text.to_string();
        let last = typo.pop().unwrap();
        typo.push(if last == '0' { '1' } else { '0' });
        let e = consume_token(&mut b2, &parse_token(&typo).unwrap(), "h:/n2", &new.seal)
            .err()
            .unwrap();
        assert!(e.message.contains("does not match"), "{e}");
        assert_eq!(record(&b2, &t.id).failed_attempts, 1);
        assert!(record(&b2, &t.id).wrapped_kek.is_some());
        // The right token: the key, once.
        let joined = consume_token(&mut b2, &token, "h:/n2", &new.seal).unwrap();
        assert_eq!(joined.kek.unwrap().id(), new.kek.id());
        let r = record(&b2, &t.id);
        assert!(r.wrapped_kek.is_none() && r.used_by.as_deref() == Some("h:/n2"));
        let e = consume_token(&mut b1, &token, "h:/n3", &new.seal)
            .err()
            .unwrap();
        assert!(
            e.message.contains("already used") && e.message.contains("h:/n2"),
            "{e}"
        );
        assert_eq!(e.kind, ErrorKind::Denied);

        // Expired: refused, and its key copy erased then (or by the purge).
        let t2 = create_token(&mut b1, &new.kek, &new.seal, ttl, "t").unwrap();
        set_expiry(&mut b1, &t2.id, 1);
        let e = consume_token(&mut b2, &parse_token(&t2.text).unwrap(), "h:/n2", &new.seal)
            .err()
            .unwrap();
        assert!(e.message.contains("expired"), "{e}");
        assert!(record(&b1, &t2.id).wrapped_kek.is_none());
        let t3 = create_token(&mut b1, &new.kek, &new.seal, ttl, "t").unwrap();
        set_expiry(&mut b1, &t3.id, 1);
        assert_eq!(purge_expired_tokens(&mut b1).unwrap(), 1);
        assert!(record(&b1, &t3.id).wrapped_kek.is_none());

        // Made before a master key rotation: an integrity error, never a wrong key.
        let t4 = create_token(&mut b1, &new.kek, &new.seal, ttl, "t").unwrap();
        let rotated = create_kek(&plan(KekSource::File)).unwrap();
        let e = consume_token(
            &mut b2,
            &parse_token(&t4.text).unwrap(),
            "h:/n2",
            &rotated.seal,
        )
        .err()
        .unwrap();
        assert!(e.message.contains("rotated"), "{e}");
        // Unknown to this store.
        let e = consume_token(
            &mut b2,
            &parse_token(&format!("wj1.00000000000000aa.{}", "11".repeat(32))).unwrap(),
            "h:/n2",
            &new.seal,
        )
        .err()
        .unwrap();
        assert!(e.message.contains("not known to this store"), "{e}");

        // A Shamir store's token carries no key.
        let shamir = create_kek(&plan(KekSource::Shamir)).unwrap();
        let t5 = create_token(&mut b1, &shamir.kek, &shamir.seal, ttl, "t").unwrap();
        assert!(!t5.carries_key);
        let joined = consume_token(
            &mut b2,
            &parse_token(&t5.text).unwrap(),
            "h:/n2",
            &shamir.seal,
        )
        .unwrap();
        assert!(joined.kek.is_none());
    }

    #[test]
    fn nodes_register_are_removed_and_come_back_with_a_join() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut b1 = crate::store::fleet_sqlite::FleetSqlite::open(&path, "h:/n1");
        let mut b2 = crate::store::fleet_sqlite::FleetSqlite::open(&path, "h:/n2");
        register(&mut b1, "h:/n1", "init").unwrap();
        let r2 = check_member(&mut b2, "h:/n2").unwrap();
        assert_eq!(r2.joined_via, "first start");
        let info = IntermediateInfo {
            serial: "ab".repeat(16),
            not_after: "2030-01-01T00:00:00Z".into(),
        };
        touch(&mut b2, "h:/n2", Some(info.clone())).unwrap();
        assert_eq!(list(&b1).unwrap().len(), 2);
        // Not from itself; not an unknown or malformed id.
        let e = remove(&mut b2, &r2.id, "t").err().unwrap();
        assert!(e.message.contains("another node"), "{e}");
        assert_eq!(
            remove(&mut b1, "000000000000", "t").err().unwrap().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            remove(&mut b1, "xyz", "t").err().unwrap().kind,
            ErrorKind::Usage
        );
        let removed = remove(&mut b1, &r2.id, "uid 0 on h:/n1").unwrap();
        assert_eq!(removed.revoked_intermediates, vec![info.serial.clone()]);
        assert_eq!(
            revoked_intermediates(&b1).unwrap(),
            vec![info.serial.clone()]
        );
        assert!(remove(&mut b1, &r2.id, "t")
            .err()
            .unwrap()
            .message
            .contains("already removed"));
        // The removed node is refused at every step, naming the fix.
        for e in [
            check_member(&mut b2, "h:/n2").err().unwrap(),
            touch(&mut b2, "h:/n2", None).err().unwrap(),
            register(&mut b2, "h:/n2", "first start").err().unwrap(),
        ] {
            assert_eq!(e.kind, ErrorKind::Denied);
            assert!(e.message.contains("warden node join"), "{e}");
        }
        // A join re-admits it.
        let back = register(&mut b2, "h:/n2", "join token 0011223344556677").unwrap();
        assert_eq!(back.state, NodeState::Active);
        assert!(check_member(&mut b2, "h:/n2").is_ok());
    }

    #[test]
    fn sqlite_store_has_no_fleet_verbs() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = crate::store::sqlite::SqliteBackend::open(&dir.path().join("s.db")).unwrap();
        let new = create_kek(&plan(KekSource::File)).unwrap();
        let e = create_token(
            &mut b,
            &new.kek,
            &new.seal,
            std::time::Duration::from_secs(600),
            "t",
        )
        .err()
        .unwrap();
        assert!(e.message.contains("backend = \"postgres\""), "{e}");
        assert!(list(&b).is_err());
    }
}
