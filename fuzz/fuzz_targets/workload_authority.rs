//! The Workload API's `:authority` fix-up (`warden_workload_api`,
//! `authority_fixup.rs`, through its `fuzzing` module): the HTTP/2 frame
//! layer that collects HEADERS + CONTINUATION from a client, its HPACK
//! decoder (RFC 7541, with the dynamic table) and its re-encoding.
//!
//! Properties: never a panic; the output does not depend on how the client's
//! bytes are cut into reads; bytes that are not HTTP/2 pass through
//! unchanged; two header blocks put in frames (fuzzer-chosen END_STREAM,
//! priority and padding, the first one cut into HEADERS + CONTINUATION)
//! come out as frames of at most 16 KiB whose blocks decode to exactly the
//! headers the client sent, with an `:authority` h2 would refuse replaced by
//! `localhost` and nothing else changed, or, from the first block the decoder
//! refuses (or whose fixed form, `localhost` being longer than what it
//! replaces, would pass the limit), as the client's own bytes; a decoded
//! block stays within the 64 KiB limit; Huffman decoding never yields more than 8/5 bytes per input
//! byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_fuzz::split_input;
use warden_workload_api::fuzzing::{hpack_decode, huffman, rewrite, Header};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const MAX_FRAME_LEN: usize = 16_384;
const MAX_HEADER_BLOCK: usize = 64 * 1024;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The headers as warden should pass them on.
fn fixed(headers: &[Header]) -> Vec<Header> {
    headers
        .iter()
        .map(|(name, value, never)| {
            let value = if name == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                b"localhost".to_vec()
            } else {
                value.clone()
            };
            (name.clone(), value, *never)
        })
        .collect()
}

/// The decoder's limit on a block: names, values and 32 bytes per field.
fn within(headers: &[Header]) -> bool {
    headers.iter().map(|(n, v, _)| n.len() + v.len() + 32).sum::<usize>() <= MAX_HEADER_BLOCK
}

/// A re-encoded header block read back from `out` at `*pos`: its stream,
/// its HEADERS flags (less END_HEADERS) and the block.
fn read_block(out: &[u8], pos: &mut usize) -> (u32, u8, Vec<u8>) {
    let mut block = Vec::new();
    let mut first: Option<(u32, u8)> = None;
    loop {
        let head = out.get(*pos..*pos + 9).expect("a whole frame header");
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        assert!(len <= MAX_FRAME_LEN, "frame of {len} bytes");
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        let payload = out.get(*pos + 9..*pos + 9 + len).expect("a whole frame");
        *pos += 9 + len;
        assert_eq!(flags & PADDED, 0, "re-encoded frames are never padded");
        match first {
            None => {
                assert_eq!(kind, 1, "a block starts with HEADERS");
                let body = if flags & PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                block.extend_from_slice(body);
                first = Some((stream, flags & !END_HEADERS));
            }
            Some((s, _)) => {
                assert_eq!((kind, stream), (9, s), "CONTINUATION of the same stream");
                assert_eq!(flags & !END_HEADERS, 0);
                block.extend_from_slice(payload);
            }
        }
        if flags & END_HEADERS != 0 {
            let (stream, flags) = first.expect("set above");
            return (stream, flags, block);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (cut, bytes) = split_input(data);

    // Raw bytes, as they come, and after a valid preface.
    let whole = rewrite(&[bytes]);
    assert_eq!(whole, rewrite(&[&bytes[..cut], &bytes[cut..]]));
    let shown = bytes.len().min(PREFACE.len());
    if bytes[..shown] != PREFACE[..shown] || bytes.len() < PREFACE.len() {
        assert_eq!(whole, bytes, "not HTTP/2: passed through unchanged");
    }
    let mut stream = PREFACE.to_vec();
    stream.extend_from_slice(bytes);
    let at = PREFACE.len() + cut;
    let out = rewrite(&[&stream]);
    assert!(out.starts_with(PREFACE));
    assert_eq!(out, rewrite(&[&stream[..at], &stream[at..]]));
    assert_eq!(out, rewrite(&[&stream[..cut], &stream[cut..]]));

    // Huffman: the shortest code is 5 bits.
    if let Some(text) = huffman(bytes) {
        assert!(text.len() * 5 <= bytes.len() * 8);
    }

    // The bytes as two HPACK blocks sharing the dynamic table.
    let (b1, b2) = bytes.split_at(cut);
    let decoded = hpack_decode(&[b1, b2]);
    for headers in decoded.iter().flatten() {
        let size: usize = headers.iter().map(|(n, v, _)| n.len() + v.len() + 32).sum();
        assert!(size <= MAX_HEADER_BLOCK);
    }
    // The first block split once more into HEADERS + CONTINUATION.
    let split1 = usize::from(data.first().copied().unwrap_or(0)) % (b1.len() + 1);
    let knobs = data.get(1).copied().unwrap_or(0);
    let end_stream = if knobs & 1 != 0 { END_STREAM } else { 0 };
    let priority = knobs & 2 != 0;
    let pad = if knobs & 4 != 0 {
        usize::from(knobs >> 3)
    } else {
        0
    };
    if b1.len() + 6 + pad > MAX_FRAME_LEN || b2.len() > MAX_FRAME_LEN {
        return;
    }
    let mut input = PREFACE.to_vec();
    let mut payload = Vec::new();
    let mut flags = end_stream;
    if knobs & 4 != 0 {
        flags |= PADDED;
        payload.push(pad as u8);
    }
    if priority {
        flags |= PRIORITY;
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
    }
    payload.extend_from_slice(&b1[..split1]);
    payload.resize(payload.len() + pad, 0);
    frame(&mut input, 1, flags, 1, &payload);
    frame(&mut input, 9, END_HEADERS, 1, &b1[split1..]);
    let first_len = input.len();
    frame(&mut input, 0, END_STREAM, 1, b"data");
    frame(&mut input, 1, END_HEADERS, 3, b2);
    let out = rewrite(&[&input]);
    // A block is rewritten only if the decoder takes it and its fixed form
    // stays within the limit too.
    let rewritten = |h: &Option<Vec<Header>>| h.as_ref().map(|h| fixed(h)).filter(|h| within(h));
    let Some(h1) = rewritten(&decoded[0]) else {
        assert_eq!(
            out, input,
            "a refused block and all after it pass unchanged"
        );
        return;
    };
    let mut pos = PREFACE.len();
    assert_eq!(&out[..pos], PREFACE);
    let (s, f, block) = read_block(&out, &mut pos);
    assert_eq!(
        (s, f),
        (1, end_stream | if priority { PRIORITY } else { 0 })
    );
    assert_eq!(hpack_decode(&[&block])[0].as_ref(), Some(&h1));
    let data_frame = &input[first_len..first_len + 13];
    assert_eq!(&out[pos..pos + 13], data_frame, "other frames unchanged");
    pos += 13;
    match rewritten(&decoded[1]) {
        None => assert_eq!(&out[pos..], &input[first_len + 13..]),
        Some(h2) => {
            let (s, f, block) = read_block(&out, &mut pos);
            assert_eq!((s, f), (3, 0));
            assert_eq!(hpack_decode(&[&block])[0].as_ref(), Some(&h2));
            assert_eq!(pos, out.len());
        }
    }
});
