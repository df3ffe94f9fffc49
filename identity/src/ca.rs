//! The local certificate authority and X.509-SVID issuance.
//!
//! A CA is either a self-signed root created for the trust domain, or an
//! upstream intermediate imported so an organisation's PKI stays the root of
//! trust. Either way it carries no name constraints (rustls-webpki and others
//! reject every leaf with a URI SAN under a CA with URI name constraints).
//!
//! Leaves follow the SPIFFE X509-SVID spec: exactly one URI SAN (the SPIFFE
//! ID), BasicConstraints present and critical with CA:FALSE, KeyUsage present
//! and critical with digitalSignature only, EKU serverAuth + clientAuth, a random
//! positive 128-bit serial, NotBefore backdated for clock skew and NotAfter never
//! past the CA's.
//!
//! Which peers verify which leaf key types: ECDSA P-256 — everyone (OpenSSL,
//! rustls, Go, Java, browsers). Ed25519 — OpenSSL ≥ 1.1.1, rustls, Go; not
//! older Java or most HSM-backed stacks. ML-DSA-65 — only post-quantum-aware
//! stacks (aws-lc based rustls builds, OpenSSL ≥ 3.5); classic peers reject it.
//! The CA itself signs with ECDSA P-256 unless imported, so chains stay
//! verifiable wherever the leaf key type is.

use crate::{IdentityError, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use std::time::Duration;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// How far NotBefore is backdated so peers with a slightly slow clock accept
/// a fresh certificate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Leaf key types warden issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    EcP256,
    Ed25519,
    MlDsa65,
}

impl KeyType {
    pub fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            KeyType::MlDsa65 => &rcgen::PKCS_ML_DSA_65,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::Ed25519 => "ed25519",
            KeyType::MlDsa65 => "ml-dsa-65",
        }
    }

    pub fn parse(s: &str) -> Option<KeyType> {
        match s {
            "ec-p256" => Some(KeyType::EcP256),
            "ed25519" => Some(KeyType::Ed25519),
            "ml-dsa-65" => Some(KeyType::MlDsa65),
            _ => None,
        }
    }
}

/// What must be persisted to reload a CA: the certificate (public), its key
/// (secret: the caller stores it encrypted) and, for an imported intermediate,
/// the upstream chain above it (public).
pub struct CaMaterial {
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub chain_der: Vec<Vec<u8>>,
}

/// A loaded CA, ready to sign.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    cert_der: Vec<u8>,
    chain_der: Vec<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    serial_hex: String,
}

/// An issued X.509-SVID: the chain (leaf first, then any intermediates up to
/// but excluding the root) and its private key.
pub struct X509Svid {
    pub spiffe_id: SpiffeId,
    pub cert_chain_der: Vec<Vec<u8>>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub serial_hex: String,
    pub key_type: KeyType,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A TLS server certificate for a local listener (DNS/IP names, not a SPIFFE
/// ID): what `sslmode=verify-full` clients check against the trust bundle.
pub struct TlsServerCert {
    pub cert_chain_der: Vec<Vec<u8>>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A freshly signed leaf, before it is labelled as an SVID or a server cert.
struct SignedLeaf {
    chain: Vec<Vec<u8>>,
    key_pkcs8: Zeroizing<Vec<u8>>,
    serial_hex: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn gen_err(e: rcgen::Error) -> IdentityError {
    IdentityError::Generation(e.to_string())
}

/// A random positive 128-bit serial number (hex of its 16 bytes).
fn random_serial() -> Result<(SerialNumber, String), IdentityError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| IdentityError::Generation("system RNG failed".into()))?;
    // Positive as a DER INTEGER, and exactly 16 significant bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok((SerialNumber::from_slice(&bytes), hex::encode(bytes)))
}

fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl CertificateAuthority {
    /// Creates a self-signed ECDSA P-256 root for `td`, valid for `ttl` from `now`.
    pub fn create_root(
        td: &TrustDomain,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(CertificateAuthority, CaMaterial), IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "warden");
        dn.push(
            DnType::CommonName,
            format!("warden CA {} {}", td, &serial_hex[..8]),
        );
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        // Path length 1: the root may sign one level of intermediates (the
        // per-node CAs of a fleet), which sign only leaves.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let uri = td.id_string().try_into().map_err(gen_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let material = CaMaterial {
            cert_der: cert.der().to_vec(),
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            chain_der: Vec::new(),
        };
        let _ = serial_hex;
        let ca = Self::from_material(td, &material)?;
        Ok((ca, material))
    }

