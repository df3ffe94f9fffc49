//! Group commit of warden's durable writes: audit records (every route's
//! session records, lease records) and lease rows.
//!
//! Written one by one, each write costs its own
//! `fsync`s on a runtime thread, and busy traffic queues behind them. Here
//! callers hand their writes to one writer thread and wait for the answer;
//! the writer takes whatever has queued up meanwhile and commits it as one
//! group: one store transaction for the lease rows, one audit append (one
//! write, one `fsync`, one anchor update — see `AuditLog::append_all`) for
//! the records. A write is still durable before its caller goes on, so the
//! rules "no record, no session" and "no row, no role" hold unchanged.
//!
//! Writes nobody waits on (a session-end record: the client is gone) may wait
//! up to [`LINGER`] for an urgent write to ride along with, so
//! connection-per-transaction traffic pays about one commit per session
//! instead of two. The thread ends when its [`Journal`] is dropped.
//!
//! With `audit.sync = "interval"` (a journal started with a sync window)
//! an audit record is acknowledged once it is written to the OS, and the
//! writer `fsync`s what is pending at most one window later (and when it
//! stops). Such a record is written by the caller itself when the service
//! lock is free at that moment (`try_lock`: one `write`, no thread hand-off,
//! never a wait on the runtime thread), else queued like any other; the
//! caller then only nudges the writer to schedule the fsync. Lease rows are
//! always durable before they are acknowledged.

use crate::audit::Event;
use crate::auditor::Auditor;
use crate::error::{Error, Result};
use crate::service::SecretService;
use crate::store::LeaseRow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Longest a group of non-urgent writes waits for company.
const LINGER: Duration = Duration::from_millis(2);

/// Writes per group commit at most.
const MAX_GROUP: usize = 256;

/// One durable write.
pub enum Entry {
    Audit(Event),
    LeaseRow(LeaseRow),
}

struct Job {
    entry: Entry,
    urgent: bool,
    done: oneshot::Sender<Result<()>>,
}

// A nudge is rare next to jobs; boxing every job would cost an allocation
// per write for nothing.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Job(Job),
    /// Records were written unsynced outside the writer: schedule an fsync.
    SyncSoon,
}

pub struct Journal {
    tx: mpsc::Sender<Msg>,
    /// Set with a sync window: audit records may be written inline.
    inline: Option<Inline>,
}

struct Inline {
    audit: Auditor,
    /// An fsync is scheduled for what was written; cleared by the writer
    /// under the audit log's lock when it syncs.
    sync_scheduled: Arc<AtomicBool>,
}

impl Journal {
    /// Starts the writer thread `name`. `sync_window`: `None` makes every
    /// audit record durable before it is acknowledged; `Some(w)` only
    /// written, and durable within `w` (see the module docs).
    pub fn start(
        service: Arc<Mutex<SecretService>>,
        name: &str,
        sync_window: Option<Duration>,
    ) -> Result<Journal> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let sync_scheduled = Arc::new(AtomicBool::new(false));
        let audit = service
            .lock()
            .map_err(|_| Error::internal("service state poisoned"))?
            .auditor();
        let inline = sync_window.map(|_| Inline {
            audit: audit.clone(),
            sync_scheduled: sync_scheduled.clone(),
        });
        let sinks = Sinks { service, audit };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer(&sinks, &rx, sync_window, &sync_scheduled))
            .map_err(|e| Error::internal(format!("cannot start the journal writer: {e}")))?;
        Ok(Journal { tx, inline })
    }

    /// Makes `entry` durable (`urgent`: someone is waiting, commit at once);
    /// an audit record with a sync window: written (see the module docs).
    pub async fn write(&self, entry: Entry, urgent: bool) -> Result<()> {
        match self.submit(entry, urgent)? {
            Submitted::Done(res) => res,
            Submitted::Queued(wait) => wait.await.map_err(|_| stopped())?,
        }
    }

    /// [`write`](Self::write) for a blocking thread (never a runtime worker).
    pub fn write_blocking(&self, entry: Entry) -> Result<()> {
        match self.submit(entry, true)? {
            Submitted::Done(res) => res,
            Submitted::Queued(wait) => wait.blocking_recv().map_err(|_| stopped())?,
        }
    }

    /// Writes an audit record inline when the sync window allows and the
    /// audit log is free (`try_lock`: the caller never waits), else queues
    /// the entry for the writer.
    fn submit(&self, entry: Entry, urgent: bool) -> Result<Submitted> {
        if let (Some(inline), Entry::Audit(event)) = (&self.inline, &entry) {
            if let Some(res) = inline
                .audit
                .try_record_unsynced(std::slice::from_ref(event))
            {
                if res.is_ok() && !inline.sync_scheduled.swap(true, Ordering::AcqRel) {
                    self.tx.send(Msg::SyncSoon).map_err(|_| stopped())?;
                }
                return Ok(Submitted::Done(res));
            }
        }
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Job(Job {
                entry,
                urgent,
                done,
            }))
            .map_err(|_| stopped())?;
        Ok(Submitted::Queued(wait))
    }

    /// [`record`](Self::record) for a blocking thread.
    pub fn record_blocking(&self, event: Event) -> bool {
        self.write_blocking(Entry::Audit(event)).is_ok()
    }

    /// Appends `event` durably; false when it could not be written.
    pub async fn record(&self, event: Event) -> bool {
        self.write(Entry::Audit(event), true).await.is_ok()
    }

    /// Starts an urgent audit append and returns at once: the record is
    /// written inline (interval mode, log free) or queued for the writer,
    /// whose group commit the caller awaits with [`PendingRecord::wait`]
    /// while it does other work that does not depend on the record.
    pub fn begin_record(&self, event: Event) -> PendingRecord {
        match self.submit(Entry::Audit(event), true) {
            Ok(Submitted::Done(res)) => PendingRecord::Done(res.is_ok()),
            Ok(Submitted::Queued(wait)) => PendingRecord::Queued(wait),
            Err(_) => PendingRecord::Done(false),
        }
    }

    /// As [`record`](Self::record), for a record nobody is waiting on (it
    /// may wait up to [`LINGER`] to share a commit).
    pub async fn record_unhurried(&self, event: Event) -> bool {
        self.write(Entry::Audit(event), false).await.is_ok()
    }
}

