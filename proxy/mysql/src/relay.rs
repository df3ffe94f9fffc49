//! The relay after login: bytes go both ways as they come; warden reads
//! only packet headers. Toward the server it looks at the first byte of
//! each command (a packet with sequence id 0 that does not continue a
//! longer one) and holds back one command: COM_CHANGE_USER, which would log
//! in again as any user the client names using warden's connection — it is
//! answered with an ERR (1045, 28000) and never forwarded. Everything else,
//! COM_RESET_CONNECTION included, passes unchanged.
//!
//! On a pooled route (`Context::pool`) COM_QUIT is not forwarded either:
//! it ends the relay, and the upstream connection goes back to the pool
//! ([`crate::pool`]) with the position of the server's stream, as does a
//! client that closes after a whole packet.
//!
//! On a pooled route a short `COM_QUERY` or a `COM_PROCESS_KILL` is read
//! whole before it goes on: a `KILL` of a warden-issued connection id is
//! rewritten to the server connection's id or refused ([`crate::kill`]).
//!
//! warden's own answer is written to the client between two server
//! packets, never inside one. The client is waiting for the answer to its
//! COM_CHANGE_USER, so no server reply is due (a client that pipelines
//! commands behind an unanswered one could see the ERR before an earlier
//! answer; classic-protocol clients do not).
//!
//! **Hand-over to the kernel relay.** Given a [`Handover`] (a session the
//! session code found eligible, see `docs/mysql.md`), the relay also walks
//! the server's replies against the client's commands
//! ([`crate::replies`]). Once [`HANDOVER_AFTER`] commands are answered it
//! offers the session to the kernel at the first quiet moment: a read from
//! the server ends exactly with the answer to the client's last command,
//! every command is answered, and nothing from the client is buffered,
//! half sent or waiting upstream. That last answer is still held: a client
//! that waits for it cannot send, so the hook can splice the sockets with
//! the client side silent. If it does, the held bytes go out and the relay
//! returns both streams ([`Rest::Spliced`]); otherwise relaying goes on (a
//! later quiet moment may be offered again). A session that sends anything
//! [`crate::replies`] does not track exactly is never offered.

use crate::packet::{put_packet, ErrPacket, COM_CHANGE_USER, COM_QUIT, MAX_PAYLOAD};
use crate::pool::Resync;
use crate::replies::{Replies, COM_STMT_EXECUTE, EXECUTE_HEAD};
use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
pub use warden_core::kernel_relay::Handed;

/// Commands answered before a session is offered to the kernel relay:
/// short sessions stay in user space, where their upstream connection can
/// be pooled; a spliced session's upstream connection is closed at its end.
pub const HANDOVER_AFTER: u64 = 32;

/// [`Outcome::how`] of a session handed to the kernel relay.
pub const SPLICED: &str = "handed to the kernel relay";

/// A session's hand-over hook and what its replies look like.
pub struct Handover<'a, C, U> {
    /// Offered the two streams at a quiet moment (see the module docs).
    /// Gets both streams and the length of the answer it holds back
    /// (written to the client once it says `Spliced`).
    pub hook: &'a mut (dyn FnMut(&C, &U, usize) -> Handed + Send),
    pub framing: Framing,
}

/// What the relay hands back besides its [`Outcome`].
pub enum Rest<C, U> {
    /// Nothing: both connections are done.
    Closed,
    /// The upstream connection may be pooled (a pooled route's client left
    /// at a command boundary), with where its framing stood.
    Pool(U, Resync),
    /// Handed to the kernel relay: both streams, open.
    Spliced(C, U),
}

/// [`Outcome::how`] of a session `stop` ended.
pub const FROZEN: &str = "closed: workload frozen";

/// Read buffer per direction.
const BUF: usize = 16 * 1024;

/// Who the session is for (named in warden's answers).
pub struct Context<'a> {
    pub route: &'a str,
    pub workload: &'a str,
    pub user: &'a str,
    /// The upstream connection may be reused: COM_QUIT ends the relay
    /// instead of being forwarded.
    pub pool: bool,
    /// Warden-issued connection ids `KILL` is translated for (pooled
    /// routes).
    pub kill: Option<crate::kill::Scope<'a>>,
    /// Follow whether the session leaves session state behind
    /// ([`Outcome::state_free`]; a pooled route with `pool.reset =
    /// "auto"` whose login left autocommit on), with how its replies are
    /// framed.
    pub track_state: Option<Framing>,
}

/// How a session's replies are framed (what [`Replies`] needs).
#[derive(Clone, Copy, Debug)]
pub struct Framing {
    /// The session agreed `CLIENT_DEPRECATE_EOF`.
    pub deprecate_eof: bool,
    /// The client asked for MariaDB progress reports.
    pub progress: bool,
}

/// The longest `COM_QUERY` read whole to tell whether it leaves state
/// (a longer one counts as state).
const MAX_TRACKED_QUERY: usize = 8 * 1024;

/// What a finished relay reports.
#[derive(Debug, Default)]
pub struct Outcome {
    pub up: u64,
    pub down: u64,
    pub change_user_refused: u64,
    pub how: &'static str,
    /// The session was handed to the kernel relay (`up`/`down` count what
    /// user space relayed before).
    pub spliced: bool,
    /// With [`Context::track_state`]: the session sent only state-free
    /// commands ([`crate::session_state`]), every one was answered, and it
    /// ended outside a transaction at a packet boundary — the upstream
    /// connection is as its login left it, no reset needed.
    pub state_free: bool,
}

/// Packet boundaries in a byte stream.
#[derive(Clone, Default)]
struct Framer {
    header: [u8; 4],
    have: usize,
    /// Payload bytes left in the current packet.
    remaining: usize,
    /// The current packet is 0xffffff long: the next one continues it.
    continued: bool,
    /// The current (or last) packet's length and first payload byte.
    len: usize,
    first: u8,
}

