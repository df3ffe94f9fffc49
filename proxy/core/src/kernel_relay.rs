//! A long session handed to the eBPF kernel relay (`route.kernel_relay`),
//! the part every route kind that uses it shares (PostgreSQL, Redis, MySQL).
//!
//! A route kind's relay finds a quiet moment — the client waits for a reply
//! warden still holds, nothing is in flight either way — and offers it to
//! [`Handover::offer`], which splices the client's and the upstream's far
//! ends with [`KernelRelay::splice`]. From then on `warden_direct` moves
//! the session's bytes from the client's socket to the upstream's and back,
//! and [`finish`] only watches warden's own two sockets: for either end,
//! for a freeze, and for the bytes that take the TCP path (a direction past
//! the kernel's flow-control window), which it forwards. The session's
//! policy, credential and audit records were all decided before; a spliced
//! session's upstream connection is closed at its end (never pooled: warden
//! no longer sees where its protocol stands).

use crate::freeze::FreezeEntry;
use crate::metrics::{Metrics, RelayKind};
use crate::pgwire::upstream::UpstreamStream;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use warden_ebpf::{JoinState, Joining, KernelRelay, SpliceError, Spliced};

/// What a hand-over hook did with the quiet moment it was offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handed {
    /// The sockets are spliced: the kernel relays from now on.
    Spliced,
    /// Not now (e.g. bytes still queued); a later quiet moment may do.
    Later,
    /// Never for this session.
    Never,
}

/// Client transports: which one is plain TCP (the only kind spliced).
pub trait ClientTransport: Sized {
    fn plain_tcp(&self) -> Option<&TcpStream>;
    fn into_plain_tcp(self) -> Result<TcpStream, Self>;
}

impl ClientTransport for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn into_plain_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
}

impl ClientTransport for tokio::net::UnixStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
    fn into_plain_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }
}

impl<S> ClientTransport for tokio_rustls::server::TlsStream<S> {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
    fn into_plain_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }
}

/// A route's client connection behind one type: plain TCP, or TLS on a
/// `client_tls` route (the redis and mysql routes box theirs).
pub trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {
    /// The plain TCP socket (the only kind the kernel relay splices).
    fn plain_tcp(&self) -> Option<&TcpStream>;
    fn into_plain_tcp(self: Box<Self>) -> Result<TcpStream, BoxedClient>;
}

/// A boxed [`ClientIo`].
pub type BoxedClient = Box<dyn ClientIo>;

impl ClientIo for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn into_plain_tcp(self: Box<Self>) -> Result<TcpStream, BoxedClient> {
        Ok(*self)
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
    fn into_plain_tcp(self: Box<Self>) -> Result<TcpStream, BoxedClient> {
        Err(self)
    }
}

impl ClientTransport for BoxedClient {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        (**self).plain_tcp()
    }
    fn into_plain_tcp(self) -> Result<TcpStream, Self> {
        ClientIo::into_plain_tcp(self)
    }
}

/// Checks the client's bytes that reach warden after a splice, for a
/// route kind whose client direction the kernel guards
/// (`DirectPeer::guard`): the kernel redirects what it checked and hands
/// the rest of the direction to warden's socket at a message boundary,
/// from where this walks it — so every command is seen by the kernel or
/// by this. A MySQL route's refuses `COM_CHANGE_USER` as its user-space
/// relay does.
pub trait ClientGuard: Send {
    /// The kernel's check for this route kind (`warden_ebpf::GUARD_*`).
    fn kernel(&self) -> u8;
    /// Where the kernel's walk stood when the direction took the TCP path.
    fn resume(&mut self, at: warden_ebpf::ClientPosition);
    /// Walks the next client bytes: what goes on to the upstream into
    /// `up`, warden's own answers into `local`; see [`Fed`].
    fn feed(&mut self, data: &[u8], up: &mut Vec<u8>, local: &mut Vec<u8>) -> Fed;
    /// Commands refused so far.
    fn refused(&self) -> u64;
}

/// What a [`ClientGuard`] made of the client bytes it was fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// Relaying goes on.
    Go,
    /// The session ends once `up` and `local` are written (the guard
    /// refused something it cannot answer in a spliced session).
    End,
    /// A command at a boundary must be decided by the route's user-space
    /// relay: `up` goes on, then the splice ends ([`finish`] puts the two
    /// streams back in step) and these client bytes — that command and
    /// what followed it — start the user-space relay
    /// ([`Finished::resumed`]).
    Unsplice(Vec<u8>),
}

