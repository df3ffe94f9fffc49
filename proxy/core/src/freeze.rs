//! Frozen workloads: `warden freeze|unfreeze|frozen` and the anomaly
//! detector's `action = "freeze"`.
//!
//! A freeze acts on the workload at every layer warden controls:
//! - the kernel: the cgroup of each live process that attests to the workload
//!   goes into the eBPF monitor's frozen-cgroup map (its tgid when it lives in
//!   the root cgroup or in warden's own cgroup), so every `connect()` from it
//!   gets EPERM; a 1 s reconcile loop adds processes that appear later and
//!   drops tgids that exited;
//! - sessions: new PostgreSQL sessions of the workload are refused (28000,
//!   naming the workload and the reason) and open ones are closed (57P01);
//! - identity: no new SVIDs (PermissionDenied) and open Workload API streams
//!   end.
//!
//! The state lives in the store's meta table (`frozen_workloads`, JSON; no
//! secret material) with the kernel targets it applied, so it survives a
//! restart (re-applied at start) and an unfreeze after a restart removes what
//! the previous run put into the pinned maps. Every freeze, unfreeze and
//! expiry is audited with its actor.
//!
//! On a store shared by a fleet the frozen set applies on every node: the
//! shared key holds the entries without kernel targets (cgroup ids and tgids
//! mean nothing on another host), each node keeps its own targets under
//! `frozen_workloads@<node>`, a freeze or unfreeze changes the shared set
//! with a read-modify-write other nodes wait for, and
//! [`Freezer::sync_from_store`] (called by [`crate::propagation`] when the
//! shared key changed) applies another node's freezes and unfreezes here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use warden_ebpf::Monitor;
use warden_identity::attest::{self, ExeHashCache, Registration};

use crate::audit::{Actor, Decision, Event, Target};
use crate::authority::IdentityHandle;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::service::SecretService;

/// Meta table key of the frozen set.
pub const META_KEY: &str = "frozen_workloads";

/// What a freeze put into the kernel maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelTarget {
    Cgroup { id: u64 },
    Tgid { tgid: u32 },
}

/// One frozen workload (`warden frozen --json` prints these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeEntry {
    pub workload: String,
    pub reason: String,
    /// Who froze it: `admin uid 0 (root)`, or `anomaly rule NAME`.
    pub by: String,
    /// RFC 3339.
    pub since: String,
    pub since_unix: u64,
    /// Seconds since the epoch when it thaws by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_unix: Option<u64>,
    /// What is in the kernel maps for it (empty without the eBPF monitor).
    #[serde(default)]
    pub kernel: Vec<KernelTarget>,
    /// cgroups whose processes are suspended (`cgroup.freeze`, with
    /// `anomaly.suspend = true`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspended: Vec<String>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn format_unix(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .map(crate::timefmt::format_rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// The meta key of `node`'s own kernel targets (fleet store).
fn local_key(node: &str) -> String {
    format!("{META_KEY}@{node}")
}

fn parse(key: &str, json: Option<String>) -> Result<BTreeMap<String, FreezeEntry>> {
    match json {
        None => Ok(BTreeMap::new()),
        Some(j) => {
            let list: Vec<FreezeEntry> = serde_json::from_str(&j).map_err(|e| {
                Error::integrity(format!("store meta {key:?} is not valid JSON: {e}"))
            })?;
            Ok(list.into_iter().map(|e| (e.workload.clone(), e)).collect())
        }
    }
}

fn encode<'a>(entries: impl Iterator<Item = &'a FreezeEntry>) -> Result<String> {
    let list: Vec<&FreezeEntry> = entries.collect();
    serde_json::to_string(&list).map_err(|e| Error::internal(format!("encoding frozen set: {e}")))
}

