//! A PostgreSQL session handed to the kernel relay (`route.kernel_relay`).
//!
//! After [`relay::HANDOVER_AFTER`](super::relay::HANDOVER_AFTER) round trips
//! a long-lived session whose two sides are plain TCP is spliced at a quiet
//! moment (see `relay.rs`): from then on `warden_relay` moves its bytes in
//! the kernel and this task only watches for either end to close or for a
//! freeze.
//! The session's policy, credential and audit records were all decided
//! before; a spliced session's upstream connection is closed at its end
//! (never pooled: warden no longer sees where its protocol stands).

use super::protocol;
use super::relay::{Handed, RelayEnd};
use super::upstream::UpstreamStream;
use crate::freeze::FreezeEntry;
use crate::metrics::Metrics;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use warden_ebpf::{DirectSpliced, EndWatch, KernelRelay, SpliceError, Spliced};

/// How long the client side gets to receive what the kernel already took
/// from the upstream (a final ErrorResponse, say) when the upstream closes.
const DRAIN_GRACE: Duration = Duration::from_millis(50);

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

const HELD_WARNING: &str = "client bytes arrived while the session was handed to the kernel \
     relay; ending the session (a pipelining client: set kernel_relay = false on this route)";

/// Debug builds only: `WARDEN_KERNEL_RELAY=via-warden` skips the direct
/// relay, so tests cover the relay through warden's sockets with a local
/// upstream.
fn force_via_warden() -> bool {
    cfg!(debug_assertions)
        && std::env::var_os("WARDEN_KERNEL_RELAY").is_some_and(|v| v == "via-warden")
}

/// The outcome of hand-over attempts in one session.
#[derive(Default)]
pub struct Handover {
    pub spliced: Option<Spliced>,
    /// Spliced far end to far end (the upstream is on this host).
    pub direct: Option<DirectSpliced>,
    /// Client bytes were caught in the hand-over (see [`SpliceError::Held`]).
    pub held: bool,
}

impl Handover {
    /// Offers the quiet moment to the kernel relay: the client socket is
    /// entered first (it is waiting for the ReadyForQuery warden holds).
    pub fn offer(
        &mut self,
        relay: &Arc<KernelRelay>,
        client: Option<&TcpStream>,
        upstream: &UpstreamStream,
        route: &str,
        metrics: &Metrics,
    ) -> Handed {
        let (Some(client), UpstreamStream::Plain(up)) = (client, upstream) else {
            return Handed::Never;
        };
        // Socket to socket when the upstream's end is on this host, else
        // through warden's two sockets.
        if !force_via_warden() {
            match relay.splice_direct(client, up) {
                Ok(d) => {
                    metrics.pg_kernel_relay(route, "direct");
                    self.direct = Some(d);
                    return Handed::Spliced;
                }
                Err(SpliceError::Busy) => {
                    metrics.pg_kernel_relay(route, "busy");
                    return Handed::Later;
                }
                Err(SpliceError::HeldDirect(d)) => {
                    metrics.pg_kernel_relay(route, "held");
                    tracing::warn!(route, "{HELD_WARNING}");
                    self.direct = Some(d);
                    self.held = true;
                    return Handed::Spliced;
                }
                Err(e) => {
                    tracing::debug!(route, "direct kernel relay not possible: {e}");
                }
            }
        }
        match relay.splice(client.as_fd(), up.as_fd()) {
            Ok(s) => {
                metrics.pg_kernel_relay(route, "spliced");
                self.spliced = Some(s);
                Handed::Spliced
            }
            Err(SpliceError::Busy) => {
                metrics.pg_kernel_relay(route, "busy");
                Handed::Later
            }
            Err(SpliceError::Held(s)) => {
                metrics.pg_kernel_relay(route, "held");
                tracing::warn!(route, "{HELD_WARNING}");
                self.spliced = Some(s);
                self.held = true;
                Handed::Spliced
            }
            Err(e @ (SpliceError::Failed(_) | SpliceError::HeldDirect(_))) => {
                metrics.pg_kernel_relay(route, "failed");
                tracing::warn!(
                    route,
                    "kernel relay refused a session: {e}; relaying it in user space"
                );
                Handed::Never
            }
        }
    }
}

