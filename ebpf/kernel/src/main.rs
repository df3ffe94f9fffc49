//! warden's kernel programs.
//!
//! - `warden_sock_ops` (`sock_ops`, `TCP_CONNECT_CB`): for connections to a
//!   warden listener, records `(client address, client port) → process` in
//!   `ATTRIBUTION` so the proxy can name the process behind an accepted socket,
//!   and emits an `EVENT_ATTRIBUTED` event.
//! - `warden_connect4` / `warden_connect6` (`cgroup/connect4`, `connect6`):
//!   deny (EPERM) every connect of a frozen tgid or cgroup; report connects to
//!   warden listeners and to protected upstreams; report or deny (by
//!   `protect_upstreams`) connects to protected upstreams from anything but
//!   the warden daemon. v4-mapped IPv6 destinations are normalised, so
//!   `connect6` to `::ffff:127.0.0.1` is matched exactly like `connect4`.
//!
//! - `warden_direct` (`sk_msg` on `DIRECT_SOCKS`): the kernel relay of a
//!   spliced PostgreSQL, MySQL or Redis session whose client and upstream are both on this
//!   host. `warden_sock_ops` enters those far-end sockets at establishment;
//!   a send on one of a spliced pair goes straight into the other's receive
//!   queue, up to `DIRECT_WINDOW` bytes ahead of the receiver's next send,
//!   then for good through the TCP path (warden's sockets, flow-controlled).
//!   A spliced MySQL client's sends (`GUARD_MYSQL`) go one packet at a time,
//!   and the direction takes the TCP path before a `COM_CHANGE_USER`, which
//!   warden refuses there (`mysql_guarded`).
//!   The same program joins warden's own local hops on routes that ask for
//!   it (`HOP_LISTENER`, `HOP_UPSTREAM`): a client's socket and warden's
//!   accepted socket, warden's upstream socket and the upstream's accepted
//!   socket. `warden_sock_ops` pairs the two ends of such a connection when
//!   the second one is established, unless the first already sent (then that
//!   direction keeps the TCP path for good, so bytes never overtake each
//!   other); sends then go straight into the other end's receive queue, up
//!   to `HOP_WINDOW` bytes ahead of its next send. warden still reads and
//!   writes every byte; only the loopback TCP/IP path is skipped.
//!
//! - `warden_exec` / `warden_exit` (`raw_tp/sched_process_exec`,
//!   `sched_process_exit`): `EXECS` holds, per tgid, the CLOCK_BOOTTIME time
//!   of its last exec (removed when the thread-group leader exits). User
//!   space compares it with an attribution entry's connect time: a process
//!   that exec'd after it connected is refused — the program speaking on the
//!   connection may not be the one that opened it. An exec that cannot be
//!   recorded sets `EXEC_LOST[EXEC_LOST_AT]`, and every connection opened
//!   before that moment is refused as well (fail closed). Both programs
//!   also count each exec and leader exit in the tgid's bucket of
//!   `CHANGES`, which the daemon maps read-only: an attestation it keeps is
//!   reused, with no system call, only while that count is unchanged.
//!
//! Every pid and tgid recorded or compared is the one the daemon's PID
//! namespace sees (`CONFIG_PIDNS_*`, `current_ids`); a process outside it
//! is tgid 0 and gets no attribution entry and no exec record.
//!
//! Events go to a ring buffer submitted without waking the consumer unless a
//! quarter of the ring is unread, the event is a refusal or a bypass, or the
//! consumer said it sleeps (`READER_ASLEEP`, after an idle spell); otherwise
//! the consumer drains on a short timer. Events
//! that do not fit are counted in `COUNTERS[COUNTER_LOST]`.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write in
// `core::sync::atomic`; the intrinsic compiles to the BPF atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::bindings::bpf_pidns_info;
use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::bindings::sk_msg_md;
use aya_ebpf::bindings::{BPF_F_INGRESS, BPF_NOEXIST};
use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC};
use aya_ebpf::bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::generated::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_ns_current_pid_tgid,
    bpf_ktime_get_boot_ns, bpf_msg_apply_bytes, bpf_msg_pull_data, bpf_probe_read_kernel,
    bpf_skc_to_tcp_sock,
};
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid};
use aya_ebpf::macros::{cgroup_sock_addr, map, raw_tracepoint, sk_msg, sock_ops};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SockHash};
use aya_ebpf::programs::{RawTracePointContext, SkMsgContext, SockAddrContext, SockOpsContext};
use warden_ebpf_common::{
    DirectPeer, Event, FrozenEntry, ProcessInfo, RedisName, SockKey, SockPair, ARM_CLIENT,
    ARM_COUNT, ARM_FAILED, ARM_HOLD, ARM_NONE, ATTRIBUTION_ENTRIES, CHANGE_BUCKETS, CONFIG_LEN,
    CONFIG_PIDNS_DEV, CONFIG_PIDNS_INO, CONFIG_PROTECT_MODE, CONFIG_WARDEN_TGID,
    COUNTER_ATTRIBUTED, COUNTER_DENIED, COUNTER_EMITTED, COUNTER_EXEC_LOST, COUNTER_HOPS,
    COUNTER_LEN, COUNTER_LOST, DEST_LISTENER, DEST_NONE, DEST_UPSTREAM, DIRECT_SOCKETS,
    DIRECT_WINDOW, EVENT_ATTRIBUTED, EVENT_CONNECT, EXEC_ENTRIES, EXEC_LOST_AT, FROZEN_ENTRIES,
    GUARD_MYSQL, GUARD_REDIS, HOP_LISTENER, HOP_UPSTREAM, HOP_WINDOW, MEMBER_HOP, MEMBER_RELAY,
    MYSQL_COM_CHANGE_USER, MYSQL_MAX_PAYLOAD, PROTECT_ENFORCE, PROTECT_OBSERVE,
    REDIS_NAMES_ENTRIES, REDIS_NAME_MAX, RELAY_JOIN_ENTRIES, RELAY_LISTENER, RELAY_SOCKETS,
    RELAY_UPSTREAM, RING_BYTES, RING_WAKEUP_BYTES, VERDICT_ALLOWED, VERDICT_BYPASS_ALLOWED,
    VERDICT_BYPASS_DENIED, VERDICT_DENIED_FROZEN, WARDEN_UPSTREAM_ENTRIES, WATCHED_ENTRIES,
};

/// `BPF_SOCK_OPS_TCP_CONNECT_CB`.
const SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB`: a connect completed (client side).
const SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`: a connection accepted (server side).
const SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
/// `BPF_SOCK_OPS_STATE_CB`: a TCP state change (enabled per socket).
const SOCK_OPS_STATE_CB: u32 = 10;
/// `BPF_SOCK_OPS_STATE_CB_FLAG`.
const STATE_CB_FLAG: i32 = 4;
/// TCP states (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// How many ancestor levels of the caller's cgroup are checked against
/// `FROZEN_CGROUPS` (a frozen cgroup freezes its descendants too).
const CGROUP_ANCESTOR_LEVELS: i32 = 8;

