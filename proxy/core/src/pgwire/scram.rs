//! SCRAM-SHA-256 client (RFC 5802, RFC 7677) for authenticating warden TO
//! PostgreSQL, with an optional `tls-server-end-point` channel binding
//! (RFC 5929) for `SCRAM-SHA-256-PLUS`, a bounded cache of derived keys, and
//! the legacy md5 response.
//!
//! The exchange, as PostgreSQL runs it inside its SASL messages:
//!
//! 1. [`ScramClient::client_first`] → `n,,n=,r=<client nonce>` (PostgreSQL
//!    ignores the SCRAM user name and takes the role from the startup
//!    packet, so the name is empty, as libpq sends it);
//! 2. [`ScramClient::handle_server_first`] checks `r=` (extends our nonce),
//!    `s=` (base64 salt), `i=` (at least [`MIN_ITERATIONS`]: a lower count is
//!    refused as a downgrade), derives the keys and answers with the
//!    client-final message and its proof;
//! 3. [`ScramClient::handle_server_final`] verifies the server's signature
//!    `v=` in constant time, so warden knows it reached a server that holds
//!    the verifier; `e=` comes back as [`ScramError::ServerError`].
//!
//! **Password preparation.** RFC 5802 asks for SASLprep; PostgreSQL applies
//! it but falls back to the raw bytes when the password is not valid UTF-8
//! or preparation fails. This client always uses the raw bytes. That is the
//! same result for every ASCII password without control characters (SASLprep
//! leaves those unchanged), which is what warden generates; a non-ASCII
//! password that SASLprep would change (e.g. one containing U+00A0) will not
//! authenticate.
//!
//! **Key cache.** PBKDF2 costs `i` HMAC rounds per login. The salted password
//! only depends on (password, salt, iterations), so [`ScramKeyCache`] keeps
//! `ClientKey`/`ServerKey` per (cache tag, salt, iterations, password
//! fingerprint). The tag names the secret version (e.g. `orders-db/app@v3`)
//! so a rotated secret never meets an old entry; the fingerprint (HMAC of the
//! password under a random per-cache key) makes a reused tag harmless too.
//! Entries are zeroized when evicted, cleared or dropped.
//!
//! All key material lives in [`Zeroizing`] buffers and no `Debug` output
//! shows any of it. Nothing here does I/O; the PBKDF2 of a cache miss is the
//! only costly step (about a millisecond at 4096 iterations).

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2, rand};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use md5::{Digest as _, Md5};
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use zeroize::{Zeroize, Zeroizing};

/// Fewest PBKDF2 iterations accepted (RFC 7677's minimum, PostgreSQL's default).
pub const MIN_ITERATIONS: u32 = 4096;
/// Most PBKDF2 iterations accepted: a server (or a man in the middle of a
/// plaintext connection) must not make warden spin for minutes.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Entries a [`ScramKeyCache::new`] cache holds before evicting the least
/// recently used.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;
/// Random bytes in the client nonce (base64: 24 characters).
const NONCE_BYTES: usize = 18;

const MECHANISM: &str = "SCRAM-SHA-256";
const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

type Key32 = Zeroizing<[u8; 32]>;

/// Channel binding for the exchange, which decides the GS2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// No TLS: GS2 header `n,,`, mechanism `SCRAM-SHA-256`.
    None,
    /// TLS, but the server offered only `SCRAM-SHA-256`: GS2 header `y,,`
    /// ("I could bind, I think you cannot"). A server that does support
    /// binding rejects this, which stops a man in the middle from stripping
    /// `-PLUS` from the offer.
    SupportedButNotUsed,
    /// `tls-server-end-point` (RFC 5929): the hash of the server's leaf
    /// certificate — SHA-256 for certificates signed with MD5, SHA-1 or
    /// SHA-256, else the certificate's own signature hash. GS2 header
    /// `p=tls-server-end-point,,`, mechanism `SCRAM-SHA-256-PLUS`.
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ChannelBinding::None => "n,,",
            ChannelBinding::SupportedButNotUsed => "y,,",
            ChannelBinding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    /// The `c=` value: base64 of the GS2 header and the binding data.
    fn c_attribute(&self) -> String {
        let mut input = self.gs2_header().as_bytes().to_vec();
        if let ChannelBinding::TlsServerEndPoint(hash) = self {
            input.extend_from_slice(hash);
        }
        BASE64.encode(input)
    }
}

