//! A PostgreSQL session handed to the kernel relay (`route.kernel_relay`).
//!
//! After [`relay::HANDOVER_AFTER`](super::relay::HANDOVER_AFTER) round trips
//! a long-lived session whose client and upstream are both on this host
//! (plain TCP both ways) is spliced at a quiet moment (see `relay.rs`); the
//! hand-over and the rest of the session are `warden_core::kernel_relay`'s,
//! shared with the MySQL and Redis routes. What is PostgreSQL's here: the
//! wire answer for a freeze (57P01) and the relay's byte counts.

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
    frozen: impl std::future::Future<Output = FreezeEntry>,
) -> Option<FreezeEntry> {
    let done = warden_core::kernel_relay::finish(
        client,
        upstream,
        handover,
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