/// The outcome of hand-over attempts in one session.
pub struct Handover {
    kind: RelayKind,
    spliced: Option<Spliced>,
    /// Where a spliced session's end is counted (`tcp_path`).
    counted: Option<(String, Metrics)>,
    /// The client's socket on its way into the relay's map, started at the
    /// first quiet moment offered (it takes a walk over the host's TCP
    /// sockets on a blocking thread; later quiet moments check it).
    joining: Option<Joining>,
    /// The kernel's check of the client direction (`warden_ebpf::GUARD_*`);
    /// the matching [`ClientGuard`] is built only for a spliced session.
    guard: u8,
    /// A Redis route's command list, as registered with the kernel.
    list: warden_ebpf::CommandList,
}

impl Handover {
    pub fn new(kind: RelayKind) -> Handover {
        Handover {
            kind,
            spliced: None,
            counted: None,
            joining: None,
            guard: warden_ebpf::GUARD_NONE,
            list: warden_ebpf::CommandList::NONE,
        }
    }

    /// A hand-over whose client direction the kernel checks with `guard`
    /// (`warden_ebpf::GUARD_*`); [`finish`] walks what it hands back with
    /// the [`ClientGuard`] the caller builds once the session is spliced.
    pub fn guarded(kind: RelayKind, guard: u8) -> Handover {
        Handover {
            guard,
            ..Handover::new(kind)
        }
    }

    /// With the route's command list (`GUARD_REDIS`): the kernel hands the
    /// client's direction back before a command the list leaves to user
    /// space, and the guard answers [`Fed::Unsplice`] there.
    pub fn listed(self, list: warden_ebpf::CommandList) -> Handover {
        Handover { list, ..self }
    }

    /// Offers the quiet moment to the kernel relay; `held` bytes (the
    /// reply held back) go to the client once it returns `Spliced`.
    pub fn offer(
        &mut self,
        relay: &Arc<KernelRelay>,
        client: Option<&TcpStream>,
        upstream: &UpstreamStream,
        held: usize,
        route: &str,
        metrics: &Metrics,
    ) -> Handed {
        let (Some(client), UpstreamStream::Plain(up)) = (client, upstream) else {
            return Handed::Never;
        };
        let count = |result| metrics.kernel_relay(self.kind, route, result);
        let not_local = |e: &dyn std::fmt::Display| {
            count("not_local");
            tracing::debug!(
                route,
                "kernel relay not possible: {e}; relaying in user space"
            );
            Handed::Never
        };
        if self.joining.is_none() {
            match relay.join(client, up) {
                Ok(j) => self.joining = Some(j),
                Err(e) => return not_local(&e),
            }
        }
        match self.joining.as_ref().map(Joining::state) {
            Some(JoinState::Joined) => {}
            Some(JoinState::Failed) => {
                return not_local(&"the client's socket could not enter the relay's map")
            }
            // Not yet: the session goes on in user space until a later
            // quiet moment.
            Some(JoinState::Pending) | None => return Handed::Later,
        }
        match relay.splice_listed(client, up, self.guard, self.list, held) {
            Ok(s) => {
                count("spliced");
                self.spliced = Some(s);
                self.counted = Some((route.to_string(), metrics.clone()));
                Handed::Spliced
            }
            Err(SpliceError::Busy) => {
                count("busy");
                Handed::Later
            }
            Err(SpliceError::Failed(e)) => not_local(&e),
        }
    }
}

/// How a spliced session ended.
#[derive(Debug, Default)]
pub struct Finished {
    /// An I/O error (or a hand-over that caught client bytes) ended it.
    pub error: bool,
    /// Bytes client → upstream and upstream → client after the splice:
    /// the kernel's counts plus what took the TCP path.
    pub up: u64,
    pub down: u64,
    /// The freeze that ended the session, if one did (`frozen_error`
    /// already sent).
    pub frozen: Option<FreezeEntry>,
    /// Client commands the guard refused after the splice.
    pub refused: u64,
    /// The guard ended the session (a refusal it cannot answer while the
    /// server's replies go straight to the client).
    pub ended_by_guard: bool,
    /// The guard met a command the route's user-space relay decides
    /// ([`Fed::Unsplice`]): the splice has ended, every reply the server
    /// owed for earlier commands has reached the client, and the session
    /// goes on in user space with these streams.
    pub resumed: Option<Resumed>,
}

