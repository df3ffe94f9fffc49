//! Loading, attaching and driving the kernel programs.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, RawTracePoint, SockOps};
use aya::{Ebpf, EbpfLoader};
use warden_ebpf_common::{
    FrozenEntry, ProcessInfo, SockKey, CHANGE_BUCKETS, CONFIG_PIDNS_DEV, CONFIG_PIDNS_INO,
    CONFIG_PROTECT_MODE, CONFIG_WARDEN_TGID, COUNTER_ATTRIBUTED, COUNTER_DENIED, COUNTER_EMITTED,
    COUNTER_HOPS, COUNTER_LOST, DEST_LISTENER, DEST_UPSTREAM, EXEC_LOST_AT, HOP_LISTENER,
    HOP_UPSTREAM, PROTECT_ENFORCE, PROTECT_OBSERVE, PROTECT_OFF, RELAY_LISTENER, RELAY_UPSTREAM,
};

use crate::cgroup::{cgroup2_mount, mount_point_of_type};
use crate::events::{sock_key_of, EventReader};
use crate::relay::KernelRelay;

/// What to do about direct connects to protected upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtectMode {
    /// Nothing.
    Off,
    /// Report them (events, metrics) and let them through.
    #[default]
    Observe,
    /// Report and deny them (EPERM).
    Enforce,
}

/// What the monitor watches.
#[derive(Debug, Clone, Default)]
pub struct MonitorConfig {
    /// warden's listening addresses (`0.0.0.0:P` / `[::]:P` match any address).
    pub listeners: Vec<SocketAddr>,
    /// Protected upstream addresses (resolved).
    pub upstreams: Vec<SocketAddr>,
    /// Listeners (of `listeners`) whose clients' sockets may be relayed
    /// directly by the kernel relay, and upstreams (of `upstreams`) whose
    /// accepted sockets may: only these connections' far ends are entered
    /// in the direct relay's map.
    pub relay_listeners: Vec<SocketAddr>,
    pub relay_upstreams: Vec<SocketAddr>,
    /// Listeners (of `listeners`) whose connections are local hops the
    /// kernel joins socket to socket, and upstreams (of `upstreams`) whose
    /// connections from warden are: sends skip the loopback TCP/IP path,
    /// warden still reads and writes every byte.
    pub hop_listeners: Vec<SocketAddr>,
    pub hop_upstreams: Vec<SocketAddr>,
    /// Reaction to direct upstream connects.
    pub protect: ProtectMode,
    /// The process allowed to connect to protected upstreams (the daemon).
    pub warden_tgid: u32,
    /// bpffs directory to pin links and frozen maps in (None: nothing is
    /// pinned and everything detaches when the monitor is dropped).
    pub pin_dir: Option<PathBuf>,
}

/// Why the monitor could not be loaded; the message names the cause and the
/// fix (it is shown to operators as is).
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Loading BPF programs needs CAP_BPF + CAP_NET_ADMIN (or root).
    #[error("loading eBPF programs was refused ({detail}); run warden as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON")]
    NotPermitted {
        /// The kernel's answer.
        detail: String,
    },
    /// No cgroup v2 hierarchy to attach to.
    #[error("no cgroup v2 filesystem is mounted (the programs attach to the root of cgroup v2); mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2,
    /// The kernel lacks a feature the programs need.
    #[error("the kernel refused warden's eBPF programs ({detail}); Linux 5.8 or newer with BPF ring buffers and cgroup sock_addr programs is needed")]
    Unsupported {
        /// What failed.
        detail: String,
    },
    /// Anything else (I/O on bpffs, map updates).
    #[error("eBPF monitor: {0}")]
    Other(String),
}

/// What the frozen maps hold: `(id, seconds since the epoch when frozen)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frozen {
    /// Frozen processes.
    pub tgids: Vec<(u32, u64)>,
    /// Frozen cgroups (descendants included).
    pub cgroups: Vec<(u64, u64)>,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events dropped because the ring buffer was full.
    pub lost: u64,
    /// Connects denied (frozen or enforced bypass).
    pub denied: u64,
    /// Attribution entries recorded by `sock_ops`.
    pub attributed: u64,
    /// Local-hop connection directions the kernel joined socket to socket.
    pub hops: u64,
}