    /// Imports an upstream intermediate (PEM certificate and PKCS#8 key, plus
    /// the PEM chain above it, if any). Refuses non-CA certificates, keys that do
    /// not match, expired certificates and URI name constraints.
    pub fn import_pem(
        td: &TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
    ) -> Result<(CertificateAuthority, CaMaterial), IdentityError> {
        let cert_der = pem_certs(cert_pem)?.into_iter().next().ok_or_else(|| {
            IdentityError::InvalidCa("--ca-cert holds no CERTIFICATE block".into())
        })?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            IdentityError::InvalidCa(format!(
                "--ca-key is not a PKCS#8 PEM private key ({e}); convert with `openssl pkcs8 -topk8 -nocrypt`"
            ))
        })?;
        let material = CaMaterial {
            cert_der,
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            chain_der: pem_certs(chain_pem)?,
        };
        let ca = Self::from_material(td, &material)?;
        if ca.not_after <= OffsetDateTime::now_utc() {
            return Err(IdentityError::InvalidCa(format!(
                "the CA certificate expired at {}",
                fmt_time(ca.not_after)
            )));
        }
        Ok((ca, material))
    }

    /// Loads a CA from stored material, checking that it is a usable CA.
    pub fn from_material(
        td: &TrustDomain,
        m: &CaMaterial,
    ) -> Result<CertificateAuthority, IdentityError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(&m.cert_der)
            .map_err(|e| IdentityError::InvalidCa(format!("not a DER certificate: {e}")))?;
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => {
                return Err(IdentityError::InvalidCa(
                    "the certificate is not a CA (BasicConstraints CA:TRUE is missing)".into(),
                ))
            }
        }
        if let Ok(Some(ku)) = cert.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(IdentityError::InvalidCa(
                    "the certificate's KeyUsage lacks keyCertSign".into(),
                ));
            }
        }
        if let Ok(Some(nc)) = cert.name_constraints() {
            let has_uri = |subtrees: &Option<Vec<GeneralSubtree>>| {
                subtrees
                    .as_ref()
                    .is_some_and(|v| v.iter().any(|s| matches!(s.base, GeneralName::URI(_))))
            };
            if has_uri(&nc.value.permitted_subtrees) || has_uri(&nc.value.excluded_subtrees) {
                return Err(IdentityError::InvalidCa(
                    "the CA has URI name constraints; common verifiers (rustls-webpki) would reject every SVID it signs — use a CA without them".into(),
                ));
            }
        }
        let key = KeyPair::try_from(m.key_pkcs8.as_slice())
            .map_err(|e| IdentityError::InvalidCa(format!("unreadable CA key: {e}")))?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != cert.public_key().raw {
            return Err(IdentityError::InvalidCa(
                "the private key does not belong to the CA certificate".into(),
            ));
        }
        let not_before = cert.validity().not_before.to_datetime();
        let not_after = cert.validity().not_after.to_datetime();
        let serial_hex = hex::encode(cert.raw_serial());
        let issuer = Issuer::from_ca_cert_der(&m.cert_der.clone().into(), key)
            .map_err(|e| IdentityError::InvalidCa(e.to_string()))?;
        Ok(CertificateAuthority {
            trust_domain: td.clone(),
            cert_der: m.cert_der.clone(),
            chain_der: m.chain_der.clone(),
            issuer,
            not_before,
            not_after,
            serial_hex,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// Upstream certificates above this CA (empty for a self-signed root).
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }
    /// True for an imported intermediate (its root lives elsewhere).
    pub fn is_imported(&self) -> bool {
        !self.chain_der.is_empty() || !self.is_self_signed()
    }

    fn is_self_signed(&self) -> bool {
        use x509_parser::prelude::*;
        X509Certificate::from_der(&self.cert_der)
            .map(|(_, c)| c.subject() == c.issuer())
            .unwrap_or(false)
    }

    /// Whether this CA may sign intermediate CAs: its BasicConstraints allow
    /// a path below it (no pathLenConstraint, or one above 0). Roots made by
    /// wardens before fleet intermediates carry pathLen 0.
    pub fn can_sign_intermediates(&self) -> bool {
        use x509_parser::prelude::*;
        X509Certificate::from_der(&self.cert_der)
            .ok()
            .and_then(|(_, c)| {
                c.basic_constraints()
                    .ok()
                    .flatten()
                    .map(|b| b.value.clone())
            })
            .is_some_and(|bc| bc.ca && bc.path_len_constraint.is_none_or(|n| n > 0))
    }

    /// Signs an intermediate CA with a fresh ECDSA P-256 key for one node of
    /// a fleet (`label` goes into its common name): CA:TRUE with path length
    /// 0 (it signs leaves only), keyCertSign + cRLSign, the trust domain's ID
    /// as its URI SAN, valid from `now` − skew for `ttl` but never past this
    /// CA. Its chain holds this CA and what is above it, so the leaves it
    /// signs carry every certificate up to (excluding) the root.
    pub fn issue_intermediate(
        &self,
        label: &str,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<(CertificateAuthority, CaMaterial), IdentityError> {
        if now >= self.not_after {
            return Err(IdentityError::CaExpired {
                ca_not_after: fmt_time(self.not_after),
                now: fmt_time(now),
            });
        }
        if !self.can_sign_intermediates() {
            return Err(IdentityError::InvalidCa(format!(
                "CA {} has pathLenConstraint 0 and cannot sign intermediate CAs",
                self.serial_hex
            )));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "warden");
        dn.push(
            DnType::CommonName,
            format!("warden node CA {label} {}", &serial_hex[..8]),
        );
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        params.not_before = (now - CLOCK_SKEW).max(self.not_before);
        params.not_after = (now + ttl).min(self.not_after);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let uri = self.trust_domain.id_string().try_into().map_err(gen_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let mut chain_der = vec![self.cert_der.clone()];
        chain_der.extend(self.chain_der.iter().cloned());
        let material = CaMaterial {
            cert_der: cert.der().to_vec(),
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            chain_der,
        };
        let ca = Self::from_material(&self.trust_domain, &material)?;
        Ok((ca, material))
    }

    /// Signs a leaf (CA:FALSE, digitalSignature, AKI) with a fresh key of
    /// `alg`, valid from `now` − skew for `ttl` but never past the CA. The
    /// chain carries the intermediate(s) when this CA was imported.
    fn sign_leaf(
        &self,
        alg: &'static SignatureAlgorithm,
        common_name: Option<&str>,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<SignedLeaf, IdentityError> {
        if now >= self.not_after {
            return Err(IdentityError::CaExpired {
                ca_not_after: fmt_time(self.not_after),
                now: fmt_time(now),
            });
        }
        let key = KeyPair::generate_for(alg).map_err(gen_err)?;
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "warden");
        if let Some(cn) = common_name {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        params.serial_number = Some(serial);
        let not_before = (now - CLOCK_SKEW).max(self.not_before);
        let not_after = (now + ttl).min(self.not_after);
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let mut chain = vec![cert.der().to_vec()];
        if self.is_imported() {
            // The intermediate (and anything above it but the root) travels with the leaf.
            chain.push(self.cert_der.clone());
            chain.extend(
                self.chain_der
                    .iter()
                    .filter(|c| !is_self_signed_der(c))
                    .cloned(),
            );
        }
        Ok(SignedLeaf {
            chain,
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            serial_hex,
            not_before,
            not_after,
        })
    }

    /// Issues an X.509-SVID for `id` with a fresh key of `key_type`.
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        key_type: KeyType,
        now: OffsetDateTime,
    ) -> Result<X509Svid, IdentityError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(IdentityError::InvalidId(format!(
                "{id} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let uri = id.to_string().try_into().map_err(gen_err)?;
        let leaf = self.sign_leaf(
            key_type.algorithm(),
            None,
            vec![SanType::URI(uri)],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            ttl,
            now,
        )?;
        Ok(X509Svid {
            spiffe_id: id.clone(),
            cert_chain_der: leaf.chain,
            key_pkcs8: leaf.key_pkcs8,
            serial_hex: leaf.serial_hex,
            key_type,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    /// Issues an ECDSA P-256 server certificate for `dns_names` and `ips`
    /// (EKU serverAuth, CA:FALSE), valid for `ttl` but never past the CA.
    pub fn issue_tls_server(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<TlsServerCert, IdentityError> {
        let mut sans = Vec::new();
        for d in dns_names {
            sans.push(SanType::DnsName(d.clone().try_into().map_err(gen_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let leaf = self.sign_leaf(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            dns_names.first().map(String::as_str),
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            ttl,
            now,
        )?;
        Ok(TlsServerCert {
            cert_chain_der: leaf.chain,
            key_pkcs8: leaf.key_pkcs8,
            serial_hex: leaf.serial_hex,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    /// The trust anchors peers should use for this CA: itself when self-signed,
    /// else the root(s) of its upstream chain (or itself if none was given).
    pub fn trust_anchors_der(&self) -> Vec<Vec<u8>> {
        let roots: Vec<Vec<u8>> = self
            .chain_der
            .iter()
            .filter(|c| is_self_signed_der(c))
            .cloned()
            .collect();
        if roots.is_empty() {
            vec![self.cert_der.clone()]
        } else {
            roots
        }
    }
}

/// True when the DER certificate is self-signed (subject = issuer).
pub fn is_self_signed_der(der: &[u8]) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

/// Every CERTIFICATE block of a PEM text, as DER.
pub fn pem_certs(text: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let p = p.map_err(|e| IdentityError::InvalidCa(format!("bad PEM: {e}")))?;
        if p.label == "CERTIFICATE" {
            out.push(p.contents);
        }
    }
    Ok(out)
}

/// PEM encoding of DER certificates.
pub fn certs_to_pem(ders: &[Vec<u8>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests;