/// Reads the persisted frozen set (on a fleet store: the shared entries with
/// this node's kernel targets).
pub fn load(s: &SecretService) -> Result<BTreeMap<String, FreezeEntry>> {
    let mut set = parse(META_KEY, s.meta_get(META_KEY)?)?;
    if let Some(node) = s.fleet_node() {
        let key = local_key(&node);
        let local = parse(&key, s.meta_get(&key)?)?;
        for e in set.values_mut() {
            let own = local.get(&e.workload);
            e.kernel = own.map(|l| l.kernel.clone()).unwrap_or_default();
            e.suspended = own.map(|l| l.suspended.clone()).unwrap_or_default();
        }
    }
    Ok(set)
}

/// Persists this node's view of the set: the whole set on a store of its
/// own, only this node's kernel targets on a fleet store (the shared
/// entries change through [`save_change`] alone).
fn save(s: &mut SecretService, set: &BTreeMap<String, FreezeEntry>) -> Result<()> {
    let j = encode(set.values())?;
    match s.fleet_node() {
        None => s.meta_set(META_KEY, &j),
        Some(node) => s.meta_set(&local_key(&node), &j),
    }
}

/// Persists a freeze or unfreeze of `workload` (`set` is the set after it).
/// On a fleet store the shared set is read, changed for `workload` only and
/// written back in one transaction, so concurrent changes on other nodes
/// are kept.
fn save_change(
    s: &mut SecretService,
    set: &BTreeMap<String, FreezeEntry>,
    workload: &str,
) -> Result<()> {
    if s.fleet_node().is_some() {
        let mut update = |current: Option<String>| -> Result<String> {
            let mut shared = parse(META_KEY, current)?;
            match set.get(workload) {
                Some(e) => {
                    let mut e = e.clone();
                    e.kernel.clear();
                    e.suspended.clear();
                    shared.insert(workload.to_string(), e);
                }
                None => {
                    shared.remove(workload);
                }
            }
            encode(shared.values())
        };
        s.meta_update(META_KEY, &mut update)?;
    }
    save(s, set)
}

fn audit(s: &mut SecretService, actor: Actor, action: &str, e: &FreezeEntry, reason: String) {
    let detail = match e.until_unix {
        Some(u) => format!("workload {} until {}", e.workload, format_unix(u)),
        None => format!("workload {}", e.workload),
    };
    let r = s.record(&Event {
        actor,
        action: action.into(),
        target: Target {
            detail: Some(detail),
            ..Target::default()
        },
        decision: Decision::Deny,
        reason,
    });
    if let Err(e) = r {
        tracing::error!("audit record for {action} failed: {}", e.message);
    }
}

/// Freezes `workload` in the store only (the CLI without a running daemon;
/// the daemon applies it to the kernel when it starts).
pub fn freeze_offline(
    s: &mut SecretService,
    known: &[String],
    actor: Actor,
    by: String,
    workload: &str,
    reason: &str,
    for_: Option<Duration>,
) -> Result<FreezeEntry> {
    check_request(known, workload, reason)?;
    let mut set = load(s)?;
    let entry = new_entry(workload, reason, by, for_);
    set.insert(workload.to_string(), entry.clone());
    save_change(s, &set, workload)?;
    audit(s, actor, "workload.freeze", &entry, reason.to_string());
    Ok(entry)
}

/// Unfreezes in the store only (no daemon: nothing is in the kernel maps
/// after a clean stop).
pub fn unfreeze_offline(
    s: &mut SecretService,
    actor: Actor,
    workload: &str,
) -> Result<FreezeEntry> {
    let mut set = load(s)?;
    let entry = set.remove(workload).ok_or_else(|| not_frozen(workload))?;
    save_change(s, &set, workload)?;
    audit(
        s,
        actor,
        "workload.unfreeze",
        &entry,
        "unfrozen by an admin".into(),
    );
    Ok(entry)
}

fn not_frozen(workload: &str) -> Error {
    Error::not_found(format!(
        "workload {workload:?} is not frozen (see `warden frozen`)"
    ))
}

