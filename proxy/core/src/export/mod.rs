//! `[export]`: access events and audit records shipped off the node.
//!
//! The data path (the event enricher, the audit log right after a record is
//! written) calls [`Exporter::event`] / [`Exporter::audit`], which only
//! checks the workload's token bucket and does a non-blocking `try_send` of a
//! shared [`Item`] into each sink's bounded queue: a full queue drops the
//! entry and counts it (`warden_export_dropped_total{sink,reason}`), so a
//! slow or dead receiver never delays a session or an audit append.
//!
//! Each sink runs on its own thread ("warden-export-NAME"), takes whatever
//! has queued up (a batch) and delivers it: JSON lines to a file (size-based
//! rotation), the journal's native datagram protocol, RFC 5424 syslog over a
//! unix datagram socket, UDP or TCP, or OTLP/HTTP JSON logs through warden's
//! one outbound HTTP client ([`crate::webhook::post`]). Failed deliveries to
//! TCP syslog and OTLP are retried with backoff; a batch that still fails is
//! dropped and counted (`reason="failed"`).
//!
//! What is exported is exactly what is written locally: an audit record is
//! the log's own line (seq, hash and all), an event the JSON `warden events
//! --json` prints. Neither carries a secret value (see `audit`), and no
//! error message of a sink formats anything but addresses and OS errors.

mod file;
mod journald;
mod otlp;
mod syslog;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use serde_json::Value;

use crate::config::{Export, ExportKind, ExportSink, ExportStream};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Most entries one delivery takes from a queue.
const MAX_BATCH: usize = 512;
/// Delivery attempts of one batch (otlp, tcp syslog) before it is dropped.
const MAX_ATTEMPTS: u32 = 4;
/// First and longest wait between attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Token buckets kept at most (one per workload or unattested uid).
const MAX_BUCKETS: usize = 4096;

/// One exported entry: an event or an audit record, as its JSON line.
#[derive(Debug)]
pub struct Item {
    pub stream: ExportStream,
    /// The JSON object, one line, no trailing newline.
    pub json: Box<str>,
}

/// The counters of one sink.
#[derive(Clone)]
pub(crate) struct SinkCounters {
    pub sent: IntCounter,
    pub errors: IntCounter,
    pub queue_full: IntCounter,
    pub rate_limited: IntCounter,
    pub failed: IntCounter,
}

struct SinkHandle {
    events: bool,
    audit: bool,
    tx: SyncSender<Arc<Item>>,
    counters: SinkCounters,
    /// Entries queued and not yet delivered or dropped (for [`Exporter::flush`]).
    pending: Arc<AtomicUsize>,
}

/// The daemon's exporter: one bounded queue and thread per sink.
pub struct Exporter {
    sinks: Vec<SinkHandle>,
    limiter: Option<Mutex<Limiter>>,
    events: bool,
    audit: bool,
}

/// Who a rate limit applies to.
#[derive(Debug, Clone, Copy)]
pub enum RateKey<'a> {
    /// An attested workload.
    Workload(&'a str),
    /// A process that attests to no workload, by uid.
    Uid(u32),
    /// Not limited (admin and daemon audit records).
    None,
}

impl Exporter {
    /// Starts a thread per `[[export.sink]]`; `None` without sinks. Header
    /// values held in files are read here (an unreadable one stops the
    /// start, naming the key).
    pub fn start(cfg: &Export, metrics: &Metrics) -> Result<Option<Arc<Exporter>>> {
        if cfg.sinks.is_empty() {
            return Ok(None);
        }
        let mut sinks = Vec::with_capacity(cfg.sinks.len());
        for (i, s) in cfg.sinks.iter().enumerate() {
            let counters = metrics.export_counters(s.name());
            let out = output_for(i, s)?;
            let (tx, rx) = mpsc::sync_channel::<Arc<Item>>(cfg.queue());
            let c = counters.clone();
            let pending = Arc::new(AtomicUsize::new(0));
            let p = pending.clone();
            std::thread::Builder::new()
                .name(format!("warden-export-{}", s.name()))
                .spawn(move || run_sink(rx, out, &c, &p))
                .map_err(|e| Error::internal(format!("cannot start the export thread: {e}")))?;
            tracing::info!(sink = %s.name(), kind = %s.kind, "export sink started");
            sinks.push(SinkHandle {
                events: s.carries(ExportStream::Events),
                audit: s.carries(ExportStream::Audit),
                tx,
                counters,
                pending,
            });
        }
        let rate = cfg.rate_per_workload();
        Ok(Some(Arc::new(Exporter {
            events: sinks.iter().any(|s| s.events),
            audit: sinks.iter().any(|s| s.audit),
            sinks,
            limiter: (rate > 0)
                .then(|| Mutex::new(Limiter::new(f64::from(rate), f64::from(cfg.burst())))),
        })))
    }