const PROGRAMS: [&str; 3] = ["warden_sock_ops", "warden_connect4", "warden_connect6"];
/// Exec tracking: program and raw tracepoint.
const EXEC_PROGRAMS: [(&str, &str); 2] = [
    ("warden_exec", "sched_process_exec"),
    ("warden_exit", "sched_process_exit"),
];
const PINNED_MAPS: [(&str, &str); 2] = [
    ("FROZEN_TGIDS", "frozen_tgids"),
    ("FROZEN_CGROUPS", "frozen_cgroups"),
];

/// The loaded and attached monitor.
pub struct Monitor {
    attribution: HashMap<MapData, SockKey, ProcessInfo>,
    /// tgid → CLOCK_BOOTTIME ns of its last exec (`warden_exec`).
    execs: HashMap<MapData, u32, u64>,
    /// When an exec last could not be recorded (0: never).
    exec_lost: Array<MapData, u64>,
    /// `CHANGES`, mapped read-only (see [`Self::change_count`]).
    changes: ChangeCounts,
    frozen_tgids: FrozenMap<u32>,
    frozen_cgroups: FrozenMap<u64>,
    counters: PerCpuArray<MapData, u64>,
    events: Mutex<Option<EventReader>>,
    pins: Mutex<Vec<PinnedLink>>,
    links: Mutex<Vec<FdLink>>,
    pin_dir: Option<PathBuf>,
    /// The kernel relay, or why it could not be loaded (the monitor works
    /// without it).
    relay: Result<Arc<KernelRelay>, String>,
    // Owns the programs and their links (unpinned links detach on drop).
    _ebpf: Ebpf,
}

fn classify(detail: String) -> MonitorError {
    let lower = detail.to_ascii_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        MonitorError::NotPermitted { detail }
    } else if lower.contains("invalid argument") || lower.contains("not supported") {
        MonitorError::Unsupported { detail }
    } else {
        MonitorError::Other(detail)
    }
}

fn err_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Mounts bpffs at `/sys/fs/bpf` unless one is mounted there already.
fn ensure_bpffs() -> Result<PathBuf, MonitorError> {
    let root = PathBuf::from("/sys/fs/bpf");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| MonitorError::Other(format!("reading /proc/self/mountinfo: {e}")))?;
    if mount_point_of_type(&mountinfo, "bpf").is_some_and(|p| p == root) {
        return Ok(root);
    }
    fs::create_dir_all(&root)
        .map_err(|e| MonitorError::Other(format!("creating {}: {e}", root.display())))?;
    let target = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| MonitorError::Other("bpffs path contains NUL".into()))?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(classify(format!(
            "mounting bpffs at {}: {e}",
            root.display()
        )));
    }
    Ok(root)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn map_err(what: &str) -> impl Fn(aya::maps::MapError) -> MonitorError + '_ {
    move |e| MonitorError::Other(format!("{what}: {}", err_chain(&e)))
}

