//! The kernel relay: two TCP sockets spliced so the bytes each receives are
//! sent out on the other by `warden_relay` (an `sk_skb` stream verdict on
//! `RELAY_SOCKS`), never reaching user space.
//!
//! [`KernelRelay::splice`] enters a pair; the [`Spliced`] it returns
//! reads the kernel's byte counts and takes the pair out when dropped.
//! User space keeps watching the sockets for their end (a FIN or an error
//! still wakes it: only the data path is replaced) and closes both.
//!
//! Ordering matters, and the caller has to provide a quiet moment: the
//! first socket entered is redirected to a peer that is not in the map yet
//! (its bytes would be dropped) for the instant before the second is
//! entered, and bytes that arrived before a socket was entered stay in its
//! receive queue for user space. See `proxy/src/pg/relay.rs` for how a
//! PostgreSQL session finds that moment.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkMsg;
use aya::programs::SkSkb;
use aya::Ebpf;
use warden_ebpf_common::{DirectPeer, RelayPeer, SockPair};

use crate::events::sock_key_of;

/// `SO_COOKIE` (asm-generic/socket.h): the socket's 64-bit cookie, the key
/// the kernel program sees through `bpf_get_socket_cookie`.
const SO_COOKIE: libc::c_int = 57;

/// The loaded relay programs and their maps.
pub struct KernelRelay {
    socks: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, RelayPeer>>,
    /// The direct relay (`warden_direct`), or why it could not be loaded.
    direct: Result<Direct, String>,
}

struct Direct {
    // Owns the map the program is attached to.
    _socks: SockHash<MapData, SockPair>,
    members: HashMap<MapData, SockPair, u8>,
    peers: Mutex<HashMap<MapData, SockPair, DirectPeer>>,
}

/// A client connection and an upstream connection (both ends on this host)
/// relayed socket to socket by `warden_direct` until this is dropped.
pub struct DirectSpliced {
    relay: Arc<KernelRelay>,
    client: SockPair,
    upstream: SockPair,
}

/// A pair of sockets relayed by the kernel until this is dropped.
pub struct Spliced {
    relay: Arc<KernelRelay>,
    first: u64,
    second: u64,
}

fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given, and
    // `fd` is a live descriptor for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Bytes in a socket's receive queue not yet read (`SIOCINQ`).
fn queued(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer; `fd` is live.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Why [`KernelRelay::splice`] did not splice.
#[derive(Debug)]
pub enum SpliceError {
    /// A receive queue holds bytes user space has not read: not a quiet
    /// moment (nothing was changed; try at a later one).
    Busy,
    /// Bytes reached `first` while it was being entered and are held in
    /// its receive queue: the pair is spliced, but those bytes move only
    /// when more arrive. A sender waiting for an answer would wait for
    /// ever, so the caller should end the session.
    Held(Spliced),
    /// As `Held`, for [`KernelRelay::splice_direct`].
    HeldDirect(DirectSpliced),
    /// The kernel refused (map full, socket state, ...).
    Failed(io::Error),
}

impl std::fmt::Display for SpliceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpliceError::Busy => f.write_str("unread bytes in a receive queue"),
            SpliceError::Held(_) | SpliceError::HeldDirect(_) => {
                f.write_str("bytes arrived during the hand-over")
            }
            SpliceError::Failed(e) => write!(f, "{e}"),
        }
    }
}

