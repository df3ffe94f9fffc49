//! Anomaly detection (`[anomaly]`): rules over session, denial, identity and
//! kernel events, each with an action `log | alert | freeze`.
//!
//! The data path only calls [`Anomaly`]'s `session`/`denial`/`bypass`/
//! `issue`: a table lookup and a push of a small `Copy` [`Signal`] on a
//! bounded queue that the detector drains in batches ([`SignalQueue`]; a
//! full queue drops the signal and counts it; it never blocks). One detector task owns all state: per workload a fixed array of
//! per-secret last-use times, a small ring of recent pids and executables, an
//! EWMA of the session rate and up to [`KNOWN_EXES`] executable hashes; for
//! denials a fixed table of [`DENIAL_SLOTS`] process/cgroup slots, each a
//! ring of the last `limit` denial times. Everything is allocated at start;
//! [`Detector::observe`] does not allocate unless a rule fires.
//!
//! A finding is logged, counted (`warden_anomaly_detections_total`),
//! audited (`anomaly.detect`), frozen through [`Freezer`] (`freeze`) and
//! POSTed to `anomaly.webhook` (`alert`, `freeze`) by a separate task that
//! retries with backoff: the freeze never waits for the alert.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::audit::{Decision, Event, Target};
use crate::config::{AnomalyAction, AnomalyOverrides, Config};
use crate::freeze::Freezer;
use crate::metrics::Metrics;
use crate::service::SecretService;

/// Signals queued between the data path and the detector.
pub const QUEUE: usize = 16_384;
/// Executable hashes remembered per workload.
pub const KNOWN_EXES: usize = 8;
/// Processes/cgroups tracked by the denial rule.
pub const DENIAL_SLOTS: usize = 64;
const EVIDENCE_PIDS: usize = 8;
const EVIDENCE_EXES: usize = 4;
/// Alerts waiting for the webhook.
const ALERT_QUEUE: usize = 256;
const MINUTE: Duration = Duration::from_secs(60);
/// A bypass rule fires at most this often per workload (or for unattested
/// processes together).
const BYPASS_COOLDOWN: Duration = Duration::from_secs(10);

// Defaults (README "Anomaly detection and freezing").
pub const DEFAULT_DISTINCT_LIMIT: u32 = 100;
pub const DEFAULT_DENIAL_LIMIT: u32 = 10;
pub const DEFAULT_RATE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_RATE_WARMUP: u32 = 30;
pub const DEFAULT_RATE_SIGMAS: u32 = 4;
pub const DEFAULT_RATE_MIN: u32 = 20;
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(600);

/// Rule names (the `[anomaly]` keys; metric label `rule`).
pub const RULE_DISTINCT: &str = "distinct_secrets_per_minute";
pub const RULE_RATE: &str = "session_rate";
pub const RULE_EXE: &str = "new_executable";
pub const RULE_DENIALS: &str = "denials_per_minute";
pub const RULE_BYPASS: &str = "bypass";

/// One event for the detector.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    /// A session was allowed: workload and secret indexes (no secret: a
    /// credential that is not a stored secret, e.g. a tls route's SVID).
    Session {
        workload: u16,
        secret: Option<u16>,
        pid: u32,
        exe: Option<[u8; 32]>,
    },
    /// A policy refusal (unattested, not allowed on the route, database);
    /// `cgroup` 0 when unknown (then keyed by pid).
    Denial {
        workload: Option<u16>,
        pid: u32,
        cgroup: u64,
    },
    /// A direct connect to a protected upstream.
    Bypass {
        workload: Option<u16>,
        pid: u32,
        cgroup: u64,
    },
    /// An SVID was handed out through the Workload API.
    Issue {
        workload: u16,
        pid: u32,
        exe: Option<[u8; 32]>,
    },
}

/// The resolved rules of one workload.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub distinct_limit: u32,
    pub distinct_action: AnomalyAction,
    pub rate_interval: Duration,
    pub rate_warmup: u32,
    pub rate_sigmas: u32,
    pub rate_min: u32,
    pub rate_action: AnomalyAction,
    pub stable_after: Duration,
    pub exe_action: AnomalyAction,
    pub denial_limit: u32,
    pub denial_action: AnomalyAction,
    pub bypass_action: AnomalyAction,
}

impl Rules {
    fn resolve(global: &AnomalyOverrides, own: Option<&AnomalyOverrides>) -> Rules {
        let pick = |f: fn(&AnomalyOverrides) -> bool| own.filter(|o| f(o)).unwrap_or(global);
        let d = pick(|o| o.distinct_secrets_per_minute.is_some())
            .distinct_secrets_per_minute
            .clone();
        let r = pick(|o| o.session_rate.is_some()).session_rate.clone();
        let e = pick(|o| o.new_executable.is_some()).new_executable.clone();
        let n = pick(|o| o.denials_per_minute.is_some())
            .denials_per_minute
            .clone();
        let b = pick(|o| o.bypass.is_some()).bypass.clone();
        Rules {
            distinct_limit: d.as_ref().map_or(DEFAULT_DISTINCT_LIMIT, |d| d.limit),
            distinct_action: d.as_ref().map_or(AnomalyAction::Freeze, |d| d.action),
            rate_interval: r
                .as_ref()
                .and_then(|r| r.interval)
                .unwrap_or(DEFAULT_RATE_INTERVAL),
            rate_warmup: r
                .as_ref()
                .and_then(|r| r.warmup)
                .unwrap_or(DEFAULT_RATE_WARMUP),
            rate_sigmas: r
                .as_ref()
                .and_then(|r| r.sigmas)
                .unwrap_or(DEFAULT_RATE_SIGMAS),
            rate_min: r
                .as_ref()
                .and_then(|r| r.min_sessions)
                .unwrap_or(DEFAULT_RATE_MIN),
            rate_action: r.as_ref().map_or(AnomalyAction::Alert, |r| r.action),
            stable_after: e
                .as_ref()
                .and_then(|e| e.stable_after)
                .unwrap_or(DEFAULT_STABLE_AFTER),
            exe_action: e.as_ref().map_or(AnomalyAction::Alert, |e| e.action),
            denial_limit: n.as_ref().map_or(DEFAULT_DENIAL_LIMIT, |n| n.limit),
            denial_action: n.as_ref().map_or(AnomalyAction::Alert, |n| n.action),
            bypass_action: b.as_ref().map_or(AnomalyAction::Alert, |b| b.action),
        }
    }
}