impl Monitor {
    /// Loads the embedded object, attaches it at the root of cgroup v2 and
    /// fills the maps from `cfg`.
    pub fn load(cfg: &MonitorConfig) -> Result<Monitor, MonitorError> {
        let cgroup_root = cgroup2_mount().ok_or(MonitorError::NoCgroup2)?;
        let cgroup = fs::File::open(&cgroup_root)
            .map_err(|e| MonitorError::Other(format!("opening {}: {e}", cgroup_root.display())))?;

        let pin_dir = match &cfg.pin_dir {
            Some(dir) => {
                let bpffs = ensure_bpffs()?;
                if !dir.starts_with(&bpffs) {
                    return Err(MonitorError::Other(format!(
                        "pin directory {} is not under the bpffs mount {}",
                        dir.display(),
                        bpffs.display()
                    )));
                }
                fs::create_dir_all(dir)
                    .map_err(|e| MonitorError::Other(format!("creating {}: {e}", dir.display())))?;
                Some(dir.clone())
            }
            None => None,
        };

        // An aligned copy: the ELF parser reads structs in place.
        let object = crate::OBJECT.to_vec();
        // The kernel relay's armed checks read struct tcp_sock at offsets
        // from this kernel's BTF (constants to the verifier).
        let tcp_sock = crate::btf::tcp_sock_offsets();
        let mut loader = EbpfLoader::new();
        if let Ok(offsets) = &tcp_sock {
            for ((global, _), offset) in warden_ebpf_common::TCP_SOCK_FIELDS.iter().zip(offsets) {
                loader.override_global(global, offset, true);
            }
        }
        let map_paths: Vec<(&str, PathBuf)> = match &pin_dir {
            Some(dir) => PINNED_MAPS
                .iter()
                .map(|(map, file)| (*map, dir.join(file)))
                .collect(),
            None => Vec::new(),
        };
        for (map, path) in &map_paths {
            loader.map_pin_path(map, path.as_path());
        }
        let mut ebpf = loader
            .load(&object)
            .map_err(|e| classify(format!("loading the object: {}", err_chain(&e))))?;

        // Maps first, so the programs never run with an empty configuration.
        let mut config: Array<_, u64> = Array::try_from(
            ebpf.map_mut("CONFIG")
                .ok_or_else(|| MonitorError::Other("map CONFIG missing".into()))?,
        )
        .map_err(map_err("CONFIG"))?;
        config
            .set(CONFIG_WARDEN_TGID, u64::from(cfg.warden_tgid), 0)
            .map_err(map_err("CONFIG"))?;
        // pids as this process's PID namespace sees them (a daemon in a
        // container): the ones its /proc shows, and its own tgid above.
        let (ns_dev, ns_ino) = own_pid_namespace()
            .map_err(|e| MonitorError::Other(format!("reading /proc/self/ns/pid: {e}")))?;
        config
            .set(CONFIG_PIDNS_DEV, ns_dev, 0)
            .map_err(map_err("CONFIG"))?;
        config
            .set(CONFIG_PIDNS_INO, ns_ino, 0)
            .map_err(map_err("CONFIG"))?;
        let mode = match cfg.protect {
            ProtectMode::Off => PROTECT_OFF,
            ProtectMode::Observe => PROTECT_OBSERVE,
            ProtectMode::Enforce => PROTECT_ENFORCE,
        };
        config
            .set(CONFIG_PROTECT_MODE, mode, 0)
            .map_err(map_err("CONFIG"))?;
        {
            let mut watched: HashMap<_, SockKey, u8> = HashMap::try_from(
                ebpf.map_mut("WATCHED")
                    .ok_or_else(|| MonitorError::Other("map WATCHED missing".into()))?,
            )
            .map_err(map_err("WATCHED"))?;
            for up in &cfg.upstreams {
                watched
                    .insert(watch_key(*up), DEST_UPSTREAM, 0)
                    .map_err(map_err("WATCHED"))?;
            }
            // Listeners win over upstreams on the same address.
            for l in &cfg.listeners {
                watched
                    .insert(watch_key(*l), DEST_LISTENER, 0)
                    .map_err(map_err("WATCHED"))?;
            }
        }
        {
            let mut relay: HashMap<_, SockKey, u8> = HashMap::try_from(
                ebpf.map_mut("RELAY_ADDRS")
                    .ok_or_else(|| MonitorError::Other("map RELAY_ADDRS missing".into()))?,
            )
            .map_err(map_err("RELAY_ADDRS"))?;
            // Flags: one address may serve routes of both kinds.
            let mut flags: std::collections::HashMap<SockKey, u8> = Default::default();
            for (addrs, flag) in [
                (&cfg.relay_upstreams, RELAY_UPSTREAM),
                (&cfg.relay_listeners, RELAY_LISTENER),
                (&cfg.hop_upstreams, HOP_UPSTREAM),
                (&cfg.hop_listeners, HOP_LISTENER),
            ] {
                for a in addrs {
                    *flags.entry(watch_key(*a)).or_default() |= flag;
                }
            }
            for (key, f) in flags {
                relay.insert(key, f, 0).map_err(map_err("RELAY_ADDRS"))?;
            }
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| MonitorError::Other(format!("map {name} missing")))
        };
        let attribution =
            HashMap::try_from(take(&mut ebpf, "ATTRIBUTION")?).map_err(map_err("ATTRIBUTION"))?;
        let frozen_tgids =
            HashMap::try_from(take(&mut ebpf, "FROZEN_TGIDS")?).map_err(map_err("FROZEN_TGIDS"))?;
        let frozen_cgroups = HashMap::try_from(take(&mut ebpf, "FROZEN_CGROUPS")?)
            .map_err(map_err("FROZEN_CGROUPS"))?;
        let counters =
            PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let execs = HashMap::try_from(take(&mut ebpf, "EXECS")?).map_err(map_err("EXECS"))?;
        let exec_lost =
            Array::try_from(take(&mut ebpf, "EXEC_LOST")?).map_err(map_err("EXEC_LOST"))?;
        let changes = ChangeCounts::map(take(&mut ebpf, "CHANGES")?)?;
        // Exec tracking first: every connection attributed from here on can
        // be checked for a later exec. Its links live as long as the
        // programs (`_ebpf`): a crashed daemon's successor starts afresh.
        for (name, tracepoint) in EXEC_PROGRAMS {
            attach_raw_tracepoint(&mut ebpf, name, tracepoint)?;
        }
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(map_err("EVENTS"))?;
        let asleep: Array<MapData, u64> =
            Array::try_from(take(&mut ebpf, "READER_ASLEEP")?).map_err(map_err("READER_ASLEEP"))?;