fn map_error(what: &str, e: aya::maps::MapError) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl KernelRelay {
    /// Loads `warden_relay` from `ebpf` and attaches it to `RELAY_SOCKS`.
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<KernelRelay, String> {
        let socks: SockHash<MapData, u64> = SockHash::try_from(
            ebpf.take_map("RELAY_SOCKS")
                .ok_or("map RELAY_SOCKS missing")?,
        )
        .map_err(|e| format!("RELAY_SOCKS: {e}"))?;
        let peers: HashMap<MapData, u64, RelayPeer> = HashMap::try_from(
            ebpf.take_map("RELAY_PEERS")
                .ok_or("map RELAY_PEERS missing")?,
        )
        .map_err(|e| format!("RELAY_PEERS: {e}"))?;
        let program: &mut SkSkb = ebpf
            .program_mut("warden_relay")
            .ok_or("program warden_relay missing")?
            .try_into()
            .map_err(|e| format!("warden_relay: {e}"))?;
        program
            .load()
            .map_err(|e| format!("loading warden_relay: {e}"))?;
        // The attachment lives as long as the program (owned by the monitor).
        program
            .attach(socks.fd())
            .map_err(|e| format!("attaching warden_relay to RELAY_SOCKS: {e}"))?;
        let direct = Direct::load(ebpf);
        Ok(KernelRelay {
            socks: Mutex::new(socks),
            peers: Mutex::new(peers),
            direct,
        })
    }

    /// Why the direct relay is not available, if it is not.
    pub fn direct_unavailable(&self) -> Option<&str> {
        self.direct.as_ref().err().map(String::as_str)
    }

    /// Splices the far ends of two connections warden holds: from now on
    /// what the client (the peer of `client_side`) sends goes straight into
    /// the receive queue of the upstream's socket (the peer of
    /// `upstream_side`, which must be on this host) and back, while
    /// `client_side` and `upstream_side` stay ordinary sockets that see
    /// nothing but the connections' ends. Undone by dropping the result.
    ///
    /// The same quiet moment as [`KernelRelay::splice`] is needed: both
    /// receive queues empty, the client waiting for an answer warden holds.
    /// A byte that reached `client_side` during the hand-over (it would
    /// reach the upstream behind what the client sends next) gives
    /// [`SpliceError::HeldDirect`].
    pub fn splice_direct(
        self: &Arc<Self>,
        client_side: &tokio::net::TcpStream,
        upstream_side: &tokio::net::TcpStream,
    ) -> Result<DirectSpliced, SpliceError> {
        let failed = SpliceError::Failed;
        let direct = self
            .direct
            .as_ref()
            .map_err(|e| failed(io::Error::other(e.clone())))?;
        let pair = |s: &tokio::net::TcpStream| -> io::Result<SockPair> {
            // The far end's view: its local address is our peer address.
            Ok(SockPair {
                local: sock_key_of(s.peer_addr()?),
                remote: sock_key_of(s.local_addr()?),
            })
        };
        let client = pair(client_side).map_err(failed)?;
        let upstream = pair(upstream_side).map_err(failed)?;
        if queued(client_side.as_fd()).map_err(failed)? > 0
            || queued(upstream_side.as_fd()).map_err(failed)? > 0
        {
            return Err(SpliceError::Busy);
        }
        // Both far ends must be in the map (entered by sock_ops when their
        // connections were established; `DIRECT_MEMBERS` says which are,
        // since a sockhash cannot be read from user space).
        for key in [&client, &upstream] {
            if direct.members.get(key, 0).is_err() {
                return Err(failed(io::Error::other(
                    "a far end is not in the direct relay's map (not on this host, or not a relay route's)",
                )));
            }
        }
        let spliced = DirectSpliced {
            relay: self.clone(),
            client,
            upstream,
        };
        let mut peers = direct
            .peers
            .lock()
            .map_err(|_| failed(io::Error::other("poisoned")))?;
        let entry = |peer| DirectPeer { peer, bytes: 0 };
        // The upstream first: the client is the silent side.
        peers
            .insert(upstream, entry(client), 0)
            .map_err(|e| failed(map_error("DIRECT_PEERS", e)))?;
        peers
            .insert(client, entry(upstream), 0)
            .map_err(|e| failed(map_error("DIRECT_PEERS", e)))?;
        drop(peers);
        if queued(client_side.as_fd()).map_err(failed)? > 0 {
            return Err(SpliceError::HeldDirect(spliced));
        }
        Ok(spliced)
    }

    /// Splices `first` and `second` (connected TCP sockets): from now on
    /// the bytes each receives are sent out on the other, until both are
    /// closed (a splice is for the rest of the connections' lives: taking a
    /// socket out of the map does not give its bytes back to user space).
    ///
    /// Both receive queues must be empty, and `first` must be the side
    /// that cannot send now (it waits for an answer user space holds):
    /// bytes it sent before the second socket is entered would be dropped.
    /// Bytes `second` receives before it is entered are delivered when
    /// more arrive.
    pub fn splice(
        self: &Arc<Self>,
        first: BorrowedFd<'_>,
        second: BorrowedFd<'_>,
    ) -> Result<Spliced, SpliceError> {
        let failed = SpliceError::Failed;
        if queued(first).map_err(failed)? > 0 || queued(second).map_err(failed)? > 0 {
            return Err(SpliceError::Busy);
        }
        let spliced = self.enter(first, second).map_err(failed)?;
        // Bytes that came in while `first` was entered, before its verdict
        // was in place, stay queued. A look a few times over: bytes being
        // redirected right now leave the queue within microseconds.
        for _ in 0..4 {
            if queued(first).map_err(failed)? == 0 {
                return Ok(spliced);
            }
            std::thread::yield_now();
        }
        Err(SpliceError::Held(spliced))
    }

    fn enter(
        self: &Arc<Self>,
        first: BorrowedFd<'_>,
        second: BorrowedFd<'_>,
    ) -> io::Result<Spliced> {
        let (a, b) = (cookie(first)?, cookie(second)?);
        let spliced = Spliced {
            relay: self.clone(),
            first: a,
            second: b,
        };
        {
            let mut peers = self
                .peers
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            let entry = |peer_cookie| RelayPeer {
                peer_cookie,
                bytes: 0,
            };
            peers
                .insert(a, entry(b), 0)
                .map_err(|e| map_error("RELAY_PEERS", e))?;
            peers
                .insert(b, entry(a), 0)
                .map_err(|e| map_error("RELAY_PEERS", e))?;
        }
        let mut socks = self
            .socks
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        // On an error `spliced` is dropped, which removes what went in.
        socks
            .insert(a, first, 0)
            .map_err(|e| map_error("RELAY_SOCKS", e))?;
        socks
            .insert(b, second, 0)
            .map_err(|e| map_error("RELAY_SOCKS", e))?;
        drop(socks);
        Ok(spliced)
    }
}

