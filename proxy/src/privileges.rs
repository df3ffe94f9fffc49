//! Process hardening for `warden up`: the capabilities it needs, checked
//! before anything starts and held only as long as they are needed; no core
//! dump of key material; the descriptor limit raised.
//!
//! Linux capabilities belong to a thread, and a thread inherits its
//! creator's. So [`Hardening::begin`] runs first in `daemon::run`, while the
//! main thread is the only one: it starts the *loader* thread, which keeps
//! the capabilities that load and attach the eBPF programs, and then drops
//! them from the main thread. Every thread the daemon starts afterwards
//! (runtime workers, blocking pool, session shards, journals) is created
//! without them; the loader runs the one job it is given (`Monitor::load`)
//! and exits, taking them along. What stays is what the data path needs
//! for as long as it runs (see [`KEPT`]). The table with the reasons is in
//! docs/operations.md ("Capabilities").

use std::sync::mpsc;

use rustix::thread::{CapabilitySet, CapabilitySets};
use warden_core::config::{Config, EbpfMode};
use warden_core::error::{Error, Result};

/// What loading and attaching the eBPF programs needs (start-up only): BPF
/// program and map creation, tracing programs and their helpers
/// (`raw_tp`, `bpf_probe_read`), and the cgroup/sock_ops/sk_msg program
/// types that act on the network stack.
const EBPF: [(CapabilitySet, &str); 3] = [
    (CapabilitySet::BPF, "CAP_BPF"),
    (CapabilitySet::PERFMON, "CAP_PERFMON"),
    (CapabilitySet::NET_ADMIN, "CAP_NET_ADMIN"),
];