        let mut new_links: Vec<(String, FdLink)> = Vec::new();
        for name in PROGRAMS {
            let link = attach(&mut ebpf, name, &cgroup)?;
            new_links.push((name.to_string(), link));
        }

        // Replace the links a crashed predecessor left pinned: the new ones
        // are attached already, so there is no window without enforcement.
        let mut pins = Vec::new();
        if let Some(dir) = &pin_dir {
            for (name, link) in std::mem::take(&mut new_links) {
                let path = dir.join(format!("link_{name}"));
                if path.exists() {
                    if let Ok(old) = PinnedLink::from_pin(&path) {
                        // Dropping the unpinned link detaches the old program.
                        drop(old.unpin());
                    } else {
                        let _ = fs::remove_file(&path);
                    }
                }
                let pinned = link.pin(&path).map_err(|e| {
                    MonitorError::Other(format!("pinning {}: {}", path.display(), err_chain(&e)))
                })?;
                pins.push(pinned);
            }
        }
        let relay = match &tcp_sock {
            Ok(_) => KernelRelay::load(&mut ebpf).map(Arc::new),
            Err(e) => Err(format!(
                "a splice is checked against the sockets' TCP state, whose layout comes from \
                 the kernel's BTF: {e}"
            )),
        };

        // Unpinned links live as long as the monitor (dropping detaches).
        let links: Vec<FdLink> = new_links.into_iter().map(|(_, link)| link).collect();

