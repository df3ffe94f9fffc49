//! warden's core: everything between a front end's codec and the store —
//! the admission step every front end calls, and what it consults.
//!
//! - [`admission`]: attest → frozen? → policy → credential → session records,
//!   with a typed [`admission::Denial`] each front end maps to its wire form.
//! - [`peer`]: attribution and attestation of a connection's process.
//! - [`credentials`]: the daemon's one credential cache; [`leases`]: dynamic
//!   PostgreSQL roles; [`rotation`]: static secret rotation.
//! - [`freeze`], [`anomaly`]: frozen workloads, the anomaly detector.
//! - [`service`], [`store`], [`masterkey`], [`crypto`]: the encrypted secret
//!   store; [`audit`], [`journal`]: the hash-chained audit log and its writer.
//! - [`fleet`]: node records, join tokens and removal on a shared store.
//! - [`authority`]: the CA and SVIDs; [`config`]: the TOML configuration.
//! - [`tls`], [`connect`], [`webhook`]: upstream TLS and outbound connections,
//!   written once for every front end; [`pgwire`]: the PostgreSQL client
//!   library rotation and leases log in with.
//! - [`metrics`], [`paths`], [`error`], [`timefmt`], [`init`].
//!
//! Layering (enforced by the crate graph): the core depends on no front end;
//! front ends (`warden-postgres`, `warden-http`, `warden-tls`,
//! `warden-workload-api`) depend on the core and never on each other; the
//! `warden` binary wires them together.

pub mod admission;
pub mod anomaly;
pub mod audit;
pub mod auditor;
pub mod authority;
pub mod config;
pub mod connect;
pub mod credentials;
pub mod crypto;
pub mod error;
pub mod export;
pub mod fleet;
pub mod fleet_views;
pub mod freeze;
pub mod init;
pub mod journal;
pub mod kernel_relay;
pub mod leases;
pub mod listen;
pub mod listener_tls;
pub mod masterkey;
pub mod metrics;
pub mod paths;
pub mod peer;
pub mod pgwire;
pub mod propagation;
pub mod rewind;
pub mod rotation;
pub mod service;
pub mod shard;
pub mod sql_tokens;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod webhook;
