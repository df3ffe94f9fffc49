//! Who is on the other end of a route's connection: the steps every route
//! kind shares between accept and policy — attribute the socket to a process,
//! attest it against the `[[workload]]` registrations, re-check the pid — and
//! the audit actor that names it.

use crate::audit::{Actor, ActorKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use warden_identity::attest::{
    self, ExeHashCache, KernelPeer, PeerFacts, PeerResolver, Registration,
};

/// A connecting process after attestation.
#[derive(Clone)]
pub struct Attested {
    /// Shared: an attestation is cloned on every session (the recent-pid
    /// cache, the admission step, audit actors) and never changed after.
    pub facts: Arc<PeerFacts>,
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
    /// The last attestation per pid: reused when the kernel vouches that
    /// the process is unchanged ([`Attestor::attest_kernel`]), or after
    /// [`attest::revalidate`] found it unchanged through /proc.
    recent: Mutex<HashMap<u32, Recent>>,
}

/// A kept attestation.
#[derive(Clone)]
struct Recent {
    attested: Attested,
    /// Set once the kernel attributed a connection of this process.
    stamp: Option<KernelStamp>,
}

/// What lets the kernel vouch for a kept attestation: the kernel's change
/// count of the process's bucket read before its facts were (an exec or an
/// exit of the process changes it, so a reused pid is never mistaken for
/// it), and the ids the kernel reported for it then.
#[derive(Clone, Copy)]
struct KernelStamp {
    generation: u64,
    uid: u32,
    gid: u32,
    cgroup_id: u64,
}

/// Pids whose attestation is kept for reuse; the map is emptied when full.
const RECENT_MAX: usize = 4096;

/// CLOCK_BOOTTIME now (the clock of the kernel's connect and exec times).
pub fn boottime_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

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
            if attest::revalidate(&prev.attested.facts, &self.hashes).is_ok() {
                return Ok(prev.attested);
            }
            self.recent_lock().remove(&pid);
        }
        let fresh = self.attest_fresh(pid)?;
        let mut recent = self.recent_lock();
        if recent.len() >= RECENT_MAX {
            recent.clear();
        }
        recent.insert(
            pid,
            Recent {
                attested: fresh.clone(),
                stamp: None,
            },
        );
        Ok(fresh)
    }

    /// The kept attestation of the process the kernel says opened a
    /// connection, with no /proc read and no system call: only when it was
    /// stamped from an earlier kernel-attributed connection, the kernel
    /// counted no exec or exit in the process's bucket since (`k` read
    /// after the connect), and it reports the same real uid, gid and cgroup
    /// for this connect as for that one.
    pub fn attest_kernel(&self, k: &KernelPeer) -> Option<Attested> {
        let recent = self.recent_lock();
        let kept = recent.get(&k.tgid)?;
        let stamp = kept.stamp.as_ref()?;
        (stamp.generation == k.generation
            && (stamp.uid, stamp.gid, stamp.cgroup_id) == (k.uid, k.gid, k.cgroup_id))
            .then(|| kept.attested.clone())
    }

    /// Lets the kernel vouch for `pid`'s kept attestation from now on
    /// (see [`Self::attest_kernel`]): `generation` is the kernel's change
    /// count read before the kept facts were confirmed, `k` the kernel's
    /// record of the connection they were confirmed for.
    pub fn stamp(&self, pid: u32, k: &KernelPeer, generation: u64) {
        if k.tgid != pid {
            return;
        }
        if let Some(kept) = self.recent_lock().get_mut(&pid) {
            if kept.stamp.as_ref().map(|s| s.generation) != Some(generation) {
                kept.stamp = Some(KernelStamp {
                    generation,
                    uid: k.uid,
                    gid: k.gid,
                    cgroup_id: k.cgroup_id,
                });
            }
        }
    }

    /// Attribution and attestation without blocking work, for a TCP client
    /// whose process the kernel named and whose last attestation
    /// [`attest::revalidate_cached`] confirms (small /proc reads, a stat of
    /// the executable, its hash from the cache). Otherwise the blocking
    /// path runs, which also words every refusal: `Err(Some(pid))` — the
    /// kernel named the pid, [`Self::attest_pid`] it there; `Err(None)` —
    /// [`Self::tcp_pid`] there.
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
        match attest::revalidate_cached(&prev.attested.facts, &self.hashes)? {
            Ok(()) => Some(prev.attested),
            Err(_) => None,
        }
    }

    fn recent_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Recent>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attest_fresh(&self, pid: u32) -> Result<Attested, String> {
        let facts = attest::gather_facts(pid, &self.hashes).map_err(|e| format!("warden: {e}"))?;
        let reg =
            attest::attest(&facts, &self.registrations).map_err(|e| format!("warden: {e}"))?;
        let (workload, spiffe_id) = (reg.name.clone(), reg.spiffe_id.clone());
        attest::confirm_same_process(&facts).map_err(|e| format!("warden: {e}"))?;
        Ok(Attested {
            facts: Arc::new(facts),
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
