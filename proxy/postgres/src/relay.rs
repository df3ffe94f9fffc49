//! The byte relay of a PostgreSQL session, after the greeting.
//!
//! Bytes go both ways as they come (one read, one write per chunk, no copy
//! into messages). Only the 5-byte message headers are looked at, so the
//! relay knows at the end where each stream stands:
//! - client → upstream: a Terminate (`X`) is not forwarded (the upstream
//!   connection may be reset and pooled, see [`super::pool`]); Query, Sync
//!   and FunctionCall are counted (each is answered by one ReadyForQuery),
//!   and an extended-query batch not ended by Sync is noticed;
//! - upstream → client: ReadyForQuery is counted, and the position inside the
//!   current message is kept, so a reset can skip the rest of a reply the
//!   client no longer reads.
//!
//! The session ends when the client side ends (Terminate, EOF, error) or
//! when the upstream closes. [`RelayEnd::resume`] says whether the upstream
//! connection stopped in a state a reset can recover.
//!
//! **Hand-over to the kernel relay.** Given a [`Handover`] hook, a session
//! that has had [`HANDOVER_AFTER`] round trips is offered to the kernel at
//! the first quiet moment: a read from the upstream ends exactly with a
//! ReadyForQuery that answers the client's last request, and the client
//! side has nothing in flight (every byte forwarded, at a message boundary,
//! no open extended batch). The ReadyForQuery is still held: a client that
//! waits for it cannot send, so the hook can splice the sockets with the
//! client side silent. If it does, the held bytes go out and the relay
//! returns with [`RelayEnd::spliced`]; otherwise relaying goes on (and a
//! later quiet moment may be offered again).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::session_state::StateTracker;

const BUF: usize = 16 * 1024;

/// Round trips (ReadyForQuery messages relayed) before a session is offered
/// to the kernel relay: short sessions (`pgbench -C`, a web request's one
/// query) stay in user space, where their upstream connection can be reset
/// and pooled; a spliced session's upstream connection is closed at the end.
pub const HANDOVER_AFTER: u64 = 32;

pub use warden_core::kernel_relay::Handed;

/// Offered the two streams at a quiet moment (see the module docs).
/// The hook gets both streams and the length of the reply it holds back
/// (written to the client once the hook says `Spliced`).
pub type Handover<'a, C, U> = &'a mut (dyn FnMut(&C, &U, usize) -> Handed + Send);

/// Where a byte stream stands relative to its message boundaries
/// (`Byte1 tag, Int32 length counting itself, body`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framer {
    header: [u8; 5],
    /// Header bytes of the current message seen so far (0 at a boundary).
    have: u8,
    /// Body bytes of the current message still to come.
    remaining: usize,
}

/// What [`Framer::walk`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Walked {
    /// Every byte walked.
    All,
    /// The callback stopped at a header starting at this offset (the framer
    /// stands at that boundary, the header not consumed).
    Stop(usize),
    /// A length below 4: not the protocol (the framer is lost).
    Invalid,
}

impl Framer {
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Walks `data`, calling `on_header(tag, length, start)` for every
    /// header completed, where `start` is the header's offset in `data`, or
    /// `None` when it began in an earlier chunk. The callback returns true
    /// to stop there (only honoured when `start` is known).
    pub fn walk(
        &mut self,
        data: &[u8],
        mut on_header: impl FnMut(u8, u32, Option<usize>) -> bool,
    ) -> Walked {
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() - i);
                self.remaining -= n;
                i += n;
                continue;
            }
            let start;
            let (tag, len);
            if self.have == 0 && data.len() - i >= 5 {
                start = Some(i);
                tag = data[i];
                len = u32::from_be_bytes([data[i + 1], data[i + 2], data[i + 3], data[i + 4]]);
                i += 5;
            } else {
                start = (self.have == 0).then_some(i);
                let have = usize::from(self.have);
                let take = (5 - have).min(data.len() - i);
                self.header[have..have + take].copy_from_slice(&data[i..i + take]);
                // take <= 5
                self.have += take as u8;
                i += take;
                if self.have < 5 {
                    break;
                }
                self.have = 0;
                let h = self.header;
                tag = h[0];
                len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
            }
            if len < 4 {
                return Walked::Invalid;
            }
            if on_header(tag, len, start) {
                if let Some(s) = start {
                    return Walked::Stop(s);
                }
            }
            self.remaining = len as usize - 4;
        }
        Walked::All
    }

    /// Consumes the rest of the current message from `data`; returns how
    /// many bytes that took (the framer is at a boundary when it is less
    /// than `data.len()`, or when `at_boundary` says so); `None` when a
    /// message length is invalid.
    pub fn finish_message(&mut self, data: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        match self.walk(data, |_, _, start| start.is_some()) {
            Walked::All => Some(data.len()),
            Walked::Stop(s) => Some(s),
            Walked::Invalid => None,
        }
    }
}

