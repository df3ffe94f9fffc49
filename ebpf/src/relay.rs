//! The kernel relay for PostgreSQL, MySQL and Redis sessions whose client and
//! upstream are both on this host: `warden_direct` (an `sk_msg` program on
//! `DIRECT_SOCKS`) moves what one far end sends straight into the other's
//! receive queue, past warden and both loopback TCP hops.
//!
//! `warden_sock_ops` enters upstream sockets accepted from warden for relay
//! upstreams when their connections are established (pooled, they serve
//! many sessions). A client's socket is entered only when its session is
//! handed over: [`KernelRelay::join`] names it in `RELAY_JOIN` and runs
//! `warden_join` (an `iter/tcp` program) once over the host's TCP sockets,
//! so the many short sessions never pay for membership (a member's every
//! send runs `warden_direct`, and leaving the map at close costs too). The
//! walk takes milliseconds on a busy host, so [`KernelRelay::join`] runs it
//! on a blocking thread and the session is spliced at a later quiet moment.
//! `DIRECT_MEMBERS` records which sockets are in. [`KernelRelay::splice`]
//! then pairs the two for one session; the
//! [`Spliced`] it returns reads the kernel's byte counts and unpairs them
//! when dropped. Warden's own two sockets stay ordinary: they carry the
//! connections' ends and whatever takes the TCP path — a send whose peer
//! is gone, and a direction that went more than `DIRECT_WINDOW` bytes ahead
//! of its receiver's next send (the relay's flow control: a receive queue
//! filled this way has no limit of its own) — which user space forwards.
//! A guarded client direction (`GUARD_MYSQL`, `GUARD_REDIS`, [`KernelRelay::splice`]'s
//! `guard`) also takes the TCP path before a command warden must answer
//! itself, at a packet boundary, and user space checks what arrives there
//! the same way.
//!
//! The caller provides a quiet moment (see `proxy/postgres/src/relay.rs`
//! and `proxy/redis/src/relay.rs`): both
//! of warden's receive queues empty and the client waiting for an answer
//! warden still holds.

use std::io;
use std::io::Read as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, ProgramArray, SockHash};
use aya::programs::{Iter, SkMsg};
use aya::Ebpf;
use warden_ebpf_common::{
    DirectPeer, RedisName, SockPair, ARM_CLIENT, ARM_FAILED, ARM_HOLD, MEMBER_RELAY, REDIS_NAME_MAX,
};

use crate::events::sock_key_of;

/// The loaded relay program and its maps.
pub struct KernelRelay {
    // Owns the map the program is attached to.
    _socks: SockHash<MapData, SockPair>,
    members: HashMap<MapData, SockPair, u8>,
    peers: Mutex<HashMap<MapData, SockPair, DirectPeer>>,
    join: Mutex<Joiner>,
    /// Redis routes' command lists (`GUARD_REDIS` with `DirectPeer::names`).
    names: Mutex<HashMap<MapData, RedisName, u8>>,
    /// Holds `warden_redis` and `warden_redis_listed` in their slots: the
    /// kernel empties a program array when its last user-space handle
    /// closes.
    _guards: ProgramArray<MapData>,
}

/// `warden_join`'s link and its request map: one run at a time.
struct Joiner {
    wanted: HashMap<MapData, SockPair, u8>,
    link: OwnedFd,
}

/// The kernel whose TCP iterator runs programs under `lock_sock` (before
/// 6.4 it held the socket's spinlock, which a sockhash update takes too).
const JOIN_MIN_KERNEL: (u32, u32) = (6, 4);

/// `bpf(2)`: commands and attach type used here.
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u32; 16]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed bpf_attr prefix large enough for both
    // commands; the kernel reads `size_of_val(attr)` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The running kernel's (major, minor), from `uname`.
fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl Joiner {
    fn load(ebpf: &mut Ebpf, wanted: HashMap<MapData, SockPair, u8>) -> Result<Joiner, String> {
        let version = kernel_version().ok_or("the kernel version is unknown")?;
        if version < JOIN_MIN_KERNEL {
            return Err(format!(
                "kernel {}.{} is older than {}.{} (its TCP iterator cannot enter sockets into a sockhash safely)",
                version.0, version.1, JOIN_MIN_KERNEL.0, JOIN_MIN_KERNEL.1
            ));
        }
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        let program: &mut Iter = ebpf
            .program_mut("warden_join")
            .ok_or("program warden_join missing")?
            .try_into()
            .map_err(|e| format!("warden_join: {e}"))?;
        program
            .load("tcp", &btf)
            .map_err(|e| format!("loading warden_join: {e}"))?;
        let prog = program
            .fd()
            .map_err(|e| format!("warden_join: {e}"))?
            .as_fd()
            .as_raw_fd();
        let mut attr = [0u32; 16];
        attr[0] = prog as u32;
        attr[2] = BPF_TRACE_ITER;
        let link =
            sys_bpf(BPF_LINK_CREATE, &mut attr).map_err(|e| format!("linking warden_join: {e}"))?;
        Ok(Joiner { wanted, link })
    }

    /// Runs `warden_join` over the host's TCP sockets for `key`.
    fn join(&mut self, key: &SockPair) -> io::Result<()> {
        self.wanted
            .insert(key, MEMBER_RELAY, 0)
            .map_err(|e| map_error("RELAY_JOIN", e))?;
        let run = (|| {
            let mut attr = [0u32; 16];
            attr[0] = self.link.as_raw_fd() as u32;
            let iter = sys_bpf(BPF_ITER_CREATE, &mut attr)?;
            // The program prints nothing: reading to the end runs it once
            // over every socket.
            let mut out = std::fs::File::from(iter);
            let mut sink = [0u8; 64];
            while out.read(&mut sink)? > 0 {}
            Ok(())
        })();
        let _ = self.wanted.remove(key);
        run
    }
}

/// Where a guarded client direction stood when it took the TCP path
/// ([`Spliced::client_position`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientPosition {
    /// `GUARD_MYSQL`: the first packet continues a 0xFFFFFF-byte one.
    pub continues: bool,
    /// `GUARD_REDIS`: bulk strings of the current command still to come.
    pub args: u32,
}

/// A client connection and an upstream connection relayed far end to far
/// end by `warden_direct` until this is dropped.
pub struct Spliced {
    relay: Arc<KernelRelay>,
    client: SockPair,
    upstream: SockPair,
}

/// A connection as its far end sees it (its local address is our peer
/// address): the key of `DIRECT_SOCKS` and `DIRECT_MEMBERS`.
fn far_end(s: &tokio::net::TcpStream) -> io::Result<SockPair> {
    Ok(SockPair {
        local: sock_key_of(s.peer_addr()?),
        remote: sock_key_of(s.local_addr()?),
    })
}

const JOIN_PENDING: u8 = 0;
const JOIN_DONE: u8 = 1;
const JOIN_FAILED: u8 = 2;

/// A client's socket on its way into the relay's map ([`KernelRelay::join`]).
#[derive(Debug)]
pub struct Joining {
    state: Arc<AtomicU8>,
}

/// Where a [`Joining`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinState {
    /// The walk has not finished.
    Pending,
    /// The socket is in the map: it can be spliced.
    Joined,
    /// It could not be entered (closed meanwhile, not a relay listener's
    /// client, or the kernel refused).
    Failed,
}

impl Joining {
    pub fn state(&self) -> JoinState {
        match self.state.load(Ordering::Acquire) {
            JOIN_PENDING => JoinState::Pending,
            JOIN_DONE => JoinState::Joined,
            _ => JoinState::Failed,
        }
    }
}

