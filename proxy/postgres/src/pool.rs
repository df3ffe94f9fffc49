//! Idle authenticated upstream connections, reused by later client sessions
//! (session pooling with a reset between clients).
//!
//! A client session is attributed, attested, authorized, audited and given
//! its credential exactly as without the pool; only then does it look here
//! for an idle connection with the same [`key`]: route, credential label
//! (`secret vN` or `lease ID`, so a new secret version or another lease never
//! shares a connection), upstream role, database and every other startup
//! parameter (`RESET ALL` returns to the startup values, so connections
//! opened with different `options` or `application_name` must not mix).
//!
//! When a client leaves (Terminate, EOF) and the relay stopped at a message
//! boundary, the connection is reset off the client's path. A client that
//! left idle (every request answered, the last ReadyForQuery status `I`)
//! having sent only state-free requests (plain `SELECT`s, transaction
//! control: [`super::session_state`]) needs no reset with `reset = "auto"`
//! (the default) and goes straight back; another idle client
//! gets `DISCARD ALL` alone; any other gets `CopyFail`
//! (ends a COPY FROM STDIN; ignored otherwise), `Sync` (ends an unfinished
//! extended-query batch), `ROLLBACK`, `DISCARD ALL` (temp tables, prepared
//! statements, portals, LISTEN, advisory locks, `SET`/`SET ROLE`/session
//! authorization). The reply is read until the ReadyForQuery of
//! `DISCARD ALL`, counting one ReadyForQuery per Query/Sync/FunctionCall the
//! client had sent and not seen answered. Any error from `ROLLBACK` or
//! `DISCARD ALL`, any unexpected message, a status other than idle or no
//! answer within [`RESET_TIMEOUT`] closes the connection instead.
//!
//! A pooled connection is checked before reuse: not idle longer than
//! `idle_timeout`, younger than `max_lifetime`, and its socket neither
//! readable nor at EOF (a terminated backend has sent its FATAL and closed).

use super::protocol::{self, BackendMessage, StartupMessage};
use super::relay::Resume;
use super::upstream::UpstreamStream;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warden_core::config::PoolReset;
#[cfg(test)]
use warden_core::config::{PoolConfig, DEFAULT_MAX_IDLE};
use warden_core::metrics::{Metrics, PoolHandles};

/// Longest a reset may take before the connection is closed instead.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages read whole during a reset; longer ones (rows of a result the
/// client left behind) are skipped unread.
const MAX_PARSED: usize = 64 * 1024;

pub use warden_core::config::PoolSettings;

/// What makes two sessions interchangeable on one upstream connection: the
/// credential label (never the password) and the complete upstream startup
/// message (role, database, options, application_name, …), sorted.
pub fn key(label: &str, startup: &StartupMessage) -> String {
    let mut params: Vec<&(String, String)> = startup.params.iter().collect();
    params.sort();
    let mut k = String::with_capacity(128);
    k.push_str(label);
    for (name, value) in params {
        // No part can hold a NUL (the wire format ends strings with it), so
        // NUL separators keep the key unambiguous.
        k.push('\0');
        k.push_str(name);
        k.push('\0');
        k.push_str(value);
    }
    k
}

/// An authenticated upstream connection at ReadyForQuery (idle).
pub struct Pooled {
    pub stream: UpstreamStream,
    /// The server's parameters as the next client must see them.
    pub params: Vec<(String, String)>,
    pub backend_key: Option<(i32, Vec<u8>)>,
    pub auth_method: &'static str,
    /// When the login happened.
    pub born: Instant,
}

struct Idle {
    key: String,
    label: String,
    since: Instant,
    /// The session shard whose runtime the connection's socket is
    /// registered with ([`warden_core::shard::current`] when it was put back).
    shard: usize,
    conn: Pooled,
}

struct RoutePool {
    /// Oldest first.
    idle: Vec<Idle>,
    /// The route's pool series.
    metrics: Arc<PoolHandles>,
    /// Static routes: the secret version sessions use now.
    current_static: Option<String>,
}

/// Which credential a connection was logged in with.
pub struct Credential<'a> {
    /// `secret vN` or `lease ID`.
    pub label: &'a str,
    /// A static secret (a new version supersedes the old); else a lease.
    pub is_static: bool,
}

/// Every route's idle connections.
pub struct Pool {
    routes: Mutex<HashMap<String, RoutePool>>,
    metrics: Metrics,
}