/// A spliced session handed back to user space ([`Finished::resumed`]).
#[derive(Debug)]
pub struct Resumed {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Client bytes read but not yet relayed: the user-space relay reads
    /// them first.
    pub pending: Vec<u8>,
}

impl Resumed {
    /// The client as the user-space relay reads it: `pending` first.
    pub fn into_parts(self) -> (crate::rewind::Rewind<TcpStream>, TcpStream) {
        let client = crate::rewind::Rewind::new(self.client, self.pending);
        (client, self.upstream)
    }
}

/// The rest of a spliced session: warden's two sockets are watched for
/// either end or a freeze, and what still reaches them (the TCP path) is
/// forwarded in order (a direction whose armed check failed, or that went
/// past the window or met the guard, comes this way; see
/// `KernelRelay::splice`); a freeze sends `frozen_error(entry)`. Both
/// connections are closed on return, unless the guard hands the session
/// back to user space ([`Fed::Unsplice`], [`Finished::resumed`]).
pub async fn finish<S: ClientTransport>(
    client: S,
    upstream: UpstreamStream,
    handover: Handover,
    frozen: impl std::future::Future<Output = FreezeEntry>,
    frozen_error: impl FnOnce(&FreezeEntry) -> Vec<u8>,
    mut guard: Option<Box<dyn ClientGuard>>,
) -> Finished {
    let Handover {
        kind,
        mut spliced,
        counted,
        guard: kernel_guard,
        ..
    } = handover;
    debug_assert!(guard.as_ref().map_or(kernel_guard, |g| g.kernel()) == kernel_guard);
    let mut out = Finished::default();
    let (Ok(mut client), UpstreamStream::Plain(mut upstream)) = (client.into_plain_tcp(), upstream)
    else {
        // Only plain TCP pairs are ever spliced.
        out.error = true;
        return out;
    };
    tokio::pin!(frozen);
    let mut frozen_error = Some(frozen_error);
    let mut refusal = |f: &FreezeEntry| frozen_error.take().map(|e| e(f)).unwrap_or_default();
    let mut pending = None;
    tokio::select! {
        w = watch_ends(
            &mut client,
            &mut upstream,
            guard.as_mut().zip(spliced.as_ref()),
        ) => {
            out.error = w.error;
            out.ended_by_guard = w.by_guard;
            out.up += w.up;
            out.down += w.down;
            pending = w.unsplice;
        }
        f = &mut frozen => {
            let _ = client.write_all(&refusal(&f)).await;
            out.frozen = Some(f);
        }
    }
    out.refused = guard.as_ref().map_or(0, |g| g.refused());
    if let (Some(s), Some((route, metrics))) = (&spliced, &counted) {
        if s.check_failed() {
            // The client sent before it could be redirected (a pipelining
            // client): warden relayed the whole session, in order.
            metrics.kernel_relay(kind, route, "tcp_path");
        }
    }
    let mut kernel = (0, 0);
    if let Some(s) = spliced.take() {
        kernel = s.release();
    }
    out.up += kernel.0;
    out.down += kernel.1;
    let Some(pending) = pending else {
        return out;
    };
    // Back to user space: the splice has ended, so from here on the
    // server's replies reach warden's socket. A barrier puts the streams
    // in step: once the server answers it, every reply it owed the client
    // for earlier commands has been forwarded.
    tokio::select! {
        b = barrier(&mut client, &mut upstream) => match b {
            Ok(down) => {
                out.down += down;
                if let Some((route, metrics)) = &counted {
                    metrics.kernel_relay(kind, route, "unspliced");
                }
                out.resumed = Some(Resumed { client, upstream, pending });
            }
            Err(e) => {
                tracing::warn!("spliced session not handed back to user space: {e}");
                out.error = true;
            }
        },
        f = &mut frozen => {
            let _ = client.write_all(&refusal(&f)).await;
            out.frozen = Some(f);
        }
    }
    out
}

/// What [`watch_ends`] saw.
#[derive(Default)]
struct Watched {
    error: bool,
    up: u64,
    down: u64,
    by_guard: bool,
    unsplice: Option<Vec<u8>>,
}