/// Kept while the daemon runs: attesting a process of another uid reads its
/// `/proc/PID/exe` (ptrace read access) and, for the `/proc` fallback of TCP
/// attribution, lists its `/proc/PID/fd` (a directory only its owner may
/// search).
const KEPT: [(CapabilitySet, &str); 2] = [
    (CapabilitySet::SYS_PTRACE, "CAP_SYS_PTRACE"),
    (CapabilitySet::DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
];

/// How `warden up` runs with the privileges it was given.
pub struct Hardening {
    /// Runs the eBPF load with the capabilities it needs (None: the monitor
    /// is off or cannot load for want of a capability).
    loader: Option<mpsc::Sender<Job>>,
    /// Why the eBPF monitor cannot load (`monitor.ebpf = "auto"`).
    pub ebpf_unavailable: Option<String>,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

impl Hardening {
    /// Checks the capabilities the configuration needs (an error names each
    /// missing one and what needs it), raises the descriptor limit, makes
    /// the process non-dumpable, starts the eBPF loader and drops the
    /// loader's capabilities from this thread. Call it before the daemon
    /// starts any thread.
    pub fn begin(cfg: &Config) -> Result<Hardening> {
        raise_nofile_limit();
        keep_out_of_core_dumps()?;
        let have = rustix::thread::capabilities(None).map_err(|e| {
            Error::internal(format!("cannot read this process's capabilities: {e}"))
        })?;
        let effective = have.effective;
        check_low_ports(cfg, effective)?;

        let missing_ebpf: Vec<&str> = EBPF
            .iter()
            .filter(|(cap, _)| !holds(effective, *cap))
            .map(|(_, name)| *name)
            .collect();
        let mut ebpf_unavailable = None;
        let want_ebpf = cfg.monitor.ebpf != EbpfMode::Off;
        if want_ebpf && !missing_ebpf.is_empty() {
            let what = format!(
                "loading the eBPF programs needs {} (missing: {})",
                names(&EBPF),
                missing_ebpf.join(", ")
            );
            if cfg.monitor.ebpf == EbpfMode::Required {
                return Err(Error::usage(format!(
                    "monitor.ebpf = \"required\": {what}; fix: run warden as root or grant them \
                     (systemd: AmbientCapabilities={}), or set monitor.ebpf = \"auto\"",
                    names(&EBPF).replace(", ", " ")
                )));
            }
            ebpf_unavailable = Some(what);
        } else if want_ebpf {
            if let Some(problem) = pin_root_problem() {
                if cfg.monitor.ebpf == EbpfMode::Required {
                    return Err(Error::usage(format!(
                        "monitor.ebpf = \"required\": {problem}, or set monitor.ebpf = \"auto\""
                    )));
                }
                ebpf_unavailable = Some(problem);
            }
        }
        if !rustix::process::geteuid().is_root() {
            let missing: Vec<&str> = KEPT
                .iter()
                .filter(|(cap, _)| !holds(effective, *cap))
                .map(|(_, name)| *name)
                .collect();
            if !missing.is_empty() {
                tracing::warn!(
                    "without {} only processes of uid {} can be attested (reading another uid's /proc/PID/exe and /proc/PID/fd needs {})",
                    missing.join(" and "),
                    rustix::process::geteuid().as_raw(),
                    names(&KEPT)
                );
            }
        }

        let loader = if want_ebpf && ebpf_unavailable.is_none() {
            Some(start_loader()?)
        } else {
            None
        };
        drop_startup_capabilities(have)?;
        Ok(Hardening {
            loader,
            ebpf_unavailable,
        })
    }

    /// Runs `job` on the loader thread, the only one that holds the
    /// capabilities to load eBPF programs, and returns its result. The
    /// loader exits afterwards: a second call returns None, as does a call
    /// when no loader was started.
    pub async fn with_loader<T: Send + 'static>(
        &mut self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let loader = self.loader.take()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        loader.send(run).ok()?;
        rx.await.ok()
    }
}

/// Why this process could not pin its eBPF state under
/// `/sys/fs/bpf/warden` (None: it can). A daemon that is not root needs the
/// directory to be its own: nothing in its capability set passes
/// permission checks on files.
fn pin_root_problem() -> Option<String> {
    use rustix::fs::{accessat, Access, AtFlags, CWD};
    let root = std::path::Path::new(crate::access_monitor::PIN_ROOT);
    let (path, what) = if root.exists() {
        (root, "use")
    } else {
        (root.parent()?, "create")
    };
    let writable = accessat(
        CWD,
        path,
        Access::WRITE_OK | Access::EXEC_OK,
        AtFlags::EACCESS,
    );
    let user = rustix::process::geteuid().as_raw();
    writable.err().map(|e| {
        format!(
            "uid {user} cannot {what} the eBPF pin directory {} ({e}); fix: make it this user's \
             (install -d -m 0700 -o {user} {}; the Debian package's tmpfiles.d does this for the warden user)",
            root.display(),
            root.display()
        )
    })
}

/// True if `set` holds `cap` (or `CAP_SYS_ADMIN`, which the kernel accepts
/// in place of `CAP_BPF` and `CAP_PERFMON`).
fn holds(set: CapabilitySet, cap: CapabilitySet) -> bool {
    set.contains(cap)
        || ((cap == CapabilitySet::BPF || cap == CapabilitySet::PERFMON)
            && set.contains(CapabilitySet::SYS_ADMIN))
}

fn names(caps: &[(CapabilitySet, &str)]) -> String {
    caps.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
}

/// The loader thread: runs the one job it is sent, then ends (with it the
/// capabilities only it still holds). Dropping the sender ends it too.
fn start_loader() -> Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("warden-ebpf-load".into())
        .spawn(move || {
            if let Ok(job) = rx.recv() {
                job();
            }
        })
        .map_err(|e| Error::internal(format!("cannot start the eBPF loader thread: {e}")))?;
    Ok(tx)
}

/// Removes the eBPF load capabilities (and `CAP_SYS_ADMIN`, which would
/// stand in for them) from this thread's effective, permitted and
/// inheritable sets and clears its ambient set, so neither the threads it
/// starts nor the programs it executes (rotation `exec` hooks) get them.
fn drop_startup_capabilities(have: CapabilitySets) -> Result<()> {
    let startup = CapabilitySet::BPF
        | CapabilitySet::PERFMON
        | CapabilitySet::NET_ADMIN
        | CapabilitySet::SYS_ADMIN;
    let kept = CapabilitySets {
        effective: have.effective - startup,
        permitted: have.permitted - startup,
        inheritable: CapabilitySet::empty(),
    };
    // The ambient set can only hold what is permitted and inheritable, so
    // the kernel clears it with the inheritable set; clear it explicitly.
    rustix::thread::clear_ambient_capability_set()
        .map_err(|e| Error::internal(format!("cannot clear the ambient capabilities: {e}")))?;
    if kept != have {
        rustix::thread::set_capabilities(None, kept)
            .map_err(|e| Error::internal(format!("cannot drop capabilities: {e}")))?;
    }
    let dropped = names_of(have.permitted & startup);
    let held = if rustix::process::geteuid().is_root() {
        "all but CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN (running as root)".to_string()
    } else if kept.effective.is_empty() {
        "none".to_string()
    } else {
        names_of(kept.effective)
    };
    tracing::info!(
        "capabilities: {held} held while the daemon runs{}",
        if dropped.is_empty() {
            String::new()
        } else {
            format!("; {dropped} only on the eBPF loader thread, which ends after start-up")
        }
    );
    Ok(())
}

