//! The relay after warden's login: client commands are parsed one by one
//! (policy, AUTH/HELLO handling), server replies are walked frame by frame
//! so warden's own answers (a refused command's `-NOPERM`, a client AUTH's
//! `+OK`) reach the client in the place of the reply they stand for, even
//! inside a pipeline, a MULTI block or behind a blocking command.
//!
//! Two halves run in one task: the client → upstream half sends the reply
//! plan ([`Plan`], one entry per command, in command order) to the upstream
//! → client half *before* it forwards the commands, so a reply never
//! arrives before its entry. Once a RESP2 connection subscribes (or runs
//! MONITOR or CLIENT REPLY) replies no longer match commands one to one:
//! from then on every frame is relayed as it comes and warden's own answers
//! are written at once — until a RESET, whose `+RESET` puts the two back
//! in step. In RESP3 pub/sub messages and subscribe confirmations are push
//! frames, which never count as replies.
//!
//! A client that closes while replies are still owed (a blocking command,
//! say) would leave them holding the upstream connection: warden then
//! closes its side toward the server for writing, the server drops them as
//! it does when its own client leaves, and whatever it answered before
//! still reaches the client.
//!
//! **Hand-over to the kernel relay.** Given a [`Handover`] hook (a session
//! the session code found eligible, see `docs/redis.md`), a session whose
//! replies have answered [`HANDOVER_AFTER`] commands is offered to the
//! kernel at the first quiet moment: a read from the upstream ends exactly
//! with the reply to the client's last command, every command the client
//! sent is answered, the command half has nothing buffered or in flight
//! (it is parked reading the client), no MULTI is open, and replies are in
//! step. That last reply is still held: a client that waits for it cannot
//! send, so the hook can splice the sockets with the client side silent.
//! The halves share `Quiet` for this: the command half publishes whether
//! it is idle, and stops reading the client once the session is spliced.
//! Both halves run in one task, so nothing the command half does can come
//! between the reply half's check and its hook. If the hook splices, the
//! held bytes go out and the relay returns with [`Outcome::spliced`];
//! otherwise relaying goes on (a later quiet moment may be offered again).
//! A session that runs `HELLO 3`, a subscribe command, `MONITOR` or
//! `CLIENT REPLY|TRACKING` is never offered: its replies could overtake
//! (RESP3 pushes) or stop matching the commands.

use crate::resp::{encode_command, error_reply, parse_command, Command, ReplyScanner};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
pub use warden_core::kernel_relay::Handed;

/// Commands answered before a session is offered to the kernel relay:
/// short sessions (a web request's few commands) stay in user space, where
/// their upstream connection can be reset and pooled; a spliced session's
/// upstream connection is closed at the end.
pub const HANDOVER_AFTER: u64 = 32;

/// Offered the two streams at a quiet moment (see the module docs).
/// The hook gets both streams and the length of the reply it holds back
/// (written to the client once the hook says `Spliced`).
pub type Handover<'a, C, U> = &'a mut (dyn FnMut(&C, &U, usize) -> Handed + Send);

/// What the client gets for one command, in command order.
#[derive(Debug)]
enum Plan {
    /// The upstream's next reply, relayed.
    Relay,
    /// The upstream's next reply (`+RESET`), relayed; in unsynchronised
    /// mode it puts the halves back in step.
    Reset,
    /// The upstream's next reply is warden's own (re-authentication after
    /// RESET): consumed, never shown.
    Swallow,
    /// The upstream's next reply is replaced by these bytes.
    Replace(Vec<u8>),
    /// warden's own answer, written when every earlier reply is.
    Local(Vec<u8>),
    /// From here on replies do not match commands one to one.
    Unsync,
    /// Written after every earlier reply; then the session ends.
    End(Vec<u8>),
    /// The client closed: the session ends after every earlier reply.
    Eof,
}

/// A route's command list: `deny_commands` or `allow_commands`, upper case.
#[derive(Debug, Clone, Default)]
pub struct CommandPolicy {
    pub deny: Vec<String>,
    pub allow: Option<Vec<String>>,
}

impl CommandPolicy {
    pub fn new(deny: Option<&[String]>, allow: Option<&[String]>) -> CommandPolicy {
        let upper = |v: &[String]| v.iter().map(|s| s.to_ascii_uppercase()).collect();
        CommandPolicy {
            deny: deny.map(upper).unwrap_or_default(),
            allow: allow.map(upper),
        }
    }

