//! Workload attestation: which registered workload is on the other end of a
//! local connection.
//!
//! The pipeline, for each accepted connection:
//!
//! 1. **peer → pid.** For a unix socket the caller takes the pid from
//!    `SO_PEERCRED`. For TCP a [`PeerResolver`] finds the process holding the
//!    client end of the connection; [`ProcNetResolver`] does it from
//!    `/proc/net/tcp{,6}` and `/proc/*/fd` (lowest pid if several hold it).
//! 2. **pid → facts.** [`gather_facts`] reads effective uid/gid and groups,
//!    the executable (path, deleted flag, SHA-256 through [`ExeHashCache`]),
//!    the cgroup v2 path and its systemd unit, bracketed by two reads of the
//!    process start time.
//! 3. **facts → registration.** [`attest`] applies each registration's
//!    [`Selectors`] (all set selectors must hold) and picks the single match or
//!    the strictly most specific one; otherwise `NoMatch` or `Ambiguous`.
//!    [`ambiguous_pairs`] finds conflicting registrations at config time.
//! 4. **pid-reuse check.** [`confirm_same_process`] re-reads the start time and
//!    the selector-relevant facts just before the identity is used; a
//!    different start time, an exit, an exec of another path, a uid/gid
//!    change or a cgroup move fails with `ProcessChanged`.
//!
//! Trust assumptions: root on the host (and the kernel) is trusted; procfs is
//! the real procfs of the host's pid namespace. Only facts an unprivileged
//! process cannot choose are matched: the comm name and the command line are
//! never used (comm is kept as `display_name` for logs only). The executable
//! is hashed through `/proc/PID/exe`, i.e. the inode that is running, not
//! whatever file now sits at its path. A pid alone is not an identity: it is
//! always paired with the start time (clock ticks since boot) to detect reuse.
//! Not covered: a process that execs a trusted binary while keeping an
//! already open connection is attested as that binary (as with any
//! process-based attestation, selectors should pin the whole context: uid,
//! unit or cgroup as well as the executable).

mod error;
mod facts;
mod hash;
mod procfs;
mod resolver;
mod selectors;
mod sock_diag;

#[cfg(test)]
mod live_tests;

pub use error::AttestError;
pub use facts::{confirm_same_process, gather_facts, revalidate, revalidate_cached, PeerFacts};
pub use hash::{ExeHashCache, HashSkip};
pub use procfs::{systemd_unit_of, ProcFs};
pub use resolver::{KernelPeer, PeerResolver, ProcNetResolver};
pub use selectors::{ambiguous_pairs, attest, matches, Registration, Selectors};