/// What a reset needs to know to bring the upstream back to idle.
#[derive(Clone, Copy, Debug)]
pub struct Resume {
    /// The upstream → warden stream's position (inside a reply or not).
    pub framer: Framer,
    /// ReadyForQuery messages still to come for requests the client sent.
    pub pending_ready: u64,
    /// Transaction status of the last ReadyForQuery relayed (`I`, `T`, `E`),
    /// when its byte was seen; `None` if unknown.
    pub last_status: Option<u8>,
    /// Nothing the session sent (or the server reported) can have left
    /// session state (see [`super::session_state`]).
    pub state_free: bool,
}

pub struct RelayEnd {
    /// Bytes client → upstream and upstream → client.
    pub up: u64,
    pub down: u64,
    /// An I/O error ended the session (for the audit record's wording).
    pub error: bool,
    /// The client ended the session with a Terminate message.
    pub terminated: bool,
    /// Some when the upstream is open, was sent whole messages only, and
    /// its replies were walked without fault: a reset may recover it.
    pub resume: Option<Resume>,
    /// The session was handed to the kernel relay (both streams open;
    /// `up`/`down` count what user space relayed before).
    pub spliced: bool,
}

struct Dir {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    eof: bool,
    need_flush: bool,
    amount: u64,
    framer: Framer,
    /// A header the walk could not honour (e.g. Terminate split across
    /// reads, a bad length): the stream is not resumable.
    poisoned: bool,
    /// Messages counted (client: Q, S, F; upstream: Z).
    counted: u64,
    /// Client: extended-query messages sent since the last Sync. A server
    /// that sees EOF there rolls the batch's implicit transaction back,
    /// whereas the reset's Sync would commit it: such a connection is closed.
    batch_open: bool,
    /// Upstream: the status byte of the last ReadyForQuery, if it was seen.
    last_status: Option<u8>,
    /// Whether the messages seen so far can have left session state.
    state: StateTracker,
    /// Upstream: stop after a read that ends with a whole ReadyForQuery
    /// (its bytes kept in the buffer), for a hand-over decision.
    pause_at_ready: bool,
    /// Stop after writing the buffered bytes (the session was spliced).
    finish: bool,
    /// Bytes to take before reading the stream (the client's, read with
    /// its startup packet).
    seed: Vec<u8>,
}

thread_local! {
    /// Relay buffers of ended sessions, reused by the next ones on the same
    /// thread (a connection-per-transaction client would otherwise allocate
    /// and zero 32 KiB per session).
    static SPARE: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers kept per thread at most.
const SPARE_MAX: usize = 64;

impl Drop for Dir {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() == BUF {
            let _ = SPARE.try_with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < SPARE_MAX {
                    s.push(buf);
                }
            });
        }
    }
}

impl Dir {
    fn new() -> Dir {
        let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        Dir {
            buf: spare.unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice()),
            pos: 0,
            cap: 0,
            eof: false,
            need_flush: false,
            amount: 0,
            framer: Framer::default(),
            poisoned: false,
            counted: 0,
            batch_open: false,
            last_status: None,
            state: StateTracker::default(),
            pause_at_ready: false,
            finish: false,
            seed: Vec::new(),
        }
    }
}

enum Failure {
    Reader(io::Error),
    Writer(io::Error),
}