fn global_rules(cfg: &Config) -> AnomalyOverrides {
    let a = &cfg.anomaly;
    AnomalyOverrides {
        distinct_secrets_per_minute: a.distinct_secrets_per_minute.clone(),
        session_rate: a.session_rate.clone(),
        new_executable: a.new_executable.clone(),
        denials_per_minute: a.denials_per_minute.clone(),
        bypass: a.bypass.clone(),
    }
}

/// What fired, with its evidence (fixed size; no allocation).
#[derive(Debug, Clone, Copy)]
pub struct Finding {
    pub workload: Option<u16>,
    pub rule: &'static str,
    pub action: AnomalyAction,
    pub count: u64,
    pub limit: u64,
    pub window: Duration,
    pub pids: [u32; EVIDENCE_PIDS],
    pub exes: [Option<[u8; 32]>; EVIDENCE_EXES],
    /// Rate rule: the learned mean per interval.
    pub baseline: f64,
    /// Bypass rule: the kernel-reported cgroup id.
    pub cgroup: u64,
}

struct WorkloadState {
    rules: Rules,
    /// Last use of each secret (index = secret).
    last_use: Box<[Option<Instant>]>,
    distinct_fired: Option<Instant>,
    pids: [u32; EVIDENCE_PIDS],
    pid_head: usize,
    exes: [Option<[u8; 32]>; EVIDENCE_EXES],
    exe_head: usize,
    // Session rate.
    bucket_start: Option<Instant>,
    bucket_count: u32,
    buckets: u32,
    mean: f64,
    var: f64,
    rate_fired: bool,
    // Executables.
    known: [[u8; 32]; KNOWN_EXES],
    known_n: usize,
    known_head: usize,
    last_new_exe: Option<Instant>,
    bypass_fired: Option<Instant>,
}

impl WorkloadState {
    fn new(rules: Rules, secrets: usize) -> WorkloadState {
        WorkloadState {
            rules,
            last_use: vec![None; secrets].into_boxed_slice(),
            distinct_fired: None,
            pids: [0; EVIDENCE_PIDS],
            pid_head: 0,
            exes: [None; EVIDENCE_EXES],
            exe_head: 0,
            bucket_start: None,
            bucket_count: 0,
            buckets: 0,
            mean: 0.0,
            var: 0.0,
            rate_fired: false,
            known: [[0; 32]; KNOWN_EXES],
            known_n: 0,
            known_head: 0,
            last_new_exe: None,
            bypass_fired: None,
        }
    }

    fn note_pid(&mut self, pid: u32) {
        if pid == 0 || self.pids.contains(&pid) {
            return;
        }
        self.pids[self.pid_head] = pid;
        self.pid_head = (self.pid_head + 1) % EVIDENCE_PIDS;
    }

    fn note_exe(&mut self, exe: Option<[u8; 32]>) {
        let Some(h) = exe else { return };
        if self.exes.contains(&Some(h)) {
            return;
        }
        self.exes[self.exe_head] = Some(h);
        self.exe_head = (self.exe_head + 1) % EVIDENCE_EXES;
    }

    fn finding(&self, w: u16, rule: &'static str, action: AnomalyAction) -> Finding {
        Finding {
            workload: Some(w),
            rule,
            action,
            count: 0,
            limit: 0,
            window: MINUTE,
            pids: self.pids,
            exes: self.exes,
            baseline: 0.0,
            cgroup: 0,
        }
    }

    /// Closes finished rate intervals into the EWMA.
    fn roll_rate(&mut self, now: Instant) {
        let iv = self.rules.rate_interval;
        let Some(mut start) = self.bucket_start else {
            self.bucket_start = Some(now);
            return;
        };
        let alpha = (2.0 / (f64::from(self.rules.rate_warmup) + 1.0)).clamp(0.02, 0.5);
        let mut closed = 0;
        while now.duration_since(start) >= iv && closed < 10_000 {
            let c = f64::from(self.bucket_count);
            if self.buckets == 0 {
                self.mean = c;
                self.var = 0.0;
            } else {
                let diff = c - self.mean;
                self.mean += alpha * diff;
                self.var = (1.0 - alpha) * (self.var + alpha * diff * diff);
            }
            self.buckets = self.buckets.saturating_add(1);
            self.bucket_count = 0;
            self.rate_fired = false;
            start += iv;
            closed += 1;
        }
        if closed == 10_000 {
            // A long idle gap: restart the interval grid at now.
            start = now;
        }
        self.bucket_start = Some(start);
    }

