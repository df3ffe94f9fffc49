//! A PostgreSQL session handed to the kernel relay (`route.kernel_relay`).
//!
//! After [`relay::HANDOVER_AFTER`](super::relay::HANDOVER_AFTER) round trips
//! a long-lived session whose client and upstream are both on this host
//! (plain TCP both ways) is spliced at a quiet moment (see `relay.rs`):
//! from then on `warden_direct` moves its bytes from the client's socket
//! to the upstream's and back, and this task only watches warden's own two
//! sockets — for either end, for a freeze, and for the bytes that take the
//! TCP path (a direction past the kernel's flow-control window), which it
//! forwards. The session's policy, credential and audit records were all
//! decided before; a spliced session's upstream connection is closed at
//! its end (never pooled: warden no longer sees where its protocol stands).

use super::protocol;
use super::relay::{Handed, RelayEnd};
use super::upstream::UpstreamStream;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use warden_core::freeze::FreezeEntry;
use warden_core::metrics::Metrics;
use warden_ebpf::{KernelRelay, SpliceError, Spliced};

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

/// The outcome of hand-over attempts in one session.
#[derive(Default)]
pub struct Handover {
    spliced: Option<Spliced>,
    /// Client bytes were caught in the hand-over (see [`SpliceError::Held`]).
    held: bool,
}

impl Handover {
    /// Offers the quiet moment to the kernel relay.
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
        match relay.splice(client, up) {
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
            Err(SpliceError::Failed(e)) => {
                metrics.pg_kernel_relay(route, "not_local");
                tracing::debug!(
                    route,
                    "kernel relay not possible: {e}; relaying in user space"
                );
                Handed::Never
            }
        }
    }
}

/// The rest of a spliced session: warden's two sockets are watched for
/// either end or a freeze, and what still reaches them (the TCP path) is
/// forwarded; `end` gets the kernel's byte counts. Returns the freeze that
/// ended the session, if one did (its FATAL 57P01 already sent).
pub async fn finish<S: ClientTransport>(
    client: S,
    upstream: UpstreamStream,
    handover: Handover,
    end: &mut RelayEnd,
    route: &str,
    frozen: impl std::future::Future<Output = FreezeEntry>,
) -> Option<FreezeEntry> {
    let Handover { spliced, held } = handover;
    let (Ok(mut client), UpstreamStream::Plain(mut upstream)) = (client.into_plain_tcp(), upstream)
    else {
        // Only plain TCP pairs are ever spliced.
        end.error = true;
        return None;
    };
    let closed = if held {
        let _ = client.write_all(&held_error(route)).await;
        end.error = true;
        None
    } else {
        let closed = tokio::select! {
            (error, up, down) = watch_ends(&mut client, &mut upstream) => {
                end.error = error;
                end.up += up;
                end.down += down;
                None
            }
            f = frozen => Some(f),
        };
        if let Some(f) = &closed {
            let _ = client.write_all(&super::session::frozen_error(f)).await;
        }
        closed
    };
    if let Some(s) = &spliced {
        let (up, down) = s.bytes();
        end.up += up;
        end.down += down;
    }
    drop(client);
    drop(upstream);
    drop(spliced);
    closed
}

async fn watch_ends(client: &mut TcpStream, upstream: &mut TcpStream) -> (bool, u64, u64) {
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
            (&mut *client, &mut *upstream)
        } else {
            (&mut *upstream, &mut *client)
        };
        let n = match from.try_read(&mut buf) {
            Ok(0) => return (false, up, down),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return (true, up, down),
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return (true, up, down);
        }
        if from_client {
            up += n as u64;
        } else {
            down += n as u64;
        }
    }
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
