//! The password proofs warden computes for its login upstream:
//! `mysql_native_password`, `caching_sha2_password` (the scramble, and the
//! RSA-OAEP encrypted password of its full authentication without TLS),
//! and MariaDB's `client_ed25519`. Hashes and RSA come from aws-lc-rs (as
//! everywhere in warden); the Ed25519 curve arithmetic from
//! curve25519-dalek, because MariaDB derives the key from SHA-512 of the
//! password itself, which no Ed25519 signing API accepts as a seed.

use aws_lc_rs::digest;
use curve25519_dalek::{EdwardsPoint, Scalar};
use zeroize::Zeroizing;

/// Plugin names.
pub const NATIVE: &[u8] = b"mysql_native_password";
pub const CACHING_SHA2: &[u8] = b"caching_sha2_password";
pub const ED25519: &[u8] = b"client_ed25519";
pub const CLEAR: &[u8] = b"mysql_clear_password";

pub(crate) fn sha1(parts: &[&[u8]]) -> digest::Digest {
    let mut c = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    for p in parts {
        c.update(p);
    }
    c.finish()
}

fn sha256(parts: &[&[u8]]) -> digest::Digest {
    let mut c = digest::Context::new(&digest::SHA256);
    for p in parts {
        c.update(p);
    }
    c.finish()
}

fn sha512(parts: &[&[u8]]) -> Zeroizing<[u8; 64]> {
    let mut c = digest::Context::new(&digest::SHA512);
    for p in parts {
        c.update(p);
    }
    let mut out = Zeroizing::new([0u8; 64]);
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// The first 20 bytes of a scramble (servers send 20, some with a NUL).
fn nonce20(scramble: &[u8]) -> &[u8] {
    &scramble[..scramble.len().min(20)]
}

/// `mysql_native_password`: SHA1(pw) XOR SHA1(scramble, SHA1(SHA1(pw))).
/// An empty password sends an empty proof.
pub fn native_password(password: &[u8], scramble: &[u8]) -> Zeroizing<Vec<u8>> {
    if password.is_empty() {
        return Zeroizing::new(Vec::new());
    }
    let stage1 = sha1(&[password]);
    let stage2 = sha1(&[stage1.as_ref()]);
    let mix = sha1(&[nonce20(scramble), stage2.as_ref()]);
    Zeroizing::new(
        stage1
            .as_ref()
            .iter()
            .zip(mix.as_ref())
            .map(|(a, b)| a ^ b)
            .collect(),
    )
}

/// `caching_sha2_password`: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)), nonce).
pub fn caching_sha2(password: &[u8], scramble: &[u8]) -> Zeroizing<Vec<u8>> {
    if password.is_empty() {
        return Zeroizing::new(Vec::new());
    }
    let p1 = sha256(&[password]);
    let p2 = sha256(&[p1.as_ref()]);
    let p3 = sha256(&[p2.as_ref(), nonce20(scramble)]);
    Zeroizing::new(
        p1.as_ref()
            .iter()
            .zip(p3.as_ref())
            .map(|(a, b)| a ^ b)
            .collect(),
    )
}

/// The password with its NUL, XORed with the scramble and encrypted with
/// the server's RSA public key (PEM, SubjectPublicKeyInfo) under OAEP —
/// `caching_sha2_password`'s full authentication on a connection without
/// TLS.
pub fn rsa_encrypted_password(
    password: &[u8],
    scramble: &[u8],
    pem: &[u8],
) -> Result<Vec<u8>, String> {
    use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA1_MGF1SHA1};
    use base64::Engine;
    let text = std::str::from_utf8(pem).map_err(|_| "the server's public key is not text")?;
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| format!("the server's public key is not PEM: {e}"))?;
    let key = PublicEncryptingKey::from_der(&der)
        .map_err(|e| format!("the server's public key is not an RSA key: {e}"))?;
    let key = OaepPublicEncryptingKey::new(key)
        .map_err(|_| "the server's RSA key cannot be used for OAEP".to_string())?;
    let nonce = nonce20(scramble);
    if nonce.is_empty() {
        return Err("the server sent no scramble".into());
    }
    let mut plain = Zeroizing::new(Vec::with_capacity(password.len() + 1));
    plain.extend_from_slice(password);
    plain.push(0);
    for (i, b) in plain.iter_mut().enumerate() {
        *b ^= nonce[i % nonce.len()];
    }
    if plain.len() > key.max_plaintext_size(&OAEP_SHA1_MGF1SHA1) {
        return Err("the password is too long for the server's RSA key".into());
    }
    let mut out = vec![0u8; key.ciphertext_size()];
    let n = key
        .encrypt(&OAEP_SHA1_MGF1SHA1, &plain, &mut out, None)
        .map_err(|_| "RSA encryption of the password failed".to_string())?
        .len();
    out.truncate(n);
    Ok(out)
}

/// MariaDB's `client_ed25519`: an Ed25519 signature of the server's nonce
/// whose secret scalar and nonce prefix are SHA-512 of the password (the
/// standard derivation, with the password in place of a 32-byte seed).
pub fn ed25519(password: &[u8], nonce: &[u8]) -> Zeroizing<Vec<u8>> {
    let az = sha512(&[password]);
    let mut a_bytes = Zeroizing::new([0u8; 32]);
    a_bytes.copy_from_slice(&az[..32]);
    a_bytes[0] &= 248;
    a_bytes[31] &= 63;
    a_bytes[31] |= 64;
    let a = Zeroizing::new(Scalar::from_bytes_mod_order(*a_bytes));
    let public = EdwardsPoint::mul_base(&a).compress();
    let r = Zeroizing::new(Scalar::from_bytes_mod_order_wide(&sha512(&[
        &az[32..],
        nonce,
    ])));
    let big_r = EdwardsPoint::mul_base(&r).compress();
    let k =
        Scalar::from_bytes_mod_order_wide(&sha512(&[big_r.as_bytes(), public.as_bytes(), nonce]));
    let s = k * *a + *r;
    let mut sig = Zeroizing::new(Vec::with_capacity(64));
    sig.extend_from_slice(big_r.as_bytes());
    sig.extend_from_slice(s.as_bytes());
    sig
}

