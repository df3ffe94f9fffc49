//! Client-side TLS of PostgreSQL routes (`client_tls = true`): warden
//! answers SSLRequest with `S` and serves a certificate from its own CA for
//! `localhost` and the listen address, renewed at half-life
//! ([`warden_core::listener_tls`], shared with mysql routes).

use std::sync::Arc;
use warden_core::error::Result;

/// Client-side TLS for a route: rustls server configuration whose certificate
/// (for `localhost` and the listen address) comes from warden's CA and is
/// renewed at half-life. While warden is sealed, handshakes fail.
pub fn server_config(
    route: &crate::PgRoute,
    identity: Arc<warden_core::authority::IdentityHandle>,
) -> Result<Arc<rustls::ServerConfig>> {
    warden_core::listener_tls::server_config(&route.name, route.listen.ip(), identity)
}
