//! Workload identity for warden (SPIFFE): who is on the other end of a local
//! connection, and the short-lived certificate that proves it.
//!
//! - [`spiffe_id`]: SPIFFE IDs and trust domains.
//! - [`attest`]: from a peer process to a workload registration (facts from
//!   /proc, the /proc TCP resolver, selectors, the pid-reuse guard).
//! - [`ca`]: the local certificate authority (self-signed root or an imported
//!   upstream intermediate) and X.509-SVID issuance, field for field as the
//!   SPIFFE X509-SVID spec asks.
//! - [`rotation`]: when an SVID or a CA should be replaced (half-life with
//!   jitter; CA overlap).
//!
//! This crate does no network I/O and never depends on the proxy: the proxy
//! hands it facts and keys and serves what it issues. Keys it returns are in
//! zeroized buffers; storing them (encrypted) is the caller's job.

pub mod attest;
pub mod ca;
pub mod jwt;
pub mod rotation;
pub mod spiffe_id;

pub use ca::{CaMaterial, CertificateAuthority, KeyType, X509Svid};
pub use spiffe_id::{SpiffeId, TrustDomain};

/// Errors of this crate. Messages name what is wrong and how to fix it; none
/// ever contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("{0}")]
    InvalidId(String),
    #[error("CA certificate or key rejected: {0}")]
    InvalidCa(String),
    #[error("certificate generation failed: {0}")]
    Generation(String),
    #[error("the CA expires at {ca_not_after}; it cannot issue an SVID valid from {now}")]
    CaExpired { ca_not_after: String, now: String },
}