/// Verdict returned by cgroup/connect programs: 1 lets `connect()` go on.
const CONNECT_ALLOW: i32 = 1;
/// 0 makes `connect()` fail with EPERM.
const CONNECT_DENY: i32 = 0;

#[map]
static WATCHED: HashMap<SockKey, u8> = HashMap::with_max_entries(WATCHED_ENTRIES, 0);
#[map]
static ATTRIBUTION: LruHashMap<SockKey, ProcessInfo> =
    LruHashMap::with_max_entries(ATTRIBUTION_ENTRIES, 0);
#[map]
static FROZEN_TGIDS: HashMap<u32, FrozenEntry> = HashMap::with_max_entries(FROZEN_ENTRIES, 0);
#[map]
static FROZEN_CGROUPS: HashMap<u64, FrozenEntry> = HashMap::with_max_entries(FROZEN_ENTRIES, 0);
#[map]
static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_LEN, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_LEN, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
/// `[0]` non-zero: the event reader sleeps until woken (it stopped its
/// drain timer after an idle spell), so every event wakes it.
#[map]
static READER_ASLEEP: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static DIRECT_SOCKS: SockHash<SockPair> = SockHash::with_max_entries(DIRECT_SOCKETS, 0);
#[map]
static DIRECT_PEERS: HashMap<SockPair, DirectPeer> = HashMap::with_max_entries(RELAY_SOCKETS, 0);
/// Listeners and upstreams of routes with the kernel relay (`RELAY_*`
/// flags) or joined local hops (`HOP_*`); only their connections' sockets
/// enter `DIRECT_SOCKS`.
#[map]
static RELAY_ADDRS: HashMap<SockKey, u8> = HashMap::with_max_entries(WATCHED_ENTRIES, 0);
/// The connections whose socket is in `DIRECT_SOCKS` (a sockhash cannot be
/// looked up from user space or from `sk_msg`), valued `MEMBER_RELAY` or
/// `MEMBER_HOP`: entered with it, removed when the socket reaches
/// `TCP_CLOSE` (a hop end: as soon as its own side closes).
#[map]
static DIRECT_MEMBERS: HashMap<SockPair, u8> = HashMap::with_max_entries(DIRECT_SOCKETS, 0);
/// Far ends user space asks `warden_join` to enter into `DIRECT_SOCKS`
/// (a client's socket to a kernel-relay listener, at the hand-over).
#[map]
static RELAY_JOIN: HashMap<SockPair, u8> = HashMap::with_max_entries(RELAY_JOIN_ENTRIES, 0);
/// tgid → CLOCK_BOOTTIME ns of its last exec since the monitor attached.
#[map]
static EXECS: HashMap<u32, u64> = HashMap::with_max_entries(EXEC_ENTRIES, BPF_F_NO_PREALLOC);
/// `[EXEC_LOST_AT]`: when an exec last could not be recorded (0: never).
#[map]
static EXEC_LOST: Array<u64> = Array::with_max_entries(1, 0);
/// Per tgid bucket (`CHANGE_BUCKETS`), a count of execs and leader exits,
/// mapped read-only into the daemon: a kept attestation stays good while its
/// bucket's count is unchanged.
#[map]
static CHANGES: Array<u64> = Array::with_max_entries(CHANGE_BUCKETS, BPF_F_MMAPABLE);
#[map]
static WARDEN_UPSTREAM: LruHashMap<SockKey, u8> =
    LruHashMap::with_max_entries(WARDEN_UPSTREAM_ENTRIES, 0);