/// Why a SCRAM exchange failed. Every variant means: do not use this session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScramError {
    /// A step was called in the wrong order or after a failure.
    #[error("SCRAM exchange out of order: {0}")]
    OutOfOrder(&'static str),
    /// The system random generator failed, so there is no client nonce.
    #[error("the system random generator failed; no SCRAM nonce")]
    Random,
    /// A server message does not follow RFC 5802's grammar.
    #[error("malformed SCRAM {message}: {reason}")]
    Malformed {
        message: &'static str,
        reason: String,
    },
    /// The server demands an extension (`m=`) this client does not know.
    #[error("the server demands an unsupported SCRAM extension (m=)")]
    MandatoryExtension,
    /// The server's nonce does not extend the client's.
    #[error("the server's nonce does not extend the client nonce (replay or man in the middle?)")]
    NonceMismatch,
    /// Fewer iterations than [`MIN_ITERATIONS`].
    #[error("the server asks for {iterations} PBKDF2 iterations, below the minimum of {min}; refusing a downgrade")]
    IterationsTooLow { iterations: u32, min: u32 },
    /// More iterations than [`MAX_ITERATIONS`].
    #[error("the server asks for {iterations} PBKDF2 iterations, above the maximum of {max}")]
    IterationsTooHigh { iterations: u32, max: u32 },
    /// The server's final signature is wrong: it does not hold the verifier
    /// for this password (or the channel binding differs).
    #[error("the server's SCRAM signature does not verify")]
    ServerSignatureMismatch,
    /// The server ended the exchange with `e=<reason>`, e.g. `invalid-proof`.
    #[error("the server rejected the SCRAM exchange: {0}")]
    ServerError(String),
}

