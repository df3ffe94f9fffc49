//! The daemon's side of the eBPF access monitor (`[monitor]`).
//!
//! At start-up [`AccessMonitor::start`] loads `warden-ebpf` as
//! `monitor.ebpf` says — `auto` falls back to `/proc` attribution with one
//! warning naming the reason, `required` refuses to start with it, `off`
//! never tries — watching every route's listener and (resolved) upstream.
//! It hands the routes their [`PeerResolver`] (eBPF with `/proc` fallback, or
//! `/proc` only), turns kernel events into metrics and into the feed behind
//! `warden events`, and on a clean stop removes the pins (see
//! ARCHITECTURE.md, "Enforcement when the daemon stops").

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use warden_ebpf::{AccessEvent, DestKind, Monitor, MonitorConfig, MonitorError};
use warden_identity::attest::{ExeHashCache, PeerResolver, ProcNetResolver, Registration};

use warden_core::config::{Config, EbpfMode, ProtectMode, RouteKind};
use warden_core::error::{Error, Result};
use warden_core::export::{Exporter, RateKey};
use warden_core::metrics::{Metrics, MonitorEventKind, MonitorMode, MonitorVerdict};

use crate::ancestry::{Ancestor, AncestryCache};

/// How many recent events `warden events` (without `--follow`) can show.
pub const RECENT_EVENTS: usize = 1024;
/// Bound of the queue between the ring-buffer reader and the enricher;
/// beyond it events are dropped in user space and counted.
const ENRICH_QUEUE: usize = 8192;

/// One access event as `warden events` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventRecord {
    /// RFC 3339, when user space read the event.
    pub time: String,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread that connected.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `/proc/PID/exe`, when the process still ran when the event was read.
    pub exe: Option<String>,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// systemd unit of the cgroup.
    pub unit: Option<String>,
    /// Workload the process attests to (None: matches no registration).
    pub workload: Option<String>,
    /// The process is this warden daemon (its own upstream connections).
    #[serde(default)]
    pub is_warden: bool,
    /// `connect` or `attributed`.
    pub kind: String,
    /// `route NAME` (a listener), `upstream of route NAME`, or `other`.
    pub destination: String,
    /// The destination address.
    pub address: String,
    /// allowed, denied_frozen, bypass_observed, bypass_denied.
    pub verdict: String,
    /// The task's comm (informational, never used for identity).
    pub comm: String,
    /// The process's parent executables, nearest first, up to pid 1 or a
    /// systemd service's main process (display only).
    #[serde(default)]
    pub ancestry: Vec<Ancestor>,
    /// The container id in the cgroup path (docker, containerd, CRI-O, podman).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// An event as the feed keeps it: the kernel's record plus shared
/// enrichment, turned into an [`EventRecord`] (strings) only when someone
/// reads it — two events per client connection would otherwise cost a dozen
/// allocations each on the daemon's main runtime.
#[derive(Debug, Clone)]
pub struct FeedEvent {
    /// When user space read the event.
    time: time::OffsetDateTime,
    ev: AccessEvent,
    who: Arc<Enriched>,
    destination: Arc<str>,
    is_warden: bool,
}

impl FeedEvent {
    /// The record `warden events` shows.
    pub fn record(&self) -> EventRecord {
        let text = |s: &Option<Arc<str>>| s.as_deref().map(str::to_string);
        EventRecord {
            time: warden_core::timefmt::format_rfc3339(self.time),
            pid: self.ev.process.tgid,
            tid: self.ev.process.pid,
            uid: self.ev.process.uid,
            gid: self.ev.process.gid,
            exe: text(&self.who.exe),
            cgroup: text(&self.who.cgroup),
            unit: text(&self.who.unit),
            workload: text(&self.who.workload),
            is_warden: self.is_warden,
            kind: self.ev.kind.as_str().into(),
            destination: self.destination.to_string(),
            address: self.ev.dest.to_string(),
            verdict: self.ev.verdict.as_str().into(),
            comm: self.ev.comm(),
            ancestry: self.who.ancestry.to_vec(),
            container: text(&self.who.container),
        }
    }
}

/// What user space adds to a process's events (display only), shared by
/// the events of one process.
#[derive(Debug, PartialEq, Eq)]
struct Enriched {
    exe: Option<Arc<str>>,
    cgroup: Option<Arc<str>>,
    unit: Option<Arc<str>>,
    workload: Option<Arc<str>>,
    /// Parent executables (cached per process, see `ancestry`).
    ancestry: Arc<[Ancestor]>,
    container: Option<Arc<str>>,
}

impl Default for Enriched {
    fn default() -> Enriched {
        Enriched {
            exe: None,
            cgroup: None,
            unit: None,
            workload: None,
            ancestry: Arc::new([]),
            container: None,
        }
    }
}