/// The socket has nothing to read and is not at EOF (a non-blocking peek).
fn alive(stream: &UpstreamStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        socket2::SockRef::from(stream.tcp()).peek(&mut b),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// Says goodbye to the server (Terminate) and closes, off the caller's path.
pub fn close(mut stream: UpstreamStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&protocol::terminate()).await?;
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

    /// The route's entry, made on first use (`route` is copied only then).
    fn route_pool<'m>(
        &self,
        map: &'m mut HashMap<String, RoutePool>,
        route: &str,
    ) -> &'m mut RoutePool {
        // `get_mut` then `entry`: the common hit copies no string (and the
        // borrow checker accepts neither branch returning early).
        if map.contains_key(route) {
            return map.get_mut(route).unwrap_or_else(|| unreachable!());
        }
        map.entry(route.to_string()).or_insert_with(|| RoutePool {
            idle: Vec::new(),
            metrics: Arc::new(self.metrics.pg_pool_handles(route)),
            current_static: None,
        })
    }

    fn dispose(&self, m: Option<Arc<PoolHandles>>, dropped: Vec<Idle>, idle: Option<usize>) {
        let Some(m) = m else {
            for d in dropped {
                close(d.conn.stream);
            }
            return;
        };
        for d in dropped {
            m.closed.inc();
            close(d.conn.stream);
        }
        if let Some(n) = idle {
            m.set_idle(n);
        }
    }

    /// An idle connection for `key`, checked alive; None on a miss. For a
    /// static credential, a label other than the last one seen means a new
    /// secret version: the older version's connections are closed.
    pub fn take(
        &self,
        route: &str,
        settings: &PoolSettings,
        key: &str,
        cred: &Credential<'_>,
    ) -> Option<Pooled> {
        let mut dropped = Vec::new();
        let found;
        let (idle, m) = {
            let mut map = self.routes.lock().ok()?;
            let rp = self.route_pool(&mut map, route);
            if cred.is_static && rp.current_static.as_deref() != Some(cred.label) {
                let (keep, old): (Vec<Idle>, Vec<Idle>) =
                    rp.idle.drain(..).partition(|i| i.label == cred.label);
                rp.idle = keep;
                dropped.extend(old);
                rp.current_static = Some(cred.label.to_string());
            }
            // Most recently used first (the others age out), this shard's
            // own connections before another's.
            found = warden_core::shard::take_idle(
                &mut rp.idle,
                |i| i.key == key,
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
            (rp.idle.len(), rp.metrics.clone())
        };
        if found.is_some() { &m.hit } else { &m.miss }.inc();
        self.dispose(Some(m), dropped, Some(idle));
        found
    }

    /// Keeps a connection that was just reset (closes it when it is too
    /// old, its credential was superseded, or the pool is off). When the
    /// route is full, its longest-idle connection makes room.
    pub fn put(
        &self,
        route: &str,
        settings: &PoolSettings,
        key: String,
        cred: &Credential<'_>,
        conn: Pooled,
    ) -> bool {
        self.keep(route, settings, key, cred, conn, false)
    }

    /// [`Self::put`]; `reset_skipped` counts a connection given back without
    /// a reset (under the same lock).
    fn keep(
        &self,
        route: &str,
        settings: &PoolSettings,
        key: String,
        cred: &Credential<'_>,
        conn: Pooled,
        reset_skipped: bool,
    ) -> bool {
        let mut dropped = Vec::new();
        let mut kept = false;
        let (idle, m) = match self.routes.lock() {
            Ok(mut map) => {
                let rp = self.route_pool(&mut map, route);
                if reset_skipped {
                    rp.metrics.reset_skipped.inc();
                }
                let superseded = cred.is_static && rp.current_static.as_deref() != Some(cred.label);
                let entry = Idle {
                    key,
                    label: cred.label.to_string(),
                    since: Instant::now(),
                    shard: warden_core::shard::current(),
                    conn,
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
                    kept = true;
                }
                (Some(rp.idle.len()), Some(rp.metrics.clone()))
            }
            Err(_) => (None, None),
        };
        if let (true, Some(m)) = (kept, &m) {
            m.returned.inc();
        }
        self.dispose(m, dropped, idle);
        kept
    }

    /// Closes the route's idle connections that timed out, outlived
    /// `max_lifetime`, died, or (dynamic routes: `leases` is the labels of
    /// the leases still held) belong to a revoked lease.
    pub fn reap(&self, route: &str, settings: &PoolSettings, leases: Option<&HashSet<String>>) {
        let mut dropped = Vec::new();
        let (idle, m) = match self.routes.lock() {
            Ok(mut map) => {
                let Some(rp) = map.get_mut(route) else {
                    return;
                };
                let (keep, old): (Vec<Idle>, Vec<Idle>) = rp.idle.drain(..).partition(|i| {
                    i.since.elapsed() < settings.idle_timeout
                        && i.conn.born.elapsed() < settings.max_lifetime
                        && leases.is_none_or(|l| l.contains(&i.label))
                        && alive(&i.conn.stream)
                });
                rp.idle = keep;
                dropped = old;
                (Some(rp.idle.len()), Some(rp.metrics.clone()))
            }
            Err(_) => (None, None),
        };
        self.dispose(m, dropped, idle);
    }

    /// Resets a connection whose client left and keeps it, or closes it
    /// when the reset fails (see [`reset`]).
    pub async fn give_back(
        &self,
        route: &str,
        settings: &PoolSettings,
        key: String,
        cred: &Credential<'_>,
        mut conn: Pooled,
        resume: Resume,
    ) {
        if settings.reset == PoolReset::Auto && needs_no_reset(&resume) {
            self.keep(route, settings, key, cred, conn, true);
            return;
        }
        let result = match tokio::time::timeout(
            RESET_TIMEOUT,
            reset(&mut conn.stream, resume, &mut conn.params),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", RESET_TIMEOUT.as_secs())),
        };
        match result {
            Ok(()) => {
                self.put(route, settings, key, cred, conn);
            }
            Err(why) => {
                tracing::debug!(route = %route, "upstream connection not pooled: {why}");
                self.metrics.pg_pool(route, "reset_failed");
                close(conn.stream);
            }
        }
    }
}

