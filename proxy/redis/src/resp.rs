//! A small RESP2/RESP3 codec, pure and bounded: [`parse_command`] reads one
//! client command (an array of bulk strings, or an inline command) without
//! copying it; [`ReplyScanner`] finds where one server reply ends, resuming
//! where it stopped when more bytes arrive, so a large value is walked once.
//! Malformed input is a [`ProtocolError`] whose text is what Redis itself
//! answers (`-ERR Protocol error: …`), never a panic.

use std::ops::Range;

/// Largest bulk string a client may send (Redis' `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 * 1024 * 1024;
/// Most arguments in one command (Redis' limit).
pub const MAX_ARGS: usize = 1024 * 1024;
/// Longest inline command or header line (Redis' `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Deepest nesting of aggregate replies warden follows.
pub const MAX_DEPTH: usize = 256;

/// Why bytes are not RESP. The text follows Redis' own protocol errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    ArrayLength,
    #[error("expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("invalid bulk length")]
    BulkLength,
    #[error("too big inline request")]
    InlineTooLong,
    #[error("too big mbulk count string")]
    HeaderTooLong,
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("unknown reply type byte 0x{0:02x}")]
    ReplyType(u8),
    #[error("invalid length in a reply")]
    ReplyLength,
    #[error("replies nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// One client command: the argument ranges in the buffer and how many bytes
/// it took. An inline command must be re-encoded before it is forwarded.
#[derive(Debug, Default)]
pub struct Command {
    pub args: Vec<Range<usize>>,
    pub len: usize,
    pub inline: bool,
}

impl Command {
    pub fn arg<'a>(&self, buf: &'a [u8], i: usize) -> Option<&'a [u8]> {
        self.args.get(i).and_then(|r| buf.get(r.clone()))
    }
}

/// Position of the CRLF (or, for inline commands, LF) ending the line at
/// `from`, looking no further than `MAX_INLINE` bytes.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    let end = buf.len().min(from.saturating_add(MAX_INLINE));
    buf.get(from..end)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| from + p)
}

/// A decimal integer as RESP writes lengths (optional '-', digits only).
fn parse_int(line: &[u8]) -> Option<i64> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits
        .iter()
        .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    Some(if neg { -v } else { v })
}

/// Reads one command from the start of `buf` into `cmd`. `Ok(false)`: more
/// bytes are needed. A command with no arguments (an empty inline line,
/// `*0`) comes back with `cmd.args` empty: skip it.
pub fn parse_command(buf: &[u8], cmd: &mut Command) -> Result<bool, ProtocolError> {
    cmd.args.clear();
    cmd.len = 0;
    cmd.inline = false;
    let Some(&first) = buf.first() else {
        return Ok(false);
    };
    if first != b'*' {
        return parse_inline(buf, cmd);
    }
    let Some(nl) = line_end(buf, 1) else {
        return if buf.len() > MAX_INLINE {
            Err(ProtocolError::HeaderTooLong)
        } else {
            Ok(false)
        };
    };
    let count = parse_int(buf[1..nl].strip_suffix(b"\r").unwrap_or(&buf[1..nl]))
        .ok_or(ProtocolError::ArrayLength)?;
    if count > MAX_ARGS as i64 {
        return Err(ProtocolError::ArrayLength);
    }
    let mut pos = nl + 1;
    for _ in 0..count.max(0) {
        let Some(&t) = buf.get(pos) else {
            return Ok(false);
        };
        if t != b'$' {
            return Err(ProtocolError::ExpectedBulk(char::from(t)));
        }
        let Some(nl) = line_end(buf, pos + 1) else {
            return if buf.len() - pos > MAX_INLINE {
                Err(ProtocolError::BulkLength)
            } else {
                Ok(false)
            };
        };
        let line = &buf[pos + 1..nl];
        let n = parse_int(line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|n| (0..=MAX_BULK as i64).contains(n))
            .ok_or(ProtocolError::BulkLength)?;
        let start = nl + 1;
        let end = start + n as usize;
        if buf.len() < end + 2 {
            return Ok(false);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        cmd.args.push(start..end);
        pos = end + 2;
    }
    cmd.len = pos;
    Ok(true)
}

/// An inline command: one line split on spaces (no quoting).
fn parse_inline(buf: &[u8], cmd: &mut Command) -> Result<bool, ProtocolError> {
    let Some(nl) = line_end(buf, 0) else {
        return if buf.len() > MAX_INLINE {
            Err(ProtocolError::InlineTooLong)
        } else {
            Ok(false)
        };
    };
    let mut i = 0;
    while i < nl {
        while i < nl && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < nl && !buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            cmd.args.push(start..i);
        }
    }
    cmd.len = nl + 1;
    cmd.inline = true;
    Ok(true)
}