    /// The rate above which the current interval fires.
    fn rate_threshold(&self) -> f64 {
        let spread = self.var.sqrt().max(self.mean.sqrt()).max(1.0);
        (self.mean + f64::from(self.rules.rate_sigmas) * spread).max(f64::from(self.rules.rate_min))
    }
}

struct DenialSlot {
    key: u64,
    workload: Option<u16>,
    ring: Box<[Option<Instant>]>,
    head: usize,
    last: Option<Instant>,
    fired: Option<Instant>,
    pids: [u32; EVIDENCE_PIDS],
    pid_head: usize,
}

/// The detector's state; [`Detector::observe`] is the rule evaluation.
pub struct Detector {
    workloads: Vec<WorkloadState>,
    global: Rules,
    denials: Vec<DenialSlot>,
    unattested_bypass: Option<Instant>,
    cgroup_of: fn(u32) -> u64,
}

fn cgroup_key(pid: u32) -> u64 {
    // Keyed by cgroup; by pid (high bit set) when it cannot be read.
    warden_ebpf::cgroup_id_of_pid(pid).unwrap_or(u64::from(pid) | 1 << 63)
}

impl Detector {
    /// One state per workload (config order), `secrets` distinct secret names.
    pub fn new(cfg: &Config, secrets: usize) -> Detector {
        let global = global_rules(cfg);
        let rules: Vec<Rules> = cfg
            .workloads
            .iter()
            .map(|w| Rules::resolve(&global, cfg.anomaly.workloads.get(&w.name)))
            .collect();
        let g = Rules::resolve(&global, None);
        let ring = rules
            .iter()
            .map(|r| r.denial_limit)
            .chain([g.denial_limit])
            .max()
            .unwrap_or(1)
            .max(1) as usize;
        Detector {
            workloads: rules
                .into_iter()
                .map(|r| WorkloadState::new(r, secrets))
                .collect(),
            global: g,
            denials: (0..DENIAL_SLOTS)
                .map(|_| DenialSlot {
                    key: 0,
                    workload: None,
                    ring: vec![None; ring].into_boxed_slice(),
                    head: 0,
                    last: None,
                    fired: None,
                    pids: [0; EVIDENCE_PIDS],
                    pid_head: 0,
                })
                .collect(),
            unattested_bypass: None,
            cgroup_of: cgroup_key,
        }
    }

    /// Evaluates one signal; `Some` when a rule fires.
    pub fn observe(&mut self, now: Instant, sig: Signal) -> Option<Finding> {
        match sig {
            Signal::Session {
                workload,
                secret,
                pid,
                exe,
            } => {
                let w = workload;
                let st = self.workloads.get_mut(usize::from(w))?;
                st.note_pid(pid);
                st.note_exe(exe);
                if let Some(f) = Self::new_exe(st, w, now, exe) {
                    return Some(f);
                }
                // Distinct secrets in the last minute. The count can only
                // grow when this secret was not already in the window, so
                // the O(secrets) count runs only then.
                let mut newly_active = false;
                if let Some(slot) = secret.and_then(|s| st.last_use.get_mut(usize::from(s))) {
                    newly_active = slot.is_none_or(|t| now.duration_since(t) >= MINUTE);
                    *slot = Some(now);
                }
                let limit = u64::from(st.rules.distinct_limit);
                let cooled = st
                    .distinct_fired
                    .is_none_or(|t| now.duration_since(t) >= MINUTE);
                let distinct = if newly_active && cooled {
                    st.last_use
                        .iter()
                        .filter(|t| t.is_some_and(|t| now.duration_since(t) < MINUTE))
                        .count() as u64
                } else {
                    0
                };
                if distinct > limit {
                    st.distinct_fired = Some(now);
                    let mut f = st.finding(w, RULE_DISTINCT, st.rules.distinct_action);
                    f.count = distinct;
                    f.limit = limit;
                    return Some(f);
                }
                // Session rate.
                st.roll_rate(now);
                st.bucket_count = st.bucket_count.saturating_add(1);
                if st.buckets >= st.rules.rate_warmup && !st.rate_fired {
                    let threshold = st.rate_threshold();
                    if f64::from(st.bucket_count) > threshold {
                        st.rate_fired = true;
                        let mut f = st.finding(w, RULE_RATE, st.rules.rate_action);
                        f.count = u64::from(st.bucket_count);
                        f.limit = threshold.ceil() as u64;
                        f.window = st.rules.rate_interval;
                        f.baseline = st.mean;
                        return Some(f);
                    }
                }
                None
            }
            Signal::Issue { workload, pid, exe } => {
                let st = self.workloads.get_mut(usize::from(workload))?;
                st.note_pid(pid);
                st.note_exe(exe);
                Self::new_exe(st, workload, now, exe)
            }
            Signal::Denial {
                workload,
                pid,
                cgroup,
            } => self.denial(now, workload, pid, cgroup),
            Signal::Bypass {
                workload,
                pid,
                cgroup,
            } => {
                let (action, last) =
                    match workload.and_then(|w| self.workloads.get_mut(usize::from(w))) {
                        Some(st) => {
                            st.note_pid(pid);
                            (st.rules.bypass_action, &mut st.bypass_fired)
                        }
                        None => (self.global.bypass_action, &mut self.unattested_bypass),
                    };
                if last.is_some_and(|t| now.duration_since(t) < BYPASS_COOLDOWN) {
                    return None;
                }
                *last = Some(now);
                let mut pids = [0; EVIDENCE_PIDS];
                pids[0] = pid;
                Some(Finding {
                    workload,
                    rule: RULE_BYPASS,
                    action,
                    count: 1,
                    limit: 0,
                    window: BYPASS_COOLDOWN,
                    pids,
                    exes: [None; EVIDENCE_EXES],
                    baseline: 0.0,
                    cgroup,
                })
            }
        }
    }