/// A socket queue's byte count: `FIONREAD` (`SIOCINQ`, received and not
/// yet read) or `TIOCOUTQ` (`SIOCOUTQ`, written and not yet acknowledged).
fn queue_bytes(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one c_int through the pointer; `fd` is live.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Bytes in a socket's receive queue not yet read.
fn queued(fd: BorrowedFd<'_>) -> io::Result<u64> {
    queue_bytes(fd, libc::FIONREAD)
}

/// `(bytes_received, bytes_acked)` of one of warden's TCP sockets
/// (`TCP_INFO`): data bytes its peer sent it, and data bytes it sent that
/// its peer acknowledged.
fn tcp_totals(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above; `fd` is live.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<libc::tcp_info>() {
        return Err(io::Error::other("TCP_INFO without byte counters"));
    }
    Ok((info.tcpi_bytes_received, info.tcpi_bytes_acked))
}

/// Bytes written to `fd` that its peer has not acknowledged.
fn unacked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    queue_bytes(fd, libc::TIOCOUTQ)
}

/// Why [`KernelRelay::splice`] did not splice.
#[derive(Debug)]
pub enum SpliceError {
    /// One of warden's receive queues holds unread bytes: not a quiet
    /// moment (nothing was changed; try at a later one).
    Busy,
    /// Not possible for this pair (a far end not on this host or not a
    /// relay route's, or the kernel refused).
    Failed(io::Error),
}

impl std::fmt::Display for SpliceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpliceError::Busy => f.write_str("unread bytes in a receive queue"),
            SpliceError::Failed(e) => write!(f, "{e}"),
        }
    }
}

