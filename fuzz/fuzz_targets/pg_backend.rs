//! What an upstream PostgreSQL server sends: the login's messages through
//! `parse_backend` / `parse_backend_limited`, and the relay's `Framer` on
//! the reply stream.
//!
//! Properties: a rejection is a typed `ProtocolError`; an accepted message
//! is no longer than the limit given (checked with the default 1 MiB and a
//! fuzzer-chosen small one, so the limit is enforced as soon as the length
//! field is in, before the body); a prefix of a message asks for more bytes
//! or fails with the same error; messages with an encoder re-encode to bytes
//! that parse to the same value; walking a stream of messages with the
//! relay's framer finds the same message boundaries as parsing it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_core::pgwire::protocol::{
    authentication_ok, backend_key_data, parameter_status, parse_backend, parse_backend_limited,
    ready_for_query, BackendMessage, ProtocolError, MAX_BACKEND_LEN,
};
use warden_fuzz::split_input;
use warden_postgres::relay::{Framer, Walked};

fn reencode(message: &BackendMessage) -> Option<Vec<u8>> {
    Some(match message {
        BackendMessage::AuthenticationOk => authentication_ok(),
        BackendMessage::ParameterStatus { name, value } => parameter_status(name, value),
        BackendMessage::BackendKeyData {
            process_id,
            secret_key,
        } => backend_key_data(*process_id, secret_key),
        BackendMessage::ReadyForQuery { status } => ready_for_query(*status),
        BackendMessage::ErrorResponse(fields) => fields.encode(),
        BackendMessage::NoticeResponse(fields) => {
            let mut out = fields.encode();
            out[0] = b'N';
            out
        }
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    let (cut, stream) = split_input(data);
    let limit = 5 + cut % 256;

    // One message at a time, as the login reads them.
    let mut rest = stream;
    let mut boundaries = Vec::new();
    let mut offset = 0;
    loop {
        let full = parse_backend(rest);
        match &full {
            Ok(Some((message, consumed))) => {
                assert!(*consumed >= 5 && *consumed <= MAX_BACKEND_LEN.min(rest.len()));
                // A prefix needs more bytes.
                let prefix = cut % consumed;
                assert_eq!(parse_backend(&rest[..prefix]), Ok(None));
                if let Some(bytes) = reencode(message) {
                    let again = parse_backend(&bytes);
                    assert_eq!(again, Ok(Some((message.clone(), bytes.len()))));
                }
                let _ = message.describe();
                // The small limit refuses exactly the longer messages.
                match parse_backend_limited(rest, limit) {
                    Ok(Some(same)) => {
                        assert!(same.1 <= limit);
                        assert_eq!(Some(same), full.clone().ok().flatten());
                    }
                    Err(ProtocolError::MessageTooLong { max, .. }) => {
                        assert_eq!(max, limit);
                        assert!(*consumed > limit);
                        // Refused from the header alone.
                        assert!(parse_backend_limited(&rest[..5], limit).is_err());
                    }
                    other => panic!("limited parse disagrees: {other:?}"),
                }
                offset += consumed;
                boundaries.push(offset);
                rest = &rest[*consumed..];
            }
            Ok(None) => {
                if rest.len() >= 5 {
                    let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                    assert!(rest.len() < len + 1);
                }
                break;
            }
            Err(err) => {
                assert!(!err.to_string().is_empty());
                let prefix = cut % (rest.len() + 1);
                match parse_backend(&rest[..prefix]) {
                    Ok(None) => {}
                    Err(e) => assert_eq!(&e, err),
                    Ok(Some(m)) => panic!("a prefix parsed where the whole failed: {m:?}"),
                }
                break;
            }
        }
    }

    // The relay's framer finds the same messages: the n-th header it
    // completes has the n-th parsed message's length, whatever the split.
    let mut framer = Framer::default();
    let mut lengths = Vec::new();
    for chunk in [&stream[..cut], &stream[cut..]] {
        if framer.walk(chunk, |_, len, _| {
            lengths.push(len as usize + 1);
            false
        }) == Walked::Invalid
        {
            break;
        }
    }
    let mut start = 0;
    for (i, end) in boundaries.iter().enumerate() {
        assert_eq!(
            lengths.get(i),
            Some(&(end - start)),
            "message {i} at {start}"
        );
        start = *end;
    }
});
