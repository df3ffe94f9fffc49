//! The `#[repr(C)]` types warden's kernel programs (`ebpf/kernel`) and their
//! user-space side (`warden-ebpf`) exchange through maps and the ring buffer.
//!
//! Every struct has explicit padding fields so no uninitialised byte crosses
//! the kernel/user boundary, and a size asserted at compile time so both sides
//! agree. Addresses are always 16 bytes in network byte order: IPv4 addresses
//! are stored IPv4-mapped (`::ffff:a.b.c.d`), so `connect4`, `connect6` with a
//! v4-mapped destination, and `sock_ops` all produce the same key for the same
//! peer.
#![no_std]

/// Event kind: a `connect()` seen by `cgroup/connect4` or `connect6`.
pub const EVENT_CONNECT: u8 = 1;
/// Event kind: a TCP connection to a warden listener recorded by `sock_ops`
/// for attribution (the client port is known at this point).
pub const EVENT_ATTRIBUTED: u8 = 2;

/// Verdict: the connect was allowed.
pub const VERDICT_ALLOWED: u8 = 0;
/// Verdict: denied because the caller's tgid or cgroup is frozen.
pub const VERDICT_DENIED_FROZEN: u8 = 1;
/// Verdict: a process other than warden connected to a protected upstream and
/// was let through (`protect_upstreams = "observe"`).
pub const VERDICT_BYPASS_ALLOWED: u8 = 2;
/// Verdict: a process other than warden tried to connect to a protected
/// upstream and was denied (`protect_upstreams = "enforce"`).
pub const VERDICT_BYPASS_DENIED: u8 = 3;

/// Destination class (value of the `WATCHED` map, and `Event::dest_kind`).
pub const DEST_NONE: u8 = 0;
/// A warden listener (a route's `listen` address).
pub const DEST_LISTENER: u8 = 1;
/// A protected upstream (a route's `upstream` address).
pub const DEST_UPSTREAM: u8 = 2;

/// `CONFIG` array index: tgid of the warden daemon (its connects to protected
/// upstreams are never bypasses).
pub const CONFIG_WARDEN_TGID: u32 = 0;
/// `CONFIG` array index: protect mode (`PROTECT_*`).
pub const CONFIG_PROTECT_MODE: u32 = 1;
/// `CONFIG` array indexes: the device (kernel encoding, `MKDEV`) and inode
/// of the daemon's PID namespace (`/proc/self/ns/pid`). When set, every pid
/// and tgid the programs record or compare is the one seen in that
/// namespace (0: a process outside it, which the daemon cannot see), so a
/// daemon in a container names processes as its `/proc` does; 0 and 0: the
/// kernel's own (initial namespace) ids.
pub const CONFIG_PIDNS_DEV: u32 = 2;
pub const CONFIG_PIDNS_INO: u32 = 3;
/// Number of `CONFIG` slots.
pub const CONFIG_LEN: u32 = 4;

/// `protect_upstreams = "off"`: no bypass detection.
pub const PROTECT_OFF: u64 = 0;
/// `protect_upstreams = "observe"`: report bypasses, let them through.
pub const PROTECT_OBSERVE: u64 = 1;
/// `protect_upstreams = "enforce"`: report and deny bypasses.
pub const PROTECT_ENFORCE: u64 = 2;

/// `COUNTERS` (per-CPU array) index: events submitted to the ring buffer.
pub const COUNTER_EMITTED: u32 = 0;
/// `COUNTERS` index: events that did not fit in the ring buffer.
pub const COUNTER_LOST: u32 = 1;
/// `COUNTERS` index: connects denied (frozen or enforced bypass).
pub const COUNTER_DENIED: u32 = 2;
/// `COUNTERS` index: attribution entries written by `sock_ops`.
pub const COUNTER_ATTRIBUTED: u32 = 3;
/// `COUNTERS` index: connection directions of warden's own local hops that
/// the kernel joined socket to socket (see `HOP_LISTENER`).
pub const COUNTER_HOPS: u32 = 4;
/// `COUNTERS` index: execs `warden_exec` could not record in `EXECS`.
pub const COUNTER_EXEC_LOST: u32 = 5;
/// Number of counters.
pub const COUNTER_LEN: u32 = 6;

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 4 << 20;
/// Above this many unread bytes a submit wakes the consumer; below it events
/// are submitted with `BPF_RB_NO_WAKEUP` and drained on a short timer (waking
/// on every event costs ~10 µs per connect on these machines).
pub const RING_WAKEUP_BYTES: u64 = (RING_BYTES as u64) / 4;

