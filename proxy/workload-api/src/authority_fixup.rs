//! Makes requests from gRPC C-core (grpcio, so py-spiffe), grpc-java and
//! grpc-swift acceptable to tonic over a Unix socket.
//!
//! Those clients send the socket path, percent-encoded, as the HTTP/2
//! `:authority` (e.g. `tmp%2Fagent.sock`). That is no valid URI authority, so
//! the HTTP/2 layer under tonic (h2) resets every such request with
//! `PROTOCOL_ERROR` before any handler runs, and h2 has no switch to relax it
//! (its check is unconditional as of h2 0.4.20; hyperium/h2#487, which would
//! relax it for unix sockets, is unmerged). When h2 gains such a setting, this
//! module can go.
//! [`Conn`] sits between the socket and h2 and rewrites, in the client's
//! request headers only, an `:authority` h2 would refuse to `localhost`.
//!
//! How: HTTP/2 frames from the client are passed on byte for byte, except
//! header blocks (HEADERS + CONTINUATION). Those are decoded with an HPACK
//! decoder that mirrors the client's compression state (RFC 7541) and
//! re-encoded as plain literals that never touch h2's dynamic table, so both
//! sides' tables stay consistent whatever the client indexes. Nothing else
//! changes: the server's bytes, the peer credentials, every other header. If
//! the input is not HTTP/2, or is malformed in a way this layer cannot
//! follow, it stops rewriting and hands h2 the original bytes, which then
//! fails exactly as it would have without this layer.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// The server's SETTINGS_MAX_FRAME_SIZE (h2's default, which tonic keeps).
const MAX_FRAME_LEN: usize = 16_384;
/// Largest header block (compressed, or decoded) this layer handles.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The server's SETTINGS_HEADER_TABLE_SIZE (the HTTP/2 default).
const MAX_TABLE_SIZE: usize = 4096;
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// What the server knows of an accepted connection: the peer's credentials
/// and when warden accepted it (CLOCK_BOOTTIME ns: a caller that exec'd
/// after that is refused).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub uds: UdsConnectInfo,
    pub accepted_ns: u64,
}

/// An accepted connection, with client header blocks repaired on read.
pub(super) struct Conn {
    io: UnixStream,
    accepted_ns: u64,
    rewriter: Rewriter,
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
}

impl Conn {
    pub(super) fn new(io: UnixStream, accepted_ns: u64) -> Conn {
        Conn {
            io,
            accepted_ns,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            uds: self.io.connect_info(),
            accepted_ns: self.accepted_ns,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk_buf))?;
            let got = chunk_buf.filled();
            if got.is_empty() {
                this.eof = true;
                this.rewriter.finish(&mut this.out);
            } else {
                this.rewriter.feed(got, &mut this.out);
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Preface,
    Frames,
    Passthrough,
}

/// A header block being collected across HEADERS and CONTINUATION.
struct Pending {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, for handing over unchanged.
    original: Vec<u8>,
}

/// The client-to-server byte stream transformer (no I/O of its own).
pub(super) struct Rewriter {
    mode: Mode,
    raw: Vec<u8>,
    pending: Option<Pending>,
    decoder: Decoder,
}

impl Rewriter {
    pub(super) fn new() -> Rewriter {
        Rewriter {
            mode: Mode::Preface,
            raw: Vec::new(),
            pending: None,
            decoder: Decoder::new(),
        }
    }

    /// Takes bytes from the client; appends what h2 should read to `out`.
    pub(super) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.raw.extend_from_slice(input);
        loop {
            match self.mode {
                Mode::Passthrough => {
                    out.append(&mut self.raw);
                    return;
                }
                Mode::Preface => {
                    let n = self.raw.len().min(PREFACE.len());
                    if self.raw[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    out.extend(self.raw.drain(..PREFACE.len()));
                    self.mode = Mode::Frames;
                }
                Mode::Frames => {
                    let Some(header) = self.raw.get(..FRAME_HEADER_LEN) else {
                        return;
                    };
                    let len = (usize::from(header[0]) << 16)
                        | (usize::from(header[1]) << 8)
                        | usize::from(header[2]);
                    if len > MAX_FRAME_LEN {
                        // h2 refuses it anyway; do not buffer it.
                        self.give_up(Vec::new(), out);
                        continue;
                    }
                    if self.raw.len() < FRAME_HEADER_LEN + len {
                        return;
                    }
                    let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER_LEN + len).collect();
                    if let Err(unsent) = self.frame(frame, out) {
                        self.give_up(unsent, out);
                    }
                }
            }
        }
    }

    /// The client closed its side: hand over whatever is left.
    pub(super) fn finish(&mut self, out: &mut Vec<u8>) {
        self.give_up(Vec::new(), out);
        out.append(&mut self.raw);
    }

    /// Stops rewriting: what was held back goes out unchanged, in order.
    fn give_up(&mut self, unsent: Vec<u8>, out: &mut Vec<u8>) {
        if let Some(p) = self.pending.take() {
            out.extend_from_slice(&p.original);
        }
        out.extend_from_slice(&unsent);
        self.mode = Mode::Passthrough;
    }

