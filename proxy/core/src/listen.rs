//! Route listeners every front end shares: binding with an error that names
//! the route and the fix, and the accept loop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::metrics::Metrics;

/// The start-up error for a route whose address cannot be bound.
pub fn bind_error(route: &str, addr: SocketAddr, e: &std::io::Error) -> Error {
    Error::usage(format!(
        "route {route:?}: cannot listen on {addr}: {e}; fix: choose a free address in route.listen"
    ))
}

/// Binds route `route`'s TCP listener (so a busy port fails the start),
/// with the backlog [`listen_backlog`] gives.
pub async fn bind_route(
    route: &str,
    addr: SocketAddr,
) -> crate::error::Result<tokio::net::TcpListener> {
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        // Accepted connections inherit it: no setsockopt per connection.
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(listen_backlog())
    };
    bind().map_err(|e| bind_error(route, addr, &e))
}

/// The listen backlog of route listeners: the kernel's
/// `net.core.somaxconn` (it caps any larger value anyway; Debian 12's
/// default is 4096), at least 128 and at most 65535.
pub fn listen_backlog() -> u32 {
    static BACKLOG: OnceLock<u32> = OnceLock::new();
    *BACKLOG.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(4096)
            .clamp(128, 65535)
    })
}

/// The soft `RLIMIT_NOFILE` (read once, after the daemon raised it).
fn fd_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX)
    })
}

/// Descriptors kept free for everything but new client connections
/// (upstream connections, the store, the audit log, the admin socket).
pub fn fd_reserve(limit: u64) -> u64 {
    (limit / 16).max(32)
}

/// True when an accepted connection's descriptor number leaves less than
/// the reserve below the soft limit. The kernel hands out the lowest free
/// number, so every lower one is open: a cheap, exact lower bound on the
/// process's open descriptors.
pub fn over_fd_budget(fd: i32, limit: u64) -> bool {
    let fd = u64::try_from(fd).unwrap_or(0);
    fd.saturating_add(fd_reserve(limit)) >= limit
}

/// [`over_fd_budget`] against the process's soft limit: the cheap check
/// before building a [`Shed`].
pub fn over_fd_budget_now(fd: i32) -> bool {
    over_fd_budget(fd, fd_limit())
}

/// How a route kind turns away a connection it sheds (too close to the
/// descriptor limit).
#[derive(Clone, Default)]
pub struct Shed {
    /// Written to the connection before it is closed: the kind's native
    /// "too many connections" error (empty: closed without a word, e.g.
    /// a TLS route, which cannot speak before a handshake).
    pub refusal: Vec<u8>,
    /// Counts the shed connection (`warden_sessions_total{result="overloaded"}`).
    pub metrics: Option<Metrics>,
}

/// Checks an accepted connection against the descriptor budget; when over
/// it, answers with `shed.refusal`, closes it, counts and (at most every
/// 10 s) logs it, and returns true.
/// `fd` is the accepted connection's descriptor, `try_write` one
/// non-blocking write to it (a fresh socket's send buffer is empty).
pub fn shed_if_overloaded(
    route: &str,
    fd: i32,
    try_write: impl FnOnce(&[u8]),
    shed: &Shed,
) -> bool {
    let limit = fd_limit();
    if !over_fd_budget(fd, limit) {
        return false;
    }
    // A connection that has sent nothing for a while makes room first —
    // for this connection within the first half of the reserve only: an
    // evicted connection frees its descriptor when its task next runs, so a
    // burst of accepts must not outrun the closes. Past that, this
    // connection is shed but still makes room for the next one (the kernel
    // hands out the lowest free number): otherwise new connections that
    // took the first half and stay silent would keep every later one in
    // the second half, where nothing is evicted.
    let fd_u = u64::try_from(fd).unwrap_or(0);
    let evicted = evict_oldest_waiting();
    if evicted && fd_u.saturating_add(fd_reserve(limit) / 2) < limit {
        return false;
    }
    if !shed.refusal.is_empty() {
        try_write(&shed.refusal);
    }
    if let Some(m) = &shed.metrics {
        m.session_unattested(route, "overloaded");
    }
    static LAST_WARN: AtomicU64 = AtomicU64::new(0);
    if once_in_10s(&LAST_WARN) {
        tracing::warn!(
            route = %route,
            "shedding new connections: {} of {limit} file descriptors in use (kept free: {}); raise LimitNOFILE= / ulimit -n",
            fd + 1,
            fd_reserve(limit)
        );
    }
    true
}