fn map_error(what: &str, e: aya::maps::MapError) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl KernelRelay {
    /// Loads `warden_direct` from `ebpf` and attaches it to `DIRECT_SOCKS`.
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<KernelRelay, String> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("map {name} missing"))
        };
        let socks: SockHash<MapData, SockPair> =
            SockHash::try_from(take("DIRECT_SOCKS")?).map_err(|e| format!("DIRECT_SOCKS: {e}"))?;
        let peers: HashMap<MapData, SockPair, DirectPeer> =
            HashMap::try_from(take("DIRECT_PEERS")?).map_err(|e| format!("DIRECT_PEERS: {e}"))?;
        let members: HashMap<MapData, SockPair, u8> = HashMap::try_from(take("DIRECT_MEMBERS")?)
            .map_err(|e| format!("DIRECT_MEMBERS: {e}"))?;
        let wanted: HashMap<MapData, SockPair, u8> =
            HashMap::try_from(take("RELAY_JOIN")?).map_err(|e| format!("RELAY_JOIN: {e}"))?;
        let names: HashMap<MapData, RedisName, u8> =
            HashMap::try_from(take("REDIS_NAMES")?).map_err(|e| format!("REDIS_NAMES: {e}"))?;
        let mut guards: ProgramArray<MapData> = ProgramArray::try_from(take("REDIS_GUARDS")?)
            .map_err(|e| format!("REDIS_GUARDS: {e}"))?;
        let join = Joiner::load(ebpf, wanted)?;
        // The Redis guards first: `warden_direct` tail-calls them.
        for (slot, name) in [(0, "warden_redis"), (1, "warden_redis_listed")] {
            let program: &mut SkMsg = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("program {name} missing"))?
                .try_into()
                .map_err(|e| format!("{name}: {e}"))?;
            program.load().map_err(|e| format!("loading {name}: {e}"))?;
            let fd = program.fd().map_err(|e| format!("{name}: {e}"))?;
            guards
                .set(slot, fd, 0)
                .map_err(|e| format!("REDIS_GUARDS: {e}"))?;
        }
        let program: &mut SkMsg = ebpf
            .program_mut("warden_direct")
            .ok_or("program warden_direct missing")?
            .try_into()
            .map_err(|e| format!("warden_direct: {e}"))?;
        program
            .load()
            .map_err(|e| format!("loading warden_direct: {e}"))?;
        // The attachment lives as long as the program (owned by the monitor).
        program
            .attach(socks.fd())
            .map_err(|e| format!("attaching warden_direct to DIRECT_SOCKS: {e}"))?;
        Ok(KernelRelay {
            _socks: socks,
            members,
            peers: Mutex::new(peers),
            join: Mutex::new(join),
            names: Mutex::new(names),
            _guards: guards,
        })
    }

    /// Starts entering the client's far end (the peer of `client_side`)
    /// into the relay's map, for a later [`splice`](Self::splice) with
    /// `upstream_side`: `warden_join` walks the host's TCP sockets, which
    /// takes milliseconds on a busy host, so it runs on a blocking thread
    /// and the caller polls the returned [`Joining`] at its next quiet
    /// moments (the session goes on meanwhile; a member's sends pass until
    /// it is paired). An upstream whose far end is not a member (not on
    /// this host, or not a relay route's) fails at once, without a walk.
    /// Must be called within a tokio runtime.
    pub fn join(
        self: &Arc<Self>,
        client_side: &tokio::net::TcpStream,
        upstream_side: &tokio::net::TcpStream,
    ) -> io::Result<Joining> {
        let client = far_end(client_side)?;
        if self.members.get(&far_end(upstream_side)?, 0).is_err() {
            return Err(io::Error::other(
                "the upstream's far end is not in the relay's map (not on this host, or not a relay route's)",
            ));
        }
        let state = Arc::new(AtomicU8::new(JOIN_PENDING));
        if self.members.get(&client, 0).is_ok() {
            state.store(JOIN_DONE, Ordering::Release);
            return Ok(Joining { state });
        }
        let relay = self.clone();
        let done = state.clone();
        tokio::task::spawn_blocking(move || {
            let ran = relay
                .join
                .lock()
                .map_err(|_| io::Error::other("poisoned"))
                .and_then(|mut j| j.join(&client));
            // A failed walk (the kernel refused) and a socket it did not
            // find (closed meanwhile) end alike: never for this session.
            let joined = ran.is_ok() && relay.members.get(&client, 0).is_ok();
            done.store(
                if joined { JOIN_DONE } else { JOIN_FAILED },
                Ordering::Release,
            );
        });
        Ok(Joining { state })
    }

    /// Splices the far ends of two connections warden holds: from now on
    /// what the client (the peer of `client_side`) sends goes straight into
    /// the receive queue of the upstream's socket (the peer of
    /// `upstream_side`) and back, within the flow-control window, while
    /// `client_side` and `upstream_side` stay ordinary sockets. `guard`
    /// (`GUARD_NONE`, `GUARD_MYSQL`) is what the client's sends are checked
    /// for before they are redirected (see `DirectPeer::guard`); what the
    /// check leaves to user space reaches `client_side`, starting at a
    /// packet boundary ([`Spliced::client_position`]).
    ///
    /// `held` bytes (the reply that keeps a request/response client
    /// silent) are written to the client after this returns. Nothing is
    /// redirected at once: the entries are armed (`ARM_*` in
    /// warden-ebpf-common) with what warden has read from each far end and
    /// written to the client, and the kernel redirects a direction only
    /// once its sender's TCP counters match — so no redirected byte ever
    /// overtakes one still on the TCP path, whatever the client does
    /// meanwhile (a pipelining client's session stays on the TCP path,
    /// relayed by the caller in order).
    pub fn splice(
        self: &Arc<Self>,
        client_side: &tokio::net::TcpStream,
        upstream_side: &tokio::net::TcpStream,
        guard: u8,
        held: usize,
    ) -> Result<Spliced, SpliceError> {
        self.splice_listed(client_side, upstream_side, guard, CommandList::NONE, held)
    }

    /// [`splice`](Self::splice) for a `GUARD_REDIS` route with a command
    /// list registered with [`set_command_list`](Self::set_command_list):
    /// the kernel also hands the client's direction to `client_side`
    /// before a command the list leaves to user space.
    pub fn splice_listed(
        self: &Arc<Self>,
        client_side: &tokio::net::TcpStream,
        upstream_side: &tokio::net::TcpStream,
        guard: u8,
        list: CommandList,
        held: usize,
    ) -> Result<Spliced, SpliceError> {
        let failed = SpliceError::Failed;
        let client = far_end(client_side).map_err(failed)?;
        let upstream = far_end(upstream_side).map_err(failed)?;
        // Counters first, queues second: a byte arriving in between is
        // unread, so the queue check below fails and nothing changes.
        let (from_client, to_client_acked) = tcp_totals(client_side.as_fd()).map_err(failed)?;
        let to_client = to_client_acked + unacked(client_side.as_fd()).map_err(failed)?;
        let (from_upstream, _) = tcp_totals(upstream_side.as_fd()).map_err(failed)?;
        if queued(client_side.as_fd()).map_err(failed)? > 0
            || queued(upstream_side.as_fd()).map_err(failed)? > 0
        {
            return Err(SpliceError::Busy);
        }
        // A redirect to a socket not in the map would drop the bytes: both
        // far ends must be members (a sockhash cannot be read from here).
        for key in [&client, &upstream] {
            if self.members.get(key, 0).is_err() {
                return Err(failed(io::Error::other(
                    "a far end is not in the relay's map (not on this host, or not a relay route's)",
                )));
            }
        }
        let spliced = Spliced {
            relay: self.clone(),
            client,
            upstream,
        };
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| failed(io::Error::other("poisoned")))?;
        let entry = |peer| DirectPeer {
            peer,
            ..DirectPeer::default()
        };
        // The upstream (a passive socket: its bytes_acked counts data
        // only) waits for the client's check.
        let upstream_entry = DirectPeer {
            armed: ARM_HOLD,
            expect_sent: from_upstream,
            ..entry(client)
        };
        peers
            .insert(upstream, upstream_entry, 0)
            .map_err(|e| failed(map_error("DIRECT_PEERS", e)))?;
        // The client opened its connection: its bytes_acked also counts
        // the SYN.
        let client_entry = DirectPeer {
            guard,
            names: list.id,
            names_allow: u8::from(list.allow),
            armed: ARM_CLIENT,
            expect_sent: from_client + 1,
            expect_recv: to_client + held as u64,
            ..entry(upstream)
        };
        peers
            .insert(client, client_entry, 0)
            .map_err(|e| failed(map_error("DIRECT_PEERS", e)))?;
        Ok(spliced)
    }
}