        Ok(Monitor {
            attribution,
            execs,
            exec_lost,
            changes,
            frozen_tgids: Mutex::new(frozen_tgids),
            frozen_cgroups: Mutex::new(frozen_cgroups),
            counters,
            events: Mutex::new(Some(EventReader {
                ring: events,
                asleep,
            })),
            pins: Mutex::new(pins),
            links: Mutex::new(links),
            pin_dir,
            relay,
            _ebpf: ebpf,
        })
    }

    /// The process that opened the TCP connection whose client end is
    /// `peer` (the accepted socket's peer address), if `sock_ops` saw it.
    pub fn lookup(&self, peer: SocketAddr) -> Option<ProcessInfo> {
        self.attribution.get(&sock_key_of(peer), 0).ok()
    }

    /// Whether process `tgid` may have run another program since
    /// `since_ns` (CLOCK_BOOTTIME, an attribution entry's connect time):
    /// it exec'd after that, or an exec after that could not be recorded.
    pub fn exec_since(&self, tgid: u32, since_ns: u64) -> Option<ExecSince> {
        let (exec_ns, lost_ns) = self.last_change(tgid);
        if exec_ns > since_ns {
            Some(ExecSince::Executed)
        } else {
            (lost_ns > since_ns).then_some(ExecSince::Unknown)
        }
    }

    /// CLOCK_BOOTTIME ns of process `tgid`'s last recorded exec and of the
    /// last exec the kernel could not record (0: none), read together.
    pub fn last_change(&self, tgid: u32) -> (u64, u64) {
        let exec_ns = self.execs.get(&tgid, 0).unwrap_or(0);
        let lost_ns = self.exec_lost.get(&EXEC_LOST_AT, 0).unwrap_or(0);
        (exec_ns, lost_ns)
    }

    /// How many times a process of `tgid`'s bucket exec'd or its leader
    /// exited since the monitor attached (a memory read, no system call):
    /// while it stays the same, `tgid` neither exec'd nor exited. A change
    /// may be another tgid's (65,536 buckets); [`Self::exec_since`] tells.
    pub fn change_count(&self, tgid: u32) -> u64 {
        self.changes.get(tgid)
    }

    /// Denies every `connect()` of process `tgid` from now on.
    pub fn freeze_tgid(&self, tgid: u32) -> Result<(), MonitorError> {
        insert_frozen(&self.frozen_tgids, tgid, "FROZEN_TGIDS")
    }

    /// Lifts a tgid freeze; `Ok(false)` when it was not frozen.
    pub fn unfreeze_tgid(&self, tgid: u32) -> Result<bool, MonitorError> {
        remove_frozen(&self.frozen_tgids, &tgid)
    }

    /// Denies every `connect()` from cgroup `id` and its descendants (up to
    /// 8 levels below it).
    pub fn freeze_cgroup(&self, id: u64) -> Result<(), MonitorError> {
        insert_frozen(&self.frozen_cgroups, id, "FROZEN_CGROUPS")
    }

    /// Lifts a cgroup freeze; `Ok(false)` when it was not frozen.
    pub fn unfreeze_cgroup(&self, id: u64) -> Result<bool, MonitorError> {
        remove_frozen(&self.frozen_cgroups, &id)
    }

    /// Frozen tgids and cgroup ids with the time each freeze was set.
    pub fn frozen(&self) -> Frozen {
        let tgids = self
            .frozen_tgids
            .lock()
            .map(|m| {
                m.iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| (k, v.since_unix))
                    .collect()
            })
            .unwrap_or_default();
        let cgroups = self
            .frozen_cgroups
            .lock()
            .map(|m| {
                m.iter()
                    .filter_map(Result::ok)
                    .map(|(k, v)| (k, v.since_unix))
                    .collect()
            })
            .unwrap_or_default();
        Frozen { tgids, cgroups }
    }

    /// Kernel-side counters summed over CPUs.
    pub fn counters(&self) -> Counters {
        let sum = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().copied().sum())
                .unwrap_or(0)
        };
        Counters {
            emitted: sum(COUNTER_EMITTED),
            lost: sum(COUNTER_LOST),
            denied: sum(COUNTER_DENIED),
            attributed: sum(COUNTER_ATTRIBUTED),
            hops: sum(COUNTER_HOPS),
        }
    }

    /// The event reader (once; `None` afterwards).
    pub fn take_events(&self) -> Option<EventReader> {
        self.events.lock().ok()?.take()
    }

    /// Clean stop: detaches the programs and removes the pins (fail open by
    /// the operator's decision), and the frozen
    /// maps' pins, so a later start begins unfrozen unless the daemon
    /// re-applies freezes it persisted itself.
    pub fn shutdown(&self) {
        if let Ok(mut pins) = self.pins.lock() {
            for pinned in pins.drain(..) {
                // Unpinned and dropped: the link detaches.
                drop(pinned.unpin());
            }
        }
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
        if let Some(dir) = &self.pin_dir {
            for (_, file) in PINNED_MAPS {
                let _ = fs::remove_file(dir.join(file));
            }
            let _ = fs::remove_dir(dir);
        }
    }

    /// The kernel relay (see [`KernelRelay`]), or why this kernel could
    /// not load it.
    pub fn relay(&self) -> Result<&Arc<KernelRelay>, &str> {
        self.relay.as_ref().map_err(String::as_str)
    }

    /// The pin directory in use, if any.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// Releases what a monitor pinned in `dir` (links detach, maps and the
/// directory are removed): for an instance that will never start again.
pub fn release_pinned(dir: &Path) -> Result<(), MonitorError> {
    let entries = fs::read_dir(dir)
        .map_err(|e| MonitorError::Other(format!("reading {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_link = entry.file_name().to_string_lossy().starts_with("link_");
        if is_link {
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                // Unpinned and dropped: the link detaches.
                drop(pinned.unpin());
                continue;
            }
        }
        fs::remove_file(&path)
            .map_err(|e| MonitorError::Other(format!("removing {}: {e}", path.display())))?;
    }
    fs::remove_dir(dir).map_err(|e| MonitorError::Other(format!("removing {}: {e}", dir.display())))
}

type FrozenMap<K> = Mutex<HashMap<MapData, K, FrozenEntry>>;

fn lock_frozen<K>(
    map: &FrozenMap<K>,
) -> Result<std::sync::MutexGuard<'_, HashMap<MapData, K, FrozenEntry>>, MonitorError> {
    map.lock()
        .map_err(|_| MonitorError::Other("frozen map lock poisoned".into()))
}

