//! Fleet views on the PostgreSQL store: what every node did, seen from any
//! node (`warden audit tail --fleet`, `warden events --fleet`, `warden
//! frozen` naming the nodes that applied a freeze).
//!
//! One [`Shipper`] thread per daemon (only with `[store] backend =
//! "postgres"`), with its **own** store connection, so it never waits for
//! the secret service's lock and nothing on the data path ever waits for it:
//!
//! - **The audit copy.** The local audit log stays the record of truth: a
//!   session's record is written (and fsynced) locally as before, whatever
//!   the store does. The shipper reads the log past the newest record the
//!   store holds for this node and inserts the lines exactly as written (so
//!   each node's hash chain verifies in the store) in batches of at most
//!   [`AUDIT_BATCH`] per transaction, idempotently (`ON CONFLICT DO
//!   NOTHING`). While the store is unreachable it retries with a backoff of
//!   at most [`BACKOFF_MAX`]; records written meanwhile are shipped when it
//!   is back, with no operator action. A log is identified by the hash of
//!   its first record, so a node whose data dir was recreated starts a new
//!   chain instead of colliding with the old one; a log replaced under the
//!   same path (another file at the path, or a shorter one) is read again
//!   from its start. A log whose record at the store's newest seq differs
//!   from the store's is *not* shipped (the error is shown in `warden
//!   status` and `/readyz`): either copy may be the true one.
//! - **Access events.** A bounded summary — the JSON `warden events --json`
//!   prints — of the events the daemon's feed keeps, at most
//!   [`EVENT_BATCH`] per insert; each node prunes its rows to the newest
//!   [`EVENTS_KEPT_PER_NODE`] and to [`EVENTS_MAX_AGE`] (rows of nodes gone
//!   for twice that go too), so the table cannot grow without bound.
//!   Events the feed dropped before they were shipped are counted, not
//!   recovered: the events view is a recent summary, the audit copy is the
//!   record.
//! - **Freeze acknowledgements.** Whenever the set of freezes this node
//!   applies changes (its own, another node's heard through propagation, an
//!   expiry), the node's rows in `freeze_acks` are made to match: one row
//!   per (workload, node) with the freeze's id ([`freeze_id`]: its time and
//!   a hash of who made it, why and until when) and when the node applied it.
//!
//! Audit records and event summaries carry names and metadata only (see
//! [`crate::audit`]); nothing here reads or formats a secret value.

use crate::audit;
use crate::config::Store as StoreConfig;
use crate::error::{Error, Result};
use crate::freeze::Freezer;
use crate::metrics::Metrics;
use crate::store::postgres::{PostgresBackend, PostgresSettings};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records per insert (one transaction).
pub const AUDIT_BATCH: usize = 500;
/// Records read ahead of the store at most (memory bound during an outage).
const AUDIT_PENDING_MAX: usize = 4 * AUDIT_BATCH;
/// Event summaries per insert.
pub const EVENT_BATCH: usize = 500;
/// Event summaries each node keeps in the store.
pub const EVENTS_KEPT_PER_NODE: usize = 10_000;
/// Event summaries older than this are pruned.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the shipper looks for new records, events and freezes.
const TICK: Duration = Duration::from_millis(250);
/// Backoff bounds while the store is unreachable.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the event summaries are pruned and the acks re-asserted.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

/// Where the audit copy stands (`warden status`, `/readyz`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShipReport {
    /// Newest record of this node's log the store holds (0: none yet).
    pub shipped_seq: u64,
    /// Newest record of the local log.
    pub local_seq: u64,
    /// Records written locally and not yet in the store.
    pub lag_records: u64,
    /// Age of the oldest record not yet in the store (0 when none).
    pub lag_seconds: f64,
    /// The store's copy has been looked at since the daemon started (until
    /// then `shipped_seq` is not known).
    #[serde(default)]
    pub compared: bool,
    /// Why the last attempt failed, while it keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ShipReport {
    /// One line for `warden status` and `/readyz` (after "audit copy in the store: ").
    pub fn describe(&self) -> String {
        let mut s = if !self.compared {
            format!(
                "not yet compared with the store (local log #{})",
                self.local_seq
            )
        } else if self.lag_records == 0 {
            format!("up to date (record #{})", self.shipped_seq)
        } else {
            format!(
                "{} record(s) behind (store has #{}, local log #{}; oldest waiting {:.0} s)",
                self.lag_records, self.shipped_seq, self.local_seq, self.lag_seconds
            )
        };
        if let Some(e) = &self.error {
            s.push_str(&format!("; last attempt failed: {e}"));
        }
        s
    }
}