/// Recent events and live subscribers.
pub struct EventFeed {
    tx: broadcast::Sender<Arc<FeedEvent>>,
    recent: Mutex<Recent>,
}

/// The last [`RECENT_EVENTS`] events; the newest one is number `published`
/// (events are numbered from 1 in the order they were published).
struct Recent {
    events: VecDeque<Arc<FeedEvent>>,
    published: u64,
}

impl EventFeed {
    fn new() -> EventFeed {
        let (tx, _) = broadcast::channel(1024);
        EventFeed {
            tx,
            recent: Mutex::new(Recent {
                events: VecDeque::with_capacity(RECENT_EVENTS),
                published: 0,
            }),
        }
    }

    fn publish(&self, record: FeedEvent) {
        let record = Arc::new(record);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.events.len() == RECENT_EVENTS {
                recent.events.pop_front();
            }
            recent.events.push_back(record.clone());
            recent.published += 1;
        }
        let _ = self.tx.send(record);
    }

    /// The last `limit` events, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<EventRecord> {
        let events: Vec<Arc<FeedEvent>> = match self.recent.lock() {
            Ok(recent) => {
                let skip = recent.events.len().saturating_sub(limit);
                recent.events.iter().skip(skip).cloned().collect()
            }
            Err(_) => Vec::new(),
        };
        events.iter().map(|e| e.record()).collect()
    }

    /// Events numbered above `after` still kept, oldest first, at most
    /// `max`, with their numbers.
    fn numbered_since(&self, after: u64, max: usize) -> Vec<(u64, Arc<FeedEvent>)> {
        let Ok(recent) = self.recent.lock() else {
            return Vec::new();
        };
        let first = recent.published + 1 - recent.events.len() as u64;
        let skip = after.saturating_add(1).saturating_sub(first);
        recent
            .events
            .iter()
            .zip(first..)
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .take(max)
            .map(|(e, n)| (n, e.clone()))
            .collect()
    }

    /// Live events from now on ([`FeedEvent::record`] for their text).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEvent>> {
        self.tx.subscribe()
    }
}

/// The fleet shipper copies a summary of each event (what `warden events
/// --json` prints: names, ids and addresses, no secret) to the shared store.
impl warden_core::fleet_views::EventSource for EventFeed {
    fn since(&self, after: u64, max: usize) -> Vec<(u64, String, String)> {
        self.numbered_since(after, max)
            .into_iter()
            .filter_map(|(n, e)| {
                let record = e.record();
                let json = serde_json::to_string(&record).ok()?;
                Some((n, record.time, json))
            })
            .collect()
    }
}

/// Where an address leads, for display.
#[derive(Debug, Clone)]
struct Destinations {
    listeners: Vec<(SocketAddr, String)>,
    upstreams: Vec<(SocketAddr, String)>,
}

impl Destinations {
    fn describe(&self, kind: DestKind, addr: SocketAddr) -> String {
        let find = |list: &[(SocketAddr, String)]| {
            list.iter()
                .find(|(a, _)| {
                    a.port() == addr.port() && (a.ip() == addr.ip() || a.ip().is_unspecified())
                })
                .map(|(_, name)| name.clone())
        };
        match kind {
            DestKind::Listener => find(&self.listeners)
                .map(|n| format!("route {n}"))
                .unwrap_or_else(|| "a warden listener".into()),
            DestKind::Upstream => find(&self.upstreams)
                .map(|n| format!("upstream of route {n}"))
                .unwrap_or_else(|| "a protected upstream".into()),
            DestKind::Other => "other".into(),
        }
    }
}

/// The running monitor (or its procfs stand-in).
pub struct AccessMonitor {
    pub mode: MonitorMode,
    monitor: Option<Arc<Monitor>>,
    resolver: Arc<dyn PeerResolver>,
    pub feed: Arc<EventFeed>,
    /// Where bypass attempts go once the anomaly detector runs.
    anomaly: Arc<std::sync::OnceLock<Arc<warden_core::anomaly::Anomaly>>>,
    /// The daemon's one executable-hash cache (shared with attestation).
    hashes: Arc<ExeHashCache>,
    /// Where events are shipped (`[export]`), if anywhere.
    exporter: Option<Arc<Exporter>>,
}

/// Where every daemon's pin directories live.
pub(crate) const PIN_ROOT: &str = "/sys/fs/bpf/warden";

/// bpffs directory for this data dir's pins: one per data dir, so several
/// daemons on a host (tests, staging beside production) never share state.
/// The name encodes the data dir (`d-<hex of its path>`), so a later start of
/// any daemon can tell an instance whose data dir is gone (see
/// [`release_orphans`]); very long paths fall back to a hash (`h-…`), which is
/// never collected.
pub fn pin_dir_for(data_dir: &Path) -> PathBuf {
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let bytes = canonical.as_os_str().as_encoded_bytes();
    let name = if bytes.len() <= 120 {
        format!("d-{}", hex::encode(bytes))
    } else {
        format!("h-{}", &warden_core::crypto::sha256_hex(bytes)[..16])
    };
    PathBuf::from(PIN_ROOT).join(name)
}

