//! Workload identity for warden (SPIFFE): who is on the other end of a local
//! connection, and the short-lived certificate that proves it.
//!
//! This crate will hold the local certificate authority, X.509-SVID issuance
//! and rotation, attestation (process facts → selectors → workload identity)
//! and the SPIFFE Workload API server. It does no network I/O of its own: the
//! proxy hands it peer facts and serves what it issues.
//!
//! Nothing is implemented yet (see the "Workload identity" issue); the crate
//! exists so the layering is fixed from the start: `identity` never depends on
//! `warden` (the proxy), only the other way round.