async fn watch_ends(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut guard: Option<(&mut Box<dyn ClientGuard>, &Spliced)>,
) -> Watched {
    let mut buf = vec![0u8; 16 * 1024];
    let mut w = Watched::default();
    // `checked` may hold warden's own login (a Redis AUTH rewritten by the
    // guard): wiped when dropped.
    let mut checked = zeroize::Zeroizing::new(Vec::new());
    let mut local = Vec::new();
    let mut resumed = false;
    loop {
        let from_client = tokio::select! {
            r = client.readable() => match r {
                Ok(()) => true,
                Err(_) => return Watched { error: true, ..w },
            },
            r = upstream.readable() => match r {
                Ok(()) => false,
                Err(_) => return Watched { error: true, ..w },
            },
        };
        let (from, to) = if from_client {
            (&mut *client, &mut *upstream)
        } else {
            (&mut *upstream, &mut *client)
        };
        let n = match from.try_read(&mut buf) {
            Ok(0) => return w,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Watched { error: true, ..w },
        };
        let sent = match guard.as_mut().filter(|_| from_client) {
            Some((g, spliced)) => {
                if !resumed {
                    // The kernel handed this direction over at a boundary.
                    g.resume(spliced.client_position());
                    resumed = true;
                }
                checked.clear();
                local.clear();
                let fed = g.feed(&buf[..n], &mut checked, &mut local);
                let sent = upstream.write_all(&checked).await.is_ok()
                    && client.write_all(&local).await.is_ok();
                match fed {
                    _ if !sent => false,
                    Fed::Go => true,
                    Fed::End => {
                        w.up += n as u64;
                        w.by_guard = true;
                        return w;
                    }
                    Fed::Unsplice(rest) => {
                        w.up += (n - rest.len().min(n)) as u64;
                        w.unsplice = Some(rest);
                        return w;
                    }
                }
            }
            None => to.write_all(&buf[..n]).await.is_ok(),
        };
        if !sent {
            return Watched { error: true, ..w };
        }
        if from_client {
            w.up += n as u64;
        } else {
            w.down += n as u64;
        }
    }
}

/// Puts a Redis session's two streams back in step after its splice ended:
/// sends `PING <nonce>` upstream and forwards the server's bytes to the
/// client until they end with its echo (a random 128-bit nonce: no reply
/// the client could ask for ends that way), which is kept from the client.
/// Nothing is sent upstream meanwhile, so the echo is the last thing the
/// server sent: every reply owed for earlier commands went before it.
/// Returns the bytes forwarded. A connection in RESP2 pub/sub mode answers
/// PING with an array: that session cannot go on in step, so it ends.
async fn barrier(client: &mut TcpStream, upstream: &mut TcpStream) -> std::io::Result<u64> {
    use tokio::io::AsyncReadExt;
    let mut nonce = [0u8; 16];
    aws_lc_rs::rand::fill(&mut nonce)
        .map_err(|_| std::io::Error::other("the system RNG failed"))?;
    let nonce = hex::encode(nonce);
    let ping = format!("*2\r\n$4\r\nPING\r\n${}\r\n{nonce}\r\n", nonce.len());
    let echo = format!("${}\r\n{nonce}\r\n", nonce.len());
    let echo = echo.as_bytes();
    upstream.write_all(ping.as_bytes()).await?;
    let mut held: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut forwarded = 0u64;
    loop {
        let n = upstream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::other("the server closed the connection"));
        }
        held.extend_from_slice(&buf[..n]);
        if held.ends_with(echo) {
            let before = &held[..held.len() - echo.len()];
            const PUBSUB_PONG: &[u8] = b"*2\r\n$4\r\npong\r\n";
            if before.ends_with(PUBSUB_PONG) {
                client
                    .write_all(&before[..before.len() - PUBSUB_PONG.len()])
                    .await?;
                return Err(std::io::Error::other(
                    "the connection is in RESP2 pub/sub mode",
                ));
            }
            client.write_all(before).await?;
            return Ok(forwarded + before.len() as u64);
        }
        // Forward all but what could still be the start of the echo (or
        // of a pub/sub PONG array and the echo).
        let keep = (echo.len() + 16).min(held.len());
        let go = held.len() - keep;
        if go > 0 {
            client.write_all(&held[..go]).await?;
            forwarded += go as u64;
            held.drain(..go);
        }
    }
}
