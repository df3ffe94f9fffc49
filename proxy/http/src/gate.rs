//! A strict HTTP/1.1 request framing gate in front of hyper's parser.
//!
//! hyper follows RFC 9112 leniently where smuggling lives: a request with both
//! `Content-Length` and `Transfer-Encoding` is read as chunked (the length is
//! dropped). A proxy must refuse such requests outright, so every request head
//! passes through this gate first: it is buffered until complete, parsed with
//! httparse, checked (one Content-Length value, digits only; Transfer-Encoding
//! exactly `chunked`, never beside Content-Length, never in HTTP/1.0; one
//! Host; bounded size), and only then released to hyper. The gate then tracks
//! the body's framing (fixed length or chunked) so it knows where the next
//! head starts. A refused head is never seen by hyper: the gate reports end of
//! input, lets hyper finish the responses it owes, and writes its own 400/431
//! with a plain-text reason before closing.
//!
//! [`Framer`] is the pure state machine; [`Gate`] is the I/O wrapper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest request head accepted (request line + headers).
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 100;
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a request was refused before reaching the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

impl Refused {
    fn bad(reason: impl Into<String>) -> Refused {
        Refused {
            status: 400,
            reason: reason.into(),
        }
    }

    fn too_large(reason: impl Into<String>) -> Refused {
        Refused {
            status: 431,
            reason: reason.into(),
        }
    }