    /// May a client send `name` (upper case), with first argument `sub`?
    /// An entry `NAME|SUB` names one subcommand.
    pub fn permits(&self, name: &str, sub: Option<&[u8]>) -> bool {
        let matches = |entry: &String| match entry.split_once('|') {
            None => entry == name,
            Some((cmd, s)) => {
                cmd == name && sub.is_some_and(|sub| sub.eq_ignore_ascii_case(s.as_bytes()))
            }
        };
        match &self.allow {
            Some(allow) => allow.iter().any(matches),
            None => !self.deny.iter().any(matches),
        }
    }
}

/// Who the session is for, and what warden logs in with.
pub struct Context<'a> {
    pub route: &'a str,
    pub workload: &'a str,
    pub policy: &'a CommandPolicy,
    /// ACL user; empty: `AUTH password` (and `default` in HELLO).
    pub user: &'a str,
    pub password: &'a [u8],
}

impl Context<'_> {
    /// warden's own AUTH command (zeroized with the buffer it goes into).
    pub(crate) fn auth_command(&self, out: &mut Vec<u8>) {
        if self.user.is_empty() {
            encode_command(out, [&b"AUTH"[..], self.password].into_iter());
        } else {
            encode_command(
                out,
                [&b"AUTH"[..], self.user.as_bytes(), self.password].into_iter(),
            );
        }
    }
}

/// What a finished relay reports.
#[derive(Debug, Default)]
pub struct Outcome {
    pub up: u64,
    pub down: u64,
    pub refused_commands: u64,
    pub how: &'static str,
    /// The client left at a command boundary: it closed after every
    /// command it sent was answered, and no part of a later frame was
    /// read. Only then may the upstream connection serve someone else
    /// (after a reset).
    pub at_boundary: bool,
    /// Replies no longer matched commands when the client left (RESP2
    /// pub/sub, `MONITOR`, `CLIENT REPLY`).
    pub unsync: bool,
    /// The session was handed to the kernel relay (both streams open;
    /// `up`/`down` count what user space relayed before).
    pub spliced: bool,
    /// Every command the client had forwarded since its login (or its last
    /// `RESET`) is one of [`leaves_no_state`]'s, and no MULTI was left
    /// open: the connection is as warden's login left it, so a pool with
    /// `reset = "auto"` may hand it on without a reset.
    pub state_free: bool,
}

/// How the reply half ended.
struct Ended {
    how: &'static str,
    at_boundary: bool,
    unsync: bool,
    spliced: bool,
}

/// How a spliced relay ends (`Outcome::how`).
pub const SPLICED: &str = "handed to the kernel relay";

/// What the halves share for a hand-over (see the module docs).
#[derive(Default)]
struct Quiet {
    /// The command half is parked reading the client with nothing
    /// buffered, every command forwarded, and no MULTI open.
    idle: AtomicBool,
    /// The session used something that rules a hand-over out.
    never: AtomicBool,
    /// Spliced: the command half reads the client no more.
    spliced: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only ever locked for one poll in this task: never poisoned by a
    // panic elsewhere, and a poisoned stream is still the same stream.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One direction's access to a stream both halves use (as
/// `tokio::io::split` does, with the stream reachable for the hook).
/// `gate`: a reader that stops once the session is spliced.
struct Shared<'a, T> {
    stream: &'a Mutex<T>,
    gate: Option<&'a AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Shared<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.gate.is_some_and(|g| g.load(Relaxed)) {
            // The relay ends with the reply half; nothing to wake for.
            return Poll::Pending;
        }
        Pin::new(&mut *lock(self.stream)).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Shared<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *lock(self.stream)).poll_write(cx, buf)
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *lock(self.stream)).poll_flush(cx)
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *lock(self.stream)).poll_shutdown(cx)
    }
}

/// Relays until either side is done. Pass the upstream by `&mut` to keep
/// it afterwards (the pool).
pub async fn relay<C, U>(client: C, upstream: U, ctx: &Context<'_>) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    relay_with(client, upstream, ctx, None).await
}

