//! The single error type of the attestation pipeline.
//!
//! Every variant says which process or connection it is about and, where it
//! helps, what an operator can do about it. None of them carries secrets; the
//! process facts quoted in messages are escaped, because comm names, paths and
//! cgroup names are chosen by the (untrusted) peer and could otherwise inject
//! line breaks into logs.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a peer could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The process exited (or became a zombie) before its facts were read.
    #[error(
        "process {pid} exited before it could be attested (it may have closed the connection); \
         the connection cannot be given an identity"
    )]
    ProcessGone {
        /// The pid that was being attested.
        pid: u32,
    },

    /// The process behind the pid is not the one whose facts were gathered:
    /// it exited, the pid was reused, or it changed identity (exec, setuid,
    /// cgroup move) while being attested.
    #[error(
        "process {pid} changed while being attested ({detail}); refusing to hand out an \
         identity: the pid may have been reused by another process"
    )]
    ProcessChanged {
        /// The pid that was being attested.
        pid: u32,
        /// What changed, e.g. "start time 123 -> 456" or "process exited".
        detail: String,
    },

    /// The process that opened the connection has run another program
    /// (exec) since, or the kernel could not record whether it did: the
    /// program speaking on the connection may not be the one that opened it.
    #[error(
        "process {pid} {what} after it opened this connection; warden cannot tell which \
         program speaks on it and refuses (open the connection from the program that uses it)"
    )]
    ExecutedSinceConnect {
        /// The process that opened the connection.
        pid: u32,
        /// "started a new program (exec)" or why it cannot be known.
        what: &'static str,
    },

    /// Several processes hold the client end of the connection and they are
    /// not the same program (a connection passed to or inherited by another
    /// program).
    #[error(
        "{} processes hold this connection ({}) and they are not the same program; \
         warden cannot tell which one speaks on it and refuses",
        holders.len(),
        holders.join(", ")
    )]
    SharedConnection {
        /// "pid (exe, uid N)" of each holder.
        holders: Vec<String>,
    },

    /// No process on this host could be found holding the client end of a
    /// TCP connection.
    #[error("cannot find the local process that opened the TCP connection from {peer} to {local}: {detail}")]
    PeerNotFound {
        /// The address the connection was accepted on (our side).
        local: SocketAddr,
        /// The client's address.
        peer: SocketAddr,
        /// Which step failed and the likely reasons.
        detail: String,
    },

    /// The process matches no registration.
    #[error("process {pid} ({facts}) matches no registered workload")]
    NoMatch {
        /// The attested pid.
        pid: u32,
        /// A human-readable summary of the facts that were checked.
        facts: String,
    },

    /// The process matches several registrations and none of them is more
    /// specific than all the others.
    #[error(
        "process {pid} matches {} registrations equally well ({}); make one of them more \
         specific (a strict superset of the other's selectors) or make them contradict on a \
         selector (`config check` lists such pairs)",
        names.len(),
        names.join(", ")
    )]
    Ambiguous {
        /// The attested pid.
        pid: u32,
        /// Names of all registrations that matched.
        names: Vec<String>,
    },

    /// A file under /proc could not be read for a reason other than the
    /// process having exited (e.g. permission denied under `hidepid` or
    /// without CAP_SYS_PTRACE).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A /proc file had an unexpected format.
    #[error("unexpected content in {}: {detail}", path.display())]
    Parse {
        /// The file that failed to parse.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}