fn check_request(known: &[String], workload: &str, reason: &str) -> Result<()> {
    if !known.iter().any(|w| w == workload) {
        return Err(Error::not_found(format!(
            "no workload {workload:?} in the configuration (known: {})",
            known.join(", ")
        )));
    }
    if reason.trim().is_empty() {
        return Err(Error::usage(
            "a freeze needs a reason: pass --reason \"why\" (it is shown to the frozen workload's clients and in the audit log)",
        ));
    }
    if reason.len() > 500 {
        return Err(Error::usage("--reason is longer than 500 characters"));
    }
    Ok(())
}

fn new_entry(workload: &str, reason: &str, by: String, for_: Option<Duration>) -> FreezeEntry {
    let now = now_unix();
    FreezeEntry {
        workload: workload.to_string(),
        reason: reason.to_string(),
        by,
        since: format_unix(now),
        since_unix: now,
        until_unix: for_.map(|d| now + d.as_secs().max(1)),
        kernel: Vec::new(),
        suspended: Vec::new(),
    }
}

/// The daemon's frozen set, applied to kernel, sessions and identity.
pub struct Freezer {
    service: Arc<Mutex<SecretService>>,
    identity: Arc<IdentityHandle>,
    monitor: Option<Arc<Monitor>>,
    registrations: Vec<Registration>,
    hashes: Arc<ExeHashCache>,
    metrics: Metrics,
    state: Mutex<BTreeMap<String, FreezeEntry>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// cgroup v2 path of warden itself: never frozen (nor its ancestors).
    own_cgroup: Option<String>,
    /// `anomaly.suspend`: also stop the processes (`cgroup.freeze`).
    suspend: bool,
    /// Held by a freeze, an unfreeze and [`Freezer::sync_from_store`] from
    /// start to end, so a sync never sees a local change half-persisted.
    turn: Mutex<()>,
}

/// cgroup v2 path of a process (`0::` line).
fn cgroup_path_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

fn is_ancestor_or_self(ancestor: &str, of: &str) -> bool {
    ancestor == "/"
        || of == ancestor
        || (of.starts_with(ancestor) && of.as_bytes().get(ancestor.len()) == Some(&b'/'))
}

impl Freezer {
    /// Loads the persisted set; call [`Freezer::reapply`] once running.
    pub fn new(
        cfg: &crate::config::Config,
        service: Arc<Mutex<SecretService>>,
        identity: Arc<IdentityHandle>,
        monitor: Option<Arc<Monitor>>,
        metrics: Metrics,
        hashes: Arc<ExeHashCache>,
    ) -> Result<Freezer> {
        let set = {
            let s = service
                .lock()
                .map_err(|_| Error::internal("service state poisoned"))?;
            load(&s)?
        };
        metrics.set_frozen_workloads(set.len());
        Ok(Freezer {
            service,
            identity,
            monitor,
            registrations: cfg.workloads.iter().map(|w| w.registration()).collect(),
            hashes,
            metrics,
            state: Mutex::new(set),
            changed: tokio::sync::watch::channel(0).0,
            own_cgroup: cgroup_path_of(std::process::id()),
            suspend: cfg.anomaly.suspend.unwrap_or(false),
            turn: Mutex::new(()),
        })
    }

    fn known(&self) -> Vec<String> {
        self.registrations.iter().map(|r| r.name.clone()).collect()
    }

    /// The freeze of `workload`, if any (cheap: one lock, one lookup).
    pub fn frozen(&self, workload: &str) -> Option<FreezeEntry> {
        self.state.lock().ok()?.get(workload).cloned()
    }

    /// True when `workload` is frozen.
    pub fn is_frozen(&self, workload: &str) -> bool {
        self.state
            .lock()
            .map(|s| s.contains_key(workload))
            .unwrap_or(false)
    }

