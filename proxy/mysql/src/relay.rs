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

use crate::packet::{put_packet, ErrPacket, COM_CHANGE_USER, COM_QUIT, MAX_PAYLOAD};
use crate::pool::Resync;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

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
}

/// What a finished relay reports.
#[derive(Debug, Default)]
pub struct Outcome {
    pub up: u64,
    pub down: u64,
    pub change_user_refused: u64,
    pub how: &'static str,
}

/// Packet boundaries in a byte stream.
#[derive(Default)]
struct Framer {
    header: [u8; 4],
    have: usize,
    /// Payload bytes left in the current packet.
    remaining: usize,
    /// The current packet is 0xffffff long: the next one continues it.
    continued: bool,
}

impl Framer {
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
                self.continued = len == MAX_PAYLOAD;
                if len == 0 {
                    return (i, completed);
                }
            }
        }
        (i, completed)
    }
}

/// Relays until either side is done. With `ctx.pool`, a client that left
/// at a command boundary hands the upstream stream back, with where its
/// framing stood.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    ctx: &Context<'_>,
) -> (Outcome, Option<(U, Resync)>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (cr, cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (tx, rx) = unbounded_channel();
    let (up, down, refused) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    // Every byte read from the server, framed as soon as it is read (before
    // any await), so the stream's position is known whenever the relay
    // stops.
    let mut position = Framer::default();
    let (how, reusable) = {
        let commands = client_to_upstream(cr, &mut uw, tx, ctx, &up, &refused);
        let replies = upstream_to_client(&mut ur, cw, rx, &down, &mut position);
        tokio::select! {
            how = replies => (how, false),
            r = commands => r,
        }
    };
    let outcome = Outcome {
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        change_user_refused: refused.load(Relaxed),
        how,
    };
    let back = (reusable && ctx.pool && !position.continued).then(|| {
        let resync = Resync {
            header_have: position.have,
            header: position.header,
            remaining: position.remaining,
        };
        (ur.unsplit(uw), resync)
    });
    (outcome, back)
}

/// Client → server; returns how it ended and whether the server's side is
/// at a command boundary (nothing half sent).
async fn client_to_upstream<R, W>(
    mut client: R,
    upstream: &mut W,
    local: UnboundedSender<Vec<u8>>,
    ctx: &Context<'_>,
    up: &AtomicU64,
    refused: &AtomicU64,
) -> (&'static str, bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    // Payload bytes left of the current packet, and whether it is dropped.
    let mut remaining = 0usize;
    let mut dropping = false;
    let mut continued = false;
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match client.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let boundary = remaining == 0 && !continued;
                if !(ctx.pool && boundary) {
                    let _ = upstream.shutdown().await;
                }
                return ("client closed", boundary);
            }
            Ok(_) => {}
        }
        let mut start = 0;
        loop {
            if remaining > 0 {
                let n = remaining.min(buf.len() - start);
                if !dropping {
                    out.extend_from_slice(&buf[start..start + n]);
                }
                remaining -= n;
                start += n;
                if remaining > 0 {
                    break;
                }
                end_of_packet(&mut dropping, continued, &local, ctx, refused);
                continue;
            }
            // A header, plus the command byte of a new command.
            let avail = &buf[start..];
            if avail.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes([avail[0], avail[1], avail[2], 0]) as usize;
            let is_command = avail[3] == 0 && !continued;
            if is_command && len > 0 && avail.len() < 5 {
                break;
            }
            if let (true, Some(scope)) = (is_command && len > 0, &ctx.kill) {
                if matches!(avail[4], 0x03 | crate::kill::COM_PROCESS_KILL)
                    && len <= 1 + crate::kill::MAX_KILL_LEN
                {
                    // The whole command first.
                    if avail.len() < 4 + len {
                        break;
                    }
                    match crate::kill::inspect(&avail[4..4 + len], scope) {
                        crate::kill::Action::Pass => {}
                        crate::kill::Action::Rewrite(p) => {
                            put_packet(&mut out, 0, &p);
                            start += 4 + len;
                            continue;
                        }
                        crate::kill::Action::Refuse(e) => {
                            let mut pkt = Vec::new();
                            put_packet(&mut pkt, 1, &e.encode());
                            let _ = local.send(pkt);
                            start += 4 + len;
                            continue;
                        }
                    }
                }
            }
            if is_command && ctx.pool && len == 1 && avail[4] == COM_QUIT {
                // The client is done: what came before goes up, the
                // COM_QUIT does not (the connection stays open for the pool).
                if !out.is_empty() {
                    if upstream.write_all(&out).await.is_err() {
                        return ("upstream closed", false);
                    }
                    up.fetch_add(out.len() as u64, Relaxed);
                }
                return ("client quit", true);
            }
            if is_command {
                dropping = len > 0 && avail[4] == COM_CHANGE_USER;
            }
            continued = len == MAX_PAYLOAD;
            if !dropping {
                out.extend_from_slice(&avail[..4]);
            }
            start += 4;
            remaining = len;
            if len == 0 {
                end_of_packet(&mut dropping, continued, &local, ctx, refused);
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            if upstream.write_all(&out).await.is_err() {
                return ("upstream closed", false);
            }
            up.fetch_add(out.len() as u64, Relaxed);
            out.clear();
        }
    }
}