fn malformed(message: &'static str, reason: impl Into<String>) -> ScramError {
    ScramError::Malformed {
        message,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Key cache.

/// ClientKey and ServerKey of one (password, salt, iterations).
#[derive(Clone)]
struct DerivedKeys {
    client_key: Key32,
    server_key: Key32,
}

impl DerivedKeys {
    fn derive(password: &[u8], salt: &[u8], iterations: NonZeroU32) -> DerivedKeys {
        let mut salted: Key32 = Zeroizing::new([0; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            salt,
            password,
            &mut salted[..],
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
        DerivedKeys {
            client_key: hmac_32(&key, b"Client Key"),
            server_key: hmac_32(&key, b"Server Key"),
        }
    }
}

fn hmac_32(key: &hmac::Key, data: &[u8]) -> Key32 {
    let mut out: Key32 = Zeroizing::new([0; 32]);
    out.copy_from_slice(hmac::sign(key, data).as_ref());
    out
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tag: String,
    salt: Vec<u8>,
    iterations: u32,
    /// HMAC-SHA-256 of the password under the cache's random key.
    password: [u8; 32],
}

struct CacheEntry {
    keys: DerivedKeys,
    last_used: u64,
}

struct CacheInner {
    map: HashMap<CacheKey, CacheEntry>,
    clock: u64,
}

/// Derived SCRAM keys, shared by every connection of the process.
///
/// Bounded ([`DEFAULT_CACHE_CAPACITY`] entries unless
/// [`ScramKeyCache::with_capacity`] says otherwise); when full, the least
/// recently used entry is evicted. Values are zeroized when evicted, cleared
/// or dropped. Thread-safe; PBKDF2 runs outside the lock.
pub struct ScramKeyCache {
    inner: Mutex<CacheInner>,
    fingerprint_key: hmac::Key,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Default for ScramKeyCache {
    fn default() -> Self {
        ScramKeyCache::new()
    }
}

impl ScramKeyCache {
    /// A cache of [`DEFAULT_CACHE_CAPACITY`] entries.
    pub fn new() -> ScramKeyCache {
        ScramKeyCache::with_capacity(DEFAULT_CACHE_CAPACITY)
    }

    /// A cache of `capacity` entries (at least 1).
    pub fn with_capacity(capacity: usize) -> ScramKeyCache {
        let mut seed: Key32 = Zeroizing::new([0; 32]);
        // Should the generator fail, the fingerprint is still a keyed hash
        // that tells passwords apart, just under a known key.
        let _ = rand::fill(&mut seed[..]);
        ScramKeyCache {
            inner: Mutex::new(CacheInner {
                map: HashMap::new(),
                clock: 0,
            }),
            fingerprint_key: hmac::Key::new(hmac::HMAC_SHA256, &seed[..]),
            capacity: capacity.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Lookups answered from the cache (PBKDF2 skipped).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that ran PBKDF2.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Entries held.
    fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// The map is valid whatever a panicking holder was doing, so a poisoned
    /// lock is simply taken over.
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn key(&self, tag: &str, salt: &[u8], iterations: u32, password: &[u8]) -> CacheKey {
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(hmac::sign(&self.fingerprint_key, password).as_ref());
        CacheKey {
            tag: tag.to_string(),
            salt: salt.to_vec(),
            iterations,
            password: fingerprint,
        }
    }

    /// The keys for (tag, salt, iterations, password): cached, or derived
    /// and cached.
    fn keys(&self, tag: &str, salt: &[u8], iterations: NonZeroU32, password: &[u8]) -> DerivedKeys {
        let key = self.key(tag, salt, iterations.get(), password);
        {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            if let Some(entry) = inner.map.get_mut(&key) {
                entry.last_used = now;
                self.hits.fetch_add(1, Ordering::Relaxed);
                return entry.keys.clone();
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let keys = DerivedKeys::derive(password, salt, iterations);
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if !inner.map.contains_key(&key) && inner.map.len() >= self.capacity {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.map.remove(&oldest); // the entry's keys zeroize on drop
            }
        }
        inner.map.insert(
            key,
            CacheEntry {
                keys: keys.clone(),
                last_used: now,
            },
        );
        keys
    }
}

impl fmt::Debug for ScramKeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeyCache")
            .field("entries", &self.len())
            .field("capacity", &self.capacity)
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// The client.

enum State {
    /// `client_first` not called yet.
    Start,
    /// client-first sent; waiting for server-first.
    FirstSent,
    /// client-final sent; the server's signature we expect.
    FinalSent { server_signature: Key32 },
    /// The server's signature verified.
    Done,
    /// A step failed; the exchange is over.
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Start => "start",
            State::FirstSent => "client-first sent",
            State::FinalSent { .. } => "client-final sent",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

/// One SCRAM-SHA-256[-PLUS] exchange, as a state machine:
/// [`client_first`](Self::client_first) →
/// [`handle_server_first`](Self::handle_server_first) →
/// [`handle_server_final`](Self::handle_server_final). Any error ends it.
pub struct ScramClient<'c> {
    cache: &'c ScramKeyCache,
    cache_tag: String,
    /// Emptied (and zeroized) once the keys are derived.
    password: Zeroizing<Vec<u8>>,
    binding: ChannelBinding,
    /// `n=` value, already escaped (empty for PostgreSQL).
    username: String,
    /// None when the random generator failed.
    nonce: Option<String>,
    /// Fewest iterations accepted from the server (downgrade defence).
    min_iterations: u32,
    state: State,
}

impl<'c> ScramClient<'c> {
    /// A new exchange for `password` (used as raw bytes, see the module
    /// documentation) with a fresh random nonce. `cache_tag` names the
    /// secret version, e.g. `orders-db/app@v3`.
    pub fn new(
        password: &[u8],
        binding: ChannelBinding,
        cache: &'c ScramKeyCache,
        cache_tag: &str,
    ) -> ScramClient<'c> {
        let mut raw = Zeroizing::new([0u8; NONCE_BYTES]);
        let nonce = rand::fill(&mut raw[..])
            .ok()
            .map(|()| BASE64.encode(&raw[..]));
        ScramClient {
            cache,
            cache_tag: cache_tag.to_string(),
            password: Zeroizing::new(password.to_vec()),
            binding,
            username: String::new(),
            nonce,
            min_iterations: MIN_ITERATIONS,
            state: State::Start,
        }
    }

    /// Accepts iteration counts down to `min` (at least 1) instead of
    /// [`MIN_ITERATIONS`]: for logins whose verifier warden generated itself
    /// with that count (lease roles, see [`verifier`]).
    pub fn with_min_iterations(mut self, min: u32) -> ScramClient<'c> {
        self.min_iterations = min.max(1);
        self
    }

    /// Test-only: a fixed user name and nonce, for RFC test vectors.
    #[cfg(test)]
    fn with_nonce(
        password: &[u8],
        binding: ChannelBinding,
        cache: &'c ScramKeyCache,
        cache_tag: &str,
        user: &str,
        nonce: &str,
    ) -> ScramClient<'c> {
        let mut client = ScramClient::new(password, binding, cache, cache_tag);
        client.username = user.replace('=', "=3D").replace(',', "=2C");
        client.nonce = Some(nonce.to_string());
        client
    }

    /// The SASL mechanism to name in SASLInitialResponse:
    /// `SCRAM-SHA-256-PLUS` with `tls-server-end-point` binding, else
    /// `SCRAM-SHA-256`.
    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ChannelBinding::TlsServerEndPoint(_) => MECHANISM_PLUS,
            _ => MECHANISM,
        }
    }

    fn client_first_bare(&self) -> String {
        format!(
            "n={},r={}",
            self.username,
            self.nonce.as_deref().unwrap_or("")
        )
    }

    /// The client-first message, e.g. `n,,n=,r=<nonce>`. Calling it again
    /// before the server answers returns the same bytes. Should the random
    /// generator have failed, the nonce is empty and
    /// [`handle_server_first`](Self::handle_server_first) fails with
    /// [`ScramError::Random`]: the exchange can never succeed.
    pub fn client_first(&mut self) -> Vec<u8> {
        if let State::Start = self.state {
            self.state = State::FirstSent;
        }
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare()).into_bytes()
    }

    /// Checks the server-first message and returns the client-final message
    /// (`c=…,r=…,p=<proof>`).
    pub fn handle_server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        match std::mem::replace(&mut self.state, State::Failed) {
            State::FirstSent => {}
            State::Start => return Err(ScramError::OutOfOrder("server-first before client-first")),
            _ => {
                return Err(ScramError::OutOfOrder(
                    "server-first received twice or after a failure",
                ))
            }
        }
        let client_nonce = self.nonce.clone().ok_or(ScramError::Random)?;
        let what = "server-first-message";
        let text = std::str::from_utf8(data).map_err(|_| malformed(what, "not valid UTF-8"))?;
        if text.starts_with("m=") {
            return Err(ScramError::MandatoryExtension);
        }
        let mut attrs = text.split(',');
        if let Some(reason) = text.split(',').next().and_then(|a| a.strip_prefix("e=")) {
            return Err(ScramError::ServerError(reason.to_string()));
        }
        let server_nonce = attribute(what, attrs.next(), 'r')?;
        let salt_b64 = attribute(what, attrs.next(), 's')?;
        let iterations_text = attribute(what, attrs.next(), 'i')?;
        for ext in attrs {
            // Extensions (RFC 5802 §7): "x=value"; none is understood.
            if !valid_extension(ext) {
                return Err(malformed(what, format!("invalid attribute {ext:?}")));
            }
        }

        if server_nonce.is_empty() || !server_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(malformed(what, "nonce holds non-printable characters"));
        }
        if server_nonce.len() <= client_nonce.len() || !server_nonce.starts_with(&client_nonce) {
            return Err(ScramError::NonceMismatch);
        }
        let salt = BASE64
            .decode(salt_b64)
            .map_err(|e| malformed(what, format!("salt is not base64: {e}")))?;
        if salt.is_empty() {
            return Err(malformed(what, "empty salt"));
        }
        if iterations_text.is_empty() || !iterations_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed(
                what,
                format!("iteration count {iterations_text:?} is not a number"),
            ));
        }
        let iterations: u32 = iterations_text.parse().unwrap_or(u32::MAX);
        if iterations < self.min_iterations {
            return Err(ScramError::IterationsTooLow {
                iterations,
                min: self.min_iterations,
            });
        }
        if iterations > MAX_ITERATIONS {
            return Err(ScramError::IterationsTooHigh {
                iterations,
                max: MAX_ITERATIONS,
            });
        }
        let Some(rounds) = NonZeroU32::new(iterations) else {
            return Err(ScramError::IterationsTooLow {
                iterations,
                min: self.min_iterations,
            });
        };

        let keys = self
            .cache
            .keys(&self.cache_tag, &salt, rounds, &self.password);
        // The password is no longer needed.
        self.password = Zeroizing::new(Vec::new());

        let without_proof = format!("c={},r={}", self.binding.c_attribute(), server_nonce);
        let auth_message = format!("{},{},{}", self.client_first_bare(), text, without_proof);

        let mut stored_key: Key32 = Zeroizing::new([0; 32]);
        stored_key.copy_from_slice(digest::digest(&digest::SHA256, &keys.client_key[..]).as_ref());
        let client_signature = hmac_32(
            &hmac::Key::new(hmac::HMAC_SHA256, &stored_key[..]),
            auth_message.as_bytes(),
        );
        let mut proof: Key32 = Zeroizing::new([0; 32]);
        for (p, (k, s)) in proof
            .iter_mut()
            .zip(keys.client_key.iter().zip(client_signature.iter()))
        {
            *p = k ^ s;
        }
        let server_signature = hmac_32(
            &hmac::Key::new(hmac::HMAC_SHA256, &keys.server_key[..]),
            auth_message.as_bytes(),
        );
        self.state = State::FinalSent { server_signature };
        Ok(format!("{},p={}", without_proof, BASE64.encode(&proof[..])).into_bytes())
    }

    /// Checks the server-final message: `v=<signature>` must match in
    /// constant time; `e=<reason>` is [`ScramError::ServerError`].
    pub fn handle_server_final(&mut self, data: &[u8]) -> Result<(), ScramError> {
        let expected = match std::mem::replace(&mut self.state, State::Failed) {
            State::FinalSent { server_signature } => server_signature,
            State::Done => return Err(ScramError::OutOfOrder("server-final received twice")),
            _ => {
                return Err(ScramError::OutOfOrder(
                    "server-final before client-final or after a failure",
                ))
            }
        };
        let what = "server-final-message";
        let text = std::str::from_utf8(data).map_err(|_| malformed(what, "not valid UTF-8"))?;
        let mut attrs = text.split(',');
        let first = attrs.next().unwrap_or("");
        if let Some(reason) = first.strip_prefix("e=") {
            return Err(ScramError::ServerError(reason.to_string()));
        }
        let verifier = first
            .strip_prefix("v=")
            .ok_or_else(|| malformed(what, "neither v= nor e="))?;
        for ext in attrs {
            if !valid_extension(ext) {
                return Err(malformed(what, format!("invalid attribute {ext:?}")));
            }
        }
        let signature = Zeroizing::new(
            BASE64
                .decode(verifier)
                .map_err(|e| malformed(what, format!("signature is not base64: {e}")))?,
        );
        constant_time::verify_slices_are_equal(&signature, &expected[..])
            .map_err(|_| ScramError::ServerSignatureMismatch)?;
        self.state = State::Done;
        Ok(())
    }

    /// Whether the server's signature has verified. Check it when
    /// AuthenticationOk arrives after a SCRAM exchange: a server (or a man in
    /// the middle) that skips SASLFinal has proven nothing, and with
    /// `-PLUS` the binding would go unchecked.
    pub fn server_verified(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

impl fmt::Debug for ScramClient<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field("mechanism", &self.mechanism())
            .field("cache_tag", &self.cache_tag)
            .field("state", &self.state.name())
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The value of attribute `name` (`name=value`), or a Malformed error.
fn attribute<'a>(
    message: &'static str,
    attr: Option<&'a str>,
    name: char,
) -> Result<&'a str, ScramError> {
    let attr = attr.ok_or_else(|| malformed(message, format!("missing {name}= attribute")))?;
    let mut chars = attr.chars();
    match (chars.next(), chars.next()) {
        (Some(n), Some('=')) if n == name => Ok(chars.as_str()),
        _ => Err(malformed(
            message,
            format!("expected {name}= attribute, found {attr:?}"),
        )),
    }
}

