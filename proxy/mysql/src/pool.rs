//! Authenticated upstream connections kept between clients (`route.pool`,
//! on by default): a client whose handshake asks for what an idle
//! connection was logged in with — the same secret version, database,
//! character set and capabilities — gets that connection, so a
//! connection-per-request application skips the server's TCP and TLS
//! handshake and its login.
//!
//! A connection comes back only when the client left it at a command
//! boundary (COM_QUIT, which warden then does not forward, or a close
//! after a whole packet). Before anyone else gets it, warden resets it and
//! checks the reset in one round trip ([`reset`]): it sends
//! COM_RESET_CONNECTION (rolls back a transaction, drops temporary tables,
//! user variables and prepared statements, releases locks, resets session
//! variables), COM_INIT_DB with the database of the login, `SET NAMES` with
//! the login's character set and collation, and a `SELECT` of a random
//! nonce with the session's database and character set variables. Whatever
//! a client left in flight is read and discarded up to the nonce's row; the
//! three commands before it must have answered OK, and the state read back
//! must equal the state read right after the login ([`Baseline`]).
//! Anything else — an ERR, a timeout, an unexpected packet, a different
//! database or character set — closes the connection instead.

use crate::packet::{caps, put_packet, Greeting, Reader};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warden_core::config::{PoolReset, PoolSettings};
use warden_core::metrics::{Metrics, PoolHandles};
use warden_core::pgwire::upstream::UpstreamStream;

/// Longest a reset (or the read of a login's baseline) may take before the
/// connection is closed instead.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// Packets a reset reads at most (what a client left in flight, then the
/// reset's own answers) before it gives up on the connection.
const MAX_PACKETS: usize = 4096;
/// Packets remembered while looking for the check query's row (its
/// result's header and the answers before it).
const KEPT: usize = 32;
/// Payload bytes a reset reads whole; longer packets are skipped unread.
const MAX_PARSED: usize = 64 * 1024;

const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_RESET_CONNECTION: u8 = 0x1f;

/// The session variables a reset must restore, read back from the server.
const STATE_COLUMNS: &str = "DATABASE(), @@character_set_client, @@character_set_connection, @@character_set_results, @@collation_connection";

/// What makes two clients interchangeable on one upstream connection: the
/// credential label (never the password) and what the client's handshake
/// asked of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub label: String,
    pub database: Option<Vec<u8>>,
    pub charset: u8,
    /// The client's capabilities as relayed at login.
    pub capabilities: u32,
    pub mariadb_caps: u32,
}

/// The session state right after a login (NULL values as `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Baseline {
    pub values: Vec<Option<Vec<u8>>>,
    /// The server's status after the login said autocommit is on (a
    /// session of plain `SELECT`s then leaves no transaction open).
    pub autocommit: bool,
}

impl Baseline {
    fn database(&self) -> Option<&[u8]> {
        self.values.first().and_then(|v| v.as_deref())
    }

    /// `SET NAMES 'charset' COLLATE 'collation'`, when both names are plain
    /// identifiers (they come from the server, but are checked anyway).
    fn set_names(&self) -> Option<String> {
        let plain = |v: &Option<Vec<u8>>| {
            v.as_deref()
                .filter(|b| {
                    !b.is_empty() && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
                })
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let charset = plain(self.values.get(1)?)?;
        let collation = plain(self.values.get(4)?)?;
        Some(format!("SET NAMES '{charset}' COLLATE '{collation}'"))
    }
}

/// An authenticated connection at a command boundary.
pub struct Conn {
    pub stream: UpstreamStream,
    pub born: Instant,
    pub baseline: Baseline,
    /// The capabilities the login agreed on (result-set framing).
    pub capabilities: u32,
    /// The plugin and transport of the login (for the audit detail).
    pub plugin: String,
    pub tls: bool,
    /// The server's id of the connection (what `KILL` names).
    pub server_id: u32,
}

/// Where the upstream stream stood when its client left: inside a packet
/// the relay had begun reading, or at a boundary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resync {
    /// Header bytes of the next packet already read (0–3), and them.
    pub header_have: usize,
    pub header: [u8; 4],
    /// Payload bytes of the current packet not read yet.
    pub remaining: usize,
}

struct Idle {
    key: Key,
    conn: Conn,
    since: Instant,
    /// The session shard whose runtime the socket is registered with
    /// ([`warden_core::shard::current`] when it was put back).
    shard: usize,
}

struct RoutePool {
    /// Oldest first.
    idle: Vec<Idle>,
    /// The last greeting the server sent (what clients are greeted with
    /// when a pooled connection may serve them).
    greeting: Option<Greeting>,
    /// Per label family ([`family`]), the label sessions use now: a secret
    /// version, or a workload's lease (older ones' connections are closed).
    current: HashMap<String, String>,
    metrics: Arc<PoolHandles>,
}