    /// Every frozen workload.
    pub fn list(&self) -> Vec<FreezeEntry> {
        self.state
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Changes whenever the frozen set does (sessions and streams watch it).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves with `workload`'s freeze when it is (or becomes) frozen;
    /// `changes` comes from [`subscribe`](Self::subscribe), taken before the
    /// session started so no freeze in between is missed.
    pub async fn until_frozen(
        &self,
        workload: &str,
        changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> FreezeEntry {
        loop {
            if let Some(f) = self.frozen(workload) {
                return f;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn announce(&self) {
        let n = self.state.lock().map(|s| s.len()).unwrap_or(0);
        self.metrics.set_frozen_workloads(n);
        self.changed.send_modify(|g| *g += 1);
        // Workload API streams re-ask the provider, which now refuses.
        self.identity.notify();
    }

    /// The kernel target for one process, or None for warden itself.
    fn target_of(&self, pid: u32) -> Option<(KernelTarget, Option<String>)> {
        if pid == std::process::id() || pid == 0 {
            return None;
        }
        let path = cgroup_path_of(pid)?;
        let shares_warden = self
            .own_cgroup
            .as_deref()
            .is_some_and(|own| is_ancestor_or_self(&path, own));
        if path == "/" || shares_warden {
            return Some((KernelTarget::Tgid { tgid: pid }, None));
        }
        match warden_ebpf::cgroup_id_of_pid(pid) {
            Ok(id) => Some((KernelTarget::Cgroup { id }, Some(path))),
            Err(_) => Some((KernelTarget::Tgid { tgid: pid }, None)),
        }
    }

    /// Writes `cgroup.freeze` of a cgroup v2 path (`anomaly.suspend`).
    fn set_suspended(path: &str, on: bool) {
        let Some(mount) = warden_ebpf::cgroup2_mount() else {
            return;
        };
        let file = mount
            .join(path.trim_start_matches('/'))
            .join("cgroup.freeze");
        match std::fs::write(&file, if on { "1" } else { "0" }) {
            Ok(()) => tracing::info!(
                cgroup = path,
                "{} through the cgroup freezer",
                if on {
                    "processes suspended"
                } else {
                    "processes resumed"
                }
            ),
            Err(e) => tracing::error!("cannot write {}: {e}", file.display()),
        }
    }

    fn kernel_apply(&self, t: KernelTarget) -> bool {
        let Some(m) = &self.monitor else { return false };
        let r = match t {
            KernelTarget::Cgroup { id } => m.freeze_cgroup(id),
            KernelTarget::Tgid { tgid } => m.freeze_tgid(tgid),
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("freeze: kernel map update for {t:?} failed: {e}");
                false
            }
        }
    }

    fn kernel_remove(&self, t: KernelTarget) {
        let Some(m) = &self.monitor else { return };
        let r = match t {
            KernelTarget::Cgroup { id } => m.unfreeze_cgroup(id),
            KernelTarget::Tgid { tgid } => m.unfreeze_tgid(tgid),
        };
        if let Err(e) = r {
            tracing::error!("unfreeze: kernel map update for {t:?} failed: {e}");
        }
    }

    fn attests_to(&self, pid: u32, workload: &str) -> bool {
        attest::gather_facts(pid, &self.hashes)
            .ok()
            .and_then(|f| {
                attest::attest(&f, &self.registrations)
                    .ok()
                    .map(|r| r.name == workload)
            })
            .unwrap_or(false)
    }

    /// Processes attesting to `workload` now (a /proc scan).
    fn scan(&self, workloads: &[String]) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        let me = std::process::id();
        for d in dir.flatten() {
            let Some(pid) = d.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(facts) = attest::gather_facts(pid, &self.hashes) else {
                continue;
            };
            if let Ok(reg) = attest::attest(&facts, &self.registrations) {
                if workloads.contains(&reg.name) {
                    out.push((reg.name.clone(), pid));
                }
            }
        }
        out
    }

    /// A workload selected by cgroup: that cgroup (frozen even while no
    /// process runs in it, so its next process cannot connect either).
    fn selector_cgroup(&self, workload: &str) -> Option<(KernelTarget, Option<String>)> {
        let path = self
            .registrations
            .iter()
            .find(|r| r.name == workload)?
            .selectors
            .cgroup
            .clone()?;
        let own = self.own_cgroup.as_deref().unwrap_or("");
        if path == "/" || is_ancestor_or_self(&path, own) {
            return None;
        }
        let full = warden_ebpf::cgroup2_mount()?.join(path.trim_start_matches('/'));
        warden_ebpf::cgroup_id_of_path(&full)
            .ok()
            .map(|id| (KernelTarget::Cgroup { id }, Some(path)))
    }

    /// Adds kernel targets for `pids` (known processes of `workload`) to
    /// its entry; returns how many were new.
    fn add_targets(&self, workload: &str, pids: &[u32], verify: bool) -> usize {
        let mut new: Vec<(KernelTarget, Option<String>)> =
            self.selector_cgroup(workload).into_iter().collect();
        for &pid in pids {
            // Evidence pids may have exited and been reused: only a process
            // that attests to the workload now is frozen.
            if verify && !self.attests_to(pid, workload) {
                continue;
            }
            if let Some(t) = self.target_of(pid) {
                if !new.iter().any(|(x, _)| *x == t.0) {
                    new.push(t);
                }
            }
        }
        let fresh: Vec<(KernelTarget, Option<String>)> = {
            let Ok(mut st) = self.state.lock() else {
                return 0;
            };
            let Some(e) = st.get_mut(workload) else {
                return 0;
            };
            let fresh: Vec<(KernelTarget, Option<String>)> = new
                .into_iter()
                .filter(|(t, _)| !e.kernel.contains(t))
                .collect();
            e.kernel.extend(fresh.iter().map(|(t, _)| *t));
            if self.suspend {
                for p in fresh.iter().filter_map(|(_, p)| p.clone()) {
                    if !e.suspended.contains(&p) {
                        e.suspended.push(p);
                    }
                }
            }
            fresh
        };
        for (t, path) in &fresh {
            self.kernel_apply(*t);
            if let (true, Some(p)) = (self.suspend, path) {
                Self::set_suspended(p, true);
            }
        }
        fresh.len()
    }

    /// Persists this node's view (`changed`: a workload frozen or thawed
    /// here, which the shared set on a fleet store must hear of).
    fn persist_with(&self, changed: Option<&str>) {
        // The state lock is held across the write so concurrent persists
        // land in order (lock order: state, then service; nothing takes
        // them the other way round).
        let Ok(snapshot) = self.state.lock() else {
            return;
        };
        match self.service.lock() {
            Ok(mut s) => {
                let saved = match changed {
                    Some(w) => save_change(&mut s, &snapshot, w),
                    None => save(&mut s, &snapshot),
                };
                if let Err(e) = saved {
                    tracing::error!("cannot persist the frozen set: {}", e.message);
                }
            }
            Err(_) => tracing::error!("cannot persist the frozen set: service state poisoned"),
        }
    }

    fn persist(&self) {
        self.persist_with(None)
    }

    /// Freezes `workload`. `pids` are processes known to belong to it (the
    /// detector's evidence): they are denied in the kernel first, before the
    /// /proc scan, the store write and the audit record. Blocking.
    pub fn freeze(
        &self,
        actor: Actor,
        by: String,
        workload: &str,
        reason: &str,
        for_: Option<Duration>,
        pids: &[u32],
    ) -> Result<FreezeEntry> {
        self.freeze_at(actor, by, workload, reason, for_, pids, None)
    }

    /// [`Freezer::freeze`] for a detection at `event`: logs how long after
    /// the triggering event the kernel deny was in place.
    #[allow(clippy::too_many_arguments)]
    pub fn freeze_at(
        &self,
        actor: Actor,
        by: String,
        workload: &str,
        reason: &str,
        for_: Option<Duration>,
        pids: &[u32],
        event: Option<std::time::Instant>,
    ) -> Result<FreezeEntry> {
        check_request(&self.known(), workload, reason)?;
        let _turn = self
            .turn
            .lock()
            .map_err(|_| Error::internal("frozen state poisoned"))?;
        {
            let mut st = self
                .state
                .lock()
                .map_err(|_| Error::internal("frozen state poisoned"))?;
            if let Some(e) = st.get(workload) {
                return Err(Error::usage(format!(
                    "workload {workload:?} is already frozen since {} by {}: {}; run `warden unfreeze {workload}` first to change the freeze",
                    e.since, e.by, e.reason
                )));
            }
            st.insert(workload.to_string(), new_entry(workload, reason, by, for_));
        }
        let hinted = self.add_targets(workload, pids, true);
        if let (Some(at), true) = (event, hinted > 0 && self.monitor.is_some()) {
            tracing::info!(
                workload,
                "kernel deny in place {} us after the triggering event",
                at.elapsed().as_micros()
            );
        }
        self.announce();
        let found: Vec<u32> = self
            .scan(&[workload.to_string()])
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        self.add_targets(workload, &found, false);
        let entry = self.frozen(workload).ok_or_else(|| not_frozen(workload))?;
        if self.monitor.is_none() {
            tracing::warn!(
                workload,
                "frozen without the eBPF monitor: sessions and SVIDs are refused, but connect() is not denied in the kernel"
            );
        }
        self.persist_with(Some(workload));
        if let Ok(mut s) = self.service.lock() {
            audit(&mut s, actor, "workload.freeze", &entry, reason.to_string());
        }
        tracing::warn!(
            workload,
            by = %entry.by,
            kernel_targets = entry.kernel.len(),
            "workload frozen: {reason}"
        );
        Ok(entry)
    }

    /// Thaws `workload`: store and audit first, then the kernel maps. The
    /// state lock is held until the record is written, so nobody sees the
    /// workload thawed before its `workload.unfreeze` record exists.
    pub fn unfreeze(&self, actor: Actor, workload: &str, why: &str) -> Result<FreezeEntry> {
        let _turn = self
            .turn
            .lock()
            .map_err(|_| Error::internal("frozen state poisoned"))?;
        let entry = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| Error::internal("frozen state poisoned"))?;
            let entry = st.remove(workload).ok_or_else(|| not_frozen(workload))?;
            // Lock order: state, then service (as in `persist`).
            match self.service.lock() {
                Ok(mut s) => {
                    if let Err(e) = save_change(&mut s, &st, workload) {
                        tracing::error!("cannot persist the frozen set: {}", e.message);
                    }
                    audit(&mut s, actor, "workload.unfreeze", &entry, why.to_string());
                }
                Err(_) => tracing::error!("cannot persist the frozen set: service state poisoned"),
            }
            entry
        };
        self.thaw_here(&entry);
        self.announce();
        tracing::info!(workload, "workload unfrozen: {why}");
        Ok(entry)
    }

    /// Removes what `entry` put into this node's kernel maps and cgroups.
    fn thaw_here(&self, entry: &FreezeEntry) {
        // A cgroup or tgid another frozen workload also holds stays denied.
        let still: Vec<KernelTarget> = self.list().into_iter().flat_map(|e| e.kernel).collect();
        for t in entry.kernel.iter().filter(|t| !still.contains(t)) {
            self.kernel_remove(*t);
        }
        for p in &entry.suspended {
            Self::set_suspended(p, false);
        }
    }

    /// Applies the stored frozen set here: workloads frozen on another node
    /// are frozen on this one (kernel targets found by this node's own
    /// scan), workloads thawed elsewhere are thawed. No audit record: the
    /// node that made the change wrote it. Returns how many workloads
    /// changed. Blocking.
    pub fn sync_from_store(&self) -> Result<usize> {
        let _turn = self
            .turn
            .lock()
            .map_err(|_| Error::internal("frozen state poisoned"))?;
        let stored = {
            let s = self
                .service
                .lock()
                .map_err(|_| Error::internal("service state poisoned"))?;
            load(&s)?
        };
        let (added, removed) = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| Error::internal("frozen state poisoned"))?;
            let removed: Vec<FreezeEntry> = st
                .keys()
                .filter(|w| !stored.contains_key(*w))
                .cloned()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|w| st.remove(&w))
                .collect();
            let mut added = Vec::new();
            for (w, e) in stored {
                match st.get_mut(&w) {
                    Some(mine) => {
                        // Refrozen elsewhere meanwhile: the new reason and times.
                        mine.reason = e.reason;
                        mine.by = e.by;
                        mine.since = e.since;
                        mine.since_unix = e.since_unix;
                        mine.until_unix = e.until_unix;
                    }
                    None => {
                        let mut e = e;
                        e.kernel.clear();
                        e.suspended.clear();
                        st.insert(w.clone(), e);
                        added.push(w);
                    }
                }
            }
            (added, removed)
        };
        for e in &removed {
            self.thaw_here(e);
            tracing::info!(workload = %e.workload, "workload unfrozen on another node");
        }
        if !added.is_empty() {
            let mut pids: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for (w, pid) in self.scan(&added) {
                pids.entry(w).or_default().push(pid);
            }
            for w in &added {
                self.add_targets(w, pids.get(w).map_or(&[][..], |p| p), false);
                if let Some(e) = self.frozen(w) {
                    tracing::warn!(workload = %w, by = %e.by, kernel_targets = e.kernel.len(), "workload frozen on another node: {}", e.reason);
                }
            }
        }
        let changed = added.len() + removed.len();
        if changed > 0 {
            self.announce();
            self.persist();
        }
        Ok(changed)
    }

    /// Re-applies the persisted set to the kernel (start-up) and runs one
    /// reconcile pass.
    pub fn reapply(&self) {
        for e in self.list() {
            for t in &e.kernel {
                // A tgid from the previous run may have been reused by
                // another process: only re-deny it if it still attests.
                if let KernelTarget::Tgid { tgid } = t {
                    if !self.attests_to(*tgid, &e.workload) {
                        self.kernel_remove(*t);
                        continue;
                    }
                }
                self.kernel_apply(*t);
            }
        }
        self.reconcile();
        if !self.list().is_empty() {
            self.announce();
        }
    }

    /// Expiries, new processes of frozen workloads, exited tgids.
    pub fn reconcile(&self) {
        let now = now_unix();
        let expired: Vec<String> = self
            .list()
            .into_iter()
            .filter(|e| e.until_unix.is_some_and(|u| u <= now))
            .map(|e| e.workload)
            .collect();
        for w in expired {
            let _ = self.unfreeze(
                crate::authority::daemon_actor(),
                &w,
                "freeze expired (--for)",
            );
        }
        let frozen: Vec<String> = self.list().into_iter().map(|e| e.workload).collect();
        if frozen.is_empty() {
            return;
        }
        let mut changed = false;
        // Exited processes: drop their tgid entries (a reused pid must not
        // inherit the freeze).
        let gone: Vec<(String, KernelTarget)> = self
            .list()
            .into_iter()
            .flat_map(|e| {
                let w = e.workload.clone();
                e.kernel.into_iter().map(move |t| (w.clone(), t))
            })
            .filter(|(_, t)| match t {
                KernelTarget::Tgid { tgid } => {
                    !std::path::Path::new(&format!("/proc/{tgid}")).exists()
                }
                KernelTarget::Cgroup { .. } => false,
            })
            .collect();
        for (w, t) in gone {
            if let Ok(mut st) = self.state.lock() {
                if let Some(e) = st.get_mut(&w) {
                    e.kernel.retain(|x| *x != t);
                    changed = true;
                }
            }
            self.kernel_remove(t);
        }
        let mut by_workload: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (w, pid) in self.scan(&frozen) {
            by_workload.entry(w).or_default().push(pid);
        }
        for (w, pids) in by_workload {
            if self.add_targets(&w, &pids, false) > 0 {
                changed = true;
            }
        }
        if changed {
            self.persist();
        }
    }

    /// Admin request handling (daemon side).
    pub fn admin(
        &self,
        caller: &crate::service::Caller,
        req: FreezeRequest,
    ) -> Result<serde_json::Value> {
        let actor = caller.actor();
        if !caller.is_admin {
            if let Ok(mut s) = self.service.lock() {
                let _ = s.record(&Event {
                    actor: actor.clone(),
                    action: "workload.freeze".into(),
                    target: Target::default(),
                    decision: Decision::Deny,
                    reason: "freeze/unfreeze/frozen are admin-only".into(),
                });
            }
            return Err(admin_only(caller.uid));
        }
        let by = describe_admin(caller);
        let value = match req {
            FreezeRequest::Freeze {
                workload,
                reason,
                for_secs,
            } => serde_json::to_value(self.freeze(
                actor,
                by,
                &workload,
                &reason,
                for_secs.map(Duration::from_secs),
                &[],
            )?),
            FreezeRequest::Unfreeze { workload } => {
                serde_json::to_value(self.unfreeze(actor, &workload, "unfrozen by an admin")?)
            }
            FreezeRequest::List => serde_json::to_value(self.list()),
        };
        value.map_err(|e| Error::internal(format!("encoding response: {e}")))
    }

    /// Runs [`Freezer::reconcile`] every second.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reconcile()).await;
        }
    }
}

