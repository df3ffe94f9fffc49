//! warden's PostgreSQL client library: the protocol codec, SCRAM, logging in
//! to an upstream server and simple-query sessions on it. The PostgreSQL
//! front end relays with it; rotation (`ALTER ROLE … PASSWORD`) and dynamic
//! leases (`CREATE ROLE`) log in with it — which is why it lives in the core
//! and not in the front end.
//!
//! - [`protocol`]: message codec (startup, auth, errors) — pure.
//! - [`scram`]: SCRAM-SHA-256 client with a key cache, md5 — pure.
//! - [`upstream`]: connect + TLS + authenticate + read to ReadyForQuery.
//! - [`sql`]: warden's own simple-query sessions, identifier/literal quoting.

pub mod protocol;
pub mod scram;
pub mod sql;
pub mod upstream;