impl Direct {
    fn load(ebpf: &mut Ebpf) -> Result<Direct, String> {
        let socks: SockHash<MapData, SockPair> = SockHash::try_from(
            ebpf.take_map("DIRECT_SOCKS")
                .ok_or("map DIRECT_SOCKS missing")?,
        )
        .map_err(|e| format!("DIRECT_SOCKS: {e}"))?;
        let peers: HashMap<MapData, SockPair, DirectPeer> = HashMap::try_from(
            ebpf.take_map("DIRECT_PEERS")
                .ok_or("map DIRECT_PEERS missing")?,
        )
        .map_err(|e| format!("DIRECT_PEERS: {e}"))?;
        let program: &mut SkMsg = ebpf
            .program_mut("warden_direct")
            .ok_or("program warden_direct missing")?
            .try_into()
            .map_err(|e| format!("warden_direct: {e}"))?;
        program
            .load()
            .map_err(|e| format!("loading warden_direct: {e}"))?;
        program
            .attach(socks.fd())
            .map_err(|e| format!("attaching warden_direct to DIRECT_SOCKS: {e}"))?;
        let members: HashMap<MapData, SockPair, u8> = HashMap::try_from(
            ebpf.take_map("DIRECT_MEMBERS")
                .ok_or("map DIRECT_MEMBERS missing")?,
        )
        .map_err(|e| format!("DIRECT_MEMBERS: {e}"))?;
        Ok(Direct {
            _socks: socks,
            members,
            peers: Mutex::new(peers),
        })
    }
}

