use super::*;
use std::process::Command;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn root() -> CertificateAuthority {
    CertificateAuthority::create_root(&td(), Duration::from_secs(86400), now())
        .unwrap()
        .0
}

fn rustls_pki_types_der(b: &[u8]) -> rustls_pki_types::PrivatePkcs8KeyDer<'static> {
    rustls_pki_types::PrivatePkcs8KeyDer::from(b.to_vec())
}

/// Every SPIFFE X509-SVID requirement, field by field.
fn assert_spiffe_leaf(der: &[u8], id: &str, ca: &CertificateAuthority) {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    // Exactly one URI SAN, the SPIFFE ID.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![id]);
    assert_eq!(san.value.general_names.len(), 1, "only the URI SAN");
    // BasicConstraints present, critical, CA:FALSE.
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("BasicConstraints present");
    assert!(bc.critical, "BasicConstraints must be critical");
    assert!(!bc.value.ca);
    // KeyUsage present, critical, digitalSignature only.
    let ku = cert.key_usage().unwrap().expect("KeyUsage present");
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    // EKU serverAuth + clientAuth.
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    // Serial: 16 bytes, positive.
    let serial = cert.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0);
    // Validity: backdated, never past the CA.
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    assert!(
        nb <= now() - Duration::from_secs(20),
        "NotBefore not backdated"
    );
    assert!(na <= ca.not_after());
    // Signed by the CA, with an AKI.
    let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
    assert_eq!(cert.issuer(), ca_cert.subject());
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert!(cert.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
}

#[test]
fn root_ca_is_a_ca_without_name_constraints() {
    let ca = root();
    let (_, c) = X509Certificate::from_der(ca.cert_der()).unwrap();
    let bc = c.basic_constraints().unwrap().unwrap();
    assert!(bc.value.ca && bc.critical);
    assert!(c.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert!(c.name_constraints().unwrap().is_none());
    assert_eq!(c.subject(), c.issuer());
    assert!(!ca.is_imported());
    assert_eq!(ca.trust_anchors_der(), vec![ca.cert_der().to_vec()]);
}

#[test]
fn svids_follow_the_spiffe_spec_for_every_key_type() {
    let ca = root();
    let id = SpiffeId::parse("spiffe://example.org/reports").unwrap();
    for kt in [KeyType::EcP256, KeyType::Ed25519, KeyType::MlDsa65] {
        let svid = ca
            .issue_svid(&id, Duration::from_secs(3600), kt, now())
            .unwrap();
        assert_eq!(svid.cert_chain_der.len(), 1);
        assert_spiffe_leaf(&svid.cert_chain_der[0], "spiffe://example.org/reports", &ca);
        assert_eq!(svid.key_type, kt);
        // The key is a PKCS#8 key of the requested type that matches the leaf.
        let (_, cert) = X509Certificate::from_der(&svid.cert_chain_der[0]).unwrap();
        if kt == KeyType::MlDsa65 {
            // rcgen cannot reload ML-DSA PKCS#8; check the leaf's key algorithm instead.
            assert_eq!(
                cert.public_key().algorithm.algorithm.to_id_string(),
                "2.16.840.1.101.3.4.3.18"
            );
            assert!(svid.key_pkcs8.len() > 32, "ML-DSA key missing");
            continue;
        }
        let pkcs8 = rustls_pki_types_der(&svid.key_pkcs8);
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, kt.algorithm()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&key),
            cert.public_key().raw,
            "{kt:?}"
        );
    }
}

#[test]
fn serials_are_random_and_not_after_is_clamped_to_the_ca() {
    let ca = CertificateAuthority::create_root(&td(), Duration::from_secs(600), now())
        .unwrap()
        .0;
    let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
    let a = ca
        .issue_svid(&id, Duration::from_secs(3600), KeyType::EcP256, now())
        .unwrap();
    let b = ca
        .issue_svid(&id, Duration::from_secs(3600), KeyType::EcP256, now())
        .unwrap();
    assert_ne!(a.serial_hex, b.serial_hex);
    assert_eq!(a.not_after, ca.not_after());
    let late = ca.not_after() + ::time::Duration::seconds(1);
    assert!(matches!(
        ca.issue_svid(&id, Duration::from_secs(60), KeyType::EcP256, late),
        Err(IdentityError::CaExpired { .. })
    ));
    let other = SpiffeId::parse("spiffe://other.org/a").unwrap();
    assert!(ca
        .issue_svid(&other, Duration::from_secs(60), KeyType::EcP256, now())
        .is_err());
}