/// A client packet ended: a dropped COM_CHANGE_USER (once whole) gets
/// warden's ERR.
fn end_of_packet(
    dropping: &mut bool,
    continued: bool,
    local: &UnboundedSender<Vec<u8>>,
    ctx: &Context<'_>,
    refused: &AtomicU64,
) {
    if !*dropping || continued {
        return;
    }
    *dropping = false;
    refused.fetch_add(1, Relaxed);
    let msg = format!(
        "warden: route {:?} logs in as {:?} for workload {:?}; changing the user (COM_CHANGE_USER) is refused, connect again instead",
        ctx.route, ctx.user, ctx.workload
    );
    let mut pkt = Vec::new();
    put_packet(&mut pkt, 1, &ErrPacket::new(1045, "28000", msg).encode());
    let _ = local.send(pkt);
}

async fn upstream_to_client<R, W>(
    upstream: &mut R,
    mut client: W,
    mut local: UnboundedReceiver<Vec<u8>>,
    down: &AtomicU64,
    position: &mut Framer,
) -> &'static str
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut framer = Framer::default();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut local_open = true;
    loop {
        tokio::select! {
            biased;
            m = local.recv(), if local_open => match m {
                Some(bytes) => pending.push(bytes),
                None => local_open = false,
            },
            r = upstream.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => {
                        let _ = client.shutdown().await;
                        return "upstream closed";
                    }
                    Ok(n) => n,
                };
                let mut at = 0;
                while at < n {
                    at += position.advance(&buf[at..n]).0;
                }
                // One write per read, split only where warden's own answer
                // goes in between two packets.
                while let Ok(m) = local.try_recv() {
                    pending.push(m);
                }
                let (mut i, mut from) = (0, 0);
                while i < n {
                    let (k, _) = framer.advance(&buf[i..n]);
                    i += k;
                    if !pending.is_empty() && framer.at_boundary() && !framer.continued {
                        if client.write_all(&buf[from..i]).await.is_err()
                            || write_pending(&mut client, &mut pending).await.is_err()
                        {
                            return "client closed";
                        }
                        from = i;
                    }
                }
                if from < n && client.write_all(&buf[from..n]).await.is_err() {
                    return "client closed";
                }
                down.fetch_add(n as u64, Relaxed);
            }
        }
        if !pending.is_empty()
            && framer.at_boundary()
            && !framer.continued
            && write_pending(&mut client, &mut pending).await.is_err()
        {
            return "client closed";
        }
    }
}

async fn write_pending<W: AsyncWrite + Unpin>(
    client: &mut W,
    pending: &mut Vec<Vec<u8>>,
) -> std::io::Result<()> {
    for m in pending.drain(..) {
        client.write_all(&m).await?;
    }
    client.flush().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::duplex;

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
            };
            relay(client, upstream, &ctx).await.0
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
            };
            let (o, back) = relay(client, upstream, &ctx).await;
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
            };
            relay(client, upstream, &ctx).await.1.is_some()
        });
        let query = packet(0, b"\x03SELECT 1");
        client_end.write_all(&query[..7]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(client_end);
        assert!(!task.await.unwrap());
    }
}
