//! The HTTP/1.1 request gate (`warden_http::gate`) in front of hyper, and
//! the fast path's chunked response-body walker.
//!
//! Input: two bytes choose a split point; the rest is a client's byte
//! stream (for the gate) and, separately, a chunked response body (for the
//! walker).
//!
//! Properties: the gate's verdict and the bytes it releases do not depend
//! on how the stream is cut into reads; a refusal is a 400 or 431 whose
//! response is a complete HTTP/1.1 message; `parse_chunk_line` accepts a
//! size it re-parses from its canonical form; the response walker takes
//! the same bytes across any split, and agrees with the gate's own chunked
//! decoder on which bodies are well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_fuzz::split_input;
use warden_http::fast::fuzzing::walk_chunked;
use warden_http::gate::{parse_chunk_line, Framer, Refused};

fn feed(chunks: &[&[u8]]) -> (Result<(), Refused>, Vec<u8>) {
    let mut framer = Framer::new();
    let mut out = Vec::new();
    for chunk in chunks {
        if let Err(refused) = framer.feed(chunk, &mut out) {
            return (Err(refused), out);
        }
    }
    (Ok(()), out)
}

fn check_refusal(refused: &Refused) {
    assert!(refused.status == 400 || refused.status == 431);
    let response = refused.response();
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(&response) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("refusal response does not parse: {other:?}"),
    };
    assert_eq!(parsed.code, Some(refused.status));
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
        .expect("refusal has a content-length");
    assert_eq!(response.len() - head_len, length);
}

const CHUNKED_HEAD: &[u8] =
    b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n";
const NEXT_HEAD: &[u8] = b"GET /next HTTP/1.1\r\nHost: api\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let (cut, stream) = split_input(data);

    // The request gate, whole and split.
    let (whole, whole_out) = feed(&[stream]);
    let (split, split_out) = feed(&[&stream[..cut], &stream[cut..]]);
    assert_eq!(whole, split, "verdict depends on the split at {cut}");
    if whole.is_ok() {
        assert_eq!(
            whole_out, split_out,
            "released bytes depend on the split at {cut}"
        );
    }
    if let Err(refused) = &whole {
        check_refusal(refused);
    }

    // One chunk-size line.
    if let Some(nl) = stream.iter().position(|&b| b == b'\n') {
        if let Ok(size) = parse_chunk_line(&stream[..=nl]) {
            let canonical = format!("{size:x}\r\n");
            assert_eq!(parse_chunk_line(canonical.as_bytes()), Ok(size));
        }
    }

    // The fast path's chunked response walker, whole and split.
    let body = stream;
    let walked = walk_chunked(&[body]);
    let walked_split = walk_chunked(&[&body[..cut], &body[cut..]]);
    match (&walked, &walked_split) {
        (Ok((taken, done)), Ok((taken_split, done_split))) => {
            assert_eq!(
                taken.iter().sum::<usize>(),
                taken_split.iter().sum::<usize>()
            );
            assert_eq!(done, done_split);
        }
        (Err(_), Err(_)) => {}
        other => panic!("walker verdict depends on the split at {cut}: {other:?}"),
    }

    // The walker and the gate's chunked request decoder agree.
    let mut request = CHUNKED_HEAD.to_vec();
    match &walked {
        Ok((taken, done)) => {
            let taken = taken[0];
            request.extend_from_slice(&body[..taken]);
            let mut framer = Framer::new();
            let mut out = Vec::new();
            let gate = framer.feed(&request, &mut out);
            assert!(
                gate.is_ok(),
                "gate refused a body the walker took: {gate:?}"
            );
            assert_eq!(out, request);
            if *done {
                // The gate is back at a request head.
                let mut next = Vec::new();
                assert!(framer.feed(NEXT_HEAD, &mut next).is_ok());
                assert_eq!(next, NEXT_HEAD);
            }
        }
        // The walker also caps a trailer line at 4096 bytes, where the gate
        // only caps the trailer section (16 KiB): not compared.
        Err(reason) if reason.contains("line is too long") => {}
        Err(_) => {
            request.extend_from_slice(body);
            let mut framer = Framer::new();
            let mut out = Vec::new();
            assert!(
                framer.feed(&request, &mut out).is_err(),
                "gate took a body the walker refused"
            );
        }
    }
});