/// The command names of Redis routes' `deny_commands` / `allow_commands`
/// (`DirectPeer::names`), for `GUARD_REDIS`.
#[map]
static REDIS_NAMES: HashMap<RedisName, u8> = HashMap::with_max_entries(REDIS_NAMES_ENTRIES, 0);
/// `[0]`: `warden_redis`, `[1]`: `warden_redis_listed`, tail-called by
/// `warden_direct` for a `GUARD_REDIS` direction.
#[map]
static REDIS_GUARDS: ProgramArray = ProgramArray::with_max_entries(2, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program
        // runs (programs are not preempted on their CPU).
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// The current task's (pid, tgid) as the daemon's PID namespace sees them
/// (`CONFIG_PIDNS_*`), or the kernel's own when that is not configured;
/// (0, 0) for a task outside that namespace.
#[inline(always)]
fn current_ids() -> (u32, u32) {
    let ino = config(CONFIG_PIDNS_INO);
    if ino == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        return (pid_tgid as u32, (pid_tgid >> 32) as u32);
    }
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `ns` is a valid bpf_pidns_info of the size passed.
    let rc = unsafe {
        bpf_get_ns_current_pid_tgid(
            config(CONFIG_PIDNS_DEV),
            ino,
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    if rc != 0 {
        return (0, 0);
    }
    (ns.pid, ns.tgid)
}

#[inline(always)]
fn current_process() -> ProcessInfo {
    let (pid, tgid) = current_ids();
    let uid_gid = bpf_get_current_uid_gid();
    ProcessInfo {
        pid,
        tgid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: helper without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: as above.
        ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Class of a destination: exact `(address, port)` first, then the any-address
/// entry for the port (listeners on `0.0.0.0`/`::`).
#[inline(always)]
fn destination_kind(dest: &SockKey) -> u8 {
    class_in(&WATCHED, dest)
}

/// `RELAY_*` class of a destination, looked up like [`destination_kind`].
#[inline(always)]
fn relay_kind(dest: &SockKey) -> u8 {
    class_in(&RELAY_ADDRS, dest)
}

#[inline(always)]
fn class_in(map: &HashMap<SockKey, u8>, dest: &SockKey) -> u8 {
    if let Some(kind) = map.get_ptr(dest) {
        // SAFETY: values are plain u8 written only by user space.
        return unsafe { *kind };
    }
    let any = SockKey {
        addr: [0; 16],
        port_be: dest.port_be,
        _pad: [0; 2],
    };
    match map.get_ptr(&any) {
        // SAFETY: as above.
        Some(kind) => unsafe { *kind },
        None => DEST_NONE,
    }
}

#[inline(always)]
fn is_frozen(process: &ProcessInfo) -> bool {
    if FROZEN_TGIDS.get_ptr(&process.tgid).is_some() {
        return true;
    }
    if FROZEN_CGROUPS.get_ptr(&process.cgroup_id).is_some() {
        return true;
    }
    let mut level = 1;
    while level <= CGROUP_ANCESTOR_LEVELS {
        // SAFETY: helper without pointer arguments; returns 0 past the
        // caller's own level.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 {
            break;
        }
        if FROZEN_CGROUPS.get_ptr(&ancestor).is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// Submits `event`. Denials and bypass attempts wake the reader at once
/// (they are rare, and user space must read `/proc/PID/exe` before a refused
/// process exits); everything else waits for the reader's timer unless the
/// ring is filling up.
#[inline(always)]
fn emit(event: Event) {
    let urgent = event.verdict != VERDICT_ALLOWED;
    let asleep = READER_ASLEEP.get(0).copied().unwrap_or(0) != 0;
    let flags = if urgent || asleep || EVENTS.query(0) >= RING_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64;
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(event);
            slot.submit(flags);
            count(COUNTER_EMITTED);
        }
        None => count(COUNTER_LOST),
    }
}

#[inline(always)]
fn addr_from_v4(ip4_raw: u32) -> [u8; 16] {
    let b = ip4_raw.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
fn addr_from_v6(ip6_raw: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = ip6_raw[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// Decides a connect to `dest` (a v4-mapped or IPv6 `SockKey`).
#[inline(always)]
fn decide_connect(dest: SockKey, family: u8) -> i32 {
    let process = current_process();
    let dest_kind = destination_kind(&dest);
    let (verdict, allow) = if is_frozen(&process) {
        (VERDICT_DENIED_FROZEN, false)
    } else if dest_kind == DEST_UPSTREAM && u64::from(process.tgid) != config(CONFIG_WARDEN_TGID) {
        match config(CONFIG_PROTECT_MODE) {
            PROTECT_ENFORCE => (VERDICT_BYPASS_DENIED, false),
            PROTECT_OBSERVE => (VERDICT_BYPASS_ALLOWED, true),
            _ => (VERDICT_ALLOWED, true),
        }
    } else {
        (VERDICT_ALLOWED, true)
    };
    if dest_kind != DEST_NONE || !allow {
        emit(Event {
            process,
            dest,
            source: SockKey::default(),
            kind: EVENT_CONNECT,
            verdict,
            dest_kind,
            family,
            _pad: [0; 4],
        });
    }
    if allow {
        CONNECT_ALLOW
    } else {
        count(COUNTER_DENIED);
        CONNECT_DENY
    }
}

#[cgroup_sock_addr(connect4)]
pub fn warden_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa = ctx.sock_addr;
    let (ip4, port) = unsafe {
        (
            core::ptr::read_volatile(&(*sa).user_ip4),
            core::ptr::read_volatile(&(*sa).user_port),
        )
    };
    let dest = SockKey {
        addr: addr_from_v4(ip4),
        port_be: port as u16,
        _pad: [0; 2],
    };
    decide_connect(dest, 4)
}

#[cgroup_sock_addr(connect6)]
pub fn warden_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa = ctx.sock_addr;
    let (ip6, port) = unsafe {
        (
            [
                core::ptr::read_volatile(&(*sa).user_ip6[0]),
                core::ptr::read_volatile(&(*sa).user_ip6[1]),
                core::ptr::read_volatile(&(*sa).user_ip6[2]),
                core::ptr::read_volatile(&(*sa).user_ip6[3]),
            ],
            core::ptr::read_volatile(&(*sa).user_port),
        )
    };
    // A v4-mapped destination is already in SockKey's canonical form.
    let dest = SockKey {
        addr: addr_from_v6(ip6),
        port_be: port as u16,
        _pad: [0; 2],
    };
    decide_connect(dest, 6)
}

#[sock_ops]
pub fn warden_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != SOCK_OPS_TCP_CONNECT_CB
        && op != SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != SOCK_OPS_STATE_CB
    {
        return 1;
    }
    let new_state = if op == SOCK_OPS_STATE_CB {
        ctx.arg(1)
    } else {
        0
    };
    // Every context field is read once, up front, with a plain load at its
    // own offset: the verifier rejects loads through a computed ctx pointer,
    // which the optimiser produces when it merges per-family branches.
    let ops = ctx.ops;
    // SAFETY: the kernel passes a valid bpf_sock_ops; volatile keeps each
    // field a separate ctx load.
    let (family, remote4, local4, remote6, local6, remote_port_raw, local_port_raw) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).remote_ip4),
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).remote_port),
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let (remote, local, fam) = if family == AF_INET {
        (addr_from_v4(remote4), addr_from_v4(local4), 4)
    } else if family == AF_INET6 {
        (addr_from_v6(remote6), addr_from_v6(local6), 6)
    } else {
        return 1;
    };
    // remote_port holds the network-order port in its upper half on
    // little-endian; local_port is in host order.
    let remote_port = u32::from_be(remote_port_raw) as u16;
    let local_port = local_port_raw as u16;
    let dest = SockKey {
        addr: remote,
        port_be: remote_port.to_be(),
        _pad: [0; 2],
    };
    let source = SockKey {
        addr: local,
        port_be: local_port.to_be(),
        _pad: [0; 2],
    };
    if op == SOCK_OPS_STATE_CB {
        // Only members asked for state callbacks.
        let key = SockPair {
            local: source,
            remote: dest,
        };
        let hop = is_hop_member(&key);
        // A hop end leaves as soon as its own side closes (FIN_WAIT1,
        // LAST_ACK, …): from then on its peer's sends take the TCP path, so
        // a socket its application closed answers them with a reset, as
        // TCP does, instead of queueing them unread. A spliced session's
        // far end stays until TCP_CLOSE (user space watches its end).
        let leaving = if hop {
            new_state != TCP_ESTABLISHED && new_state != TCP_CLOSE_WAIT
        } else {
            new_state == TCP_CLOSE
        };
        if leaving {
            let _ = DIRECT_MEMBERS.remove(&key);
            // A hop's entries are the kernel's to remove (a spliced
            // session's belong to user space, which unpairs them).
            if hop {
                let _ = DIRECT_PEERS.remove(&key);
            }
        }
        return 1;
    }
    let kind = destination_kind(&dest);
    if op == SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let member = if op == SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            // A client's socket to a kernel-relay listener is not entered
            // here: most sessions are short, and a member pays on every
            // send and at close. `warden_join` enters it at the hand-over.
            let to = relay_kind(&dest);
            if to & HOP_LISTENER != 0 || warden_upstream(&source) & HOP_UPSTREAM != 0 {
                // A client's socket to a hop listener, or warden's own
                // socket to a hop upstream.
                MEMBER_HOP
            } else {
                0
            }
        } else {
            let from = warden_upstream(&dest);
            if from & RELAY_UPSTREAM != 0 {
                // An upstream's socket accepted from warden (kernel relay).
                MEMBER_RELAY
            } else if from & HOP_UPSTREAM != 0 || relay_kind(&source) & HOP_LISTENER != 0 {
                // The same for a hop upstream, or warden's accepted socket
                // on a hop listener: the second end of a hop.
                MEMBER_HOP
            } else {
                0
            }
        };
        if member == 0 {
            return 1;
        }
        let mut key = SockPair {
            local: source,
            remote: dest,
        };
        // SAFETY: the kernel's bpf_sock_ops for this callback.
        if DIRECT_SOCKS
            .update(&mut key, unsafe { &mut *ops }, 0)
            .is_ok()
            && DIRECT_MEMBERS.insert(&key, &member, 0).is_ok()
        {
            let _ = ctx.set_cb_flags(STATE_CB_FLAG);
            if member == MEMBER_HOP && op == SOCK_OPS_PASSIVE_ESTABLISHED_CB {
                join_hop(&key);
            }
        }
        return 1;
    }
    if kind == DEST_UPSTREAM {
        // warden's own connection to a relayed or hop upstream: its
        // accepted end (on this host) may join the direct relay or the hop.
        let flags = relay_kind(&dest) & (RELAY_UPSTREAM | HOP_UPSTREAM);
        if flags != 0 && u64::from(current_ids().1) == config(CONFIG_WARDEN_TGID) {
            let _ = WARDEN_UPSTREAM.insert(&source, &flags, 0);
        }
        return 1;
    }
    if kind != DEST_LISTENER {
        return 1;
    }
    let process = current_process();
    // A process outside the daemon's PID namespace (tgid 0) gets no entry:
    // the daemon could not look at it, so its connection is refused.
    if process.tgid != 0 && ATTRIBUTION.insert(&source, &process, 0).is_ok() {
        count(COUNTER_ATTRIBUTED);
    }
    emit(Event {
        process,
        dest,
        source,
        kind: EVENT_ATTRIBUTED,
        verdict: VERDICT_ALLOWED,
        dest_kind: DEST_LISTENER,
        family: fam,
        _pad: [0; 4],
    });
    1
}