/// A Redis route's command list as the kernel sees it
/// ([`KernelRelay::set_command_list`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandList {
    /// Its id in `REDIS_NAMES` (0: none).
    pub id: u16,
    /// An allow list: names not in it go to user space (otherwise the
    /// names in it do).
    pub allow: bool,
}

impl CommandList {
    pub const NONE: CommandList = CommandList {
        id: 0,
        allow: false,
    };
}

impl KernelRelay {
    /// Registers a Redis route's command list under `id` (1 or more, one
    /// per route): `names` are the command names the kernel looks up
    /// (ASCII case-insensitive) — for a deny list, every command a rule
    /// names; for an allow list, the commands allowed whole. A name longer
    /// than the kernel reads is never found, which sends it to user space
    /// for an allow list and lets it pass for a deny list, so such a name
    /// is refused here.
    pub fn set_command_list(&self, id: u16, names: &[String]) -> io::Result<()> {
        if id == 0 {
            return Err(io::Error::other("command list id 0 is reserved"));
        }
        let mut map = self
            .names
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        for name in names {
            let bytes = name.as_bytes();
            if bytes.is_empty() || bytes.len() > REDIS_NAME_MAX {
                return Err(io::Error::other(format!(
                    "command name {name:?} is longer than the {REDIS_NAME_MAX} bytes the kernel reads"
                )));
            }
            let mut key = RedisName {
                list: id,
                ..RedisName::default()
            };
            for (k, b) in key.name.iter_mut().zip(bytes) {
                *k = b.to_ascii_lowercase();
            }
            map.insert(key, 1, 0)
                .map_err(|e| map_error("REDIS_NAMES", e))?;
        }
        Ok(())
    }
}