    fn new_exe(
        st: &mut WorkloadState,
        w: u16,
        now: Instant,
        exe: Option<[u8; 32]>,
    ) -> Option<Finding> {
        let h = exe?;
        if st.known[..st.known_n].contains(&h) {
            return None;
        }
        let stable = st.known_n > 0
            && st
                .last_new_exe
                .is_some_and(|t| now.duration_since(t) >= st.rules.stable_after);
        st.known[st.known_head] = h;
        st.known_head = (st.known_head + 1) % KNOWN_EXES;
        st.known_n = (st.known_n + 1).min(KNOWN_EXES);
        st.last_new_exe = Some(now);
        if !stable {
            return None;
        }
        let mut f = st.finding(w, RULE_EXE, st.rules.exe_action);
        f.count = st.known_n as u64;
        f.window = st.rules.stable_after;
        f.exes = [Some(h), None, None, None];
        Some(f)
    }

    fn denial(
        &mut self,
        now: Instant,
        workload: Option<u16>,
        pid: u32,
        cgroup: u64,
    ) -> Option<Finding> {
        let rules = workload
            .and_then(|w| self.workloads.get(usize::from(w)))
            .map_or(self.global, |s| s.rules);
        let key = if cgroup != 0 {
            cgroup
        } else {
            (self.cgroup_of)(pid)
        };
        let idx = match self
            .denials
            .iter()
            .position(|s| s.last.is_some() && s.key == key)
        {
            Some(i) => i,
            None => {
                // The empty slot, else the least recently used one.
                let i = self
                    .denials
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.last)
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                let s = &mut self.denials[i];
                s.key = key;
                s.ring.iter_mut().for_each(|t| *t = None);
                s.head = 0;
                s.fired = None;
                s.pids = [0; EVIDENCE_PIDS];
                s.pid_head = 0;
                i
            }
        };
        let s = &mut self.denials[idx];
        s.last = Some(now);
        s.workload = workload.or(s.workload);
        if pid != 0 && !s.pids.contains(&pid) {
            s.pids[s.pid_head] = pid;
            s.pid_head = (s.pid_head + 1) % EVIDENCE_PIDS;
        }
        let len = s.ring.len();
        s.ring[s.head] = Some(now);
        s.head = (s.head + 1) % len;
        let limit = (rules.denial_limit as usize).clamp(1, len);
        // The limit-th most recent denial is within the window.
        let kth = s.ring[(s.head + len - limit) % len];
        let hot = kth.is_some_and(|t| now.duration_since(t) < MINUTE);
        let cooled = s.fired.is_none_or(|t| now.duration_since(t) >= MINUTE);
        if !(hot && cooled) {
            return None;
        }
        s.fired = Some(now);
        let count = s
            .ring
            .iter()
            .filter(|t| t.is_some_and(|t| now.duration_since(t) < MINUTE))
            .count() as u64;
        Some(Finding {
            workload: s.workload,
            rule: RULE_DENIALS,
            action: rules.denial_action,
            count,
            limit: limit as u64,
            window: MINUTE,
            pids: s.pids,
            exes: [None; EVIDENCE_EXES],
            baseline: 0.0,
            cgroup: 0,
        })
    }
}

/// Parses 64 hex characters into bytes (no allocation).
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The data path's handle.
pub struct Anomaly {
    tx: Option<Arc<SignalQueue>>,
    workloads: HashMap<String, u16>,
    secrets: HashMap<String, u16>,
    metrics: Metrics,
}

/// The JSON an alert carries (webhook body; `evidence` also in the audit record).
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub time: String,
    pub workload: Option<String>,
    pub rule: &'static str,
    pub action: &'static str,
    /// What warden did: `workload frozen`, `alert sent`, `logged`, ...
    pub taken: String,
    pub evidence: Evidence,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    pub count: u64,
    pub limit: u64,
    pub window_seconds: u64,
    pub pids: Vec<u32>,
    pub exes: Vec<ExeEvidence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_per_window: Option<f64>,
    /// cgroup v2 id of the process (bypass rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExeEvidence {
    pub sha256: Option<String>,
    pub path: Option<String>,
}