/// [`relay`], offering quiet moments to `handover` (see the module docs).
/// Pass both streams by `&mut` to keep them for a spliced session.
pub async fn relay_with<C, U>(
    client: C,
    upstream: U,
    ctx: &Context<'_>,
    handover: Option<Handover<'_, C, U>>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (client, upstream) = (Mutex::new(client), Mutex::new(upstream));
    let quiet = Quiet::default();
    let cr = Shared {
        stream: &client,
        gate: Some(&quiet.spliced),
    };
    let cw = Shared {
        stream: &client,
        gate: None,
    };
    let ur = Shared {
        stream: &upstream,
        gate: None,
    };
    let uw = Shared {
        stream: &upstream,
        gate: None,
    };
    let (c, u) = (&client, &upstream);
    let mut offer = handover.map(|hook| {
        move |held: usize| -> Handed {
            let (c, u) = (lock(c), lock(u));
            hook(&c, &u, held)
        }
    });
    let offer = offer
        .as_mut()
        .map(|o| o as &mut (dyn FnMut(usize) -> Handed + Send));
    let (tx, rx) = unbounded_channel();
    let (tally, down) = (Tally::default(), AtomicU64::new(0));
    let client_left = tokio::sync::Notify::new();
    let commands = client_to_upstream(cr, uw, tx, ctx, &tally, &quiet);
    let replies = upstream_to_client(ur, cw, rx, &down, &client_left, &quiet, offer);
    tokio::pin!(replies);
    // The session ends when the reply half does: the command half hands
    // its ending (EOF, protocol error) over as the plan's last entry.
    let ended = tokio::select! {
        ended = &mut replies => ended,
        mut upstream = commands => {
            // The client closed while replies were still owed (a blocking
            // command, say): they would hold the upstream connection until
            // the server answers. Closing warden's side for writing makes
            // the server drop them, as it does when its own client leaves;
            // whatever it answered before reaches the client.
            tokio::select! {
                ended = &mut replies => ended,
                _ = client_left.notified() => {
                    let _ = upstream.shutdown().await;
                    replies.await
                }
            }
        }
    };
    Outcome {
        up: tally.up.load(Relaxed),
        down: down.load(Relaxed),
        refused_commands: tally.refused.load(Relaxed),
        how: ended.how,
        at_boundary: ended.at_boundary,
        unsync: ended.unsync,
        spliced: ended.spliced,
        state_free: !tally.state.load(Relaxed),
    }
}

/// What the command half counts for the outcome.
#[derive(Default)]
struct Tally {
    /// Bytes forwarded to the upstream.
    up: AtomicU64,
    /// Commands refused by the route's command list.
    refused: AtomicU64,
    /// The connection may hold state ([`ClientState::state`], or a MULTI
    /// left open).
    state: AtomicBool,
}

/// What the command half remembers about the connection.
#[derive(Default)]
pub(crate) struct ClientState {
    resp3: bool,
    in_multi: bool,
    multi_failed: bool,
    unsync: bool,
    /// Ran something that rules the kernel relay out for the session (a
    /// subscribe command, MONITOR, CLIENT REPLY or TRACKING).
    no_handover: bool,
    /// Forwarded a command that may leave state on the connection (any
    /// but [`leaves_no_state`]'s) since the login or the last `RESET`.
    state: bool,
}

