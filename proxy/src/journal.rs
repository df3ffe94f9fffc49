//! Group commit of warden's durable writes: audit records (every route's
//! session records, lease records) and lease rows.
//!
//! Written one by one under the service lock, each write costs its own
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

use crate::audit::Event;
use crate::error::{Error, Result};
use crate::service::SecretService;
use crate::store::LeaseRow;
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

pub struct Journal {
    tx: mpsc::Sender<Job>,
}

impl Journal {
    /// Starts the writer thread `name`.
    pub fn start(service: Arc<Mutex<SecretService>>, name: &str) -> Result<Journal> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer(&service, &rx))
            .map_err(|e| Error::internal(format!("cannot start the journal writer: {e}")))?;
        Ok(Journal { tx })
    }

    /// Makes `entry` durable (`urgent`: someone is waiting, commit at once).
    pub async fn write(&self, entry: Entry, urgent: bool) -> Result<()> {
        let (done, wait) = oneshot::channel();
        let stopped = || Error::internal("the journal writer is not running");
        self.tx
            .send(Job {
                entry,
                urgent,
                done,
            })
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }

    /// Appends `event` durably; false when it could not be written.
    pub async fn record(&self, event: Event) -> bool {
        self.write(Entry::Audit(event), true).await.is_ok()
    }

    /// As [`record`](Self::record), for a record nobody is waiting on (it
    /// may wait up to [`LINGER`] to share a commit).
    pub async fn record_unhurried(&self, event: Event) -> bool {
        self.write(Entry::Audit(event), false).await.is_ok()
    }
}

fn writer(service: &Mutex<SecretService>, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut urgent = first.urgent;
        let mut jobs = vec![first];
        let deadline = Instant::now() + LINGER;
        while jobs.len() < MAX_GROUP {
            let next = if urgent {
                rx.try_recv().ok()
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                rx.recv_timeout(left).ok()
            };
            match next {
                Some(j) => {
                    urgent |= j.urgent;
                    jobs.push(j);
                }
                None => break,
            }
        }
        commit(service, jobs);
    }
}

/// Commits one group and answers every job in it.
fn commit(service: &Mutex<SecretService>, jobs: Vec<Job>) {
    let mut s = match service.lock() {
        Ok(s) => s,
        Err(_) => {
            for j in jobs {
                let _ = j.done.send(Err(Error::internal("service state poisoned")));
            }
            return;
        }
    };
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
        s.lease_put_many(&rows)
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
    if s.record_all(&events).is_ok() {
        for j in audits {
            let _ = j.done.send(Ok(()));
        }
        return;
    }
    // One bad record must not refuse the others: one by one.
    for (j, e) in audits.into_iter().zip(&events) {
        let _ = j.done.send(s.record(e));
    }
}