    /// The complete HTTP/1.1 response sent for this refusal.
    pub fn response(&self) -> Vec<u8> {
        let text = match self.status {
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        let body = format!("warden: request refused: {}\n", self.reason);
        format!(
            "HTTP/1.1 {} {text}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// A fixed-length body with this many bytes left.
    Fixed(u64),
    /// A chunk-size line being collected.
    ChunkLine,
    /// Chunk data left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data; bytes of it seen.
    ChunkEnd(u8),
    /// Trailer section lines; bytes seen so far.
    Trailers(usize),
    /// After an upgrade or CONNECT: no more HTTP from this client.
    Passthrough,
}

/// The pure framing state machine: bytes in, validated bytes out.
#[derive(Debug)]
pub struct Framer {
    state: State,
    pending: Vec<u8>,
    /// The head just released asked for an upgrade/CONNECT.
    upgrade_after_body: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new()
    }
}

impl Framer {
    pub fn new() -> Framer {
        Framer {
            state: State::Head,
            pending: Vec::new(),
            upgrade_after_body: false,
        }
    }

    /// Inside a request body: the head went to hyper, which answers the
    /// request itself.
    pub fn in_body(&self) -> bool {
        !matches!(self.state, State::Head | State::Passthrough)
    }

    /// Feeds `input`; appends every byte that may go to hyper to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
        while !input.is_empty() {
            match self.state.clone() {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Head => {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    if self.pending.is_empty() {
                        let skip = input
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        input = &input[skip..];
                        if input.is_empty() {
                            return Ok(());
                        }
                    }
                    let before = self.pending.len();
                    self.pending.extend_from_slice(input);
                    let search_from = before.saturating_sub(3);
                    match find(&self.pending[search_from..], b"\r\n\r\n") {
                        None => {
                            if self.pending.len() > MAX_HEAD_BYTES {
                                return Err(Refused::too_large(format!(
                                    "the request head exceeds {MAX_HEAD_BYTES} bytes"
                                )));
                            }
                            return Ok(());
                        }
                        Some(i) => {
                            let end = search_from + i + 4;
                            if end > MAX_HEAD_BYTES {
                                return Err(Refused::too_large(format!(
                                    "the request head exceeds {MAX_HEAD_BYTES} bytes"
                                )));
                            }
                            let used_from_input = end - before;
                            let head: Vec<u8> = self.pending.drain(..end).collect();
                            self.pending.clear();
                            self.state = self.check_head(&head)?;
                            out.extend_from_slice(&head);
                            input = &input[used_from_input..];
                            self.after_body_if_done();
                        }
                    }
                }
                State::Fixed(left) => {
                    let n = (left.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = State::Fixed(left - n as u64);
                    self.after_body_if_done();
                }
                State::ChunkLine => {
                    let nl = input.iter().position(|b| *b == b'\n');
                    let take = nl.map(|i| i + 1).unwrap_or(input.len());
                    self.pending.extend_from_slice(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.pending.len() > MAX_CHUNK_LINE {
                        return Err(Refused::bad("a chunk-size line is too long"));
                    }
                    if nl.is_some() {
                        let line = std::mem::take(&mut self.pending);
                        let size = parse_chunk_line(&line)?;
                        self.state = if size == 0 {
                            State::Trailers(0)
                        } else {
                            State::ChunkData(size)
                        };
                    }
                }
                State::ChunkData(left) => {
                    let n = (left.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if left == n as u64 {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left - n as u64)
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if input[0] != want {
                        return Err(Refused::bad("chunk data is not followed by CRLF"));
                    }
                    out.push(input[0]);
                    input = &input[1..];
                    self.state = if seen == 0 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkLine
                    };
                }
                State::Trailers(total) => {
                    let nl = input.iter().position(|b| *b == b'\n');
                    let take = nl.map(|i| i + 1).unwrap_or(input.len());
                    self.pending.extend_from_slice(&input[..take]);
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let total = total + take;
                    if total > MAX_TRAILERS {
                        return Err(Refused::too_large("the trailer section is too large"));
                    }
                    self.state = State::Trailers(total);
                    if nl.is_some() {
                        let line = std::mem::take(&mut self.pending);
                        if line == b"\r\n" {
                            self.state = State::Head;
                            self.after_body_if_done();
                        } else if !line.ends_with(b"\r\n") {
                            return Err(Refused::bad("a trailer line does not end in CRLF"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn after_body_if_done(&mut self) {
        let done = matches!(self.state, State::Head | State::Fixed(0));
        if done {
            self.state = if self.upgrade_after_body {
                State::Passthrough
            } else {
                State::Head
            };
            self.upgrade_after_body = false;
        }
    }

    /// Validates one complete head; returns the body state.
    fn check_head(&mut self, head: &[u8]) -> Result<State, Refused> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        parse_head(&mut req, head)?;
        let check = check_request(&req)?;
        self.upgrade_after_body = check.switches;
        Ok(match check.body {
            BodyFraming::Chunked => State::ChunkLine,
            BodyFraming::Fixed(n) => State::Fixed(n),
        })
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// `Content-Length` bytes (0 without the header).
    Fixed(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What [`check_request`] learnt from an acceptable request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestCheck {
    pub body: BodyFraming,
    /// The request may switch protocols (any Upgrade header, or CONNECT).
    pub switches: bool,
}

/// Parses a complete head (it ends with CRLF CRLF) with httparse, mapping
/// failures to the refusal the gate answers.
pub fn parse_head<'h, 'b>(
    req: &mut httparse::Request<'h, 'b>,
    head: &'b [u8],
) -> Result<(), Refused> {
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        Ok(httparse::Status::Partial) => Err(Refused::bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => Err(Refused::too_large(format!(
            "more than {MAX_HEADERS} header fields"
        ))),
        Err(e) => Err(Refused::bad(format!("malformed request head ({e})"))),
    }
}

/// The gate's rules for a parsed request head: one Content-Length value,
/// digits only; Transfer-Encoding exactly `chunked`, never beside
/// Content-Length, never in HTTP/1.0; at most one Host.
pub fn check_request(req: &httparse::Request<'_, '_>) -> Result<RequestCheck, Refused> {
    let http10 = req.version == Some(0);
    let method = req.method.unwrap_or("");
    let mut content_length: Option<u64> = None;
    let mut te: Vec<String> = Vec::new();
    let mut hosts = 0;
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            content_length = Some(parse_content_length(v, content_length)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).unwrap_or("");
            te.extend(v.split(',').map(|s| s.trim().to_ascii_lowercase()));
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if hosts > 1 {
        return Err(Refused::bad("more than one Host header"));
    }
    if !te.is_empty() {
        if content_length.is_some() {
            return Err(Refused::bad(
                "both Content-Length and Transfer-Encoding are present (possible request smuggling)",
            ));
        }
        if http10 {
            return Err(Refused::bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if te != ["chunked"] {
            return Err(Refused::bad(format!(
                "Transfer-Encoding {:?} is not supported (only \"chunked\")",
                te.join(", ")
            )));
        }
    }
    Ok(RequestCheck {
        body: if te.is_empty() {
            BodyFraming::Fixed(content_length.unwrap_or(0))
        } else {
            BodyFraming::Chunked
        },
        switches: upgrade || method.eq_ignore_ascii_case("CONNECT"),
    })
}

/// One Content-Length field value (a list of equal numbers is one number),
/// checked against an earlier value of the same message.
pub fn parse_content_length(v: &str, earlier: Option<u64>) -> Result<u64, Refused> {
    let mut value = earlier;
    for part in v.split(',') {
        let part = part.trim();
        if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refused::bad(format!(
                "Content-Length {v:?} is not a plain number"
            )));
        }
        let n: u64 = part
            .parse()
            .map_err(|_| Refused::bad("Content-Length is out of range"))?;
        if value.is_some_and(|c| c != n) {
            return Err(Refused::bad(
                "conflicting Content-Length values (possible request smuggling)",
            ));
        }
        value = Some(n);
    }
    value.ok_or_else(|| Refused::bad("Content-Length is empty"))
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn parse_chunk_line(line: &[u8]) -> Result<u64, Refused> {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return Err(Refused::bad("a chunk-size line does not end in CRLF"));
    };
    let size_part = match body.iter().position(|b| *b == b';') {
        Some(i) => &body[..i],
        None => body,
    };
    let size_part = trim_trailing_ws(size_part);
    if size_part.is_empty()
        || size_part.len() > 15
        || !size_part.iter().all(|b| b.is_ascii_hexdigit())
    {
        return Err(Refused::bad("invalid chunk size"));
    }
    let s = std::str::from_utf8(size_part).map_err(|_| Refused::bad("invalid chunk size"))?;
    u64::from_str_radix(s, 16).map_err(|_| Refused::bad("invalid chunk size"))
}

fn trim_trailing_ws(mut b: &[u8]) -> &[u8] {
    while let Some((last, rest)) = b.split_last() {
        if *last == b' ' || *last == b'\t' {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// What the gate does when it refuses a request.
pub trait OnRefuse: Send + Sync {
    fn refused(&self, r: &Refused);
}

/// The I/O wrapper around a client connection.
pub struct Gate<S> {
    inner: S,
    framer: Framer,
    out: Vec<u8>,
    out_pos: usize,
    /// Set once a request was refused: no more input; this response goes out
    /// before shutdown.
    refusal: Option<(Vec<u8>, usize)>,
    eof: bool,
    notify: std::sync::Arc<dyn OnRefuse>,
    /// Read buffer, allocated once per connection.
    raw: Box<[u8]>,
}

impl<S> Gate<S> {
    pub fn new(inner: S, notify: std::sync::Arc<dyn OnRefuse>) -> Gate<S> {
        Gate {
            inner,
            framer: Framer::new(),
            out: Vec::new(),
            out_pos: 0,
            refusal: None,
            eof: false,
            notify,
            raw: vec![0u8; 16 * 1024].into_boxed_slice(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Gate<S> {
    /// Writes the pending refusal, if any. Ready(Ok) when nothing is left.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some((bytes, pos)) = self.refusal.as_mut() {
            while *pos < bytes.len() {
                let n = match Pin::new(&mut self.inner).poll_write(cx, &bytes[*pos..]) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *pos += n;
            }
            match Pin::new(&mut self.inner).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.refusal.is_some() || this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let got = rb.filled();
            if got.is_empty() {
                this.eof = true;
                continue;
            }
            if let Err(r) = this.framer.feed(got, &mut this.out) {
                this.notify.refused(&r);
                // Inside a body the request is hyper's already: its body
                // ends here, and the proxy answers it with this reason (the
                // notice keeps it); a second response would follow otherwise.
                let response = if this.framer.in_body() {
                    Vec::new()
                } else {
                    r.response()
                };
                this.refusal = Some((response, 0));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_refusal(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (Vec<u8>, Result<(), Refused>) {
        let mut f = Framer::new();
        let mut out = Vec::new();
        let r = f.feed(input, &mut out);
        (out, r)
    }

    /// Byte-at-a-time feeding gives the same result as one call.
    fn run_bytewise(input: &[u8]) -> (Vec<u8>, Result<(), Refused>) {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for b in input {
            if let Err(e) = f.feed(std::slice::from_ref(b), &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn simple_requests_pass_unchanged() {
        let two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(two), (two.to_vec(), Ok(())));
        assert_eq!(run_bytewise(two), (two.to_vec(), Ok(())));
    }

    #[test]
    fn chunked_bodies_are_tracked() {
        let req = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(req), (req.to_vec(), Ok(())));
        assert_eq!(run_bytewise(req), (req.to_vec(), Ok(())));
    }

    #[test]
    fn cl_and_te_together_are_refused_before_hyper_sees_them() {
        let first = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut req = first.clone();
        req.extend_from_slice(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
        );
        let (out, r) = run(&req);
        assert_eq!(out, first);
        let r = r.unwrap_err();
        assert_eq!(r.status, 400);
        assert!(r.reason.contains("smuggling"), "{r:?}");
        let (out, r) = run_bytewise(&req);
        assert_eq!(out, first);
        assert!(r.is_err());
    }

    #[test]
    fn bad_framing_is_refused() {
        for (req, needle) in [
            (
                &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"[..],
                "conflicting",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 5\r\n\r\n",
                "conflicting",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n",
                "plain number",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "not supported",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
                "not supported",
            ),
            (
                b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                "HTTP/1.0",
            ),
            (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "Host"),
            (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "malformed"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "malformed"),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
                "CRLF",
            ),
        ] {
            let (_, r) = run(req);
            let r = r.expect_err(&String::from_utf8_lossy(req));
            assert!(
                r.reason.contains(needle),
                "{r:?} for {}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn oversized_heads_get_431() {
        let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        let (out, r) = run(&req);
        assert!(out.is_empty());
        assert_eq!(r.unwrap_err().status, 431);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(run(&many).1.unwrap_err().status, 431);
        let resp = String::from_utf8(Refused::too_large("x").response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 431 "));
        assert!(resp.ends_with("warden: request refused: x\n"));
    }

    #[test]
    fn upgrade_switches_to_passthrough() {
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello garbage with Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(run(req), (req.to_vec(), Ok(())));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut buf = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..64 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (seed >> 33) as u8;
                buf.push(match b % 8 {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b'0',
                    3 => b';',
                    _ => b,
                });
            }
            let _ = run(&buf);
            let _ = run_bytewise(&buf);
        }
    }
}