/// How [`poll_dir`] stopped without an error.
enum Stop {
    /// EOF (or, client side, a Terminate) and everything written.
    End,
    /// Upstream: a read ended with a whole ReadyForQuery, not yet written.
    Ready,
}

/// Copies `r` → `w` until EOF (or, client side, a Terminate). `client`
/// selects the client-side scan.
fn poll_dir<R, W>(
    d: &mut Dir,
    cx: &mut Context<'_>,
    r: &mut R,
    w: &mut W,
    client: bool,
    terminated: &mut bool,
) -> Poll<Result<Stop, Failure>>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    loop {
        if d.pos == d.cap && !d.eof {
            let n = if d.seed.is_empty() {
                let mut rb = ReadBuf::new(&mut d.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if d.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Failure::Writer)?;
                            d.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Reader(e))),
                    Poll::Ready(Ok(())) => {}
                }
                rb.filled().len()
            } else {
                let n = d.seed.len().min(d.buf.len());
                d.buf[..n].copy_from_slice(&d.seed[..n]);
                d.seed.drain(..n);
                n
            };
            d.pos = 0;
            d.cap = n;
            if n == 0 {
                d.eof = true;
            } else {
                let (counted, poisoned, batch, status, state) = (
                    &mut d.counted,
                    &mut d.poisoned,
                    &mut d.batch_open,
                    &mut d.last_status,
                    &mut d.state,
                );
                let chunk = &d.buf[..n];
                let mut ready_at_end = false;
                let walked = d.framer.walk(chunk, |tag, len, start| {
                    ready_at_end = false;
                    if client {
                        // The body, when the whole message is in this read.
                        let body = start
                            .and_then(|s| chunk.get(s + 5..(s + 1).saturating_add(len as usize)));
                        state.client_message(tag, body);
                        match tag {
                            b'Q' | b'F' => *counted += 1,
                            b'S' => {
                                *counted += 1;
                                *batch = false;
                            }
                            b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => *batch = true,
                            b'X' if len == 4 && start.is_some() => return true,
                            // Split across reads: part of it is forwarded already.
                            b'X' => *poisoned = true,
                            _ => {}
                        }
                    } else if tag == b'Z' {
                        *counted += 1;
                        // The status byte follows the 5-byte header.
                        *status = start.and_then(|s| chunk.get(s + 5)).copied();
                        ready_at_end = len == 5 && start.is_some_and(|s| s + 6 == n);
                    } else {
                        state.upstream_message(tag);
                    }
                    false
                });
                match walked {
                    Walked::All => {}
                    Walked::Stop(at) => {
                        d.cap = at;
                        d.eof = true;
                        *terminated = true;
                    }
                    Walked::Invalid => d.poisoned = true,
                }
                if d.pause_at_ready && ready_at_end && !d.poisoned && d.framer.at_boundary() {
                    return Poll::Ready(Ok(Stop::Ready));
                }
            }
        }
        while d.pos < d.cap {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &d.buf[d.pos..d.cap]))
                .map_err(Failure::Writer)?;
            if n == 0 {
                return Poll::Ready(Err(Failure::Writer(io::ErrorKind::WriteZero.into())));
            }
            d.pos += n;
            d.amount += n as u64;
            d.need_flush = true;
        }
        if d.eof || d.finish {
            ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Failure::Writer)?;
            d.need_flush = false;
            return Poll::Ready(Ok(Stop::End));
        }
    }
}

/// How the relay loop ended.
enum Outcome {
    /// The client side ended (the upstream is open), with the error if any.
    Client(Option<io::Error>),
    /// The upstream side ended or failed.
    Upstream(Option<io::Error>),
    /// Handed to the kernel relay.
    Spliced,
}