/// `WARDEN_UPSTREAM` flags of warden's own upstream connection from `source`.
#[inline(always)]
fn warden_upstream(source: &SockKey) -> u8 {
    match WARDEN_UPSTREAM.get_ptr(source) {
        // SAFETY: values are plain u8 written only by `warden_sock_ops`.
        Some(flags) => unsafe { *flags },
        None => 0,
    }
}

/// Whether `key`'s socket is in `DIRECT_SOCKS` as one end of a local hop.
#[inline(always)]
fn is_hop_member(key: &SockPair) -> bool {
    // SAFETY: values are plain u8 written only by `warden_sock_ops`.
    DIRECT_MEMBERS
        .get_ptr(key)
        .is_some_and(|m| unsafe { *m } == MEMBER_HOP)
}

/// Pairs a hop socket just established (`key`, the second end: warden's
/// accepted socket, or the upstream's) with the first end (the reversed
/// key), both ways. Every insert is `BPF_NOEXIST`: an end that already
/// sent holds a "TCP for good" mark, which stays, so its bytes never
/// overtake the ones already on the TCP path.
#[inline(always)]
fn join_hop(key: &SockPair) {
    let peer = SockPair {
        local: key.remote,
        remote: key.local,
    };
    if !is_hop_member(&peer) {
        return;
    }
    let mut entry = DirectPeer {
        peer,
        hop: 1,
        ..DirectPeer::default()
    };
    if DIRECT_PEERS
        .insert(key, &entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    count(COUNTER_HOPS);
    entry.peer = *key;
    if DIRECT_PEERS
        .insert(&peer, &entry, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count(COUNTER_HOPS);
    }
}

/// The direct relay: a send on a socket whose connection warden spliced
/// (`DIRECT_PEERS[own connection]`) goes straight into the receive queue of
/// the peer socket (the client's or the upstream's, both on this host), past
/// warden and the loopback TCP hops; a joined hop's send goes into the other
/// end's queue the same way. Sends of every other socket in `DIRECT_SOCKS`
/// pass untouched (a hop end's first one marks it "TCP for good").
/// The connection a message's sending socket belongs to, as that socket
/// sees it (the key of `DIRECT_PEERS`), and the message's size.
#[inline(always)]
fn msg_key(md: *mut sk_msg_md) -> Option<(SockPair, u32)> {
    // SAFETY: the kernel's sk_msg_md; one plain load per field.
    let (family, remote4, local4, remote6, local6, remote_port_raw, local_port_raw, size) = unsafe {
        (
            core::ptr::read_volatile(&(*md).family),
            core::ptr::read_volatile(&(*md).remote_ip4),
            core::ptr::read_volatile(&(*md).local_ip4),
            [
                core::ptr::read_volatile(&(*md).remote_ip6[0]),
                core::ptr::read_volatile(&(*md).remote_ip6[1]),
                core::ptr::read_volatile(&(*md).remote_ip6[2]),
                core::ptr::read_volatile(&(*md).remote_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&(*md).local_ip6[0]),
                core::ptr::read_volatile(&(*md).local_ip6[1]),
                core::ptr::read_volatile(&(*md).local_ip6[2]),
                core::ptr::read_volatile(&(*md).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*md).remote_port),
            core::ptr::read_volatile(&(*md).local_port),
            core::ptr::read_volatile(&(*md).size),
        )
    };
    let (remote, local) = if family == AF_INET {
        (addr_from_v4(remote4), addr_from_v4(local4))
    } else if family == AF_INET6 {
        (addr_from_v6(remote6), addr_from_v6(local6))
    } else {
        return None;
    };
    let key = SockPair {
        local: SockKey {
            addr: local,
            port_be: (local_port_raw as u16).to_be(),
            _pad: [0; 2],
        },
        remote: SockKey {
            addr: remote,
            // Network order in the upper half, as in sock_ops.
            port_be: (u32::from_be(remote_port_raw) as u16).to_be(),
            _pad: [0; 2],
        },
    };
    Some((key, size))
}

#[sk_msg]
pub fn warden_direct(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let Some((key, size)) = msg_key(md) else {
        return SK_PASS;
    };
    let Some(entry) = DIRECT_PEERS.get_ptr_mut(&key) else {
        if is_hop_member(&key) {
            // A hop end sending before the other end joined: this direction
            // takes the TCP path for good (the join leaves the mark alone).
            let mark = DirectPeer {
                tcp: 1,
                hop: 1,
                ..DirectPeer::default()
            };
            if DIRECT_PEERS
                .insert(&key, &mark, u64::from(BPF_NOEXIST))
                .is_err()
            {
                // Joined meanwhile: these bytes still go by TCP, so must
                // every later send.
                if let Some(e) = DIRECT_PEERS.get_ptr_mut(&key) {
                    // SAFETY: a live map value.
                    unsafe { (*e).tcp = 1 };
                }
            }
        }
        return SK_PASS;
    };
    // SAFETY: a live map value. This socket's sends run one at a time (under
    // its lock), and only they write `bytes`, `ahead` and `tcp` of its
    // entry; the peer's sends only clear `ahead` (a heuristic either way).
    let (mut peer_key, ahead, tcp, hop, guard, cont, args, armed) = unsafe {
        (
            (*entry).peer,
            (*entry).ahead,
            (*entry).tcp,
            (*entry).hop,
            (*entry).guard,
            (*entry).cont,
            (*entry).args,
            (*entry).armed,
        )
    };
    if tcp != 0 {
        return SK_PASS;
    }
    if DIRECT_MEMBERS.get_ptr(&peer_key).is_none() {
        // The peer socket closed: the bytes take the TCP path to warden's
        // socket, which forwards them (or sees the session end).
        return SK_PASS;
    }
    if armed != ARM_NONE && !armed_passes(md, entry, &peer_key, armed) {
        return SK_PASS;
    }
    if guard == GUARD_MYSQL {
        return mysql_guarded(&ctx, entry, peer_key, ahead, cont, size);
    }
    if guard == GUARD_REDIS {
        // Its own programs, which the verifier checks on their own (the
        // walk of RESP elements multiplies its paths): `warden_redis`, or
        // `warden_redis_listed` for a route with a command list.
        // SAFETY: a live map value (set at the splice).
        let listed = unsafe { core::ptr::read_volatile(&(*entry).names) } != 0;
        // SAFETY: the helper on the program's own context; it returns only
        // if the slot is empty, and then warden takes the direction.
        unsafe { REDIS_GUARDS.tail_call(&ctx, u32::from(listed)) };
        return guard_to_tcp(entry);
    }
    // Flow control: a receive queue filled this way has no limit, so a
    // receiver that stops reading would pin kernel memory. At most
    // DIRECT_WINDOW bytes go ahead of the peer's next send; past that this
    // direction takes the TCP path (through warden, flow-controlled) for
    // good, which keeps the order: the peer reads what was queued first.
    let next = ahead + u64::from(size);
    let window = if hop != 0 { HOP_WINDOW } else { DIRECT_WINDOW };
    if next > window {
        // SAFETY: as above.
        unsafe { (*entry).tcp = 1 };
        return SK_PASS;
    }
    // SAFETY: as above.
    unsafe {
        (*entry).ahead = next;
        (*entry).bytes += u64::from(size);
    }
    if let Some(back) = DIRECT_PEERS.get_ptr_mut(&peer_key) {
        // SAFETY: as above; the peer has an answer, so it read what it got.
        unsafe { (*back).ahead = 0 };
    }
    DIRECT_SOCKS.redirect_msg(&ctx, &mut peer_key, u64::from(BPF_F_INGRESS)) as u32
}

/// `struct tcp_sock` field offsets (bytes) for the armed checks, set by
/// user space before loading from the kernel's BTF (see `TCP_SOCK_FIELDS`
/// in warden-ebpf-common). In `.rodata`, which the loader freezes, so the
/// verifier knows them as constants and checks each load against the BTF
/// of `struct tcp_sock`. 0: unknown, and every armed check fails safe.
#[unsafe(no_mangle)]
static TCP_SOCK_WRITE_SEQ: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_SND_UNA: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_BYTES_ACKED: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_BYTES_RECEIVED: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_COPIED_SEQ: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SOCK_RCV_NXT: u32 = 0;

/// The sending socket's TCP byte counts: what it has written
/// (`bytes_acked + write_seq - snd_una`; an active opener's `bytes_acked`
/// also counts its SYN), what it has received (`bytes_received`), and
/// whether it has read all it received. None: not a TCP socket, or the
/// offsets are unknown.
#[inline(always)]
fn stream_counts(md: *mut sk_msg_md) -> Option<(u64, u64, bool)> {
    // SAFETY: rodata globals, read as the verifier's constants.
    let off = unsafe {
        [
            core::ptr::read_volatile(&TCP_SOCK_WRITE_SEQ),
            core::ptr::read_volatile(&TCP_SOCK_SND_UNA),
            core::ptr::read_volatile(&TCP_SOCK_BYTES_ACKED),
            core::ptr::read_volatile(&TCP_SOCK_BYTES_RECEIVED),
            core::ptr::read_volatile(&TCP_SOCK_COPIED_SEQ),
            core::ptr::read_volatile(&TCP_SOCK_RCV_NXT),
        ]
    };
    if off[0] == 0 || off[1] == 0 || off[2] == 0 || off[3] == 0 || off[4] == 0 || off[5] == 0 {
        return None;
    }
    // SAFETY: the kernel's sk_msg_md; `sk` is the sending socket.
    let sk = unsafe { core::ptr::read_volatile(&(*md).__bindgen_anon_3.sk) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a helper on the program's own socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    if tp.is_null() {
        return None;
    }
    // SAFETY: a tcp_sock; each offset is a field of the type read (the
    // verifier checks it against the kernel's BTF).
    unsafe {
        let u32_at = |o: u32| core::ptr::read_volatile(tp.add(o as usize).cast::<u32>());
        let u64_at = |o: u32| core::ptr::read_volatile(tp.add(o as usize).cast::<u64>());
        let unacked = u32_at(off[0]).wrapping_sub(u32_at(off[1]));
        let sent = u64_at(off[2]).wrapping_add(u64::from(unacked));
        Some((sent, u64_at(off[3]), u32_at(off[4]) == u32_at(off[5])))
    }
}

/// The check of a splice's first sends (`ARM_*` in warden-ebpf-common):
/// true when this send may be redirected (the entry is then plain);
/// false when it takes the TCP path — for now (`ARM_HOLD`), or for good
/// (a failed check; a client's failure sends the server's direction the
/// TCP path for good too).
#[inline(always)]
fn armed_passes(
    md: *mut sk_msg_md,
    entry: *mut DirectPeer,
    peer_key: &SockPair,
    armed: u8,
) -> bool {
    if armed == ARM_HOLD {
        return false;
    }
    // SAFETY: a live map value (see warden_direct).
    let (expect_sent, expect_recv) = unsafe { ((*entry).expect_sent, (*entry).expect_recv) };
    let ok = match stream_counts(md) {
        Some((sent, received, all_read)) => {
            sent == expect_sent && (armed != ARM_CLIENT || (received == expect_recv && all_read))
        }
        None => false,
    };
    let peer = if armed == ARM_CLIENT {
        DIRECT_PEERS.get_ptr_mut(peer_key)
    } else {
        None
    };
    // SAFETY: live map values; only this check and the server's own sends
    // write the server's `armed` and `tcp` while it is armed.
    unsafe {
        if ok {
            (*entry).armed = ARM_NONE;
        } else {
            (*entry).armed = ARM_FAILED;
            (*entry).tcp = 1;
        }
        if let Some(p) = peer {
            if (*p).armed == ARM_HOLD {
                if ok {
                    (*p).armed = ARM_COUNT;
                } else {
                    (*p).armed = ARM_FAILED;
                    (*p).tcp = 1;
                }
            }
        }
    }
    ok
}

/// A guarded direction takes the TCP path for good from this send on.
#[inline(always)]
fn guard_to_tcp(entry: *mut DirectPeer) -> u32 {
    // SAFETY: a live map value (see warden_direct).
    unsafe { (*entry).tcp = 1 };
    SK_PASS
}

/// A guarded direction's next `total` bytes (one packet or element) go to
/// the peer's receive queue, within the window; `position` records where
/// the walk stands after them. Past the window: the TCP path.
#[inline(always)]
fn guard_redirect(
    ctx: &SkMsgContext,
    entry: *mut DirectPeer,
    mut peer_key: SockPair,
    ahead: u64,
    total: u32,
    position: impl FnOnce(*mut DirectPeer),
) -> u32 {
    let next = ahead + u64::from(total);
    if next > DIRECT_WINDOW {
        return guard_to_tcp(entry);
    }
    // SAFETY: as in warden_direct.
    unsafe {
        (*entry).ahead = next;
        (*entry).bytes += u64::from(total);
    }
    position(entry);
    if let Some(back) = DIRECT_PEERS.get_ptr_mut(&peer_key) {
        // SAFETY: as in warden_direct.
        unsafe { (*back).ahead = 0 };
    }
    // SAFETY: a helper on the program's own context.
    unsafe { bpf_msg_apply_bytes(ctx.msg, total) };
    DIRECT_SOCKS.redirect_msg(ctx, &mut peer_key, u64::from(BPF_F_INGRESS)) as u32
}

/// A `GUARD_MYSQL` direction (a spliced MySQL client): this send starts at
/// a packet boundary — every redirect covers exactly one packet
/// (`bpf_msg_apply_bytes`; the kernel runs no program for the rest of a
/// packet sent later). A packet is redirected whole unless it is a
/// `COM_CHANGE_USER`, would go past the window, or its header (and command
/// byte) is cut by the end of the send:
/// then this direction takes the TCP path for good, starting with that
/// packet, and warden walks it from there (`cont` tells it whether that
/// packet continues a 0xFFFFFF-byte one). So no command reaches the server
/// without having been checked here or by warden.
#[inline(always)]
fn mysql_guarded(
    ctx: &SkMsgContext,
    entry: *mut DirectPeer,
    peer_key: SockPair,
    ahead: u64,
    cont: u8,
    size: u32,
) -> u32 {
    let msg = ctx.msg;
    let to_tcp = || guard_to_tcp(entry);
    // A header (or command byte) cut by the end of the send goes to warden:
    // corking it would lose what follows the packet in the corked bytes
    // (the kernel frees a corked message once its verdict's bytes are
    // sent). Clients write whole packets; one that does not is walked in
    // user space from there.
    if size < 4 {
        return to_tcp();
    }
    let want = if size >= 5 { 5 } else { 4 };
    // SAFETY: as above; makes the first `want` bytes readable in place.
    if unsafe { bpf_msg_pull_data(msg, 0, want, 0) } != 0 {
        return to_tcp();
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 4 > end {
        return to_tcp();
    }
    // SAFETY: bounds checked against data_end just above.
    let h = unsafe { core::ptr::read_unaligned(data as *const [u8; 4]) };
    let len = u32::from(h[0]) | (u32::from(h[1]) << 8) | (u32::from(h[2]) << 16);
    if cont == 0 && h[3] == 0 && len > 0 {
        if size < 5 {
            return to_tcp();
        }
        if data + 5 > end {
            return to_tcp();
        }
        // SAFETY: bounds checked just above.
        let command = unsafe { core::ptr::read_volatile((data + 4) as *const u8) };
        if command == MYSQL_COM_CHANGE_USER {
            return to_tcp();
        }
    }
    guard_redirect(ctx, entry, peer_key, ahead, len + 4, |e| {
        // SAFETY: a live map value (see warden_direct).
        unsafe { (*e).cont = u8::from(len == MYSQL_MAX_PAYLOAD) };
    })
}

/// Bytes a `GUARD_REDIS` run looks at for element headers (a small
/// pipeline's commands fit; one element's header and name need at most
/// 28: `*` + 7 digits + CRLF, `$` + 9 digits + CRLF, 5).
const REDIS_LOOK: usize = 1024;

/// Where a RESP length line ends: `Ok((value, next position))`;
/// `Err(true)`: the bytes end first; `Err(false)`: not canonical (a sign, a
/// leading zero, more than `digits` digits, no CRLF).
#[inline(always)]
fn resp_length(data: usize, end: usize, at: usize, digits: u32) -> Result<(u32, usize), bool> {
    let mut value: u32 = 0;
    let mut pos = at;
    let mut i = 0;
    while i < 11 {
        if pos >= REDIS_LOOK {
            return Err(false);
        }
        let p = data + pos;
        if p + 1 > end {
            return Err(true);
        }
        // SAFETY: bounds checked against data_end just above.
        let b = unsafe { core::ptr::read_volatile(p as *const u8) };
        if b == b'\r' {
            if i == 0 || pos + 1 >= REDIS_LOOK {
                return Err(false);
            }
            let q = data + pos + 1;
            if q + 1 > end {
                return Err(true);
            }
            // SAFETY: as above.
            let lf = unsafe { core::ptr::read_volatile(q as *const u8) };
            return if lf == b'\n' {
                Ok((value, pos + 2))
            } else {
                Err(false)
            };
        }
        if !b.is_ascii_digit() || i == digits || (i == 1 && value == 0) {
            return Err(false);
        }
        value = value * 10 + u32::from(b - b'0');
        pos += 1;
        i += 1;
    }
    Err(false)
}

/// ASCII upper-case letters of eight bytes to lower case, without a
/// branch per byte: bit 7 of `ge_a` / `gt_z` is set in each byte whose low
/// seven bits are at least `A` / past `Z`; bytes with bit 7 set stay.
#[inline(always)]
fn ascii_lower(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let seven = x & !HIGH;
    let ge_a = seven.wrapping_add(0x3f3f_3f3f_3f3f_3f3f);
    let gt_z = seven.wrapping_add(0x2525_2525_2525_2525);
    let upper = (ge_a ^ gt_z) & !x & HIGH;
    x | (upper >> 2)
}

/// The key's name in ASCII lower case, in place.
#[inline(always)]
fn lower_words(key: &mut RedisName) {
    let mut i = 0;
    while i < REDIS_NAME_MAX / 8 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key.name[i * 8..i * 8 + 8]);
        let w = ascii_lower(u64::from_le_bytes(b));
        key.name[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        i += 1;
    }
}

/// Whether the command name of `len` bytes at `body` (within the first
/// `want` bytes of the message, pulled) is the route's command list's to
/// leave to user space (`list`: the list in the low 16 bits, 1 << 16 for
/// an allow list): a deny list's name, a name not in an allow list, or a
/// name not wholly within the bytes looked at.
#[inline(always)]
fn wardens_name(data: usize, body: usize, len: u32, want: usize, list: u32) -> bool {
    // Unlinked copies (a product is a new value to the verifier, a move is
    // not): what the checks below learn about them stays here.
    // SAFETY: a plain load of a local.
    let one: usize = unsafe { core::ptr::read_volatile(&1usize) };
    let (body, len, want) = (body * one, len as usize * one, want * one);
    let allow = list >> 16 != 0;
    let mut key = RedisName {
        list: list as u16,
        ..RedisName::default()
    };
    if len > REDIS_NAME_MAX {
        // Never in a list.
        return allow;
    }
    if body + len > want {
        // Cut by the end of the bytes looked at.
        return true;
    }
    // SAFETY: reads `len` (at most REDIS_NAME_MAX) bytes of the message's
    // linear data, checked to lie within it, into the key's name on the
    // stack (one helper call: a byte loop bounded by the name's length
    // multiplies the verifier's paths).
    let read = unsafe {
        bpf_probe_read_kernel(
            key.name.as_mut_ptr().cast(),
            len as u32,
            (data + body) as *const core::ffi::c_void,
        )
    };
    if read != 0 {
        return true;
    }
    lower_words(&mut key);
    // SAFETY: a lookup whose value is not read.
    let listed = unsafe { REDIS_NAMES.get(&key) }.is_some();
    // A deny list's names and an allow list's others are warden's.
    listed != allow
}

/// `x`, with everything the verifier knows of it forgotten: stored a byte
/// at a time and loaded whole, the stack slot reads as an unknown scalar.
/// Safe wherever the value is checked again before it is used as a bound.
#[inline(always)]
fn forget(x: u64) -> u64 {
    let mut slot = [0u8; 8];
    let bytes = x.to_le_bytes();
    let mut i = 0;
    while i < 8 {
        // SAFETY: a local array, in bounds.
        unsafe { core::ptr::write_volatile(&mut slot[i], bytes[i]) };
        i += 1;
    }
    // SAFETY: a local array of 8 bytes, read as one (unaligned) u64.
    u64::from_le_bytes(unsafe { core::ptr::read_volatile(&slot) })
}

/// Most RESP elements one `GUARD_REDIS` verdict covers (a pipeline's
/// commands go on in one redirect, not one per element).
const REDIS_BATCH: u32 = 32;
/// `REDIS_BATCH` of `warden_redis_listed` (each element's name lookup
/// lengthens verification: 8 is about 470k of the verifier's 1M
/// instructions on kernel 6.18, 12 already 785k).
const REDIS_BATCH_LISTED: u32 = 8;

/// One RESP element at `at`: a command's start (`*<count>` and its first
/// bulk string, whose name must not be `AUTH`, `HELLO` or `RESET`, nor one
/// the route's command list `names` leaves to user space) or a further bulk
/// string. `Some((where it ends, count))`, or `None` when warden must
/// decide: not canonical, a header or name not within the bytes looked at,
/// or one of warden's names.
#[inline(always)]
fn redis_element(
    data: usize,
    end: usize,
    want: usize,
    at: usize,
    start: bool,
    names: u16,
    allow: bool,
) -> Option<(usize, u32)> {
    let mut pos = at;
    let mut count = 0;
    if start {
        if at >= REDIS_LOOK || data + at + 1 > end {
            return None;
        }
        // SAFETY: bounds checked just above.
        if unsafe { core::ptr::read_volatile((data + at) as *const u8) } != b'*' {
            // An inline command (or not RESP).
            return None;
        }
        let (c, next) = resp_length(data, end, at + 1, 7).ok()?;
        if c == 0 {
            return None;
        }
        count = c;
        pos = next;
    }
    if pos >= REDIS_LOOK || data + pos + 1 > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    if unsafe { core::ptr::read_volatile((data + pos) as *const u8) } != b'$' {
        return None;
    }
    let (len, body) = resp_length(data, end, pos + 1, 9).ok()?;
    let len = len as usize;
    if start && (len == 4 || len == 5) {
        let mut name = [0u8; 5];
        let mut i = 0;
        while i < 5 {
            if i < len {
                let p = data + body + i;
                if body + i >= REDIS_LOOK || p + 1 > end {
                    return None;
                }
                // SAFETY: bounds checked just above.
                name[i] = unsafe { core::ptr::read_volatile(p as *const u8) } | 0x20;
            }
            i += 1;
        }
        let name = &name[..len];
        if name == b"auth" || name == b"hello" || name == b"reset" {
            return None;
        }
    }
    if names != 0 && start {
        let list = u32::from(names) | (u32::from(allow) << 16);
        if wardens_name(data, body, len as u32, want, list) {
            return None;
        }
    }
    Some((body + len + 2, count))
}

/// A `GUARD_REDIS` direction (a spliced Redis client): this send starts at
/// a RESP element boundary — every redirect covers whole elements (a
/// command's array header goes with its first bulk string; up to
/// `REDIS_BATCH` elements whose headers lie in the first `REDIS_LOOK`
/// bytes; `bpf_msg_apply_bytes`), so the program runs at element
/// boundaries only. The name of every command is read at its start;
/// `AUTH`, `HELLO` and `RESET`, anything not in canonical form, a header
/// or name cut by the end of the send, and an element that would go past
/// the window send this direction to the TCP path for good, at that
/// boundary (`args` tells warden how many bulk strings of the current
/// command are left). So no command reaches the server without its name
/// having been checked here or by warden.
#[inline(always)]
fn redis_guarded<const LISTED: bool>(
    ctx: &SkMsgContext,
    entry: *mut DirectPeer,
    peer_key: SockPair,
    ahead: u64,
    args: u32,
    size: u32,
) -> u32 {
    // SAFETY: a live map value (see warden_direct); set at the splice.
    let (names, allow) = if LISTED {
        unsafe { ((*entry).names, (*entry).names_allow != 0) }
    } else {
        (0, false)
    };
    let want = (size as usize).min(REDIS_LOOK);
    // SAFETY: a helper on the program's own context; makes the first
    // `want` bytes readable in place.
    if want == 0 || unsafe { bpf_msg_pull_data(ctx.msg, 0, want as u32, 0) } != 0 {
        return guard_to_tcp(entry);
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut left = args;
    let mut total: usize = 0;
    let mut n = 0;
    // A listed route's walk also looks each command's name up: fewer
    // elements per verdict keep its verification short.
    let batch = if LISTED { REDIS_BATCH_LISTED } else { REDIS_BATCH };
    while n < batch && total < want {
        let start = left == 0;
        // An element warden must decide ends the batch; if it is the
        // first, warden takes over here (see mysql_guarded on corking).
        let Some((ends, count)) = redis_element(data, end, want, total, start, names, allow) else {
            break;
        };
        if ahead + ends as u64 > DIRECT_WINDOW {
            // Past the window: this element takes the TCP path, at its
            // own boundary.
            break;
        }
        if start {
            left = count;
        }
        left -= 1;
        // Each element's paths through the length lines (one per digit
        // count) end with other ranges for these two; forgotten here, the
        // next element starts from one state instead of their product.
        total = forget(ends as u64) as usize;
        left = forget(u64::from(left)) as u32;
        n += 1;
    }
    if n == 0 {
        return guard_to_tcp(entry);
    }
    // One verdict covers at most what fits in apply_bytes' u32 (a bulk
    // string is at most 512 MiB).
    let Ok(total) = u32::try_from(total) else {
        return guard_to_tcp(entry);
    };
    guard_redirect(ctx, entry, peer_key, ahead, total, |e| {
        // SAFETY: a live map value (see warden_direct).
        unsafe { (*e).args = left };
    })
}

/// `warden_direct`'s `GUARD_REDIS` (`redis_guarded`), reached by a tail
/// call (`REDIS_GUARDS[0]`) once `warden_direct` has found the entry
/// spliced, its peer open and its armed check passed.
#[sk_msg]
pub fn warden_redis(ctx: SkMsgContext) -> u32 {
    redis_tail::<false>(&ctx)
}

/// `warden_redis` for a route with a command list (`DirectPeer::names`;
/// `REDIS_GUARDS[1]`): every command's name is also looked up in
/// `REDIS_NAMES`, and a verdict covers at most `REDIS_BATCH_LISTED`
/// elements.
#[sk_msg]
pub fn warden_redis_listed(ctx: SkMsgContext) -> u32 {
    redis_tail::<true>(&ctx)
}

#[inline(always)]
fn redis_tail<const LISTED: bool>(ctx: &SkMsgContext) -> u32 {
    let Some((key, size)) = msg_key(ctx.msg) else {
        return SK_PASS;
    };
    // Gone meanwhile (the session ended): the TCP path, to warden's socket.
    let Some(entry) = DIRECT_PEERS.get_ptr_mut(&key) else {
        return SK_PASS;
    };
    // SAFETY: a live map value (see warden_direct).
    let (peer_key, ahead, args) = unsafe { ((*entry).peer, (*entry).ahead, (*entry).args) };
    redis_guarded::<LISTED>(ctx, entry, peer_key, ahead, args, size)
}

/// `bpf_iter__tcp`: the context of an `iter/tcp` program.
#[repr(C)]
struct IterTcp {
    meta: *const core::ffi::c_void,
    sk_common: *const u8,
    uid: u32,
}

/// `struct sock_common` offsets (stable: the 4-tuple, family and state lead
/// the struct; the IPv6 addresses follow two pointers).
const SKC_DADDR: usize = 0;
const SKC_RCV_SADDR: usize = 4;
const SKC_DPORT: usize = 12;
const SKC_NUM: usize = 14;
const SKC_FAMILY: usize = 16;
const SKC_STATE: usize = 18;
const SKC_V6_DADDR: usize = 56;
const SKC_V6_RCV_SADDR: usize = 72;
/// `SOL_TCP`, and `TCP_BPF_SOCK_OPS_CB_FLAGS` for `bpf_setsockopt`.
const SOL_TCP: i32 = 6;
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;

#[inline(always)]
unsafe fn skc_u32(sk: *const u8, off: usize) -> u32 {
    // SAFETY: the caller passes a non-null sock_common and an offset of a
    // 4-byte field in it.
    unsafe { core::ptr::read_volatile(sk.add(off).cast::<u32>()) }
}

#[inline(always)]
unsafe fn skc_v6(sk: *const u8, off: usize) -> [u32; 4] {
    // SAFETY: as for `skc_u32`, on an in6_addr field.
    unsafe {
        [
            skc_u32(sk, off),
            skc_u32(sk, off + 4),
            skc_u32(sk, off + 8),
            skc_u32(sk, off + 12),
        ]
    }
}

/// `iter/tcp`, run by user space on demand: enters the established sockets
/// named in `RELAY_JOIN` (keyed as the socket sees its connection) whose
/// remote end is a `RELAY_LISTENER` into
/// `DIRECT_SOCKS` as `MEMBER_RELAY`, with state callbacks so the entry in
/// `DIRECT_MEMBERS` leaves at `TCP_CLOSE`. The iterator holds the socket's
/// lock (`lock_sock`, kernels ≥ 6.4) while the program runs.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn warden_join(ctx: *mut core::ffi::c_void) -> i32 {
    // SAFETY: the kernel passes a bpf_iter__tcp; sk_common may be null.
    let sk = unsafe { core::ptr::read_volatile(&(*ctx.cast::<IterTcp>()).sk_common) };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: non-null sock_common, fields at their offsets.
    let (family, state) = unsafe {
        (
            core::ptr::read_volatile(sk.add(SKC_FAMILY).cast::<u16>()) as u32,
            core::ptr::read_volatile(sk.add(SKC_STATE)) as u32,
        )
    };
    if state != TCP_ESTABLISHED {
        return 0;
    }
    // SAFETY: as above.
    let (remote, local) = unsafe {
        if family == AF_INET {
            (
                addr_from_v4(skc_u32(sk, SKC_DADDR)),
                addr_from_v4(skc_u32(sk, SKC_RCV_SADDR)),
            )
        } else if family == AF_INET6 {
            (
                addr_from_v6(skc_v6(sk, SKC_V6_DADDR)),
                addr_from_v6(skc_v6(sk, SKC_V6_RCV_SADDR)),
            )
        } else {
            return 0;
        }
    };
    // SAFETY: as above; skc_dport is in network order, skc_num in host order.
    let (dport_be, num) = unsafe {
        (
            core::ptr::read_volatile(sk.add(SKC_DPORT).cast::<u16>()),
            core::ptr::read_volatile(sk.add(SKC_NUM).cast::<u16>()),
        )
    };
    let mut key = SockPair {
        local: SockKey {
            addr: local,
            port_be: num.to_be(),
            _pad: [0; 2],
        },
        remote: SockKey {
            addr: remote,
            port_be: dport_be,
            _pad: [0; 2],
        },
    };
    // SAFETY: a plain u8 value written by user space.
    if unsafe { RELAY_JOIN.get(&key) }.is_none() {
        return 0;
    }
    // Only a client of a kernel-relay listener, whatever user space asks.
    if relay_kind(&key.remote) & RELAY_LISTENER == 0 {
        return 0;
    }
    // SAFETY: the map pointer is DIRECT_SOCKS's definition; the value of a
    // sockhash update from an iterator is the socket itself.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_map_update_elem(
            (&DIRECT_SOCKS as *const SockHash<SockPair>)
                .cast_mut()
                .cast(),
            (&mut key as *mut SockPair).cast(),
            sk.cast(),
            0,
        )
    };
    if rc == 0 && DIRECT_MEMBERS.insert(&key, &MEMBER_RELAY, 0).is_ok() {
        let mut flags: i32 = STATE_CB_FLAG;
        // SAFETY: a full TCP socket (established), an int option.
        let _ = unsafe {
            aya_ebpf::helpers::generated::bpf_setsockopt(
                sk.cast_mut().cast(),
                SOL_TCP,
                TCP_BPF_SOCK_OPS_CB_FLAGS,
                (&mut flags as *mut i32).cast(),
                4,
            )
        };
    }
    0
}