/// The public key MariaDB stores for an ed25519 user (base64 without
/// padding, as `ed25519_password(pw)` shows it).
pub fn ed25519_public_key(password: &[u8]) -> String {
    use base64::Engine;
    let az = sha512(&[password]);
    let mut a_bytes = Zeroizing::new([0u8; 32]);
    a_bytes.copy_from_slice(&az[..32]);
    a_bytes[0] &= 248;
    a_bytes[31] &= 63;
    a_bytes[31] |= 64;
    let a = Zeroizing::new(Scalar::from_bytes_mod_order(*a_bytes));
    base64::engine::general_purpose::STANDARD_NO_PAD
        .encode(EdwardsPoint::mul_base(&a).compress().as_bytes())
}

/// The proof for `plugin` over `scramble`; None: warden does not speak it
/// in a first answer (clear text goes only over TLS, decided by the caller).
pub fn proof(plugin: &[u8], password: &[u8], scramble: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    match plugin {
        NATIVE => Some(native_password(password, scramble)),
        CACHING_SHA2 => Some(caching_sha2(password, scramble)),
        ED25519 => Some(ed25519(password, scramble)),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn native_password_matches_the_servers_stored_hash() {
        // The server checks SHA1(proof XOR SHA1(scramble, stage2)) against
        // its stored stage2 — what PASSWORD('secret') shows after the '*'.
        let scramble: Vec<u8> = (1..=20).collect();
        let proof = native_password(b"secret", &scramble);
        let stage2 = sha1(&[sha1(&[b"secret"]).as_ref()]);
        let mix = sha1(&[&scramble, stage2.as_ref()]);
        let stage1: Vec<u8> = proof.iter().zip(mix.as_ref()).map(|(a, b)| a ^ b).collect();
        assert_eq!(hex(sha1(&[&stage1]).as_ref()), hex(stage2.as_ref()));
        // SELECT PASSWORD('secret') in MySQL/MariaDB.
        assert_eq!(
            hex(stage2.as_ref()).to_uppercase(),
            "14E65567ABDB5135D0CFD9A70B3032C179A49EE7"
        );
        assert!(native_password(b"", &scramble).is_empty());
    }

    #[test]
    fn caching_sha2_is_the_xor_of_the_hash_chain() {
        let scramble: Vec<u8> = (1..=20).collect();
        let proof = caching_sha2(b"secret", &scramble);
        assert_eq!(proof.len(), 32);
        // The server recovers SHA256(pw) with its cached SHA256(SHA256(pw)).
        let p2 = sha256(&[sha256(&[b"secret"]).as_ref()]);
        let p3 = sha256(&[p2.as_ref(), &scramble]);
        let p1: Vec<u8> = proof.iter().zip(p3.as_ref()).map(|(a, b)| a ^ b).collect();
        assert_eq!(hex(sha256(&[&p1]).as_ref()), hex(p2.as_ref()));
        assert!(caching_sha2(b"", &scramble).is_empty());
    }

    #[test]
    fn ed25519_signatures_verify_under_the_derived_public_key() {
        use aws_lc_rs::signature::{UnparsedPublicKey, ED25519 as VERIFY};
        use base64::Engine;
        let nonce = [7u8; 32];
        for pw in [&b"secret"[..], b"", &[0xaa; 100]] {
            let sig = ed25519(pw, &nonce);
            let pk = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(ed25519_public_key(pw))
                .unwrap();
            UnparsedPublicKey::new(&VERIFY, &pk)
                .verify(&nonce, &sig)
                .unwrap();
            assert!(UnparsedPublicKey::new(&VERIFY, &pk)
                .verify(&[8u8; 32], &sig)
                .is_err());
        }
        // The public key MariaDB 10.11 itself stored for a user created
        // IDENTIFIED VIA ed25519 USING PASSWORD('pw2').
        assert_eq!(
            ed25519_public_key(b"pw2"),
            "iGRouygp5VwPhO1Nw3XHv2nRNSJmY6g6Clsn5zqjRqU"
        );
        // A 32-byte password is a standard Ed25519 seed: aws-lc-rs agrees.
        let seed = [3u8; 32];
        let kp = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        assert_eq!(kp.sign(&nonce).as_ref(), &ed25519(&seed, &nonce)[..]);
    }

    #[test]
    fn the_rsa_encrypted_password_decrypts_to_the_xored_password() {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::rsa::{
            KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA1_MGF1SHA1,
        };
        use base64::Engine;
        let private = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
        let der = private.public_key().as_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        let scramble: Vec<u8> = (1..=20).collect();
        let enc = rsa_encrypted_password(b"secret", &scramble, pem.as_bytes()).unwrap();
        let dec_key = OaepPrivateDecryptingKey::new(private).unwrap();
        let mut out = vec![0u8; dec_key.min_output_size()];
        let plain = dec_key
            .decrypt(&OAEP_SHA1_MGF1SHA1, &enc, &mut out, None)
            .unwrap();
        let unxored: Vec<u8> = plain
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ scramble[i % 20])
            .collect();
        assert_eq!(unxored, b"secret\0");
        assert!(rsa_encrypted_password(b"x", &scramble, b"not a key").is_err());
    }
}
