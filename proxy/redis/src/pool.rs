//! Authenticated upstream connections kept between clients (`route.pool`,
//! on by default): the next admitted client of the route whose secret
//! version is the one an idle connection logged in with gets that
//! connection, and skips the server's TCP and TLS handshake and `AUTH`.
//!
//! A connection comes back only when its client left at a command
//! boundary: every command answered (nothing pending, not blocked), no
//! partial reply read. Subscribed, `MONITOR` and `CLIENT REPLY` connections
//! come back too, because `RESET` ends those modes. Before anyone else gets
//! it, warden resets it in one round trip ([`reset`]): `RESET` (Redis 6.2
//! and later: discards `MULTI` and `WATCH`, unsubscribes, leaves `MONITOR`,
//! turns off `CLIENT TRACKING` and `CLIENT REPLY OFF|SKIP`, clears the
//! client name, selects database 0, returns to RESP2 — and logs the
//! connection out to the `default` user) pipelined with warden's own
//! `AUTH`. The answers must be `+RESET` then `+OK`; before `+RESET` only
//! push frames (and, on a connection its client left unsynchronised,
//! pub/sub or `MONITOR` traffic) are skipped. Anything else — an error (a
//! server older than 6.2 answers `-ERR unknown command`), a timeout, an
//! unexpected frame, bytes after `+OK` — closes the connection instead.
//!
//! With `pool.reset = "auto"` (the default) a session that sent only
//! commands that leave no state on the connection
//! ([`crate::relay::leaves_no_state`]: data commands, `PING`, a closed
//! `MULTI` … `EXEC`) and left no `MULTI` open is not reset at all: its
//! connection is already as warden's login left it (counted as
//! `reset_skipped`). `reset = "always"` resets after every session.
//!
//! Every pooled connection is therefore in the state of a fresh login
//! (RESP2, database 0, no name), so the pool key is only the credential
//! label (secret name and version): a client that wants RESP3 or another
//! database sends its own `HELLO 3` / `SELECT`, as it would on a fresh
//! connection. A label other than the last one seen in its family means a
//! new secret version (`secret vN`), or on a dynamic route a workload's new
//! lease (`lease workload id`, one family per workload): the older one's
//! idle connections are closed, and one coming back after that is closed
//! too. A revoked lease's connections never come back (the session closes
//! them), and those idle at revocation were ended by the server.

use crate::resp::{encode_command, ReplyScanner};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warden_core::config::{PoolReset, PoolSettings};
use warden_core::metrics::{Metrics, PoolHandles};
use warden_core::pgwire::upstream::UpstreamStream;
use zeroize::Zeroizing;

/// Longest a reset may take before the connection is closed instead.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames a reset skips at most before `+RESET` (pushes, pub/sub traffic
/// a client left behind) before it gives up on the connection.
const MAX_SKIPPED: usize = 4096;
/// Bytes a reset reads at most.
const MAX_READ: usize = 16 * 1024 * 1024;

/// An authenticated connection at a command boundary.
pub struct Conn {
    pub stream: UpstreamStream,
    pub born: Instant,
}

/// How warden logs in (the password is the caller's, zeroized there).
pub struct Login<'a> {
    /// ACL user; empty for `AUTH password`.
    pub user: &'a str,
    pub password: &'a [u8],
}

/// Where the connection stood when its client left.
#[derive(Clone, Copy, Debug, Default)]
pub struct Leftover {
    /// Replies no longer matched commands (RESP2 pub/sub, `MONITOR`,
    /// `CLIENT REPLY`): frames of any kind may precede `+RESET`.
    pub unsync: bool,
    /// The session left the connection as warden's login did (the relay's
    /// [`crate::relay::Outcome::state_free`]).
    pub state_free: bool,
}

struct Idle {
    label: String,
    conn: Conn,
    since: Instant,
    /// The session shard whose runtime the socket is registered with
    /// ([`warden_core::shard::current`] when it was put back).
    shard: usize,
}

struct RoutePool {
    /// Oldest first.
    idle: Vec<Idle>,
    /// Per label family ([`family`]), the label sessions use now: a secret
    /// version, or a workload's lease (older ones' connections are closed).
    current: HashMap<String, String>,
    metrics: Arc<PoolHandles>,
}

/// Every redis route's idle connections.
pub struct Pool {
    routes: Mutex<HashMap<String, RoutePool>>,
    metrics: Metrics,
}

/// What a label supersedes within: everything before its last word —
/// the secret of `secret vN`, the workload of `lease workload id`.
fn family(label: &str) -> &str {
    label.rsplit_once(' ').map_or(label, |(f, _)| f)
}