impl Framer {
    /// The last packet ends a reply: an ERR, an EOF or OK-with-0xfe, or
    /// an OK that is the reply's first packet (only meaningful at a
    /// boundary).
    fn ends_reply(&self) -> bool {
        match (self.len, self.first) {
            (0, _) => false,
            (_, 0xff) => true,
            (len, 0xfe) => len < MAX_PAYLOAD,
            (_, 0x00) => self.header[3] == 1,
            _ => false,
        }
    }

    /// At a packet boundary (no header nor payload half read)?
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Consumes bytes up to and including the end of the current packet
    /// (or all of `data`); returns how many, and the header of a packet
    /// whose header completed in them.
    fn advance(&mut self, data: &[u8]) -> (usize, Option<[u8; 4]>) {
        let mut i = 0;
        let mut completed = None;
        while i < data.len() {
            if self.remaining > 0 {
                if self.remaining == self.len {
                    self.first = data[i];
                }
                let n = self.remaining.min(data.len() - i);
                self.remaining -= n;
                i += n;
                if self.remaining == 0 {
                    return (i, completed);
                }
                continue;
            }
            self.header[self.have] = data[i];
            self.have += 1;
            i += 1;
            if self.have == 4 {
                self.have = 0;
                let h = self.header;
                let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
                completed = Some(h);
                self.remaining = len;
                self.len = len;
                self.continued = len == MAX_PAYLOAD;
                if len == 0 {
                    return (i, completed);
                }
            }
        }
        (i, completed)
    }

    /// Consumes all of `data` (headers only are looked at); returns the
    /// last header completed in it.
    fn skip(&mut self, mut data: &[u8]) -> Option<[u8; 4]> {
        let mut last = None;
        while !data.is_empty() {
            let (k, h) = self.advance(data);
            last = h.or(last);
            data = &data[k..];
        }
        last
    }
}

/// The client's command stream, scanned into what goes upstream (see the
/// module docs).
#[derive(Default)]
struct Commands {
    /// Payload bytes left of the current packet.
    remaining: usize,
    /// The current packet is dropped (a COM_CHANGE_USER).
    dropping: bool,
    /// The current packet is 0xffffff long: the next one continues it.
    continued: bool,
    change_user_refused: u64,
    /// Commands seen (forwarded or not).
    count: u64,
    /// The answers owed, on a session that may be handed over or whose
    /// state is tracked.
    replies: Option<Replies>,
    /// Session state is tracked ([`Context::track_state`]) and a command
    /// may have left some.
    dirty: bool,
}

/// What [`Commands::scan`] saw last.
#[derive(Debug, PartialEq, Eq)]
enum Scanned {
    /// All of the input is used or kept for more.
    More,
    /// A COM_QUIT on a pooled route: the client is done (not forwarded;
    /// what came before it is in `out`).
    Quit,
}

impl Commands {
    /// At a command boundary (nothing half sent)?
    fn at_boundary(&self) -> bool {
        self.remaining == 0 && !self.continued
    }

    /// Scans `data` from the client: what goes upstream is appended to
    /// `out`, warden's own answers to `local`. Returns how many bytes were
    /// used (the rest — an incomplete header, or a short command read whole
    /// first — is offered again with more bytes after it).
    fn scan(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        local: &mut Vec<u8>,
        ctx: &Context<'_>,
    ) -> (usize, Scanned) {
        let mut start = 0;
        loop {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() - start);
                if !self.dropping {
                    out.extend_from_slice(&data[start..start + n]);
                }
                self.remaining -= n;
                start += n;
                if self.remaining > 0 {
                    return (start, Scanned::More);
                }
                self.end_of_packet(local, ctx);
                continue;
            }
            // A header, plus the command byte of a new command.
            let avail = &data[start..];
            if avail.len() < 4 {
                return (start, Scanned::More);
            }
            let len = u32::from_le_bytes([avail[0], avail[1], avail[2], 0]) as usize;
            let is_command = avail[3] == 0 && !self.continued;
            if is_command && len > 0 && avail.len() < 5 {
                return (start, Scanned::More);
            }
            if ctx.track_state.is_some() && !self.dirty {
                if !is_command || len == 0 || len > MAX_TRACKED_QUERY {
                    self.dirty = true;
                } else {
                    // A short command is read whole first.
                    if avail.len() < 4 + len {
                        return (start, Scanned::More);
                    }
                    let payload = &avail[4..4 + len];
                    let quit = ctx.pool && payload == [COM_QUIT];
                    self.dirty = !quit && !crate::session_state::command_is_state_free(payload);
                }
            }
            if let (true, Some(scope)) = (is_command && len > 0, &ctx.kill) {
                if matches!(avail[4], 0x03 | crate::kill::COM_PROCESS_KILL)
                    && len <= 1 + crate::kill::MAX_KILL_LEN
                {
                    // The whole command first.
                    if avail.len() < 4 + len {
                        return (start, Scanned::More);
                    }
                    match crate::kill::inspect(&avail[4..4 + len], scope) {
                        crate::kill::Action::Pass => {}
                        crate::kill::Action::Rewrite(p) => {
                            if let Some(r) = &mut self.replies {
                                r.command(&p, p.len());
                            }
                            put_packet(out, 0, &p);
                            start += 4 + len;
                            continue;
                        }
                        crate::kill::Action::Refuse(e) => {
                            // Answered here: no server reply to track.
                            if let Some(r) = &mut self.replies {
                                r.set_never();
                            }
                            put_packet(local, 1, &e.encode());
                            start += 4 + len;
                            continue;
                        }
                    }
                }
            }
            if is_command && ctx.pool && len == 1 && avail[4] == COM_QUIT {
                return (start + 5, Scanned::Quit);
            }
            if let Some(r) = self.replies.as_mut().filter(|r| !r.never()) {
                if !is_command {
                    // LOCAL INFILE data or a long command's continuation.
                    r.set_never();
                } else {
                    // COM_STMT_EXECUTE's flags (a cursor?) are read first.
                    let need = if len > 0 && avail[4] == COM_STMT_EXECUTE {
                        len.min(EXECUTE_HEAD)
                    } else {
                        len.min(1)
                    };
                    if avail.len() < 4 + need {
                        return (start, Scanned::More);
                    }
                    r.command(&avail[4..4 + need], len);
                }
            }
            if is_command {
                self.count += 1;
                self.dropping = len > 0 && avail[4] == COM_CHANGE_USER;
            }
            self.continued = len == MAX_PAYLOAD;
            if !self.dropping {
                out.extend_from_slice(&avail[..4]);
            }
            start += 4;
            self.remaining = len;
            if len == 0 {
                self.end_of_packet(local, ctx);
            }
        }
    }

    /// A client packet ended: a dropped COM_CHANGE_USER (once whole) gets
    /// warden's ERR.
    fn end_of_packet(&mut self, local: &mut Vec<u8>, ctx: &Context<'_>) {
        if !self.dropping || self.continued {
            return;
        }
        self.dropping = false;
        self.change_user_refused += 1;
        let msg = format!(
            "warden: route {:?} logs in as {:?} for workload {:?}; changing the user (COM_CHANGE_USER) is refused, connect again instead",
            ctx.route, ctx.user, ctx.workload
        );
        put_packet(local, 1, &ErrPacket::new(1045, "28000", msg).encode());
    }
}

