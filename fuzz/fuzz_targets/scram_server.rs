//! The SCRAM-SHA-256 client's view of the server: `handle_server_first`
//! and `handle_server_final` on bytes an upstream PostgreSQL server sends.
//!
//! Input: the first byte picks the channel binding; the rest is the
//! server-first message and the server-final message separated by the first
//! NUL. In the server-first message, `%N` is replaced by the client's random
//! nonce so the fuzzer can reach the checks after the nonce check.
//!
//! Properties: every failure is a typed `ScramError`, and the exchange
//! refuses to go on after it; a client-final message is produced only for a
//! server nonce that extends the client's, and it echoes that nonce; the
//! server is verified only when `handle_server_final` succeeds, which no
//! fuzzer input can reach without the password's keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_core::pgwire::scram::{ChannelBinding, ScramClient, ScramError, ScramKeyCache};

/// PBKDF2 at a fuzzer-chosen count of up to 10 million costs seconds per
/// input and tests nothing about parsing: such inputs are skipped (counts
/// above the maximum are still refused before any hashing, and tested).
const MAX_FUZZED_ITERATIONS: u64 = 20_000;

fn iterations(server_first: &str) -> Option<u64> {
    let at = server_first.find(",i=")? + 3;
    let digits: String = server_first[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let binding = match mode % 3 {
        0 => ChannelBinding::None,
        1 => ChannelBinding::SupportedButNotUsed,
        _ => ChannelBinding::TlsServerEndPoint(vec![mode; 32]),
    };
    let (first, last) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let cache = ScramKeyCache::new();
    let mut client = ScramClient::new(b"fuzz-password", binding.clone(), &cache, "fuzz/db@v1");

    // Out of order: a server message before the client's first.
    assert!(matches!(
        client.handle_server_first(first),
        Err(ScramError::OutOfOrder(_))
    ));
    let mut client = ScramClient::new(b"fuzz-password", binding, &cache, "fuzz/db@v1");
    let client_first = String::from_utf8(client.client_first()).expect("client-first is ASCII");
    let nonce = client_first
        .split_once(",r=")
        .map(|(_, n)| n.to_string())
        .expect("client-first carries a nonce");

    let mut server_first = Vec::with_capacity(first.len() + nonce.len());
    let mut i = 0;
    while i < first.len() {
        if first[i..].starts_with(b"%N") {
            server_first.extend_from_slice(nonce.as_bytes());
            i += 2;
        } else {
            server_first.push(first[i]);
            i += 1;
        }
    }
    if let Ok(text) = std::str::from_utf8(&server_first) {
        if iterations(text).is_some_and(|n| {
            (MAX_FUZZED_ITERATIONS..=u64::from(warden_core::pgwire::scram::MAX_ITERATIONS))
                .contains(&n)
        }) {
            return;
        }
    }

    match client.handle_server_first(&server_first) {
        Ok(client_final) => {
            let text = std::str::from_utf8(&server_first).expect("accepted input is UTF-8");
            let server_nonce = text
                .split(',')
                .find_map(|attr| attr.strip_prefix("r="))
                .expect("accepted server-first has a nonce");
            assert!(server_nonce.starts_with(&nonce) && server_nonce.len() > nonce.len());
            let reply = String::from_utf8(client_final).expect("client-final is ASCII");
            assert!(reply.starts_with("c="));
            assert!(reply.contains(&format!(",r={server_nonce},")));
            assert!(reply.contains(",p="));
            assert!(!client.server_verified());
            match client.handle_server_final(last) {
                Ok(()) => assert!(client.server_verified()),
                Err(err) => {
                    assert!(!client.server_verified());
                    assert!(!err.to_string().is_empty());
                }
            }
        }
        Err(err) => {
            assert!(!err.to_string().is_empty());
            assert!(!client.server_verified());
            // A failed exchange stays failed.
            assert!(client.handle_server_first(&server_first).is_err());
            assert!(client.handle_server_final(last).is_err());
        }
    }
});