/// The data dir a pin directory name stands for (`d-` names only).
fn data_dir_of_pin(name: &str) -> Option<PathBuf> {
    let hex_path = name.strip_prefix("d-")?;
    let bytes = hex::decode(hex_path).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    Some(PathBuf::from(text))
}

/// Releases the pins of crashed instances whose data dir no longer exists:
/// nothing can ever start them again, so their enforcement would outlive
/// them forever. Returns the data dirs released.
pub fn release_orphans() -> Vec<PathBuf> {
    let mut released = Vec::new();
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return released;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = data_dir_of_pin(&name) else {
            continue;
        };
        if owner.exists() {
            continue;
        }
        match warden_ebpf::release_pinned(&entry.path()) {
            Ok(()) => released.push(owner),
            Err(e) => tracing::warn!("cannot release orphaned eBPF pins {name}: {e}"),
        }
    }
    released
}

async fn resolve_upstreams(cfg: &Config) -> Vec<(SocketAddr, String)> {
    let mut out = Vec::new();
    for r in &cfg.routes {
        let Ok((host, port)) = r.upstream_host_port() else {
            continue;
        };
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            out.push((SocketAddr::new(ip, port), r.name.clone()));
            continue;
        }
        let lookup = tokio::net::lookup_host(format!("{host}:{port}"));
        let resolved = tokio::time::timeout(Duration::from_secs(5), lookup).await;
        match resolved {
            Ok(Ok(addrs)) => out.extend(addrs.map(|a| (a, r.name.clone()))),
            Ok(Err(e)) => tracing::warn!(
                route = %r.name,
                "monitor: cannot resolve upstream {host}:{port} ({e}); direct connections to it are not watched"
            ),
            Err(_) => tracing::warn!(
                route = %r.name,
                "monitor: resolving upstream {host}:{port} timed out; direct connections to it are not watched"
            ),
        }
    }
    out
}

