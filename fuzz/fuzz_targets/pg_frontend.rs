//! The relay's message framer (`warden_postgres::relay::Framer`) on the
//! bytes a client sends after the greeting: only the 5-byte headers are
//! read, to keep Terminate back and count requests.
//!
//! Properties: walking never panics; the headers found (tag, length,
//! absolute offset) are those of a plain reference walk of the whole
//! stream, whichever split point the fuzzer chose; a length below 4 is
//! `Invalid` at the same header in both; `finish_message` on the second
//! chunk stops exactly at the next boundary; a callback that stops at a
//! Terminate stops at the same offset unless that header straddles the
//! split (where the relay cannot stop by design).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_fuzz::split_input;
use warden_postgres::relay::{Framer, Walked};

/// Headers as (tag, length, offset in the stream); the framer reports no
/// offset for a header that straddles the split.
#[derive(Debug, PartialEq, Eq)]
struct Walk<Offset> {
    headers: Vec<(u8, u32, Offset)>,
    invalid: bool,
    boundary: bool,
}

/// The protocol's framing, written plainly: header, skip the body, repeat.
fn reference(stream: &[u8]) -> Walk<usize> {
    let mut headers = Vec::new();
    let mut at = 0usize;
    let mut invalid = false;
    while stream.len() - at >= 5 {
        let len = u32::from_be_bytes([
            stream[at + 1],
            stream[at + 2],
            stream[at + 3],
            stream[at + 4],
        ]);
        if len < 4 {
            invalid = true;
            break;
        }
        headers.push((stream[at], len, at));
        at += 1 + len as usize;
        if at >= stream.len() {
            break;
        }
    }
    Walk {
        headers,
        invalid,
        boundary: at == stream.len(),
    }
}

/// Walks `stream` cut at `cut` through one `Framer`.
fn framed(stream: &[u8], cut: usize) -> Walk<Option<usize>> {
    let mut framer = Framer::default();
    let mut headers = Vec::new();
    let mut invalid = false;
    for (offset, chunk) in [(0, &stream[..cut]), (cut, &stream[cut..])] {
        let walked = framer.walk(chunk, |tag, len, start| {
            headers.push((tag, len, start.map(|s| offset + s)));
            false
        });
        match walked {
            Walked::All => {}
            Walked::Invalid => {
                invalid = true;
                break;
            }
            Walked::Stop(_) => unreachable!("the callback never stops"),
        }
    }
    Walk {
        headers,
        invalid,
        boundary: framer.at_boundary(),
    }
}

fuzz_target!(|data: &[u8]| {
    let (cut, stream) = split_input(data);
    let expected = reference(stream);
    let got = framed(stream, cut);
    assert_eq!(got.headers.len(), expected.headers.len(), "split at {cut}");
    for (g, e) in got.headers.iter().zip(&expected.headers) {
        assert_eq!((g.0, g.1), (e.0, e.1), "split at {cut}");
        match g.2 {
            Some(at) => assert_eq!(at, e.2, "split at {cut}"),
            None => assert!(e.2 < cut && cut < e.2 + 5, "offset lost at {}", e.2),
        }
    }
    assert_eq!(got.invalid, expected.invalid, "split at {cut}");
    if !expected.invalid {
        assert_eq!(got.boundary, expected.boundary, "split at {cut}");
    }

    // Stopping at a Terminate, as the relay does.
    let first_x = expected.headers.iter().find(|h| h.0 == b'X').map(|h| h.2);
    let mut framer = Framer::default();
    let mut stopped = None;
    for (offset, chunk) in [(0, &stream[..cut]), (cut, &stream[cut..])] {
        match framer.walk(chunk, |tag, _, start| tag == b'X' && start.is_some()) {
            Walked::Stop(at) => {
                stopped = Some(offset + at);
                assert!(framer.at_boundary());
                break;
            }
            Walked::Invalid => break,
            Walked::All => {}
        }
    }
    if let Some(at) = stopped {
        assert_eq!(stream[at], b'X');
        assert!(expected.headers.iter().any(|h| h.2 == at && h.0 == b'X'));
        let first_straddles = first_x.is_some_and(|x| x < cut && cut < x + 5);
        assert!(
            Some(at) == first_x || first_straddles,
            "stopped at {at}, cut {cut}"
        );
    } else if let Some(x) = first_x {
        // Only a Terminate whose header straddles the cut goes unnoticed
        // (or one after an earlier straddling Terminate).
        let straddling = expected
            .headers
            .iter()
            .any(|h| h.0 == b'X' && h.2 < cut && cut < h.2 + 5);
        assert!(straddling, "missed X at {x}, cut {cut}");
    }

    // finish_message after the first chunk stops at the next boundary.
    let mut framer = Framer::default();
    if framer.walk(&stream[..cut], |_, _, _| false) == Walked::All {
        let next_boundary = expected
            .headers
            .iter()
            .map(|h| h.2)
            .chain(expected.boundary.then_some(stream.len()))
            .find(|&b| b >= cut);
        if let Some(n) = framer.finish_message(&stream[cut..]) {
            if let Some(b) = next_boundary {
                if n < stream.len() - cut || framer.at_boundary() {
                    assert_eq!(cut + n, b, "finish_message at cut {cut}");
                }
            }
        }
    }
});
