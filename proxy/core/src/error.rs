//! warden's error type and its mapping to exit codes.
//!
//! Every error carries a message a human can act on (what happened, which path
//! or key, and the fix). No variant ever holds a secret value: messages are built
//! from names, paths and versions only.

use serde::{Deserialize, Serialize};

/// What kind of failure this is; decides the CLI exit code and travels over the
/// admin socket so a remote failure exits the same way as a local one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A bug or an environment failure (I/O, database). Exit 1.
    Internal,
    /// Wrong usage or invalid configuration. Exit 2.
    Usage,
    /// The caller is not allowed to do this. Exit 3.
    Denied,
    /// The store is sealed (master key not available yet). Exit 4.
    Sealed,
    /// The named thing does not exist. Exit 5.
    NotFound,
    /// Stored data failed an integrity check (tampering, wrong master key). Exit 6.
    Integrity,
    /// The daemon is not running / not reachable. Exit 7.
    Unavailable,
}

impl ErrorKind {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Denied => 3,
            ErrorKind::Sealed => 4,
            ErrorKind::NotFound => 5,
            ErrorKind::Integrity => 6,
            ErrorKind::Unavailable => 7,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
    pub fn usage(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, m)
    }
    pub fn denied(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Denied, m)
    }
    pub fn sealed(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Sealed, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn integrity(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Integrity, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, m)
    }

    /// An I/O error on `path`, with the usual causes spelled out.
    pub fn io(what: &str, path: &std::path::Path, e: &std::io::Error) -> Self {
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) => " (disk full)",
            Some(libc::EACCES) | Some(libc::EPERM) => {
                " (permission denied: run as the warden user or root)"
            }
            Some(libc::EROFS) => " (read-only file system)",
            _ => "",
        };
        Self::internal(format!("{what} {}: {e}{hint}", path.display()))
    }
}

impl From<crate::crypto::CryptoError> for Error {
    fn from(e: crate::crypto::CryptoError) -> Self {
        match e {
            crate::crypto::CryptoError::Open | crate::crypto::CryptoError::TooShort(_) => {
                Error::integrity(e.to_string())
            }
            _ => Error::internal(e.to_string()),
        }
    }
}

impl From<crate::audit::AuditError> for Error {
    fn from(e: crate::audit::AuditError) -> Self {
        Error::internal(format!(
            "{e}; the action was refused because it could not be recorded"
        ))
    }
}