/// Appends a command in RESP array form.
pub fn encode_command<'a>(out: &mut Vec<u8>, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A simple error reply (`-CODE message\r\n`); CR and LF in `message`
/// become spaces (a simple error is one line).
pub fn error_reply(code: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(code.len() + message.len() + 4);
    out.push(b'-');
    out.extend_from_slice(code.as_bytes());
    out.push(b' ');
    out.extend(
        message
            .bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
    out
}

/// Where the scanner is inside a reply that has not fully arrived.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    /// Bytes of the current reply already walked.
    pos: usize,
    /// Bytes of a bulk string's payload (and its CRLF) still to come.
    blob_left: usize,
    /// Open aggregates: elements left, and whether it is an attribute
    /// (which does not count as an element of its parent).
    stack: Vec<(u64, bool)>,
}

impl ReplyScanner {
    /// Walks the reply at the start of `buf` (which holds the bytes seen
    /// last time, and maybe more). `Ok(Some(n))`: the first reply is `n`
    /// bytes long and the scanner is reset for the next one; `Ok(None)`:
    /// incomplete, call again with more bytes.
    pub fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        loop {
            if self.blob_left > 0 {
                let have = buf.len() - self.pos;
                if have < self.blob_left {
                    self.blob_left -= have;
                    self.pos = buf.len();
                    return Ok(None);
                }
                self.pos += self.blob_left;
                self.blob_left = 0;
                if let Some(n) = self.element_done() {
                    return Ok(Some(n));
                }
                continue;
            }
            let Some(&t) = buf.get(self.pos) else {
                return Ok(None);
            };
            let Some(nl) = line_end(buf, self.pos + 1) else {
                return if buf.len() - self.pos > MAX_INLINE {
                    Err(ProtocolError::HeaderTooLong)
                } else {
                    Ok(None)
                };
            };
            let line = &buf[self.pos + 1..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let next = nl + 1;
            match t {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {
                    self.pos = next;
                    if let Some(n) = self.element_done() {
                        return Ok(Some(n));
                    }
                }
                b'$' | b'!' | b'=' => {
                    let n = parse_int(line).ok_or(ProtocolError::ReplyLength)?;
                    self.pos = next;
                    if n >= 0 {
                        self.blob_left = n as usize + 2;
                    } else if let Some(n) = self.element_done() {
                        return Ok(Some(n));
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = parse_int(line).ok_or(ProtocolError::ReplyLength)?;
                    self.pos = next;
                    let n = if matches!(t, b'%' | b'|') {
                        n.saturating_mul(2)
                    } else {
                        n
                    };
                    if n > 0 {
                        if self.stack.len() >= MAX_DEPTH {
                            return Err(ProtocolError::TooDeep);
                        }
                        self.stack.push((n as u64, t == b'|'));
                    } else if let Some(n) = self.element_done() {
                        return Ok(Some(n));
                    }
                }
                other => return Err(ProtocolError::ReplyType(other)),
            }
        }
    }

    /// One element ended at `self.pos`; closes the aggregates it finished.
    /// `Some(n)`: the whole reply ended.
    fn element_done(&mut self) -> Option<usize> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                let n = self.pos;
                self.pos = 0;
                return Some(n);
            };
            top.0 -= 1;
            if top.0 > 0 {
                return None;
            }
            let (_, attribute) = self.stack.pop().unwrap_or((0, false));
            if attribute {
                // An attribute annotates the element after it: that one
                // counts for the parent, the attribute does not.
                return None;
            }
        }
    }

    /// Bytes of the current reply already walked (they may be written on
    /// when the reply is relayed unchanged); `consume` forgets them.
    pub fn walked(&self) -> usize {
        self.pos
    }

    /// The first `n` walked bytes were taken out of the buffer.
    pub fn consume(&mut self, n: usize) {
        self.pos -= n.min(self.pos);
    }

    /// True between replies.
    pub fn at_start(&self) -> bool {
        self.pos == 0 && self.blob_left == 0 && self.stack.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(buf: &[u8]) -> Vec<Vec<u8>> {
        let mut c = Command::default();
        assert!(parse_command(buf, &mut c).unwrap());
        c.args.iter().map(|r| buf[r.clone()].to_vec()).collect()
    }

    #[test]
    fn commands_parse_from_arrays_and_inline_lines() {
        assert_eq!(
            args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest"),
            vec![b"GET".to_vec(), b"k".to_vec()]
        );
        assert_eq!(args(b"PING  x\r\n"), vec![b"PING".to_vec(), b"x".to_vec()]);
        assert_eq!(args(b"PING\n"), vec![b"PING".to_vec()]);
        assert!(args(b"\r\n").is_empty());
        assert!(args(b"*0\r\n").is_empty());
        let mut c = Command::default();
        for cut in 0..b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".len() {
            assert!(!parse_command(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"[..cut], &mut c).unwrap());
        }
    }

    #[test]
    fn malformed_commands_get_redis_protocol_errors() {
        let mut c = Command::default();
        let e = |b: &[u8]| {
            parse_command(b, &mut Command::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e(b"*x\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*99999999\r\n"), "invalid multibulk length");
        assert_eq!(e(b"*1\r\n:5\r\n"), "expected '$', got ':'");
        assert_eq!(e(b"*1\r\n$-5\r\n"), "invalid bulk length");
        assert_eq!(e(b"*1\r\n$3\r\nGETXX"), "bulk string not followed by CRLF");
        assert_eq!(e(&vec![b'A'; MAX_INLINE + 1]), "too big inline request");
        assert!(!parse_command(b"*1\r\n$536870912\r\n", &mut c).unwrap());
        assert_eq!(e(b"*1\r\n$536870913\r\n"), "invalid bulk length");
    }

    #[test]
    fn the_scanner_finds_reply_ends_across_reads() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR x\r\n",
            b"$-1\r\n",
            b"$5\r\nhello\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"*-1\r\n",
            b"%1\r\n+k\r\n~2\r\n_\r\n#t\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            b"|1\r\n+a\r\n:1\r\n+OK\r\n",
            b"*1\r\n|1\r\n+a\r\n:1\r\n:2\r\n",
            b"=7\r\ntxt:abc\r\n",
        ];
        for r in replies {
            let mut with_tail = r.to_vec();
            with_tail.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(
                ReplyScanner::default().advance(&with_tail).unwrap(),
                Some(r.len()),
                "{:?}",
                String::from_utf8_lossy(r)
            );
            // Byte by byte, the scanner resumes.
            let mut s = ReplyScanner::default();
            for cut in 0..r.len() {
                assert_eq!(s.advance(&r[..cut]).unwrap(), None);
            }
            assert_eq!(s.advance(r).unwrap(), Some(r.len()));
            assert!(s.at_start());
        }
        // An attribute and the reply it annotates are one frame.
        assert_eq!(
            ReplyScanner::default()
                .advance(b"|1\r\n+a\r\n:1\r\n+OK\r\n")
                .unwrap(),
            Some(17)
        );
        assert!(ReplyScanner::default().advance(b"?x\r\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(ReplyScanner::default().advance(deep.as_bytes()).is_err());
    }

    #[test]
    fn errors_are_one_line() {
        assert_eq!(error_reply("ERR", "a\r\nb"), b"-ERR a  b\r\n");
        let mut out = Vec::new();
        encode_command(&mut out, [&b"AUTH"[..], b"p"].into_iter());
        assert_eq!(out, b"*2\r\n$4\r\nAUTH\r\n$1\r\np\r\n");
    }
}