/// Capacity of the attribution LRU map.
pub const ATTRIBUTION_ENTRIES: u32 = 65_536;
/// Capacity of `EXECS` (tgid → time of its last exec): the kernel's pid
/// limit (`PID_MAX_LIMIT`), so a live process always has room; entries are
/// allocated on demand (`BPF_F_NO_PREALLOC`) and removed when the process
/// exits.
pub const EXEC_ENTRIES: u32 = 4_194_304;
/// Buckets of `CHANGES`, a power of two: a tgid's bucket is
/// `tgid & (CHANGE_BUCKETS - 1)`. Each counts the execs and the
/// thread-group leader exits of every tgid in it, so an unchanged count
/// proves that none of them exec'd or exited in between (a changed one may
/// be another tgid's: the caller then asks `EXECS`). 512 KiB, mapped into
/// the daemon read-only: the check costs no system call.
pub const CHANGE_BUCKETS: u32 = 65_536;
/// `CONFIG`-like slot in `EXEC_LOST_AT`: CLOCK_BOOTTIME ns of the newest
/// exec `warden_exec` could not record (0: none).
pub const EXEC_LOST_AT: u32 = 0;
/// Capacity of each frozen map.
pub const FROZEN_ENTRIES: u32 = 4_096;
/// Capacity of the watched-destination map.
pub const WATCHED_ENTRIES: u32 = 1_024;

/// Capacity of `DIRECT_PEERS`: sockets of spliced sessions and of joined
/// local hops (two per connection), and the hop sockets' "TCP for good"
/// marks. When it is full, new connections simply take the TCP path.
pub const RELAY_SOCKETS: u32 = 65_536;
/// Bytes a spliced socket may send into its peer's receive queue ahead of
/// the peer's next send (the direct relay's flow control; about what two
/// TCP socket buffers hold).
pub const DIRECT_WINDOW: u64 = 4 << 20;
/// The same window for a joined local hop (warden reads those sockets
/// itself and promptly; a smaller window bounds what an idle or hostile
/// peer can pin in kernel memory to about one default TCP receive buffer).
pub const HOP_WINDOW: u64 = 256 << 10;

/// Capacity of the direct relay's socket map (`DIRECT_SOCKS`): client
/// sockets connected to a warden listener and upstream sockets accepted
/// for warden, on this host.
pub const DIRECT_SOCKETS: u32 = 65_536;
/// Capacity of `RELAY_JOIN` (far ends being entered into `DIRECT_SOCKS` at
/// a hand-over; each entry lives for one iterator run).
pub const RELAY_JOIN_ENTRIES: u32 = 1_024;
/// Capacity of `WARDEN_UPSTREAM` (warden's own upstream connections).
pub const WARDEN_UPSTREAM_ENTRIES: u32 = 65_536;

/// `RELAY_ADDRS` flag: a listener whose clients may be relayed directly
/// (spliced past warden by the kernel relay; `warden_join` enters only
/// their sockets).
pub const RELAY_LISTENER: u8 = 1;
/// `RELAY_ADDRS` flag: an upstream whose accepted sockets may be relayed
/// directly.
pub const RELAY_UPSTREAM: u8 = 2;
/// `RELAY_ADDRS` flag: a listener whose connections are a local hop the
/// kernel joins socket to socket: the client's sends go straight into the
/// receive queue of warden's accepted socket and back, past the loopback
/// TCP/IP path. warden still reads and writes every byte.
pub const HOP_LISTENER: u8 = 4;
/// `RELAY_ADDRS` flag: an upstream on this host whose connections from
/// warden are joined the same way.
pub const HOP_UPSTREAM: u8 = 8;

/// `DIRECT_MEMBERS` value: a far end of a connection the kernel relay may
/// splice (paired by user space).
pub const MEMBER_RELAY: u8 = 1;
/// `DIRECT_MEMBERS` value: one end of a local hop (paired by the kernel
/// when both ends are established, or marked "TCP for good" by its first
/// send if that comes first).
pub const MEMBER_HOP: u8 = 2;

/// A TCP connection as one of its sockets sees it. Key of `DIRECT_SOCKS`
/// and `DIRECT_PEERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockPair {
    pub local: SockKey,
    pub remote: SockKey,
}

