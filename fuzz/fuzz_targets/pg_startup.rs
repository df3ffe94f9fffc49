//! The PostgreSQL startup packet parser (`parse_startup`): what every local
//! client sends first.
//!
//! Properties: a rejection is a typed `ProtocolError` with a five-character
//! SQLSTATE; an accepted packet is at most `MAX_STARTUP_LEN` bytes, re-encodes
//! byte for byte to what was parsed and re-parses to the same value; every
//! proper prefix of an accepted packet asks for more bytes (a valid prefix
//! is never an error); a length field above the limit is refused as soon as
//! the four length bytes are in, so no input makes warden buffer more.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_core::pgwire::protocol::{
    cancel_request, parse_startup, ssl_request, ProtocolError, StartupPacket, MAX_STARTUP_LEN,
};
use warden_fuzz::split_input;

fuzz_target!(|data: &[u8]| {
    let (cut, data) = split_input(data);
    let declared = data
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    match parse_startup(data) {
        Ok(None) => {
            // Only a short buffer may ask for more.
            if let Some(len) = declared {
                assert!(data.len() < len, "asked for more with a whole packet in");
            }
            assert!(declared.is_none_or(|len| (8..=MAX_STARTUP_LEN).contains(&len)));
        }
        Ok(Some((packet, consumed))) => {
            assert_eq!(Some(consumed), declared);
            assert!((8..=MAX_STARTUP_LEN).contains(&consumed));
            let wire = &data[..consumed];
            // Bytes after the packet are the client's next message: they
            // never change it.
            assert_eq!(parse_startup(wire), Ok(Some((packet.clone(), consumed))));
            // Every proper prefix (here: one fuzzer-chosen) needs more bytes.
            let prefix = cut % consumed;
            assert_eq!(parse_startup(&wire[..prefix]), Ok(None), "prefix {prefix}");
            let encoded = match &packet {
                StartupPacket::Startup(message) => {
                    assert!(message.get("user").is_some());
                    message.encode()
                }
                StartupPacket::Cancel {
                    process_id,
                    secret_key,
                } => cancel_request(*process_id, secret_key),
                StartupPacket::Ssl => ssl_request(),
                StartupPacket::GssEnc => {
                    let mut out = ssl_request();
                    out[7] += 1; // GSSENCRequest is SSLRequest's code + 1
                    out
                }
            };
            assert_eq!(encoded, wire, "re-encoding differs");
        }
        Err(err) => {
            assert_eq!(err.sqlstate().len(), 5);
            assert!(!err.to_string().is_empty());
            if let ProtocolError::StartupTooLong { len, max } = err {
                assert_eq!(max, MAX_STARTUP_LEN);
                assert!(len as usize > MAX_STARTUP_LEN);
            }
            // An error is final: more bytes never turn it into a packet.
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0; 16]);
            assert!(parse_startup(&longer).is_err());
        }
    }
    // The length check needs nothing but the length field.
    if let Some(len) = declared {
        if len > MAX_STARTUP_LEN {
            assert!(matches!(
                parse_startup(&data[..4]),
                Err(ProtocolError::StartupTooLong { .. })
            ));
        }
    }
});