impl AccessMonitor {
    /// Loads the kernel programs per `[monitor]`; `listeners` are the bound
    /// route addresses (route name, address).
    pub async fn start(
        cfg: &Config,
        data_dir: &Path,
        listeners: Vec<(SocketAddr, String)>,
        metrics: &Metrics,
        hashes: Arc<ExeHashCache>,
        exporter: Option<Arc<Exporter>>,
        hardening: &mut crate::privileges::Hardening,
    ) -> Result<AccessMonitor> {
        let feed = Arc::new(EventFeed::new());
        let procfs = |mode| AccessMonitor {
            mode,
            monitor: None,
            resolver: Arc::new(ProcNetResolver::new()),
            feed: feed.clone(),
            anomaly: Arc::default(),
            hashes: hashes.clone(),
            exporter: exporter.clone(),
        };
        if cfg.monitor.ebpf == EbpfMode::Off {
            tracing::info!("monitor.ebpf = \"off\": attributing connections through /proc; no access events or kernel deny");
            metrics.set_monitor_mode(MonitorMode::Off);
            return Ok(procfs(MonitorMode::Off));
        }
        let upstreams = resolve_upstreams(cfg).await;
        let protect = match cfg.monitor.protect_upstreams {
            ProtectMode::Off => warden_ebpf::ProtectMode::Off,
            ProtectMode::Observe => warden_ebpf::ProtectMode::Observe,
            ProtectMode::Enforce => warden_ebpf::ProtectMode::Enforce,
        };
        // The addresses of routes of these kinds with kernel_relay on: for
        // postgres, redis and mysql the kernel relay's far ends (clients' and
        // upstreams' sockets), for http the local hops joined in the kernel
        // (client ↔ warden, warden ↔ an upstream on this host).
        let with_kernel =
            |addrs: &[(SocketAddr, String)], kinds: &[RouteKind]| -> Vec<SocketAddr> {
                addrs
                    .iter()
                    .filter(|(_, name)| {
                        cfg.routes.iter().any(|r| {
                            r.name == *name && kinds.contains(&r.kind) && r.kernel_relay_on()
                        })
                    })
                    .map(|(a, _)| *a)
                    .collect()
            };
        let relay_kinds = [RouteKind::Postgres, RouteKind::Redis, RouteKind::Mysql];
        let monitor_cfg = MonitorConfig {
            listeners: listeners.iter().map(|(a, _)| *a).collect(),
            upstreams: upstreams.iter().map(|(a, _)| *a).collect(),
            relay_listeners: with_kernel(&listeners, &relay_kinds),
            relay_upstreams: with_kernel(&upstreams, &relay_kinds),
            hop_listeners: with_kernel(&listeners, &[RouteKind::Http]),
            hop_upstreams: with_kernel(&upstreams, &[RouteKind::Http]),
            protect,
            warden_tgid: std::process::id(),
            pin_dir: Some(pin_dir_for(data_dir)),
        };
        if let Some(why) = &hardening.ebpf_unavailable {
            // `required` refused to start earlier (`Hardening::begin`).
            tracing::warn!(
                "eBPF monitor unavailable, falling back to /proc attribution (no access events, no kernel deny{}): {why}",
                if cfg.monitor.protect_upstreams == ProtectMode::Enforce {
                    ", protect_upstreams = \"enforce\" is NOT enforced"
                } else {
                    ""
                }
            );
            metrics.set_monitor_mode(MonitorMode::Procfs);
            return Ok(procfs(MonitorMode::Procfs));
        }
        // Loading runs on the loader thread, the one thread that still holds
        // the capabilities for it (see `privileges`).
        let loaded = hardening
            .with_loader(move || {
                for gone in release_orphans() {
                    tracing::info!(
                        "released the eBPF pins of a crashed warden whose data dir {} no longer exists",
                        gone.display()
                    );
                }
                Monitor::load(&monitor_cfg)
            })
            .await
            .ok_or_else(|| {
                Error::internal("the eBPF loader thread ended before loading the monitor")
            })?;
        match loaded {
            Ok(monitor) => {
                let monitor = Arc::new(monitor);
                let m = metrics.clone();
                let resolver = Arc::new(warden_ebpf::EbpfResolver::new(monitor.clone()).with_observer(
                    move |hit| m.monitor_attributions(if hit { "ebpf" } else { "procfs_fallback" }, 1),
                ));
                tracing::info!(
                    listeners = listeners.len(),
                    upstreams = upstreams.len(),
                    protect_upstreams = %cfg.monitor.protect_upstreams,
                    "eBPF access monitor attached at the root of cgroup v2"
                );
                metrics.set_monitor_mode(MonitorMode::Ebpf);
                let me = AccessMonitor {
                    mode: MonitorMode::Ebpf,
                    resolver,
                    monitor: Some(monitor),
                    feed,
                    anomaly: Arc::default(),
                    hashes,
                    exporter: exporter.clone(),
                };
                me.spawn_consumer(
                    cfg,
                    Destinations {
                        listeners,
                        upstreams,
                    },
                    metrics.clone(),
                );
                Ok(me)
            }
            Err(e) if cfg.monitor.ebpf == EbpfMode::Required => Err(Error::usage(format!(
                "monitor.ebpf = \"required\" but the eBPF monitor cannot load: {e}; fix: {} or set monitor.ebpf = \"auto\"",
                fix_for(&e)
            ))),
            Err(e) => {
                tracing::warn!(
                    "eBPF monitor unavailable, falling back to /proc attribution (no access events, no kernel deny{}): {e}",
                    if cfg.monitor.protect_upstreams == ProtectMode::Enforce {
                        ", protect_upstreams = \"enforce\" is NOT enforced"
                    } else {
                        ""
                    }
                );
                metrics.set_monitor_mode(MonitorMode::Procfs);
                Ok(procfs(MonitorMode::Procfs))
            }
        }
    }

    /// The loaded kernel monitor (None: procfs or off).
    pub fn kernel(&self) -> Option<&Arc<Monitor>> {
        self.monitor.as_ref()
    }

    /// The kernel relay for long PostgreSQL, Redis and MySQL sessions, if the
    /// monitor loaded it (a kernel that refuses it leaves a warning and
    /// user-space relays).
    pub fn kernel_relay(&self) -> Option<Arc<warden_ebpf::KernelRelay>> {
        match self.monitor.as_ref()?.relay() {
            Ok(r) => Some(r.clone()),
            Err(why) => {
                tracing::warn!("eBPF kernel relay unavailable ({why}); PostgreSQL, Redis and MySQL sessions are relayed in user space");
                None
            }
        }
    }

    /// Sends bypass attempts to the anomaly detector from now on.
    pub fn set_anomaly(&self, a: Arc<warden_core::anomaly::Anomaly>) {
        let _ = self.anomaly.set(a);
    }

    /// The resolver routes attribute accepted TCP connections with.
    pub fn resolver(&self) -> Arc<dyn PeerResolver> {
        self.resolver.clone()
    }