fn admin_only(uid: u32) -> Error {
    Error::denied(format!(
        "uid {uid} may not freeze or unfreeze workloads: only root or the daemon's uid may"
    ))
}

/// `admin uid 0 (root)`.
pub fn describe_admin(caller: &crate::service::Caller) -> String {
    match crate::paths::user_name(caller.uid) {
        Some(u) => format!("admin uid {} ({u})", caller.uid),
        None => format!("admin uid {}", caller.uid),
    }
}

/// The freeze verbs as admin requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FreezeRequest {
    Freeze {
        workload: String,
        reason: String,
        for_secs: Option<u64>,
    },
    Unfreeze {
        workload: String,
    },
    List,
}

/// Offline handling (no daemon): the store only.
pub fn admin_offline(
    s: &mut SecretService,
    known: &[String],
    caller: &crate::service::Caller,
    req: FreezeRequest,
) -> Result<serde_json::Value> {
    if !caller.is_admin {
        return Err(admin_only(caller.uid));
    }
    let actor = caller.actor();
    let value = match req {
        FreezeRequest::Freeze {
            workload,
            reason,
            for_secs,
        } => serde_json::to_value(freeze_offline(
            s,
            known,
            actor,
            describe_admin(caller),
            &workload,
            &reason,
            for_secs.map(Duration::from_secs),
        )?),
        FreezeRequest::Unfreeze { workload } => {
            serde_json::to_value(unfreeze_offline(s, actor, &workload)?)
        }
        FreezeRequest::List => serde_json::to_value(load(s)?.into_values().collect::<Vec<_>>()),
    };
    value.map_err(|e| Error::internal(format!("encoding response: {e}")))
}