#[test]
fn ca_reloads_from_material() {
    let (ca, m) =
        CertificateAuthority::create_root(&td(), Duration::from_secs(3600), now()).unwrap();
    let again = CertificateAuthority::from_material(&td(), &m).unwrap();
    assert_eq!(again.serial_hex(), ca.serial_hex());
    let id = SpiffeId::parse("spiffe://example.org/x").unwrap();
    let svid = again
        .issue_svid(&id, Duration::from_secs(60), KeyType::EcP256, now())
        .unwrap();
    assert_spiffe_leaf(&svid.cert_chain_der[0], "spiffe://example.org/x", &ca);
    // A key from another CA is refused.
    let (_, other) =
        CertificateAuthority::create_root(&td(), Duration::from_secs(3600), now()).unwrap();
    let mixed = CaMaterial {
        cert_der: m.cert_der.clone(),
        key_pkcs8: other.key_pkcs8.clone(),
        chain_der: vec![],
    };
    let e = CertificateAuthority::from_material(&td(), &mixed)
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not belong"), "{e}");
}

fn openssl_verify(
    dir: &std::path::Path,
    ca_pem: &str,
    untrusted_pem: Option<&str>,
    leaf_pem: &str,
) -> std::process::Output {
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf_pem).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(dir.join("ca.pem"));
    if let Some(u) = untrusted_pem {
        std::fs::write(dir.join("untrusted.pem"), u).unwrap();
        cmd.arg("-untrusted").arg(dir.join("untrusted.pem"));
    }
    cmd.arg(dir.join("leaf.pem"));
    cmd.output()
        .expect("openssl (Debian package openssl) is required")
}

