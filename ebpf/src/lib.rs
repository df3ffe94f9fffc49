//! User-space side of warden's eBPF access monitor.
//!
//! [`Monitor::load`] loads the kernel programs built from `ebpf/kernel` (the
//! object is embedded: `prebuilt/warden-ebpf.o`, rebuilt and checked against
//! the sources by `cargo xtask ebpf --check`), attaches them at the root of
//! cgroup v2 and fills their maps from a [`MonitorConfig`]:
//!
//! - `sock_ops` records which process opened each TCP connection to a warden
//!   listener; [`EbpfResolver`] answers the proxy's "who is behind this
//!   accepted socket" from that map (with the `/proc` resolver as fallback);
//! - `cgroup/connect4` and `connect6` report connects to listeners and
//!   protected upstreams, report or deny direct connects to protected
//!   upstreams, and deny every connect of a frozen tgid or cgroup
//!   ([`Monitor::freeze_tgid`], [`Monitor::freeze_cgroup`]);
//! - `sk_msg`: the kernel relay ([`KernelRelay`]) moves a spliced
//!   session's bytes between its client's and its upstream's sockets (both
//!   on this host) without user space or loopback TCP, flow-controlled;
//! - events arrive through a ring buffer ([`EventReader`]); kernel-side
//!   counters ([`Monitor::counters`]) say how many were emitted and lost.
//!
//! **Enforcement when the daemon stops** (see ARCHITECTURE.md): with a pin
//! directory, links and the frozen maps are pinned in bpffs, so a crashed
//! daemon leaves its programs enforcing (fail closed: a frozen workload stays
//! frozen, protected upstreams stay protected); the next [`Monitor::load`] with
//! the same pin directory reuses the frozen maps and replaces the links.
//! [`Monitor::shutdown`] (a clean stop) removes the pins, detaching everything.
//!
//! `unsafe` is confined to this folder (kernel ABI: `mount(2)`, `setsockopt`).
#![allow(unsafe_code)]

mod btf;
mod cgroup;
mod events;
mod monitor;
mod relay;
mod resolver;

pub use cgroup::{cgroup2_mount, cgroup_id_of_path, cgroup_id_of_pid};
pub use events::{AccessEvent, DestKind, EventKind, EventReader, Verdict, DRAIN_INTERVAL};
pub use monitor::{
    release_pinned, Counters, ExecSince, Frozen, Monitor, MonitorConfig, MonitorError, ProtectMode,
};
pub use relay::{
    ClientPosition, CommandList, HopStats, JoinState, Joining, KernelRelay, SpliceError, Spliced,
};
pub use resolver::EbpfResolver;
pub use warden_ebpf_common::{ProcessInfo, GUARD_MYSQL, GUARD_NONE, GUARD_REDIS};

/// The kernel object built from `ebpf/kernel` (see the crate docs).
pub const OBJECT: &[u8] = include_bytes!("../prebuilt/warden-ebpf.o");