/// Shared between the shipper thread and its readers.
#[derive(Default)]
pub struct ShipStatus {
    report: Mutex<ShipReport>,
}

impl ShipStatus {
    pub fn report(&self) -> ShipReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut ShipReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }
}

/// The daemon's access events, numbered in the order they happened.
pub trait EventSource: Send + Sync {
    /// Events numbered above `after`, oldest first, at most `max`: (number,
    /// time in RFC 3339, the event as JSON).
    fn since(&self, after: u64, max: usize) -> Vec<(u64, String, String)>;
}

/// What the shipper ships from.
pub struct ShipperParts {
    pub store: StoreConfig,
    /// This node's name (host name and data dir), as on its lease rows.
    pub node: String,
    pub audit_log: PathBuf,
    pub events: Option<Arc<dyn EventSource>>,
    pub freezer: Option<Arc<Freezer>>,
    pub metrics: Option<Metrics>,
}

/// The running shipper; stops (within one tick) when dropped.
pub struct Shipper {
    stop: Arc<AtomicBool>,
    status: Arc<ShipStatus>,
}

impl Shipper {
    pub fn start(parts: ShipperParts) -> Result<Shipper> {
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(ShipStatus::default());
        let (flag, st) = (stop.clone(), status.clone());
        std::thread::Builder::new()
            .name("warden-ship".into())
            .spawn(move || run(parts, &flag, &st))
            .map_err(|e| Error::internal(format!("cannot start the fleet shipper: {e}")))?;
        Ok(Shipper { stop, status })
    }