/// Where a directly relayed socket's sends go (value of `DIRECT_PEERS`):
/// into the receive queue of `peer`, counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectPeer {
    pub peer: SockPair,
    /// Bytes sent by this socket and redirected.
    pub bytes: u64,
    /// Bytes redirected since the peer last sent.
    pub ahead: u64,
    /// 1: this direction takes the TCP path for good (window exceeded, or
    /// a hop socket that sent before its peer was established).
    pub tcp: u8,
    /// 1: a local hop's entry (made by the kernel, window `HOP_WINDOW`).
    pub hop: u8,
    /// What this direction's sends are checked for before they are
    /// redirected (`GUARD_NONE`, `GUARD_MYSQL`); set by user space at the
    /// splice, for a client's entry.
    pub guard: u8,
    /// `GUARD_MYSQL`: the last packet redirected was 0xFFFFFF bytes long,
    /// so the next one continues it (it carries no command byte). Kept
    /// when the direction takes the TCP path, for user space's walk.
    pub cont: u8,
    /// `GUARD_REDIS`: bulk strings left in the command being redirected (0:
    /// the next send starts a command). Kept when the direction takes the
    /// TCP path, for user space's walk.
    pub args: u32,
    /// A splice's start (`ARM_*`): what this direction's first sends check
    /// before anything is redirected, so that no redirected byte can
    /// overtake one on the TCP path (see `ARM_CLIENT`).
    pub armed: u8,
    /// `GUARD_REDIS`: 1 when `names` is an allow list (a command whose
    /// name is not in it goes to user space), 0 a deny list (a command
    /// whose name is in it does).
    pub names_allow: u8,
    /// `GUARD_REDIS`: the route's command list in `REDIS_NAMES` (0: none,
    /// only `AUTH`, `HELLO` and `RESET` go to user space).
    pub names: u16,
    /// Always zero.
    pub _pad: [u8; 4],
    /// `ARM_CLIENT`, `ARM_COUNT`: the sender's TCP byte count
    /// (`bytes_acked + write_seq - snd_una` of its `tcp_sock`) when it has
    /// sent nothing warden has not read.
    pub expect_sent: u64,
    /// `ARM_CLIENT`: the client's `bytes_received` once every byte warden
    /// wrote to it (the held reply included) has arrived.
    pub expect_recv: u64,
}

/// `DirectPeer::armed`: redirected as the entry says.
pub const ARM_NONE: u8 = 0;
/// `DirectPeer::armed`, a client's entry at a splice: its first send is
/// redirected only if the client has sent nothing warden has not read
/// (`expect_sent`) and has read every byte warden wrote to it
/// (`expect_recv`, all received read). Then the server's entry goes from
/// `ARM_HOLD` to `ARM_COUNT`. Otherwise both directions take the TCP path
/// for good (warden relays them in order, as before the splice). A
/// client that pipelines, or sends before it has read the reply warden
/// held back for the hand-over, so never has a byte redirected ahead of
/// one still on the TCP path, in either direction.
pub const ARM_CLIENT: u8 = 1;
/// `DirectPeer::armed`, a server's entry at a splice: its sends take the
/// TCP path (not for good) until the client's first send passes its check.
pub const ARM_HOLD: u8 = 2;
/// `DirectPeer::armed`, a server's entry once the client's check passed:
/// its first send is redirected only if the server has sent nothing warden
/// has not read (`expect_sent`); otherwise this direction takes the TCP
/// path for good.
pub const ARM_COUNT: u8 = 3;
/// `DirectPeer::armed` after a failed check (with `tcp` set): this
/// direction never had a byte redirected.
pub const ARM_FAILED: u8 = 4;

/// The `struct tcp_sock` fields the armed checks read, by name: user
/// space finds their byte offsets in the kernel's BTF and sets the
/// program's `.rodata` globals of these names before loading (constants to
/// the verifier). An offset left at 0 fails every armed check safe.
pub const TCP_SOCK_FIELDS: [(&str, &str); 6] = [
    ("TCP_SOCK_WRITE_SEQ", "write_seq"),
    ("TCP_SOCK_SND_UNA", "snd_una"),
    ("TCP_SOCK_BYTES_ACKED", "bytes_acked"),
    ("TCP_SOCK_BYTES_RECEIVED", "bytes_received"),
    ("TCP_SOCK_COPIED_SEQ", "copied_seq"),
    ("TCP_SOCK_RCV_NXT", "rcv_nxt"),
];

