//! Who is on the other end of a route's connection: the steps every route
//! kind shares between accept and policy — attribute the socket to a process,
//! attest it against the `[[workload]]` registrations, re-check the pid — and
//! the audit actor that names it.

use crate::audit::{Actor, ActorKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use warden_identity::attest::{self, ExeHashCache, PeerFacts, PeerResolver, Registration};

/// A connecting process after attestation.
#[derive(Clone)]
pub struct Attested {
    pub facts: PeerFacts,
    pub workload: String,
    pub spiffe_id: String,
}

/// The attestation pieces a route runtime holds.
pub struct Attestor {
    pub registrations: Vec<Registration>,
    /// The daemon's one executable-hash cache (shared with the freezer and
    /// the event feed: a process is hashed once).
    pub hashes: Arc<ExeHashCache>,
    pub resolver: Arc<dyn PeerResolver>,
    /// The last attestation per pid, reused only after
    /// [`attest::revalidate`] found the process unchanged.
    recent: Mutex<HashMap<u32, Attested>>,
}

/// Pids whose attestation is kept for reuse; the map is emptied when full.
const RECENT_MAX: usize = 4096;

impl Attestor {
    /// `resolver` is the daemon's (eBPF with /proc fallback, or /proc only;
    /// see `access_monitor.rs`).
    pub fn from_config(
        cfg: &crate::config::Config,
        resolver: Arc<dyn PeerResolver>,
        hashes: Arc<ExeHashCache>,
    ) -> Attestor {
        Attestor {
            registrations: cfg.workloads.iter().map(|w| w.registration()).collect(),
            hashes,
            resolver,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// The process holding the client end of a TCP connection (blocking /proc work).
    pub fn tcp_pid(&self, local: SocketAddr, peer: SocketAddr) -> Result<u32, String> {
        self.resolver
            .resolve_tcp(local, peer)
            .map_err(|e| format!("warden: cannot tell which process is connecting ({e})"))
    }

    /// Attests `pid` (blocking /proc work). Errors are messages for the client.
    ///
    /// A process that connects again reuses its last attestation when
    /// [`attest::revalidate`] finds every fact a selector sees unchanged — the
    /// result a fresh attestation would give, for about half the /proc reads.
    /// Anything else (another process on the pid, a changed uid, cgroup or
    /// executable) attests from scratch.
    pub fn attest_pid(&self, pid: u32) -> Result<Attested, String> {
        let recent = self.recent_lock().get(&pid).cloned();
        if let Some(prev) = recent {
            if attest::revalidate(&prev.facts, &self.hashes).is_ok() {
                return Ok(prev);
            }
            self.recent_lock().remove(&pid);
        }
        let fresh = self.attest_fresh(pid)?;
        let mut recent = self.recent_lock();
        if recent.len() >= RECENT_MAX {
            recent.clear();
        }
        recent.insert(pid, fresh.clone());
        Ok(fresh)
    }

    /// Attribution and attestation without blocking work, for a TCP client
    /// whose process the kernel named and whose last attestation
    /// [`attest::revalidate_cached`] confirms (small /proc reads, a stat of
    /// the executable, its hash from the cache). Otherwise the blocking
    /// path runs, which also words every refusal: `Err(Some(pid))` — the
    /// kernel named the pid, [`Self::attest_pid`] it there; `Err(None)` —
    /// [`Self::attest_tcp`] there.
    pub fn attest_tcp_cached(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Attested, Option<u32>> {
        let pid = self.resolver.resolve_tcp_cached(local, peer).ok_or(None)?;
        self.attest_pid_cached(pid).ok_or(Some(pid))
    }

    /// [`Self::attest_tcp_cached`] for a known pid (unix sockets).
    pub fn attest_pid_cached(&self, pid: u32) -> Option<Attested> {
        let prev = self.recent_lock().get(&pid).cloned()?;
        match attest::revalidate_cached(&prev.facts, &self.hashes)? {
            Ok(()) => Some(prev),
            Err(_) => None,
        }
    }

    fn recent_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Attested>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attest_fresh(&self, pid: u32) -> Result<Attested, String> {
        let facts = attest::gather_facts(pid, &self.hashes).map_err(|e| format!("warden: {e}"))?;
        let reg =
            attest::attest(&facts, &self.registrations).map_err(|e| format!("warden: {e}"))?;
        let (workload, spiffe_id) = (reg.name.clone(), reg.spiffe_id.clone());
        attest::confirm_same_process(&facts).map_err(|e| format!("warden: {e}"))?;
        Ok(Attested {
            facts,
            workload,
            spiffe_id,
        })
    }
}

/// "process 4121 (/usr/bin/curl, uid 1001)"
pub fn describe(f: &PeerFacts) -> String {
    format!(
        "process {} ({}, uid {})",
        f.pid,
        f.exe_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unknown executable".into()),
        f.uid
    )
}

/// The audit actor for a (possibly unattested) route client.
pub fn actor(who: Option<&Attested>) -> Actor {
    Actor {
        kind: ActorKind::Workload,
        uid: who.map(|w| w.facts.uid),
        user: who.and_then(|w| crate::paths::user_name(w.facts.uid)),
        pid: who.map(|w| w.facts.pid),
        exe: who.and_then(|w| w.facts.exe_path.as_ref().map(|p| p.display().to_string())),
        workload: who.map(|w| w.workload.clone()),
    }
}