    pub fn status(&self) -> Arc<ShipStatus> {
        self.status.clone()
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn run(parts: ShipperParts, stop: &AtomicBool, status: &ShipStatus) {
    let mut backend: Option<PostgresBackend> = None;
    let mut cursor = AuditCursor::new(parts.audit_log.clone());
    let mut events_after = 0u64;
    let mut acked: Option<Vec<(String, String)>> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    let mut housekeeping_at = Instant::now() + HOUSEKEEPING;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(TICK);
        if Instant::now() < retry_at {
            // Lag is known (from the local log) even while the store is not.
            cursor.publish(status, parts.metrics.as_ref());
            continue;
        }
        let failed = ship_once(
            &parts,
            &mut backend,
            &mut cursor,
            &mut events_after,
            &mut acked,
            &mut housekeeping_at,
        )
        .err();
        match failed {
            None => {
                backoff = BACKOFF_MIN;
                status.update(|r| r.error = None);
            }
            Some((what, e)) => {
                if let Some(m) = &parts.metrics {
                    m.fleet_ship_error(what);
                }
                let first = status.report().error.is_none();
                if first {
                    tracing::warn!(
                        "fleet shipper ({what}): {}; retrying (records stay in the local audit log)",
                        e.message
                    );
                }
                status.update(|r| r.error = Some(e.message.clone()));
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        cursor.publish(status, parts.metrics.as_ref());
    }
}

/// One pass: audit records, events, freeze acks. Errors name what failed.
fn ship_once(
    parts: &ShipperParts,
    backend: &mut Option<PostgresBackend>,
    cursor: &mut AuditCursor,
    events_after: &mut u64,
    acked: &mut Option<Vec<(String, String)>>,
    housekeeping_at: &mut Instant,
) -> std::result::Result<(), (&'static str, Error)> {
    if backend.is_none() {
        let settings = PostgresSettings::from_config(&parts.store)
            .map_err(|e| ("connect", e))?
            .named("warden-shipper");
        *backend =
            Some(PostgresBackend::connect(settings, &parts.node).map_err(|e| ("connect", e))?);
    }
    let Some(b) = backend.as_ref() else {
        return Ok(());
    };
    let housekeeping = Instant::now() >= *housekeeping_at;
    if housekeeping {
        *housekeeping_at = Instant::now() + HOUSEKEEPING;
    }
    // The three parts fail independently (a damaged local log does not stop
    // the events), except when the store cannot be reached at all: then the
    // pass ends at the first failure instead of waiting for three connects.
    let mut failed: Option<(&'static str, Error)> = None;
    let mut note = |what: &'static str, r: Result<()>| -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                let unreachable = e.kind == crate::error::ErrorKind::Unavailable;
                failed.get_or_insert((what, e));
                !unreachable
            }
        }
    };
    if !note("audit", cursor.ship(b, parts.metrics.as_ref())) {
        return Err(failed.unwrap_or(("audit", Error::internal("store unreachable"))));
    }
    if let Some(source) = &parts.events {
        let shipped = ship_events(
            b,
            source.as_ref(),
            events_after,
            housekeeping,
            parts.metrics.as_ref(),
        );
        if !note("events", shipped) {
            return Err(failed.unwrap_or(("events", Error::internal("store unreachable"))));
        }
    }
    if let Some(f) = &parts.freezer {
        let mut applied: Vec<(String, String)> = f
            .list()
            .into_iter()
            .map(|e| {
                let id = freeze_id(&e);
                (e.workload, id)
            })
            .collect();
        applied.sort();
        if acked.as_ref() != Some(&applied) || housekeeping {
            let written = b.freeze_acks_replace(applied.clone());
            if written.is_ok() {
                *acked = Some(applied);
            }
            note("freeze_acks", written);
        }
    }
    match failed {
        None => Ok(()),
        Some(f) => Err(f),
    }
}

/// New events from the feed, in batches; prunes this node's old rows.
fn ship_events(
    b: &PostgresBackend,
    source: &dyn EventSource,
    events_after: &mut u64,
    housekeeping: bool,
    metrics: Option<&Metrics>,
) -> Result<()> {
    loop {
        let batch = source.since(*events_after, EVENT_BATCH);
        let (Some(first), Some(last)) = (batch.first().map(|e| e.0), batch.last().map(|e| e.0))
        else {
            break;
        };
        if *events_after > 0 && first > *events_after + 1 {
            if let Some(m) = metrics {
                m.events_not_shipped(first - *events_after - 1);
            }
        }
        let n = batch.len();
        let rows = batch.into_iter().map(|(_, t, j)| (t, j)).collect();
        b.events_insert(rows)?;
        *events_after = last;
        if let Some(m) = metrics {
            m.events_shipped(n as u64);
        }
        if n < EVENT_BATCH {
            break;
        }
    }
    if housekeeping {
        b.events_prune(EVENTS_KEPT_PER_NODE, EVENTS_MAX_AGE)?;
    }
    Ok(())
}

/// A record read from the local log, not yet in the store.
struct Pending {
    seq: u64,
    time: String,
    hash: String,
    line: String,
}

/// Where the shipper stands in the local audit log.
struct AuditCursor {
    path: PathBuf,
    /// (device, inode) of the file read: another file at the path is read
    /// from its start.
    file_id: Option<(u64, u64)>,
    /// The hash of the log's first record: which log this is.
    log_id: Option<String>,
    /// The store's newest record of this log is known.
    synced: bool,
    /// (seq, hash) of the store's newest record of this log.
    shipped: (u64, String),
    /// Byte offset just past the last record read.
    read_offset: u64,
    /// (seq, hash) of the last record read.
    read: (u64, String),
    pending: VecDeque<Pending>,
    /// The local log does not continue the store's copy: shipping stopped.
    diverged: Option<String>,
}

impl AuditCursor {
    fn new(path: PathBuf) -> AuditCursor {
        AuditCursor {
            path,
            file_id: None,
            log_id: None,
            synced: false,
            shipped: (0, String::new()),
            read_offset: 0,
            read: (0, String::new()),
            pending: VecDeque::new(),
            diverged: None,
        }
    }

    fn reset(&mut self) {
        let path = std::mem::take(&mut self.path);
        *self = AuditCursor::new(path);
    }