/// True at most once every 10 s per `last` (the second it was last true).
fn once_in_10s(last: &AtomicU64) -> bool {
    let now = crate::peer::boottime_ns() / 1_000_000_000;
    let then = last.load(Ordering::Relaxed);
    now >= then + 10
        && last
            .compare_exchange(then, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// True when an accepted connection's descriptor number is past half the
/// soft limit: descriptors are getting scarce, and a connection should hold
/// no more of them than it must until its client speaks (and may be
/// evicted while silent, see [`Waiting`]).
pub fn descriptors_scarce(fd: i32) -> bool {
    u64::try_from(fd).unwrap_or(0).saturating_mul(2) >= fd_limit()
}

/// Least time a connection must have sent nothing before it may be closed
/// to make room for a new one.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// Connections that have sent nothing yet, registered while descriptors
/// are scarce, by registration order (oldest first).
static WAITING: Mutex<BTreeMap<u64, (Instant, Arc<tokio::sync::Notify>)>> =
    Mutex::new(BTreeMap::new());
static WAITING_NEXT: AtomicU64 = AtomicU64::new(0);

/// A client connection waiting for its first message (a PostgreSQL startup
/// packet, an HTTP request, a Redis command, a TLS ClientHello, a MySQL
/// handshake response) while the process is past half its descriptor
/// limit. Near the limit, the connection that has waited longest (at least
/// [`EVICT_AFTER`]) is told to go ([`Waiting::evicted`]) so that a new
/// client is served instead of shed: idle connections cannot crowd out a
/// client that speaks at once. Dropping it unregisters.
pub struct Waiting {
    id: u64,
    notify: Arc<tokio::sync::Notify>,
}

impl Waiting {
    /// Registers the connection with descriptor `fd` when descriptors are
    /// scarce (its number is past half the limit); None otherwise, so a
    /// normal session pays nothing.
    pub fn register(fd: i32) -> Option<Waiting> {
        if !descriptors_scarce(fd) {
            return None;
        }
        let id = WAITING_NEXT.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(tokio::sync::Notify::new());
        waiting_lock().insert(id, (Instant::now(), notify.clone()));
        Some(Waiting { id, notify })
    }

    /// Completes when the connection was chosen to make room.
    pub async fn evicted(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        waiting_lock().remove(&self.id);
    }
}

fn waiting_lock(
) -> std::sync::MutexGuard<'static, BTreeMap<u64, (Instant, Arc<tokio::sync::Notify>)>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tells the longest-waiting silent connection (silent for at least
/// [`EVICT_AFTER`]) to go; true if there was one.
pub fn evict_oldest_waiting() -> bool {
    let mut w = waiting_lock();
    let Some((&id, (since, _))) = w.iter().next() else {
        return false;
    };
    if since.elapsed() < EVICT_AFTER {
        return false;
    }
    if let Some((_, notify)) = w.remove(&id) {
        notify.notify_one();
    }
    true
}

/// Runs `f` (reading a client's first message) unless `waiting` is chosen
/// to make room first: None then.
pub async fn unless_evicted<F: std::future::Future>(
    waiting: Option<&Waiting>,
    f: F,
) -> Option<F::Output> {
    match waiting {
        None => Some(f.await),
        Some(w) => tokio::select! {
            out = f => Some(out),
            () = w.evicted() => None,
        },
    }
}

/// How a client's wait for its first bytes ended ([`first_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// Bytes (or the end of the connection) arrived — or descriptors are
    /// plentiful and nothing was waited for: read on.
    Ready,
    /// Chosen to make room for a new client ([`evict_oldest_waiting`]):
    /// answer with the kind's "too many connections" error, count it
    /// ([`note_evicted`]) and close.
    Evicted,
    /// Nothing arrived within the caller's patience.
    Silent,
}

/// For a connection whose client must speak next (its first request, a
/// TLS ClientHello, a MySQL handshake response after warden's greeting):
/// when descriptors are scarce (see [`Waiting::register`]), waits until it
/// has bytes to read or has ended ([`arrived`]) — at most `patience`, if
/// given — and may be evicted
/// meanwhile to make room for a new client; otherwise returns
/// [`FirstBytes::Ready`] at once, so a normal connection pays nothing.
/// Reads nothing: the caller's own read (hyper, rustls, a relay) gets every
/// byte.
pub async fn first_bytes(stream: &tokio::net::TcpStream, patience: Option<Duration>) -> FirstBytes {
    let Some(waiting) = Waiting::register(stream.as_raw_fd()) else {
        return FirstBytes::Ready;
    };
    let wait = unless_evicted(Some(&waiting), arrived(stream));
    let waited = match patience {
        Some(p) => tokio::time::timeout(p, wait).await.ok(),
        None => Some(wait.await),
    };
    match waited {
        None => FirstBytes::Silent,
        Some(None) => FirstBytes::Evicted,
        Some(Some(_)) => FirstBytes::Ready,
    }
}

/// Completes once `stream` has bytes to read, has ended or failed; reads
/// nothing. (A peek, not `readable()`: that can report a fresh socket
/// readable before any byte came.)
pub async fn arrived(stream: &tokio::net::TcpStream) {
    let _ = stream.peek(&mut [0u8; 1]).await;
}

/// The message of a connection evicted to make room: `what` names what the
/// client never sent (e.g. "startup packet").
pub fn evicted_message(what: &str) -> String {
    format!(
        "warden: too many connections: this connection sent no {what} for {} s and was closed to make room for a new client",
        EVICT_AFTER.as_secs()
    )
}

/// Counts a connection evicted to make room
/// (`warden_sessions_total{result="evicted"}`) and, at most every 10 s,
/// logs it with the limit — as [`shed_if_overloaded`] does a shed one.
pub fn note_evicted(route: &str, metrics: &Metrics) {
    metrics.session_unattested(route, "evicted");
    static LAST_WARN: AtomicU64 = AtomicU64::new(0);
    if once_in_10s(&LAST_WARN) {
        tracing::warn!(
            route = %route,
            "closing silent client connections to make room for new ones: close to the limit of {} open files; raise LimitNOFILE= / ulimit -n",
            fd_limit()
        );
    }
}

/// The native refusal of an overloaded listener, worded the same for
/// every kind.
pub fn overload_message() -> String {
    format!(
        "warden: too many connections (close to the limit of {} open files); try again later",
        fd_limit()
    )
}

/// Accepts connections on `tcp` until the task is dropped, handing each
/// (with `TCP_NODELAY`, inherited from a [`bind_route`] listener) to `serve` with its local and peer address. A
/// failed accept (e.g. out of descriptors) is logged and retried shortly.
pub async fn accept_loop(
    route: &str,
    listen: SocketAddr,
    tcp: &tokio::net::TcpListener,
    serve: impl FnMut(tokio::net::TcpStream, SocketAddr, SocketAddr),
) {
    accept_loop_shedding(route, listen, tcp, &Shed::default(), serve).await
}

/// [`accept_loop`] answering connections over the descriptor budget with
/// `shed` (see [`shed_if_overloaded`]).
pub async fn accept_loop_shedding(
    route: &str,
    listen: SocketAddr,
    tcp: &tokio::net::TcpListener,
    shed: &Shed,
    mut serve: impl FnMut(tokio::net::TcpStream, SocketAddr, SocketAddr),
) {
    loop {
        match tcp.accept().await {
            Ok((stream, peer)) => {
                let fd = stream.as_raw_fd();
                if shed_if_overloaded(route, fd, |b| drop(stream.try_write(b)), shed) {
                    continue;
                }
                let local = local_addr_of(&stream, listen);
                serve(stream, local, peer);
            }
            Err(e) => {
                tracing::warn!(route = %route, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The local address of an accepted connection: the listener's own when it
/// is bound to one address and port (no `getsockname` per connection),
/// otherwise asked of the socket (a wildcard or port 0 listener).
pub fn local_addr_of(stream: &tokio::net::TcpStream, listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() || listen.port() == 0 {
        stream.local_addr().unwrap_or(listen)
    } else {
        listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_budget_keeps_a_reserve() {
        assert_eq!(fd_reserve(1024), 64);
        assert_eq!(fd_reserve(100), 32);
        assert!(!over_fd_budget(900, 1024));
        assert!(over_fd_budget(960, 1024));
        assert!(over_fd_budget(1023, 1024));
        assert!(!over_fd_budget(1_000_000, u64::MAX));
        assert!((128..=65535).contains(&listen_backlog()));
    }

    #[test]
    fn evictions_are_worded_and_logged_sparingly() {
        let m = evicted_message("command");
        assert!(
            m.starts_with("warden: too many connections: this connection sent no command for 1 s")
                && m.ends_with("closed to make room for a new client"),
            "{m}"
        );
        let last = AtomicU64::new(0);
        assert!(once_in_10s(&last));
        assert!(!once_in_10s(&last));
    }

    #[tokio::test]
    async fn with_descriptors_plentiful_nothing_waits_for_first_bytes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        // A silent client: not waited for, so not evictable.
        assert!(!descriptors_scarce(s.as_raw_fd()));
        assert_eq!(first_bytes(&s, None).await, FirstBytes::Ready);
    }

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let l = bind_route("orders", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(s.nodelay().unwrap());
        assert!(!c.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_busy_port_names_the_route_and_the_fix() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind_route("orders", addr).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("route \"orders\": cannot listen on"), "{msg}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(
            msg.contains("fix: choose a free address in route.listen"),
            "{msg}"
        );
        assert!(bind_route("orders", "127.0.0.1:0".parse().unwrap())
            .await
            .is_ok());
    }
}