impl KernelRelay {
    /// Sockets in the relay's map right now (walks `DIRECT_MEMBERS`:
    /// diagnostics and tests, not the data path).
    pub fn member_count(&self) -> usize {
        self.members.keys().filter(Result::is_ok).count()
    }
}

/// What the kernel's joined local hops hold right now (see `HOP_LISTENER`
/// in `warden-ebpf-common`): one entry per direction of a live connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopStats {
    /// Directions whose sends go to the peer's queue.
    pub joined: u64,
    /// Directions on the TCP path for good (sent before the other end was
    /// established, or went past the window).
    pub tcp: u64,
    /// Bytes the live directions moved socket to socket.
    pub bytes: u64,
}

impl KernelRelay {
    /// The live local-hop entries, summed (walks the map: diagnostics and
    /// tests, not the data path).
    pub fn hop_stats(&self) -> HopStats {
        let mut stats = HopStats::default();
        let Ok(peers) = self.peers.lock() else {
            return stats;
        };
        for (_, p) in peers.iter().flatten() {
            if p.hop == 0 {
                continue;
            }
            if p.tcp != 0 {
                stats.tcp += 1;
            } else {
                stats.joined += 1;
            }
            stats.bytes += p.bytes;
        }
        stats
    }
}

impl std::fmt::Debug for Spliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spliced").finish_non_exhaustive()
    }
}

impl Spliced {
    /// Bytes the kernel moved so far: sent by the client, sent by the
    /// upstream (what took the TCP path is not counted here).
    pub fn bytes(&self) -> (u64, u64) {
        let Ok(peers) = self.relay.peers.lock() else {
            return (0, 0);
        };
        let get = |k: &SockPair| peers.get(k, 0).map(|p| p.bytes).unwrap_or(0);
        (get(&self.client), get(&self.upstream))
    }

    /// Where a guarded client direction's walk stood when it took the TCP
    /// path (the kernel no longer changes the entry then; read once that
    /// path carried bytes): `GUARD_MYSQL` — the last packet redirected was
    /// 0xFFFFFF bytes long, so the first one on the TCP path continues it;
    /// `GUARD_REDIS` — how many bulk strings of the current command are
    /// left (0: the TCP path starts with a command).
    pub fn client_position(&self) -> ClientPosition {
        let Ok(peers) = self.relay.peers.lock() else {
            return ClientPosition::default();
        };
        peers
            .get(&self.client, 0)
            .map(|p| ClientPosition {
                continues: p.cont != 0,
                args: p.args,
            })
            .unwrap_or_default()
    }

    /// Whether the client's first send failed the splice's check (it sent
    /// before it had read the held reply, or warden had not read all it
    /// sent): then nothing was ever redirected, and warden relays both
    /// directions over TCP, in order.
    pub fn check_failed(&self) -> bool {
        let Ok(peers) = self.relay.peers.lock() else {
            return false;
        };
        peers
            .get(&self.client, 0)
            .is_ok_and(|p| p.armed == ARM_FAILED)
    }

    /// Which directions take the TCP path now (over the window, stopped by
    /// a guard, or a failed splice check): (client → upstream, upstream →
    /// client).
    pub fn tcp_path(&self) -> (bool, bool) {
        let Ok(peers) = self.relay.peers.lock() else {
            return (false, false);
        };
        let get = |k: &SockPair| peers.get(k, 0).map(|p| p.tcp != 0).unwrap_or(false);
        (get(&self.client), get(&self.upstream))
    }
}

impl Spliced {
    /// Ends the splice now (as dropping it does) and returns the kernel's
    /// byte counts ([`bytes`](Self::bytes)): from here on both far ends'
    /// sends take the TCP path to warden's sockets. What the kernel had
    /// already redirected stays ahead of it in the receivers' queues.
    pub fn release(self) -> (u64, u64) {
        let counts = self.bytes();
        drop(self);
        counts
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if let Ok(mut peers) = self.relay.peers.lock() {
            let _ = peers.remove(&self.client);
            let _ = peers.remove(&self.upstream);
        }
    }
}