/// Every mysql route's idle connections.
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

/// Closes a connection off the caller's path (COM_QUIT, then close).
pub fn close(mut stream: UpstreamStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut quit = Vec::with_capacity(5);
            put_packet(&mut quit, 0, &[crate::packet::COM_QUIT]);
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
        if !map.contains_key(route) {
            map.insert(
                route.to_string(),
                RoutePool {
                    idle: Vec::new(),
                    greeting: None,
                    current: HashMap::new(),
                    metrics: Arc::new(self.metrics.pg_pool_handles(route)),
                },
            );
        }
        map.get_mut(route).map(f)
    }

    /// The server's last greeting on `route`, if one is known.
    pub fn greeting(&self, route: &str) -> Option<Greeting> {
        self.with_route(route, |rp| rp.greeting.clone()).flatten()
    }

    pub fn remember_greeting(&self, route: &str, g: &Greeting) {
        self.with_route(route, |rp| rp.greeting = Some(g.clone()));
    }

    /// An idle connection for `key`, checked alive; None on a miss. A label
    /// other than the last one seen in its family means a new secret
    /// version (or a workload's new lease): the older one's connections are
    /// closed.
    pub fn take(&self, route: &str, settings: &PoolSettings, key: &Key) -> Option<Conn> {
        let mut dropped = Vec::new();
        let found = self.with_route(route, |rp| {
            let fam = family(&key.label);
            if rp.current.get(fam) != Some(&key.label) {
                let (keep, old): (Vec<Idle>, Vec<Idle>) = rp
                    .idle
                    .drain(..)
                    .partition(|i| i.key.label == key.label || family(&i.key.label) != fam);
                rp.idle = keep;
                dropped.extend(old);
                rp.current.insert(fam.to_string(), key.label.clone());
            }
            let found = warden_core::shard::take_idle(
                &mut rp.idle,
                |i| i.key == *key,
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
        })?;
        for d in dropped {
            close(d.conn.stream);
        }
        found
    }

    /// Keeps a connection that was just reset, unless the pool is off, the
    /// connection is too old, or its secret version was superseded; a full
    /// route drops its longest-idle connection.
    fn keep(&self, route: &str, settings: &PoolSettings, key: Key, conn: Conn) {
        let mut dropped = Vec::new();
        self.with_route(route, |rp| {
            let superseded = rp
                .current
                .get(family(&key.label))
                .is_some_and(|l| *l != key.label);
            let entry = Idle {
                key,
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
    /// it, or closes it when the reset fails or does not check out. A
    /// `state_free` session (the relay's [`crate::relay::Outcome::state_free`])
    /// on a route with `pool.reset = "auto"` left the connection as its
    /// login did: it is kept without a reset.
    pub async fn give_back(
        &self,
        route: &str,
        settings: &PoolSettings,
        key: Key,
        mut conn: Conn,
        resync: Resync,
        state_free: bool,
    ) {
        if state_free && settings.reset == PoolReset::Auto {
            self.with_route(route, |rp| rp.metrics.reset_skipped.inc());
            self.keep(route, settings, key, conn);
            return;
        }
        let result = match tokio::time::timeout(RESET_TIMEOUT, reset(&mut conn, resync)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", RESET_TIMEOUT.as_secs())),
        };
        match result {
            Ok(()) => self.keep(route, settings, key, conn),
            Err(why) => {
                tracing::debug!(route = %route, "upstream connection not pooled: {why}");
                self.with_route(route, |rp| rp.metrics.closed.inc());
                close(conn.stream);
            }
        }
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

/// One packet: sequence id, first payload byte, and the payload when it is
/// short enough to keep.
struct Seen {
    seq: u8,
    first: Option<u8>,
    len: usize,
    payload: Option<Vec<u8>>,
}

/// Reads one packet (a payload above [`MAX_PARSED`] is skipped unread).
async fn next_packet(stream: &mut UpstreamStream) -> std::io::Result<Seen> {
    let mut h = [0u8; 4];
    stream.read_exact(&mut h).await?;
    finish_packet(stream, h).await
}

async fn finish_packet(stream: &mut UpstreamStream, h: [u8; 4]) -> std::io::Result<Seen> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
    if len <= MAX_PARSED {
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        return Ok(Seen {
            seq: h[3],
            first: payload.first().copied(),
            len,
            payload: Some(payload),
        });
    }
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await?;
    skip(stream, len - 1).await?;
    Ok(Seen {
        seq: h[3],
        first: Some(first[0]),
        len,
        payload: None,
    })
}

async fn skip(stream: &mut UpstreamStream, mut n: usize) -> std::io::Result<()> {
    let mut sink = [0u8; 8192];
    while n > 0 {
        let k = n.min(sink.len());
        stream.read_exact(&mut sink[..k]).await?;
        n -= k;
    }
    Ok(())
}

fn is_ok(p: &Seen) -> bool {
    p.seq == 1 && p.first == Some(0x00) && p.len >= 7
}

fn is_eof(p: &Seen) -> bool {
    p.first == Some(0xfe) && p.len < 9
}

/// The values of a text-protocol row (lenenc strings, 0xfb for NULL).
pub(crate) fn row_values(payload: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    let mut r = Reader::new(payload);
    let mut out = Vec::new();
    while r.remaining() > 0 {
        if payload.get(payload.len() - r.remaining()) == Some(&0xfb) {
            r.u8().ok()?;
            out.push(None);
        } else {
            out.push(Some(r.lenenc_bytes().ok()?.to_vec()));
        }
    }
    Some(out)
}

fn query_packet(out: &mut Vec<u8>, sql: &str) {
    let mut payload = Vec::with_capacity(1 + sql.len());
    payload.push(COM_QUERY);
    payload.extend_from_slice(sql.as_bytes());
    put_packet(out, 0, &payload);
}

/// Reads the single-row result set of a query whose first value is
/// `marker` (or, with no marker, the next result set), after skipping
/// whatever precedes it; returns the packets seen before its column count
/// and the row's values.
async fn read_row(
    stream: &mut UpstreamStream,
    columns: usize,
    marker: Option<&[u8]>,
    deprecate_eof: bool,
) -> Result<(Vec<Seen>, Vec<Option<Vec<u8>>>, u16), RowError> {
    let mut seen: Vec<Seen> = Vec::new();
    for _ in 0..MAX_PACKETS {
        let p = next_packet(stream)
            .await
            .map_err(|e| RowError::Broken(format!("reading the answers: {e}")))?;
        let row = p
            .payload
            .as_deref()
            .filter(|_| p.first != Some(0xff) && !is_eof(&p))
            .and_then(row_values)
            .filter(|v| v.len() == columns)
            .filter(|v| match marker {
                Some(m) => v.first().and_then(|x| x.as_deref()) == Some(m),
                None => true,
            });
        // A row only after its column count, its column definitions and
        // (classic framing) their EOF.
        let defs = columns + usize::from(!deprecate_eof);
        if let Some(values) = row {
            if seen.len() > defs {
                let header = &seen[seen.len() - defs - 1];
                let count_ok = header.payload.as_deref() == Some(&[columns as u8][..]);
                let eof_ok = deprecate_eof || seen.last().is_some_and(is_eof);
                if count_ok && eof_ok {
                    // The terminator: EOF, or OK with a 0xfe header.
                    let end = next_packet(stream)
                        .await
                        .map_err(|e| RowError::Broken(format!("reading the answers: {e}")))?;
                    let status = end.payload.as_deref().and_then(|p| {
                        if deprecate_eof {
                            crate::replies::ok_status(p)
                        } else {
                            crate::replies::eof_status(p)
                        }
                    });
                    let (Some(0xfe), Some(status)) = (end.first, status) else {
                        return Err(RowError::Broken(
                            "the check query's result did not end as expected".into(),
                        ));
                    };
                    seen.truncate(seen.len() - defs - 1);
                    return Ok((seen, values, status));
                }
            }
        }
        if marker.is_none() && p.first == Some(0xff) {
            let why = p
                .payload
                .as_deref()
                .and_then(|b| crate::packet::ErrPacket::parse(b).ok())
                .map(|e| format!("ERR {}", e.code))
                .unwrap_or_else(|| "ERR".into());
            return Err(RowError::Refused(format!(
                "the server answered the state query with {why}"
            )));
        }
        // Only short payloads are looked at again (a column count).
        seen.push(Seen {
            payload: p.payload.filter(|b| b.len() <= 8),
            ..p
        });
        if seen.len() > KEPT {
            seen.drain(..seen.len() - KEPT);
        }
    }
    Err(RowError::Broken(format!(
        "no answer among {MAX_PACKETS} packets"
    )))
}

enum RowError {
    Refused(String),
    Broken(String),
}

impl RowError {
    fn message(self) -> String {
        match self {
            RowError::Refused(m) | RowError::Broken(m) => m,
        }
    }
}

/// Why the state after a login could not be read.
pub enum BaselineError {
    /// The server answered with an error: the connection is still in step
    /// (serve the session, do not pool the connection).
    Refused(String),
    /// No clean answer: the connection cannot be used.
    Broken(String),
}

/// Reads the session state right after a login (one round trip), for a
/// connection that may be pooled.
pub async fn baseline(
    stream: &mut UpstreamStream,
    capabilities: u32,
) -> Result<Baseline, BaselineError> {
    let fut = async {
        let mut out = Vec::with_capacity(160);
        query_packet(&mut out, &format!("SELECT {STATE_COLUMNS}"));
        stream
            .write_all(&out)
            .await
            .map_err(|e| BaselineError::Broken(format!("sending the state query: {e}")))?;
        let deprecate_eof = capabilities & caps::DEPRECATE_EOF != 0;
        match read_row(stream, 5, None, deprecate_eof).await {
            Ok((before, values, status)) if before.is_empty() => Ok(Baseline {
                values,
                autocommit: status & crate::replies::AUTOCOMMIT != 0,
            }),
            Ok(_) => Err(BaselineError::Broken(
                "unexpected packets before the state query's answer".into(),
            )),
            Err(RowError::Refused(m)) => Err(BaselineError::Refused(m)),
            Err(RowError::Broken(m)) => Err(BaselineError::Broken(m)),
        }
    };
    match tokio::time::timeout(RESET_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(BaselineError::Broken(format!(
            "no answer within {} s",
            RESET_TIMEOUT.as_secs()
        ))),
    }
}

/// A random marker for the check query (hex).
fn nonce() -> String {
    let mut b = [0u8; 12];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b.copy_from_slice(&t.to_le_bytes()[..12]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Brings the stream to a packet boundary, resets the session, restores
/// the login's database and character set and checks the result (see the
/// module docs).
pub async fn reset(conn: &mut Conn, resync: Resync) -> Result<(), String> {
    let stream = &mut conn.stream;
    // The rest of the packet the relay was reading when its client left.
    if resync.header_have > 0 {
        let mut h = resync.header;
        stream
            .read_exact(&mut h[resync.header_have..])
            .await
            .map_err(|e| format!("finishing a packet: {e}"))?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
        skip(stream, len)
            .await
            .map_err(|e| format!("finishing a packet: {e}"))?;
    } else if resync.remaining > 0 {
        skip(stream, resync.remaining)
            .await
            .map_err(|e| format!("finishing a packet: {e}"))?;
    }
    let Some(set_names) = conn.baseline.set_names() else {
        return Err("the login's character set is not known".into());
    };
    let marker = nonce();
    let mut out = Vec::with_capacity(256);
    put_packet(&mut out, 0, &[COM_RESET_CONNECTION]);
    let mut oks = 2;
    if let Some(db) = conn.baseline.database() {
        let mut p = Vec::with_capacity(1 + db.len());
        p.push(COM_INIT_DB);
        p.extend_from_slice(db);
        put_packet(&mut out, 0, &p);
        oks += 1;
    }
    query_packet(&mut out, &set_names);
    query_packet(&mut out, &format!("SELECT '{marker}', {STATE_COLUMNS}"));
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("sending the reset: {e}"))?;
    let deprecate_eof = conn.capabilities & caps::DEPRECATE_EOF != 0;
    let (before, values, _) = read_row(stream, 6, Some(marker.as_bytes()), deprecate_eof)
        .await
        .map_err(RowError::message)?;
    // The commands before the check query each answered OK.
    if before.len() < oks || !before[before.len() - oks..].iter().all(is_ok) {
        return Err("the server did not accept the reset".into());
    }
    if values[1..] != conn.baseline.values[..] {
        return Err(
            "the session's database or character set differs from the login's after the reset"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn labels_supersede_within_their_family() {
        assert_eq!(family("orders-db/app v3"), "orders-db/app");
        assert_eq!(family("lease web orders-0a1b"), "lease web");
        assert_ne!(
            family("lease web orders-0a1b"),
            family("lease api orders-0a1b")
        );
    }

    #[test]
    fn set_names_takes_plain_identifiers_only() {
        let b = |cs: &[u8], coll: &[u8]| Baseline {
            values: vec![
                None,
                Some(cs.to_vec()),
                Some(cs.to_vec()),
                Some(cs.to_vec()),
                Some(coll.to_vec()),
            ],
            autocommit: true,
        };
        assert_eq!(
            b(b"utf8mb4", b"utf8mb4_general_ci").set_names().as_deref(),
            Some("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_general_ci'")
        );
        assert_eq!(b(b"utf8mb4'; DROP", b"x").set_names(), None);
        assert_eq!(b(b"", b"x").set_names(), None);
    }

    #[test]
    fn rows_decode_strings_and_nulls() {
        let mut row = vec![3];
        row.extend_from_slice(b"abc");
        row.push(0xfb);
        row.push(0);
        assert_eq!(
            row_values(&row),
            Some(vec![Some(b"abc".to_vec()), None, Some(Vec::new())])
        );
        assert_eq!(row_values(&[5, b'a']), None);
    }
}