    fn spawn_consumer(&self, cfg: &Config, dest: Destinations, metrics: Metrics) {
        let Some(monitor) = self.monitor.clone() else {
            return;
        };
        let Some(reader) = monitor.take_events() else {
            return;
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<(AccessEvent, Option<Arc<str>>)>(ENRICH_QUEUE);
        let m = metrics.clone();
        // Reader: counts every event, queues it for enrichment, never blocks.
        tokio::spawn(async move {
            let mut named = EarlyNames::default();
            let res = reader
                .run(|ev| {
                    m.monitor_event(event_kind(ev.kind), event_verdict(ev.verdict));
                    if ev.verdict.is_denied() {
                        m.monitor_connect_denied();
                    }
                    if ev.verdict.is_bypass() {
                        m.monitor_bypass_attempt();
                    }
                    // Short-lived clients (and refused ones) exit quickly:
                    // name the executable now, before the queue.
                    let exe = named.exe(&ev);
                    if tx.try_send((ev, exe)).is_err() {
                        m.monitor_events_dropped();
                    }
                })
                .await;
            if let Err(e) = res {
                tracing::error!("eBPF event reader stopped: {e}");
            }
        });
        // Kernel counters (lost events, joined hops) into the metrics.
        let km = monitor.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let (mut seen_lost, mut seen_hops) = (0u64, 0u64);
            loop {
                tick.tick().await;
                let c = km.counters();
                if c.hops > seen_hops {
                    m.monitor_kernel_hops(c.hops - seen_hops);
                    seen_hops = c.hops;
                }
                if c.lost > seen_lost {
                    tracing::warn!(
                        lost = c.lost - seen_lost,
                        "eBPF ring buffer full: access events were lost"
                    );
                    m.monitor_events_lost(c.lost - seen_lost);
                    seen_lost = c.lost;
                }
            }
        });
        let registrations: Vec<Registration> =
            cfg.workloads.iter().map(|w| w.registration()).collect();
        let feed = self.feed.clone();
        let hashes = self.hashes.clone();
        tokio::spawn(enrich(
            rx,
            registrations,
            dest,
            feed,
            self.anomaly.clone(),
            hashes,
            self.exporter.clone().filter(|e| e.wants_events()),
        ));
    }

    /// Clean stop: detaches the programs and removes their pins.
    pub fn shutdown(&self) {
        if let Some(monitor) = &self.monitor {
            monitor.shutdown();
            tracing::info!("eBPF monitor detached (clean stop: enforcement released)");
        }
    }
}

fn event_kind(k: warden_ebpf::EventKind) -> MonitorEventKind {
    match k {
        warden_ebpf::EventKind::Connect => MonitorEventKind::Connect,
        warden_ebpf::EventKind::Attributed => MonitorEventKind::Attributed,
    }
}

fn event_verdict(v: warden_ebpf::Verdict) -> MonitorVerdict {
    match v {
        warden_ebpf::Verdict::Allowed => MonitorVerdict::Allowed,
        warden_ebpf::Verdict::DeniedFrozen => MonitorVerdict::DeniedFrozen,
        warden_ebpf::Verdict::BypassAllowed => MonitorVerdict::BypassObserved,
        warden_ebpf::Verdict::BypassDenied => MonitorVerdict::BypassDenied,
    }
}

fn fix_for(e: &MonitorError) -> &'static str {
    match e {
        MonitorError::NotPermitted { .. } => {
            "run warden as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        }
        MonitorError::NoCgroup2 => "mount cgroup v2",
        MonitorError::Unsupported { .. } => "use Linux 5.8 or newer",
        MonitorError::Other(_) => "see the reason above",
    }
}

