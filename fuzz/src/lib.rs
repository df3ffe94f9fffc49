//! Helpers shared by warden's fuzz targets (see docs/fuzzing.md).

/// Splits a fuzz input into a split point and the payload: the first two
/// bytes (big-endian) choose where the payload is cut, modulo its length
/// plus one, so every split from "all in the second chunk" to "all in the
/// first" is reachable.
pub fn split_input(data: &[u8]) -> (usize, &[u8]) {
    match data {
        [a, b, rest @ ..] => {
            let at = usize::from(u16::from_be_bytes([*a, *b])) % (rest.len() + 1);
            (at, rest)
        }
        _ => (0, &[]),
    }
}