    /// Whether any sink carries access events.
    pub fn wants_events(&self) -> bool {
        self.events
    }

    /// Whether any sink carries audit records.
    pub fn wants_audit(&self) -> bool {
        self.audit
    }

    /// Queues an access event (its `warden events --json` line).
    pub fn event(&self, key: RateKey<'_>, json: String) {
        if self.events {
            self.offer(ExportStream::Events, key, json.into_boxed_str());
        }
    }

    /// Queues an audit record (the log's line, without its newline).
    pub fn audit(&self, key: RateKey<'_>, line: &[u8]) {
        if !self.audit {
            return;
        }
        let text = String::from_utf8_lossy(line).into_owned();
        self.offer(ExportStream::Audit, key, text.into_boxed_str());
    }

    /// Waits (at most `limit`) until every queued entry was delivered or
    /// given up: the daemon's last records (`daemon.stop`) at a clean stop.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .sinks
                .iter()
                .all(|s| s.pending.load(Ordering::Acquire) == 0)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The audit log's tap: each record, as written, to the sinks that
    /// carry audit records (limited per workload, or per uid for a process
    /// of no workload; admin and daemon records are never limited).
    pub fn audit_tap(self: &Arc<Self>) -> crate::audit::AuditTap {
        let me = self.clone();
        crate::audit::AuditTap(Arc::new(move |event, line| {
            let key = match (&event.actor.workload, event.actor.kind, event.actor.uid) {
                (Some(w), _, _) => RateKey::Workload(w),
                // A refused process that attests to no workload: by uid, so
                // a flood of refusals cannot drown the pipe either.
                (None, crate::audit::ActorKind::Workload, Some(uid)) => RateKey::Uid(uid),
                _ => RateKey::None,
            };
            me.audit(key, line);
        }))
    }

    fn offer(&self, stream: ExportStream, key: RateKey<'_>, json: Box<str>) {
        let carries = |s: &SinkHandle| match stream {
            ExportStream::Events => s.events,
            ExportStream::Audit => s.audit,
        };
        if let Some(limiter) = &self.limiter {
            let allowed = match key {
                RateKey::None => true,
                RateKey::Workload(w) => limiter
                    .lock()
                    .map(|mut l| l.allow(w, Instant::now()))
                    .unwrap_or(true),
                RateKey::Uid(uid) => limiter
                    .lock()
                    .map(|mut l| l.allow(&format!("uid:{uid}"), Instant::now()))
                    .unwrap_or(true),
            };
            if !allowed {
                for s in self.sinks.iter().filter(|s| carries(s)) {
                    s.counters.rate_limited.inc();
                }
                return;
            }
        }
        let item = Arc::new(Item { stream, json });
        for s in self.sinks.iter().filter(|s| carries(s)) {
            s.pending.fetch_add(1, Ordering::AcqRel);
            match s.tx.try_send(item.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    s.pending.fetch_sub(1, Ordering::AcqRel);
                    s.counters.queue_full.inc()
                }
            }
        }
    }
}

/// Per-key token buckets.
struct Limiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<Box<str>, (f64, Instant)>,
}

impl Limiter {
    fn new(rate: f64, burst: f64) -> Limiter {
        Limiter {
            rate,
            burst,
            buckets: HashMap::new(),
        }
    }

    fn allow(&mut self, key: &str, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let refill = |(tokens, at): (f64, Instant)| {
            (
                burst.min(tokens + now.saturating_duration_since(at).as_secs_f64() * rate),
                now,
            )
        };
        if let Some(b) = self.buckets.get_mut(key) {
            *b = refill(*b);
            if b.0 >= 1.0 {
                b.0 -= 1.0;
                return true;
            }
            return false;
        }
        if self.buckets.len() >= MAX_BUCKETS {
            // Full buckets hold no state worth keeping.
            self.buckets.retain(|_, b| refill(*b).0 < burst);
            if self.buckets.len() >= MAX_BUCKETS {
                self.buckets.clear();
            }
        }
        self.buckets.insert(key.into(), (burst - 1.0, now));
        true
    }
}

