//! The eBPF attribution resolver for `identity::attest`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use warden_identity::attest::{AttestError, KernelPeer, PeerResolver, ProcFs, ProcNetResolver};

use crate::monitor::{ExecSince, Monitor};

/// Answers "which process is behind this accepted TCP connection" from the
/// `sock_ops` attribution map, and falls back to the `/proc` resolver on a
/// miss (a connection made before the monitor attached, an evicted entry) or
/// when the recorded process cannot be the one (its pid was reused: the
/// process now holding it started after the connect).
pub struct EbpfResolver {
    monitor: Arc<Monitor>,
    fallback: ProcNetResolver,
    proc: ProcFs,
    ns_per_tick: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    observer: Option<Box<dyn Fn(bool) + Send + Sync>>,
}

impl EbpfResolver {
    /// A resolver over `monitor`'s attribution map.
    pub fn new(monitor: Arc<Monitor>) -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as u64 } else { 100 };
        EbpfResolver {
            monitor,
            fallback: ProcNetResolver::new(),
            proc: ProcFs::default(),
            ns_per_tick: 1_000_000_000 / ticks,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            observer: None,
        }
    }

    /// Calls `observer(true)` for every answer from the map and
    /// `observer(false)` for every fallback (metrics).
    pub fn with_observer(mut self, observer: impl Fn(bool) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// (answered from the map, answered by the fallback).
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// The connecting process from the map: `Ok(None)` on a miss or a
    /// reused pid (the fallback decides), `Err` when the process exec'd
    /// after it connected (fail closed: never the fallback, which would
    /// name whatever program holds the socket now).
    fn lookup_in_map(&self, peer: SocketAddr) -> Result<Option<u32>, AttestError> {
        let Some(info) = self.monitor.lookup(peer) else {
            return Ok(None);
        };
        let Ok(start_ticks) = self.proc.start_time(info.tgid) else {
            return Ok(None);
        };
        // The process holding the pid now started after the connect: the
        // pid was reused; let the socket-inode fallback decide.
        if start_ticks.saturating_mul(self.ns_per_tick) > info.ktime_ns {
            return Ok(None);
        }
        match self.monitor.exec_since(info.tgid, info.ktime_ns) {
            None => Ok(Some(info.tgid)),
            Some(why) => Err(AttestError::ExecutedSinceConnect {
                pid: info.tgid,
                what: match why {
                    ExecSince::Executed => "started a new program (exec)",
                    ExecSince::Unknown => {
                        "may have started a new program (the kernel could not record an exec)"
                    }
                },
            }),
        }
    }
}

impl PeerResolver for EbpfResolver {
    fn resolve_tcp(&self, local: SocketAddr, peer: SocketAddr) -> Result<u32, AttestError> {
        let found = self.lookup_in_map(peer)?;
        if let Some(observe) = &self.observer {
            observe(found.is_some());
        }
        if let Some(pid) = found {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(pid);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.fallback.resolve_tcp(local, peer)
    }

    fn resolve_tcp_cached(&self, _local: SocketAddr, peer: SocketAddr) -> Option<u32> {
        // A miss is counted by the `resolve_tcp` that follows it (which
        // also words a refusal).
        let pid = self.lookup_in_map(peer).ok().flatten()?;
        if let Some(observe) = &self.observer {
            observe(true);
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(pid)
    }

    fn kernel_peer(&self, local: SocketAddr, peer: SocketAddr) -> Option<KernelPeer> {
        let k = self.kernel_record(local, peer)?;
        let (exec_ns, lost_ns) = self.monitor.last_change(k.tgid);
        // An exec after the connect: not trustworthy (`resolve_tcp` refuses).
        if exec_ns.max(lost_ns) > k.connect_ns {
            return None;
        }
        Some(k)
    }

    fn kernel_record(&self, _local: SocketAddr, peer: SocketAddr) -> Option<KernelPeer> {
        let info = self.monitor.lookup(peer)?;
        Some(KernelPeer {
            tgid: info.tgid,
            uid: info.uid,
            gid: info.gid,
            cgroup_id: info.cgroup_id,
            connect_ns: info.ktime_ns,
            generation: self.monitor.change_count(info.tgid),
        })
    }

    fn change_count(&self, tgid: u32) -> Option<u64> {
        Some(self.monitor.change_count(tgid))
    }

    fn unchanged_since(&self, tgid: u32, since_ns: u64) -> Option<bool> {
        Some(self.monitor.exec_since(tgid, since_ns).is_none())
    }

    fn name(&self) -> &'static str {
        "ebpf"
    }
}
