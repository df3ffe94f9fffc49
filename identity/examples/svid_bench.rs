//! SVID issuance benchmark, run by `cargo xtask bench` (release build).
//!
//! Measures, in one run on one thread: X.509-SVID issuance (key generation +
//! certificate signing + DER encoding) per key type, against the raw cost of one
//! key generation plus one signature with the same library (aws-lc-rs). Prints
//! rates, p50/p99 latency and the ratio to the raw crypto cost.

// A benchmark binary: a failed setup step may abort it.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};
use time::OffsetDateTime;
use warden_identity::{CertificateAuthority, KeyType, SpiffeId, TrustDomain};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Stats {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn measure(n: usize, mut op: impl FnMut()) -> Stats {
    for _ in 0..n / 10 {
        op(); // warm-up
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        op();
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    Stats {
        per_sec: n as f64 / total.as_secs_f64(),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
    }
}

fn raw_p256(msg: &[u8]) {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("keygen");
    let kp =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).expect("parse");
    std::hint::black_box(kp.sign(&rng, msg).expect("sign"));
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let td = TrustDomain::parse("bench.example").expect("td");
    let (ca, _) = CertificateAuthority::create_root(
        &td,
        Duration::from_secs(86400),
        OffsetDateTime::now_utc(),
    )
    .expect("CA");
    let id = SpiffeId::parse("spiffe://bench.example/workload").expect("id");
    let msg = [7u8; 300]; // about the size of a leaf's TBSCertificate

    let raw = measure(n, || raw_p256(&msg));
    println!("SVID issuance, {n} iterations per row, one thread (aws-lc-rs, rcgen)");
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>14}",
        "operation", "per s", "p50 µs", "p99 µs", "vs raw P-256"
    );
    let row = |name: &str, s: &Stats| {
        println!(
            "{:<34} {:>10.0} {:>10.1} {:>10.1} {:>13.2}×",
            name,
            s.per_sec,
            s.p50.as_secs_f64() * 1e6,
            s.p99.as_secs_f64() * 1e6,
            raw.per_sec / s.per_sec
        );
    };
    row("baseline: P-256 keygen + sign", &raw);
    let mut p256 = None;
    for kt in [KeyType::EcP256, KeyType::Ed25519, KeyType::MlDsa65] {
        let count = if kt == KeyType::MlDsa65 { n / 5 } else { n };
        let s = measure(count.max(10), || {
            let svid = ca
                .issue_svid(
                    &id,
                    Duration::from_secs(3600),
                    kt,
                    OffsetDateTime::now_utc(),
                )
                .expect("issue");
            std::hint::black_box(svid);
        });
        row(&format!("SVID issue ({})", kt.as_str()), &s);
        if kt == KeyType::EcP256 {
            p256 = Some(s);
        }
    }
    if let Some(s) = p256 {
        let ok_rate = s.per_sec >= 5000.0;
        let ok_ratio = raw.per_sec / s.per_sec <= 2.0;
        let ok_p99 = s.p99 <= Duration::from_millis(1);
        println!(
            "targets (P-256): >= 5000/s {} | within 2x raw {} | p99 <= 1 ms {}",
            if ok_rate { "met" } else { "MISSED" },
            if ok_ratio { "met" } else { "MISSED" },
            if ok_p99 { "met" } else { "MISSED" }
        );
        println!("anchor: Vault PKI published sample 51 certificates/s (mean 202 ms)");
    }
}