    /// One complete frame. `Err` carries bytes to hand over unchanged
    /// (besides any pending block) before passing everything through.
    fn frame(&mut self, frame: Vec<u8>, out: &mut Vec<u8>) -> Result<(), Vec<u8>> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        match (kind, self.pending.as_mut()) {
            (TYPE_HEADERS, None) => {
                let Some((priority, fragment)) = headers_fragment(flags, &frame) else {
                    return Err(frame);
                };
                let pending = Pending {
                    stream_id,
                    flags,
                    priority,
                    block: fragment.to_vec(),
                    original: frame,
                };
                if flags & FLAG_END_HEADERS != 0 {
                    self.emit(pending, out)
                } else {
                    self.pending = Some(pending);
                    Ok(())
                }
            }
            (TYPE_CONTINUATION, Some(p)) if p.stream_id == stream_id => {
                let fragment = &frame[FRAME_HEADER_LEN..];
                if p.block.len() + fragment.len() > MAX_HEADER_BLOCK {
                    return Err(frame);
                }
                p.block.extend_from_slice(fragment);
                p.original.extend_from_slice(&frame);
                if flags & FLAG_END_HEADERS != 0 {
                    match self.pending.take() {
                        Some(p) => self.emit(p, out),
                        None => Ok(()),
                    }
                } else {
                    Ok(())
                }
            }
            // Anything else inside a header block is a protocol error
            // that h2 will report; a lone frame passes as it is.
            (_, Some(_)) => Err(frame),
            (_, None) => {
                out.extend_from_slice(&frame);
                Ok(())
            }
        }
    }

    /// Decodes a complete header block and writes it out re-encoded.
    fn emit(&mut self, p: Pending, out: &mut Vec<u8>) -> Result<(), Vec<u8>> {
        let Ok(headers) = self.decoder.decode(&p.block) else {
            return Err(p.original);
        };
        let mut block = Vec::with_capacity(p.block.len() * 2);
        let mut decoded_len = 0usize;
        for h in &headers {
            let value = if h.name == b":authority" && !valid_authority(&h.value) {
                tracing::debug!("workload API: replaced a socket-path :authority");
                REPLACEMENT_AUTHORITY
            } else {
                h.value.as_slice()
            };
            // The replacement can be longer than what it replaces: a block
            // this layer would not accept itself is not passed on either
            // (h2 gets the original and refuses its `:authority`).
            decoded_len += h.name.len() + value.len() + 32;
            if decoded_len > MAX_HEADER_BLOCK {
                return Err(p.original);
            }
            encode_literal(&mut block, &h.name, value, h.never_indexed);
        }
        write_header_frames(p.stream_id, p.flags, p.priority, &block, out);
        Ok(())
    }
}

fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The header block fragment of a HEADERS frame, without padding and
/// priority fields; `None` if those do not fit.
fn headers_fragment(flags: u8, frame: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut payload = frame.get(FRAME_HEADER_LEN..)?;
    if flags & FLAG_PADDED != 0 {
        let (&pad, rest) = payload.split_first()?;
        payload = rest.get(..rest.len().checked_sub(usize::from(pad))?)?;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let fields = payload.get(..5)?;
        priority = Some([fields[0], fields[1], fields[2], fields[3], fields[4]]);
        payload = payload.get(5..)?;
    }
    Some((priority, payload))
}

/// Writes `block` as a HEADERS frame (same END_STREAM and priority, no
/// padding) plus CONTINUATION frames as needed.
fn write_header_frames(
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
    out: &mut Vec<u8>,
) {
    let keep = flags & !(FLAG_PADDED | FLAG_END_HEADERS);
    let first_room = MAX_FRAME_LEN - if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut frame_flags = keep;
    if rest.is_empty() {
        frame_flags |= FLAG_END_HEADERS;
    }
    let prio_len = if priority.is_some() { 5 } else { 0 };
    push_frame_header(
        out,
        first.len() + prio_len,
        TYPE_HEADERS,
        frame_flags,
        stream_id,
    );
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_LEN));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        push_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, stream_id);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn push_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    // len <= MAX_FRAME_LEN, so three bytes hold it.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// A literal header field without indexing (or never indexed), new name,
/// no Huffman coding: it leaves the receiver's dynamic table alone.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8], never_indexed: bool) {
    out.push(if never_indexed { 0x10 } else { 0x00 });
    encode_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    encode_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// RFC 7541 §5.1 integer with an `n`-bit prefix; `first` holds the bits
/// above the prefix.
fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) name: Vec<u8>,
    pub(super) value: Vec<u8>,
    pub(super) never_indexed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HpackError;