/// Commands that change nothing about the connection itself — only data,
/// or nothing at all — once answered: a session that sent only these (and
/// left no MULTI open) leaves the connection as warden's login did. An
/// allow-list: anything not named here (`SELECT`, `CLIENT`, `HELLO`,
/// `WATCH`, `READONLY`, subscribe commands, scripts and functions — a
/// script's `SELECT` stuck to the caller before Redis 7 — and every
/// command added later) counts as state, and the connection is reset.
pub fn leaves_no_state(name: &str) -> bool {
    matches!(
        name,
        // connection-neutral
        "PING" | "ECHO" | "TIME" | "DBSIZE" | "EXISTS" | "TYPE" | "TTL" | "PTTL"
        | "EXPIRETIME" | "PEXPIRETIME" | "SCAN" | "KEYS" | "RANDOMKEY"
        // transactions (an open MULTI is checked separately)
        | "MULTI" | "EXEC" | "DISCARD"
        // keys
        | "DEL" | "UNLINK" | "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT"
        | "PERSIST" | "RENAME" | "RENAMENX" | "TOUCH" | "COPY"
        // strings
        | "GET" | "SET" | "SETEX" | "PSETEX" | "SETNX" | "MGET" | "MSET" | "MSETNX"
        | "INCR" | "INCRBY" | "INCRBYFLOAT" | "DECR" | "DECRBY" | "APPEND"
        | "STRLEN" | "GETRANGE" | "SETRANGE" | "GETSET" | "GETDEL" | "GETEX"
        | "SUBSTR" | "LCS"
        // hashes
        | "HGET" | "HSET" | "HSETNX" | "HMSET" | "HMGET" | "HGETALL" | "HDEL"
        | "HEXISTS" | "HINCRBY" | "HINCRBYFLOAT" | "HKEYS" | "HVALS" | "HLEN"
        | "HSTRLEN" | "HRANDFIELD" | "HSCAN"
        // lists (a blocking one left unanswered never returns to the pool)
        | "LPUSH" | "RPUSH" | "LPUSHX" | "RPUSHX" | "LPOP" | "RPOP" | "LLEN"
        | "LRANGE" | "LINDEX" | "LSET" | "LINSERT" | "LREM" | "LTRIM" | "LPOS"
        | "LMOVE" | "RPOPLPUSH" | "LMPOP" | "BLPOP" | "BRPOP" | "BLMOVE"
        | "BRPOPLPUSH" | "BLMPOP"
        // sets
        | "SADD" | "SREM" | "SMEMBERS" | "SISMEMBER" | "SMISMEMBER" | "SCARD"
        | "SPOP" | "SRANDMEMBER" | "SINTER" | "SINTERCARD" | "SUNION" | "SDIFF"
        | "SINTERSTORE" | "SUNIONSTORE" | "SDIFFSTORE" | "SMOVE" | "SSCAN"
        // sorted sets
        | "ZADD" | "ZREM" | "ZSCORE" | "ZMSCORE" | "ZINCRBY" | "ZCARD" | "ZCOUNT"
        | "ZRANGE" | "ZRANGEBYSCORE" | "ZREVRANGE" | "ZREVRANGEBYSCORE" | "ZRANK"
        | "ZREVRANK" | "ZRANGESTORE" | "ZPOPMIN" | "ZPOPMAX" | "ZRANDMEMBER"
        | "ZLEXCOUNT" | "ZRANGEBYLEX" | "ZREVRANGEBYLEX" | "ZREMRANGEBYRANK"
        | "ZREMRANGEBYSCORE" | "ZREMRANGEBYLEX" | "ZSCAN" | "ZUNION" | "ZINTER"
        | "ZDIFF" | "ZUNIONSTORE" | "ZINTERSTORE" | "ZDIFFSTORE" | "ZINTERCARD"
        | "ZMPOP" | "BZPOPMIN" | "BZPOPMAX" | "BZMPOP"
        // HyperLogLog, geo, bitmaps
        | "PFADD" | "PFCOUNT" | "PFMERGE" | "GEOADD" | "GEOPOS" | "GEODIST"
        | "GEOHASH" | "GEOSEARCH" | "GEOSEARCHSTORE" | "SETBIT" | "GETBIT"
        | "BITCOUNT" | "BITPOS" | "BITOP" | "BITFIELD" | "BITFIELD_RO"
        // streams (consumer groups are the server's data, not the connection's)
        | "XADD" | "XLEN" | "XRANGE" | "XREVRANGE" | "XDEL" | "XTRIM" | "XREAD"
        | "XREADGROUP" | "XACK" | "XPENDING" | "XCLAIM" | "XAUTOCLAIM"
    )
}

/// Returns the upstream's write half once the client is done sending.
async fn client_to_upstream<R, W>(
    mut client: R,
    mut upstream: W,
    plan: UnboundedSender<Plan>,
    ctx: &Context<'_>,
    tally: &Tally,
    quiet: &Quiet,
) -> W
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    // Holds warden's AUTH after a RESET: wiped when dropped.
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(16 * 1024));
    let mut cmd = Command::default();
    let mut st = ClientState::default();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        // Parked here with nothing held back: quiet, as far as this half
        // goes (the reply half decides).
        quiet.idle.store(buf.is_empty() && !st.in_multi, Relaxed);
        let read = client.read_buf(&mut buf).await;
        quiet.idle.store(false, Relaxed);
        match read {
            Ok(0) | Err(_) => {
                let _ = plan.send(Plan::Eof);
                return upstream;
            }
            Ok(_) => {}
        }
        let mut start = 0;
        let mut ending = None;
        loop {
            match parse_command(&buf[start..], &mut cmd) {
                Ok(false) => break,
                Ok(true) => {
                    let raw = &buf[start..start + cmd.len];
                    if !cmd.args.is_empty() {
                        let _ = handle(raw, &cmd, &mut st, &mut out, &plan, ctx, &tally.refused);
                        if st.resp3 || st.unsync || st.no_handover {
                            quiet.never.store(true, Relaxed);
                        }
                        tally.state.store(st.state || st.in_multi, Relaxed);
                    }
                    start += cmd.len;
                }
                Err(e) => {
                    ending = Some(Plan::End(error_reply(
                        "ERR",
                        &format!("Protocol error: {e}"),
                    )));
                    break;
                }
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            if upstream.write_all(&out).await.is_err() {
                let _ = plan.send(Plan::Eof);
                return upstream;
            }
            tally.up.fetch_add(out.len() as u64, Relaxed);
            out.clear();
        }
        if let Some(end) = ending {
            let _ = plan.send(end);
            return upstream;
        }
    }
}

