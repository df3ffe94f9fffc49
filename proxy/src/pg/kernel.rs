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
use warden_ebpf::{EndWatch, KernelRelay, SpliceError, Spliced};

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

/// The outcome of hand-over attempts in one session.
#[derive(Default)]
pub struct Handover {
    pub spliced: Option<Spliced>,
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
                tracing::warn!(
                    route,
                    "client bytes arrived while the session was handed to the kernel relay; \
                     ending the session (a pipelining client: set kernel_relay = false on this route)"
                );
                self.spliced = Some(s);
                self.held = true;
                Handed::Spliced
            }
            Err(SpliceError::Failed(e)) => {
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
    let Handover { spliced, held } = handover;
    let (Ok(client), UpstreamStream::Plain(upstream)) = (client.into_plain_tcp(), upstream) else {
        // Only plain TCP pairs are ever spliced.
        end.error = true;
        return None;
    };
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        _ => {
            end.error = true;
            return None;
        }
    };
    let mut closed_by_freeze = None;
    if held {
        let msg = protocol::error_response(
            "FATAL",
            "08006",
            &format!(
                "warden: the client sent while route {route:?} handed this session to the \
                 kernel relay; reconnect (a pipelining client needs kernel_relay = false on \
                 the route)"
            ),
            None,
            None,
        );
        send_now(&client, &msg);
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

/// Best effort, without waiting: a short message to a socket whose send
/// buffer is all but empty (the session is over either way).
fn send_now(to: &std::net::TcpStream, bytes: &[u8]) {
    let _ = (&*to).write_all(bytes);
}
