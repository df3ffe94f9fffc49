//! Append-only, hash-chained audit log (`audit.log` in warden's data dir).
//!
//! # Format
//!
//! One JSON object per line (JSON lines, `\n`-terminated), members in this
//! fixed order:
//!
//! ```text
//! {"seq":N,"time":"2026-11-25T19:50:00.123456Z","actor":{...},"action":"secret.put","target":{...},"decision":"allow","reason":"...","prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! * `seq` starts at 1 and grows by exactly 1 per record.
//! * `prev` is the `hash` of the previous record (64 zeros for seq 1).
//! * `hash` is the lowercase hex SHA-256 of the exact bytes of the line with
//!   the trailing `,"hash":"<64 hex>"` member removed, i.e. of the bytes
//!   `{"seq":…,"prev":"…"}`. A verifier strips the fixed-size suffix
//!   `,"hash":"<64 hex>"}`, re-appends `}` and hashes: no re-serialisation is
//!   involved, so there is no canonicalisation ambiguity. Lines must in
//!   addition be exactly what this module's serialiser produces (canonical
//!   form, no unknown members).
//! * Records carry only names, versions and metadata. No type in this module
//!   has a field that could carry a secret *value*; callers pass secret names.
//!
//! Beside the log, `audit.log.head` (the log's file name + `.head`) holds
//! `{"seq":N,"hash":"…"}` for the newest record, padded to a fixed width. It
//! is overwritten in place (one small `pwrite`, see `AuditLog::write_anchor`)
//! after every append and lets [`verify`] detect a log whose tail was cut
//! off.
//!
//! # Guarantees
//!
//! * [`AuditLog::append`] writes the line and `fsync`s it before returning
//!   `Ok`, under an exclusive `flock` on the log (so several warden processes
//!   appending in turn keep one valid chain). If it returns `Err`, the record
//!   was not durably written: a partial line, a failed `fsync` or a failed
//!   head-anchor update are rolled back by truncating the log to its previous
//!   length. Callers must refuse the audited action on `Err` (fail closed).
//! * [`AuditLog::open`] refuses a log whose last line is not a valid record,
//!   or whose head anchor shows that records were cut off or rewritten, so an
//!   append can never paper over tampering evidence.
//! * [`verify`] detects a modified (any single byte, including whitespace,
//!   `prev` or `hash`), removed, inserted (also a forged line with a correctly
//!   recomputed hash, seq and prev), reordered or truncated line, and names
//!   the first bad line (1-based).
//!
//! # Limits
//!
//! The chain is keyless: anyone who can rewrite the *whole* file from some
//! point on *and* the head anchor can forge a consistent history, and a forged
//! record appended at the very end with a correct chain is indistinguishable
//! from an append that crashed before updating the anchor (it is reported as
//! a note). The remedy is to keep the head hash somewhere the attacker cannot
//! write (ship [`VerifyReport::last_hash`] off the node, print it into a
//! ticket, …) and later run `warden audit verify --expect-head HASH`, which
//! compares it with [`VerifyReport::last_hash`] (or, if records were appended
//! since, looks for it among the records' hashes): a log whose verified
//! chain no longer contains that hash was rewritten. Deleting the
//! anchor itself only yields a note, because the anchor is a convenience
//! against accidental or naive truncation, not a trust root.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

/// `prev` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Largest record line (without its newline) that is written or accepted.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

const HASH_MEMBER_PREFIX: &[u8] = b",\"hash\":\"";
const HASH_HEX_LEN: usize = 64;
const HASH_MEMBER_CLOSE: &[u8] = b"\"}";
/// `,"hash":"` + 64 hex + `"}`
/// Starting size of a record line's buffer: a session record is 500–700
/// bytes, so one allocation holds it and its hash member.
const LINE_CAPACITY_HINT: usize = 1024;
const HASH_SUFFIX_LEN: usize = HASH_MEMBER_PREFIX.len() + HASH_HEX_LEN + HASH_MEMBER_CLOSE.len();
const MAX_ANCHOR_BYTES: u64 = 4096;

const TIME_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");
const HUMAN_TIME_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

type Digest32 = [u8; 32];
const ZERO_DIGEST: Digest32 = [0; 32];

// ---------------------------------------------------------------------------
// Record types
// ---------------------------------------------------------------------------

/// Who performed the audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    Admin,
    Workload,
    Daemon,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Admin => "admin",
            ActorKind::Workload => "workload",
            ActorKind::Daemon => "daemon",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub kind: ActorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// What the action was applied to. Names and versions only: there is
/// deliberately no field for a secret value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Target {
    /// The use of a stored secret on a route (never its value).
    pub fn secret_use(
        route: &str,
        secret: &str,
        env: &str,
        version: Option<u32>,
        detail: String,
    ) -> Target {
        Target {
            route: Some(route.to_string()),
            secret: Some(secret.to_string()),
            env: Some(env.to_string()),
            version,
            detail: Some(detail),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

/// What a caller hands to [`AuditLog::append`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub actor: Actor,
    pub action: String,
    pub target: Target,
    pub decision: Decision,
    pub reason: String,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    pub actor: Actor,
    pub action: String,
    pub target: Target,
    pub decision: Decision,
    pub reason: String,
    pub prev: String,
    pub hash: String,
}

/// The hashed part of a record: identical member order, without `hash`.
#[derive(Serialize)]
struct RecordBody<'a> {
    seq: u64,
    time: &'a str,
    actor: &'a Actor,
    action: &'a str,
    target: &'a Target,
    decision: Decision,
    reason: &'a str,
    prev: &'a str,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnchorFile {
    seq: u64,
    hash: String,
    /// Set by a writer with `audit.sync = "interval"`: records after `seq`
    /// may have been acknowledged before their `fsync`, so a crash of
    /// warden can leave any number of them after the anchor.
    #[serde(default, skip_serializing_if = "is_false")]
    interval: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------
// Errors and reports
// ---------------------------------------------------------------------------

#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum AuditError {
    #[error("audit log I/O error on {}: {}", .path.display(), describe_io(.source))]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {} is damaged at line {line}: {detail} (run `warden audit verify`)", .path.display())]
    Corrupt {
        path: PathBuf,
        line: u64,
        detail: String,
    },
    #[error("audit log {} was removed or replaced since it was opened; refusing to append", .path.display())]
    Replaced { path: PathBuf },
    #[error("audit log path {}: {detail}", .path.display())]
    InvalidPath { path: PathBuf, detail: String },
    #[error("audit event rejected: {0}")]
    InvalidEvent(String),
    #[error("audit record too large ({size} bytes, at most {max} allowed)")]
    RecordTooLarge { size: usize, max: usize },
    #[error("could not encode audit record: {0}")]
    Encode(String),
    #[error("audit log {}: a background fsync failed ({detail}); records written since the last good fsync may not be on disk, so no more are accepted (check the disk, run `warden audit verify`, restart warden)", .path.display())]
    SyncFailed { path: PathBuf, detail: String },
}

fn describe_io(err: &io::Error) -> String {
    let hint = match err.raw_os_error() {
        Some(libc::ENOSPC) => Some("disk full"),
        Some(libc::EDQUOT) => Some("disk quota exceeded"),
        Some(libc::EACCES) | Some(libc::EPERM) => Some("permission denied"),
        Some(libc::EROFS) => Some("read-only filesystem"),
        _ => None,
    };
    match hint {
        Some(h) => format!("{h} ({err})"),
        None => err.to_string(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TamperKind {
    Modified,
    Removed,
    Inserted,
    Reordered,
    Truncated,
    Malformed,
}

/// The first problem found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tamper {
    /// 1-based line number of the first bad line (for a truncated tail: the
    /// first line that is missing).
    pub line: u64,
    pub kind: TamperKind,
    pub detail: String,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.detail)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Records verified intact before the first problem (all of them when
    /// `problem` is `None`).
    pub records: u64,
    /// Hash of the last intact record ([`GENESIS_HASH`] if there is none).
    /// Keep it off the node and compare later (`--expect-head`).
    pub last_hash: String,
    pub problem: Option<Tamper>,
    /// Observations that are not tampering evidence by themselves.
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------
// Line encoding and self-check
// ---------------------------------------------------------------------------

fn sha256(bytes: &[u8]) -> Digest32 {
    let d = digest(&SHA256, bytes);
    let mut out = ZERO_DIGEST;
    out.copy_from_slice(d.as_ref());
    out
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

fn parse_hash(s: &[u8]) -> Option<Digest32> {
    if s.len() != HASH_HEX_LEN || !is_lower_hex(s) {
        return None;
    }
    let mut out = ZERO_DIGEST;
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn encode_err(e: impl fmt::Display) -> AuditError {
    AuditError::Encode(e.to_string())
}

/// Serialises a record; returns it together with its line (no newline).
fn encode_record(
    seq: u64,
    time: &str,
    event: &Event,
    prev: &str,
) -> Result<(Record, Vec<u8>), AuditError> {
    let (hash, line) = encode_line(seq, time, event, prev)?;
    let record = Record {
        seq,
        time: time.to_owned(),
        actor: event.actor.clone(),
        action: event.action.clone(),
        target: event.target.clone(),
        decision: event.decision,
        reason: event.reason.clone(),
        prev: prev.to_owned(),
        hash,
    };
    Ok((record, line))
}

/// The stored line of a record (without its newline) and its hash.
fn encode_line(
    seq: u64,
    time: &str,
    event: &Event,
    prev: &str,
) -> Result<(String, Vec<u8>), AuditError> {
    // One buffer, sized for a typical record plus the hash member: the body
    // is serialized into it and the hash appended in place (no regrowth, no
    // second copy on the session path).
    let mut line = Vec::with_capacity(LINE_CAPACITY_HINT);
    serde_json::to_writer(
        &mut line,
        &RecordBody {
            seq,
            time,
            actor: &event.actor,
            action: &event.action,
            target: &event.target,
            decision: event.decision,
            reason: &event.reason,
            prev,
        },
    )
    .map_err(encode_err)?;
    let digest = sha256(&line);
    if line.pop() != Some(b'}') {
        return Err(AuditError::Encode(
            "record body is not a JSON object".into(),
        ));
    }
    let mut hex_buf = [0u8; HASH_HEX_LEN];
    hex::encode_to_slice(digest, &mut hex_buf)
        .map_err(|_| AuditError::Encode("hash length".into()))?;
    line.reserve(HASH_SUFFIX_LEN);
    line.extend_from_slice(HASH_MEMBER_PREFIX);
    line.extend_from_slice(&hex_buf);
    line.extend_from_slice(HASH_MEMBER_CLOSE);
    // ASCII hex digits: always valid UTF-8.
    let hash = String::from_utf8_lossy(&hex_buf).into_owned();
    Ok((hash, line))
}

/// Splits a line into (body without its closing brace, stored hash).
fn split_hash_member(line: &[u8]) -> Option<(&[u8], Digest32)> {
    let body_len = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    if body_len < 2 {
        return None;
    }
    let (open_body, suffix) = line.split_at(body_len);
    let (prefix, rest) = suffix.split_at(HASH_MEMBER_PREFIX.len());
    let (hex_part, close) = rest.split_at(HASH_HEX_LEN);
    if prefix != HASH_MEMBER_PREFIX || close != HASH_MEMBER_CLOSE {
        return None;
    }
    Some((open_body, parse_hash(hex_part)?))
}

/// A line that passed its self-check.
struct Checked {
    record: Record,
    hash: Digest32,
    prev: Digest32,
}

/// Checks one line on its own (hash, schema, canonical form). `terminated`
/// says whether the line ended with `\n`.
fn check_line(line: &[u8], terminated: bool) -> Result<Checked, (TamperKind, String)> {
    if line.is_empty() {
        return Err((TamperKind::Malformed, "empty line".into()));
    }
    if line.len() > MAX_RECORD_BYTES {
        return Err((
            TamperKind::Malformed,
            format!("line is longer than {MAX_RECORD_BYTES} bytes"),
        ));
    }
    let Some((open_body, stored)) = split_hash_member(line) else {
        return Err(match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => (
                TamperKind::Modified,
                "record was modified (its hash member is missing or garbled)".into(),
            ),
            Ok(_) => (TamperKind::Malformed, "line is not a JSON object".into()),
            Err(e) if !terminated && e.is_eof() => (
                TamperKind::Truncated,
                "last line is incomplete: the file was truncated mid-record or a write was interrupted"
                    .into(),
            ),
            Err(e) => (TamperKind::Malformed, format!("line is not valid JSON ({e})")),
        });
    };
    let mut body = Vec::with_capacity(open_body.len() + 1);
    body.extend_from_slice(open_body);
    body.push(b'}');
    let hash = sha256(&body);
    if hash != stored {
        return Err((
            TamperKind::Modified,
            "record was modified (its hash does not match its content)".into(),
        ));
    }
    let record: Record = serde_json::from_slice(line).map_err(|e| {
        (
            TamperKind::Malformed,
            format!("hash is consistent but the line is not a valid audit record ({e})"),
        )
    })?;
    match serde_json::to_vec(&record) {
        Ok(canonical) if canonical == line => {}
        _ => {
            return Err((
                TamperKind::Malformed,
                "hash is consistent but the line is not in canonical form (not written by warden)"
                    .into(),
            ))
        }
    }
    if record.seq == 0 {
        return Err((TamperKind::Malformed, "seq 0 is never written".into()));
    }
    let Some(prev) = parse_hash(record.prev.as_bytes()) else {
        return Err((
            TamperKind::Malformed,
            "prev is not 64 lowercase hex digits".into(),
        ));
    };
    if time::PrimitiveDateTime::parse(&record.time, TIME_FORMAT).is_err() {
        return Err((
            TamperKind::Malformed,
            format!("time {:?} is not a valid timestamp", record.time),
        ));
    }
    if !terminated {
        return Err((
            TamperKind::Truncated,
            "last line lacks its terminating newline: the file was truncated or a write was interrupted"
                .into(),
        ));
    }
    Ok(Checked { record, hash, prev })
}

// ---------------------------------------------------------------------------
// File helpers
// ---------------------------------------------------------------------------

/// Path of the head anchor: the log's file name + ".head", same directory.
fn anchor_path(log_path: &Path) -> Result<PathBuf, AuditError> {
    let Some(name) = log_path.file_name() else {
        return Err(AuditError::InvalidPath {
            path: log_path.to_path_buf(),
            detail: "has no file name".into(),
        });
    };
    let mut head = name.to_os_string();
    head.push(".head");
    Ok(log_path.with_file_name(head))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Releases the `flock` when dropped (closing the file would too).
struct FileLock<'a>(&'a File);

impl Drop for FileLock<'_> {
    #[allow(clippy::incompatible_msrv)] // File::unlock: stable since Rust 1.89
    fn drop(&mut self) {
        // An unlock failure cannot be acted on; the lock dies with the fd.
        let _ = self.0.unlock();
    }
}

/// [`FileLock`] holding its own handle on the file (so the log it guards
/// can be borrowed mutably meanwhile).
struct OwnedLock {
    file: std::sync::Arc<File>,
    /// Unlock when dropped (cleared by [`OwnedLock::keep`]).
    unlock: bool,
}

impl OwnedLock {
    fn exclusive(file: &std::sync::Arc<File>, path: &Path) -> Result<OwnedLock, AuditError> {
        std::mem::forget(lock_exclusive(file, path)?);
        Ok(OwnedLock {
            file: file.clone(),
            unlock: true,
        })
    }

    /// Leaves the file locked: its holder releases it later.
    fn keep(mut self) {
        self.unlock = false;
    }
}

impl Drop for OwnedLock {
    fn drop(&mut self) {
        if self.unlock {
            drop(FileLock(&self.file));
        }
    }
}

/// Exclusive `flock` (std's `File::lock`, stable since Rust 1.89).
#[allow(clippy::incompatible_msrv)]
fn lock_exclusive<'a>(file: &'a File, path: &Path) -> Result<FileLock<'a>, AuditError> {
    loop {
        match file.lock() {
            Ok(()) => return Ok(FileLock(file)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        }
    }
}

/// Shared `flock`; `None` if the filesystem refuses locks (readers then go
/// on without the snapshot guarantee).
#[allow(clippy::incompatible_msrv)]
fn lock_shared(file: &File) -> Option<FileLock<'_>> {
    loop {
        match file.lock_shared() {
            Ok(()) => return Some(FileLock(file)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
}

fn open_for_read(path: &Path) -> Result<File, AuditError> {
    let file = File::open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(AuditError::InvalidPath {
            path: path.to_path_buf(),
            detail: "is not a regular file".into(),
        });
    }
    Ok(file)
}

/// Reads one line into `buf` (without the newline), keeping at most `cap`
/// bytes of it; the rest of an overlong line is skipped. Returns whether the
/// line was `\n`-terminated, or `None` at end of input.
fn read_line_capped<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(any.then_some(false));
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = match newline {
            Some(i) => available.get(..i).unwrap_or(available),
            None => available,
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or(chunk));
        let consumed = chunk.len() + usize::from(newline.is_some());
        reader.consume(consumed);
        if newline.is_some() {
            return Ok(Some(true));
        }
    }
}

/// Iterates over the first `len` bytes of a file, line by line.
struct LineReader<'a> {
    reader: BufReader<io::Take<&'a File>>,
    buf: Vec<u8>,
    line_no: u64,
}