fn valid_extension(attr: &str) -> bool {
    let b = attr.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'='
}

// ---------------------------------------------------------------------------
// md5.

/// A SCRAM-SHA-256 verifier for `password` (`SCRAM-SHA-256$<i>:<salt>$<StoredKey>:<ServerKey>`,
/// the form PostgreSQL stores), with a fresh random salt and `iterations`
/// PBKDF2 rounds. warden sends this, never the password, in
/// `CREATE ROLE`/`ALTER ROLE … PASSWORD`, so the plaintext never reaches the
/// server's statement log. The derived keys are put in `cache` under `tag`,
/// so the first login with the new password skips PBKDF2.
///
/// The count matters for guessable passwords only: stretching slows down a
/// dictionary attack on a leaked verifier. Passwords warden generates carry
/// 256 random bits, out of reach at any count, so lease roles use a small
/// one (PostgreSQL runs one PBKDF2 with the verifier's count in every
/// `CREATE ROLE … PASSWORD`, to refuse empty passwords: ~7 ms of server CPU
/// per lease at 4096 on the project's machines).
pub fn verifier(
    cache: &ScramKeyCache,
    tag: &str,
    password: &[u8],
    iterations: u32,
) -> Option<Zeroizing<String>> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt).ok()?;
    let rounds = NonZeroU32::new(iterations)?;
    let keys = cache.keys(tag, &salt, rounds, password);
    let stored = digest::digest(&digest::SHA256, &keys.client_key[..]);
    Some(Zeroizing::new(format!(
        "SCRAM-SHA-256${}:{}${}:{}",
        iterations,
        BASE64.encode(salt),
        BASE64.encode(stored.as_ref()),
        BASE64.encode(&keys.server_key[..])
    )))
}