/// A process replaced its program: remember when (see the module docs).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn warden_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = current_ids().1;
    if tgid == 0 {
        // Outside the daemon's PID namespace: never attributed.
        return 0;
    }
    count_change(tgid);
    // SAFETY: helper without pointer arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if EXECS.insert(&tgid, &now, 0).is_err() {
        count(COUNTER_EXEC_LOST);
        if let Some(slot) = EXEC_LOST.get_ptr_mut(EXEC_LOST_AT) {
            // SAFETY: a valid array slot; with racing writers either time
            // fails the older connections closed.
            unsafe { *slot = now };
        }
    }
    0
}

/// The thread-group leader exited: its pid may be reused, drop its record.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn warden_exit(_ctx: RawTracePointContext) -> i32 {
    let (pid, tgid) = current_ids();
    if tgid != 0 && pid == tgid {
        count_change(tgid);
        let _ = EXECS.remove(&tgid);
    }
    0
}

/// Bumps `tgid`'s bucket in `CHANGES` (an atomic add: execs on several
/// CPUs never lose a count).
#[inline(always)]
fn count_change(tgid: u32) {
    if let Some(slot) = CHANGES.get_ptr_mut(tgid & (CHANGE_BUCKETS - 1)) {
        use core::intrinsics::{atomic_xadd, AtomicOrdering};
        // SAFETY: a valid, aligned array slot that lives as long as the map.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