/// An HPACK decoder (RFC 7541) with its dynamic table.
pub(super) struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Decoder {
    pub(super) fn new() -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: MAX_TABLE_SIZE,
        }
    }

    pub(super) fn decode(&mut self, block: &[u8]) -> Result<Vec<Header>, HpackError> {
        let mut cur = Cursor { buf: block, pos: 0 };
        let mut headers = Vec::new();
        let mut decoded_len = 0usize;
        while let Some(&first) = cur.peek() {
            let header = if first & 0x80 != 0 {
                let index = cur.int(7)?;
                let (name, value) = self.lookup(index)?;
                Header {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0x40 != 0 {
                let (name, value) = self.literal(&mut cur, 6)?;
                self.insert(name.clone(), value.clone());
                Header {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0x20 != 0 {
                // RFC 7541 §4.2: only at the start of a block (h2 refuses
                // one after a header field, so this layer gives up).
                if !headers.is_empty() {
                    return Err(HpackError);
                }
                let new_max = cur.int(5)?;
                if new_max > MAX_TABLE_SIZE {
                    return Err(HpackError);
                }
                self.max_size = new_max;
                self.evict();
                continue;
            } else {
                let never_indexed = first & 0x10 != 0;
                let (name, value) = self.literal(&mut cur, 4)?;
                Header {
                    name,
                    value,
                    never_indexed,
                }
            };
            decoded_len += header.name.len() + header.value.len() + 32;
            if decoded_len > MAX_HEADER_BLOCK {
                return Err(HpackError);
            }
            headers.push(header);
        }
        Ok(headers)
    }

    fn literal(&self, cur: &mut Cursor<'_>, prefix: u32) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        let name_index = cur.int(prefix)?;
        let name = if name_index == 0 {
            cur.string()?
        } else {
            self.lookup(name_index)?.0
        };
        Ok((name, cur.string()?))
    }

    fn lookup(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        if index == 0 {
            return Err(HpackError);
        }
        if let Some(&(name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        self.table
            .get(index - 1 - STATIC_TABLE.len())
            .cloned()
            .ok_or(HpackError)
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let entry = name.len() + value.len() + 32;
        if entry > self.max_size {
            self.table.clear();
            self.size = 0;
            return;
        }
        self.size += entry;
        self.table.push_front((name, value));
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<&u8> {
        self.buf.get(self.pos)
    }

    fn byte(&mut self) -> Result<u8, HpackError> {
        let b = *self.buf.get(self.pos).ok_or(HpackError)?;
        self.pos += 1;
        Ok(b)
    }

    /// RFC 7541 §5.1 integer with an `n`-bit prefix (bounded to 2^21).
    fn int(&mut self, n: u32) -> Result<usize, HpackError> {
        let max = (1usize << n) - 1;
        let mut value = usize::from(self.byte()?) & max;
        if value < max {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            value += usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift > 14 {
                return Err(HpackError);
            }
        }
    }

    /// RFC 7541 §5.2 string literal, Huffman-decoded if flagged.
    fn string(&mut self) -> Result<Vec<u8>, HpackError> {
        let huffman = self.peek().is_some_and(|b| b & 0x80 != 0);
        let len = self.int(7)?;
        let end = self.pos.checked_add(len).ok_or(HpackError)?;
        let bytes = self.buf.get(self.pos..end).ok_or(HpackError)?;
        self.pos = end;
        if huffman {
            huffman_decode(bytes)
        } else {
            Ok(bytes.to_vec())
        }
    }
}

/// Decodes RFC 7541 Huffman coding. The code is canonical, so it follows
/// from the code lengths alone: within each length, codes are consecutive
/// in symbol order, and each length's first code continues the previous.
pub(super) fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, HpackError> {
    let mut out = Vec::with_capacity(input.len() * 8 / 5);
    let mut code: u32 = 0;
    let mut len: u32 = 0;
    for byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if let Some(symbol) = huffman_symbol(code, len) {
                // EOS (256) must never appear inside a string.
                out.push(u8::try_from(symbol).map_err(|_| HpackError)?);
                code = 0;
                len = 0;
            } else if len >= 30 {
                return Err(HpackError);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1 << len) - 1 {
        return Err(HpackError);
    }
    Ok(out)
}

/// The symbol whose code is the `len`-bit `code`, if any.
fn huffman_symbol(code: u32, len: u32) -> Option<u16> {
    let mut first: u32 = 0;
    let mut prev_len: u32 = 0;
    for &(group_len, symbols) in HUFFMAN_SYMBOLS_BY_LENGTH {
        first <<= group_len - prev_len;
        if group_len == len {
            let offset = code.checked_sub(first)?;
            return symbols.get(usize::try_from(offset).ok()?).copied();
        }
        if group_len > len {
            return None;
        }
        first += symbols.len() as u32;
        prev_len = group_len;
    }
    None
}

/// RFC 7541 Appendix B, as (code length, symbols with that length in
/// ascending order); 256 is EOS.
const HUFFMAN_SYMBOLS_BY_LENGTH: &[(u32, &[u16])] = &[
    (5, &[48, 49, 50, 97, 99, 101, 105, 111, 115, 116]),
    (
        6,
        &[
            32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61, 65, 95, 98, 100, 102, 103, 104,
            108, 109, 110, 112, 114, 117,
        ],
    ),
    (
        7,
        &[
            58, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86,
            87, 89, 106, 107, 113, 118, 119, 120, 121, 122,
        ],
    ),
    (8, &[38, 42, 44, 59, 88, 90]),
    (10, &[33, 34, 40, 41, 63]),
    (11, &[39, 43, 124]),
    (12, &[35, 62]),
    (13, &[0, 36, 64, 91, 93, 126]),
    (14, &[94, 125]),
    (15, &[60, 96, 123]),
    (19, &[92, 195, 208]),
    (20, &[128, 130, 131, 162, 184, 194, 224, 226]),
    (
        21,
        &[
            153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230,
        ],
    ),
    (
        22,
        &[
            129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169, 170, 173, 178, 181, 185,
            186, 187, 189, 190, 196, 198, 228, 232, 233,
        ],
    ),
    (
        23,
        &[
            1, 135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166,
            168, 174, 175, 180, 182, 183, 188, 191, 197, 231, 239,
        ],
    ),
    (
        24,
        &[9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237],
    ),
    (25, &[199, 207, 234, 235]),
    (
        26,
        &[
            192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255,
        ],
    ),
    (
        27,
        &[
            203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252,
            253, 254,
        ],
    ),
    (
        28,
        &[
            2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28,
            29, 30, 31, 127, 220, 249,
        ],
    ),
    (30, &[10, 13, 22, 256]),
];

/// RFC 7541 Appendix A.
const STATIC_TABLE: &[(&str, &str)] = &[
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(headers: &[Header]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|h| {
                (
                    String::from_utf8(h.name.clone()).unwrap(),
                    String::from_utf8(h.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn huffman_matches_rfc7541_examples() {
        assert_eq!(
            huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")).unwrap(),
            b"www.example.com"
        );
        assert_eq!(huffman_decode(&hex("a8eb 1064 9cbf")).unwrap(), b"no-cache");
        assert_eq!(
            huffman_decode(&hex("25a8 49e9 5bb8 e8b4 bf")).unwrap(),
            b"custom-value"
        );
        // Padding longer than 7 bits, or not all ones, is an error.
        assert!(huffman_decode(&hex("a8eb 1064 9cbf ff")).is_err());
        assert!(huffman_decode(&hex("a8eb 1064 9cbe")).is_err());
        // Every code length group fits: the last code is all ones.
        let total: u64 = HUFFMAN_SYMBOLS_BY_LENGTH
            .iter()
            .map(|(len, syms)| (syms.len() as u64) << (30 - len))
            .sum();
        assert_eq!(
            total,
            1 << 30,
            "the code lengths do not form a complete code"
        );
        let count: usize = HUFFMAN_SYMBOLS_BY_LENGTH.iter().map(|(_, s)| s.len()).sum();
        assert_eq!(count, 257);
    }

    #[test]
    fn decoder_follows_rfc7541_c4_request_sequence() {
        let mut d = Decoder::new();
        let first = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .unwrap();
        assert_eq!(
            pairs(&first),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let second = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(
            pairs(&second),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let third = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .unwrap();
        assert_eq!(
            pairs(&third),
            p(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164);
        assert!(d.decode(&hex("80")).is_err(), "index 0 is invalid");
        assert!(d.decode(&hex("ff 00")).is_err(), "index past the table");
    }

    /// A HEADERS frame with `block`, as a client would send it.
    fn headers_frame(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        push_frame_header(&mut f, payload.len(), TYPE_HEADERS, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    /// Splits rewritten output into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]);
            let sid = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], sid, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    /// A block with a socket-path authority: literal with incremental
    /// indexing (so the client's table holds it), then a reference to it.
    fn grpc_c_core_like_block(authority: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        b.push(0x44); // :path, literal with indexing, name index 4
        encode_int(&mut b, 0, 7, 22);
        b.extend_from_slice(b"/SpiffeWorkloadAPI/Foo");
        b.push(0x41); // :authority, literal with indexing
        encode_int(&mut b, 0, 7, authority.len());
        b.extend_from_slice(authority.as_bytes());
        b.extend_from_slice(&[0x00, 0x04]);
        b.extend_from_slice(b"abcd");
        b.push(0x01);
        b.push(b'x');
        b
    }

    #[test]
    fn socket_path_authority_becomes_localhost() {
        let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
        let block = grpc_c_core_like_block("tmp%2Fagent.sock");
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&settings);
        input.extend(headers_frame(1, FLAG_END_HEADERS, &block));
        // Second request on the connection refers to the indexed entries:
        // 0xbe = newest (:authority), 0xbf = :path.
        input.extend(headers_frame(
            3,
            FLAG_END_HEADERS | 0x1,
            &[0x83, 0x86, 0xbf, 0xbe],
        ));

        // Fed one byte at a time, to exercise every partial state.
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        for b in &input {
            rw.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let fs = frames(&out[PREFACE.len()..]);
        assert_eq!(fs.len(), 3);
        assert_eq!(fs[0], (4, 0, 0, Vec::new()), "SETTINGS unchanged");
        let mut server = Decoder::new();
        let (kind, flags, sid, payload) = &fs[1];
        assert_eq!((*kind, *flags, *sid), (TYPE_HEADERS, FLAG_END_HEADERS, 1));
        assert_eq!(
            pairs(&server.decode(payload).unwrap()),
            p(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/SpiffeWorkloadAPI/Foo"),
                (":authority", "localhost"),
                ("abcd", "x")
            ])
        );
        let (kind, flags, sid, payload) = &fs[2];
        assert_eq!(
            (*kind, *flags, *sid),
            (TYPE_HEADERS, FLAG_END_HEADERS | 0x1, 3)
        );
        assert_eq!(
            pairs(&server.decode(payload).unwrap()),
            p(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/SpiffeWorkloadAPI/Foo"),
                (":authority", "localhost"),
            ])
        );
        assert!(
            server.table.is_empty(),
            "the server's table must stay unused"
        );
    }

    #[test]
    fn valid_authority_padding_priority_and_continuation() {
        let block = grpc_c_core_like_block("localhost:1234");
        // PADDED + PRIORITY on HEADERS, block split over a CONTINUATION.
        let (a, b) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 1, 7]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(5, FLAG_PADDED | FLAG_PRIORITY, &payload));
        push_frame_header(&mut input, b.len(), TYPE_CONTINUATION, FLAG_END_HEADERS, 5);
        input.extend_from_slice(b);
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(&input, &mut out);
        let fs = frames(&out[PREFACE.len()..]);
        assert_eq!(fs.len(), 1);
        let (kind, flags, sid, payload) = &fs[0];
        assert_eq!(
            (*kind, *flags, *sid),
            (TYPE_HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS, 5)
        );
        assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 7]);
        let headers = Decoder::new().decode(&payload[5..]).unwrap();
        assert_eq!(
            pairs(&headers)[3],
            p(&[(":authority", "localhost:1234")])[0]
        );
    }

    #[test]
    fn other_protocols_and_broken_frames_pass_through_unchanged() {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");

        // An undecodable header block goes to h2 as it came.
        let mut input = PREFACE.to_vec();
        let bad = headers_frame(1, FLAG_END_HEADERS, &[0x80]);
        input.extend_from_slice(&bad);
        input.extend_from_slice(b"trailing");
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(&input, &mut out);
        assert_eq!(out, input);

        // An oversized frame is not buffered; everything passes on.
        let mut input = PREFACE.to_vec();
        push_frame_header(&mut input, MAX_FRAME_LEN + 1, 0, 0, 1);
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(&input, &mut out);
        assert_eq!(out, input);

        // A truncated stream is handed over at EOF.
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0, 0, 9, 1]);
        rw.feed(&input, &mut out);
        rw.finish(&mut out);
        assert_eq!(out, input);
    }

    #[test]
    fn long_blocks_are_split_into_continuations() {
        let mut block = vec![0x41];
        encode_int(&mut block, 0, 7, 9);
        block.extend_from_slice(b"tmp%2Fsoc");
        let big = "v".repeat(20_000);
        block.push(0x00);
        encode_int(&mut block, 0, 7, 1);
        block.push(b'x');
        encode_int(&mut block, 0, 7, big.len());
        block.extend_from_slice(big.as_bytes());
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, 0, &block[..10_000]));
        push_frame_header(
            &mut input,
            block.len() - 10_000,
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            1,
        );
        input.extend_from_slice(&block[10_000..]);
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(&input, &mut out);
        let fs = frames(&out[PREFACE.len()..]);
        assert_eq!(fs.len(), 2);
        assert_eq!((fs[0].0, fs[0].1), (TYPE_HEADERS, 0));
        assert_eq!((fs[1].0, fs[1].1), (TYPE_CONTINUATION, FLAG_END_HEADERS));
        assert!(fs.iter().all(|f| f.3.len() <= MAX_FRAME_LEN));
        let joined: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
        let headers = Decoder::new().decode(&joined).unwrap();
        assert_eq!(headers[0].value, b"localhost");
        assert_eq!(headers[1].value.len(), 20_000);
    }

    // ----- helpers for the tests below ------------------------------------

    /// RFC 7541 Huffman encoding, from the same code-length table the decoder
    /// uses (canonical code: consecutive within a length).
    fn huffman_encode(input: &[u8]) -> Vec<u8> {
        let mut codes = [(0u32, 0u32); 257];
        let mut code: u32 = 0;
        let mut prev_len = 0;
        for &(len, symbols) in HUFFMAN_SYMBOLS_BY_LENGTH {
            code <<= len - prev_len;
            for &symbol in symbols {
                codes[usize::from(symbol)] = (code, len);
                code += 1;
            }
            prev_len = len;
        }
        let mut out = Vec::new();
        let mut acc: u64 = 0;
        let mut bits: u32 = 0;
        for &b in input {
            let (code, len) = codes[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            let pad = 8 - bits;
            out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
        }
        out
    }

    /// An RFC 7541 §5.2 string literal, Huffman-coded or not.
    fn string_literal(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        if huffman {
            let coded = huffman_encode(s);
            encode_int(out, 0x80, 7, coded.len());
            out.extend_from_slice(&coded);
        } else {
            encode_int(out, 0, 7, s.len());
            out.extend_from_slice(s);
        }
    }

    /// A request header block: `:method POST`, `:scheme http`, a `:path`, the
    /// `:authority` if given, then `extra`; every literal without indexing.
    fn request_block(authority: Option<&[u8]>, extra: &[(&[u8], &[u8])], huffman: bool) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        b.push(0x04); // :path (static index 4), literal without indexing
        string_literal(&mut b, b"/SpiffeWorkloadAPI/FetchX509SVID", huffman);
        if let Some(a) = authority {
            b.push(0x01); // :authority (static index 1), literal without indexing
            string_literal(&mut b, a, huffman);
        }
        for (name, value) in extra {
            b.push(0x00); // literal without indexing, new name
            string_literal(&mut b, name, huffman);
            string_literal(&mut b, value, huffman);
        }
        b
    }

    /// `input` through a fresh rewriter in one read, then EOF.
    fn rewrite(input: &[u8]) -> Vec<u8> {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        rw.feed(input, &mut out);
        rw.finish(&mut out);
        out
    }

    /// The header lists h2 decodes from rewritten output, one per block.
    /// Also checks that the rewritten blocks leave h2's dynamic table empty.
    fn server_view(out: &[u8]) -> Vec<Vec<(String, String)>> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut server = Decoder::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, _, payload) in frames(&out[PREFACE.len()..]) {
            if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                continue;
            }
            let skip = if kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                5
            } else {
                0
            };
            block.extend_from_slice(&payload[skip..]);
            if flags & FLAG_END_HEADERS != 0 {
                blocks.push(pairs(&server.decode(&block).unwrap()));
                block.clear();
            }
        }
        assert!(server.table.is_empty(), "h2's table must stay unused");
        blocks
    }

    /// Frames other than header blocks: what the layer must never touch.
    fn other_frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        frames(bytes)
            .into_iter()
            .filter(|f| f.0 != TYPE_HEADERS && f.0 != TYPE_CONTINUATION)
            .collect()
    }

    /// A client's opening: preface, SETTINGS, a padded HEADERS with priority
    /// whose block ends in a CONTINUATION, DATA, WINDOW_UPDATE, and a second
    /// request that refers to the first one's indexed entries.
    fn client_opening() -> Vec<u8> {
        let block = grpc_c_core_like_block("tmp%2Fagent.sock");
        let (a, b) = block.split_at(7);
        let mut payload = vec![2]; // pad length
        payload.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0]);
        let mut input = PREFACE.to_vec();
        push_frame_header(&mut input, 6, 0x4, 0, 0); // SETTINGS
        input.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        input.extend(headers_frame(1, FLAG_PADDED | FLAG_PRIORITY, &payload));
        push_frame_header(&mut input, b.len(), TYPE_CONTINUATION, FLAG_END_HEADERS, 1);
        input.extend_from_slice(b);
        push_frame_header(&mut input, 5, 0x0, 0x1, 1); // DATA, END_STREAM
        input.extend_from_slice(&[0, 0, 0, 0, 0]);
        push_frame_header(&mut input, 4, 0x8, 0, 0); // WINDOW_UPDATE
        input.extend_from_slice(&[0, 0, 0x10, 0]);
        input.extend(headers_frame(
            3,
            FLAG_END_HEADERS,
            &[0x83, 0x86, 0xbf, 0xbe],
        ));
        input
    }

    /// xorshift64*: a small deterministic generator, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    // ----- framing ----------------------------------------------------------

    #[test]
    fn output_does_not_depend_on_where_reads_split_the_input() {
        let input = client_opening();
        let whole = rewrite(&input);
        let seen = server_view(&whole);
        assert_eq!(seen.len(), 2);
        for headers in &seen {
            assert!(
                headers.contains(&(":authority".to_string(), "localhost".to_string())),
                "{headers:?}"
            );
        }
        assert_eq!(
            other_frames(&input[PREFACE.len()..]),
            other_frames(&whole[PREFACE.len()..])
        );
        for i in 0..=input.len() {
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            rw.feed(&input[..i], &mut out);
            rw.feed(&input[i..], &mut out);
            rw.finish(&mut out);
            assert_eq!(out, whole, "split at byte {i}");
        }
        for size in 1..=23 {
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            for chunk in input.chunks(size) {
                rw.feed(chunk, &mut out);
            }
            rw.finish(&mut out);
            assert_eq!(out, whole, "reads of {size} bytes");
        }
    }

    #[tokio::test]
    async fn conn_reads_rewritten_bytes_and_writes_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client, server) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(server, 0);
        assert!(conn.connect_info().uds.peer_cred.is_some());
        let input = client_opening();
        let expected = rewrite(&input);
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(5) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        // A small buffer, so rewritten bytes are handed over in several reads.
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, expected);
        let mut client = writer.await.unwrap();
        conn.write_all(b"server bytes").await.unwrap();
        conn.flush().await.unwrap();
        let mut reply = [0u8; 12];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"server bytes");
    }

    // ----- HPACK --------------------------------------------------------------

    #[test]
    fn huffman_decoding_inverts_encoding_for_every_byte() {
        assert_eq!(
            huffman_encode(b"www.example.com"),
            hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
        );
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        for b in 0..=255u8 {
            assert_eq!(huffman_decode(&huffman_encode(&[b])).unwrap(), [b]);
        }
        assert_eq!(huffman_decode(&[]).unwrap(), Vec::<u8>::new());
        // EOS (30 ones) inside a string is an error, not a byte.
        assert!(huffman_decode(&hex("ffff fffc")).is_err());
    }

    #[test]
    fn decoder_follows_rfc7541_c3_request_sequence_without_huffman() {
        let mut d = Decoder::new();
        let first = d
            .decode(&hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"))
            .unwrap();
        assert_eq!(
            pairs(&first),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let second = d
            .decode(&hex("8286 84be 5808 6e6f 2d63 6163 6865"))
            .unwrap();
        assert_eq!(pairs(&second)[4], p(&[("cache-control", "no-cache")])[0]);
        let third = d
            .decode(&hex(
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ))
            .unwrap();
        assert_eq!(
            pairs(&third),
            p(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn authorities_are_judged_by_decoded_value_huffman_or_not() {
        let cases: &[(&[u8], &str)] = &[
            (b"tmp%2Fagent.sock", "localhost"),          // gRPC C-core
            (b"/run/warden/workload.sock", "localhost"), // grpc-java
            (b"", "localhost"),
            (b"localhost", "localhost"),
            (b"localhost:1234", "localhost:1234"),
            (b"[::1]:8080", "[::1]:8080"),
            (b"workload.example.org", "workload.example.org"),
        ];
        for huffman in [false, true] {
            for (i, (authority, expected)) in cases.iter().enumerate() {
                let extra: &[(&[u8], &[u8])] = &[(b"user-agent", b"grpc-python/1.62")];
                let block = request_block(Some(authority), extra, huffman);
                let mut input = PREFACE.to_vec();
                input.extend(headers_frame(1, FLAG_END_HEADERS, &block));
                let seen = server_view(&rewrite(&input));
                let what = format!("case {i}, huffman {huffman}");
                assert_eq!(
                    seen,
                    vec![p(&[
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
                        (":authority", expected),
                        ("user-agent", "grpc-python/1.62"),
                    ])],
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn missing_authority_stays_missing() {
        let extra: &[(&[u8], &[u8])] = &[(b"te", b"trailers")];
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(
            1,
            FLAG_END_HEADERS | 0x1,
            &request_block(None, extra, true),
        ));
        let out = rewrite(&input);
        assert_eq!(
            server_view(&out),
            vec![p(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
                ("te", "trailers"),
            ])]
        );
        let fs = frames(&out[PREFACE.len()..]);
        assert_eq!(fs[0].1, FLAG_END_HEADERS | 0x1, "END_STREAM is kept");
    }

    #[test]
    fn never_indexed_fields_stay_never_indexed() {
        let mut block = request_block(Some(b"tmp%2Fs"), &[], false);
        block.push(0x10); // literal never indexed, new name
        string_literal(&mut block, b"authorization", false);
        string_literal(&mut block, b"Bearer x", false);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, FLAG_END_HEADERS, &block));
        let out = rewrite(&input);
        let fs = frames(&out[PREFACE.len()..]);
        let headers = Decoder::new().decode(&fs[0].3).unwrap();
        let flags: Vec<bool> = headers.iter().map(|h| h.never_indexed).collect();
        assert_eq!(flags, [false, false, false, false, true]);
        assert_eq!(headers[3].value, b"localhost");
    }

    // ----- limits and bad input ---------------------------------------------

    #[test]
    fn oversized_header_blocks_pass_through_unchanged() {
        // Compressed: HEADERS plus CONTINUATIONs beyond MAX_HEADER_BLOCK.
        let filler = vec![0x82u8; MAX_FRAME_LEN]; // `:method GET`, over and over
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, 0, &filler));
        for _ in 0..MAX_HEADER_BLOCK / MAX_FRAME_LEN {
            push_frame_header(&mut input, filler.len(), TYPE_CONTINUATION, 0, 1);
            input.extend_from_slice(&filler);
        }
        push_frame_header(&mut input, 4, 0x8, 0, 0); // WINDOW_UPDATE
        input.extend_from_slice(&[0, 0, 1, 0]);
        assert_eq!(rewrite(&input), input);

        // Decoded: a small block that expands past MAX_HEADER_BLOCK through
        // references to one large indexed entry.
        let big_entry = |references: usize| {
            let mut block = vec![0x40]; // literal with incremental indexing, new name
            string_literal(&mut block, b"x-big", false);
            string_literal(&mut block, &[b'v'; 4000], false);
            block.extend(std::iter::repeat_n(0xbe, references)); // index 62: that entry
            let mut input = PREFACE.to_vec();
            input.extend(headers_frame(1, FLAG_END_HEADERS, &block));
            input
        };
        let input = big_entry(20);
        assert_eq!(rewrite(&input), input);
        // Below the limit the same block is rewritten, over several frames.
        let out = rewrite(&big_entry(10));
        assert!(frames(&out[PREFACE.len()..]).len() > 1);
        assert_eq!(server_view(&out)[0].len(), 11);
    }

    /// Found by the `workload_authority` fuzzer: a block just under the
    /// limit whose many one-byte `:authority` values, each replaced by
    /// `localhost`, would take it past the limit goes out unchanged (it
    /// is not passed on bigger than this layer accepts); a few bytes
    /// smaller it is rewritten.
    #[test]
    fn a_rewrite_that_would_pass_the_limit_gives_up() {
        let block = |filler: usize| {
            let mut block = Vec::new();
            for _ in 0..40 {
                block.push(0x00);
                string_literal(&mut block, b":authority", false);
                string_literal(&mut block, b"\x01", false);
            }
            let used = 40 * (10 + 1 + 32);
            let mut left = MAX_HEADER_BLOCK - used - filler;
            while left >= 2 * (1 + 32 + 4000) {
                block.push(0x00);
                string_literal(&mut block, b"x", false);
                string_literal(&mut block, &[b'v'; 4000], false);
                left -= 1 + 32 + 4000;
            }
            block.push(0x00);
            string_literal(&mut block, b"x", false);
            string_literal(&mut block, &vec![b'v'; left - 33], false);
            let decoded = Decoder::new().decode(&block).expect("within the limit");
            let size: usize = decoded
                .iter()
                .map(|h| h.name.len() + h.value.len() + 32)
                .sum();
            assert_eq!(size, MAX_HEADER_BLOCK - filler);
            let mut input = PREFACE.to_vec();
            let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME_LEN).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let flags = if i + 1 == chunks.len() {
                    FLAG_END_HEADERS
                } else {
                    0
                };
                let kind = if i == 0 {
                    TYPE_HEADERS
                } else {
                    TYPE_CONTINUATION
                };
                push_frame_header(&mut input, chunk.len(), kind, flags, 1);
                input.extend_from_slice(chunk);
            }
            input
        };
        // 40 × 8 more bytes than the client's block: past the limit.
        let input = block(100);
        assert_eq!(rewrite(&input), input);
        // With room for them: rewritten.
        let out = rewrite(&block(400));
        let headers = &server_view(&out)[0];
        let replaced = headers
            .iter()
            .filter(|h| h.0 == ":authority" && h.1 == "localhost");
        assert_eq!(replaced.count(), 40);
    }

    #[test]
    fn malformed_hpack_is_an_error_and_passes_through() {
        let cases = [
            ("80", "index 0"),
            ("be", "index into an empty dynamic table"),
            ("ff 80 80 80 01", "integer beyond what the decoder accepts"),
            ("01", "literal without its value"),
            ("00 05 61 62", "string shorter than its length"),
            ("00 81 ff", "Huffman padding longer than 7 bits"),
            ("00 84 ff ff ff fc", "Huffman EOS inside a string"),
            ("3f e2 1f", "table size above SETTINGS_HEADER_TABLE_SIZE"),
            ("82 20", "a table size update after a header field"),
        ];
        for (block, why) in cases {
            assert!(Decoder::new().decode(&hex(block)).is_err(), "{why}");
            let mut input = PREFACE.to_vec();
            input.extend(headers_frame(1, FLAG_END_HEADERS, &hex(block)));
            input.extend(headers_frame(3, FLAG_END_HEADERS, &hex("8286 84")));
            assert_eq!(rewrite(&input), input, "{why}");
        }
        // The largest table size the server allows is accepted.
        assert_eq!(Decoder::new().decode(&hex("3f e1 1f")), Ok(Vec::new()));
    }

    #[test]
    fn garbage_never_panics_and_other_frames_are_untouched() {
        let mut rng = Rng(0x5eed_cafe);
        let mut decoder = Decoder::new();
        for _ in 0..2000 {
            let n = rng.below(64);
            let junk = rng.bytes(n);
            let _ = huffman_decode(&junk);
            let _ = decoder.decode(&junk);
            // Not HTTP/2: everything passes through as it came.
            assert_eq!(rewrite(&junk), junk);
        }
        for round in 0..500 {
            let mut input = PREFACE.to_vec();
            for _ in 0..rng.below(8) {
                let kind = [TYPE_HEADERS, TYPE_CONTINUATION, 0x0, 0x4, 0x8][rng.below(5)];
                let stream = (rng.below(3) * 2 + 1) as u32;
                let (flags, payload) = if kind == TYPE_HEADERS && rng.below(2) == 0 {
                    let n = rng.below(12);
                    let authority = rng.bytes(n);
                    let block = request_block(Some(&authority), &[], rng.below(2) == 0);
                    (FLAG_END_HEADERS, block)
                } else {
                    let n = rng.below(48);
                    (rng.next() as u8, rng.bytes(n))
                };
                push_frame_header(&mut input, payload.len(), kind, flags, stream);
                input.extend_from_slice(&payload);
            }
            let whole = rewrite(&input);
            assert_eq!(
                other_frames(&input[PREFACE.len()..]),
                other_frames(&whole[PREFACE.len()..]),
                "round {round}"
            );
            let size = 1 + rng.below(16);
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            for chunk in input.chunks(size) {
                rw.feed(chunk, &mut out);
            }
            rw.finish(&mut out);
            assert_eq!(out, whole, "round {round}, reads of {size} bytes");
        }
    }
}