/// Writes `greeting` to the client, then relays until one side ends or
/// `handover` splices the session (see the module docs). `pending` holds
/// client bytes read before the relay (sent right after the startup
/// packet): they go upstream first, walked like any others.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    greeting: &[u8],
    pending: &[u8],
    mut handover: Option<Handover<'_, C, U>>,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut end = RelayEnd {
        up: 0,
        down: 0,
        error: false,
        terminated: false,
        resume: None,
        spliced: false,
    };
    if client.write_all(greeting).await.is_err() {
        end.error = true;
        // Nothing was sent upstream: the connection is as the login left it.
        end.resume = Some(Resume {
            framer: Framer::default(),
            pending_ready: 0,
            last_status: Some(b'I'),
            state_free: true,
        });
        return end;
    }
    let mut c2u = Dir::new();
    c2u.seed.extend_from_slice(pending);
    let mut u2c = Dir::new();
    let mut terminated = false;
    let mut never = false;
    let outcome = poll_fn(|cx| loop {
        match poll_dir(&mut c2u, cx, client, upstream, true, &mut terminated) {
            Poll::Ready(Ok(_)) => return Poll::Ready(Outcome::Client(None)),
            Poll::Ready(Err(Failure::Reader(e))) => return Poll::Ready(Outcome::Client(Some(e))),
            Poll::Ready(Err(Failure::Writer(e))) => return Poll::Ready(Outcome::Upstream(Some(e))),
            Poll::Pending => {}
        }
        u2c.pause_at_ready = handover.is_some() && u2c.counted + 1 >= HANDOVER_AFTER;
        match poll_dir(&mut u2c, cx, upstream, client, false, &mut never) {
            Poll::Ready(Ok(Stop::End)) if u2c.finish => return Poll::Ready(Outcome::Spliced),
            Poll::Ready(Ok(Stop::End)) => return Poll::Ready(Outcome::Upstream(None)),
            Poll::Ready(Ok(Stop::Ready)) => {
                // Quiet: the client's bytes are all forwarded, whole, and
                // this ReadyForQuery answers its last request.
                let quiet = c2u.pos == c2u.cap
                    && !c2u.eof
                    && !c2u.poisoned
                    && !c2u.batch_open
                    && c2u.framer.at_boundary()
                    && c2u.counted == u2c.counted;
                if quiet {
                    if let Some(hook) = handover.as_mut() {
                        match hook(client, upstream, u2c.cap - u2c.pos) {
                            Handed::Spliced => u2c.finish = true,
                            Handed::Later => {}
                            Handed::Never => handover = None,
                        }
                    }
                }
                // Go round: the held bytes are written next.
            }
            Poll::Ready(Err(Failure::Reader(e))) => return Poll::Ready(Outcome::Upstream(Some(e))),
            // The client is gone; the upstream is still open.
            Poll::Ready(Err(Failure::Writer(e))) => return Poll::Ready(Outcome::Client(Some(e))),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    let (client_ended, err) = match outcome {
        Outcome::Client(e) => (true, e),
        Outcome::Upstream(e) => (false, e),
        Outcome::Spliced => {
            end.up = c2u.amount;
            end.down = u2c.amount;
            end.spliced = true;
            return end;
        }
    };
    end.up = c2u.amount;
    end.down = u2c.amount;
    end.error = err.is_some();
    end.terminated = terminated;
    let resumable = client_ended
        && !c2u.poisoned
        && !u2c.poisoned
        && c2u.pos == c2u.cap
        && c2u.framer.at_boundary()
        && !c2u.batch_open
        && c2u.counted >= u2c.counted;
    if resumable {
        end.resume = Some(Resume {
            framer: u2c.framer,
            pending_ready: c2u.counted - u2c.counted,
            last_status: u2c.last_status,
            state_free: !c2u.state.dirty && !u2c.state.dirty,
        });
    }
    if !client_ended {
        let _ = client.shutdown().await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn framer_finds_headers_across_any_split() {
        let mut stream = msg(b'Q', b"select 1\0");
        stream.extend(msg(b'd', b"X\0\0\0\x04 looks like a terminate"));
        stream.extend(msg(b'S', b""));
        stream.extend(msg(b'X', b""));
        for split in 0..stream.len() {
            let mut f = Framer::default();
            let mut tags = Vec::new();
            let mut stop = None;
            for (off, part) in [(0, &stream[..split]), (split, &stream[split..])] {
                if stop.is_some() {
                    break;
                }
                match f.walk(part, |t, _, start| {
                    tags.push(t);
                    t == b'X' && start.is_some()
                }) {
                    Walked::Stop(at) => stop = Some(off + at),
                    Walked::All => {}
                    Walked::Invalid => panic!("invalid"),
                }
            }
            assert_eq!(tags, b"QdSX", "split {split}");
            let x_at = stream.len() - 5;
            if split <= x_at {
                assert_eq!(stop, Some(x_at), "split {split}");
                assert!(f.at_boundary());
            } else {
                assert_eq!(stop, None, "split {split}");
            }
        }
    }

    #[test]
    fn framer_rejects_short_lengths_and_finishes_messages() {
        let mut f = Framer::default();
        assert_eq!(f.walk(b"Z\0\0\0\x02", |_, _, _| false), Walked::Invalid);
        let mut f = Framer::default();
        let m = msg(b'D', &[7u8; 100]);
        assert_eq!(f.walk(&m[..40], |_, _, _| false), Walked::All);
        assert!(!f.at_boundary());
        let mut rest = m[40..].to_vec();
        rest.extend(msg(b'Z', b"I"));
        assert_eq!(f.finish_message(&rest), Some(m.len() - 40));
        assert!(f.at_boundary());
        // A split header is finished too.
        let mut f = Framer::default();
        f.walk(&m[..3], |_, _, _| false);
        assert_eq!(f.finish_message(&m[3..]), Some(m.len() - 3));
    }

    /// Bytes the client sent with its startup packet go upstream first, in
    /// order with what it sends later, and are walked (counted) like them.
    #[tokio::test]
    async fn bytes_sent_with_the_startup_packet_go_first() {
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut up, mut up_far) = tokio::io::duplex(1024);
        let early = msg(b'Q', b"select 1\0");
        let second = msg(b'Q', b"select 2\0");
        // The first query whole, the second cut after its first 8 bytes.
        let seed = [&early[..], &second[..8]].concat();
        let task =
            tokio::spawn(
                async move { relay(&mut client_far, &mut up_far, b"hi", &seed, None).await },
            );
        let mut greet = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut greet)
            .await
            .unwrap();
        // The rest of the second query, then a Terminate.
        let late = [&second[8..], &msg(b'X', b"")[..]].concat();
        client.write_all(&late).await.unwrap();
        let want = [early, second].concat();
        let mut seen = vec![0u8; want.len()];
        tokio::io::AsyncReadExt::read_exact(&mut up, &mut seen)
            .await
            .unwrap();
        assert_eq!(seen, want);
        drop(up);
        let end = task.await.unwrap();
        assert!(end.terminated);
        assert_eq!(end.up, want.len() as u64);
    }

    #[tokio::test]
    async fn terminate_is_kept_back_and_requests_are_counted() {
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut up, mut up_far) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(
                async move { relay(&mut client_far, &mut up_far, b"hi", b"", None).await },
            );
        let mut greet = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut greet)
            .await
            .unwrap();
        let mut out = msg(b'Q', b"select 1\0");
        out.extend(msg(b'P', b"\0select 2\0\0\0"));
        out.extend(msg(b'S', b""));
        out.extend(msg(b'X', b""));
        client.write_all(&out).await.unwrap();
        let mut seen = vec![0u8; out.len() - 5];
        tokio::io::AsyncReadExt::read_exact(&mut up, &mut seen)
            .await
            .unwrap();
        assert_eq!(seen, out[..out.len() - 5]);
        // One reply arrives half-way before the session ends.
        let z = msg(b'Z', b"I");
        let _ = up.write_all(&z).await;
        let end = task.await.unwrap();
        assert!(end.terminated);
        let resume = end.resume.expect("resumable");
        assert_eq!(end.up, (out.len() - 5) as u64);
        // 2 requests (Q, S); the Z may or may not have been read yet.
        assert!(resume.pending_ready == 2 || resume.pending_ready == 1);
        let expect = (resume.pending_ready == 1).then_some(b'I');
        assert_eq!(resume.last_status, expect);
    }

    #[tokio::test]
    async fn the_last_transaction_status_is_kept_for_the_reset() {
        for (status, split) in [(b'I', false), (b'T', false), (b'I', true)] {
            let (mut client, mut client_far) = tokio::io::duplex(1024);
            let (mut up, mut up_far) = tokio::io::duplex(1024);
            let task =
                tokio::spawn(
                    async move { relay(&mut client_far, &mut up_far, b"", b"", None).await },
                );
            let q = msg(b'Q', b"begin\0");
            client.write_all(&q).await.unwrap();
            let mut seen = vec![0u8; q.len()];
            tokio::io::AsyncReadExt::read_exact(&mut up, &mut seen)
                .await
                .unwrap();
            let mut reply = msg(b'C', b"BEGIN\0");
            reply.extend(msg(b'Z', &[status]));
            if split {
                // The status byte arrives in a later read than its header.
                let cut = reply.len() - 1;
                up.write_all(&reply[..cut]).await.unwrap();
                up.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                up.write_all(&reply[cut..]).await.unwrap();
            } else {
                up.write_all(&reply).await.unwrap();
            }
            let mut got = vec![0u8; reply.len()];
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
                .await
                .unwrap();
            client.write_all(&msg(b'X', b"")).await.unwrap();
            let resume = task.await.unwrap().resume.expect("resumable");
            assert_eq!(resume.pending_ready, 0);
            // A status byte not seen with its header is unknown: full reset.
            let expect = (!split).then_some(status);
            assert_eq!(
                resume.last_status,
                expect,
                "{} split {split}",
                char::from(status)
            );
        }
    }

    /// A session is offered to the kernel only at a quiet moment after
    /// `HANDOVER_AFTER` round trips, the ReadyForQuery held until the hook
    /// answered; `Later` offers again, `Spliced` ends the relay.
    #[tokio::test]
    async fn handover_is_offered_at_quiet_moments_only() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (mut client, mut client_far) = tokio::io::duplex(1 << 16);
        let (mut up, mut up_far) = tokio::io::duplex(1 << 16);
        let offers = Arc::new(AtomicU64::new(0));
        let seen = offers.clone();
        let task = tokio::spawn(async move {
            let mut hook = |_: &tokio::io::DuplexStream, _: &tokio::io::DuplexStream, held| {
                // The held reply: the DataRow and the ReadyForQuery.
                assert_eq!(held, 18);
                // The second offer is taken.
                if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    Handed::Later
                } else {
                    Handed::Spliced
                }
            };
            relay(&mut client_far, &mut up_far, b"", b"", Some(&mut hook)).await
        });
        let q = msg(b'Q', b"select 1\0");
        let mut reply = msg(b'D', b"\0\x01\0\0\0\x011");
        reply.extend(msg(b'Z', b"I"));
        let mut got = vec![0u8; reply.len()];
        let mut seen_up = vec![0u8; q.len()];
        for i in 1..=HANDOVER_AFTER + 1 {
            client.write_all(&q).await.unwrap();
            tokio::io::AsyncReadExt::read_exact(&mut up, &mut seen_up)
                .await
                .unwrap();
            if i == HANDOVER_AFTER {
                // Not quiet: a second query is in flight when the reply comes.
                client.write_all(&q).await.unwrap();
                tokio::io::AsyncReadExt::read_exact(&mut up, &mut seen_up)
                    .await
                    .unwrap();
                up.write_all(&reply).await.unwrap();
                tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
                    .await
                    .unwrap();
            }
            up.write_all(&reply).await.unwrap();
            // The reply arrives whole either way: held bytes are written.
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut got)
                .await
                .unwrap();
            assert_eq!(got, reply, "round {i}");
        }
        let end = task.await.unwrap();
        assert!(end.spliced);
        assert!(end.resume.is_none(), "a spliced upstream is never pooled");
        // Offered at round HANDOVER_AFTER after its second reply (Later;
        // the first came with a query in flight) and at HANDOVER_AFTER + 1
        // (Spliced).
        assert_eq!(offers.load(Ordering::SeqCst), 2);
        assert_eq!(end.down, reply.len() as u64 * (HANDOVER_AFTER + 2));
    }
}