/// The rest of a spliced session: `client` and `upstream` leave tokio's
/// reactor (a registered socket would be woken by every relayed byte), an
/// [`EndWatch`] waits for either side to end or `frozen` to resolve, and
/// `end` gets the kernel's byte counts. Returns the freeze that ended the
/// session, if one did (its FATAL 57P01 already sent to the client).
pub async fn finish<S: ClientTransport>(
    client: S,
    upstream: UpstreamStream,
    handover: Handover,
    end: &mut RelayEnd,
    route: &str,
    frozen: impl std::future::Future<Output = FreezeEntry>,
) -> Option<FreezeEntry> {
    let Handover {
        spliced,
        direct,
        held,
    } = handover;
    let (Ok(client), UpstreamStream::Plain(upstream)) = (client.into_plain_tcp(), upstream) else {
        // Only plain TCP pairs are ever spliced.
        end.error = true;
        return None;
    };
    if let Some(d) = direct {
        let closed = finish_direct(&client, &upstream, held, end, route, frozen).await;
        let (up, down) = d.bytes();
        end.up += up;
        end.down += down;
        drop(d);
        return closed;
    }
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        _ => {
            end.error = true;
            return None;
        }
    };
    let mut closed_by_freeze = None;
    if held {
        send_now(&client, &held_error(route));
        end.error = true;
    } else {
        match EndWatch::new(client.as_fd(), upstream.as_fd()) {
            Ok(watch) => {
                tokio::select! {
                    r = watch.wait() => match r {
                        Ok(which) => {
                            if which.second && !which.first {
                                // The upstream closed: let the kernel hand the
                                // client what it already took (a FATAL, say).
                                tokio::time::sleep(DRAIN_GRACE).await;
                            }
                            end.error = matches!(client.take_error(), Ok(Some(_)))
                                || matches!(upstream.take_error(), Ok(Some(_)));
                        }
                        Err(e) => {
                            tracing::warn!(route, "watching a kernel-relayed session failed: {e}");
                            end.error = true;
                        }
                    },
                    f = frozen => {
                        send_now(&client, &super::session::frozen_error(&f));
                        closed_by_freeze = Some(f);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(route, "watching a kernel-relayed session failed: {e}");
                end.error = true;
            }
        }
    }
    if let Some(s) = &spliced {
        let (up, down) = s.bytes();
        end.up += up;
        end.down += down;
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
    drop(client);
    drop(upstream);
    drop(spliced);
    closed_by_freeze
}

/// The rest of a session spliced far end to far end: warden's own two
/// sockets stay ordinary (they carry nothing but the connections' ends)
/// and are watched for either end or a stray byte, which is forwarded.
async fn finish_direct(
    client: &TcpStream,
    upstream: &TcpStream,
    held: bool,
    end: &mut RelayEnd,
    route: &str,
    frozen: impl std::future::Future<Output = FreezeEntry>,
) -> Option<FreezeEntry> {
    if held {
        let _ = write_all(client, &held_error(route)).await;
        end.error = true;
        return None;
    }
    tokio::select! {
        (error, up, down) = watch_ends(client, upstream) => {
            end.error = error;
            end.up += up;
            end.down += down;
            None
        }
        f = frozen => {
            let _ = write_all(client, &super::session::frozen_error(&f)).await;
            Some(f)
        }
    }
}

/// Waits until either socket ends (EOF or an error: `true`), forwarding
/// any byte one of them still receives to the other; returns the bytes
/// forwarded each way.
async fn watch_ends(client: &TcpStream, upstream: &TcpStream) -> (bool, u64, u64) {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut up, mut down) = (0u64, 0u64);
    loop {
        let from_client = tokio::select! {
            r = client.readable() => match r {
                Ok(()) => true,
                Err(_) => return (true, up, down),
            },
            r = upstream.readable() => match r {
                Ok(()) => false,
                Err(_) => return (true, up, down),
            },
        };
        let (from, to) = if from_client {
            (client, upstream)
        } else {
            (upstream, client)
        };
        let n = match from.try_read(&mut buf) {
            Ok(0) => return (false, up, down),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return (true, up, down),
        };
        if write_all(to, &buf[..n]).await.is_err() {
            return (true, up, down);
        }
        if from_client {
            up += n as u64;
        } else {
            down += n as u64;
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The FATAL for a client caught sending during the hand-over.
fn held_error(route: &str) -> Vec<u8> {
    protocol::error_response(
        "FATAL",
        "08006",
        &format!(
            "warden: the client sent while route {route:?} handed this session to the \
             kernel relay; reconnect (a pipelining client needs kernel_relay = false on \
             the route)"
        ),
        None,
        None,
    )
}

/// Best effort, without waiting: a short message to a socket whose send
/// buffer is all but empty (the session is over either way).
fn send_now(to: &std::net::TcpStream, bytes: &[u8]) {
    let _ = (&*to).write_all(bytes);
}
