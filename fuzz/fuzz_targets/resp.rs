//! The RESP codec of the Redis front end (`warden_redis::resp`): client
//! commands (`parse_command`) and server replies (`ReplyScanner`).
//!
//! Properties: never a panic, a rejection is a typed `ProtocolError`;
//! a parsed command re-encodes with `encode_command` to bytes that parse to
//! the same arguments (and as a multibulk command); a prefix of a command
//! asks for more bytes or fails the same way; the scanner, resumed across a
//! fuzzer-chosen split, finds the same replies as a single pass; every
//! argument range lies inside the command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_fuzz::split_input;
use warden_redis::resp::{encode_command, parse_command, Command, ReplyScanner};

/// Reply lengths found by scanning `stream`, fed as a growing buffer cut at
/// `cuts` (the bytes seen so far, as the relay's buffer holds them).
fn replies(stream: &[u8], cuts: &[usize]) -> (Vec<usize>, bool) {
    let mut scanner = ReplyScanner::default();
    let mut found = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        if end < start {
            continue;
        }
        loop {
            match scanner.advance(&stream[start..end]) {
                Ok(Some(n)) => {
                    assert!(n > 0 && start + n <= end);
                    assert!(scanner.at_start());
                    found.push(n);
                    start += n;
                }
                Ok(None) => {
                    assert!(scanner.walked() <= end - start);
                    break;
                }
                Err(err) => {
                    assert!(!err.to_string().is_empty());
                    return (found, false);
                }
            }
        }
    }
    (found, true)
}

fuzz_target!(|data: &[u8]| {
    let (cut, stream) = split_input(data);

    // Client commands, one after another.
    let mut rest = stream;
    let mut cmd = Command::default();
    for _ in 0..64 {
        match parse_command(rest, &mut cmd) {
            Ok(true) => {
                assert!(cmd.len > 0 && cmd.len <= rest.len());
                let args: Vec<&[u8]> = (0..cmd.args.len())
                    .map(|i| cmd.arg(rest, i).expect("argument inside the buffer"))
                    .collect();
                assert!(cmd.args.iter().all(|r| r.end <= cmd.len));
                // Re-encode and parse again: the same arguments.
                let mut encoded = Vec::new();
                encode_command(&mut encoded, args.iter().copied());
                let mut again = Command::default();
                assert_eq!(parse_command(&encoded, &mut again), Ok(true));
                assert!(!again.inline);
                assert_eq!(again.len, encoded.len());
                let args_again: Vec<&[u8]> = (0..again.args.len())
                    .filter_map(|i| again.arg(&encoded, i))
                    .collect();
                assert_eq!(args, args_again);
                // A multibulk command's prefix needs more bytes.
                if !cmd.inline {
                    let prefix = cut % cmd.len;
                    let mut partial = Command::default();
                    assert_eq!(parse_command(&rest[..prefix], &mut partial), Ok(false));
                }
                rest = &rest[cmd.len..];
            }
            Ok(false) => break,
            Err(err) => {
                assert!(!err.to_string().is_empty());
                // Whatever prefix: more bytes needed, or the same error.
                let prefix = cut % (rest.len() + 1);
                let mut partial = Command::default();
                match parse_command(&rest[..prefix], &mut partial) {
                    Ok(false) => {}
                    Err(e) => assert_eq!(e, err),
                    Ok(true) => panic!("a prefix parsed where the whole failed"),
                }
                break;
            }
        }
    }

    // Server replies: a split never changes what the scanner finds.
    let (whole, whole_ok) = replies(stream, &[]);
    let (split, split_ok) = replies(stream, &[cut]);
    assert_eq!(whole, split, "replies depend on the split at {cut}");
    assert_eq!(whole_ok, split_ok, "verdict depends on the split at {cut}");
});