/// The client's commands after a splice (the kernel relay's
/// `GUARD_MYSQL`): the kernel redirects packets it checked and hands the
/// direction to warden's socket at a packet boundary before a
/// `COM_CHANGE_USER` (or a packet past its window); from there the same
/// scan as before the splice refuses `COM_CHANGE_USER` with warden's ERR
/// and passes everything else. `KILL` is not translated after a splice
/// (see `docs/mysql.md`).
pub struct SplicedCommands {
    commands: Commands,
    /// An incomplete header (or command byte) kept for more bytes.
    carry: Vec<u8>,
    route: String,
    workload: String,
    user: String,
}

impl SplicedCommands {
    pub fn new(route: &str, workload: &str, user: &str) -> SplicedCommands {
        SplicedCommands {
            commands: Commands::default(),
            carry: Vec::new(),
            route: route.to_string(),
            workload: workload.to_string(),
            user: user.to_string(),
        }
    }
}

impl warden_core::kernel_relay::ClientGuard for SplicedCommands {
    fn kernel(&self) -> u8 {
        warden_ebpf::GUARD_MYSQL
    }

    fn resume(&mut self, at: warden_ebpf::ClientPosition) {
        self.commands.continued = at.continues;
    }

    fn feed(
        &mut self,
        data: &[u8],
        up: &mut Vec<u8>,
        local: &mut Vec<u8>,
    ) -> warden_core::kernel_relay::Fed {
        let ctx = Context {
            route: &self.route,
            workload: &self.workload,
            user: &self.user,
            pool: false,
            kill: None,
            track_state: None,
        };
        self.carry.extend_from_slice(data);
        // Without pooling, kill translation or tracking, a scan keeps at
        // most a header and a command byte back.
        let (used, _) = self.commands.scan(&self.carry, up, local, &ctx);
        self.carry.drain(..used);
        warden_core::kernel_relay::Fed::Go
    }

    fn refused(&self) -> u64 {
        self.commands.change_user_refused
    }
}

/// One direction's read buffer: `buf[pos..cap]` is read and not yet
/// used.
struct Buffer {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
}