/// Adds what user space knows (exe, cgroup, unit, workload, ancestry),
/// publishes, and hands the event to the exporter (a non-blocking queue).
async fn enrich(
    mut rx: tokio::sync::mpsc::Receiver<(AccessEvent, Option<Arc<str>>)>,
    registrations: Vec<Registration>,
    dest: Destinations,
    feed: Arc<EventFeed>,
    anomaly: Arc<std::sync::OnceLock<Arc<warden_core::anomaly::Anomaly>>>,
    hashes: Arc<ExeHashCache>,
    exporter: Option<Arc<Exporter>>,
) {
    let mut recent = RecentFacts::default();
    let mut ancestry = AncestryCache::default();
    let mut described: std::collections::HashMap<(DestKind, SocketAddr), Arc<str>> =
        std::collections::HashMap::new();
    let me = std::process::id();
    while let Some((ev, early_exe)) = rx.recv().await {
        let key = EnrichKey {
            tgid: ev.process.tgid,
            uid: ev.process.uid,
            gid: ev.process.gid,
            cgroup_id: ev.process.cgroup_id,
            exe: early_exe.clone(),
        };
        // A bypass attempt feeds the anomaly detector: always read afresh.
        let reuse = (!ev.verdict.is_bypass())
            .then(|| recent.get(&key))
            .flatten();
        let who = match reuse {
            Some(hit) => hit,
            None => {
                let facts = warden_identity::attest::gather_facts(ev.process.tgid, &hashes).ok();
                let workload = facts.as_ref().and_then(|f| {
                    warden_identity::attest::attest(f, &registrations)
                        .ok()
                        .map(|r| Arc::from(r.name.as_str()))
                });
                let shared = |s: Option<&String>| s.map(|s| Arc::from(s.as_str()));
                let chain = match &facts {
                    Some(f) => ancestry.get(ev.process.tgid, f.start_time),
                    None => Arc::new([]),
                };
                let container = facts
                    .as_ref()
                    .and_then(|f| f.cgroup.as_deref())
                    .and_then(crate::ancestry::container_id)
                    .map(Arc::from);
                let who = Arc::new(Enriched {
                    exe: facts
                        .as_ref()
                        .and_then(|f| f.exe_path.as_ref())
                        .map(|p| Arc::from(p.display().to_string()))
                        .or(early_exe),
                    cgroup: shared(facts.as_ref().and_then(|f| f.cgroup.as_ref())),
                    unit: shared(facts.as_ref().and_then(|f| f.systemd_unit.as_ref())),
                    workload,
                    ancestry: chain,
                    container,
                });
                recent.put(key, who.clone());
                who
            }
        };
        if ev.verdict.is_bypass() {
            if let Some(a) = anomaly.get() {
                a.bypass(
                    who.workload.as_deref(),
                    ev.process.tgid,
                    ev.process.cgroup_id,
                );
            }
        }
        if described.len() >= RecentFacts::MAX {
            described.clear();
        }
        let destination = described
            .entry((ev.dest_kind, ev.dest))
            .or_insert_with(|| Arc::from(dest.describe(ev.dest_kind, ev.dest)))
            .clone();
        let event = FeedEvent {
            time: time::OffsetDateTime::now_utc(),
            is_warden: ev.process.tgid == me,
            who,
            destination,
            ev,
        };
        if let Some(x) = &exporter {
            if let Ok(json) = serde_json::to_string(&event.record()) {
                let key = match event.who.workload.as_deref() {
                    Some(w) => RateKey::Workload(w),
                    None => RateKey::Uid(event.ev.process.uid),
                };
                x.event(key, json);
            }
        }
        feed.publish(event);
    }
}

/// The executable path the reader reads for each event as it arrives (a
/// refused process may be gone a moment later). A process that keeps
/// connecting is named once per [`EarlyNames::TTL`] while the kernel
/// reports the same comm for it (an exec changes comm); refused and bypass
/// events are always read afresh. Display only, like [`RecentFacts`].
type EarlyName = ([u8; 16], Option<Arc<str>>, std::time::Instant);

#[derive(Default)]
struct EarlyNames {
    /// tgid → (comm, exe, when read).
    recent: std::collections::HashMap<u32, EarlyName>,
}

impl EarlyNames {
    const TTL: std::time::Duration = std::time::Duration::from_secs(2);
    const MAX: usize = 1024;

    fn exe(&mut self, ev: &AccessEvent) -> Option<Arc<str>> {
        let (tgid, comm) = (ev.process.tgid, ev.process.comm);
        let plain = !ev.verdict.is_denied() && !ev.verdict.is_bypass();
        if plain {
            if let Some((c, exe, at)) = self.recent.get(&tgid) {
                if *c == comm && at.elapsed() < Self::TTL {
                    return exe.clone();
                }
            }
        }
        let exe = std::fs::read_link(format!("/proc/{tgid}/exe"))
            .ok()
            .map(|p| Arc::from(p.display().to_string()));
        if self.recent.len() >= Self::MAX {
            self.recent.retain(|_, (_, _, at)| at.elapsed() < Self::TTL);
            if self.recent.len() >= Self::MAX {
                self.recent.clear();
            }
        }
        self.recent
            .insert(tgid, (comm, exe.clone(), std::time::Instant::now()));
        exe
    }
}

/// What identifies the process of an event for [`RecentFacts`]: the kernel's
/// view at connect time (tgid, uid, gid, cgroup) and the executable path
/// read when the event arrived.
#[derive(PartialEq, Eq)]
struct EnrichKey {
    tgid: u32,
    uid: u32,
    gid: u32,
    cgroup_id: u64,
    exe: Option<Arc<str>>,
}

/// The enrichment of recent events, reused for the next events of the same
/// process (a connection gives a connect and an attribution event, and a
/// client that reconnects gives many) while the kernel reports the same
/// uid, gid and cgroup and the executable path is unchanged, for at most
/// [`RecentFacts::TTL`]. It only names processes in the event feed; route
/// attestation never uses it.
#[derive(Default)]
struct RecentFacts {
    map: std::collections::HashMap<u32, (EnrichKey, std::time::Instant, Arc<Enriched>)>,
}

impl RecentFacts {
    const TTL: Duration = Duration::from_secs(2);
    const MAX: usize = 4096;

    fn get(&self, key: &EnrichKey) -> Option<Arc<Enriched>> {
        let (k, at, who) = self.map.get(&key.tgid)?;
        (k == key && at.elapsed() < Self::TTL).then(|| who.clone())
    }

