//! A PostgreSQL session handed to the kernel relay (`route.kernel_relay`).
//!
//! After [`relay::HANDOVER_AFTER`](super::relay::HANDOVER_AFTER) round trips
//! a long-lived session whose client and upstream are both on this host
//! (plain TCP both ways) is spliced at a quiet moment (see `relay.rs`); the
//! hand-over and the rest of the session are `warden_core::kernel_relay`'s,
//! shared with Redis routes. What is PostgreSQL's here: the wire answers
//! (08006 for a hand-over that caught client bytes, 57P01 for a freeze) and
//! the relay's byte counts.

use super::protocol;
use super::relay::RelayEnd;
use super::upstream::UpstreamStream;
use warden_core::freeze::FreezeEntry;
pub use warden_core::kernel_relay::{ClientTransport, Handover};

/// The rest of a spliced session (see `warden_core::kernel_relay::finish`);
/// `end` gets the kernel's byte counts. Returns the freeze that ended the
/// session, if one did (its FATAL 57P01 already sent).
pub async fn finish<S: ClientTransport>(
    client: S,
    upstream: UpstreamStream,
    handover: Handover,
    end: &mut RelayEnd,
    route: &str,
    frozen: impl std::future::Future<Output = FreezeEntry>,
) -> Option<FreezeEntry> {
    let done = warden_core::kernel_relay::finish(
        client,
        upstream,
        handover,
        &held_error(route),
        frozen,
        super::session::frozen_error,
        None,
    )
    .await;
    end.error = done.error;
    end.up += done.up;
    end.down += done.down;
    done.frozen
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
