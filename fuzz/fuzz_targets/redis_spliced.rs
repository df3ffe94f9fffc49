//! The walk of a spliced Redis session's client bytes that the kernel hands
//! to warden (`warden_redis::spliced::SplicedCommands`, the user-space half
//! of the kernel relay's `GUARD_REDIS`).
//!
//! Properties: never a panic; the same output (what goes upstream, warden's
//! answers, whether the session goes on) whether the bytes come whole or cut
//! at a fuzzer-chosen point; what goes upstream is well-formed RESP arrays,
//! in which an `AUTH` carries warden's login only, a `HELLO`'s `AUTH` pair
//! is warden's, and no `RESET` appears; a session that ends says why in one
//! error line that holds neither password; commands encoded from the input
//! (lines, split on spaces) whose names are not warden's pass unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_core::kernel_relay::{ClientGuard, Fed};
use warden_ebpf::ClientPosition;
use warden_fuzz::split_input;
use warden_redis::resp::{encode_command, parse_command, Command};
use warden_redis::spliced::SplicedCommands;

const PASSWORD: &[u8] = b"route-pw-7f3a";

/// What the walk made of `chunks`, fed one after another.
fn run(chunks: &[&[u8]]) -> (Vec<u8>, Vec<u8>, bool) {
    let mut g = SplicedCommands::new("r", "w", "app", PASSWORD);
    g.resume(ClientPosition::default());
    let (mut up, mut local) = (Vec::new(), Vec::new());
    for c in chunks {
        if g.feed(c, &mut up, &mut local) != Fed::Go {
            return (up, local, false);
        }
    }
    (up, local, true)
}

fn is(name: &[u8], what: &str) -> bool {
    name.eq_ignore_ascii_case(what.as_bytes())
}

/// Every command that went upstream parses; warden's login only.
fn check_up(up: &[u8]) {
    let mut rest = up;
    let mut cmd = Command::default();
    loop {
        match parse_command(rest, &mut cmd) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => panic!("malformed RESP went upstream: {e}"),
        }
        let arg = |i: usize| cmd.arg(rest, i).unwrap_or_default();
        assert!(!cmd.inline, "inline commands go up as arrays");
        let name = arg(0);
        assert!(!is(name, "RESET"), "RESET went upstream");
        if is(name, "AUTH") {
            assert_eq!(cmd.args.len(), 3);
            assert_eq!((arg(1), arg(2)), (&b"app"[..], PASSWORD));
        }
        if is(name, "HELLO") {
            for i in 2..cmd.args.len() {
                if is(arg(i), "AUTH") {
                    assert_eq!((arg(i + 1), arg(i + 2)), (&b"app"[..], PASSWORD));
                }
            }
        }
        rest = &rest[cmd.len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let (cut, bytes) = split_input(data);

    // Any bytes.
    let whole = run(&[bytes]);
    assert_eq!(whole, run(&[&bytes[..cut], &bytes[cut..]]));
    check_up(&whole.0);
    if !whole.2 {
        let line = &whole.1;
        assert!(line.starts_with(b"-ERR ") && line.ends_with(b"\r\n"));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(!line.windows(PASSWORD.len()).any(|w| w == PASSWORD));
    } else {
        assert!(whole.1.is_empty(), "warden answers only by ending the session");
    }

    // Commands built from the bytes: lines of space-separated arguments.
    let mut stream = Vec::new();
    for line in bytes.split(|&b| b == b'\n') {
        let args: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let name = args[0];
        if ["AUTH", "HELLO", "RESET"].iter().any(|n| is(name, n)) {
            continue;
        }
        encode_command(&mut stream, args.into_iter());
    }
    let at = cut.min(stream.len());
    let got = run(&[&stream[..at], &stream[at..]]);
    assert_eq!(got, (stream.clone(), Vec::new(), true));
});