    /// Lag figures for the status and the metrics.
    fn publish(&self, status: &ShipStatus, metrics: Option<&Metrics>) {
        let local = audit::anchored_seq(&self.path)
            .unwrap_or(0)
            .max(self.read.0);
        let shipped = self.shipped.0;
        // Before the first comparison with the store: everything local.
        let lag = local.saturating_sub(shipped);
        let lag_seconds = if lag == 0 {
            0.0
        } else {
            self.pending
                .front()
                .and_then(|p| age_of(&p.time))
                .unwrap_or(0.0)
        };
        let diverged = self.diverged.clone();
        let compared = self.synced;
        status.update(|r| {
            r.shipped_seq = shipped;
            r.local_seq = local;
            r.lag_records = lag;
            r.lag_seconds = lag_seconds;
            r.compared = compared;
            if diverged.is_some() {
                r.error = diverged;
            }
        });
        if let Some(m) = metrics {
            m.set_audit_ship_lag(lag, lag_seconds);
        }
    }

    fn ship(&mut self, b: &PostgresBackend, metrics: Option<&Metrics>) -> Result<()> {
        if let Some(d) = &self.diverged {
            return Err(Error::integrity(d.clone()));
        }
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("cannot read the audit log", &self.path, &e)),
        };
        let id = (meta.dev(), meta.ino());
        if self.file_id.is_some_and(|f| f != id) || meta.len() < self.read_offset {
            tracing::info!(log = %self.path.display(), "audit log replaced: shipping it from its start");
            self.reset();
        }
        self.file_id = Some(id);
        if self.log_id.is_none() {
            let Some(first) = self.first_record()? else {
                return Ok(());
            };
            self.log_id = Some(first);
        }
        let log = self.log_id.clone().unwrap_or_default();
        if !self.synced {
            self.shipped = b.audit_copy_head(b.node_name(), &log)?.unwrap_or_default();
            self.read_offset = 0;
            self.read = (0, String::new());
            self.pending.clear();
            self.synced = true;
        }
        self.read_more()?;
        while !self.pending.is_empty() {
            let n = self.pending.len().min(AUDIT_BATCH);
            let rows: Vec<(u64, String, String, String)> = self
                .pending
                .iter()
                .take(n)
                .map(|p| (p.seq, p.time.clone(), p.hash.clone(), p.line.clone()))
                .collect();
            b.audit_copy_insert(&log, rows)?;
            if let Some(m) = metrics {
                m.audit_shipped(n as u64);
            }
            for p in self.pending.drain(..n) {
                self.shipped = (p.seq, p.hash);
            }
            if self.pending.len() < AUDIT_PENDING_MAX / 2 {
                self.read_more()?;
            }
        }
        Ok(())
    }

    fn open(&self) -> Result<std::fs::File> {
        std::fs::File::open(&self.path)
            .map_err(|e| Error::io("cannot open the audit log", &self.path, &e))
    }

    /// The hash of the log's first record (None: the log is still empty).
    fn first_record(&self) -> Result<Option<String>> {
        let mut reader = BufReader::new(self.open()?);
        let mut line = Vec::new();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("cannot read the audit log", &self.path, &e))?;
        if line.last() != Some(&b'\n') {
            return Ok(None);
        }
        line.pop();
        let r = audit::parse_line(&line).map_err(|d| {
            Error::integrity(format!(
                "audit log {} line 1 is damaged ({d}); run `warden audit verify`",
                self.path.display()
            ))
        })?;
        Ok(Some(r.hash))
    }

    /// Reads complete records past the read offset into `pending`.
    fn read_more(&mut self) -> Result<()> {
        let mut file = self.open()?;
        file.seek(SeekFrom::Start(self.read_offset))
            .map_err(|e| Error::io("cannot read the audit log", &self.path, &e))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        while self.pending.len() < AUDIT_PENDING_MAX {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io("cannot read the audit log", &self.path, &e))?;
            if n == 0 || line.last() != Some(&b'\n') {
                // End of the file, or a record still being written.
                break;
            }
            line.pop();
            let at = self.read.0 + 1;
            let r = audit::parse_line(&line).map_err(|d| {
                Error::integrity(format!(
                    "audit log {}: the record after #{} is damaged ({d}); not shipping past it: run `warden audit verify`",
                    self.path.display(),
                    self.read.0
                ))
            })?;
            if r.seq != at || (at > 1 && r.prev != self.read.1) {
                return Err(Error::integrity(format!(
                    "audit log {}: record #{} does not follow #{} in the chain; not shipping past it: run `warden audit verify`",
                    self.path.display(),
                    r.seq,
                    self.read.0
                )));
            }
            if r.seq == self.shipped.0 && r.hash != self.shipped.1 {
                let msg = format!(
                    "this node's audit log {} differs from its copy in the store at record #{} (the local log was rewritten, or lost records the store had received): not shipping it; compare `warden audit verify` with `warden audit verify --fleet`",
                    self.path.display(),
                    r.seq
                );
                tracing::error!("{msg}");
                self.diverged = Some(msg.clone());
                return Err(Error::integrity(msg));
            }
            self.read_offset += n as u64;
            self.read = (r.seq, r.hash.clone());
            if r.seq > self.shipped.0 {
                let line = String::from_utf8(std::mem::take(&mut line)).map_err(|_| {
                    Error::integrity(format!(
                        "audit log {}: record #{} is not UTF-8",
                        self.path.display(),
                        r.seq
                    ))
                })?;
                self.pending.push_back(Pending {
                    seq: r.seq,
                    time: r.time,
                    hash: r.hash,
                    line,
                });
            }
        }
        Ok(())
    }
}