/// One client command: answered here, rewritten, or forwarded; its plan
/// entry is sent before the bytes go out.
fn handle(
    raw: &[u8],
    cmd: &Command,
    st: &mut ClientState,
    out: &mut Vec<u8>,
    plan: &UnboundedSender<Plan>,
    ctx: &Context<'_>,
    refused: &AtomicU64,
) -> Result<(), tokio::sync::mpsc::error::SendError<Plan>> {
    let name = String::from_utf8_lossy(cmd.arg(raw, 0).unwrap_or_default()).to_ascii_uppercase();
    let sub = cmd.arg(raw, 1);
    let forward = |out: &mut Vec<u8>| {
        if cmd.inline {
            encode_command(out, cmd.args.iter().map(|r| &raw[r.clone()]));
        } else {
            out.extend_from_slice(raw);
        }
    };
    match name.as_str() {
        // The client's password is never checked nor forwarded: warden
        // logged in for it.
        "AUTH" => return plan.send(Plan::Local(b"+OK\r\n".to_vec())),
        "HELLO" => {
            st.state = true;
            hello(raw, cmd, st, out, ctx);
            return plan.send(Plan::Relay);
        }
        _ => {}
    }
    if !ctx.policy.permits(&name, sub) {
        refused.fetch_add(1, Relaxed);
        if st.in_multi {
            st.multi_failed = true;
        }
        return plan.send(Plan::Local(error_reply(
            "NOPERM",
            &format!(
                "warden: route {:?} does not allow command {name:?} for workload {:?}",
                ctx.route, ctx.workload
            ),
        )));
    }
    if !leaves_no_state(&name) {
        st.state = true;
    }
    match name.as_str() {
        "MULTI" => st.in_multi = true,
        "EXEC" if st.multi_failed => {
            // A refused command inside the block aborts it, as Redis does
            // for commands it rejects while queueing.
            st.in_multi = false;
            st.multi_failed = false;
            plan.send(Plan::Replace(
                b"-EXECABORT Transaction discarded because of previous errors.\r\n".to_vec(),
            ))?;
            encode_command(out, [&b"DISCARD"[..]].into_iter());
            return Ok(());
        }
        "EXEC" | "DISCARD" => {
            st.in_multi = false;
            st.multi_failed = false;
        }
        "RESET" => {
            // RESET also logs the connection out: warden logs in again and
            // keeps that answer to itself.
            *st = ClientState::default();
            plan.send(Plan::Reset)?;
            plan.send(Plan::Swallow)?;
            forward(out);
            ctx.auth_command(out);
            return Ok(());
        }
        "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE"
        | "SUNSUBSCRIBE"
            if !st.in_multi =>
        {
            st.no_handover = true;
            // RESP3 confirms with push frames (not replies); RESP2 enters
            // subscribed mode, where replies stop matching commands.
            if !st.resp3 && !st.unsync {
                st.unsync = true;
                plan.send(Plan::Unsync)?;
            }
            forward(out);
            return Ok(());
        }
        "MONITOR" if !st.in_multi => {
            st.no_handover = true;
            st.unsync = true;
            plan.send(Plan::Unsync)?;
            forward(out);
            return Ok(());
        }
        "CLIENT" if sub.is_some_and(|s| s.eq_ignore_ascii_case(b"REPLY")) => {
            st.no_handover = true;
            st.unsync = true;
            plan.send(Plan::Unsync)?;
            forward(out);
            return Ok(());
        }
        "CLIENT" if sub.is_some_and(|s| s.eq_ignore_ascii_case(b"TRACKING")) => {
            // Invalidations arrive as pushes (RESP3) or on another
            // connection; either way warden keeps the session.
            st.no_handover = true;
        }
        _ => {}
    }
    plan.send(Plan::Relay)?;
    forward(out);
    Ok(())
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`: the client's AUTH
/// pair is replaced by warden's login; everything else goes on unchanged.
pub(crate) fn hello(
    raw: &[u8],
    cmd: &Command,
    st: &mut ClientState,
    out: &mut Vec<u8>,
    ctx: &Context<'_>,
) {
    let args: Vec<&[u8]> = cmd.args.iter().map(|r| &raw[r.clone()]).collect();
    match args.get(1) {
        Some(v) if *v == b"3" => st.resp3 = true,
        Some(v) if *v == b"2" => st.resp3 = false,
        _ => {}
    }
    let has_auth = args.iter().skip(2).any(|a| a.eq_ignore_ascii_case(b"AUTH"));
    if !has_auth && !cmd.inline {
        out.extend_from_slice(raw);
        return;
    }
    let user: &[u8] = if ctx.user.is_empty() {
        b"default"
    } else {
        ctx.user.as_bytes()
    };
    let mut rebuilt: Vec<&[u8]> = args.iter().take(2).copied().collect();
    let mut i = 2;
    while i < args.len() {
        if args[i].eq_ignore_ascii_case(b"AUTH") {
            i += 3;
            continue;
        }
        rebuilt.push(args[i]);
        i += 1;
    }
    if has_auth {
        rebuilt.extend_from_slice(&[b"AUTH", user, ctx.password]);
    }
    encode_command(out, rebuilt.into_iter());
}

async fn upstream_to_client<R, W>(
    mut upstream: R,
    mut client: W,
    mut plan: UnboundedReceiver<Plan>,
    down: &AtomicU64,
    client_left: &tokio::sync::Notify,
    quiet: &Quiet,
    mut offer: Option<&mut (dyn FnMut(usize) -> Handed + Send)>,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut queue: VecDeque<Plan> = VecDeque::new();
    let mut unsync = false;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut scanner = ReplyScanner::default();
    // The command half's last entry is always Eof or End; after it the
    // channel closes and only replies are awaited.
    let mut plan_open = true;
    // The client closed with replies still owed (see `relay`).
    let mut left_owed = false;
    // Upstream replies relayed in step with commands.
    let mut answered: u64 = 0;
    let mut spliced = false;
    loop {
        let mut ended = None;
        tokio::select! {
            biased;
            p = plan.recv(), if plan_open => match p {
                Some(p) => queue.push_back(p),
                None => plan_open = false,
            },
            r = upstream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    ended = Some(if left_owed { EOF } else { "upstream closed" })
                }
                Ok(_) => {
                    let mut start = 0;
                    loop {
                        if ended.is_some() {
                            break;
                        }
                        let n = match scanner.advance(&buf[start..]) {
                            Ok(Some(n)) => n,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!("upstream sent malformed RESP: {e}");
                                ended = Some("upstream protocol error");
                                break;
                            }
                        };
                        let frame = &buf[start..start + n];
                        start += n;
                        while let Ok(p) = plan.try_recv() {
                            queue.push_back(p);
                        }
                        if !unsync && frame.first() != Some(&b'>') {
                            answered += 1;
                        }
                        ended = take_frame(frame, &mut queue, &mut unsync, &mut out);
                        if ended.is_none() {
                            ended = drain_front(&mut queue, &mut unsync, &mut out);
                        }
                    }
                    buf.drain(..start);
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(16 * 1024);
                    }
                    if ended.is_none() && answered >= HANDOVER_AFTER && buf.is_empty() {
                        if let Some(hook) = offer.as_mut() {
                            while let Ok(p) = plan.try_recv() {
                                queue.push_back(p);
                            }
                            ended = drain_front(&mut queue, &mut unsync, &mut out);
                            // Quiet: every command answered, the last
                            // answer held in `out`, the command half idle.
                            let quiet_now = ended.is_none()
                                && queue.is_empty()
                                && !unsync
                                && !out.is_empty()
                                && quiet.idle.load(Relaxed);
                            if quiet.never.load(Relaxed) {
                                offer = None;
                            } else if quiet_now {
                                match hook(out.len()) {
                                    Handed::Spliced => {
                                        quiet.spliced.store(true, Relaxed);
                                        spliced = true;
                                    }
                                    Handed::Later => {}
                                    Handed::Never => offer = None,
                                }
                            }
                        }
                    }
                }
            },
        }
        if ended.is_none() {
            ended = drain_front(&mut queue, &mut unsync, &mut out);
        }
        // Eof is the last entry; not at the front: replies are owed.
        if ended.is_none() && !left_owed && matches!(queue.back(), Some(Plan::Eof)) {
            left_owed = true;
            client_left.notify_one();
        }
        if !out.is_empty() {
            if client.write_all(&out).await.is_err() {
                return Ended {
                    how: "client closed",
                    at_boundary: false,
                    unsync,
                    spliced,
                };
            }
            down.fetch_add(out.len() as u64, Relaxed);
            out.clear();
        }
        if spliced {
            // The held reply is out; the kernel relays from here (the
            // caller keeps both connections open).
            let _ = client.flush().await;
            return Ended {
                how: SPLICED,
                at_boundary: false,
                unsync: false,
                spliced,
            };
        }
        if let Some(how) = ended {
            let _ = client.flush().await;
            let _ = client.shutdown().await;
            // Only the client's own close (the plan's Eof, reached after
            // every earlier entry) with no partial frame read leaves the
            // upstream at a command boundary.
            // (Not after a half-close toward the server: see `relay`.)
            let at_boundary = how == EOF
                && !left_owed
                && matches!(queue.front(), Some(Plan::Eof))
                && buf.is_empty();
            return Ended {
                how,
                at_boundary,
                unsync,
                spliced: false,
            };
        }
    }
}

/// One complete reply frame from the upstream: relayed, consumed or
/// replaced by the plan's front entry. `Some`: the session ends.
fn take_frame(
    frame: &[u8],
    queue: &mut VecDeque<Plan>,
    unsync: &mut bool,
    out: &mut Vec<u8>,
) -> Option<&'static str> {
    if *unsync {
        out.extend_from_slice(frame);
        if frame == b"+RESET\r\n" && queue.iter().any(|p| matches!(p, Plan::Reset)) {
            while let Some(p) = queue.pop_front() {
                if matches!(p, Plan::Reset) {
                    break;
                }
            }
            *unsync = false;
        }
        return None;
    }
    if frame.first() == Some(&b'>') {
        // A RESP3 push: out of band, never a reply to a command.
        out.extend_from_slice(frame);
        return None;
    }
    match queue.front() {
        Some(Plan::Relay | Plan::Reset) => {
            queue.pop_front();
            out.extend_from_slice(frame);
        }
        Some(Plan::Swallow) => {
            queue.pop_front();
            if frame.first() == Some(&b'-') {
                tracing::warn!("the upstream refused warden's login after RESET");
                out.extend_from_slice(&error_reply(
                    "ERR",
                    "warden: the upstream refused warden's login after RESET; closing",
                ));
                return Some("re-authentication after RESET refused");
            }
        }
        Some(Plan::Replace(_)) => {
            if let Some(Plan::Replace(bytes)) = queue.pop_front() {
                out.extend_from_slice(&bytes);
            }
        }
        // Nothing asked for it (a reply after CLIENT REPLY ON, say): on.
        _ => out.extend_from_slice(frame),
    }
    None
}

/// How a session ends when its client closes.
const EOF: &str = "client closed";

/// Writes the plan's leading local answers; `Some`: the session ends.
fn drain_front(
    queue: &mut VecDeque<Plan>,
    unsync: &mut bool,
    out: &mut Vec<u8>,
) -> Option<&'static str> {
    loop {
        match queue.front() {
            Some(Plan::Local(_)) => {
                if let Some(Plan::Local(bytes)) = queue.pop_front() {
                    out.extend_from_slice(&bytes);
                }
            }
            Some(Plan::End(_)) => {
                if let Some(Plan::End(bytes)) = queue.pop_front() {
                    out.extend_from_slice(&bytes);
                }
                return Some("client protocol error");
            }
            Some(Plan::Eof) => return Some(EOF),
            Some(Plan::Unsync) => {
                queue.pop_front();
                *unsync = true;
            }
            // Unsynchronised: entries that wait for a reply no longer
            // match one; only a RESET brings them back in step.
            Some(Plan::Relay | Plan::Swallow | Plan::Replace(_)) if *unsync => {
                queue.pop_front();
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