#[test]
fn openssl_verifies_svids_against_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root();
    let id = SpiffeId::parse("spiffe://example.org/svc").unwrap();
    for kt in [KeyType::EcP256, KeyType::Ed25519] {
        let svid = ca
            .issue_svid(&id, Duration::from_secs(600), kt, now())
            .unwrap();
        let out = openssl_verify(
            dir.path(),
            &certs_to_pem(&ca.trust_anchors_der()),
            None,
            &certs_to_pem(&svid.cert_chain_der),
        );
        assert!(
            out.status.success(),
            "{kt:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A leaf from another CA does not verify.
    let other = root();
    let stranger = other
        .issue_svid(&id, Duration::from_secs(600), KeyType::EcP256, now())
        .unwrap();
    let out = openssl_verify(
        dir.path(),
        &certs_to_pem(&ca.trust_anchors_der()),
        None,
        &certs_to_pem(&stranger.cert_chain_der),
    );
    assert!(!out.status.success());
}

/// An organisation's root → intermediate imported into warden → SVIDs chain to the root.
#[test]
fn imported_intermediate_chains_to_the_upstream_root() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    rp.distinguished_name.push(DnType::CommonName, "Org Root");
    rp.not_before = now() - Duration::from_secs(60);
    rp.not_after = now() + Duration::from_secs(86400 * 30);
    let root_cert = rp.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(rp, &root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.distinguished_name
        .push(DnType::CommonName, "Org SPIFFE Intermediate");
    ip.not_before = now() - Duration::from_secs(60);
    ip.not_after = now() + Duration::from_secs(86400 * 10);
    let int_cert = ip.signed_by(&int_key, &root_issuer).unwrap();

    let (ca, m) = CertificateAuthority::import_pem(
        &td(),
        &int_cert.pem(),
        &int_key.serialize_pem(),
        &root_cert.pem(),
    )
    .unwrap();
    assert!(ca.is_imported());
    assert_eq!(m.chain_der.len(), 1);
    assert_eq!(ca.trust_anchors_der(), vec![root_cert.der().to_vec()]);
    let id = SpiffeId::parse("spiffe://example.org/svc").unwrap();
    let svid = ca
        .issue_svid(&id, Duration::from_secs(600), KeyType::EcP256, now())
        .unwrap();
    assert_eq!(svid.cert_chain_der.len(), 2, "leaf + intermediate");
    let out = openssl_verify(
        dir.path(),
        &root_cert.pem(),
        Some(&certs_to_pem(&svid.cert_chain_der[1..])),
        &certs_to_pem(&svid.cert_chain_der[..1]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // With pathLen 0 it cannot certify a fleet node's intermediate.
    assert!(!ca.can_sign_intermediates());
    assert!(ca
        .issue_intermediate("n1", Duration::from_secs(3600), now())
        .is_err());

    // An imported intermediate that allows one more level (pathLen 1) is a
    // fleet root: leaves carry node intermediate + imported intermediate, and
    // the organisation's root alone verifies them.
    let int1_key = KeyPair::generate().unwrap();
    let mut ip1 = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip1.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
    ip1.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip1.distinguished_name
        .push(DnType::CommonName, "Org SPIFFE Fleet Intermediate");
    ip1.not_before = now() - Duration::from_secs(60);
    ip1.not_after = now() + Duration::from_secs(86400 * 10);
    let int1_cert = ip1.signed_by(&int1_key, &root_issuer).unwrap();
    let (fleet_root, _) = CertificateAuthority::import_pem(
        &td(),
        &int1_cert.pem(),
        &int1_key.serialize_pem(),
        &root_cert.pem(),
    )
    .unwrap();
    assert!(fleet_root.can_sign_intermediates());
    let (node, _) = fleet_root
        .issue_intermediate("n1", Duration::from_secs(3600), now())
        .unwrap();
    let svid = node
        .issue_svid(&id, Duration::from_secs(600), KeyType::EcP256, now())
        .unwrap();
    assert_eq!(svid.cert_chain_der.len(), 3, "leaf + node + imported");
    assert_eq!(svid.cert_chain_der[1], node.cert_der());
    assert_eq!(svid.cert_chain_der[2], int1_cert.der().to_vec());
    let out = openssl_verify(
        dir.path(),
        &root_cert.pem(),
        Some(&certs_to_pem(&svid.cert_chain_der[1..])),
        &certs_to_pem(&svid.cert_chain_der[..1]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A leaf certificate (not a CA) is refused.
    let leaf_pem = certs_to_pem(&svid.cert_chain_der[..1]);
    let e = CertificateAuthority::import_pem(&td(), &leaf_pem, &int_key.serialize_pem(), "")
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a CA"), "{e}");
    // A mismatched key is refused.
    let e = CertificateAuthority::import_pem(&td(), &int_cert.pem(), &root_key.serialize_pem(), "")
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not belong"), "{e}");
}

#[test]
fn uri_name_constraints_are_refused() {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    // NameConstraints { permittedSubtrees [0] { GeneralSubtree { uniformResourceIdentifier ".example.org" } } }
    let uri = b".example.org";
    let mut der = vec![0x30, 0x12, 0xa0, 0x10, 0x30, 0x0e, 0x86, 0x0c];
    der.extend_from_slice(uri);
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 30], der);
    ext.set_criticality(true);
    p.custom_extensions = vec![ext];
    let cert = p.self_signed(&key).unwrap();
    let e = CertificateAuthority::import_pem(&td(), &cert.pem(), &key.serialize_pem(), "")
        .err()
        .expect("a CA with URI name constraints must be refused");
    assert!(e.to_string().contains("URI name constraints"), "{e}");
    // Without the constraint the same CA is accepted.
    p.custom_extensions.clear();
    let cert = p.self_signed(&key).unwrap();
    CertificateAuthority::import_pem(&td(), &cert.pem(), &key.serialize_pem(), "").unwrap();
}

/// A fleet: one root, an intermediate per node; leaves of either node verify
/// against the root alone with their own chain, and openssl checks the path
/// length (the intermediate cannot sign another CA).
#[test]
fn node_intermediates_chain_to_the_shared_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = root();
    assert!(root.can_sign_intermediates());
    let (_, c) = X509Certificate::from_der(root.cert_der()).unwrap();
    assert_eq!(
        c.basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .path_len_constraint,
        Some(1)
    );
    let ttl = Duration::from_secs(3600);
    let (a, a_material) = root.issue_intermediate("a1b2", ttl, now()).unwrap();
    let (b, _) = root.issue_intermediate("c3d4", ttl, now()).unwrap();
    assert!(a.is_imported() && !a.can_sign_intermediates());
    assert_eq!(a_material.chain_der, vec![root.cert_der().to_vec()]);
    assert!(a.not_after() <= root.not_after());
    let (_, ic) = X509Certificate::from_der(a.cert_der()).unwrap();
    let bc = ic.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint == Some(0));
    assert!(ic.key_usage().unwrap().unwrap().value.key_cert_sign());
    ic.verify_signature(Some(c.public_key())).unwrap();
    assert_ne!(a.serial_hex(), b.serial_hex());
    let id = SpiffeId::parse("spiffe://example.org/svc").unwrap();
    let bundle = certs_to_pem(&root.trust_anchors_der());
    for node in [&a, &b] {
        let svid = node
            .issue_svid(&id, Duration::from_secs(600), KeyType::EcP256, now())
            .unwrap();
        assert_eq!(svid.cert_chain_der.len(), 2, "leaf + node intermediate");
        assert_eq!(svid.cert_chain_der[1], node.cert_der());
        assert_spiffe_leaf(&svid.cert_chain_der[0], id.to_string().as_str(), node);
        let out = openssl_verify(
            dir.path(),
            &bundle,
            Some(&certs_to_pem(&svid.cert_chain_der[1..])),
            &certs_to_pem(&svid.cert_chain_der[..1]),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The intermediate cannot make another CA; an expired issuer refuses.
    assert!(a.issue_intermediate("x", ttl, now()).is_err());
    assert!(root
        .issue_intermediate("x", ttl, now() + Duration::from_secs(2 * 86400))
        .is_err());
}
