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
    /// `up`, warden's own answers into `local`. `false`: the session ends
    /// once those are written (the guard refused something it cannot
    /// answer in a spliced session).
    fn feed(&mut self, data: &[u8], up: &mut Vec<u8>, local: &mut Vec<u8>) -> bool;
    /// Commands refused so far.
    fn refused(&self) -> u64;
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
}

impl Handover {
    pub fn new(kind: RelayKind) -> Handover {
        Handover {
            kind,
            spliced: None,
            counted: None,
            joining: None,
            guard: warden_ebpf::GUARD_NONE,
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
        match relay.splice(client, up, self.guard, held) {
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
}

/// The rest of a spliced session: warden's two sockets are watched for
/// either end or a freeze, and what still reaches them (the TCP path) is
/// forwarded in order (a direction whose armed check failed, or that went
/// past the window or met the guard, comes this way; see
/// `KernelRelay::splice`); a freeze sends `frozen_error(entry)`. Both
/// connections are closed on return.
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
        spliced,
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
    tokio::select! {
        (error, up, down, refused) = watch_ends(
            &mut client,
            &mut upstream,
            guard.as_mut().zip(spliced.as_ref()),
        ) => {
            out.error = error;
            out.ended_by_guard = refused;
            out.up += up;
            out.down += down;
        }
        f = frozen => {
            let _ = client.write_all(&frozen_error(&f)).await;
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
    if let Some(s) = &spliced {
        let (up, down) = s.bytes();
        out.up += up;
        out.down += down;
    }
    drop(client);
    drop(upstream);
    drop(spliced);
    out
}

async fn watch_ends(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mut guard: Option<(&mut Box<dyn ClientGuard>, &Spliced)>,
) -> (bool, u64, u64, bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut up, mut down) = (0u64, 0u64);
    // `checked` may hold warden's own login (a Redis AUTH rewritten by the
    // guard): wiped when dropped.
    let mut checked = zeroize::Zeroizing::new(Vec::new());
    let mut local = Vec::new();
    let mut resumed = false;
    loop {
        let from_client = tokio::select! {
            r = client.readable() => match r {
                Ok(()) => true,
                Err(_) => return (true, up, down, false),
            },
            r = upstream.readable() => match r {
                Ok(()) => false,
                Err(_) => return (true, up, down, false),
            },
        };
        let (from, to) = if from_client {
            (&mut *client, &mut *upstream)
        } else {
            (&mut *upstream, &mut *client)
        };
        let n = match from.try_read(&mut buf) {
            Ok(0) => return (false, up, down, false),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return (true, up, down, false),
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
                let go_on = g.feed(&buf[..n], &mut checked, &mut local);
                let sent = upstream.write_all(&checked).await.is_ok()
                    && client.write_all(&local).await.is_ok();
                if sent && !go_on {
                    return (false, up + n as u64, down, true);
                }
                sent
            }
            None => to.write_all(&buf[..n]).await.is_ok(),
        };
        if !sent {
            return (true, up, down, false);
        }
        if from_client {
            up += n as u64;
        } else {
            down += n as u64;
        }
    }
}
