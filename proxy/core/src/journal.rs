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
//! stops). Such a record is written by the caller itself when the audit
//! log's lock is free at that moment (`try_lock`: one `write`, no thread
//! hand-off, never a wait on the runtime thread), else queued like any
//! other; the caller then only nudges the writer to schedule the fsync.
//! A record nobody waits on (a session end) is not written on its own: it
//! is held in memory ([`MAX_HELD`] at most) and goes out in the same
//! `write` as the next urgent record, or at the latest with the window's
//! `fsync` (the writer writes what is held, then syncs). It is lost only
//! if warden dies within that window, as an unsynced record is if the OS
//! does; its time is when it was written. Lease rows are always durable
//! before they are acknowledged.

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

/// Records nobody waits on held for the next write, at most (interval
/// mode); past this one is written at once.
const MAX_HELD: usize = 256;

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
    /// An fsync is scheduled for what was written or held; cleared by the
    /// writer under the audit log's lock when it syncs.
    sync_scheduled: Arc<AtomicBool>,
    /// Records nobody waits on, in order, for the next write.
    held: Arc<Mutex<Vec<Event>>>,
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
        let held = Arc::new(Mutex::new(Vec::new()));
        let audit = service
            .lock()
            .map_err(|_| Error::internal("service state poisoned"))?
            .auditor();
        let inline = sync_window.map(|_| Inline {
            audit: audit.clone(),
            sync_scheduled: sync_scheduled.clone(),
            held: held.clone(),
        });
        let sinks = Sinks {
            service,
            audit,
            held,
        };
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
    /// audit log is free (`try_lock`: the caller never waits), with the
    /// records held before it; holds a record nobody waits on (`urgent`
    /// false); else queues the entry for the writer.
    fn submit(&self, entry: Entry, urgent: bool) -> Result<Submitted> {
        let entry = match (&self.inline, entry) {
            (Some(inline), Entry::Audit(event)) => {
                let event = if urgent {
                    event
                } else {
                    match inline.hold(event) {
                        None => {
                            self.schedule_sync(inline)?;
                            return Ok(Submitted::Done(Ok(())));
                        }
                        Some(event) => event,
                    }
                };
                let mut batch = inline.take_held();
                batch.push(event);
                let res = inline.audit.try_record_unsynced(&batch);
                let Some(event) = batch.pop() else {
                    return Err(Error::internal("audit batch lost its record"));
                };
                match res {
                    Some(Ok(())) => {
                        self.schedule_sync(inline)?;
                        return Ok(Submitted::Done(Ok(())));
                    }
                    Some(Err(e)) => {
                        // Held records are valid (checked when held): the log
                        // itself refuses writes. They stay held for the
                        // writer, which logs what it cannot write.
                        inline.put_back(batch);
                        return Ok(Submitted::Done(Err(e)));
                    }
                    None => {
                        inline.put_back(batch);
                        Entry::Audit(event)
                    }
                }
            }
            (_, other) => other,
        };
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

    /// Writes the records held for the next write now (a blocking thread:
    /// this waits for the audit log's lock); the next fsync covers them.
    pub fn flush_held(&self) -> Result<()> {
        match &self.inline {
            Some(inline) => {
                let held = inline.take_held();
                if held.is_empty() {
                    return Ok(());
                }
                inline.audit.record_all(&held, false)?;
                // A stopping writer is no loss: its last act is the fsync.
                let _ = self.schedule_sync(inline);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Asks the writer for an fsync (and a write of the held records)
    /// within the window, unless one is scheduled already.
    fn schedule_sync(&self, inline: &Inline) -> Result<()> {
        if !inline.sync_scheduled.swap(true, Ordering::AcqRel) {
            self.tx.send(Msg::SyncSoon).map_err(|_| stopped())?;
        }
        Ok(())
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

impl Inline {
    /// Holds `event` for the next write; gives it back when enough are
    /// held or the log would refuse it (then it is written at once, to fail
    /// there).
    fn hold(&self, event: Event) -> Option<Event> {
        if crate::audit::validate_event(&event).is_err() {
            return Some(event);
        }
        match self.held.lock() {
            Ok(mut held) if held.len() < MAX_HELD => {
                held.push(event);
                None
            }
            _ => Some(event),
        }
    }

    fn take_held(&self) -> Vec<Event> {
        self.held
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    /// Returns records taken by [`take_held`](Self::take_held) but not
    /// written, ahead of any held since.
    fn put_back(&self, mut batch: Vec<Event>) {
        if batch.is_empty() {
            return;
        }
        if let Ok(mut held) = self.held.lock() {
            batch.append(&mut held);
            *held = batch;
        }
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
    /// Records held for the next write (interval mode), written before
    /// each fsync.
    held: Arc<Mutex<Vec<Event>>>,
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
                    sync_pending(sinks, sync_scheduled);
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
                sync_pending(sinks, sync_scheduled);
                sync_due = None;
            }
        }
    }
    sync_pending(sinks, sync_scheduled);
}

/// Writes the held records and `fsync`s every record written unsynced (by
/// any journal: they share the log). A failure is logged here; a failed
/// fsync refuses every later record.
fn sync_pending(sinks: &Sinks, sync_scheduled: &AtomicBool) {
    // Under the log's lock, the flag is cleared before the held records are
    // taken: a record held or written inline after the clear schedules
    // anew, and one held before it is taken here.
    let res = sinks.audit.sync_unsynced(|| {
        sync_scheduled.store(false, Ordering::Release);
        sinks
            .held
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    });
    if let Err(e) = res {
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

    fn actions_and_reasons(log: &Path) -> Vec<(String, String)> {
        audit::read_records(log, None)
            .unwrap()
            .into_iter()
            .map(|r| (r.action, r.reason))
            .collect()
    }

    fn end_event(i: usize) -> Event {
        Event {
            action: "session.end".into(),
            ..event(i)
        }
    }

    /// Interval mode: a record nobody waits on is held, goes out ahead of
    /// the next urgent one in the same write, or with the window's fsync
    /// when none follows, and at the latest when the journal stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_nobody_waits_on_ride_with_the_next_write_or_the_window() {
        let (_dir, log, service) = service();
        // A long window: what is written before it ends rode along.
        let journal =
            Journal::start(service.clone(), "test-audit", Some(Duration::from_secs(5))).unwrap();
        assert!(journal.record_unhurried(end_event(1)).await);
        assert!(journal.record_unhurried(end_event(2)).await);
        assert!(
            actions_and_reasons(&log)
                .iter()
                .all(|(a, _)| a != "session.end"),
            "held records were written on their own"
        );
        assert!(journal.record(event(3)).await);
        let got: Vec<_> = actions_and_reasons(&log)
            .into_iter()
            .filter(|(_, r)| r.starts_with("session "))
            .collect();
        let want: Vec<(String, String)> = [
            ("session.end", "session 1"),
            ("session.end", "session 2"),
            ("session.start", "session 3"),
        ]
        .iter()
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .collect();
        assert_eq!(got, want, "held records go first, in order");
        drop(journal);

        // A short window and no later record: the writer writes it, then
        // fsyncs it.
        let journal = Journal::start(
            service.clone(),
            "test-audit",
            Some(Duration::from_millis(20)),
        )
        .unwrap();
        assert!(journal.record_unhurried(end_event(4)).await);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !actions_and_reasons(&log)
            .iter()
            .any(|(_, r)| r == "session 4")
        {
            assert!(Instant::now() < deadline, "a held record was never written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        wait_synced(&service).await;
        drop(journal);

        // flush_held writes them at once (the daemon does before its stop
        // record).
        let journal =
            Journal::start(service.clone(), "test-audit", Some(Duration::from_secs(60))).unwrap();
        assert!(journal.record_unhurried(end_event(6)).await);
        assert!(!actions_and_reasons(&log)
            .iter()
            .any(|(_, r)| r == "session 6"));
        journal.flush_held().unwrap();
        assert!(actions_and_reasons(&log)
            .iter()
            .any(|(_, r)| r == "session 6"));
        drop(journal);

        // Stopping the journal writes what is held.
        let journal =
            Journal::start(service.clone(), "test-audit", Some(Duration::from_secs(60))).unwrap();
        assert!(journal.record_unhurried(end_event(5)).await);
        drop(journal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !actions_and_reasons(&log)
            .iter()
            .any(|(_, r)| r == "session 5")
        {
            assert!(Instant::now() < deadline, "a held record was lost at stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = audit::verify(&log).unwrap();
        assert!(report.problem.is_none(), "{report:?}");
    }
}