/// The socket has nothing to read and is not at EOF.
fn alive(stream: &UpstreamStream) -> bool {
    let mut b = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut b);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    stream.tcp().poll_peek(&mut cx, &mut buf).is_pending()
}

/// Closes a connection off the caller's path (`QUIT`, then close).
pub fn close(mut stream: UpstreamStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut quit = Vec::with_capacity(16);
            encode_command(&mut quit, [&b"QUIT"[..]].into_iter());
            stream.write_all(&quit).await?;
            stream.shutdown().await
        })
        .await;
    });
}

impl Pool {
    pub fn new(metrics: Metrics) -> Pool {
        Pool {
            routes: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn with_route<T>(&self, route: &str, f: impl FnOnce(&mut RoutePool) -> T) -> Option<T> {
        let mut map = self.routes.lock().ok()?;
        let rp = map.entry(route.to_string()).or_insert_with(|| RoutePool {
            idle: Vec::new(),
            current: HashMap::new(),
            metrics: Arc::new(self.metrics.pg_pool_handles(route)),
        });
        Some(f(rp))
    }

    /// An idle connection logged in with `label`, checked alive; None on a
    /// miss. A label other than the last one seen means a new secret
    /// version: the older version's connections are closed.
    pub fn take(&self, route: &str, settings: &PoolSettings, label: &str) -> Option<Conn> {
        let mut dropped = Vec::new();
        let found = self
            .with_route(route, |rp| {
                let fam = family(label);
                if rp.current.get(fam).map(String::as_str) != Some(label) {
                    let (keep, old): (Vec<Idle>, Vec<Idle>) = rp
                        .idle
                        .drain(..)
                        .partition(|i| i.label == label || family(&i.label) != fam);
                    rp.idle = keep;
                    dropped.extend(old);
                    rp.current.insert(fam.to_string(), label.to_string());
                }
                let found = warden_core::shard::take_idle(
                    &mut rp.idle,
                    |i| i.label == label,
                    |i| i.shard,
                    |i| {
                        i.since.elapsed() < settings.idle_timeout
                            && i.conn.born.elapsed() < settings.max_lifetime
                            && alive(&i.conn.stream)
                    },
                    &mut dropped,
                    |i, moved| {
                        let mut conn = i.conn;
                        if moved {
                            conn.stream = warden_core::shard::adopt(conn.stream)?;
                        }
                        Some(conn)
                    },
                );
                let m = rp.metrics.clone();
                if found.is_some() { &m.hit } else { &m.miss }.inc();
                m.closed.inc_by(dropped.len() as u64);
                m.set_idle(rp.idle.len());
                found
            })
            .flatten();
        for d in dropped {
            close(d.conn.stream);
        }
        found
    }

    /// Keeps a connection that was just reset, unless the pool is off, the
    /// connection is too old, or its secret version was superseded; a full
    /// route drops its longest-idle connection.
    fn keep(&self, route: &str, settings: &PoolSettings, label: String, conn: Conn) {
        let mut dropped = Vec::new();
        self.with_route(route, |rp| {
            let superseded = rp.current.get(family(&label)).is_some_and(|l| *l != label);
            let entry = Idle {
                label,
                conn,
                since: Instant::now(),
                shard: warden_core::shard::current(),
            };
            if superseded
                || !settings.enabled()
                || entry.conn.born.elapsed() >= settings.max_lifetime
            {
                dropped.push(entry);
            } else {
                while rp.idle.len() >= settings.max_idle {
                    dropped.push(rp.idle.remove(0));
                }
                rp.idle.push(entry);
                rp.metrics.returned.inc();
            }
            rp.metrics.closed.inc_by(dropped.len() as u64);
            rp.metrics.set_idle(rp.idle.len());
        });
        for d in dropped {
            close(d.conn.stream);
        }
    }

    /// Resets a connection its client left at a command boundary and keeps
    /// it, or closes it when the reset fails. A state-free session on a
    /// route with `pool.reset = "auto"` (the default) left nothing to
    /// reset: its connection is kept as it is.
    pub async fn give_back(
        &self,
        route: &str,
        settings: &PoolSettings,
        label: String,
        mut conn: Conn,
        login: &Login<'_>,
        left: Leftover,
    ) {
        if left.state_free && !left.unsync && settings.reset == PoolReset::Auto {
            self.with_route(route, |rp| rp.metrics.reset_skipped.inc());
            self.keep(route, settings, label, conn);
            return;
        }
        let result =
            match tokio::time::timeout(RESET_TIMEOUT, reset(&mut conn.stream, login, left)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} s", RESET_TIMEOUT.as_secs())),
            };
        match result {
            Ok(()) => self.keep(route, settings, label, conn),
            Err(why) => {
                tracing::debug!(route = %route, "upstream connection not pooled: {why}");
                self.with_route(route, |rp| rp.metrics.closed.inc());
                close(conn.stream);
            }
        }
    }

    /// A connection that was taken but not used (the session was refused
    /// after the take): closed, counted.
    pub fn discard(&self, route: &str, conn: Conn) {
        self.with_route(route, |rp| rp.metrics.closed.inc());
        close(conn.stream);
    }

    /// Closes the route's idle connections that timed out, outlived
    /// `max_lifetime` or died.
    pub fn reap(&self, route: &str, settings: &PoolSettings) {
        let mut dropped = Vec::new();
        self.with_route(route, |rp| {
            let (keep, old): (Vec<Idle>, Vec<Idle>) = rp.idle.drain(..).partition(|i| {
                i.since.elapsed() < settings.idle_timeout
                    && i.conn.born.elapsed() < settings.max_lifetime
                    && alive(&i.conn.stream)
            });
            rp.idle = keep;
            rp.metrics.closed.inc_by(old.len() as u64);
            rp.metrics.set_idle(rp.idle.len());
            dropped = old;
        });
        for d in dropped {
            close(d.conn.stream);
        }
    }
}

/// Sends `RESET` and warden's `AUTH` in one write and checks both answers
/// (see the module docs).
pub async fn reset(
    stream: &mut UpstreamStream,
    login: &Login<'_>,
    left: Leftover,
) -> Result<(), String> {
    let mut out = Zeroizing::new(Vec::with_capacity(64 + login.password.len()));
    encode_command(&mut out, [&b"RESET"[..]].into_iter());
    if login.user.is_empty() {
        encode_command(&mut out, [&b"AUTH"[..], login.password].into_iter());
    } else {
        encode_command(
            &mut out,
            [&b"AUTH"[..], login.user.as_bytes(), login.password].into_iter(),
        );
    }
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("sending RESET: {e}"))?;
    let mut frames = Frames::default();
    let mut skipped = 0usize;
    loop {
        let frame = frames.next(stream).await?;
        if frame == b"+RESET\r\n" {
            break;
        }
        // Pushes (tracking invalidations, RESP3 pub/sub) may come first;
        // on an unsynchronised connection anything may (messages, MONITOR
        // lines, replies nobody asked for).
        let skippable = left.unsync || frame.first() == Some(&b'>');
        skipped += 1;
        if !skippable || skipped > MAX_SKIPPED {
            return Err(format!("unexpected answer to RESET: {}", describe(&frame)));
        }
    }
    let frame = frames.next(stream).await?;
    if frame != b"+OK\r\n" {
        // An error names no password: it is the server's answer to AUTH.
        return Err(format!("AUTH after RESET answered {}", describe(&frame)));
    }
    if !frames.buf.is_empty() {
        return Err("unexpected bytes after the answer to AUTH".into());
    }
    Ok(())
}