/// `DirectPeer::guard`: sends are redirected as they come.
pub const GUARD_NONE: u8 = 0;
/// `DirectPeer::guard`: a MySQL client's sends are redirected one packet
/// at a time (`bpf_msg_apply_bytes`), and the direction takes the TCP path
/// for good, at a packet boundary, before a command warden must see
/// (`COM_CHANGE_USER`: a packet with sequence id 0, not continuing a
/// 0xFFFFFF-byte one, whose first byte is 0x11) or a packet that would go
/// past the window. User space walks the TCP path from that boundary.
pub const GUARD_MYSQL: u8 = 1;
/// `DirectPeer::guard`: a Redis client's sends are redirected one RESP
/// element at a time (the array header goes with the command's name), and
/// the direction takes the TCP path for good, at an element boundary,
/// before an `AUTH`, `HELLO` or `RESET` (case-insensitive), a command the
/// route's command list leaves to user space (`DirectPeer::names`), a send that is
/// not in the canonical form (`*<digits>\r\n`, `$<digits>\r\n`: an inline
/// command, a sign, a leading zero), or an element that would go past the
/// window. User space walks the TCP path from that boundary (`args`).
pub const GUARD_REDIS: u8 = 2;
/// Longest command name a `GUARD_REDIS` direction looks up in
/// `REDIS_NAMES` (Redis' longest, `GEORADIUSBYMEMBER_RO`, has 20 bytes); a
/// multiple of 8. A longer name is never in a list.
pub const REDIS_NAME_MAX: usize = 24;
/// Size of `REDIS_NAMES`: names of all routes' command lists.
pub const REDIS_NAMES_ENTRIES: u32 = 16_384;

/// Key of `REDIS_NAMES`: one command name (ASCII lower case, zero-padded)
/// of one route's command list (`DirectPeer::names`). The value is 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RedisName {
    pub list: u16,
    /// Always zero.
    pub _pad: [u8; 2],
    pub name: [u8; REDIS_NAME_MAX],
}

/// `COM_CHANGE_USER`, the command a `GUARD_MYSQL` direction hands to user
/// space.
pub const MYSQL_COM_CHANGE_USER: u8 = 0x11;
/// A MySQL packet of this many payload bytes is continued by the next.
pub const MYSQL_MAX_PAYLOAD: u32 = 0xFF_FFFF;

/// A socket address: 16-byte address (v4 stored v4-mapped) and a port, both in
/// network byte order. Key of `WATCHED` and `ATTRIBUTION`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// IPv6 address, or `::ffff:a.b.c.d`; all zero = any address (`WATCHED`
    /// wildcard entries for listeners bound to `0.0.0.0`/`::`).
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port_be: u16,
    /// Always zero.
    pub _pad: [u8; 2],
}

/// What `sock_ops` records about the process that opened a connection to a
/// warden listener. Value of `ATTRIBUTION`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Thread id of the connecting thread.
    pub pid: u32,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Real uid (as `bpf_get_current_uid_gid` reports it).
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns` at connect (CLOCK_BOOTTIME, the clock of
    /// `/proc/PID/stat` start times, so pid reuse can be detected).
    pub ktime_ns: u64,
    /// Task comm, NUL padded (informational only, never used for identity).
    pub comm: [u8; 16],
}

/// One event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The process.
    pub process: ProcessInfo,
    /// Destination of the connect.
    pub dest: SockKey,
    /// Source address and port (`EVENT_ATTRIBUTED` only; zero otherwise).
    pub source: SockKey,
    /// `EVENT_*`.
    pub kind: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `DEST_*`.
    pub dest_kind: u8,
    /// 4 or 6: the address family of the socket.
    pub family: u8,
    /// Always zero.
    pub _pad: [u8; 4],
}

/// A frozen cgroup or tgid (value of the frozen maps; the key is the id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrozenEntry {
    /// Seconds since the epoch when the freeze was set (user space fills it).
    pub since_unix: u64,
}

const _: () = assert!(core::mem::size_of::<SockKey>() == 20);
const _: () = assert!(core::mem::size_of::<ProcessInfo>() == 48);
const _: () = assert!(core::mem::size_of::<Event>() == 96);
const _: () = assert!(core::mem::size_of::<FrozenEntry>() == 8);
const _: () = assert!(core::mem::size_of::<SockPair>() == 40);
const _: () = assert!(core::mem::size_of::<DirectPeer>() == 88);
const _: () = assert!(core::mem::size_of::<RedisName>() == 28);

impl SockKey {
    /// An IPv4 address, stored v4-mapped.
    pub const fn v4(octets: [u8; 4], port: u16) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        Self {
            addr,
            port_be: port.to_be(),
            _pad: [0; 2],
        }
    }

    /// An IPv6 address (v4-mapped addresses are already in canonical form).
    pub const fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port_be: port.to_be(),
            _pad: [0; 2],
        }
    }

    /// The port in host byte order.
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit
    // padding fields: every bit pattern is valid and there are no implicit
    // padding bytes (sizes are asserted above).
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ProcessInfo {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::FrozenEntry {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SockPair {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::DirectPeer {}
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::RedisName {}
}