impl Anomaly {
    /// Starts the detector and webhook tasks (within a tokio runtime).
    pub fn start(
        cfg: &Config,
        freezer: Arc<Freezer>,
        service: Arc<Mutex<SecretService>>,
        metrics: Metrics,
    ) -> Arc<Anomaly> {
        let mut secret_names: Vec<String> = cfg
            .routes
            .iter()
            .filter_map(|r| r.secret_name().map(String::from))
            .collect();
        secret_names.sort();
        secret_names.dedup();
        let secrets: HashMap<String, u16> = secret_names
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u16))
            .collect();
        let workloads: HashMap<String, u16> = cfg
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (w.name.clone(), i as u16))
            .collect();
        let enabled = cfg.anomaly.enabled.unwrap_or(true);
        let tx = if enabled {
            let queue = Arc::new(SignalQueue::new(QUEUE));
            let (alert_tx, alert_rx) = mpsc::channel::<Alert>(ALERT_QUEUE);
            let names: Vec<String> = cfg.workloads.iter().map(|w| w.name.clone()).collect();
            let detector = Detector::new(cfg, secrets.len());
            let ctx = Handler {
                names,
                freezer,
                service: service.clone(),
                metrics: metrics.clone(),
                alerts: cfg.anomaly.webhook.as_ref().map(|_| alert_tx),
            };
            tokio::spawn(run_detector(detector, queue.clone(), ctx));
            if let Some(url) = cfg.anomaly.webhook.clone() {
                tokio::spawn(deliver(url, alert_rx, metrics.clone(), service));
            }
            Some(queue)
        } else {
            tracing::info!("anomaly.enabled = false: no anomaly rules are evaluated");
            None
        };
        Arc::new(Anomaly {
            tx,
            workloads,
            secrets,
            metrics,
        })
    }

    fn send(&self, sig: Signal) {
        if let Some(q) = &self.tx {
            if !q.push(Instant::now(), sig) {
                self.metrics.anomaly_signal_dropped();
            }
        }
    }

    fn workload(&self, name: Option<&str>) -> Option<u16> {
        name.and_then(|n| self.workloads.get(n).copied())
    }

    /// An allowed session of `workload` using `secret` (a name that is not
    /// a route's secret counts toward every rule but the distinct-secrets one).
    pub fn session(&self, workload: &str, secret: &str, pid: u32, exe_sha256: Option<&str>) {
        let Some(w) = self.workloads.get(workload) else {
            return;
        };
        self.send(Signal::Session {
            workload: *w,
            secret: self.secrets.get(secret).copied(),
            pid,
            exe: exe_sha256.and_then(parse_sha256),
        });
    }

    /// A policy refusal of `pid` (attested or not), keyed by its cgroup
    /// (read now, while the refused process still runs).
    pub fn denial(&self, workload: Option<&str>, pid: u32) {
        if self.tx.is_none() {
            return;
        }
        self.send(Signal::Denial {
            workload: self.workload(workload),
            pid,
            cgroup: warden_ebpf::cgroup_id_of_pid(pid).unwrap_or(0),
        });
    }

    /// A direct connect to a protected upstream.
    pub fn bypass(&self, workload: Option<&str>, pid: u32, cgroup: u64) {
        self.send(Signal::Bypass {
            workload: self.workload(workload),
            pid,
            cgroup,
        });
    }

    /// An SVID handed out.
    pub fn issue(&self, workload: &str, pid: u32, exe_sha256: Option<&str>) {
        let Some(w) = self.workloads.get(workload) else {
            return;
        };
        self.send(Signal::Issue {
            workload: *w,
            pid,
            exe: exe_sha256.and_then(parse_sha256),
        });
    }
}

struct Handler {
    names: Vec<String>,
    freezer: Arc<Freezer>,
    service: Arc<Mutex<SecretService>>,
    metrics: Metrics,
    alerts: Option<mpsc::Sender<Alert>>,
}

/// The data path's signals, drained by the detector in batches: a push
/// never wakes another thread while the detector is active (it drains every
/// [`DRAIN_EVERY`]); only the first signal after an idle spell does. Under
/// load that is one wake-up per batch instead of one per session.
pub struct SignalQueue {
    items: std::sync::Mutex<Vec<(Instant, Signal)>>,
    cap: usize,
    /// The detector waits for [`Self::wake`] (idle, not draining).
    sleeping: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

/// How often an active detector drains the queue (the longest a signal
/// waits before it is evaluated).
const DRAIN_EVERY: Duration = Duration::from_millis(2);
/// Empty drains before the detector sleeps until the next signal.
const IDLE_DRAINS: u32 = 50;

impl SignalQueue {
    fn new(cap: usize) -> SignalQueue {
        SignalQueue {
            items: std::sync::Mutex::new(Vec::with_capacity(1024)),
            cap,
            sleeping: std::sync::atomic::AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Queues a signal; false when the queue is full (dropped).
    fn push(&self, at: Instant, sig: Signal) -> bool {
        {
            let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            if items.len() >= self.cap {
                return false;
            }
            items.push((at, sig));
        }
        if self
            .sleeping
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.wake.notify_one();
        }
        true
    }

    fn drain(&self, into: &mut Vec<(Instant, Signal)>) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *items, into);
    }
}