/// `CAP_*` names of the capabilities warden knows about in `set`, plus
/// "others" when it holds more.
fn names_of(set: CapabilitySet) -> String {
    const KNOWN: [(CapabilitySet, &str); 7] = [
        (CapabilitySet::BPF, "CAP_BPF"),
        (CapabilitySet::PERFMON, "CAP_PERFMON"),
        (CapabilitySet::NET_ADMIN, "CAP_NET_ADMIN"),
        (CapabilitySet::SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CapabilitySet::SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CapabilitySet::DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
        (CapabilitySet::NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
    ];
    let mut out: Vec<&str> = KNOWN
        .iter()
        .filter(|(c, _)| set.contains(*c))
        .map(|(_, n)| *n)
        .collect();
    let known = KNOWN
        .iter()
        .fold(CapabilitySet::empty(), |a, (c, _)| a | *c);
    if !(set - known).is_empty() {
        out.push("others");
    }
    out.join(", ")
}

/// A listener on a port below `net.ipv4.ip_unprivileged_port_start` needs
/// `CAP_NET_BIND_SERVICE`; refuse to start without it, naming the key.
fn check_low_ports(cfg: &Config, effective: CapabilitySet) -> Result<()> {
    if effective.contains(CapabilitySet::NET_BIND_SERVICE) {
        return Ok(());
    }
    let first_free = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    let mut listens: Vec<(String, std::net::SocketAddr)> = cfg
        .routes
        .iter()
        .map(|r| (format!("route {:?} listen", r.name), r.listen))
        .collect();
    if let Some(m) = cfg.metrics.listen {
        listens.push(("metrics.listen".into(), m));
    }
    for (key, addr) in listens {
        if addr.port() != 0 && addr.port() < first_free {
            return Err(Error::usage(format!(
                "{key} = \"{addr}\": a port below {first_free} needs CAP_NET_BIND_SERVICE, which this process lacks; \
                 fix: grant it (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE) or listen on port {first_free} or above"
            )));
        }
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every client session
/// holds two descriptors, and the common default soft limit of 1,024 runs
/// out long before the host does.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        tracing::info!(
            "open files limit: {}",
            limit.current.map_or("unlimited".into(), |n| n.to_string())
        );
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            "open files limit raised from {} to the hard limit {}",
            limit.current.map_or("unlimited".into(), |n| n.to_string()),
            limit.maximum.map_or("unlimited".into(), |n| n.to_string())
        ),
        Err(e) => tracing::warn!(
            "cannot raise the open files limit from {}: {e}",
            limit.current.map_or("unlimited".into(), |n| n.to_string())
        ),
    }
}

/// Keeps the master key, unwrapped data keys and injected secrets out of
/// core dumps and out of reach of same-uid debuggers: no memory mapping is
/// dumped (`coredump_filter` 0 — one setting that covers every copy, also
/// those inside the crypto library's own allocations, where a per-page
/// `MADV_DONTDUMP` cannot reach), and the process is not dumpable
/// (`PR_SET_DUMPABLE` 0: no core dump with the default
/// `fs.suid_dumpable = 0`, no ptrace attach and no `/proc/PID/mem` or
/// `environ` for processes without `CAP_SYS_PTRACE`). The filter is set
/// first: a non-dumpable process's `/proc/self` files belong to root.
fn keep_out_of_core_dumps() -> Result<()> {
    std::fs::write("/proc/self/coredump_filter", "0").map_err(|e| {
        Error::internal(format!(
            "cannot write /proc/self/coredump_filter (to keep key material out of core dumps): {e}"
        ))
    })?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| Error::internal(format!("cannot set PR_SET_DUMPABLE to 0: {e}")))?;
    Ok(())
}