/// Seconds since an RFC 3339 time.
fn age_of(time: &str) -> Option<f64> {
    let t =
        time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok()?;
    Some(
        (time::OffsetDateTime::now_utc() - t)
            .as_seconds_f64()
            .max(0.0),
    )
}

/// Opens the shared store for a fleet view from the CLI; refuses a
/// single node's SQLite store with the reason.
pub fn open_for_view(store: &StoreConfig, data_dir: &Path, verb: &str) -> Result<PostgresBackend> {
    if store.backend != crate::config::StoreBackend::Postgres {
        return Err(Error::usage(format!(
            "`warden {verb} --fleet` reads what every node of a fleet shipped to the shared store, so it needs the PostgreSQL store ([store] backend = \"postgres\"); this node uses the local SQLite store: use `warden {verb}` without --fleet"
        )));
    }
    let settings = PostgresSettings::from_config(store)?;
    PostgresBackend::open(settings, &crate::store::postgres::node_name(data_dir))
}

/// A node's view of a freeze: applied, waiting, or unable to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeNodeState {
    pub node: String,
    pub id: String,
    /// `applied`, `pending`, `not running` or `removed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// A node not seen for this long is shown as not running (a running daemon
/// refreshes its record every 30 s).
pub const NOT_RUNNING_AFTER: Duration = Duration::from_secs(90);

/// What identifies one freeze of a workload among its freezes and
/// refreezes: when (to the second), and a hash of who, why and until when.
pub fn freeze_id(e: &crate::freeze::FreezeEntry) -> String {
    let what = format!(
        "{}\0{}\0{}\0{}",
        e.workload,
        e.by,
        e.reason,
        e.until_unix.unwrap_or(0)
    );
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, what.as_bytes());
    format!("{}/{}", e.since, hex::encode(&d.as_ref()[..6]))
}