async fn run_detector(mut detector: Detector, queue: Arc<SignalQueue>, h: Handler) {
    let h = Arc::new(h);
    let mut batch = Vec::with_capacity(1024);
    let mut idle = 0u32;
    loop {
        queue.drain(&mut batch);
        if batch.is_empty() {
            idle += 1;
            if idle >= IDLE_DRAINS {
                // Announce the sleep before the last look, so a signal
                // pushed after it either is seen here or wakes us.
                queue
                    .sleeping
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                queue.drain(&mut batch);
                if batch.is_empty() {
                    queue.wake.notified().await;
                    idle = 0;
                    continue;
                }
                queue
                    .sleeping
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if !batch.is_empty() {
            idle = 0;
        }
        for (at, sig) in batch.drain(..) {
            if let Some(f) = detector.observe(at, sig) {
                let h = h.clone();
                // Freezing and auditing block; the detector keeps reading.
                tokio::task::spawn_blocking(move || h.act(f, at));
            }
        }
        tokio::time::sleep(DRAIN_EVERY).await;
    }
}

impl Handler {
    fn act(&self, f: Finding, at: Instant) {
        let workload = f
            .workload
            .and_then(|w| self.names.get(usize::from(w)).cloned());
        let pids: Vec<u32> = f.pids.iter().copied().filter(|p| *p != 0).collect();
        let what = match f.rule {
            RULE_DISTINCT => "distinct secrets",
            RULE_RATE => "sessions",
            RULE_EXE => "executables (one new after a stable period)",
            RULE_DENIALS => "policy denials",
            _ => "direct connection(s) to a protected upstream",
        };
        let reason = format!(
            "{} {what} within {} (limit {})",
            f.count,
            crate::config::format_duration(f.window),
            f.limit
        );
        let mut taken = match f.action {
            AnomalyAction::Log => "logged".to_string(),
            AnomalyAction::Alert => "alerted".to_string(),
            AnomalyAction::Freeze => "alerted".to_string(),
        };
        if f.action == AnomalyAction::Freeze {
            match &workload {
                Some(w) if self.freezer.is_frozen(w) => taken = "already frozen".into(),
                Some(w) => {
                    match self.freezer.freeze_at(
                        crate::authority::daemon_actor(),
                        format!("anomaly rule {}", f.rule),
                        w,
                        &reason,
                        None,
                        &pids,
                        Some(at),
                    ) {
                        Ok(e) => {
                            taken = format!("workload frozen ({} kernel target(s))", e.kernel.len())
                        }
                        Err(e) => taken = format!("freeze failed: {}", e.message),
                    }
                }
                None => taken = "not frozen: the process attests to no workload".into(),
            }
        }
        self.metrics.anomaly_detection(f.rule, f.action.as_str());
        let alert = Alert {
            time: crate::timefmt::now_rfc3339(),
            workload: workload.clone(),
            rule: f.rule,
            action: f.action.as_str(),
            taken: taken.clone(),
            evidence: Evidence {
                count: f.count,
                limit: f.limit,
                window_seconds: f.window.as_secs(),
                exes: evidence_exes(&f, &pids),
                pids,
                baseline_per_window: (f.rule == RULE_RATE).then_some(f.baseline),
                cgroup_id: (f.cgroup != 0).then_some(f.cgroup),
            },
        };
        tracing::warn!(
            rule = f.rule,
            action = f.action.as_str(),
            workload = workload.as_deref().unwrap_or("-"),
            "anomaly: {reason}; {taken}"
        );
        let evidence = serde_json::to_string(&alert.evidence).unwrap_or_default();
        if let Ok(mut s) = self.service.lock() {
            let _ = s.record(&Event {
                actor: crate::authority::daemon_actor(),
                action: "anomaly.detect".into(),
                target: Target {
                    detail: Some(format!(
                        "rule {} workload {} evidence {evidence}",
                        f.rule,
                        workload.as_deref().unwrap_or("-")
                    )),
                    ..Target::default()
                },
                decision: if f.action == AnomalyAction::Freeze {
                    Decision::Deny
                } else {
                    Decision::Allow
                },
                reason: format!("{reason}; {taken}"),
            });
        }
        if f.action != AnomalyAction::Log {
            if let Some(tx) = &self.alerts {
                if tx.try_send(alert).is_err() {
                    self.metrics.anomaly_alert("dropped");
                    tracing::error!("anomaly alert queue full: alert dropped (see the audit log)");
                }
            }
        }
    }
}

fn evidence_exes(f: &Finding, pids: &[u32]) -> Vec<ExeEvidence> {
    let mut out: Vec<ExeEvidence> = f
        .exes
        .iter()
        .flatten()
        .map(|h| ExeEvidence {
            sha256: Some(hex::encode(h)),
            path: None,
        })
        .collect();
    for pid in pids {
        if let Ok(p) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            let p = p.display().to_string();
            if !out.iter().any(|e| e.path.as_deref() == Some(&p)) {
                out.push(ExeEvidence {
                    sha256: None,
                    path: Some(p),
                });
            }
        }
    }
    out
}

/// POSTs alerts to the webhook, retrying with exponential backoff (1 s, 2 s,
/// … up to 60 s; 8 attempts) without holding up later detections' freezes.
async fn deliver(
    url: String,
    mut rx: mpsc::Receiver<Alert>,
    metrics: Metrics,
    service: Arc<Mutex<SecretService>>,
) {
    while let Some(alert) = rx.recv().await {
        let body = match serde_json::to_vec(&alert) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let mut wait = Duration::from_secs(1);
        let mut delivered = false;
        let mut last_err = String::new();
        for attempt in 1..=8 {
            let sent = crate::webhook::post(
                &url,
                "application/json",
                &[],
                &body,
                Duration::from_secs(10),
            )
            .await;
            match sent {
                Ok(status) if (200..300).contains(&status) => {
                    delivered = true;
                    break;
                }
                Ok(status) => last_err = format!("HTTP {status}"),
                Err(e) => last_err = e.to_string(),
            }
            metrics.anomaly_alert("retried");
            tracing::warn!(
                attempt,
                "anomaly webhook {url}: {last_err}; retrying in {wait:?}"
            );
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MINUTE);
        }
        metrics.anomaly_alert(if delivered { "delivered" } else { "failed" });
        let (action, decision, reason) = if delivered {
            (
                "anomaly.alert",
                Decision::Allow,
                format!("delivered to {url}"),
            )
        } else {
            (
                "anomaly.alert",
                Decision::Error,
                format!("not delivered to {url}: {last_err}"),
            )
        };
        let detail = format!(
            "rule {} workload {}",
            alert.rule,
            alert.workload.as_deref().unwrap_or("-")
        );
        let svc = service.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut s) = svc.lock() {
                let _ = s.record(&Event {
                    actor: crate::authority::daemon_actor(),
                    action: action.into(),
                    target: Target {
                        detail: Some(detail),
                        ..Target::default()
                    },
                    decision,
                    reason,
                });
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            r#"
[[workload]]
name = "a"
spiffe_id = "spiffe://warden.local/a"
selectors = {{ uid = 1 }}
[[workload]]
name = "b"
spiffe_id = "spiffe://warden.local/b"
selectors = {{ uid = 2 }}
{extra}
"#
        );
        crate::config::parse_str(&text, std::path::Path::new("test.toml")).expect("config")
    }

    fn session(w: u16, s: u16) -> Signal {
        Signal::Session {
            workload: w,
            secret: Some(s),
            pid: 100 + u32::from(s),
            exe: None,
        }
    }

    #[test]
    fn distinct_secrets_fire_above_the_limit_per_workload() {
        let c = cfg("[anomaly.workloads.a]\ndistinct_secrets_per_minute = { limit = 3, action = \"freeze\" }\n");
        let mut d = Detector::new(&c, 10);
        let t = Instant::now();
        for s in 0..3 {
            assert!(d.observe(t, session(0, s)).is_none());
            assert!(d.observe(t, session(1, s)).is_none());
        }
        // Same secret again: still 3 distinct.
        assert!(d.observe(t, session(0, 2)).is_none());
        let f = d.observe(t, session(0, 3)).expect("fires at 4 > 3");
        assert_eq!(
            (f.rule, f.action, f.count, f.limit),
            (RULE_DISTINCT, AnomalyAction::Freeze, 4, 3)
        );
        assert!(f.pids.contains(&103));
        // Workload b keeps the default of 100.
        assert!(d.observe(t, session(1, 3)).is_none());
        // A minute later the window has emptied.
        let later = t + Duration::from_secs(61);
        assert!(d.observe(later, session(0, 5)).is_none());
    }

    #[test]
    fn session_rate_is_silent_in_warmup_and_on_steady_load() {
        let c = cfg("[anomaly]\nsession_rate = { interval = \"1s\", warmup = 5, sigmas = 4, min_sessions = 5 }\n");
        let mut d = Detector::new(&c, 1);
        let t0 = Instant::now();
        // A burst during warm-up: nothing.
        for i in 0..50 {
            assert!(d
                .observe(t0 + Duration::from_millis(i), session(0, 0))
                .is_none());
        }
        // Steady 10/s with jitter for 60 s: nothing.
        for sec in 1..60u64 {
            let n = 9 + (sec % 3);
            for i in 0..n {
                let at = t0 + Duration::from_secs(sec) + Duration::from_millis(i * 90);
                assert!(d.observe(at, session(0, 0)).is_none(), "second {sec}");
            }
        }
        // Then 100 in one second fires once.
        let t = t0 + Duration::from_secs(61);
        let fired: Vec<Finding> = (0..100)
            .filter_map(|i| d.observe(t + Duration::from_millis(i), session(0, 0)))
            .collect();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rule, RULE_RATE);
        assert!(
            fired[0].baseline > 5.0 && fired[0].baseline < 12.0,
            "{fired:?}"
        );
    }

    #[test]
    fn new_executable_fires_only_once_the_identity_was_stable() {
        let c = cfg("[anomaly]\nnew_executable = { stable_after = \"1m\", action = \"alert\" }\n");
        let mut d = Detector::new(&c, 1);
        let t = Instant::now();
        let ex = |n: u8, at: Instant, d: &mut Detector| {
            d.observe(
                at,
                Signal::Issue {
                    workload: 0,
                    pid: 7,
                    exe: Some([n; 32]),
                },
            )
        };
        assert!(ex(1, t, &mut d).is_none());
        assert!(
            ex(2, t + Duration::from_secs(10), &mut d).is_none(),
            "still learning"
        );
        assert!(
            ex(1, t + Duration::from_secs(200), &mut d).is_none(),
            "known"
        );
        let f = ex(3, t + Duration::from_secs(200), &mut d).expect("new exe after stability");
        assert_eq!(f.rule, RULE_EXE);
        assert_eq!(f.exes[0], Some([3; 32]));
    }

    #[test]
    fn denials_fire_per_process_and_bypass_always() {
        let c = cfg("[anomaly]\ndenials_per_minute = { limit = 3, action = \"log\" }\n");
        let mut d = Detector::new(&c, 1);
        d.cgroup_of = |pid| u64::from(pid);
        let t = Instant::now();
        assert!(d
            .observe(
                t,
                Signal::Denial {
                    workload: None,
                    pid: 5,
                    cgroup: 0,
                }
            )
            .is_none());
        assert!(d
            .observe(
                t,
                Signal::Denial {
                    workload: None,
                    pid: 6,
                    cgroup: 0,
                }
            )
            .is_none());
        assert!(d
            .observe(
                t,
                Signal::Denial {
                    workload: None,
                    pid: 5,
                    cgroup: 0,
                }
            )
            .is_none());
        let f = d
            .observe(
                t,
                Signal::Denial {
                    workload: None,
                    pid: 5,
                    cgroup: 0,
                },
            )
            .expect("third denial of pid 5");
        assert_eq!(
            (f.rule, f.count, f.action),
            (RULE_DENIALS, 3, AnomalyAction::Log)
        );
        let b = d
            .observe(
                t,
                Signal::Bypass {
                    workload: Some(1),
                    pid: 9,
                    cgroup: 1,
                },
            )
            .expect("bypass");
        assert_eq!(b.rule, RULE_BYPASS);
        assert!(
            d.observe(
                t,
                Signal::Bypass {
                    workload: Some(1),
                    pid: 9,
                    cgroup: 1
                }
            )
            .is_none(),
            "cooldown"
        );
    }

    #[test]
    fn sha256_hex_parses() {
        let h = "00ff".repeat(16);
        assert_eq!(parse_sha256(&h).expect("hex")[1], 0xff);
        assert!(parse_sha256("zz").is_none());
    }

    /// `cargo xtask bench`: detector cost per event beside same-run baselines.
    #[test]
    #[ignore = "benchmark: run by `cargo xtask bench`"]
    fn bench_detector_cost_per_event() {
        use std::hint::black_box;
        const WORKLOADS: usize = 50;
        const SECRETS: u16 = 100;
        const EVENTS: usize = 2_000_000;
        let mut text = String::from(
            "[anomaly]\nsession_rate = { interval = \"1s\", warmup = 2 }\ndenials_per_minute = { limit = 50 }\n",
        );
        for i in 0..WORKLOADS {
            text.push_str(&format!(
                "[[workload]]\nname = \"w{i}\"\nspiffe_id = \"spiffe://warden.local/w{i}\"\nselectors = {{ uid = {} }}\n",
                1000 + i
            ));
        }
        let c =
            crate::config::parse_str(&text, std::path::Path::new("bench.toml")).expect("config");
        let mut d = Detector::new(&c, usize::from(SECRETS));
        d.cgroup_of = |pid| u64::from(pid % 97);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let signals: Vec<Signal> = (0..EVENTS)
            .map(|_| {
                let r = next();
                let w = (r % WORKLOADS as u64) as u16;
                match (r >> 8) % 100 {
                    0..=89 => Signal::Session {
                        workload: w,
                        secret: Some(((r >> 16) % u64::from(SECRETS)) as u16),
                        pid: (r >> 32) as u32 % 5000,
                        exe: Some([((r >> 40) % 3) as u8; 32]),
                    },
                    90..=95 => Signal::Issue {
                        workload: w,
                        pid: 7,
                        exe: Some([1; 32]),
                    },
                    96..=98 => Signal::Denial {
                        workload: Some(w),
                        pid: (r >> 32) as u32 % 300,
                        cgroup: 0,
                    },
                    _ => Signal::Bypass {
                        workload: None,
                        pid: 9,
                        cgroup: 1,
                    },
                }
            })
            .collect();
        let names: Vec<String> = (0..WORKLOADS).map(|i| format!("w{i}")).collect();
        let index: HashMap<String, u16> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u16))
            .collect();
        let t0 = Instant::now();
        let mut fired = 0usize;
        let mut best = [f64::MAX; 3];
        for _round in 0..3 {
            // Detector.
            let start = Instant::now();
            for (i, sig) in signals.iter().enumerate() {
                let now = t0 + Duration::from_micros(i as u64 * 5);
                if d.observe(now, *sig).is_some() {
                    fired += 1;
                }
            }
            best[0] = best[0].min(start.elapsed().as_nanos() as f64 / EVENTS as f64);
            // Baseline: the workload-name lookup the data path does anyway.
            let start = Instant::now();
            for i in 0..EVENTS {
                black_box(index.get(black_box(names[i % WORKLOADS].as_str())));
            }
            best[1] = best[1].min(start.elapsed().as_nanos() as f64 / EVENTS as f64);
            // The data path's enqueue: a push + (consumer) batch drain.
            let queue = SignalQueue::new(QUEUE);
            let mut batch = Vec::with_capacity(QUEUE);
            let start = Instant::now();
            for chunk in signals.chunks(QUEUE) {
                for sig in chunk {
                    let _ = queue.push(Instant::now(), *sig);
                }
                queue.drain(&mut batch);
                batch.clear();
            }
            best[2] = best[2].min(start.elapsed().as_nanos() as f64 / EVENTS as f64);
        }
        println!(
            "anomaly detector: {:.0} ns/event (Detector::observe, {WORKLOADS} workloads x {SECRETS} secrets, best of 3 x {EVENTS} events; {fired} findings)",
            best[0]
        );
        println!(
            "  baseline HashMap<String,_> name lookup: {:.0} ns  (ratio {:.2}x)",
            best[1],
            best[0] / best[1]
        );
        println!(
            "  data-path enqueue (Instant::now + queue push, drained): {:.0} ns  (ratio {:.2}x of the lookup)",
            best[2],
            best[2] / best[1]
        );
    }
}
