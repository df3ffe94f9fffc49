//! The audit log's one owner in a process: an [`AuditLog`] behind its own
//! lock — never the secrets lock — shared by the secret service (admin
//! actions, appended inside their store transaction), the session journal
//! (every front end's session records), the identity authority and the
//! lease journal. Every append is counted in the metrics once they are set.
//!
//! Lock order: a holder of the secret service's lock may take this one
//! (a store transaction's commit hook appends its record); nothing holding
//! this lock takes the service's. Session records therefore never wait for
//! a secret read or an admin action.

use crate::audit::{AuditLog, Event};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Tries to take a busy log lock before an unsynced record is queued instead.
const INLINE_ATTEMPTS: u32 = 8;

/// A cloneable handle on the process's audit log.
#[derive(Clone)]
pub struct Auditor {
    log: Arc<Mutex<AuditLog>>,
    metrics: Arc<OnceLock<Metrics>>,
}

impl Auditor {
    pub fn new(log: AuditLog) -> Auditor {
        Auditor {
            log: Arc::new(Mutex::new(log)),
            metrics: Arc::new(OnceLock::new()),
        }
    }

    /// Counts every later append (and failed sync) in `m`.
    pub fn set_metrics(&self, m: Metrics) {
        let _ = self.metrics.set(m);
    }

    /// Hands every record written from now on to `tap` (the exporter).
    pub fn set_tap(&self, tap: crate::audit::AuditTap) -> Result<()> {
        self.lock()?.set_tap(tap);
        Ok(())
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, AuditLog>> {
        self.log
            .lock()
            .map_err(|_| Error::internal("audit log state poisoned after an earlier failure"))
    }

    /// Appends one record durably.
    pub fn record(&self, event: &Event) -> Result<()> {
        self.record_all(std::slice::from_ref(event), true)
    }

    /// Appends records as one group commit (one `fsync`, or with `durable`
    /// false none: see [`AuditLog::append_all_unsynced`]); all or nothing.
    pub fn record_all(&self, events: &[Event], durable: bool) -> Result<()> {
        let mut log = self.lock()?;
        self.append(&mut log, events, durable)
    }

    /// [`Self::record_all`] unsynced, if the log is free right now
    /// (`try_lock`: a runtime thread never waits); `None` when it is busy.
    ///
    /// Holders of the lock never wait on the disk in interval mode (the
    /// fsync runs outside it), so a busy lock is usually free again within
    /// microseconds: a few spins and yields are cheaper than handing the
    /// record to the journal thread and waiting for its answer (two thread
    /// wake-ups). A lock still busy after that (an admin action's durable
    /// append) is left to the queue.
    pub fn try_record_unsynced(&self, events: &[Event]) -> Option<Result<()>> {
        for attempt in 0..INLINE_ATTEMPTS {
            if let Ok(mut log) = self.log.try_lock() {
                return Some(self.append(&mut log, events, false));
            }
            if attempt < INLINE_ATTEMPTS / 2 {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        None
    }

    fn append(&self, log: &mut AuditLog, events: &[Event], durable: bool) -> Result<()> {
        let res = log.write_all(events, durable);
        if let Some(m) = self.metrics.get() {
            for _ in events {
                m.audit_write(res.is_ok());
            }
        }
        res.map(|_| ()).map_err(Error::from)
    }

    /// Whether records written without `fsync` wait for one.
    pub fn unsynced(&self) -> bool {
        self.lock().map(|l| l.has_unsynced()).unwrap_or(false)
    }

    /// Why the log refuses records after a failed background `fsync`.
    pub fn sync_failure(&self) -> Option<String> {
        match self.lock() {
            Ok(l) => l.sync_failure().map(String::from),
            Err(e) => Some(e.message),
        }
    }

    /// `fsync`s the records written without one, if any, after running
    /// `first` under the log's lock and writing the records it returns
    /// (the journal clears its "sync scheduled" flag there and hands over
    /// the records it held); a failure is counted and sticky (see
    /// [`AuditLog::sync_pending`]).
    pub fn sync_unsynced(&self, first: impl FnOnce() -> Vec<Event>) -> Result<()> {
        // The fsync runs without the lock: appends (session records) go on
        // meanwhile instead of queueing behind the disk.
        let mut written = Ok(());
        let pending = {
            let mut log = self.lock()?;
            let held = first();
            if !held.is_empty() {
                written = self.append(&mut log, &held, false);
            }
            match log.begin_sync() {
                Some(p) => p,
                None => return written,
            }
        };
        let io = pending.run();
        let res = self.lock()?.finish_sync(pending, io);
        if res.is_err() {
            if let Some(m) = self.metrics.get() {
                m.audit_sync_failed();
            }
        }
        res.map_err(Error::from).and(written)
    }
}