/// An audit append begun by [`Journal::begin_record`].
pub enum PendingRecord {
    /// Already decided: written (`true`) or refused.
    Done(bool),
    /// Queued for the writer's group commit.
    Queued(oneshot::Receiver<Result<()>>),
}

impl PendingRecord {
    /// The outcome when it is known without waiting.
    pub fn decided(&self) -> Option<bool> {
        match self {
            PendingRecord::Done(ok) => Some(*ok),
            PendingRecord::Queued(_) => None,
        }
    }

    /// Whether the record was written (durably, when the journal commits).
    pub async fn wait(self) -> bool {
        match self {
            PendingRecord::Done(ok) => ok,
            PendingRecord::Queued(rx) => matches!(rx.await, Ok(Ok(()))),
        }
    }
}

/// Where a submitted entry stands.
enum Submitted {
    Done(Result<()>),
    Queued(oneshot::Receiver<Result<()>>),
}

fn stopped() -> Error {
    Error::internal("the journal writer is not running")
}

/// Where the writer puts entries: lease rows in the store (the service's
/// lock), audit records in the log (its own lock).
struct Sinks {
    service: Arc<Mutex<SecretService>>,
    audit: Auditor,
}

fn writer(
    sinks: &Sinks,
    rx: &mpsc::Receiver<Msg>,
    window: Option<Duration>,
    sync_scheduled: &AtomicBool,
) {
    // When the records written unsynced must be fsynced at the latest.
    let mut sync_due: Option<Instant> = None;
    loop {
        let first = match sync_due {
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
            Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    sync_pending(&sinks.audit, sync_scheduled);
                    sync_due = None;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        let mut jobs = Vec::new();
        if let Msg::Job(first) = first {
            let mut urgent = first.urgent;
            jobs.push(first);
            let deadline = Instant::now() + LINGER;
            while jobs.len() < MAX_GROUP {
                let next = if urgent {
                    rx.try_recv().ok()
                } else {
                    let left = deadline.saturating_duration_since(Instant::now());
                    rx.recv_timeout(left).ok()
                };
                match next {
                    Some(Msg::Job(j)) => {
                        urgent |= j.urgent;
                        jobs.push(j);
                    }
                    Some(Msg::SyncSoon) => {}
                    None => break,
                }
            }
            commit(sinks, jobs, window.is_none());
        }
        if let Some(w) = window {
            let due = *sync_due.get_or_insert_with(|| Instant::now() + w);
            if Instant::now() >= due {
                sync_pending(&sinks.audit, sync_scheduled);
                sync_due = None;
            }
        }
    }
    sync_pending(&sinks.audit, sync_scheduled);
}

/// `fsync`s the audit records written unsynced (by any journal: they share
/// the log). A failure is logged here and refuses every later record.
fn sync_pending(audit: &Auditor, sync_scheduled: &AtomicBool) {
    // Cleared under the log's lock: a record written inline after this
    // schedules anew.
    if let Err(e) = audit.sync_unsynced(|| sync_scheduled.store(false, Ordering::Release)) {
        tracing::error!("{}", e.message);
    }
}

/// Commits one group and answers every job in it (`durable`: the audit
/// records are fsynced before the answer). Lease rows go first, under the
/// service's lock; audit records under the log's own.
fn commit(sinks: &Sinks, jobs: Vec<Job>, durable: bool) {
    let rows: Vec<LeaseRow> = jobs
        .iter()
        .filter_map(|j| match &j.entry {
            Entry::LeaseRow(r) => Some(r.clone()),
            Entry::Audit(_) => None,
        })
        .collect();
    let rows_done = if rows.is_empty() {
        Ok(())
    } else {
        match sinks.service.lock() {
            Ok(mut s) => s.lease_put_many(&rows),
            Err(_) => Err(Error::internal("service state poisoned")),
        }
    };
    let (audits, others): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| matches!(j.entry, Entry::Audit(_)));
    for j in others {
        let _ = j.done.send(rows_done.clone());
    }
    let events: Vec<Event> = audits
        .iter()
        .filter_map(|j| match &j.entry {
            Entry::Audit(e) => Some(e.clone()),
            Entry::LeaseRow(_) => None,
        })
        .collect();
    if events.is_empty() {
        return;
    }
    if sinks.audit.record_all(&events, durable).is_ok() {
        for j in audits {
            let _ = j.done.send(Ok(()));
        }
        return;
    }
    // One bad record must not refuse the others: one by one.
    for (j, e) in audits.into_iter().zip(&events) {
        let _ = j
            .done
            .send(sinks.audit.record_all(std::slice::from_ref(e), durable));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, Actor, ActorKind, Decision, Target};
    use crate::config::Config;
    use crate::masterkey::{KekPlan, KekSource};
    use crate::service::StorePolicy;
    use std::path::{Path, PathBuf};

    fn service() -> (tempfile::TempDir, PathBuf, Arc<Mutex<SecretService>>) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = Config::default_for(Path::new("/test/warden.toml"));
        let plan = KekPlan {
            source: KekSource::File,
            shares: 0,
            threshold: 0,
            credential_name: String::new(),
        };
        let settings = crate::authority::IdentitySettings::from_config(&cfg).unwrap();
        crate::init::init(&data, &cfg.store, &plan, settings, None).unwrap();
        let svc = SecretService::open(&data, StorePolicy::from_config(&cfg), true).unwrap();
        let log = data.join(crate::paths::AUDIT_FILE);
        (dir, log, Arc::new(Mutex::new(svc)))
    }

    fn event(i: usize) -> Event {
        Event {
            actor: Actor {
                kind: ActorKind::Workload,
                uid: Some(1000),
                user: None,
                pid: Some(4000 + i as u32),
                exe: None,
                workload: Some("w".into()),
            },
            action: "session.start".into(),
            target: Target {
                route: Some("r".into()),
                ..Target::default()
            },
            decision: Decision::Allow,
            reason: format!("session {i}"),
        }
    }

    fn records(log: &Path) -> usize {
        std::fs::read_to_string(log)
            .unwrap()
            .matches("\"action\":\"session.start\"")
            .count()
    }

    /// Waits (10 s at most) until nothing written waits for its fsync.
    async fn wait_synced(service: &Mutex<SecretService>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let audit = service.lock().unwrap().auditor();
        while audit.unsynced() {
            assert!(Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Inline writes and queued ones (while something else holds the audit
    /// log's lock) all land in one chain, and the writer fsyncs and anchors them
    /// within the window without being asked again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interval_records_land_inline_or_queued_and_get_synced() {
        let (_dir, log, service) = service();
        let journal = Arc::new(
            Journal::start(
                service.clone(),
                "test-audit",
                Some(Duration::from_millis(20)),
            )
            .unwrap(),
        );
        let holder = {
            let audit = service.lock().unwrap().auditor();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let guard = audit.lock().unwrap();
                    std::thread::sleep(Duration::from_micros(300));
                    drop(guard);
                    std::thread::sleep(Duration::from_micros(300));
                }
            })
        };
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        assert!(journal.record(event(t * 1000 + i)).await);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        holder.join().unwrap();
        assert_eq!(records(&log), 400);
        // No further write: the scheduled fsync still comes.
        wait_synced(&service).await;
        let report = audit::verify(&log).unwrap();
        assert!(
            report.problem.is_none() && report.notes.is_empty(),
            "{report:?}"
        );
        // And again after a quiet period (a new window is scheduled).
        assert!(journal.record(event(9999)).await);
        wait_synced(&service).await;
        assert!(audit::verify(&log).unwrap().notes.is_empty());
    }

    /// Without a window every record is durable and anchored on return.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_records_are_anchored_on_return() {
        let (_dir, log, service) = service();
        let journal = Journal::start(service.clone(), "test-audit", None).unwrap();
        for i in 0..5 {
            assert!(journal.record(event(i)).await);
            assert!(!service.lock().unwrap().auditor().unsynced());
            let report = audit::verify(&log).unwrap();
            assert!(report.notes.is_empty(), "{report:?}");
        }
        assert_eq!(records(&log), 5);
    }
}