impl std::fmt::Debug for DirectSpliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectSpliced").finish_non_exhaustive()
    }
}

impl DirectSpliced {
    /// Bytes relayed so far: sent by the client, sent by the upstream.
    pub fn bytes(&self) -> (u64, u64) {
        let Ok(direct) = self.relay.direct.as_ref() else {
            return (0, 0);
        };
        let Ok(peers) = direct.peers.lock() else {
            return (0, 0);
        };
        let get = |k: &SockPair| peers.get(k, 0).map(|p| p.bytes).unwrap_or(0);
        (get(&self.client), get(&self.upstream))
    }
}

impl Drop for DirectSpliced {
    fn drop(&mut self) {
        if let Ok(direct) = self.relay.direct.as_ref() {
            if let Ok(mut peers) = direct.peers.lock() {
                let _ = peers.remove(&self.client);
                let _ = peers.remove(&self.upstream);
            }
        }
    }
}

impl std::fmt::Debug for Spliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spliced")
            .field("first", &self.first)
            .field("second", &self.second)
            .finish()
    }
}

impl Spliced {
    /// Bytes the kernel relayed so far: received on the first socket (sent
    /// on the second), and received on the second.
    pub fn bytes(&self) -> (u64, u64) {
        let Ok(peers) = self.relay.peers.lock() else {
            return (0, 0);
        };
        let get = |k: u64| peers.get(&k, 0).map(|p| p.bytes).unwrap_or(0);
        (get(self.first), get(self.second))
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if let Ok(mut socks) = self.relay.socks.lock() {
            let _ = socks.remove(&self.first);
            let _ = socks.remove(&self.second);
        }
        if let Ok(mut peers) = self.relay.peers.lock() {
            let _ = peers.remove(&self.first);
            let _ = peers.remove(&self.second);
        }
    }
}

/// Watches a spliced pair for its end without being woken by its data.
///
/// Every byte the kernel relays still wakes the socket's `EPOLLIN`
/// waiters, so a spliced socket must not stay registered for readability
/// (in tokio's reactor, say: hand it over with `into_std` first). This is
/// an epoll instance of its own with both sockets registered for
/// `EPOLLRDHUP` only (`EPOLLHUP`/`EPOLLERR` are always reported); its own
/// descriptor becomes readable when either socket ends, so it can be
/// awaited ([`EndWatch::wait`], through tokio's `AsyncFd`).
pub struct EndWatch {
    epoll: tokio::io::unix::AsyncFd<OwnedFd>,
}

/// Which sockets of an [`EndWatch`] have ended (peer closed, reset, error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    pub first: bool,
    pub second: bool,
}

impl EndWatch {
    pub fn new(first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> io::Result<EndWatch> {
        // SAFETY: no pointer arguments.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned here only.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for (token, sock) in [(0u64, first), (1u64, second)] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLRDHUP as u32,
                u64: token,
            };
            // SAFETY: both descriptors are live; `ev` is a valid event.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    sock.as_raw_fd(),
                    &mut ev,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the descriptor it registers, so the
        // descriptor outlives its registration.
        let epoll = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(EndWatch { epoll })
    }

    /// Waits until either socket ends (from a tokio runtime).
    pub async fn wait(&self) -> io::Result<Ended> {
        loop {
            let mut guard = self.epoll.readable().await?;
            if let Some(which) = self.ended()? {
                return Ok(which);
            }
            guard.clear_ready();
        }
    }

    /// Which sockets ended, without waiting; `None` when neither has.
    pub fn ended(&self) -> io::Result<Option<Ended>> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        // SAFETY: `events` holds 2 entries, as passed.
        let n = unsafe {
            libc::epoll_wait(self.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), 2, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        let mut out = Ended::default();
        for ev in &events[..usize::try_from(n).unwrap_or(0)] {
            match ev.u64 {
                0 => out.first = true,
                _ => out.second = true,
            }
        }
        Ok((out.first || out.second).then_some(out))
    }
}