/// The response to AuthenticationMD5Password:
/// `"md5" + hex(md5(hex(md5(password + user)) + salt))`, 35 characters. The
/// caller sends it as a PasswordMessage with a terminating NUL.
pub fn md5_password(user: &str, password: &[u8], salt: [u8; 4]) -> String {
    let mut inner = Md5::new();
    inner.update(password);
    inner.update(user.as_bytes());
    let mut digest = inner.finalize();
    // hex(md5(password + user)) is what the server stores: password-equivalent.
    let mut inner_hex: Zeroizing<[u8; 32]> = Zeroizing::new([0; 32]);
    hex_into(&digest, &mut inner_hex[..]);
    digest.as_mut_slice().zeroize();

    let mut outer = Md5::new();
    outer.update(&inner_hex[..]);
    outer.update(salt);
    let digest = outer.finalize();
    let mut out = [0u8; 32];
    hex_into(&digest, &mut out);
    let mut response = String::with_capacity(35);
    response.push_str("md5");
    response.extend(out.iter().map(|&b| char::from(b)));
    response
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    /// RFC 7677 §3 (checked against Python's hashlib too; note the brief this
    /// was written from quoted a corrupted value, `…/wt/+mMJ7rPX…`).
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client<'c>(cache: &'c ScramKeyCache, tag: &str) -> ScramClient<'c> {
        ScramClient::with_nonce(b"pencil", ChannelBinding::None, cache, tag, "user", NONCE)
    }

    fn text(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    /// Runs Python (hashlib/hmac) to compute an expected value independently.
    fn python(script: &str) -> String {
        let out = ["python3", "/usr/bin/python3"]
            .iter()
            .find_map(|exe| Command::new(exe).arg("-c").arg(script).output().ok())
            .expect("python3 is needed to compute the expected values");
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn rfc7677_test_vector() {
        let cache = ScramKeyCache::new();
        let mut c = rfc_client(&cache, "t");
        assert_eq!(c.mechanism(), "SCRAM-SHA-256");
        assert_eq!(text(c.client_first()), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let fin = c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(text(fin), CLIENT_FINAL);
        assert!(!c.server_verified());
        c.handle_server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert!(c.server_verified());
        assert_eq!((cache.hits(), cache.misses()), (0, 1));
    }

    #[test]
    fn cache_skips_pbkdf2_for_the_same_tag_salt_and_iterations() {
        let cache = ScramKeyCache::new();
        for round in 0..2 {
            let mut c = rfc_client(&cache, "orders-db/app@v3");
            c.client_first();
            let fin = c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
            // The cached keys give the same, correct, answer.
            assert_eq!(text(fin), CLIENT_FINAL, "round {round}");
            c.handle_server_final(SERVER_FINAL.as_bytes()).unwrap();
        }
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 1, 1));

        // Another tag (a rotated secret) misses.
        let mut c = rfc_client(&cache, "orders-db/app@v4");
        c.client_first();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 2, 2));

        // Same tag, another password (a reused tag) misses and is not fooled.
        let mut c = ScramClient::with_nonce(
            b"pencil2",
            ChannelBinding::None,
            &cache,
            "orders-db/app@v3",
            "user",
            NONCE,
        );
        c.client_first();
        let fin = text(c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap());
        assert_ne!(fin, CLIENT_FINAL);
        assert_eq!((cache.hits(), cache.misses()), (1, 3));
        assert_eq!(
            c.handle_server_final(SERVER_FINAL.as_bytes()),
            Err(ScramError::ServerSignatureMismatch)
        );

        // Another salt or iteration count misses.
        let other_salt =
            SERVER_FIRST.replace("W22ZaJ0SNY7soEsUEjb6gQ==", "AAAAAAAAAAAAAAAAAAAAAA==");
        let more_rounds = SERVER_FIRST.replace("i=4096", "i=4097");
        for server_first in [other_salt, more_rounds] {
            let mut c = rfc_client(&cache, "orders-db/app@v3");
            c.client_first();
            c.handle_server_first(server_first.as_bytes()).unwrap();
        }
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 5, 5));
    }

    #[test]
    fn cache_is_bounded_and_evicts_the_least_recently_used() {
        let cache = ScramKeyCache::with_capacity(2);
        let run = |tag: &str| {
            let mut c = rfc_client(&cache, tag);
            c.client_first();
            c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        };
        run("a");
        run("b");
        run("a"); // hit: "b" is now the least recently used
        run("c"); // evicts "b"
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 3, 2));
        run("a");
        assert_eq!(cache.hits(), 2);
        run("b");
        assert_eq!((cache.hits(), cache.misses(), cache.len()), (2, 4, 2));
    }

    #[test]
    fn cache_is_shared_across_threads() {
        let cache = ScramKeyCache::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut c = rfc_client(&cache, "t");
                    c.client_first();
                    assert_eq!(
                        text(c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap()),
                        CLIENT_FINAL
                    );
                });
            }
        });
        assert_eq!(cache.hits() + cache.misses(), 4);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn wrong_server_signature_is_refused() {
        let cache = ScramKeyCache::new();
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        // One bit off (last byte 0x6e → 0x6f).
        let e = c.handle_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G8=");
        assert_eq!(e, Err(ScramError::ServerSignatureMismatch));
        assert!(!c.server_verified());
        // The exchange is over, even with the right signature now.
        assert!(matches!(
            c.handle_server_final(SERVER_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder(_))
        ));

        for bad in ["v=", "v=AAAA", "v=not base64!", "x=1", "", "v"] {
            let mut c = rfc_client(&cache, "t");
            c.client_first();
            c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
            let e = c.handle_server_final(bad.as_bytes()).unwrap_err();
            assert!(
                matches!(
                    e,
                    ScramError::ServerSignatureMismatch | ScramError::Malformed { .. }
                ),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn server_error_is_reported() {
        let cache = ScramKeyCache::new();
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        let e = c.handle_server_final(b"e=invalid-proof").unwrap_err();
        assert_eq!(e, ScramError::ServerError("invalid-proof".into()));
        assert_eq!(
            e.to_string(),
            "the server rejected the SCRAM exchange: invalid-proof"
        );
    }

    #[test]
    fn nonce_must_extend_ours() {
        let cache = ScramKeyCache::new();
        for server_first in [
            SERVER_FIRST.replace("r=rOprNGfwEbeRWgbNEkqO", "r=XOprNGfwEbeRWgbNEkqO"),
            SERVER_FIRST.replace("r=rOprNGfwEbeRWgbNEkqO", "r=rOprNGfwEbeRWgbNEkq"),
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".to_string(),
            "r=abc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".to_string(),
        ] {
            let mut c = rfc_client(&cache, "t");
            c.client_first();
            assert_eq!(
                c.handle_server_first(server_first.as_bytes()),
                Err(ScramError::NonceMismatch),
                "{server_first}"
            );
        }
        assert_eq!(cache.misses(), 0, "no PBKDF2 before the nonce is checked");
    }

    #[test]
    fn iteration_counts_are_bounded() {
        let cache = ScramKeyCache::new();
        let first = |i: &str| SERVER_FIRST.replace("i=4096", &format!("i={i}"));
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        let e = c.handle_server_first(first("1000").as_bytes()).unwrap_err();
        assert_eq!(
            e,
            ScramError::IterationsTooLow {
                iterations: 1000,
                min: 4096
            }
        );
        assert!(e.to_string().contains("downgrade"));
        for (i, want_low) in [
            ("4095", true),
            ("0", true),
            ("10000001", false),
            ("99999999999", false),
        ] {
            let mut c = rfc_client(&cache, "t");
            c.client_first();
            let e = c.handle_server_first(first(i).as_bytes()).unwrap_err();
            assert_eq!(
                matches!(e, ScramError::IterationsTooLow { .. }),
                want_low,
                "{i}: {e}"
            );
            assert!(
                matches!(
                    e,
                    ScramError::IterationsTooLow { .. } | ScramError::IterationsTooHigh { .. }
                ),
                "{i}: {e}"
            );
        }
        for i in ["", "+5000", "-1", "4096x", "0x1000"] {
            let mut c = rfc_client(&cache, "t");
            c.client_first();
            assert!(matches!(
                c.handle_server_first(first(i).as_bytes()),
                Err(ScramError::Malformed { .. })
            ));
        }
        assert_eq!(cache.misses(), 0);
    }

    #[test]
    fn malformed_server_first() {
        let cache = ScramKeyCache::new();
        let n = "r=rOprNGfwEbeRWgbNEkqOxyz";
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                format!("{n},s=W22ZaJ0SNY7soEsUEjb6gQ==").into_bytes(),
                "missing i=",
            ),
            (
                format!("{n},i=4096,s=W22ZaJ0SNY7soEsUEjb6gQ==").into_bytes(),
                "expected s=",
            ),
            (format!("{n},s=!!!,i=4096").into_bytes(), "not base64"),
            (format!("{n},s=,i=4096").into_bytes(), "empty salt"),
            (
                format!("{n},s=c2FsdA==,i=4096,??").into_bytes(),
                "invalid attribute",
            ),
            (b"s=c2FsdA==,r=x,i=4096".to_vec(), "expected r="),
            (b"\xff".to_vec(), "UTF-8"),
            (b"".to_vec(), "expected r="),
        ];
        for (data, want) in cases {
            let mut c = rfc_client(&cache, "t");
            c.client_first();
            let e = c.handle_server_first(&data).unwrap_err();
            assert!(
                e.to_string().contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(&data)
            );
        }
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        assert_eq!(
            c.handle_server_first(format!("m=ext,{n},s=c2FsdA==,i=4096").as_bytes()),
            Err(ScramError::MandatoryExtension)
        );
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        assert_eq!(
            c.handle_server_first(b"e=other-error,x=1"),
            Err(ScramError::ServerError("other-error".into()))
        );
        // Extensions after i= are allowed and ignored.
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        assert!(c
            .handle_server_first(format!("{SERVER_FIRST},x=y").as_bytes())
            .is_ok());
    }

    #[test]
    fn steps_out_of_order() {
        let cache = ScramKeyCache::new();
        let mut c = rfc_client(&cache, "t");
        assert!(matches!(
            c.handle_server_final(SERVER_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder(_))
        ));
        let mut c = rfc_client(&cache, "t");
        assert!(matches!(
            c.handle_server_first(SERVER_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder(_))
        ));
        let mut c = rfc_client(&cache, "t");
        assert_eq!(c.client_first(), c.client_first());
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert!(matches!(
            c.handle_server_first(SERVER_FIRST.as_bytes()),
            Err(ScramError::OutOfOrder(_))
        ));
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        c.handle_server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert!(matches!(
            c.handle_server_final(SERVER_FINAL.as_bytes()),
            Err(ScramError::OutOfOrder(_))
        ));
    }

    #[test]
    fn real_client_first_has_a_fresh_nonce_and_empty_user() {
        let cache = ScramKeyCache::new();
        let a = text(ScramClient::new(b"pw", ChannelBinding::None, &cache, "t").client_first());
        let b = text(ScramClient::new(b"pw", ChannelBinding::None, &cache, "t").client_first());
        let nonce = a.strip_prefix("n,,n=,r=").unwrap();
        assert_eq!(nonce.len(), 24);
        assert_eq!(BASE64.decode(nonce).unwrap().len(), NONCE_BYTES);
        assert!(!nonce.contains(','));
        assert_ne!(a, b);
        let y = text(
            ScramClient::new(b"pw", ChannelBinding::SupportedButNotUsed, &cache, "t")
                .client_first(),
        );
        assert!(y.starts_with("y,,n=,r="));
        let mut p = ScramClient::new(
            b"pw",
            ChannelBinding::TlsServerEndPoint(vec![1; 32]),
            &cache,
            "t",
        );
        assert_eq!(p.mechanism(), "SCRAM-SHA-256-PLUS");
        assert!(text(p.client_first()).starts_with("p=tls-server-end-point,,n=,r="));
    }

    /// The same exchange computed by Python from RFC 5802's definitions, for
    /// each channel binding mode.
    #[test]
    fn channel_binding_matches_an_independent_implementation() {
        let hash: Vec<u8> = (0u8..32).map(|b| b.wrapping_mul(7)).collect();
        let cases = [
            (ChannelBinding::None, "SCRAM-SHA-256", b"n,,".to_vec()),
            (
                ChannelBinding::SupportedButNotUsed,
                "SCRAM-SHA-256",
                b"y,,".to_vec(),
            ),
            (
                ChannelBinding::TlsServerEndPoint(hash.clone()),
                "SCRAM-SHA-256-PLUS",
                [b"p=tls-server-end-point,,".as_slice(), &hash].concat(),
            ),
        ];
        let cache = ScramKeyCache::new();
        let client_nonce = "fyko+d2lbbFgONRv9qkxdawL";
        let server_first = "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
        for (binding, mechanism, cbind) in cases {
            let mut c =
                ScramClient::with_nonce(b"s3cr3t-Pa55", binding, &cache, "t", "", client_nonce);
            assert_eq!(c.mechanism(), mechanism);
            let first = text(c.client_first());
            let fin = text(c.handle_server_first(server_first.as_bytes()).unwrap());
            let script = format!(
                r#"
import base64, hashlib, hmac
first = {first:?}
server_first = {server_first:?}
cbind = bytes.fromhex({cbind:?})
bare = first[first.index("n="):]
salted = hashlib.pbkdf2_hmac("sha256", b"s3cr3t-Pa55", base64.b64decode("QSXCR+Q6sek8bf92"), 4096)
ck = hmac.new(salted, b"Client Key", "sha256").digest()
sk = hmac.new(salted, b"Server Key", "sha256").digest()
nonce = server_first.split(",")[0][2:]
without = "c=" + base64.b64encode(cbind).decode() + ",r=" + nonce
auth = (bare + "," + server_first + "," + without).encode()
sig = hmac.new(hashlib.sha256(ck).digest(), auth, "sha256").digest()
proof = bytes(a ^ b for a, b in zip(ck, sig))
print(without + ",p=" + base64.b64encode(proof).decode())
print("v=" + base64.b64encode(hmac.new(sk, auth, "sha256").digest()).decode())
"#,
                cbind = cbind.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            );
            let out = python(&script);
            let (want_final, want_server_final) = out.split_once('\n').unwrap();
            assert_eq!(fin, want_final, "{mechanism} {first}");
            c.handle_server_final(want_server_final.as_bytes()).unwrap();
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let cache = ScramKeyCache::new();
        let mut c = ScramClient::new(b"hunter2-secret", ChannelBinding::None, &cache, "db/app@v1");
        c.client_first();
        let shown = format!("{c:?} {cache:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("SCRAM-SHA-256"),
            "{shown}"
        );
        let mut c = rfc_client(&cache, "t");
        c.client_first();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("pencil") && !shown.contains("6rriTRBi"),
            "{shown}"
        );
    }

    #[test]
    fn password_is_zeroized_after_key_derivation() {
        let cache = ScramKeyCache::new();
        let mut c = rfc_client(&cache, "t");
        assert_eq!(&c.password[..], b"pencil");
        c.client_first();
        c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert!(c.password.is_empty());
    }

    #[test]
    fn md5_matches_python() {
        let got = md5_password("postgres", b"postgres", [1, 2, 3, 4]);
        let want = python(
            "import hashlib; i = hashlib.md5(b'postgres' + b'postgres').hexdigest().encode(); \
             print('md5' + hashlib.md5(i + bytes([1, 2, 3, 4])).hexdigest())",
        );
        assert_eq!(want.len(), 35);
        assert_eq!(got, want);
        // Order matters: password first, then user.
        let got = md5_password("app", b"S3cret!", [0xff, 0, 0x7f, 0x80]);
        let want = python(
            "import hashlib; i = hashlib.md5(b'S3cret!' + b'app').hexdigest().encode(); \
             print('md5' + hashlib.md5(i + bytes([255, 0, 127, 128])).hexdigest())",
        );
        assert_eq!(got, want);
    }

    #[test]
    fn empty_password_does_not_panic() {
        let cache = ScramKeyCache::new();
        let mut c = ScramClient::with_nonce(b"", ChannelBinding::None, &cache, "t", "", NONCE);
        c.client_first();
        assert!(c.handle_server_first(SERVER_FIRST.as_bytes()).is_ok());
    }
}