/// A session that ended idle (every request answered, outside a
/// transaction, at a message boundary) having sent only state-free requests
/// (see [`super::session_state`]) left the connection as it found it.
pub fn needs_no_reset(resume: &Resume) -> bool {
    resume.state_free
        && resume.pending_ready == 0
        && resume.last_status == Some(b'I')
        && resume.framer.at_boundary()
}

/// Brings an upstream connection whose client left back to idle (see the
/// module documentation). `params` gets the ParameterStatus values the
/// server reports meanwhile.
pub async fn reset(
    stream: &mut UpstreamStream,
    resume: Resume,
    params: &mut Vec<(String, String)>,
) -> Result<(), String> {
    // A client that left with every request answered and the last
    // ReadyForQuery saying idle needs no CopyFail, Sync or ROLLBACK: only
    // DISCARD ALL (one statement for the server instead of three).
    let idle = resume.pending_ready == 0 && resume.last_status == Some(b'I');
    let mut out = Vec::new();
    if !idle {
        out.extend_from_slice(&protocol::copy_fail("warden: the client session ended"));
        out.extend_from_slice(&protocol::sync());
        out.extend_from_slice(&protocol::query("ROLLBACK"));
    }
    out.extend_from_slice(&protocol::query("DISCARD ALL"));
    let io = |e: std::io::Error| format!("upstream I/O failed during the reset: {e}");
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)?;

    // ReadyForQuery number `rollback` answers ROLLBACK (0: none sent), the
    // next (`last`) DISCARD ALL; messages from `ours` on answer the reset.
    let (ours_from, rollback) = if idle {
        (1, 0)
    } else {
        (resume.pending_ready + 2, resume.pending_ready + 2)
    };
    let last = if idle { 1 } else { rollback + 1 };
    let mut framer = resume.framer;
    let mut seen_ready = 0u64;
    let mut rolled_back = false;
    let mut discarded = false;
    let mut skip = 0usize;
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    // The answer to DISCARD ALL is a few dozen bytes; longer answers (the
    // rest of an abandoned result) take more reads.
    let mut chunk = vec![0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err("the upstream closed the connection during the reset".into());
        }
        let mut data = &chunk[..n];
        if !framer.at_boundary() {
            // The rest of a reply message the relay had started.
            let used = framer
                .finish_message(data)
                .ok_or_else(|| "the upstream sent an invalid message length".to_string())?;
            data = &data[used..];
        }
        buf.extend_from_slice(data);
        let mut off = 0;
        loop {
            if skip > 0 {
                let s = skip.min(buf.len() - off);
                skip -= s;
                off += s;
                if skip > 0 {
                    break;
                }
            }
            let rest = &buf[off..];
            if rest.len() < 5 {
                break;
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 {
                return Err("the upstream sent an invalid message length".into());
            }
            // Which answer this message belongs to: the client's requests,
            // our Sync, ROLLBACK (== rollback) or DISCARD ALL (== last).
            let segment = seen_ready + 1;
            let ours = segment >= ours_from;
            let parsed = matches!(tag, b'S' | b'C' | b'E' | b'Z');
            if !parsed || len + 1 > MAX_PARSED {
                if ours && !matches!(tag, b'N' | b'A') {
                    return Err(format!(
                        "unexpected message {:?} in the answer to the reset",
                        char::from(tag)
                    ));
                }
                off += 5;
                skip = len - 4;
                continue;
            }
            if rest.len() < len + 1 {
                break;
            }
            let message = &rest[..len + 1];
            match tag {
                b'S' => {
                    if let Ok(Some((BackendMessage::ParameterStatus { name, value }, _))) =
                        protocol::parse_backend(message)
                    {
                        match params.iter_mut().find(|(k, _)| *k == name) {
                            Some((_, v)) => *v = value,
                            None => params.push((name, value)),
                        }
                    }
                }
                b'C' => {
                    let body = &message[5..];
                    let text = body.split(|&b| b == 0).next().unwrap_or(&[]);
                    if segment == rollback {
                        rolled_back = text == b"ROLLBACK";
                    } else if segment == last {
                        discarded = text == b"DISCARD ALL";
                    }
                }
                b'E' if ours => {
                    let what = match protocol::parse_backend(message) {
                        Ok(Some((BackendMessage::ErrorResponse(e), _))) => {
                            format!("{} {}", e.code().unwrap_or("?"), e.message().unwrap_or(""))
                        }
                        _ => "an error".into(),
                    };
                    return Err(format!("the reset failed: {what}"));
                }
                b'E' => {}
                _ => {
                    // ReadyForQuery.
                    seen_ready += 1;
                    let status = message.get(5).copied().unwrap_or(0);
                    if rollback > 0 && seen_ready == rollback && !rolled_back {
                        return Err("ROLLBACK was not confirmed".into());
                    }
                    if seen_ready == last {
                        if !discarded {
                            return Err("DISCARD ALL was not confirmed".into());
                        }
                        if status != b'I' {
                            return Err(format!(
                                "the connection is not idle after the reset (status {:?})",
                                char::from(status)
                            ));
                        }
                        if off + len + 1 != buf.len() {
                            return Err("the upstream sent more than the reset asked for".into());
                        }
                        return Ok(());
                    }
                }
            }
            off += len + 1;
        }
        buf.drain(..off);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_labels_and_every_startup_parameter() {
        let mut a = StartupMessage {
            protocol: (3, 0),
            params: vec![
                ("user".into(), "app".into()),
                ("database".into(), "orders".into()),
                ("application_name".into(), "psql".into()),
            ],
        };
        let mut b = a.clone();
        b.params.reverse();
        assert_eq!(key("s v1", &a), key("s v1", &b), "order does not matter");
        assert_ne!(key("s v1", &a), key("s v2", &a));
        b.set("application_name", "pgbench");
        assert_ne!(key("s v1", &a), key("s v1", &b));
        a.set("options", "-c search_path=x");
        let mut c = a.clone();
        c.set("options", "-c search_path=y");
        assert_ne!(key("s v1", &a), key("s v1", &c));
    }

    #[test]
    fn settings_default_on_and_false_disables() {
        let s = PoolSettings::from_config(None);
        assert!(s.enabled());
        assert_eq!(s.max_idle, DEFAULT_MAX_IDLE);
        let off = PoolConfig {
            enabled: false,
            ..PoolConfig::default()
        };
        assert!(!PoolSettings::from_config(Some(&off)).enabled());
        let zero = PoolConfig {
            enabled: true,
            max_idle: Some(0),
            ..PoolConfig::default()
        };
        assert!(!PoolSettings::from_config(Some(&zero)).enabled());
    }
}