    fn put(&mut self, key: EnrichKey, who: Arc<Enriched>) {
        if self.map.len() >= Self::MAX {
            self.map.retain(|_, (_, at, _)| at.elapsed() < Self::TTL);
            if self.map.len() >= Self::MAX {
                self.map.clear();
            }
        }
        self.map
            .insert(key.tgid, (key, std::time::Instant::now(), who));
    }
}

/// `warden events` output, one line per event (`wide`: the ancestry with
/// full paths and pids instead of file names).
pub fn format_event_line(e: &EventRecord, wide: bool) -> String {
    let who = match (&e.workload, e.is_warden) {
        (_, true) => "warden itself".to_string(),
        (Some(w), false) => format!("workload {w}"),
        (None, false) => "no workload".to_string(),
    };
    let via = if e.ancestry.is_empty() {
        String::new()
    } else {
        format!("  via {}", crate::ancestry::compact(&e.ancestry, wide))
    };
    let place = match (&e.unit, &e.container) {
        (_, Some(c)) => format!("container {}", &c[..c.len().min(12)]),
        (Some(u), None) => u.clone(),
        (None, None) => e.cgroup.clone().unwrap_or_else(|| "-".into()),
    };
    format!(
        "{}  {:<15} {:<10} pid {:<7} uid {:<5} {:<28} {:<16} -> {} ({})  [{}]{via}",
        e.time,
        e.verdict,
        e.kind,
        e.pid,
        e.uid,
        e.exe
            .as_deref()
            .map(str::to_string)
            .unwrap_or_else(|| format!("?({})", e.comm)),
        who,
        e.destination,
        e.address,
        place,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrichment_is_reused_only_for_the_same_kernel_view_and_exe() {
        let key = |tgid, uid, cgroup_id, exe: &str| EnrichKey {
            tgid,
            uid,
            gid: 0,
            cgroup_id,
            exe: Some(Arc::from(exe)),
        };
        let named = |w: &str| {
            Arc::new(Enriched {
                workload: Some(Arc::from(w)),
                ..Enriched::default()
            })
        };
        let mut recent = RecentFacts::default();
        assert!(recent.get(&key(7, 1000, 5, "/usr/bin/psql")).is_none());
        recent.put(key(7, 1000, 5, "/usr/bin/psql"), named("reports"));
        let who = recent.get(&key(7, 1000, 5, "/usr/bin/psql")).unwrap();
        assert_eq!(who.workload.as_deref(), Some("reports"));
        // Another uid, cgroup or executable for the same pid: read afresh.
        assert!(recent.get(&key(7, 0, 5, "/usr/bin/psql")).is_none());
        assert!(recent.get(&key(7, 1000, 6, "/usr/bin/psql")).is_none());
        assert!(recent.get(&key(7, 1000, 5, "/usr/bin/curl")).is_none());
        // A full table starts over instead of growing.
        for tgid in 100..(100 + RecentFacts::MAX as u32 + 10) {
            recent.put(key(tgid, 0, 1, "/x"), Arc::default());
        }
        assert!(recent.map.len() <= RecentFacts::MAX);
    }

    fn event(pid: u32) -> AccessEvent {
        AccessEvent {
            kind: warden_ebpf::EventKind::Connect,
            verdict: warden_ebpf::Verdict::Allowed,
            dest_kind: DestKind::Listener,
            process: warden_ebpf::ProcessInfo {
                pid,
                tgid: pid,
                uid: 1000,
                gid: 1000,
                cgroup_id: 1,
                ktime_ns: 0,
                comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
            },
            dest: "127.0.0.1:15432".parse().expect("addr"),
            source: None,
            family: 4,
        }
    }

    #[test]
    fn feed_numbers_events_for_the_shipper() {
        use warden_core::fleet_views::EventSource;
        let feed = EventFeed::new();
        let who = Arc::new(Enriched::default());
        assert!(feed.since(0, 10).is_empty());
        for i in 0..(RECENT_EVENTS + 5) {
            feed.publish(FeedEvent {
                time: time::OffsetDateTime::now_utc(),
                ev: event(i as u32),
                who: who.clone(),
                destination: Arc::from("route orders-db"),
                is_warden: false,
            });
        }
        // The oldest kept is number 6: asking from 0 starts there.
        let got = feed.since(0, 3);
        assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![6, 7, 8]);
        let got = feed.since(RECENT_EVENTS as u64 + 3, 10);
        assert_eq!(
            got.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![RECENT_EVENTS as u64 + 4, RECENT_EVENTS as u64 + 5]
        );
        let record: EventRecord = serde_json::from_str(&got[1].2).unwrap();
        assert_eq!(record.destination, "route orders-db");
        assert!(feed.since(RECENT_EVENTS as u64 + 5, 10).is_empty());
    }

    #[test]
    fn feed_keeps_the_most_recent_events() {
        let feed = EventFeed::new();
        let who = Arc::new(Enriched {
            exe: Some(Arc::from("/usr/bin/psql")),
            workload: Some(Arc::from("reports")),
            ..Enriched::default()
        });
        for i in 0..(RECENT_EVENTS + 10) {
            feed.publish(FeedEvent {
                time: time::OffsetDateTime::now_utc(),
                ev: event(i as u32),
                who: who.clone(),
                destination: Arc::from("route orders-db"),
                is_warden: false,
            });
        }
        let last = feed.recent(3);
        assert_eq!(
            last.iter().map(|e| e.pid).collect::<Vec<_>>(),
            vec![
                RECENT_EVENTS as u32 + 7,
                RECENT_EVENTS as u32 + 8,
                RECENT_EVENTS as u32 + 9
            ]
        );
        let e = &last[0];
        assert_eq!(e.exe.as_deref(), Some("/usr/bin/psql"));
        assert_eq!(e.workload.as_deref(), Some("reports"));
        assert_eq!(e.destination, "route orders-db");
        assert_eq!(e.address, "127.0.0.1:15432");
        assert_eq!(e.comm, "psql");
        assert_eq!(
            (e.kind.as_str(), e.verdict.as_str()),
            ("connect", "allowed")
        );
        assert_eq!(feed.recent(usize::MAX).len(), RECENT_EVENTS);
    }

    #[test]
    fn event_lines_show_the_ancestry_and_the_container() {
        let who = Arc::new(Enriched {
            exe: Some(Arc::from("/usr/bin/psql")),
            workload: Some(Arc::from("reports")),
            unit: Some(Arc::from("reports.service")),
            ancestry: vec![
                Ancestor {
                    pid: 40,
                    exe: Some("/usr/bin/bash".into()),
                },
                Ancestor {
                    pid: 1,
                    exe: Some("/usr/lib/systemd/systemd".into()),
                },
            ]
            .into(),
            ..Enriched::default()
        });
        let e = FeedEvent {
            time: time::OffsetDateTime::now_utc(),
            ev: event(41),
            who,
            destination: Arc::from("route orders-db"),
            is_warden: false,
        }
        .record();
        let line = format_event_line(&e, false);
        assert!(
            line.contains("[reports.service]  via bash ← systemd"),
            "{line}"
        );
        let wide = format_event_line(&e, true);
        assert!(
            wide.ends_with("via /usr/bin/bash[40] ← /usr/lib/systemd/systemd[1]"),
            "{wide}"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["ancestry"][0]["pid"], 40);
        let mut boxed = e.clone();
        boxed.container = Some("a".repeat(64));
        assert!(format_event_line(&boxed, false).contains("[container aaaaaaaaaaaa]"));
        // Older daemons' records (no ancestry) still parse.
        let old: EventRecord = serde_json::from_str(
            r#"{"time":"t","pid":1,"tid":1,"uid":0,"gid":0,"exe":null,"cgroup":null,"unit":null,"workload":null,"kind":"connect","destination":"other","address":"1.2.3.4:5","verdict":"allowed","comm":"x"}"#,
        )
        .unwrap();
        assert!(old.ancestry.is_empty());
    }

    #[test]
    fn destinations_name_routes_and_wildcards() {
        let d = Destinations {
            listeners: vec![("0.0.0.0:15432".parse().expect("addr"), "orders-db".into())],
            upstreams: vec![("10.0.0.5:5432".parse().expect("addr"), "orders-db".into())],
        };
        assert_eq!(
            d.describe(DestKind::Listener, "127.0.0.1:15432".parse().expect("addr")),
            "route orders-db"
        );
        assert_eq!(
            d.describe(DestKind::Upstream, "10.0.0.5:5432".parse().expect("addr")),
            "upstream of route orders-db"
        );
        assert_eq!(
            d.describe(DestKind::Upstream, "10.0.0.6:5432".parse().expect("addr")),
            "a protected upstream"
        );
    }

    #[test]
    fn pin_dirs_differ_per_data_dir_and_name_it() {
        let a = pin_dir_for(Path::new("/var/lib/warden-a"));
        let b = pin_dir_for(Path::new("/var/lib/warden-b"));
        assert_ne!(a, b);
        assert!(a.starts_with("/sys/fs/bpf/warden"));
        let name = a.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert_eq!(
            data_dir_of_pin(name),
            Some(PathBuf::from("/var/lib/warden-a"))
        );
        let long = format!("/{}", "x".repeat(300));
        let h = pin_dir_for(Path::new(&long));
        let hname = h.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(hname.starts_with("h-"), "{hname}");
        assert_eq!(
            data_dir_of_pin(hname),
            None,
            "hashed names are never collected"
        );
        assert_eq!(data_dir_of_pin("d-zz"), None);
    }
}