fn insert_frozen<K: aya::Pod>(map: &FrozenMap<K>, key: K, name: &str) -> Result<(), MonitorError> {
    let entry = FrozenEntry {
        since_unix: now_unix(),
    };
    lock_frozen(map)?
        .insert(key, entry, 0)
        .map_err(map_err(name))
}

fn remove_frozen<K: aya::Pod>(map: &FrozenMap<K>, key: &K) -> Result<bool, MonitorError> {
    match lock_frozen(map)?.remove(key) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(e) => Err(MonitorError::Other(format!(
            "updating a frozen map: {}",
            err_chain(&e)
        ))),
    }
}

fn watch_key(addr: SocketAddr) -> SockKey {
    if addr.ip().is_unspecified() {
        SockKey::v6([0; 16], addr.port())
    } else {
        sock_key_of(addr)
    }
}

/// Why a connection's process may not be the program that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecSince {
    /// The process exec'd after it connected.
    Executed,
    /// The kernel could not record an exec since the connect.
    Unknown,
}

fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
) -> Result<(), MonitorError> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| MonitorError::Other(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| MonitorError::Other(format!("{name}: {e}")))?;
    prog.load()
        .map_err(|e| classify(format!("loading {name}: {}", err_chain(&e))))?;
    prog.attach(tracepoint).map_err(|e| {
        classify(format!(
            "attaching {name} to {tracepoint}: {}",
            err_chain(&e)
        ))
    })?;
    Ok(())
}

fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &fs::File) -> Result<FdLink, MonitorError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| MonitorError::Other(format!("program {name} missing from the object")))?;
    let attach_err =
        |e: aya::programs::ProgramError| classify(format!("attaching {name}: {}", err_chain(&e)));
    let load_err =
        |e: aya::programs::ProgramError| classify(format!("loading {name}: {}", err_chain(&e)));
    if name == "warden_sock_ops" {
        let prog: &mut SockOps = program
            .try_into()
            .map_err(|e| MonitorError::Other(format!("{name}: {e}")))?;
        prog.load().map_err(load_err)?;
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|e| MonitorError::Other(format!("{name}: {e}")))
    } else {
        let prog: &mut CgroupSockAddr = program
            .try_into()
            .map_err(|e| MonitorError::Other(format!("{name}: {e}")))?;
        prog.load().map_err(load_err)?;
        let id = prog
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|e| MonitorError::Other(format!("{name}: {e}")))
    }
}

/// The device (kernel `MKDEV` encoding, as `bpf_get_ns_current_pid_tgid`
/// compares it) and inode of this process's PID namespace.
fn own_pid_namespace() -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/ns/pid")?;
    let dev = m.dev();
    let (major, minor) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    Ok(((major << 20) | minor, m.ino()))
}

/// The kernel's `CHANGES` array mapped read-only into the daemon.
struct ChangeCounts {
    base: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    /// Keeps the map (and so the mapped pages) alive.
    _map: MapData,
}

// SAFETY: the mapping is shared memory only read through atomics; the
// kernel writes it with atomic adds.
unsafe impl Send for ChangeCounts {}
// SAFETY: as above.
unsafe impl Sync for ChangeCounts {}

const CHANGES_BYTES: usize = CHANGE_BUCKETS as usize * std::mem::size_of::<u64>();

impl ChangeCounts {
    fn map(map: aya::maps::Map) -> Result<Self, MonitorError> {
        let aya::maps::Map::Array(data) = map else {
            return Err(MonitorError::Other("map CHANGES is not an array".into()));
        };
        use std::os::fd::{AsFd, AsRawFd};
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a read-only shared mapping of a BPF_F_MMAPABLE array of
        // CHANGE_BUCKETS u64 values; unmapped in Drop, the fd outlives it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHANGES_BYTES,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MonitorError::Other(format!(
                "cannot map CHANGES: {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = std::ptr::NonNull::new(ptr.cast())
            .ok_or_else(|| MonitorError::Other("cannot map CHANGES".into()))?;
        Ok(ChangeCounts { base, _map: data })
    }

    fn get(&self, tgid: u32) -> u64 {
        let index = (tgid & (CHANGE_BUCKETS - 1)) as usize;
        // SAFETY: index < CHANGE_BUCKETS, inside the live mapping.
        unsafe { self.base.as_ptr().add(index).as_ref() }
            .map(|slot| slot.load(std::sync::atomic::Ordering::Acquire))
            .unwrap_or(u64::MAX)
    }
}

impl Drop for ChangeCounts {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), CHANGES_BYTES) };
    }
}