/// How a sink delivers one batch.
pub(crate) trait Output: Send {
    /// Delivers `batch`; `Err` with a reason (addresses and OS errors only)
    /// when nothing or not all of it was delivered and a retry may help.
    /// Returns how many entries were delivered.
    fn deliver(&mut self, batch: &[Arc<Item>]) -> std::result::Result<usize, Failure>;
    /// Whether a failed batch is retried (network sinks).
    fn retries(&self) -> bool {
        false
    }
}

/// A failed delivery: why, and how many of the batch went out before it.
pub(crate) struct Failure {
    pub delivered: usize,
    pub why: String,
}

impl Failure {
    pub(crate) fn new(why: impl Into<String>) -> Failure {
        Failure {
            delivered: 0,
            why: why.into(),
        }
    }
}

fn output_for(i: usize, s: &ExportSink) -> Result<Box<dyn Output>> {
    Ok(match s.kind {
        ExportKind::File => Box::new(file::FileOutput::new(s)?),
        ExportKind::Journald => Box::new(journald::JournaldOutput::new(s)),
        ExportKind::Syslog => Box::new(syslog::SyslogOutput::new(s)?),
        ExportKind::Otlp => Box::new(otlp::OtlpOutput::new(i, s)?),
    })
}

/// A sink's thread: batches from the queue, delivered with retries; ends
/// when the exporter is dropped.
fn run_sink(
    rx: Receiver<Arc<Item>>,
    mut out: Box<dyn Output>,
    c: &SinkCounters,
    pending: &AtomicUsize,
) {
    let mut backoff = Duration::ZERO;
    let mut warned_at: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        let mut rest: &[Arc<Item>] = &batch;
        let mut attempt = 0;
        loop {
            if !backoff.is_zero() {
                std::thread::sleep(backoff);
            }
            attempt += 1;
            match out.deliver(rest) {
                Ok(n) => {
                    c.sent.inc_by(n as u64);
                    backoff = Duration::ZERO;
                    break;
                }
                Err(f) => {
                    c.sent.inc_by(f.delivered as u64);
                    c.errors.inc();
                    rest = rest.get(f.delivered..).unwrap_or(&[]);
                    // One warning a minute at most: a dead receiver must not
                    // flood the daemon's own log either.
                    if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(sink = %std::thread::current().name().unwrap_or("export"), "export delivery failed: {}", f.why);
                        warned_at = Some(Instant::now());
                    }
                    if out.retries() {
                        backoff = (backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
                    }
                    if !out.retries() || attempt >= MAX_ATTEMPTS || rest.is_empty() {
                        c.failed.inc_by(rest.len() as u64);
                        break;
                    }
                }
            }
        }
        pending.fetch_sub(batch.len(), Ordering::AcqRel);
    }
}

