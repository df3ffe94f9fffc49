//! Session shards: `session_threads` single-threaded tokio runtimes, each
//! accepting on its own `SO_REUSEPORT` listener of every PostgreSQL, MySQL
//! and Redis route, so a session — accept, attestation, admission, audit
//! record, pooled upstream checkout, relay, reset — runs on one thread from
//! its first byte to its last, with no wake-up of another runtime thread
//! (measured: a multi-threaded runtime's work-stealing wake-ups cost about a
//! fifth of a `pgbench -C` session's CPU). The kernel spreads new
//! connections over the listeners. A pooled upstream connection taken on
//! another shard than the one it was registered on is moved to the taking
//! shard's runtime ([`adopt`]).
//!
//! `SO_REUSEPORT` groups only sockets of the same effective uid, so another
//! user cannot join warden's listeners.

use crate::error::{Error, Result};
use crate::pgwire::upstream::UpstreamStream;
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread serves (0 outside the shards).
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// The running shards.
pub struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Shards {
    /// Starts `n` shard threads (at least one).
    pub fn start(n: usize) -> Result<Shards> {
        let mut shards = Shards {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("warden-shard-{i}"))
                .spawn(move || {
                    SHARD.with(|s| s.set(i));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                })
                .map_err(|e| Error::internal(format!("cannot start a session thread: {e}")))?;
            let handle = ready_rx
                .recv()
                .map_err(|_| Error::internal("a session thread exited at start"))?
                .map_err(|e| Error::internal(format!("cannot start a session runtime: {e}")))?;
            shards.handles.push(handle);
            shards.stops.push(stop_tx);
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime of shard `i`.
    pub fn handle(&self, i: usize) -> &tokio::runtime::Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Stops every shard (their sessions end) and waits for the threads.
    pub fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// `n` listening sockets on `addr` sharing it through `SO_REUSEPORT` (the
/// first one binds the address, port 0 included; the others join it).
pub fn reuseport_listeners(
    addr: SocketAddr,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n.max(1));
    let mut bound = addr;
    for _ in 0..n.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(bound),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        // Accepted connections inherit it: no setsockopt per connection.
        socket.set_tcp_nodelay(true)?;
        socket.bind(&bound.into())?;
        socket.listen(crate::listen::listen_backlog() as i32)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// A pooled connection registered with another shard's runtime, moved to
/// the calling one's (its readiness then wakes this thread, not the other
/// shard's); None when the socket cannot be moved (it is dropped). A TLS
/// stream stays where it is: its wake-ups cross threads, which works as
/// long as the other shard runs.
pub fn adopt(stream: UpstreamStream) -> Option<UpstreamStream> {
    match stream {
        UpstreamStream::Plain(tcp) => {
            let std = tcp.into_std().ok()?;
            tokio::net::TcpStream::from_std(std)
                .ok()
                .map(UpstreamStream::Plain)
        }
        tls => Some(tls),
    }
}

/// Takes from a pool's `idle` list (oldest first) the most recently used
/// entry that is `wanted`, this shard's own before another's
/// (`shard_of`). An entry `usable` rejects (timed out, dead) goes to
/// `dropped` and the search goes on; the one found becomes a connection
/// through `into_conn`, told whether it comes from another shard (its
/// socket is then to be [`adopt`]ed; `None` drops it and goes on).
pub fn take_idle<T, C>(
    idle: &mut Vec<T>,
    wanted: impl Fn(&T) -> bool,
    shard_of: impl Fn(&T) -> usize,
    usable: impl Fn(&T) -> bool,
    dropped: &mut Vec<T>,
    into_conn: impl Fn(T, bool) -> Option<C>,
) -> Option<C> {
    let here = current();
    loop {
        let pos = idle
            .iter()
            .rposition(|i| wanted(i) && shard_of(i) == here)
            .or_else(|| idle.iter().rposition(&wanted))?;
        let i = idle.remove(pos);
        if !usable(&i) {
            dropped.push(i);
            continue;
        }
        let moved = shard_of(&i) != here;
        if let Some(conn) = into_conn(i, moved) {
            return Some(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_entries_are_taken_newest_first_this_shards_own_first() {
        // (key, shard, usable)
        let mut idle = vec![
            ("a", 1, true),
            ("a", 0, true),
            ("a", 1, true),
            ("b", 0, true),
        ];
        let mut dropped = Vec::new();
        let take = |idle: &mut Vec<(&'static str, usize, bool)>,
                    dropped: &mut Vec<(&'static str, usize, bool)>| {
            take_idle(
                idle,
                |i| i.0 == "a",
                |i| i.1,
                |i| i.2,
                dropped,
                |i, moved| Some((i, moved)),
            )
        };
        // This thread is shard 0: its own "a" first, though older.
        assert_eq!(take(&mut idle, &mut dropped), Some((("a", 0, true), false)));
        // Then the newest of another shard's, to be moved.
        assert_eq!(take(&mut idle, &mut dropped), Some((("a", 1, true), true)));
        // An unusable entry is dropped on the way.
        idle.insert(0, ("a", 0, false));
        assert_eq!(take(&mut idle, &mut dropped), Some((("a", 1, true), true)));
        assert_eq!(dropped, vec![("a", 0, false)]);
        assert_eq!(take(&mut idle, &mut dropped), None);
        assert_eq!(idle, vec![("b", 0, true)]);
    }

    #[test]
    fn shard_listeners_share_the_port_and_hand_out_nodelay_sockets() {
        let ls = reuseport_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = ls[0].local_addr().unwrap();
        assert_eq!(ls[1].local_addr().unwrap(), addr);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        // Either listener may take it.
        let accepted = loop {
            if let Some(s) = ls.iter().find_map(|l| l.accept().ok()) {
                break s.0;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(accepted.nodelay().unwrap());
    }
}