/// A short, printable description of a frame (its first line).
fn describe(frame: &[u8]) -> String {
    let line = frame.split(|b| *b == b'\r').next().unwrap_or_default();
    let text: String = String::from_utf8_lossy(&line[..line.len().min(80)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    format!("{text:?}")
}

/// Whole frames read off the stream, one at a time.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    scanner: ReplyScanner,
    read: usize,
}

impl Frames {
    async fn next(&mut self, stream: &mut UpstreamStream) -> Result<Vec<u8>, String> {
        loop {
            if let Some(n) = self
                .scanner
                .advance(&self.buf)
                .map_err(|e| format!("the upstream is not speaking RESP: {e}"))?
            {
                return Ok(self.buf.drain(..n).collect());
            }
            if self.read > MAX_READ {
                return Err("too much data before the answer to RESET".into());
            }
            let mut chunk = [0u8; 4096];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the answer to RESET: {e}"))?;
            if n == 0 {
                return Err("the upstream closed the connection".into());
            }
            self.read += n;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{describe, family};

    #[test]
    fn labels_supersede_within_their_family() {
        assert_eq!(family("cache/app v3"), "cache/app");
        assert_eq!(family("lease web 0a1b"), "lease web");
        assert_ne!(family("lease web 0a1b"), family("lease api 0a1b"));
    }

    #[test]
    fn frames_are_described_by_their_first_line() {
        assert_eq!(
            describe(b"-ERR unknown command 'RESET'\r\n"),
            "\"-ERR unknown command 'RESET'\""
        );
        assert_eq!(describe(b"*2\r\n$1\r\na\r\n"), "\"*2\"");
    }
}