thread_local! {
    /// Relay buffers of ended sessions, reused by the next ones on the same
    /// thread (a connection per query would otherwise allocate and zero
    /// 32 KiB per session).
    static SPARE: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers kept per thread at most.
const SPARE_MAX: usize = 64;

impl Buffer {
    fn new() -> Buffer {
        let spare = SPARE.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        Buffer {
            buf: spare.unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice()),
            pos: 0,
            cap: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.cap
    }
}

impl Drop for Buffer {
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

/// Reads into `b` (empty or holding a partial header/command at its
/// front): `Ready(Ok(0))` at EOF.
fn poll_fill<R: AsyncRead + Unpin>(
    r: &mut R,
    b: &mut Buffer,
    cx: &mut std::task::Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if b.pos > 0 {
        b.buf.copy_within(b.pos..b.cap, 0);
        b.cap -= b.pos;
        b.pos = 0;
    }
    let mut rb = ReadBuf::new(&mut b.buf[b.cap..]);
    std::task::ready!(Pin::new(r).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    b.cap += n;
    Poll::Ready(Ok(n))
}

/// How the relay loop stopped.
enum End {
    /// `stop` fired: the client gets this ERR (if it can be placed).
    Stopped(ErrPacket),
    /// Handed to the kernel relay; the held answer is still to be sent.
    Spliced,
    ClientClosed,
    ClientQuit,
    UpstreamClosed,
    /// Writing to the client failed.
    ClientGone,
    /// Writing upstream failed.
    UpstreamGone,
}

/// Relays until either side is done. With `ctx.pool`, a client that left
/// at a command boundary hands the upstream stream back, with where its
/// framing stood.
///
/// One task polls both directions (no split halves, no channel): each
/// read is scanned for headers and written on with one write, and what
/// one side sends is written before that side is read again.
///
/// When `stop` completes (a freeze of the workload) the session ends at
/// once: the client gets its ERR if the server's stream is at a packet
/// boundary (else the connection just closes), and the upstream
/// connection is closed, never pooled.
pub async fn relay<C, U, S>(
    client: C,
    upstream: U,
    ctx: &Context<'_>,
    stop: S,
) -> (Outcome, Option<(U, Resync)>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    S: std::future::Future<Output = ErrPacket>,
{
    let (outcome, rest) = relay_with(client, upstream, ctx, stop, None).await;
    match rest {
        Rest::Pool(u, r) => (outcome, Some((u, r))),
        Rest::Closed | Rest::Spliced(..) => (outcome, None),
    }
}

/// [`relay`], offering quiet moments to `handover` (see the module docs).
pub async fn relay_with<C, U, S>(
    mut client: C,
    mut upstream: U,
    ctx: &Context<'_>,
    stop: S,
    handover: Option<Handover<'_, C, U>>,
) -> (Outcome, Rest<C, U>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    S: std::future::Future<Output = ErrPacket>,
{
    let mut stop = std::pin::pin!(stop);
    // Client → server: read, scanned into `out`, written.
    let mut cbuf = Buffer::new();
    let framing = handover.as_ref().map(|h| h.framing).or(ctx.track_state);
    let mut commands = Commands {
        replies: framing.map(|f| Replies::new(f.deprecate_eof, f.progress)),
        ..Commands::default()
    };
    let mut hook = handover.map(|h| h.hook);
    let mut out: Vec<u8> = Vec::with_capacity(BUF);
    let mut out_pos = 0;
    let mut up = 0u64;
    let mut up_flush = false;
    // Server → client: read and written as is; warden's own answers
    // (`local`) go in between two server packets, never inside one.
    let mut ubuf = Buffer::new();
    let mut local: Vec<u8> = Vec::new();
    let mut local_pos = 0;
    let mut down = 0u64;
    let mut down_flush = false;
    // Every byte read from the server, framed as soon as it is read, so the
    // stream's position is known whenever the relay stops.
    let mut position = Framer::default();
    // The framing of what the client got from the server.
    let mut written = Framer::default();
    let mut quit = false;
    // The sequence id of the last server packet of the reply to the
    // client's last command (none yet: warden's ERR would be the reply).
    let mut reply_seq: Option<u8> = None;
    let mut commands_seen = 0;
    let end = poll_fn(|cx| loop {
        if let Poll::Ready(e) = stop.as_mut().poll(cx) {
            return Poll::Ready(End::Stopped(e));
        }
        let mut progress = false;
        // Client → server.
        if out_pos < out.len() {
            match Pin::new(&mut upstream).poll_write(cx, &out[out_pos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(End::UpstreamGone),
                Poll::Ready(Ok(n)) => {
                    out_pos += n;
                    up += n as u64;
                    up_flush = true;
                    progress = true;
                    if out_pos == out.len() {
                        out.clear();
                        out_pos = 0;
                    }
                }
                Poll::Pending => {}
            }
        }
        if out.is_empty() && quit {
            if up_flush {
                match Pin::new(&mut upstream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => up_flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(End::UpstreamGone),
                    Poll::Pending => return Poll::Pending,
                }
            }
            return Poll::Ready(End::ClientQuit);
        }
        if out.is_empty() {
            match poll_fill(&mut client, &mut cbuf, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(End::ClientClosed),
                Poll::Ready(Ok(_)) => {
                    let (used, s) =
                        commands.scan(&cbuf.buf[cbuf.pos..cbuf.cap], &mut out, &mut local, ctx);
                    cbuf.pos += used;
                    quit = s == Scanned::Quit;
                    if commands.count != commands_seen {
                        commands_seen = commands.count;
                        reply_seq = None;
                    }
                    progress = true;
                }
                Poll::Pending => {
                    if up_flush {
                        match Pin::new(&mut upstream).poll_flush(cx) {
                            Poll::Ready(Ok(())) => up_flush = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(End::UpstreamGone),
                            Poll::Pending => {}
                        }
                    }
                }
            }
        }
        // Server → client: warden's own answer first when the client is at a
        // packet boundary of the server's stream.
        if local_pos < local.len() && written.at_boundary() && !written.continued {
            match Pin::new(&mut client).poll_write(cx, &local[local_pos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(End::ClientGone),
                Poll::Ready(Ok(n)) => {
                    local_pos += n;
                    down_flush = true;
                    progress = true;
                    if local_pos == local.len() {
                        local.clear();
                        local_pos = 0;
                    }
                }
                Poll::Pending => {}
            }
        } else if !ubuf.is_empty() {
            let mut until = ubuf.cap;
            if local_pos < local.len() {
                // Only up to the end of the current packet.
                let mut f = written.clone();
                let mut at = ubuf.pos;
                loop {
                    at += f.advance(&ubuf.buf[at..ubuf.cap]).0;
                    if at == ubuf.cap || (f.at_boundary() && !f.continued) {
                        break;
                    }
                }
                until = at;
            }
            match Pin::new(&mut client).poll_write(cx, &ubuf.buf[ubuf.pos..until]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(End::ClientGone),
                Poll::Ready(Ok(n)) => {
                    if let Some(h) = written.skip(&ubuf.buf[ubuf.pos..ubuf.pos + n]) {
                        reply_seq = Some(h[3]);
                    }
                    ubuf.pos += n;
                    down += n as u64;
                    down_flush = true;
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        if ubuf.is_empty() {
            match poll_fill(&mut upstream, &mut ubuf, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(End::UpstreamClosed)
                }
                Poll::Ready(Ok(_)) => {
                    position.skip(&ubuf.buf[ubuf.pos..ubuf.cap]);
                    progress = true;
                    if let Some(r) = &mut commands.replies {
                        r.feed(&ubuf.buf[ubuf.pos..ubuf.cap]);
                        if r.never() {
                            commands.replies = None;
                            commands.dirty = true;
                            hook = None;
                        }
                    }
                    // A quiet moment: this read ends the answer to the
                    // client's last command, which is held (not written
                    // yet), and nothing from the client is pending.
                    let quiet = commands
                        .replies
                        .as_ref()
                        .is_some_and(|r| r.quiet() && r.answered() >= HANDOVER_AFTER)
                        && cbuf.is_empty()
                        && out.is_empty()
                        && local.is_empty()
                        && commands.at_boundary()
                        && !quit;
                    if let (true, Some(h)) = (quiet, hook.as_mut()) {
                        match h(&client, &upstream, ubuf.cap - ubuf.pos) {
                            Handed::Spliced => return Poll::Ready(End::Spliced),
                            Handed::Later => {}
                            Handed::Never => {
                                hook = None;
                                if ctx.track_state.is_none() {
                                    commands.replies = None;
                                }
                            }
                        }
                    }
                }
                Poll::Pending => {
                    if down_flush {
                        match Pin::new(&mut client).poll_flush(cx) {
                            Poll::Ready(Ok(())) => down_flush = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(End::ClientGone),
                            Poll::Pending => {}
                        }
                    }
                }
            }
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
    if let End::Spliced = end {
        // The held answer goes out; the kernel relays from here.
        let held = &ubuf.buf[ubuf.pos..ubuf.cap];
        let sent = async {
            client.write_all(held).await?;
            client.flush().await
        }
        .await;
        down += held.len() as u64;
        let outcome = Outcome {
            up,
            down,
            change_user_refused: commands.change_user_refused,
            how: SPLICED,
            spliced: true,
            state_free: false,
        };
        ubuf.pos = ubuf.cap;
        if sent.is_err() {
            return (
                Outcome {
                    how: "client closed",
                    ..outcome
                },
                Rest::Closed,
            );
        }
        return (outcome, Rest::Spliced(client, upstream));
    }
    let (how, reusable) = match end {
        End::Stopped(e) => {
            if written.at_boundary() && !written.continued {
                // The answer to the command the client waits for, or (its
                // reply complete) to the next one it sends.
                let seq = match reply_seq {
                    Some(s) if !written.ends_reply() => s.wrapping_add(1),
                    _ => 1,
                };
                let mut pkt = Vec::new();
                put_packet(&mut pkt, seq, &e.encode());
                if client.write_all(&pkt).await.is_ok() {
                    down += pkt.len() as u64;
                    let _ = client.flush().await;
                }
            }
            let _ = client.shutdown().await;
            (FROZEN, false)
        }
        End::ClientQuit => ("client quit", true),
        End::ClientClosed => {
            let boundary = commands.at_boundary();
            if !(ctx.pool && boundary) {
                let _ = upstream.shutdown().await;
            }
            ("client closed", boundary)
        }
        End::UpstreamGone => ("upstream closed", false),
        End::UpstreamClosed => {
            let _ = client.shutdown().await;
            ("upstream closed", false)
        }
        End::ClientGone => ("client closed", false),
        End::Spliced => (SPLICED, false),
    };
    let mut outcome = Outcome {
        up,
        down,
        change_user_refused: commands.change_user_refused,
        how,
        spliced: false,
        state_free: false,
    };
    if reusable && ctx.pool && !position.continued {
        let resync = Resync {
            header_have: position.have,
            header: position.header,
            remaining: position.remaining,
        };
        outcome.state_free = ctx.track_state.is_some()
            && !commands.dirty
            && position.at_boundary()
            && commands
                .replies
                .as_ref()
                .is_some_and(|r| r.quiet() && r.left_clean());
        return (outcome, Rest::Pool(upstream, resync));
    }
    (outcome, Rest::Closed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_packet(&mut out, seq, payload);
        out
    }

    #[test]
    fn the_framer_finds_boundaries_across_chunks() {
        let mut f = Framer::default();
        let mut stream = packet(1, b"hello");
        stream.extend(packet(2, b""));
        stream.extend(packet(3, b"x"));
        let mut boundaries = 0;
        for b in &stream {
            let (k, _) = f.advance(std::slice::from_ref(b));
            assert_eq!(k, 1);
            if f.at_boundary() {
                boundaries += 1;
            }
        }
        assert_eq!(boundaries, 3);
        let mut f = Framer::default();
        let (k, h) = f.advance(&stream);
        assert_eq!(k, 9);
        assert_eq!(h, Some([5, 0, 0, 1]));
    }

    fn ctx(pool: bool) -> Context<'static> {
        Context {
            route: "orders",
            workload: "web",
            user: "app",
            pool,
            kill: None,
            track_state: None,
        }
    }

    fn never() -> std::future::Pending<ErrPacket> {
        std::future::pending()
    }

    /// Reads one packet: (sequence id, payload).
    async fn read_one(s: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.unwrap();
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        (head[3], body)
    }

    /// A stop (freeze) ends the session: the client waiting for a reply
    /// gets the ERR as that reply, then EOF; nothing is handed back.
    #[tokio::test]
    async fn a_stop_ends_the_session_with_its_error() {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = rx.await;
                ErrPacket::new(1927, "70100", "warden: workload \"web\" is frozen")
            };
            let (o, back) = relay(client, upstream, &ctx(true), stop).await;
            (o, back.is_some())
        });
        // A whole reply, then a new command the server has not answered.
        client_end.write_all(&packet(0, b"\x0e")).await.unwrap();
        let mut got = vec![0u8; 5];
        server_end.read_exact(&mut got).await.unwrap();
        server_end
            .write_all(&packet(1, b"\0\0\0\x02\0\0\0"))
            .await
            .unwrap();
        assert_eq!(read_one(&mut client_end).await.0, 1);
        client_end
            .write_all(&packet(0, b"\x03SELECT SLEEP(10)"))
            .await
            .unwrap();
        let mut got = vec![0u8; 21];
        server_end.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        let (seq, body) = read_one(&mut client_end).await;
        let err = ErrPacket::parse(&body).unwrap();
        assert_eq!((seq, err.code, &err.sqlstate), (1, 1927, b"70100"));
        assert!(err.message.contains("frozen"), "{}", err.message);
        let mut rest = Vec::new();
        client_end.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (o, back) = task.await.unwrap();
        assert_eq!(o.how, "closed: workload frozen");
        assert!(!back, "a frozen session's connection is not pooled");
    }

    /// The ERR's sequence id: the next of a reply in progress, 1 when the
    /// reply is complete (it answers the client's next command).
    #[tokio::test]
    async fn a_stop_numbers_its_error_after_the_reply() {
        for (reply, want) in [
            // Column count, a column, EOF, a row, EOF: complete.
            (
                [
                    packet(1, b"\x01"),
                    packet(2, b"\x03def\0\0\0\x011\0\x0c?\0\x01\0\0\0\x08\x81\0\0\0\0"),
                    packet(3, b"\xfe\0\0\x02\0"),
                    packet(4, b"\x011"),
                    packet(5, b"\xfe\0\0\x02\0"),
                ]
                .concat(),
                1,
            ),
            // Only the column count so far: the ERR continues the reply.
            (packet(1, b"\x01"), 2),
            // An OK (first packet of the reply): complete.
            (packet(1, b"\0\0\0\x02\0\0\0"), 1),
        ] {
            let (client, mut client_end) = duplex(1 << 20);
            let (upstream, mut server_end) = duplex(1 << 20);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let stop = async {
                    let _ = rx.await;
                    ErrPacket::new(1927, "70100", "frozen")
                };
                relay(client, upstream, &ctx(false), stop).await.0
            });
            let query = packet(0, b"\x03SELECT 1");
            client_end.write_all(&query).await.unwrap();
            let mut got = vec![0u8; query.len()];
            server_end.read_exact(&mut got).await.unwrap();
            server_end.write_all(&reply).await.unwrap();
            let mut got = vec![0u8; reply.len()];
            client_end.read_exact(&mut got).await.unwrap();
            tx.send(()).unwrap();
            let (seq, body) = read_one(&mut client_end).await;
            assert_eq!((seq, body[0]), (want, 0xff), "{reply:?}");
            task.await.unwrap();
        }
    }

    /// Stopped inside a server packet: no ERR can be placed, the client's
    /// connection just closes.
    #[tokio::test]
    async fn a_stop_inside_a_packet_closes() {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = rx.await;
                ErrPacket::new(1927, "70100", "frozen")
            };
            relay(client, upstream, &ctx(false), stop).await.0
        });
        let reply = packet(1, &[5u8; 50]);
        server_end.write_all(&reply[..20]).await.unwrap();
        let mut got = vec![0u8; 20];
        client_end.read_exact(&mut got).await.unwrap();
        tx.send(()).unwrap();
        let mut rest = Vec::new();
        client_end.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(task.await.unwrap().how, "closed: workload frozen");
    }

    /// Feeds `stream` to a scanner in chunks of `step` bytes, as reads
    /// would: what goes upstream, warden's answers, and the scanner.
    fn scan_in_chunks(stream: &[u8], step: usize, pool: bool) -> (Vec<u8>, Vec<u8>, Scanned) {
        let ctx = ctx(pool);
        let (mut c, mut out, mut local) = (Commands::default(), Vec::new(), Vec::new());
        let mut pending: Vec<u8> = Vec::new();
        for chunk in stream.chunks(step) {
            pending.extend_from_slice(chunk);
            let (used, s) = c.scan(&pending, &mut out, &mut local, &ctx);
            pending.drain(..used);
            if s == Scanned::Quit {
                return (out, local, s);
            }
        }
        assert!(pending.is_empty(), "{pending:?}");
        (out, local, Scanned::More)
    }

    #[test]
    fn the_scanner_drops_change_user_at_any_split() {
        let query = packet(0, b"\x03SELECT 1");
        let change = packet(0, b"\x11root\0\0mysql\0");
        let ping = packet(0, b"\x0e");
        let empty = packet(0, b"");
        let stream = [query.clone(), change, empty.clone(), ping.clone()].concat();
        for step in 1..=stream.len() {
            let (out, local, s) = scan_in_chunks(&stream, step, false);
            assert_eq!(s, Scanned::More);
            assert_eq!(
                out,
                [query.clone(), empty.clone(), ping.clone()].concat(),
                "step {step}"
            );
            let len = u32::from_le_bytes([local[0], local[1], local[2], 0]) as usize;
            assert_eq!(
                (local.len(), local[3]),
                (4 + len, 1),
                "one ERR, step {step}"
            );
            let err = ErrPacket::parse(&local[4..]).unwrap();
            assert_eq!(err.code, 1045);
        }
    }

    /// After a splice (what the kernel hands to warden's socket): the
    /// same refusal at any split, the carry never holding more than a
    /// header and a command byte; resumed inside a long command, a first
    /// packet that starts with 0x11 is its continuation and passes.
    #[test]
    fn spliced_commands_refuse_change_user_at_any_split() {
        use warden_core::kernel_relay::ClientGuard;
        let query = packet(0, b"\x03SELECT 1");
        let change = packet(0, b"\x11nopw\0\0orders\0");
        let stream = [change.clone(), query.clone(), change.clone(), query.clone()].concat();
        for step in 1..=stream.len() {
            let mut g = SplicedCommands::new("r", "w", "app");
            assert_eq!(g.kernel(), warden_ebpf::GUARD_MYSQL);
            g.resume(warden_ebpf::ClientPosition::default());
            let (mut up, mut local) = (Vec::new(), Vec::new());
            for chunk in stream.chunks(step) {
                g.feed(chunk, &mut up, &mut local);
                assert!(g.carry.len() <= 5, "step {step}");
            }
            assert_eq!(up, [query.clone(), query.clone()].concat(), "step {step}");
            assert_eq!(g.refused(), 2);
            let err = ErrPacket::parse(&local[4..local.len() / 2]).unwrap();
            assert!(err.code == 1045 && err.message.contains("COM_CHANGE_USER"));
        }
        let mut g = SplicedCommands::new("r", "w", "app");
        g.resume(warden_ebpf::ClientPosition {
            continues: true,
            args: 0,
        });
        let (mut up, mut local) = (Vec::new(), Vec::new());
        g.feed(&stream, &mut up, &mut local);
        assert_eq!(up[..change.len()], change[..]);
        assert_eq!(g.refused(), 1);
    }

    /// A packet of 0xffffff bytes (as a client sends one: header, then
    /// payload).
    fn max_packet(seq: u8, first: u8) -> Vec<u8> {
        let mut p = vec![0xff, 0xff, 0xff, seq];
        p.resize(4 + MAX_PAYLOAD, 0);
        p[4] = first;
        p
    }

    /// A 16 MiB packet's continuation is data, not a command, whatever
    /// its first byte.
    #[test]
    fn a_continuation_is_never_taken_for_a_command() {
        // Even with sequence id 0 and a COM_CHANGE_USER byte first.
        let stream = [max_packet(0, 0x03), packet(0, b"\x11tail")].concat();
        for step in [7, 4096, 1 << 20] {
            let (out, local, _) = scan_in_chunks(&stream, step, true);
            assert_eq!(out.len(), stream.len(), "step {step}");
            assert!(out == stream && local.is_empty());
        }
        // A COM_QUIT after it ends a pooled session; not one inside it.
        let stream = [max_packet(0, 0x03), packet(0, b"\x01"), packet(0, b"\x01")].concat();
        let (out, _, s) = scan_in_chunks(&stream, 1 << 16, true);
        assert_eq!(s, Scanned::Quit);
        assert_eq!(out.len(), 4 + MAX_PAYLOAD + 5);
    }

    /// warden's ERR waits for the end of a server packet the client is
    /// halfway through.
    #[tokio::test]
    async fn warden_answers_between_server_packets_only() {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let task =
            tokio::spawn(async move { relay(client, upstream, &ctx(false), never()).await.0 });
        let reply = packet(1, &[9u8; 300]);
        server_end.write_all(&reply[..100]).await.unwrap();
        let mut got = vec![0u8; 100];
        client_end.read_exact(&mut got).await.unwrap();
        client_end
            .write_all(&packet(0, b"\x11root\0\0mysql\0"))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        server_end.write_all(&reply[100..]).await.unwrap();
        let mut rest = vec![0u8; reply.len() - 100];
        client_end.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, reply[100..], "the server packet came whole first");
        let mut head = [0u8; 4];
        client_end.read_exact(&mut head).await.unwrap();
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
        let mut body = vec![0u8; len];
        client_end.read_exact(&mut body).await.unwrap();
        assert_eq!(ErrPacket::parse(&body).unwrap().code, 1045);
        drop(client_end);
        let o = task.await.unwrap();
        assert_eq!((o.down, o.change_user_refused), (reply.len() as u64, 1));
    }

    #[tokio::test]
    async fn change_user_is_answered_locally_and_other_commands_pass() {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let ctx = Context {
                route: "orders",
                workload: "web",
                user: "app",
                pool: false,
                kill: None,
                track_state: None,
            };
            relay(client, upstream, &ctx, never()).await.0
        });
        // COM_QUERY passes; COM_CHANGE_USER does not; COM_RESET_CONNECTION passes.
        let query = packet(0, b"\x03SELECT 1");
        let change = packet(0, b"\x11root\0\0mysql\0");
        let reset = packet(0, b"\x1f");
        client_end.write_all(&query).await.unwrap();
        let mut got = vec![0u8; query.len()];
        server_end.read_exact(&mut got).await.unwrap();
        assert_eq!(got, query);
        client_end.write_all(&change).await.unwrap();
        let mut head = [0u8; 4];
        client_end.read_exact(&mut head).await.unwrap();
        assert_eq!(head[3], 1);
        let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
        let mut body = vec![0u8; len];
        client_end.read_exact(&mut body).await.unwrap();
        let err = ErrPacket::parse(&body).unwrap();
        assert_eq!((err.code, &err.sqlstate), (1045, b"28000"));
        assert!(err.message.contains("\"orders\"") && err.message.contains("\"web\""));
        client_end.write_all(&reset).await.unwrap();
        let mut got = vec![0u8; reset.len()];
        server_end.read_exact(&mut got).await.unwrap();
        assert_eq!(got, reset, "the change-user packet reached the server");
        // A reply split across writes reaches the client whole.
        let reply = packet(1, &[0u8; 1000]);
        server_end.write_all(&reply[..10]).await.unwrap();
        server_end.write_all(&reply[10..]).await.unwrap();
        let mut got = vec![0u8; reply.len()];
        client_end.read_exact(&mut got).await.unwrap();
        assert_eq!(got, reply);
        drop(client_end);
        let o = task.await.unwrap();
        assert_eq!(o.change_user_refused, 1);
        assert_eq!(o.up as usize, query.len() + reset.len());
    }

    /// A pooled route: COM_QUIT is held back and the upstream comes back
    /// with the position of a reply the client left half read.
    #[tokio::test]
    async fn quit_hands_the_upstream_back_with_its_position() {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let ctx = Context {
                route: "orders",
                workload: "web",
                user: "app",
                pool: true,
                kill: None,
                track_state: None,
            };
            let (o, back) = relay(client, upstream, &ctx, never()).await;
            (o, back.map(|(_, r)| r))
        });
        let query = packet(0, b"\x03SELECT 1");
        client_end.write_all(&query).await.unwrap();
        let mut got = vec![0u8; query.len()];
        server_end.read_exact(&mut got).await.unwrap();
        // 10 bytes of a 104-byte packet reach warden, then the client quits.
        let reply = packet(1, &[7u8; 100]);
        server_end.write_all(&reply[..10]).await.unwrap();
        let mut seen = vec![0u8; 10];
        client_end.read_exact(&mut seen).await.unwrap();
        client_end.write_all(&packet(0, b"\x01")).await.unwrap();
        let (o, resync) = task.await.unwrap();
        assert_eq!(o.how, "client quit");
        let r = resync.expect("handed back");
        assert_eq!((r.header_have, r.remaining), (0, 94));
        // Nothing after the query reached the server (no COM_QUIT).
        drop(client_end);
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            server_end.read_to_end(&mut rest),
        )
        .await;
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// One pooled, state-tracked session: the client sends `commands` one
    /// at a time, the server answers each with `answers` (OK payloads,
    /// None: no answer), then the client quits; returns
    /// [`Outcome::state_free`].
    async fn tracked(commands: &[&[u8]], answers: &[Option<&[u8]>]) -> bool {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let ctx = Context {
                track_state: Some(Framing {
                    deprecate_eof: true,
                    progress: false,
                }),
                ..ctx(true)
            };
            let (o, back) = relay(client, upstream, &ctx, never()).await;
            assert!(back.is_some(), "handed back");
            o.state_free
        });
        for (c, a) in commands.iter().zip(answers) {
            let p = packet(0, c);
            client_end.write_all(&p).await.unwrap();
            let mut got = vec![0u8; p.len()];
            server_end.read_exact(&mut got).await.unwrap();
            assert_eq!(got, p);
            if let Some(a) = a {
                let reply = packet(1, a);
                server_end.write_all(&reply).await.unwrap();
                let mut seen = vec![0u8; reply.len()];
                client_end.read_exact(&mut seen).await.unwrap();
            }
        }
        client_end.write_all(&packet(0, b"\x01")).await.unwrap();
        task.await.unwrap()
    }

    #[tokio::test]
    async fn a_session_of_answered_selects_leaves_no_state() {
        const OK: &[u8] = b"\0\0\0\x02\0\0\0";
        const IN_TRANS: &[u8] = b"\0\0\0\x03\0\0\0";
        assert!(tracked(&[], &[]).await);
        assert!(tracked(&[b"\x03SELECT 1", b"\x0e"], &[Some(OK), Some(OK)]).await);
        assert!(!tracked(&[b"\x03SET @a = 1"], &[Some(OK)]).await);
        assert!(!tracked(&[b"\x02otherdb"], &[Some(OK)]).await);
        assert!(!tracked(&[b"\x16SELECT 1"], &[Some(b"\xff\x28\x04#42000no")]).await);
        // Unanswered when the client quit.
        assert!(!tracked(&[b"\x03SELECT 1"], &[None]).await);
        // The server says a transaction is open (autocommit off).
        assert!(!tracked(&[b"\x03SELECT 1"], &[Some(IN_TRANS)]).await);
        // Longer than what is read whole.
        let mut long = b"\x03SELECT 1 -- ".to_vec();
        long.resize(MAX_TRACKED_QUERY + 1, b'x');
        assert!(!tracked(&[&long], &[Some(OK)]).await);
        let mut fits = b"\x03SELECT 1 -- ".to_vec();
        fits.resize(MAX_TRACKED_QUERY, b'x');
        assert!(tracked(&[&fits], &[Some(OK)]).await);
    }

    /// Past [`HANDOVER_AFTER`] answered commands, the hook is offered the
    /// quiet moment after the answer to the client's last command, which
    /// reaches the client only after the hook spliced; never while a
    /// command is unanswered.
    #[tokio::test]
    async fn a_quiet_moment_is_offered_with_the_last_answer_held() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, mut server_end) = duplex(1 << 20);
        let offers = std::sync::Arc::new(AtomicU32::new(0));
        let seen = offers.clone();
        let task = tokio::spawn(async move {
            let mut hook =
                move |_: &tokio::io::DuplexStream, _: &tokio::io::DuplexStream, held: usize| {
                    // The held answer is offered with its length.
                    assert!(held > 0);
                    // Spliced at the second offer.
                    if seen.fetch_add(1, SeqCst) == 0 {
                        Handed::Later
                    } else {
                        Handed::Spliced
                    }
                };
            let h = Handover {
                hook: &mut hook,
                framing: Framing {
                    deprecate_eof: true,
                    progress: false,
                },
            };
            let (o, rest) = relay_with(client, upstream, &ctx(true), never(), Some(h)).await;
            (o, matches!(rest, Rest::Spliced(..)))
        });
        let query = packet(0, b"\x03SELECT 1");
        let answer = [
            packet(1, b"\x01"),
            packet(2, b"\x03def\0\0\0\x011\0\x0c?\0\x01\0\0\0\x08\x81\0\0\0\0"),
            packet(3, b"\x011"),
            packet(4, b"\xfe\0\0\x02\0\0\0"),
        ]
        .concat();
        for i in 0..HANDOVER_AFTER + 1 {
            client_end.write_all(&query).await.unwrap();
            let mut got = vec![0u8; query.len()];
            server_end.read_exact(&mut got).await.unwrap();
            // Half an answer: not quiet.
            server_end.write_all(&answer[..10]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            server_end.write_all(&answer[10..]).await.unwrap();
            let mut got = vec![0u8; answer.len()];
            client_end.read_exact(&mut got).await.unwrap();
            assert_eq!(got, answer);
            let want = (i + 2).saturating_sub(HANDOVER_AFTER) as u32;
            assert_eq!(offers.load(SeqCst), want, "after {} answers", i + 1);
        }
        let (o, spliced) = task.await.unwrap();
        assert!(spliced && o.spliced && o.how == SPLICED);
        assert_eq!(offers.load(SeqCst), 2);
        assert_eq!(o.down, (answer.len() as u64) * (HANDOVER_AFTER + 1));
    }

    /// Half a command sent upstream: the connection cannot be reused.
    #[tokio::test]
    async fn a_client_gone_mid_packet_keeps_nothing() {
        let (client, mut client_end) = duplex(1 << 20);
        let (upstream, _server_end) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let ctx = Context {
                route: "orders",
                workload: "web",
                user: "app",
                pool: true,
                kill: None,
                track_state: None,
            };
            relay(client, upstream, &ctx, never()).await.1.is_some()
        });
        let query = packet(0, b"\x03SELECT 1");
        client_end.write_all(&query[..7]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(client_end);
        assert!(!task.await.unwrap());
    }
}