/// Where the freeze `entry` applies, per node.
pub fn freeze_nodes(
    nodes: &[crate::fleet::NodeRecord],
    acks: &[crate::store::postgres::FreezeAck],
    entry: &crate::freeze::FreezeEntry,
) -> Vec<FreezeNodeState> {
    let id = freeze_id(entry);
    let workload = entry.workload.as_str();
    nodes
        .iter()
        .map(|n| {
            let ack = acks
                .iter()
                .find(|a| a.node == n.name && a.workload == workload && a.freeze == id);
            let stale = age_of(&n.last_seen).is_none_or(|s| s > NOT_RUNNING_AFTER.as_secs_f64());
            // A node not running may have applied it before it stopped (and
            // applies it again at start), but nothing enforces it there now.
            let state = if n.state == crate::fleet::NodeState::Removed {
                "removed"
            } else if stale {
                "not running"
            } else if ack.is_some() {
                "applied"
            } else {
                "pending"
            };
            FreezeNodeState {
                node: n.name.clone(),
                id: n.id.clone(),
                state: state.into(),
                applied_at: ack
                    .filter(|_| state == "applied")
                    .map(|a| a.applied_at.clone()),
                last_seen: (state == "not running").then(|| n.last_seen.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_name_the_lag_and_the_error() {
        let mut r = ShipReport {
            shipped_seq: 7,
            local_seq: 7,
            ..ShipReport::default()
        };
        assert_eq!(
            r.describe(),
            "not yet compared with the store (local log #7)"
        );
        r.compared = true;
        assert_eq!(r.describe(), "up to date (record #7)");
        r.local_seq = 10;
        r.lag_records = 3;
        r.lag_seconds = 4.2;
        r.error = Some("store down".into());
        let d = r.describe();
        assert!(d.contains("3 record(s) behind"), "{d}");
        assert!(d.contains("local log #10"), "{d}");
        assert!(d.ends_with("last attempt failed: store down"), "{d}");
    }

    #[test]
    fn freeze_states_per_node() {
        let now = crate::timefmt::now_rfc3339();
        let node = |name: &str, state: &str, last_seen: &str| -> crate::fleet::NodeRecord {
            serde_json::from_value(serde_json::json!({
                "id": format!("id-{name}"),
                "name": name,
                "hostname": "h",
                "joined_at": last_seen,
                "joined_via": "first start",
                "last_seen": last_seen,
                "state": state,
            }))
            .unwrap()
        };
        let nodes = vec![
            node("a", "active", &now),
            node("b", "active", &now),
            node("c", "active", "2020-01-01T00:00:00Z"),
            node("d", "removed", &now),
        ];
        let entry = crate::freeze::FreezeEntry {
            workload: "w".into(),
            reason: "why".into(),
            by: "admin uid 0 (root)".into(),
            since: "2026-12-06T09:00:00Z".into(),
            since_unix: 0,
            until_unix: None,
            kernel: Vec::new(),
            suspended: Vec::new(),
        };
        let ack = |node: &str, id: String| crate::store::postgres::FreezeAck {
            workload: "w".into(),
            node: node.into(),
            freeze: id,
            applied_at: "2026-12-06T09:00:01Z".into(),
        };
        let mut refrozen = entry.clone();
        refrozen.reason = "another reason".into();
        // b acknowledged an earlier freeze made in the same second.
        let acks = vec![
            ack("a", freeze_id(&entry)),
            ack("b", freeze_id(&refrozen)),
            ack("c", freeze_id(&entry)),
        ];
        let states: Vec<(String, String)> = freeze_nodes(&nodes, &acks, &entry)
            .into_iter()
            .map(|s| (s.node, s.state))
            .collect();
        let want = |n: &str, s: &str| (n.to_string(), s.to_string());
        assert_eq!(
            states,
            vec![
                want("a", "applied"),
                want("b", "pending"),
                want("c", "not running"),
                want("d", "removed")
            ]
        );
    }

    #[test]
    fn cursor_reads_complete_records_and_checks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = audit::AuditLog::open(&path).unwrap();
        let ev = |n: u32| audit::Event {
            actor: crate::authority::daemon_actor(),
            action: "daemon.start".into(),
            target: audit::Target::default(),
            decision: audit::Decision::Allow,
            reason: format!("start {n}"),
        };
        log.append_all(&[ev(1), ev(2), ev(3)]).unwrap();
        let mut c = AuditCursor::new(path.clone());
        c.synced = true;
        c.shipped = (1, String::new());
        // Record 1 is "shipped" with another hash: a diverged log.
        assert!(c.read_more().is_err());
        assert!(c.diverged.is_some());

        let first = AuditCursor::new(path.clone())
            .first_record()
            .unwrap()
            .unwrap();
        let mut c = AuditCursor::new(path.clone());
        c.synced = true;
        c.shipped = (1, first);
        c.read_more().unwrap();
        let seqs: Vec<u64> = c.pending.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        // A partial line at the end is left for later.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":4").unwrap();
        c.read_more().unwrap();
        assert_eq!(c.pending.len(), 2);
        assert_eq!(c.read.0, 3);
    }
}