/// `warden frozen` lines.
pub fn format_entry(e: &FreezeEntry) -> String {
    let until = e
        .until_unix
        .map(|u| format!(", until {}", format_unix(u)))
        .unwrap_or_default();
    format!(
        "{}  frozen since {} by {}{}: {}",
        e.workload, e.since, e.by, until, e.reason
    )
}

/// What a refused client of a frozen workload is told (every route kind).
pub fn frozen_message(e: &FreezeEntry) -> String {
    format!(
        "warden: workload {:?} is frozen since {} by {}: {} (an admin lifts it with `warden unfreeze {}`)",
        e.workload, e.since, e.by, e.reason, e.workload
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors() {
        assert!(is_ancestor_or_self("/", "/a/b"));
        assert!(is_ancestor_or_self("/a", "/a/b"));
        assert!(is_ancestor_or_self("/a/b", "/a/b"));
        assert!(!is_ancestor_or_self("/a/b", "/a"));
        assert!(!is_ancestor_or_self("/a/b", "/a/bc"));
    }

    #[test]
    fn requests_need_a_known_workload_and_a_reason() {
        let known = vec!["orders".to_string()];
        assert!(check_request(&known, "orders", "burst").is_ok());
        assert!(check_request(&known, "nope", "burst")
            .unwrap_err()
            .message
            .contains("known: orders"));
        assert!(check_request(&known, "orders", "  ")
            .unwrap_err()
            .message
            .contains("--reason"));
    }
}
