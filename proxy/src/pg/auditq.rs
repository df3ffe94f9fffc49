//! Group commit for the audit records of PostgreSQL sessions.
//!
//! Every session writes two durable records (start before the client gets
//! the session, end after it). Written one by one under the service lock,
//! each costs its own `fsync`s on a runtime thread, and connection-per-
//! transaction traffic queues behind them. Here sessions hand their records
//! to one writer thread and wait for the answer; the writer takes whatever
//! has queued up meanwhile and appends it as one group (one write, one
//! `fsync`, one anchor update — see `AuditLog::append_all`). A record is
//! still durable before the caller goes on, so the session-start rule (no
//! record, no session) holds unchanged.
//!
//! Session-end records are on nobody's path (the client is gone): a group
//! made only of them waits up to [`LINGER`] for an urgent record (a session
//! start) to ride along with, so connection-per-transaction traffic pays
//! about one commit per session instead of two.

use crate::audit::Event;
use crate::error::{Error, Result};
use crate::service::SecretService;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Longest a group of non-urgent records waits for company.
const LINGER: Duration = Duration::from_millis(2);

/// Records per group commit at most.
const MAX_GROUP: usize = 256;

struct Job {
    event: Event,
    urgent: bool,
    done: oneshot::Sender<bool>,
}

pub struct AuditQueue {
    tx: mpsc::Sender<Job>,
}

impl AuditQueue {
    /// Starts the writer thread (it ends when the queue is dropped).
    pub fn start(service: Arc<Mutex<SecretService>>) -> Result<AuditQueue> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("warden-pg-audit".into())
            .spawn(move || writer(&service, &rx))
            .map_err(|e| Error::internal(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditQueue { tx })
    }

    /// Appends `event` durably; false when it could not be written.
    pub async fn record(&self, event: Event) -> bool {
        self.submit(event, true).await
    }

    /// As [`record`](Self::record), for a record nobody is waiting on (it
    /// may wait up to [`LINGER`] to share a commit).
    pub async fn record_unhurried(&self, event: Event) -> bool {
        self.submit(event, false).await
    }

    async fn submit(&self, event: Event, urgent: bool) -> bool {
        let (done, wait) = oneshot::channel();
        if self
            .tx
            .send(Job {
                event,
                urgent,
                done,
            })
            .is_err()
        {
            return false;
        }
        wait.await.unwrap_or(false)
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
        let (events, dones): (Vec<Event>, Vec<oneshot::Sender<bool>>) =
            jobs.into_iter().map(|j| (j.event, j.done)).unzip();
        let results: Vec<bool> = match service.lock() {
            Ok(mut s) => {
                if s.record_all(&events).is_ok() {
                    vec![true; events.len()]
                } else {
                    // One bad record must not refuse the others: one by one.
                    events.iter().map(|e| s.record(e).is_ok()).collect()
                }
            }
            Err(_) => vec![false; events.len()],
        };
        for (done, ok) in dones.into_iter().zip(results) {
            let _ = done.send(ok);
        }
    }
}