/// What the structured sinks (journald fields, syslog SD params, OTLP
/// attributes) show of an entry, read from its JSON.
pub(crate) struct Fields {
    /// (name, value): lowercase names such as `workload`, `action`.
    pub attrs: Vec<(&'static str, String)>,
    /// RFC 5424 severity: 3 err, 4 warning, 5 notice, 6 info.
    pub severity: u8,
    /// A one-line human summary.
    pub summary: String,
    /// The entry's own time (RFC 3339), if it has one.
    pub time: Option<String>,
}

/// Attribute name → JSON pointer, per stream.
const AUDIT_FIELDS: &[(&str, &str)] = &[
    ("workload", "/actor/workload"),
    ("actor_kind", "/actor/kind"),
    ("uid", "/actor/uid"),
    ("user", "/actor/user"),
    ("pid", "/actor/pid"),
    ("exe", "/actor/exe"),
    ("action", "/action"),
    ("decision", "/decision"),
    ("route", "/target/route"),
    ("secret", "/target/secret"),
    ("env", "/target/env"),
    ("version", "/target/version"),
    ("seq", "/seq"),
    ("hash", "/hash"),
];

const EVENT_FIELDS: &[(&str, &str)] = &[
    ("workload", "/workload"),
    ("pid", "/pid"),
    ("uid", "/uid"),
    ("exe", "/exe"),
    ("unit", "/unit"),
    ("container", "/container"),
    ("cgroup", "/cgroup"),
    ("kind", "/kind"),
    ("verdict", "/verdict"),
    ("destination", "/destination"),
    ("address", "/address"),
];

pub(crate) fn fields(item: &Item) -> Fields {
    let v: Value = serde_json::from_str(&item.json).unwrap_or(Value::Null);
    let text = |ptr: &str| -> Option<String> {
        match v.pointer(ptr)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let table = match item.stream {
        ExportStream::Audit => AUDIT_FIELDS,
        ExportStream::Events => EVENT_FIELDS,
    };
    let mut attrs: Vec<(&'static str, String)> = vec![("stream", item.stream.as_str().into())];
    attrs.extend(
        table
            .iter()
            .filter_map(|(name, ptr)| text(ptr).map(|t| (*name, t))),
    );
    let (severity, summary) = match item.stream {
        ExportStream::Audit => {
            let decision = text("/decision").unwrap_or_default();
            let sev = match decision.as_str() {
                "allow" => 6,
                "deny" => 4,
                _ => 3,
            };
            (
                sev,
                format!(
                    "{} {}: {}",
                    text("/action").unwrap_or_default(),
                    decision,
                    text("/reason").unwrap_or_default()
                ),
            )
        }
        ExportStream::Events => {
            if let Some(chain) = v.get("ancestry").and_then(Value::as_array) {
                let shown: Vec<String> = chain
                    .iter()
                    .map(|a| {
                        format!(
                            "{}({})",
                            a.get("exe").and_then(Value::as_str).unwrap_or("?"),
                            a.get("pid").and_then(Value::as_u64).unwrap_or(0)
                        )
                    })
                    .collect();
                if !shown.is_empty() {
                    attrs.push(("ancestry", shown.join(" <- ")));
                }
            }
            let verdict = text("/verdict").unwrap_or_default();
            let sev = match verdict.as_str() {
                "allowed" => 6,
                "bypass_observed" => 5,
                _ => 4,
            };
            (
                sev,
                format!(
                    "{} {} pid {} {} -> {}",
                    verdict,
                    text("/kind").unwrap_or_default(),
                    text("/pid").unwrap_or_default(),
                    text("/exe").unwrap_or_else(|| text("/comm").unwrap_or_default()),
                    text("/destination").unwrap_or_default()
                ),
            )
        }
    };
    Fields {
        attrs,
        severity,
        summary,
        time: text("/time"),
    }
}

/// This host's name (for syslog and OTLP).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_limit_each_key_and_refill() {
        let mut l = Limiter::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!(l.allow("a", t0) && l.allow("a", t0) && l.allow("a", t0));
        assert!(!l.allow("a", t0), "burst spent");
        assert!(l.allow("b", t0), "another key has its own bucket");
        // 10 per second: one token after 100 ms.
        assert!(l.allow("a", t0 + Duration::from_millis(110)));
        assert!(!l.allow("a", t0 + Duration::from_millis(120)));
        // Many keys never grow the table past its bound.
        for i in 0..(MAX_BUCKETS + 100) {
            l.allow(&format!("k{i}"), t0);
        }
        assert!(l.buckets.len() <= MAX_BUCKETS);
    }

    #[test]
    fn fields_of_an_audit_record_and_an_event() {
        let audit = Item {
            stream: ExportStream::Audit,
            json: r#"{"seq":7,"time":"2026-12-06T10:00:00.000001Z","actor":{"kind":"workload","uid":0,"pid":42,"workload":"me"},"action":"session.deny","target":{"route":"db"},"decision":"deny","reason":"not allowed","prev":"00","hash":"ab"}"#.into(),
        };
        let f = fields(&audit);
        assert_eq!(f.severity, 4);
        assert!(f.attrs.contains(&("workload", "me".into())));
        assert!(f.attrs.contains(&("seq", "7".into())));
        assert!(f.attrs.contains(&("route", "db".into())));
        assert_eq!(f.summary, "session.deny deny: not allowed");
        let event = Item {
            stream: ExportStream::Events,
            json: r#"{"time":"t","pid":5,"verdict":"allowed","kind":"connect","exe":"/usr/bin/psql","destination":"route db","ancestry":[{"pid":4,"exe":"/bin/bash"},{"pid":1,"exe":"/sbin/init"}]}"#.into(),
        };
        let f = fields(&event);
        assert_eq!(f.severity, 6);
        assert!(f
            .attrs
            .contains(&("ancestry", "/bin/bash(4) <- /sbin/init(1)".into())));
    }
}