impl<'a> LineReader<'a> {
    fn new(file: &'a File, len: u64) -> io::Result<LineReader<'a>> {
        let mut f = file;
        f.seek(SeekFrom::Start(0))?;
        Ok(LineReader {
            reader: BufReader::with_capacity(64 * 1024, f.take(len)),
            buf: Vec::new(),
            line_no: 0,
        })
    }

    /// Next line as (line number, bytes, terminated); overlong lines are
    /// returned truncated to just over the limit, which fails the self-check.
    fn next_line(&mut self) -> io::Result<Option<(u64, &[u8], bool)>> {
        match read_line_capped(&mut self.reader, &mut self.buf, MAX_RECORD_BYTES + 1)? {
            None => Ok(None),
            Some(terminated) => {
                self.line_no += 1;
                Ok(Some((self.line_no, &self.buf, terminated)))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Anchor {
    seq: u64,
    hash: Digest32,
    interval: bool,
}

enum AnchorState {
    Missing,
    Invalid(String),
    Present(Anchor),
}

fn read_anchor(head_path: &Path) -> Result<AnchorState, AuditError> {
    let file = match File::open(head_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(AnchorState::Missing),
        Err(e) => return Err(io_err(head_path)(e)),
    };
    let mut content = Vec::new();
    file.take(MAX_ANCHOR_BYTES)
        .read_to_end(&mut content)
        .map_err(io_err(head_path))?;
    let parsed: AnchorFile = match serde_json::from_slice(&content) {
        Ok(a) => a,
        Err(e) => return Ok(AnchorState::Invalid(format!("not valid ({e})"))),
    };
    let Some(hash) = parse_hash(parsed.hash.as_bytes()) else {
        return Ok(AnchorState::Invalid(
            "hash is not 64 lowercase hex digits".into(),
        ));
    };
    if parsed.seq == 0 {
        return Ok(AnchorState::Invalid("seq 0 is never anchored".into()));
    }
    Ok(AnchorState::Present(Anchor {
        seq: parsed.seq,
        hash,
        interval: parsed.interval,
    }))
}

/// Counts lines in the first `upto` bytes (error paths only).
fn count_newlines(file: &File, upto: u64) -> io::Result<u64> {
    let mut f = file;
    f.seek(SeekFrom::Start(0))?;
    let mut reader = f.take(upto);
    let mut buf = vec![0u8; 64 * 1024];
    let mut count = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(count),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        count += buf.iter().take(n).filter(|&&b| b == b'\n').count() as u64;
    }
}

/// Last record of the log as seen by the writer.
#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    hash: String,
}

/// Reads and self-checks the last line of a log of length `len`, then
/// cross-checks the head anchor. Refuses anything a new append would hide.
fn load_head(file: &File, path: &Path, head_path: &Path, len: u64) -> Result<Head, AuditError> {
    let head = if len == 0 {
        Head {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    } else {
        read_tail(file, path, len)?
    };
    let corrupt = |line: u64, detail: String| AuditError::Corrupt {
        path: path.to_path_buf(),
        line,
        detail,
    };
    match read_anchor(head_path)? {
        AnchorState::Missing => {}
        AnchorState::Invalid(why) => {
            let lines = count_newlines(file, len).map_err(io_err(path))?;
            return Err(corrupt(
                lines.max(1),
                format!(
                    "head anchor {} is unreadable: {why}; investigate, then move it away to continue",
                    head_path.display()
                ),
            ));
        }
        AnchorState::Present(a) => {
            if a.seq > head.seq {
                return Err(corrupt(
                    head.seq + 1,
                    format!(
                        "records after seq {} were removed: the head anchor records seq {}",
                        head.seq, a.seq
                    ),
                ));
            }
            if a.seq == head.seq && hex::encode(a.hash) != head.hash {
                return Err(corrupt(
                    head.seq,
                    "the last record does not match the head anchor (the log was rewritten)".into(),
                ));
            }
        }
    }
    Ok(head)
}

fn read_tail(file: &File, path: &Path, len: u64) -> Result<Head, AuditError> {
    let max_window = (MAX_RECORD_BYTES as u64) + 2;
    let mut window = len.min(4096);
    loop {
        let start = len - window;
        let mut buf = vec![0u8; usize::try_from(window).unwrap_or(MAX_RECORD_BYTES)];
        file.read_exact_at(&mut buf, start).map_err(io_err(path))?;
        let terminated = buf.last() == Some(&b'\n');
        let content = if terminated {
            buf.split_last().map_or(&buf[..], |(_, c)| c)
        } else {
            &buf[..]
        };
        let line_start = content.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
        if line_start.is_none() && start > 0 {
            if window >= max_window {
                let lines = count_newlines(file, len).map_err(io_err(path))?;
                return Err(AuditError::Corrupt {
                    path: path.to_path_buf(),
                    line: if terminated { lines } else { lines + 1 },
                    detail: format!("last line is longer than {MAX_RECORD_BYTES} bytes"),
                });
            }
            window = len.min(window.saturating_mul(4)).min(max_window);
            continue;
        }
        let from = line_start.unwrap_or(0);
        let line = content.get(from..).unwrap_or_default();
        return match check_line(line, terminated) {
            Ok(c) => Ok(Head {
                seq: c.record.seq,
                hash: c.record.hash,
            }),
            Err((_, detail)) => {
                let line_no = count_newlines(file, start + from as u64).map_err(io_err(path))? + 1;
                Err(AuditError::Corrupt {
                    path: path.to_path_buf(),
                    line: line_no,
                    detail,
                })
            }
        };
    }
}

pub(crate) fn validate_event(event: &Event) -> Result<(), AuditError> {
    if event.action.is_empty() {
        return Err(AuditError::InvalidEvent("action is empty".into()));
    }
    if event
        .action
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(AuditError::InvalidEvent(format!(
            "action {:?} contains whitespace or control characters",
            event.action
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Write only this many bytes of the line, then fail with ENOSPC.
    PartialWrite(usize),
    /// Fail the fsync of the log with EIO.
    Sync,
    /// Fail the head-anchor update before the rename.
    Anchor,
}

/// Appending handle on an audit log. Several handles (in one or several
/// processes) may append to the same file; appends are serialised by `flock`.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    /// Shared with a [`PendingSync`] running outside the log's lock.
    file: std::sync::Arc<File>,
    dev: u64,
    ino: u64,
    head: Head,
    /// File length after our last append or tail read.
    known_len: u64,
    /// The newest record written by [`AuditLog::append_all_unsynced`] and
    /// not yet covered by an `fsync` (its anchor waits for that fsync).
    unsynced: Option<Head>,
    /// Why a background [`AuditLog::sync_pending`] failed: sticky, every
    /// later append is refused (after a failed fsync the kernel may have
    /// dropped the written pages, so the log on disk cannot be trusted to
    /// hold what was acknowledged; PostgreSQL stops for the same reason).
    sync_failed: Option<String>,
    /// This handle has written unsynced records, so every anchor it writes
    /// carries `interval` (see [`AnchorFile`]).
    interval_anchor: bool,
    /// Set by [`AuditLog::set_sole_writer`]: no other handle appends (the
    /// daemon holds the data dir lock), so an append skips re-reading the
    /// file's length and checks that the path still names this file at most
    /// every [`SOLE_WRITER_RECHECK`].
    sole_writer: bool,
    /// When the path was last confirmed to name this file.
    checked_at: Option<std::time::Instant>,
    /// Since when this (sole-writer) handle keeps the log's exclusive
    /// `flock` across unsynced appends, instead of a lock/unlock pair per
    /// append: released when the fsync of those records begins
    /// ([`AuditLog::begin_sync`]), after a synced append, on an error, and
    /// by the first append after [`WINDOW_LOCK_MAX`] — so a reader (`warden
    /// audit verify`/`tail`) waits about one sync interval at most, even
    /// when the fsync thread is stuck on the disk.
    window_lock: Option<std::time::Instant>,
    /// Highest seq this handle wrote into the head anchor: an fsync that
    /// finishes after a newer anchor was written must not move it back.
    anchored: std::cell::Cell<u64>,
    /// The head anchor file, kept open after its first write so an update
    /// is one `pwrite` (not open + write + stat + close on every commit).
    /// Dropped, so the next update opens the path afresh, whenever the
    /// log's path is re-checked (every append of a handle that is not the
    /// sole writer, once a second for the daemon's) and after a failed
    /// update: an anchor replaced or removed under the daemon is written
    /// again within a second.
    anchor: std::cell::RefCell<Option<File>>,
    /// Called with each record and its line once written (see [`AuditTap`]).
    tap: Option<AuditTap>,
    #[cfg(test)]
    fault: Option<Fault>,
}

/// What sees every record right after the log wrote it (the exporter):
/// the event and its exact line, without the newline. It runs under the
/// log's lock, so it must never block (the exporter only queues).
#[derive(Clone)]
pub struct AuditTap(pub std::sync::Arc<TapFn>);

/// The function behind an [`AuditTap`].
pub type TapFn = dyn Fn(&Event, &[u8]) + Send + Sync;

impl fmt::Debug for AuditTap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditTap")
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.release_window();
    }
}

/// An `fsync` of the records written unsynced, taken by
/// [`AuditLog::begin_sync`] under the log's lock and run without it, so
/// appends (session records) never wait behind the disk; its result goes
/// back to [`AuditLog::finish_sync`].
pub struct PendingSync {
    file: std::sync::Arc<File>,
    head: Head,
    #[cfg(test)]
    fail: bool,
}

impl PendingSync {
    /// The `fsync` itself (call it without holding the log's lock).
    pub fn run(&self) -> io::Result<()> {
        #[cfg(test)]
        if self.fail {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.sync_data()
    }
}

/// How often a sole writer confirms the log was not replaced under it.
const SOLE_WRITER_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a sole writer keeps the log's lock across appends (see
/// `AuditLog::window_lock`): twice the default sync interval.
const WINDOW_LOCK_MAX: std::time::Duration = std::time::Duration::from_millis(20);

impl AuditLog {
    /// Opens (creating it with mode 0600 if missing) the log at `path` for
    /// appending, and learns the last seq/hash from its tail. Fails if the
    /// last line is not a valid record or the head anchor shows that records
    /// were removed from the end or rewritten.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let head_path = anchor_path(path)?;
        let (file, created) = open_log_file(path)?;
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(AuditError::InvalidPath {
                path: path.to_path_buf(),
                detail: "is not a regular file".into(),
            });
        }
        if created {
            sync_dir(parent_dir(path)).map_err(io_err(parent_dir(path)))?;
        }
        let (head, known_len) = {
            let _lock = lock_exclusive(&file, path)?;
            let len = file.metadata().map_err(io_err(path))?.len();
            (load_head(&file, path, &head_path, len)?, len)
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            head_path,
            dev: meta.dev(),
            ino: meta.ino(),
            file: std::sync::Arc::new(file),
            head,
            known_len,
            unsynced: None,
            sync_failed: None,
            interval_anchor: false,
            sole_writer: false,
            checked_at: None,
            window_lock: None,
            anchored: std::cell::Cell::new(0),
            anchor: std::cell::RefCell::new(None),
            tap: None,
            #[cfg(test)]
            fault: None,
        })
    }

    #[allow(dead_code)] // API for callers; the daemon does not need it yet
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Declares this handle the only one appending to the file (the daemon,
    /// which holds the data dir lock for its lifetime): appends stop
    /// re-reading the file's length, and check that the path still names
    /// this file once a second instead of on every append.
    pub fn set_sole_writer(&mut self) {
        self.sole_writer = true;
    }

    /// Hands every record written from now on to `tap`, after it is written
    /// (with `sync`: after its fsync).
    pub fn set_tap(&mut self, tap: AuditTap) {
        self.tap = Some(tap);
    }

    fn run_tap(&self, events: &[Event], lines: &[u8], ends: &[usize]) {
        if let Some(tap) = &self.tap {
            let mut start = 0;
            for (event, &end) in events.iter().zip(ends) {
                if let Some(line) = lines.get(start..end) {
                    (tap.0)(event, line);
                }
                start = end + 1;
            }
        }
    }

    /// Appends one record and makes it durable (`fsync`) before returning it.
    /// On `Err` nothing was durably recorded (a partial write is truncated
    /// away) and the caller must refuse the audited action.
    pub fn append(&mut self, event: &Event) -> Result<Record, AuditError> {
        let mut records = self.append_all(std::slice::from_ref(event))?;
        records
            .pop()
            .ok_or_else(|| AuditError::Encode("no record was written".into()))
    }

    /// Appends `events` in order as consecutive records with one write, one
    /// `fsync` and one anchor update (group commit): all of them are durable
    /// when this returns `Ok`, none of them is acknowledged otherwise. The
    /// `fsync` also covers records written unsynced before.
    pub fn append_all(&mut self, events: &[Event]) -> Result<Vec<Record>, AuditError> {
        let mut records = Vec::with_capacity(events.len());
        self.append_with(events, true, Some(&mut records))?;
        Ok(records)
    }

    /// [`append_all`](Self::append_all) (`sync`) or
    /// [`append_all_unsynced`](Self::append_all_unsynced), for a caller that
    /// does not need the records back (nothing is cloned to build them).
    pub fn write_all(&mut self, events: &[Event], sync: bool) -> Result<(), AuditError> {
        self.append_with(events, sync, None)
    }

    /// As [`append_all`](Self::append_all), but without the `fsync`: when
    /// this returns `Ok` the records are written to the OS (a crash or kill
    /// of warden loses none of them; an OS crash or power loss before the
    /// next [`sync_pending`](Self::sync_pending) can). The head anchor
    /// follows at that fsync, so it never gets ahead of the durable log.
    pub fn append_all_unsynced(&mut self, events: &[Event]) -> Result<Vec<Record>, AuditError> {
        let mut records = Vec::with_capacity(events.len());
        self.append_with(events, false, Some(&mut records))?;
        Ok(records)
    }

    /// Whether records written by [`append_all_unsynced`](Self::append_all_unsynced)
    /// wait for an fsync.
    pub fn has_unsynced(&self) -> bool {
        self.unsynced.is_some()
    }

    /// Why a background [`sync_pending`](Self::sync_pending) failed, if one
    /// did (every append is refused from then on).
    pub fn sync_failure(&self) -> Option<&str> {
        self.sync_failed.as_deref()
    }

    /// `fsync`s the records written unsynced and moves the head anchor to
    /// the newest of them. A failure is sticky (see [`AuditError::SyncFailed`]):
    /// the records were acknowledged already, so they are left in place,
    /// and no further record is accepted.
    pub fn sync_pending(&mut self) -> Result<(), AuditError> {
        match self.begin_sync() {
            None => Ok(()),
            Some(pending) => {
                let res = pending.run();
                self.finish_sync(pending, res)
            }
        }
    }

    /// The first half of [`sync_pending`](Self::sync_pending): what to
    /// `fsync` (`None`: nothing is pending). Run it with
    /// [`PendingSync::run`] after releasing the lock that guards this log,
    /// then hand the result to [`finish_sync`](Self::finish_sync). Records
    /// appended meanwhile stay pending for the next sync.
    pub fn begin_sync(&mut self) -> Option<PendingSync> {
        // Readers may look while the disk works: what they see is written.
        self.release_window();
        let head = self.unsynced.clone()?;
        Some(PendingSync {
            file: self.file.clone(),
            head,
            #[cfg(test)]
            fail: matches!(self.fault, Some(Fault::Sync)),
        })
    }

    /// The second half of [`sync_pending`](Self::sync_pending): a failure
    /// is sticky; on success the records up to the synced head are durable
    /// and the head anchor moves to it (never back).
    pub fn finish_sync(
        &mut self,
        pending: PendingSync,
        res: io::Result<()>,
    ) -> Result<(), AuditError> {
        let path = self.path.as_path();
        if let Err(e) = res {
            let detail = describe_io(&e);
            self.sync_failed = Some(detail.clone());
            return Err(AuditError::SyncFailed {
                path: path.to_path_buf(),
                detail,
            });
        }
        let head = pending.head;
        if self.unsynced.as_ref().is_some_and(|u| u.seq <= head.seq) {
            self.unsynced = None;
        }
        if head.seq <= self.anchored.get() {
            return Ok(());
        }
        // Under the log's lock: the window's if an append holds it since.
        let _lock = match self.window_lock {
            Some(_) => None,
            None => Some(lock_exclusive(&self.file, path)?),
        };
        // Another handle that appended since has synced the whole file and
        // anchored a newer head: ours would move the anchor back.
        let len = if self.sole_writer {
            self.known_len
        } else {
            self.file.metadata().map_err(io_err(path))?.len()
        };
        if len == self.known_len {
            self.write_anchor(head.seq, &head.hash)?;
        }
        Ok(())
    }

    fn append_with(
        &mut self,
        events: &[Event],
        sync: bool,
        out: Option<&mut Vec<Record>>,
    ) -> Result<(), AuditError> {
        if let Some(detail) = &self.sync_failed {
            return Err(AuditError::SyncFailed {
                path: self.path.clone(),
                detail: detail.clone(),
            });
        }
        for event in events {
            validate_event(event)?;
        }
        if events.is_empty() {
            return Ok(());
        }
        let lock = match self.window_lock {
            Some(_) => None,
            None => Some(OwnedLock::exclusive(&self.file, &self.path)?),
        };
        let res = self.append_locked(events, sync, out);
        match (res.is_ok() && !sync && self.sole_writer, lock) {
            // Keep the lock for the appends until the fsync begins.
            (true, Some(lock)) => {
                lock.keep();
                self.window_lock = Some(std::time::Instant::now());
            }
            (true, None) => {
                if self
                    .window_lock
                    .is_some_and(|since| since.elapsed() >= WINDOW_LOCK_MAX)
                {
                    self.release_window();
                }
            }
            // Dropping `lock` (if taken here) releases it.
            (false, _) => self.release_window(),
        }
        res
    }

    /// Releases the lock kept across appends, if held.
    #[allow(clippy::incompatible_msrv)] // File::unlock: stable since Rust 1.89
    fn release_window(&mut self) {
        if self.window_lock.take().is_some() {
            // An unlock failure cannot be acted on; the lock dies with the fd.
            let _ = self.file.unlock();
        }
    }

    /// [`Self::append_with`] under the log's exclusive lock.
    fn append_locked(
        &mut self,
        events: &[Event],
        sync: bool,
        mut out: Option<&mut Vec<Record>>,
    ) -> Result<(), AuditError> {
        let path = self.path.as_path();
        let recheck = !self.sole_writer
            || self
                .checked_at
                .is_none_or(|t| t.elapsed() >= SOLE_WRITER_RECHECK);
        if recheck {
            self.check_same_file()?;
            self.checked_at = Some(std::time::Instant::now());
            // The anchor's path is looked up again at its next update.
            *self.anchor.get_mut() = None;
        }
        let len = if self.sole_writer {
            self.known_len
        } else {
            self.file.metadata().map_err(io_err(path))?.len()
        };
        if len != self.known_len {
            // Another handle appended (or something else changed the file):
            // learn the new tail under the lock so the chain stays linear.
            self.head = load_head(&self.file, path, &self.head_path, len)?;
            self.known_len = len;
            // Its anchor may lack `interval`: flag it again if unsynced.
            self.interval_anchor = false;
        }
        let now = time::OffsetDateTime::now_utc();
        let time = match crate::timefmt::format_micros_utc(now) {
            Some(t) => t,
            None => now.format(TIME_FORMAT).map_err(encode_err)?,
        };
        let mut head = self.head.clone();
        let mut records = Vec::with_capacity(if out.is_some() { events.len() } else { 0 });
        let mut lines = Vec::with_capacity(512 * events.len());
        // Where each record's line ends in `lines`, for the tap.
        let mut ends = Vec::with_capacity(if self.tap.is_some() { events.len() } else { 0 });
        for event in events {
            let seq = head
                .seq
                .checked_add(1)
                .ok_or_else(|| AuditError::Encode("sequence number overflow".into()))?;
            let (hash, line) = if out.is_some() {
                let (record, line) = encode_record(seq, &time, event, &head.hash)?;
                let hash = record.hash.clone();
                records.push(record);
                (hash, line)
            } else {
                encode_line(seq, &time, event, &head.hash)?
            };
            if line.len() > MAX_RECORD_BYTES {
                return Err(AuditError::RecordTooLarge {
                    size: line.len(),
                    max: MAX_RECORD_BYTES,
                });
            }
            lines.extend_from_slice(&line);
            if self.tap.is_some() {
                ends.push(lines.len());
            }
            lines.push(b'\n');
            head = Head { seq, hash };
        }

        if let Err(e) = self.write_line(&lines) {
            self.known_len = rollback(&self.file, len);
            return Err(io_err(path)(e));
        }
        if !sync {
            if !self.interval_anchor && self.head.seq > 0 {
                // Before the first unsynced record: a durable log up to the
                // current head and a durable anchor that says records after
                // it may be unsynced, so neither a crash of warden nor one
                // of the OS makes the tail look inserted.
                self.interval_anchor = true;
                let flag = self
                    .sync_log()
                    .map_err(io_err(path))
                    .and_then(|()| self.write_anchor_durable(self.head.seq, &self.head.hash, true));
                if let Err(e) = flag {
                    self.interval_anchor = false;
                    self.known_len = rollback(&self.file, len);
                    return Err(e);
                }
            }
            self.interval_anchor |= self.head.seq == 0;
            self.head = head.clone();
            self.unsynced = Some(head);
            self.known_len = len + lines.len() as u64;
            if let Some(out) = out.as_deref_mut() {
                out.append(&mut records);
            }
            self.run_tap(events, &lines, &ends);
            return Ok(());
        }
        if let Err(e) = self.sync_log() {
            if self.unsynced.is_some() {
                // Acknowledged records before this batch may be lost too.
                self.sync_failed = Some(describe_io(&e));
            }
            self.known_len = rollback(&self.file, len);
            return Err(io_err(path)(e));
        }
        if let Err(e) = self.write_anchor(head.seq, &head.hash) {
            self.known_len = rollback(&self.file, len);
            return Err(e);
        }
        self.head = head;
        self.unsynced = None;
        self.known_len = len + lines.len() as u64;
        if let Some(out) = out {
            out.append(&mut records);
        }
        self.run_tap(events, &lines, &ends);
        Ok(())
    }

    fn check_same_file(&self) -> Result<(), AuditError> {
        let replaced = || AuditError::Replaced {
            path: self.path.clone(),
        };
        let ours = self.file.metadata().map_err(io_err(&self.path))?;
        if ours.nlink() == 0 {
            return Err(replaced());
        }
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => Ok(()),
            Ok(_) => Err(replaced()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(replaced()),
            Err(e) => Err(io_err(&self.path)(e)),
        }
    }

    fn write_line(&self, line: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if let Some(Fault::PartialWrite(n)) = self.fault {
            (&*self.file).write_all(line.get(..n).unwrap_or(line))?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        (&*self.file).write_all(line)
    }

    fn sync_log(&self) -> io::Result<()> {
        #[cfg(test)]
        if let Some(Fault::Sync) = self.fault {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.sync_data()
    }

    /// Overwrites the head anchor in place: one `pwrite` of a fixed-width
    /// line at offset 0, no temp file, no rename, no `fsync`.
    ///
    /// * The line is [`ANCHOR_WIDTH`] bytes, far below one 512-byte sector,
    ///   so an OS crash leaves either the old or the new anchor (the sector
    ///   atomicity PostgreSQL relies on for `pg_control`), never a mix.
    /// * It is written after the records' `fsync`, so the anchor never gets
    ///   ahead of the durable log; losing the write in an OS crash only makes
    ///   `verify` note a lagging anchor.
    /// * Nothing is allocated after the first append, so a full disk fails
    ///   the log write, not the anchor.
    /// * The file stays open between updates (see `AuditLog::anchor`), so
    ///   a commit costs one system call here.
    ///
    /// An error leaves the old anchor in place (the write is never partial
    /// in practice; if it were, the next open refuses the log as unreadable
    /// evidence rather than trusting it).
    fn write_anchor(&self, seq: u64, hash: &str) -> Result<(), AuditError> {
        self.write_anchor_durable(seq, hash, false)
    }

    /// [`write_anchor`](Self::write_anchor), with an `fsync` of the anchor
    /// when `durable`.
    fn write_anchor_durable(&self, seq: u64, hash: &str, durable: bool) -> Result<(), AuditError> {
        let head = &self.head_path;
        #[cfg(test)]
        if let Some(Fault::Anchor) = self.fault {
            return Err(io_err(head)(io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        let content = anchor_line(seq, hash, self.interval_anchor)?;
        // Taken out while in use: after a failed update the slot stays
        // empty, so the next update opens the path afresh.
        let mut slot = self.anchor.borrow_mut();
        let f = match slot.take() {
            Some(f) => {
                f.write_all_at(&content, 0).map_err(io_err(head))?;
                f
            }
            None => open_anchor(head, &content)?,
        };
        if durable {
            f.sync_data().map_err(io_err(head))?;
        }
        *slot = Some(f);
        self.anchored.set(self.anchored.get().max(seq));
        Ok(())
    }
}

/// Opens (creating it, mode 0600, never through a symlink) the head anchor
/// and writes `content` at offset 0; a longer file (an anchor written by
/// hand or by a tool) is cut to `content`'s length, else its trailing
/// bytes would make it unparsable.
fn open_anchor(head: &Path, content: &[u8]) -> Result<File, AuditError> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(head)
        .map_err(io_err(head))?;
    f.write_all_at(content, 0).map_err(io_err(head))?;
    if f.metadata().map_err(io_err(head))?.len() != content.len() as u64 {
        f.set_len(content.len() as u64).map_err(io_err(head))?;
    }
    Ok(f)
}

/// Width of the head anchor file: `{"seq":N,"hash":"…"}`, padded with
/// spaces, and a newline. The longest content (a 20-digit seq and
/// `"interval":true`) is 118 bytes.
const ANCHOR_WIDTH: usize = 128;

/// The anchor file's whole content for (seq, hash), [`ANCHOR_WIDTH`] bytes.
fn anchor_line(seq: u64, hash: &str, interval: bool) -> Result<Vec<u8>, AuditError> {
    let mut content = serde_json::to_vec(&AnchorFile {
        seq,
        hash: hash.to_owned(),
        interval,
    })
    .map_err(encode_err)?;
    if content.len() >= ANCHOR_WIDTH {
        return Err(AuditError::Encode(format!(
            "head anchor of {} bytes does not fit in {ANCHOR_WIDTH}",
            content.len()
        )));
    }
    content.resize(ANCHOR_WIDTH - 1, b' ');
    content.push(b'\n');
    Ok(content)
}

/// Best effort: cuts the log back to `len` (and forces that to disk) so a
/// failed append leaves no partial or unacknowledged record behind. Returns
/// the length the writer should assume: if the truncation failed too, an
/// impossible one, which forces a tail re-read (and so a refusal of a damaged
/// tail) on the next append.
fn rollback(file: &File, len: u64) -> u64 {
    if file.set_len(len).is_ok() && file.sync_data().is_ok() {
        len
    } else {
        u64::MAX
    }
}

/// Opens the log for reading and appending; creates it (0600) if missing.
fn open_log_file(path: &Path) -> Result<(File, bool), AuditError> {
    let flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => return Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(flags)
        .open(path)
        .map_err(io_err(path))?;
    Ok((f, false))
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Meta {
    seq: u64,
    prev: Digest32,
    hash: Digest32,
}

/// Verifies the whole chain and the head anchor. Tampering is reported in
/// [`VerifyReport::problem`] (the first bad line); `Err` means I/O failure.
pub fn verify(log_path: &Path) -> Result<VerifyReport, AuditError> {
    let head_path = anchor_path(log_path)?;
    let file = open_for_read(log_path)?;
    let mut notes = Vec::new();
    // Snapshot length and anchor together, so a concurrent append can
    // neither show up half-written nor race the anchor.
    let (len, anchor) = {
        let lock = lock_shared(&file);
        if lock.is_none() {
            notes.push(
                "could not take a shared lock on the log; a concurrent append may be reported as a problem"
                    .to_owned(),
            );
        }
        let len = file.metadata().map_err(io_err(log_path))?.len();
        (len, read_anchor(&head_path)?)
    };
    let anchor_ref = match &anchor {
        AnchorState::Present(a) => Some(a),
        _ => None,
    };

    let mut lines = LineReader::new(&file, len).map_err(io_err(log_path))?;
    let mut expected: u64 = 1;
    let mut prev_hash = ZERO_DIGEST;
    // (hash, prev) of the record with seq anchor.seq; hash of the next one.
    let mut at_anchor: Option<(Digest32, Digest32)> = None;
    let mut after_anchor: Option<Digest32> = None;
    // Time of the record after the anchor, and whether every later one
    // shares it (they were written by one append).
    let mut tail_time: Option<String> = None;
    let mut tail_one_append = true;
    let mut chain_break: Option<usize> = None;
    while let Some((line_no, bytes, terminated)) = lines.next_line().map_err(io_err(log_path))? {
        match check_line(bytes, terminated) {
            Err((kind, detail)) => {
                return Ok(VerifyReport {
                    records: line_no - 1,
                    last_hash: hex::encode(prev_hash),
                    problem: Some(Tamper {
                        line: line_no,
                        kind,
                        detail,
                    }),
                    notes,
                });
            }
            Ok(c) if c.record.seq == expected && c.prev == prev_hash => {
                if let Some(a) = anchor_ref {
                    if c.record.seq == a.seq {
                        at_anchor = Some((c.hash, c.prev));
                    } else if c.record.seq == a.seq + 1 {
                        after_anchor = Some(c.hash);
                        tail_time = Some(c.record.time.clone());
                    } else if c.record.seq > a.seq
                        && tail_time.as_deref() != Some(c.record.time.as_str())
                    {
                        tail_one_append = false;
                    }
                }
                expected += 1;
                prev_hash = c.hash;
            }
            Ok(_) => {
                chain_break = Some(line_no as usize);
                break;
            }
        }
    }
    drop(lines);

    if let Some(k) = chain_break {
        let index = build_index(&file, len).map_err(io_err(log_path))?;
        let (line, kind, detail) = classify(&index, k, anchor_ref);
        let records = line.saturating_sub(1);
        return Ok(VerifyReport {
            records: records as u64,
            last_hash: hex::encode(prefix_hash(&index, records)),
            problem: Some(Tamper {
                line: line as u64,
                kind,
                detail,
            }),
            notes,
        });
    }

    let records = expected - 1;
    let mut report = VerifyReport {
        records,
        last_hash: hex::encode(prev_hash),
        problem: None,
        notes,
    };
    match anchor {
        AnchorState::Missing => {
            if records > 0 {
                report.notes.push(format!(
                    "no head anchor ({}): removal of records from the end cannot be detected",
                    head_path.display()
                ));
            }
        }
        AnchorState::Invalid(why) => report.notes.push(format!(
            "head anchor {} is unreadable ({why}): removal of records from the end cannot be detected",
            head_path.display()
        )),
        AnchorState::Present(a) => {
            let after = after_anchor.map(|hash| (hash, tail_one_append));
            check_against_anchor(&mut report, &a, at_anchor, after);
        }
    }
    Ok(report)
}

/// `after_anchor`: the hash of the record after the anchored one, and
/// whether all records after the anchor came from one append.
fn check_against_anchor(
    report: &mut VerifyReport,
    a: &Anchor,
    at_anchor: Option<(Digest32, Digest32)>,
    after_anchor: Option<(Digest32, bool)>,
) {
    let n = report.records;
    if a.seq > n {
        let detail = if n == 0 {
            format!(
                "all records were removed; the head anchor records seq {}",
                a.seq
            )
        } else {
            format!(
                "records after line {n} were removed; the head anchor records seq {}",
                a.seq
            )
        };
        report.problem = Some(Tamper {
            line: n + 1,
            kind: TamperKind::Truncated,
            detail,
        });
        return;
    }
    if at_anchor.map(|(hash, _)| hash) != Some(a.hash) {
        // In a clean chain, seq == line number.
        report.records = a.seq - 1;
        report.last_hash = hex::encode(at_anchor.map_or(ZERO_DIGEST, |(_, prev)| prev));
        report.problem = Some(Tamper {
            line: a.seq,
            kind: TamperKind::Modified,
            detail: format!(
                "record seq {} does not match the head anchor: the log was rewritten at or before this line",
                a.seq
            ),
        });
        return;
    }
    let ahead = n - a.seq;
    let one_append = after_anchor.is_some_and(|(_, one)| one);
    if ahead == 0 {
        return;
    }
    if ahead == 1 {
        report.notes.push(format!(
            "the last record (seq {n}) is newer than the head anchor (seq {}): an append was interrupted before the anchor was updated",
            a.seq
        ));
    } else if one_append {
        report.notes.push(format!(
            "the last {ahead} records (seq {} to {n}, one group commit) are newer than the head anchor: an append was interrupted before the anchor was updated",
            a.seq + 1
        ));
    } else if a.interval {
        report.notes.push(format!(
            "{ahead} records (seq {} to {n}) are newer than the head anchor: written with audit.sync = \"interval\", they were not yet fsynced and anchored when warden stopped",
            a.seq + 1
        ));
    } else {
        report.records = a.seq + 1;
        if let Some((h, _)) = after_anchor {
            report.last_hash = hex::encode(h);
        }
        report.problem = Some(Tamper {
            line: a.seq + 2,
            kind: TamperKind::Inserted,
            detail: format!(
                "{ahead} records follow the head anchor's seq {}; an interrupted append leaves only records of one group commit (one timestamp), so the records from this line on were added without warden",
                a.seq
            ),
        });
    }
}

/// Self-check of every line (second pass, only after a chain break).
fn build_index(file: &File, len: u64) -> io::Result<Vec<Option<Meta>>> {
    let mut lines = LineReader::new(file, len)?;
    let mut index = Vec::new();
    while let Some((_, bytes, terminated)) = lines.next_line()? {
        index.push(check_line(bytes, terminated).ok().map(|c| Meta {
            seq: c.record.seq,
            prev: c.prev,
            hash: c.hash,
        }));
    }
    Ok(index)
}

fn meta_at(index: &[Option<Meta>], line: usize) -> Option<&Meta> {
    line.checked_sub(1)
        .and_then(|i| index.get(i))
        .and_then(Option::as_ref)
}

/// Hash of line `line` of the intact prefix (genesis for line 0).
fn prefix_hash(index: &[Option<Meta>], line: usize) -> Digest32 {
    meta_at(index, line).map_or(ZERO_DIGEST, |m| m.hash)
}

/// Classifies a chain break found at line `k`: lines `1..k` are intact with
/// seq == line number, and line `k` passed its self-check but does not link.
/// Returns (first bad line, kind, detail).
fn classify(
    index: &[Option<Meta>],
    k: usize,
    anchor: Option<&Anchor>,
) -> (usize, TamperKind, String) {
    let Some(m) = meta_at(index, k).copied() else {
        return (
            k,
            TamperKind::Modified,
            "record does not link to the record before it".into(),
        );
    };
    let e = k as u64;
    let h_prev = prefix_hash(index, k - 1);
    let is_last = k == index.len();
    let next = meta_at(index, k + 1).copied();
    // Does the rest of the chain continue from `m` (the following line links
    // to it, or it is the last line and the head anchor vouches for it)?
    let continues_from = |m: &Meta| {
        next.is_some_and(|n| n.seq == m.seq + 1 && n.prev == m.hash)
            || (is_last && anchor.is_some_and(|a| a.seq == m.seq && a.hash == m.hash))
    };

    if m.seq == e {
        // Right seq, wrong prev.
        if next.is_some_and(|n| n.seq == e && n.prev == h_prev) {
            return (
                k,
                TamperKind::Inserted,
                format!(
                    "forged record inserted: it does not link to line {}, but the next line carries the same seq {e} and does",
                    k - 1
                ),
            );
        }
        if k >= 2 && continues_from(&m) {
            return (
                k - 1,
                TamperKind::Modified,
                format!(
                    "record was rewritten: line {k}, from which the chain continues, records a different hash for its predecessor"
                ),
            );
        }
        return (
            k,
            TamperKind::Modified,
            "chain break: its prev does not match the hash of the line before; the record before it was altered or a forged record was inserted"
                .into(),
        );
    }

    if m.seq < e {
        let s = usize::try_from(m.seq).unwrap_or(0).max(1);
        if meta_at(index, s).is_some_and(|o| o.hash == m.hash) {
            return (
                k,
                TamperKind::Inserted,
                format!("duplicate: exact copy of line {s} (seq {})", m.seq),
            );
        }
        if m.prev == prefix_hash(index, s - 1) {
            // Two records claim seq s after line s-1: which branch is real?
            if continues_from(&m) {
                let what = if s + 1 == k {
                    format!(
                        "forged record inserted: line {k} carries the same seq {}",
                        m.seq
                    )
                } else {
                    format!(
                        "forged records inserted (lines {s}..{}): line {k} carries seq {}",
                        k - 1,
                        m.seq
                    )
                };
                return (
                    s,
                    TamperKind::Inserted,
                    format!(
                        "{what}, also links to line {}, and the rest of the chain continues from it",
                        s - 1
                    ),
                );
            }
            return (
                k,
                TamperKind::Inserted,
                format!(
                    "forged or replayed record: seq {} was already used at line {s}",
                    m.seq
                ),
            );
        }
        return (
            k,
            TamperKind::Inserted,
            format!(
                "duplicate seq: seq {} was already used at line {s}; this record is a copy or a forgery",
                m.seq
            ),
        );
    }

    // m.seq > e: a jump forward.
    if let Some((j, o)) = index
        .iter()
        .enumerate()
        .filter(|(i, _)| i + 1 != k)
        .find_map(|(i, o)| o.filter(|o| o.seq == m.seq).map(|o| (i + 1, o)))
    {
        let detail = if o.hash == m.hash {
            format!(
                "duplicate: exact copy of line {j} (seq {}) placed out of order",
                m.seq
            )
        } else {
            format!(
                "seq {} also appears at line {j}: this record is a copy or a forgery",
                m.seq
            )
        };
        return (k, TamperKind::Inserted, detail);
    }
    let later_expected = index
        .iter()
        .enumerate()
        .skip(k)
        .find(|(_, o)| o.is_some_and(|o| o.seq == e))
        .map(|(i, _)| i + 1);
    let has_predecessor = index
        .iter()
        .flatten()
        .any(|o| o.seq.checked_add(1) == Some(m.seq) && o.hash == m.prev);
    match later_expected {
        Some(l) if has_predecessor => (
            k,
            TamperKind::Reordered,
            format!("record seq {e} appears at line {l}, after seq {}", m.seq),
        ),
        Some(l) => (
            k,
            TamperKind::Inserted,
            format!(
                "forged record inserted: no record links to its seq {}, and the expected seq {e} follows at line {l}",
                m.seq
            ),
        ),
        None => {
            let present: HashSet<u64> = index.iter().flatten().map(|o| o.seq).collect();
            let mut last_missing = e;
            while last_missing + 1 < m.seq && !present.contains(&(last_missing + 1)) {
                last_missing += 1;
            }
            let detail = if last_missing == e {
                format!("record {e} is missing before this line")
            } else {
                format!("records {e}..{last_missing} are missing before this line")
            };
            (k, TamperKind::Removed, detail)
        }
    }
}

// ---------------------------------------------------------------------------
// Reading and display
// ---------------------------------------------------------------------------

/// Reads the records of the log (the last `last_n` ones if given), for
/// `warden audit tail`. Each returned line is self-checked (hash, schema);
/// the chain is not: use [`verify`] for that. A damaged line among those
/// returned gives [`AuditError::Corrupt`].
pub fn read_records(log_path: &Path, last_n: Option<usize>) -> Result<Vec<Record>, AuditError> {
    if last_n == Some(0) {
        return Ok(Vec::new());
    }
    let file = open_for_read(log_path)?;
    let len = {
        let _lock = lock_shared(&file);
        file.metadata().map_err(io_err(log_path))?.len()
    };
    let mut lines = LineReader::new(&file, len).map_err(io_err(log_path))?;
    let mut kept: VecDeque<(u64, Vec<u8>, bool)> = VecDeque::new();
    while let Some((line_no, bytes, terminated)) = lines.next_line().map_err(io_err(log_path))? {
        if let Some(n) = last_n {
            if kept.len() == n {
                kept.pop_front();
            }
        }
        kept.push_back((line_no, bytes.to_vec(), terminated));
    }
    kept.into_iter()
        .map(|(line, bytes, terminated)| {
            check_line(&bytes, terminated)
                .map(|c| c.record)
                .map_err(|(_, detail)| AuditError::Corrupt {
                    path: log_path.to_path_buf(),
                    line,
                    detail,
                })
        })
        .collect()
}

/// Checks one record line on its own (hash, schema, canonical form; not
/// the chain), for copies of a log kept elsewhere (the fleet's audit copy).
/// The error names what is wrong with the line, never its content.
pub fn parse_line(line: &[u8]) -> Result<Record, String> {
    check_line(line, true)
        .map(|c| c.record)
        .map_err(|(_, detail)| detail)
}

/// The seq of the newest record according to the log's head anchor, if it
/// has a valid one (cheap: one small read).
pub fn anchored_seq(log_path: &Path) -> Option<u64> {
    match read_anchor(&anchor_path(log_path).ok()?) {
        Ok(AnchorState::Present(a)) => Some(a.seq),
        _ => None,
    }
}

/// Escapes control and bidi-override characters so a logged string cannot
/// break the line or drive the terminal.
fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let dangerous = c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c);
        if dangerous {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`escape_controls`], and quoted if empty or containing whitespace, so a
/// value always reads as one token.
fn clean(s: &str) -> String {
    let out = escape_controls(s);
    if out.is_empty() || out.chars().any(char::is_whitespace) {
        format!("\"{}\"", out.replace('"', "\\\""))
    } else {
        out
    }
}

/// One human-readable line, e.g.
/// `2026-11-25T19:50:00Z #12 admin uid=0(root) secret.put orders-db/app env=prod v3 allow — reason`.
pub fn format_record_human(r: &Record) -> String {
    let time = time::PrimitiveDateTime::parse(&r.time, TIME_FORMAT)
        .ok()
        .and_then(|t| t.format(HUMAN_TIME_FORMAT).ok())
        .unwrap_or_else(|| clean(&r.time));
    let mut parts = vec![
        time,
        format!("#{}", r.seq),
        r.actor.kind.as_str().to_owned(),
    ];
    let a = &r.actor;
    match (a.uid, &a.user) {
        (Some(uid), Some(user)) => parts.push(format!("uid={uid}({})", clean(user))),
        (Some(uid), None) => parts.push(format!("uid={uid}")),
        (None, Some(user)) => parts.push(format!("user={}", clean(user))),
        (None, None) => {}
    }
    if let Some(pid) = a.pid {
        parts.push(format!("pid={pid}"));
    }
    if let Some(exe) = &a.exe {
        parts.push(format!("exe={}", clean(exe)));
    }
    if let Some(w) = &a.workload {
        parts.push(format!("workload={}", clean(w)));
    }
    parts.push(clean(&r.action));
    let t = &r.target;
    if let Some(s) = &t.secret {
        parts.push(clean(s));
    }
    if let Some(env) = &t.env {
        parts.push(format!("env={}", clean(env)));
    }
    if let Some(v) = t.version {
        parts.push(format!("v{v}"));
    }
    if let Some(route) = &t.route {
        parts.push(format!("route={}", clean(route)));
    }
    if let Some(d) = &t.detail {
        parts.push(format!("detail={}", clean(d)));
    }
    parts.push(r.decision.as_str().to_owned());
    let mut out = parts.join(" ");
    if !r.reason.is_empty() {
        out.push_str(" — ");
        out.push_str(&escape_controls(&r.reason));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    const FIXED_TIME: &str = "2026-01-01T00:00:00.000000Z";

    fn actor_of(kind: ActorKind) -> Actor {
        Actor {
            kind,
            uid: None,
            user: None,
            pid: None,
            exe: None,
            workload: None,
        }
    }

    fn event(i: u32) -> Event {
        let mut actor = actor_of(ActorKind::Admin);
        actor.uid = Some(0);
        actor.user = Some("root".into());
        Event {
            actor,
            action: "secret.put".into(),
            target: Target {
                secret: Some(format!("db-{i}")),
                env: Some("prod".into()),
                version: Some(i),
                ..Target::default()
            },
            decision: Decision::Allow,
            reason: "test".into(),
        }
    }

    fn new_log(n: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 1..=n {
            log.append(&event(i)).unwrap();
        }
        (dir, path)
    }

    /// The tap sees each written record's exact line, in order, for
    /// durable, unsynced and group appends; a failed append shows nothing.
    #[test]
    fn the_tap_sees_every_written_line_exactly() {
        let (_dir, path) = new_log(1);
        let mut log = AuditLog::open(&path).unwrap();
        type Seen = Vec<(String, Vec<u8>)>;
        let seen: std::sync::Arc<std::sync::Mutex<Seen>> = Default::default();
        let s = seen.clone();
        log.set_tap(AuditTap(std::sync::Arc::new(
            move |e: &Event, line: &[u8]| {
                s.lock()
                    .unwrap()
                    .push((e.target.secret.clone().unwrap_or_default(), line.to_vec()));
            },
        )));
        log.append(&event(2)).unwrap();
        log.append_all(&[event(3), event(4)]).unwrap();
        log.write_all(&[event(5)], false).unwrap();
        log.write_all(&[event(6), event(7)], true).unwrap();
        let mut bad = event(8);
        bad.reason = "x".repeat(MAX_RECORD_BYTES + 1);
        assert!(log.append(&bad).is_err());
        let seen = seen.lock().unwrap().clone();
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["db-2", "db-3", "db-4", "db-5", "db-6", "db-7"]);
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 7);
        for (i, (_, line)) in seen.iter().enumerate() {
            assert_eq!(line, &lines[i + 1]);
        }
    }

    fn read_lines(path: &Path) -> Vec<Vec<u8>> {
        let data = fs::read(path).unwrap();
        let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        assert_eq!(lines.pop(), Some(Vec::new()), "log must end with a newline");
        lines
    }

    fn write_lines(path: &Path, lines: &[Vec<u8>]) {
        let mut data = Vec::new();
        for l in lines {
            data.extend_from_slice(l);
            data.push(b'\n');
        }
        fs::write(path, data).unwrap();
    }

    fn hash_of(line: &[u8]) -> String {
        serde_json::from_slice::<Record>(line).unwrap().hash
    }

    /// A forged line with a correctly computed self-hash.
    fn forge(seq: u64, prev: &str, reason: &str) -> Vec<u8> {
        forge_at(seq, prev, reason, FIXED_TIME)
    }

    fn forge_at(seq: u64, prev: &str, reason: &str, time: &str) -> Vec<u8> {
        let mut ev = event(7);
        ev.reason = reason.into();
        encode_record(seq, time, &ev, prev).unwrap().1
    }

    fn problem(path: &Path) -> Tamper {
        let report = verify(path).unwrap();
        match report.problem {
            Some(t) => t,
            None => panic!("expected a problem, got {report:?}"),
        }
    }

    fn assert_problem(path: &Path, line: u64, kind: TamperKind) -> Tamper {
        let t = problem(path);
        assert_eq!((t.line, t.kind), (line, kind), "{t}");
        t
    }

    fn assert_clean(path: &Path, records: u64) -> VerifyReport {
        let report = verify(path).unwrap();
        assert!(report.problem.is_none(), "{report:?}");
        assert_eq!(report.records, records);
        report
    }

    #[test]
    fn line_format_hash_and_chain() {
        let (_dir, path) = new_log(3);
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 3);
        let mut prev = GENESIS_HASH.to_owned();
        for (i, line) in lines.iter().enumerate() {
            let text = std::str::from_utf8(line).unwrap();
            let keys = [
                "{\"seq\":",
                ",\"time\":\"",
                ",\"actor\":{",
                ",\"action\":\"",
                ",\"target\":{",
                ",\"decision\":\"",
                ",\"reason\":\"",
                ",\"prev\":\"",
                ",\"hash\":\"",
            ];
            let positions: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
            assert!(text.starts_with(&format!("{{\"seq\":{},", i + 1)));
            let rec: Record = serde_json::from_slice(line).unwrap();
            assert_eq!(rec.seq, i as u64 + 1);
            assert_eq!(rec.prev, prev);
            let cut = text.find(",\"hash\":\"").unwrap();
            let body = format!("{}}}", &text[..cut]);
            assert_eq!(
                rec.hash,
                hex::encode(digest(&SHA256, body.as_bytes()).as_ref())
            );
            assert!(text.ends_with(&format!(",\"hash\":\"{}\"}}", rec.hash)));
            assert_eq!(rec.time.len(), "2026-11-25T19:50:00.123456Z".len());
            assert!(rec.time.ends_with('Z'));
            assert!(!text.contains("\"pid\""), "None fields are skipped");
            assert!(text.contains("\"actor\":{\"kind\":\"admin\",\"uid\":0,\"user\":\"root\"}"));
            assert!(text.contains("\"decision\":\"allow\""));
            prev = rec.hash;
        }
        let anchor = fs::read_to_string(anchor_path(&path).unwrap()).unwrap();
        assert_eq!(anchor.len(), ANCHOR_WIDTH);
        assert!(anchor.ends_with(" \n"), "{anchor:?}");
        assert_eq!(
            anchor.trim_end(),
            format!("{{\"seq\":3,\"hash\":\"{prev}\"}}")
        );
        assert_eq!(GENESIS_HASH.len(), 64);
        for p in [path.clone(), anchor_path(&path).unwrap()] {
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            anchor_path(&path).unwrap().file_name().unwrap(),
            "audit.log.head"
        );
    }

    #[test]
    fn returned_record_is_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        let r1 = log.append(&event(1)).unwrap();
        let r2 = log.append(&event(2)).unwrap();
        assert_eq!(log.path(), path.as_path());
        let lines = read_lines(&path);
        assert_eq!(serde_json::to_vec(&r1).unwrap(), lines[0]);
        assert_eq!(serde_json::to_vec(&r2).unwrap(), lines[1]);
        assert_eq!(r2.prev, r1.hash);
        assert_eq!(read_records(&path, None).unwrap(), vec![r1, r2]);
    }

    #[test]
    fn reopen_continues_the_chain() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        let r = log.append(&event(3)).unwrap();
        assert_eq!(r.seq, 3);
        let report = assert_clean(&path, 3);
        assert_eq!(report.last_hash, r.hash);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
    }

    #[test]
    fn empty_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        AuditLog::open(&path).unwrap();
        let report = assert_clean(&path, 0);
        assert_eq!(report.last_hash, GENESIS_HASH);
        assert!(report.notes.is_empty());
    }

    #[test]
    fn deleting_any_line_is_detected() {
        let (_dir, path) = new_log(20);
        let orig = read_lines(&path);
        for j in 0..20 {
            let mut lines = orig.clone();
            lines.remove(j);
            write_lines(&path, &lines);
            let line = j as u64 + 1;
            if j < 19 {
                let t = assert_problem(&path, line, TamperKind::Removed);
                assert_eq!(
                    t.detail,
                    format!("record {line} is missing before this line")
                );
            } else {
                let t = assert_problem(&path, 20, TamperKind::Truncated);
                assert_eq!(
                    t.detail,
                    "records after line 19 were removed; the head anchor records seq 20"
                );
            }
        }
        let mut lines = orig.clone();
        lines.drain(4..7);
        write_lines(&path, &lines);
        let t = assert_problem(&path, 5, TamperKind::Removed);
        assert_eq!(
            t.to_string(),
            "line 5: records 5..7 are missing before this line"
        );
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 4);
        assert_eq!(report.last_hash, hash_of(&orig[3]));
    }

    #[test]
    fn reordering_is_detected() {
        let (_dir, path) = new_log(20);
        let orig = read_lines(&path);
        for j in 0..19 {
            let mut lines = orig.clone();
            lines.swap(j, j + 1);
            write_lines(&path, &lines);
            assert_problem(&path, j as u64 + 1, TamperKind::Reordered);
        }
        let mut lines = orig.clone();
        lines.swap(2, 3);
        write_lines(&path, &lines);
        let t = assert_problem(&path, 3, TamperKind::Reordered);
        assert_eq!(t.detail, "record seq 3 appears at line 4, after seq 4");

        // Move record 3 after record 5: 1,2,4,5,3,6,...
        let mut lines = orig.clone();
        let three = lines.remove(2);
        lines.insert(4, three);
        write_lines(&path, &lines);
        let t = assert_problem(&path, 3, TamperKind::Reordered);
        assert_eq!(t.detail, "record seq 3 appears at line 5, after seq 4");

        // Move record 5 before record 3: 1,2,5,3,4,6,...
        let mut lines = orig.clone();
        let five = lines.remove(4);
        lines.insert(2, five);
        write_lines(&path, &lines);
        assert_problem(&path, 3, TamperKind::Reordered);

        let mut lines = orig.clone();
        lines.reverse();
        write_lines(&path, &lines);
        assert_problem(&path, 1, TamperKind::Reordered);
    }

    #[test]
    fn inserted_copies_are_detected() {
        let (_dir, path) = new_log(20);
        let orig = read_lines(&path);
        for src in 0..20 {
            for pos in 0..=20 {
                let mut lines = orig.clone();
                lines.insert(pos, orig[src].clone());
                write_lines(&path, &lines);
                // A copy placed right before its original makes two identical
                // adjacent lines: the second one is reported.
                let expect = if pos == src { pos + 2 } else { pos + 1 };
                let t = assert_problem(&path, expect as u64, TamperKind::Inserted);
                assert!(t.detail.contains("copy"), "{t}");
            }
        }
    }

    #[test]
    fn inserted_forged_records_are_detected() {
        let (_dir, path) = new_log(20);
        let orig = read_lines(&path);
        let hash_before = |pos: usize| {
            if pos == 0 {
                GENESIS_HASH.to_owned()
            } else {
                hash_of(&orig[pos - 1])
            }
        };
        let bogus_prev = hex::encode(sha256(b"not a record"));
        for pos in 0..20 {
            let line = pos as u64 + 1;
            // Fully consistent forgery: right seq, right prev, right hash.
            let mut lines = orig.clone();
            lines.insert(pos, forge(line, &hash_before(pos), "forged"));
            write_lines(&path, &lines);
            let t = assert_problem(&path, line, TamperKind::Inserted);
            assert!(t.detail.contains("forged"), "{t}");

            // Right seq, wrong prev.
            let mut lines = orig.clone();
            lines.insert(pos, forge(line, &bogus_prev, "forged"));
            write_lines(&path, &lines);
            assert_problem(&path, line, TamperKind::Inserted);

            // A seq that never existed.
            let mut lines = orig.clone();
            lines.insert(pos, forge(999, &bogus_prev, "forged"));
            write_lines(&path, &lines);
            assert_problem(&path, line, TamperKind::Inserted);

            // An old seq replayed later.
            if pos >= 2 {
                let mut lines = orig.clone();
                lines.insert(pos, forge(1, GENESIS_HASH, "replayed"));
                write_lines(&path, &lines);
                assert_problem(&path, line, TamperKind::Inserted);
            }
        }
        // Two consistent forgeries in a row in the middle.
        let mut lines = orig.clone();
        let f1 = forge(6, &hash_of(&orig[4]), "forged one");
        let f2 = forge(7, &hash_of(&f1), "forged two");
        lines.insert(5, f2);
        lines.insert(5, f1);
        write_lines(&path, &lines);
        let t = assert_problem(&path, 6, TamperKind::Inserted);
        assert!(t.detail.contains("lines 6..7"), "{t}");

        // A consistent forgery appended at the very end looks exactly like
        // an append that crashed before the anchor update: only a note.
        let mut lines = orig.clone();
        let f21 = forge(21, &hash_of(&orig[19]), "appended");
        lines.push(f21.clone());
        write_lines(&path, &lines);
        let report = assert_clean(&path, 21);
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        // Two with one timestamp: one group commit that crashed.
        lines.push(forge(22, &hash_of(&f21), "appended"));
        write_lines(&path, &lines);
        let report = assert_clean(&path, 22);
        assert!(report.notes[0].contains("one group commit"), "{report:?}");
        // Two written at different times cannot be explained by a crash.
        lines.pop();
        let later = "2026-01-01T00:00:01.000000Z";
        lines.push(forge_at(22, &hash_of(&f21), "appended", later));
        write_lines(&path, &lines);
        let t = assert_problem(&path, 22, TamperKind::Inserted);
        assert!(t.detail.contains("one timestamp"), "{t}");
        // Garbage seq appended at the end.
        let mut lines = orig.clone();
        lines.push(forge(999, &bogus_prev, "x"));
        write_lines(&path, &lines);
        assert_eq!(problem(&path).line, 21);
    }

    #[test]
    fn rewritten_records_are_detected() {
        let (_dir, path) = new_log(20);
        let orig = read_lines(&path);
        for j in 0..20 {
            let rec: Record = serde_json::from_slice(&orig[j]).unwrap();
            let mut lines = orig.clone();
            lines[j] = forge(rec.seq, &rec.prev, "rewritten with a recomputed hash");
            write_lines(&path, &lines);
            assert_problem(&path, j as u64 + 1, TamperKind::Modified);
        }
        // Whitespace added and the hash recomputed: consistent hash, but not
        // what warden writes.
        let mut lines = orig.clone();
        let text = String::from_utf8(orig[4].clone()).unwrap();
        let cut = text.find(",\"hash\":\"").unwrap();
        let body = format!("{{ {}}}", &text[1..cut]);
        let h = hex::encode(sha256(body.as_bytes()));
        lines[4] = format!("{{ {},\"hash\":\"{h}\"}}", &text[1..cut]).into_bytes();
        write_lines(&path, &lines);
        assert_problem(&path, 5, TamperKind::Malformed);

        // An extra member (say, a secret value) with a recomputed hash.
        let mut lines = orig.clone();
        let body = format!("{},\"value\":\"hunter2\"}}", &text[..cut]);
        let h = hex::encode(sha256(body.as_bytes()));
        lines[4] =
            format!("{},\"value\":\"hunter2\",\"hash\":\"{h}\"}}", &text[..cut]).into_bytes();
        write_lines(&path, &lines);
        let t = assert_problem(&path, 5, TamperKind::Malformed);
        assert!(t.detail.contains("value"), "{t}");

        // Blank line.
        let mut lines = orig.clone();
        lines.insert(9, Vec::new());
        write_lines(&path, &lines);
        assert_problem(&path, 10, TamperKind::Malformed);
    }

    #[test]
    fn every_single_byte_edit_is_attributed_to_its_line() {
        let (_dir, path) = new_log(20);
        let orig = fs::read(&path).unwrap();
        let mut line_of = Vec::with_capacity(orig.len());
        let mut line = 1u64;
        for &b in &orig {
            line_of.push(line);
            if b == b'\n' {
                line += 1;
            }
        }
        let mut checked = 0;
        for pos in 0..orig.len() {
            let mut edits: Vec<Box<dyn Fn(u8) -> u8>> = vec![Box::new(|b| b ^ 0x01)];
            if pos % 5 == 0 {
                edits.push(Box::new(|b| b ^ 0x20));
                edits.push(Box::new(|b| b ^ 0x80));
                edits.push(Box::new(|b| if b == b' ' { b'\t' } else { b' ' }));
            }
            for edit in &edits {
                let mut data = orig.clone();
                data[pos] = edit(data[pos]);
                fs::write(&path, &data).unwrap();
                let t = problem(&path);
                assert_eq!(t.line, line_of[pos], "byte {pos}: {t}");
                checked += 1;
            }
        }
        assert!(checked >= 200 && orig.len() > 2000, "{checked}");
        let mut data = orig.clone();
        data[orig.len() / 3] ^= 0x01;
        fs::write(&path, &data).unwrap();
        let t = problem(&path);
        assert_eq!(
            t.to_string(),
            format!(
                "line {}: record was modified (its hash does not match its content)",
                line_of[orig.len() / 3]
            )
        );
    }

    #[test]
    fn truncation_is_detected() {
        let (_dir, path) = new_log(20);
        let orig = fs::read(&path).unwrap();
        let last_start = orig[..orig.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        // Cut anywhere inside the last line, including just its newline.
        for cut in (last_start + 1..orig.len())
            .step_by(7)
            .chain([orig.len() - 1])
        {
            fs::write(&path, &orig[..cut]).unwrap();
            assert_problem(&path, 20, TamperKind::Truncated);
            assert!(matches!(
                AuditLog::open(&path),
                Err(AuditError::Corrupt { line: 20, .. })
            ));
        }
        // Whole last line.
        fs::write(&path, &orig[..last_start]).unwrap();
        assert_problem(&path, 20, TamperKind::Truncated);
        // Last three lines.
        let lines = read_lines(&path);
        write_lines(&path, &lines[..17]);
        let t = assert_problem(&path, 18, TamperKind::Truncated);
        assert!(t.detail.contains("seq 20"), "{t}");
        let err = AuditLog::open(&path).unwrap_err();
        assert!(err.to_string().contains("removed"), "{err}");
        // Everything.
        fs::write(&path, b"").unwrap();
        let t = assert_problem(&path, 1, TamperKind::Truncated);
        assert_eq!(
            t.detail,
            "all records were removed; the head anchor records seq 20"
        );
        assert!(AuditLog::open(&path).is_err());
        // Log deleted outright: open must not start a fresh chain under the
        // old anchor.
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { .. })
        ));
    }

    #[test]
    fn head_anchor_cases() {
        let (_dir, path) = new_log(19);
        let head = anchor_path(&path).unwrap();
        let anchor19 = fs::read(&head).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        log.append(&event(20)).unwrap();
        let anchor20 = fs::read(&head).unwrap();

        // Crash between log fsync and anchor update: note only.
        fs::write(&head, &anchor19).unwrap();
        let report = assert_clean(&path, 20);
        assert_eq!(report.notes.len(), 1);
        assert!(
            report.notes[0].contains("interrupted"),
            "{:?}",
            report.notes
        );
        // ...and the next append repairs the anchor.
        let mut log = AuditLog::open(&path).unwrap();
        let r21 = log.append(&event(21)).unwrap();
        let report = assert_clean(&path, 21);
        assert!(report.notes.is_empty());
        assert_eq!(report.last_hash, r21.hash);

        // Missing anchor: note.
        fs::remove_file(&head).unwrap();
        let report = assert_clean(&path, 21);
        assert!(
            report.notes[0].contains("no head anchor"),
            "{:?}",
            report.notes
        );
        assert!(AuditLog::open(&path).is_ok());

        // Garbled anchor: note for verify, refusal for open.
        fs::write(&head, b"{\"seq\":21,").unwrap();
        let report = assert_clean(&path, 21);
        assert!(report.notes[0].contains("unreadable"), "{:?}", report.notes);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { .. })
        ));

        // Same seq, other hash: the log was rewritten consistently.
        let wrong = String::from_utf8(anchor20)
            .unwrap()
            .replace("\"seq\":20", "\"seq\":21");
        fs::write(&head, wrong).unwrap();
        let t = assert_problem(&path, 21, TamperKind::Modified);
        assert!(t.detail.contains("head anchor"), "{t}");
        assert!(AuditLog::open(&path).is_err());
        // Anchor on an older record whose hash differs.
        fs::write(&head, &anchor19).unwrap();
        let bad = String::from_utf8(anchor19.clone())
            .unwrap()
            .replace("\"seq\":19", "\"seq\":18");
        fs::write(&head, bad).unwrap();
        assert_problem(&path, 18, TamperKind::Modified);
    }

    #[test]
    fn open_refuses_a_damaged_tail() {
        let (_dir, path) = new_log(5);
        let orig = read_lines(&path);
        let mut lines = orig.clone();
        lines[4][30] ^= 0x01;
        write_lines(&path, &lines);
        match AuditLog::open(&path) {
            Err(AuditError::Corrupt { line, detail, .. }) => {
                assert_eq!(line, 5);
                assert!(detail.contains("modified"), "{detail}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Damage in the middle is verify's business, not open's.
        let mut lines = orig.clone();
        lines[1][30] ^= 0x01;
        write_lines(&path, &lines);
        assert!(AuditLog::open(&path).is_ok());
        assert_problem(&path, 2, TamperKind::Modified);
        // A very long garbage last line.
        let mut lines = orig.clone();
        lines.push(vec![b'x'; MAX_RECORD_BYTES * 2]);
        write_lines(&path, &lines);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Corrupt { line: 6, .. })
        ));
        assert_problem(&path, 6, TamperKind::Malformed);
    }

    #[test]
    fn failed_appends_leave_nothing_behind() {
        let (_dir, path) = new_log(3);
        for (i, fault) in [
            Fault::PartialWrite(10),
            Fault::PartialWrite(1000),
            Fault::Sync,
            Fault::Anchor,
        ]
        .into_iter()
        .enumerate()
        {
            let before = fs::read(&path).unwrap();
            let anchor_before = fs::read(anchor_path(&path).unwrap()).unwrap();
            let mut log = AuditLog::open(&path).unwrap();
            log.fault = Some(fault);
            let err = log.append(&event(99)).unwrap_err();
            if matches!(fault, Fault::PartialWrite(_) | Fault::Anchor) {
                assert!(err.to_string().contains("disk full"), "{err}");
            }
            assert_eq!(fs::read(&path).unwrap(), before, "{fault:?}");
            assert_eq!(
                fs::read(anchor_path(&path).unwrap()).unwrap(),
                anchor_before
            );
            assert_clean(&path, 3 + i as u64);
            log.fault = None;
            let r = log.append(&event(4)).unwrap();
            assert_eq!(r.seq, 4 + i as u64);
            assert_clean(&path, 4 + i as u64);
        }
    }

    #[test]
    fn a_batch_is_one_chain_segment_and_fails_as_a_whole() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        let batch: Vec<Event> = (3..=6).map(event).collect();
        let records = log.append_all(&batch).unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        for w in records.windows(2) {
            assert_eq!(w[1].prev, w[0].hash);
        }
        assert_clean(&path, 6);
        assert!(log.append_all(&[]).unwrap().is_empty());
        // A failed sync leaves none of the batch behind.
        let before = fs::read(&path).unwrap();
        log.fault = Some(Fault::Sync);
        assert!(log.append_all(&batch).is_err());
        assert_eq!(fs::read(&path).unwrap(), before);
        log.fault = None;
        assert_eq!(log.append(&event(7)).unwrap().seq, 7);
        assert_clean(&path, 7);
    }

    fn anchor_of(path: &Path) -> AnchorFile {
        serde_json::from_slice(&fs::read(anchor_path(path).unwrap()).unwrap()).unwrap()
    }

    /// Whether another open file description could take a shared lock now.
    #[allow(clippy::incompatible_msrv)]
    fn readers_may_look(path: &Path) -> bool {
        let f = File::open(path).unwrap();
        match f.try_lock_shared() {
            Ok(()) => {
                f.unlock().unwrap();
                true
            }
            Err(fs::TryLockError::WouldBlock) => false,
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_sole_writer_keeps_the_lock_across_unsynced_appends_until_the_fsync_begins() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        log.set_sole_writer();
        log.write_all(&[event(3)], false).unwrap();
        log.write_all(&[event(4)], false).unwrap();
        assert!(!readers_may_look(&path), "held across the window's appends");
        let pending = log.begin_sync().expect("seq 3-4 pending");
        assert!(readers_may_look(&path), "released before the disk works");
        log.write_all(&[event(5)], false).unwrap();
        assert!(!readers_may_look(&path));
        // finish_sync under the kept lock leaves it kept.
        let io = pending.run();
        log.finish_sync(pending, io).unwrap();
        assert!(!readers_may_look(&path));
        // Never longer than WINDOW_LOCK_MAX, even with no fsync begun.
        std::thread::sleep(WINDOW_LOCK_MAX + std::time::Duration::from_millis(5));
        log.write_all(&[event(6)], false).unwrap();
        assert!(
            readers_may_look(&path),
            "a long window ends at the next append"
        );
        // A durable append leaves nothing held; nor does an error.
        log.write_all(&[event(7)], false).unwrap();
        log.write_all(&[event(8)], true).unwrap();
        assert!(readers_may_look(&path));
        log.write_all(&[event(9)], false).unwrap();
        log.fault = Some(Fault::PartialWrite(5));
        assert!(log.write_all(&[event(10)], false).is_err());
        log.fault = None;
        assert!(readers_may_look(&path));
        log.write_all(&[event(10)], false).unwrap();
        drop(log);
        assert!(readers_may_look(&path), "a dropped handle holds nothing");
        assert_clean(&path, 10);
    }

    #[test]
    fn a_log_that_is_not_the_sole_writer_never_keeps_the_lock() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        log.write_all(&[event(3)], false).unwrap();
        assert!(readers_may_look(&path));
    }

    #[test]
    fn a_sync_run_outside_the_lock_leaves_later_records_pending_and_never_moves_the_anchor_back() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        log.set_sole_writer();
        log.write_all(&[event(3)], false).unwrap();
        // The fsync of seq 3 runs while seq 4 is appended (no lock held).
        let pending = log.begin_sync().expect("seq 3 is pending");
        log.write_all(&[event(4)], false).unwrap();
        let io = pending.run();
        log.finish_sync(pending, io).unwrap();
        assert!(log.has_unsynced(), "seq 4 still waits for an fsync");
        assert_eq!(anchor_of(&path).seq, 3);
        // A durable append anchors seq 5; a sync begun before it and
        // finished after it must not move the anchor back to 4.
        let pending = log.begin_sync().expect("seq 4 is pending");
        log.write_all(&[event(5)], true).unwrap();
        assert_eq!(anchor_of(&path).seq, 5);
        let io = pending.run();
        log.finish_sync(pending, io).unwrap();
        assert_eq!(anchor_of(&path).seq, 5);
        assert!(!log.has_unsynced());
        assert!(log.begin_sync().is_none());
        assert!(assert_clean(&path, 5).notes.is_empty());
        // A failed fsync outside the lock is sticky like any other.
        log.write_all(&[event(6)], false).unwrap();
        log.fault = Some(Fault::Sync);
        let pending = log.begin_sync().unwrap();
        let io = pending.run();
        assert!(matches!(
            log.finish_sync(pending, io),
            Err(AuditError::SyncFailed { .. })
        ));
        log.fault = None;
        assert!(matches!(
            log.write_all(&[event(7)], false),
            Err(AuditError::SyncFailed { .. })
        ));
    }

    #[test]
    fn unsynced_appends_are_anchored_by_sync_pending() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        assert!(!log.has_unsynced());
        log.sync_pending().unwrap(); // nothing pending: a no-op
        let batch: Vec<Event> = (3..=4).map(event).collect();
        assert_eq!(log.append_all_unsynced(&batch).unwrap()[1].seq, 4);
        assert!(log.has_unsynced());
        // Written, not anchored; the anchor now says records may follow
        // it unsynced, so a crash of warden here is no tamper.
        let a = anchor_of(&path);
        assert_eq!((a.seq, a.interval), (2, true));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(log.append_all_unsynced(&[event(5)]).unwrap()[0].seq, 5);
        let report = assert_clean(&path, 5);
        assert_eq!(report.notes.len(), 1, "{report:?}");
        assert!(report.notes[0].contains("not yet fsynced"), "{report:?}");
        // A new handle (warden restarted after a crash) continues the chain.
        drop(log);
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append_all_unsynced(&[event(6)]).unwrap()[0].seq, 6);
        log.sync_pending().unwrap();
        assert!(!log.has_unsynced());
        let a = anchor_of(&path);
        assert_eq!((a.seq, a.interval), (6, true));
        assert!(assert_clean(&path, 6).notes.is_empty());
        // A durable append by the same handle keeps the flag (unsynced ones
        // may follow it); a handle that never wrote unsynced drops it.
        log.append(&event(7)).unwrap();
        assert!(anchor_of(&path).interval);
        AuditLog::open(&path).unwrap().append(&event(8)).unwrap();
        let a = anchor_of(&path);
        assert_eq!((a.seq, a.interval), (8, false));
        // ...and the first handle, learning of that append, flags it again
        // before its next unsynced record.
        log.append_all_unsynced(&[event(9)]).unwrap();
        let a = anchor_of(&path);
        assert_eq!((a.seq, a.interval), (8, true));
        std::thread::sleep(Duration::from_millis(2));
        log.append_all_unsynced(&[event(10)]).unwrap();
        assert_clean(&path, 10);
        log.sync_pending().unwrap();
        assert_eq!(anchor_of(&path).seq, 10);
        assert!(assert_clean(&path, 10).notes.is_empty());
    }

    #[test]
    fn unsynced_records_on_an_empty_log_get_a_flagged_anchor_at_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        log.append_all_unsynced(&[event(1)]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        log.append_all_unsynced(&[event(2)]).unwrap();
        // No anchor yet: verify notes it, no tamper.
        assert_eq!(assert_clean(&path, 2).notes.len(), 1);
        log.sync_pending().unwrap();
        let a = anchor_of(&path);
        assert_eq!((a.seq, a.interval), (2, true));
        assert!(assert_clean(&path, 2).notes.is_empty());
    }

    #[test]
    fn a_failed_background_sync_refuses_every_later_record() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        log.append_all_unsynced(&[event(3)]).unwrap();
        log.fault = Some(Fault::Sync);
        assert_eq!(log.sync_failure(), None);
        let err = log.sync_pending().unwrap_err();
        assert!(matches!(err, AuditError::SyncFailed { .. }), "{err:?}");
        assert!(
            log.sync_failure().is_some_and(|w| w.contains("os error 5")),
            "{err}"
        );
        assert!(err.to_string().contains("warden audit verify"), "{err}");
        // The acknowledged record stays; nothing more is accepted, even
        // once the disk recovers.
        log.fault = None;
        let before = fs::read(&path).unwrap();
        for res in [
            log.append(&event(4)).map(|_| ()),
            log.append_all_unsynced(&[event(4)]).map(|_| ()),
        ] {
            assert!(matches!(res, Err(AuditError::SyncFailed { .. })), "{res:?}");
        }
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_clean(&path, 3);
        // A new handle (warden restarted) starts clean.
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append(&event(4)).unwrap().seq, 4);
        assert!(assert_clean(&path, 4).notes.is_empty());
    }

    #[test]
    fn a_failed_durable_append_after_unsynced_ones_is_sticky() {
        let (_dir, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        log.append_all_unsynced(&[event(3)]).unwrap();
        log.fault = Some(Fault::Sync);
        assert!(log.append(&event(4)).is_err());
        log.fault = None;
        assert!(matches!(
            log.append(&event(4)),
            Err(AuditError::SyncFailed { .. })
        ));
        assert_clean(&path, 3);
        // Without unsynced records before it, a failed fsync is not sticky
        // (the batch is rolled back, nothing acknowledged is at risk).
        let mut log = AuditLog::open(&path).unwrap();
        log.fault = Some(Fault::Sync);
        assert!(log.append(&event(4)).is_err());
        log.fault = None;
        assert_eq!(log.append(&event(4)).unwrap().seq, 4);
    }

    #[test]
    fn anchors_of_other_widths_are_read_and_rewritten_to_the_fixed_width() {
        let (_dir, path) = new_log(3);
        let head = anchor_path(&path).unwrap();
        let hash3 = serde_json::from_slice::<Record>(&read_lines(&path)[2])
            .unwrap()
            .hash;
        // The unpadded form earlier versions wrote, then a longer hand edit.
        for old in [
            format!("{{\"seq\":3,\"hash\":\"{hash3}\"}}\n"),
            format!("{{\"seq\":3,\"hash\":\"{hash3}\"}}{}\n", " ".repeat(300)),
        ] {
            fs::write(&head, &old).unwrap();
            assert!(assert_clean(&path, 3).notes.is_empty());
            let mut log = AuditLog::open(&path).unwrap();
            let seq = log.append(&event(4)).unwrap().seq;
            let now = fs::read_to_string(&head).unwrap();
            assert_eq!(now.len(), ANCHOR_WIDTH, "{now:?}");
            assert!(now.starts_with(&format!("{{\"seq\":{seq},")), "{now:?}");
            assert!(assert_clean(&path, seq).notes.is_empty());
            // Back to seq 3 for the next form: cut the log, keep the chain.
            let lines = fs::read(&path).unwrap();
            let keep: usize = lines
                .split_inclusive(|&b| b == b'\n')
                .take(3)
                .map(<[u8]>::len)
                .sum();
            fs::write(&path, &lines[..keep]).unwrap();
        }
    }

    #[test]
    fn a_removed_anchor_is_written_again_at_the_next_path_check() {
        let (_dir, path) = new_log(3);
        let head = anchor_path(&path).unwrap();
        let anchored = |seq: u64| {
            let now = fs::read_to_string(&head).unwrap();
            assert_eq!(now.len(), ANCHOR_WIDTH, "{now:?}");
            assert!(now.starts_with(&format!("{{\"seq\":{seq},")), "{now:?}");
        };
        // Not the sole writer: every append looks the path up again.
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.append(&event(4)).unwrap().seq, 4);
        fs::remove_file(&head).unwrap();
        assert_eq!(log.append(&event(5)).unwrap().seq, 5);
        anchored(5);
        drop(log);
        // The daemon's handle keeps the anchor open between path checks:
        // an anchor removed under it is written again at the next one.
        let mut log = AuditLog::open(&path).unwrap();
        log.set_sole_writer();
        assert_eq!(log.append(&event(6)).unwrap().seq, 6);
        anchored(6);
        fs::remove_file(&head).unwrap();
        assert_eq!(log.append(&event(7)).unwrap().seq, 7);
        assert!(!head.exists(), "written to the open (removed) file");
        log.checked_at = None;
        assert_eq!(log.append(&event(8)).unwrap().seq, 8);
        anchored(8);
        assert!(assert_clean(&path, 8).notes.is_empty());
        // Replaced by another file: the same.
        let other = head.with_extension("other");
        fs::write(&other, "x").unwrap();
        fs::rename(&other, &head).unwrap();
        assert_eq!(log.append(&event(9)).unwrap().seq, 9);
        assert_eq!(fs::read_to_string(&head).unwrap(), "x");
        log.checked_at = None;
        assert_eq!(log.append(&event(10)).unwrap().seq, 10);
        anchored(10);
        assert!(assert_clean(&path, 10).notes.is_empty());
    }

    #[test]
    fn unwritable_anchor_fails_closed() {
        let (_dir, path) = new_log(3);
        let before = fs::read(&path).unwrap();
        let head = anchor_path(&path).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        // A directory where the anchor should be: the append fails and is
        // rolled back.
        fs::remove_file(&head).unwrap();
        fs::create_dir(&head).unwrap();
        assert!(log.append(&event(4)).is_err());
        assert_eq!(fs::read(&path).unwrap(), before);
        fs::remove_dir(&head).unwrap();
        assert_clean(&path, 3);
        assert_eq!(log.append(&event(4)).unwrap().seq, 4);
        assert_clean(&path, 4);
    }

    #[test]
    fn bad_paths_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the log should be.
        let err = AuditLog::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        assert!(verify(dir.path()).is_err());
        // A missing log is an I/O error for verify, not a clean report.
        assert!(matches!(
            verify(&dir.path().join("nope.log")),
            Err(AuditError::Io { .. })
        ));
        // A symlink is not followed.
        let real = dir.path().join("real.log");
        fs::write(&real, b"").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(AuditLog::open(&link).is_err());

        // The log is replaced (by a directory) or renamed after open.
        let (_dir2, path) = new_log(2);
        let mut log = AuditLog::open(&path).unwrap();
        let moved = path.with_file_name("moved.log");
        fs::rename(&path, &moved).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            log.append(&event(3)),
            Err(AuditError::Replaced { .. })
        ));
        fs::remove_dir(&path).unwrap();
        assert!(matches!(
            log.append(&event(3)),
            Err(AuditError::Replaced { .. })
        ));
        fs::rename(&moved, &path).unwrap();
        assert_clean(&path, 2);
        assert_eq!(log.append(&event(3)).unwrap().seq, 3);
    }

    #[test]
    fn read_only_log_fails_closed() {
        let (_dir, path) = new_log(2);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        let privileged = OpenOptions::new().append(true).open(&path).is_ok();
        if privileged {
            // root ignores file modes; nothing to test here beyond this.
            eprintln!("running as root: read-only file mode cannot be enforced");
        } else {
            let err = AuditLog::open(&path).unwrap_err();
            assert!(err.to_string().contains("permission denied"), "{err}");
        }
        assert_clean(&path, 2);
    }

    #[test]
    fn two_handles_alternating_keep_one_chain() {
        let (_dir, path) = new_log(0);
        let mut a = AuditLog::open(&path).unwrap();
        let mut b = AuditLog::open(&path).unwrap();
        let mut seqs = Vec::new();
        for i in 0..10 {
            seqs.push(a.append(&event(i)).unwrap().seq);
            seqs.push(b.append(&event(i)).unwrap().seq);
        }
        assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
        let report = assert_clean(&path, 20);
        assert!(report.notes.is_empty());
    }

    #[test]
    fn concurrent_handles_keep_one_chain() {
        let (_dir, path) = new_log(0);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut log = AuditLog::open(&path).unwrap();
                    for i in 0..25 {
                        log.append(&event(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_clean(&path, 100);
    }

    #[test]
    fn only_names_are_recorded() {
        let (_dir, path) = new_log(0);
        let mut log = AuditLog::open(&path).unwrap();
        let mut ev = event(1);
        ev.target.secret = Some("zz-distinctive-secret-name-4711".into());
        log.append(&ev).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"secret\":\"zz-distinctive-secret-name-4711\""));

        // Structural guard: the complete set of members any record can have.
        let full = Event {
            actor: Actor {
                kind: ActorKind::Workload,
                uid: Some(1),
                user: Some("u".into()),
                pid: Some(2),
                exe: Some("/e".into()),
                workload: Some("w".into()),
            },
            action: "a".into(),
            target: Target {
                secret: Some("s".into()),
                env: Some("e".into()),
                version: Some(3),
                route: Some("r".into()),
                detail: Some("d".into()),
            },
            decision: Decision::Deny,
            reason: "r".into(),
        };
        let (record, _) = encode_record(1, FIXED_TIME, &full, GENESIS_HASH).unwrap();
        let v = serde_json::to_value(&record).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
        };
        let mut top = keys(&v);
        top.sort();
        assert_eq!(
            top,
            ["action", "actor", "decision", "hash", "prev", "reason", "seq", "target", "time"]
        );
        let mut actor = keys(&v["actor"]);
        actor.sort();
        assert_eq!(actor, ["exe", "kind", "pid", "uid", "user", "workload"]);
        let mut target = keys(&v["target"]);
        target.sort();
        assert_eq!(target, ["detail", "env", "route", "secret", "version"]);
        let mut event_keys = keys(&serde_json::to_value(&full).unwrap());
        event_keys.sort();
        assert_eq!(
            event_keys,
            ["action", "actor", "decision", "reason", "target"]
        );
    }

    #[test]
    fn io_errors_name_path_and_cause() {
        for (errno, text) in [
            (libc::ENOSPC, "disk full"),
            (libc::EACCES, "permission denied"),
            (libc::EROFS, "read-only filesystem"),
        ] {
            let err = AuditError::Io {
                path: PathBuf::from("/var/lib/warden/audit.log"),
                source: io::Error::from_raw_os_error(errno),
            };
            let msg = err.to_string();
            assert!(msg.contains("/var/lib/warden/audit.log"), "{msg}");
            assert!(msg.contains(text), "{msg}");
            assert!(std::error::Error::source(&err).is_some());
        }
    }

    #[test]
    fn human_format() {
        let mut actor = actor_of(ActorKind::Admin);
        actor.uid = Some(0);
        actor.user = Some("root".into());
        let r = Record {
            seq: 12,
            time: "2026-11-25T19:50:00.123456Z".into(),
            actor,
            action: "secret.put".into(),
            target: Target {
                secret: Some("orders-db/app".into()),
                env: Some("prod".into()),
                version: Some(3),
                ..Target::default()
            },
            decision: Decision::Allow,
            reason: "rotated by ops".into(),
            prev: GENESIS_HASH.into(),
            hash: GENESIS_HASH.into(),
        };
        assert_eq!(
            format_record_human(&r),
            "2026-11-25T19:50:00Z #12 admin uid=0(root) secret.put orders-db/app env=prod v3 allow — rotated by ops"
        );
        let mut w = r.clone();
        w.actor = actor_of(ActorKind::Workload);
        w.actor.pid = Some(4242);
        w.actor.exe = Some("/usr/bin/evil\u{1b}[2J\nfake line".into());
        w.actor.workload = Some("orders-api".into());
        w.target = Target {
            route: Some("stripe".into()),
            ..Target::default()
        };
        w.decision = Decision::Deny;
        w.reason = "not\nallowed".into();
        let s = format_record_human(&w);
        assert!(!s.contains('\n') && !s.contains('\u{1b}'), "{s}");
        assert!(
            s.starts_with("2026-11-25T19:50:00Z #12 workload pid=4242 exe="),
            "{s}"
        );
        assert!(
            s.ends_with(
                "exe=\"/usr/bin/evil\\u{1b}[2J\\u{a}fake line\" workload=orders-api secret.put route=stripe deny — not\\u{a}allowed"
            ),
            "{s}"
        );
    }

    #[test]
    fn read_records_tail() {
        let (_dir, path) = new_log(5);
        let all = read_records(&path, None).unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let last = read_records(&path, Some(2)).unwrap();
        assert_eq!(last.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(read_records(&path, Some(10)).unwrap().len(), 5);
        assert!(read_records(&path, Some(0)).unwrap().is_empty());
        let mut lines = read_lines(&path);
        lines[4][20] ^= 0x01;
        write_lines(&path, &lines);
        assert!(matches!(
            read_records(&path, Some(2)),
            Err(AuditError::Corrupt { line: 5, .. })
        ));
        // Damage outside the requested tail does not matter to `tail`.
        lines[4][20] ^= 0x01;
        lines[0][20] ^= 0x01;
        write_lines(&path, &lines);
        assert_eq!(read_records(&path, Some(2)).unwrap().len(), 2);
    }

    #[test]
    fn invalid_events_are_refused_without_writing() {
        let (_dir, path) = new_log(1);
        let before = fs::read(&path).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        let mut ev = event(2);
        ev.action = String::new();
        assert!(matches!(log.append(&ev), Err(AuditError::InvalidEvent(_))));
        ev.action = "secret put".into();
        assert!(matches!(log.append(&ev), Err(AuditError::InvalidEvent(_))));
        let mut ev = event(2);
        ev.reason = "x".repeat(MAX_RECORD_BYTES);
        assert!(matches!(
            log.append(&ev),
            Err(AuditError::RecordTooLarge { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), before);
        // Newlines and quotes in free text are escaped, never split a line.
        let mut ev = event(2);
        ev.reason = "a\nb\"c\u{0}".into();
        log.append(&ev).unwrap();
        assert_eq!(read_lines(&path).len(), 2);
        assert_clean(&path, 2);
        assert_eq!(
            read_records(&path, Some(1)).unwrap()[0].reason,
            "a\nb\"c\u{0}"
        );
    }

    #[test]
    fn line_reader_handles_buffer_boundaries_and_overlong_lines() {
        let data = b"abc\ndefghij\n\nxyz".to_vec();
        let mut r = BufReader::with_capacity(2, &data[..]);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Some(t) = read_line_capped(&mut r, &mut buf, 4).unwrap() {
            got.push((String::from_utf8(buf.clone()).unwrap(), t));
        }
        assert_eq!(
            got,
            [
                ("abc".to_owned(), true),
                ("defg".to_owned(), true),
                (String::new(), true),
                ("xyz".to_owned(), false),
            ]
        );
    }

    #[test]
    fn anchor_mismatch_reports_the_intact_prefix() {
        let (_dir, path) = new_log(5);
        let lines = read_lines(&path);
        let head = anchor_path(&path).unwrap();
        fs::write(
            &head,
            "{\"seq\":3,\"hash\":\"".to_owned() + &"ab".repeat(32) + "\"}\n",
        )
        .unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(report.problem.as_ref().map(|t| t.line), Some(3));
        assert_eq!(report.records, 2);
        assert_eq!(report.last_hash, hash_of(&lines[1]));
    }
}
