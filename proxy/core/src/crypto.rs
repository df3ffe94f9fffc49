//! Cryptographic primitives used by the secret store, all from aws-lc-rs (the
//! crypto core rustls already brings): AES-256-GCM sealing with associated data,
//! random keys, HMAC-SHA-256 fingerprints and SHA-256 digests.
//!
//! Every key lives in a [`Key256`], which zeroizes itself on drop; every
//! decrypted value comes back in a [`Zeroizing`] buffer.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::{digest, hmac, rand};
use zeroize::{Zeroize, Zeroizing};

/// Length of every symmetric key warden uses (AES-256, HMAC-SHA-256).
pub const KEY_LEN: usize = 32;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("the system random number generator failed")]
    Random,
    #[error("authenticated decryption failed: the data was modified, moved from another record, or sealed with another key")]
    Open,
    #[error("sealed data is too short to be valid ({0} bytes)")]
    TooShort(usize),
    #[error("internal crypto error: {0}")]
    Internal(&'static str),
}

/// A 256-bit symmetric key, zeroized on drop. Debug never prints the bytes.
#[derive(Clone, Zeroize)]
#[zeroize(drop)]
pub struct Key256([u8; KEY_LEN]);

impl std::fmt::Debug for Key256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key256(<redacted>)")
    }
}

impl Key256 {
    /// A fresh key from the system CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = [0u8; KEY_LEN];
        rand::fill(&mut k).map_err(|_| CryptoError::Random)?;
        Ok(Key256(k))
    }

    /// Takes a key from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Key256(arr))
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = Zeroizing::new(hex::decode(text.trim()).ok()?);
        let key = Self::from_slice(&bytes);
        bytes.zeroize();
        key
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// HMAC-SHA-256 of `label` under this key, hex encoded. Used as a key
    /// fingerprint ("key check value"): it identifies a key without revealing it.
    pub fn fingerprint(&self, label: &str) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        hex::encode(hmac::sign(&k, label.as_bytes()).as_ref())
    }

    /// Constant-time check that this key has the given fingerprint.
    pub fn matches_fingerprint(&self, label: &str, fingerprint_hex: &str) -> bool {
        let Ok(expected) = hex::decode(fingerprint_hex) else {
            return false;
        };
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        hmac::verify(&k, label.as_bytes(), &expected).is_ok()
    }

    /// Seals `plaintext` with AES-256-GCM under a fresh random nonce, binding
    /// `aad`. Output: nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self.aead_key()?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        let sealed = key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        );
        if sealed.is_err() {
            body.zeroize();
            return Err(CryptoError::Internal("AES-GCM seal failed"));
        }
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens data produced by [`Key256::seal`] with the same `aad`. Any change to
    /// the data, the aad or the key gives [`CryptoError::Open`].
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::TooShort(sealed.len()));
        }
        let key = self.aead_key()?;
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| CryptoError::Internal("nonce length"))?;
        let mut buf = Zeroizing::new(body.to_vec());
        let plain_len = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptoError::Open)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }

    fn aead_key(&self) -> Result<LessSafeKey, CryptoError> {
        let unbound = UnboundKey::new(&AES_256_GCM, &self.0)
            .map_err(|_| CryptoError::Internal("AES-256 key rejected"))?;
        Ok(LessSafeKey::new(unbound))
    }
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let k = Key256::generate().unwrap();
        let sealed = k.seal(b"row-1", b"hunter2").unwrap();
        assert_eq!(&**k.open(b"row-1", &sealed).unwrap(), b"hunter2");
        // Wrong associated data: refused.
        assert!(matches!(k.open(b"row-2", &sealed), Err(CryptoError::Open)));
        // Wrong key: refused.
        let other = Key256::generate().unwrap();
        assert!(matches!(
            other.open(b"row-1", &sealed),
            Err(CryptoError::Open)
        ));
        // Every flipped byte is detected.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(k.open(b"row-1", &t).is_err(), "flip at {i} undetected");
        }
        assert!(matches!(
            k.open(b"", &[0u8; 5]),
            Err(CryptoError::TooShort(5))
        ));
    }

    #[test]
    fn fingerprint_identifies_key() {
        let k = Key256::generate().unwrap();
        let fp = k.fingerprint("label");
        assert!(k.matches_fingerprint("label", &fp));
        assert!(!k.matches_fingerprint("other", &fp));
        assert!(!Key256::generate()
            .unwrap()
            .matches_fingerprint("label", &fp));
        assert!(!k.matches_fingerprint("label", "zz"));
    }

    #[test]
    fn hex_roundtrip_and_debug_redacts() {
        let k = Key256::generate().unwrap();
        let h = k.to_hex();
        let k2 = Key256::from_hex(&format!("  {}\n", &*h)).unwrap();
        assert_eq!(k.as_bytes(), k2.as_bytes());
        assert!(Key256::from_hex("abcd").is_none());
        assert_eq!(format!("{k:?}"), "Key256(<redacted>)");
    }
}
