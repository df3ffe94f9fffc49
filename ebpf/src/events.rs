//! Access events from the kernel ring buffer.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use aya::maps::{Array, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use warden_ebpf_common as common;

/// What produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A `connect()` (cgroup/connect4 or connect6).
    Connect,
    /// A TCP connection to a warden listener, recorded for attribution.
    Attributed,
}

/// What the kernel decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let through.
    Allowed,
    /// Denied: the process or its cgroup is frozen.
    DeniedFrozen,
    /// A direct connect to a protected upstream, let through (observe mode).
    BypassAllowed,
    /// A direct connect to a protected upstream, denied (enforce mode).
    BypassDenied,
}

impl Verdict {
    /// Label value for metrics and `warden events`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::DeniedFrozen => "denied_frozen",
            Verdict::BypassAllowed => "bypass_observed",
            Verdict::BypassDenied => "bypass_denied",
        }
    }

    /// Whether the connect was refused.
    pub fn is_denied(self) -> bool {
        matches!(self, Verdict::DeniedFrozen | Verdict::BypassDenied)
    }

    /// Whether this was a direct connect to a protected upstream.
    pub fn is_bypass(self) -> bool {
        matches!(self, Verdict::BypassAllowed | Verdict::BypassDenied)
    }
}

/// The class of the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestKind {
    /// Not watched (only reported when the connect was denied: frozen).
    Other,
    /// A warden listener.
    Listener,
    /// A protected upstream.
    Upstream,
}

impl DestKind {
    /// Label value for metrics and `warden events`.
    pub fn as_str(self) -> &'static str {
        match self {
            DestKind::Other => "other",
            DestKind::Listener => "listener",
            DestKind::Upstream => "upstream",
        }
    }
}

impl EventKind {
    /// Label value for metrics and `warden events`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Attributed => "attributed",
        }
    }
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEvent {
    /// Which program produced it.
    pub kind: EventKind,
    /// The kernel's decision.
    pub verdict: Verdict,
    /// The destination class.
    pub dest_kind: DestKind,
    /// The process (thread id, tgid, uid, gid, cgroup id, comm).
    pub process: common::ProcessInfo,
    /// Destination address (v4-mapped addresses shown as IPv4).
    pub dest: SocketAddr,
    /// Source address (attribution events only).
    pub source: Option<SocketAddr>,
    /// Address family of the socket (4 or 6): a v4-mapped connect has
    /// family 6 and an IPv4 `dest`.
    pub family: u8,
}

impl AccessEvent {
    /// Decodes a ring-buffer record; `None` for a record of the wrong size or
    /// with unknown enum values (the kernel side is ours, so this only
    /// happens if object and user space disagree).
    pub fn decode(bytes: &[u8]) -> Option<AccessEvent> {
        if bytes.len() != std::mem::size_of::<common::Event>() {
            return None;
        }
        // SAFETY: the length matches and `Event` is `#[repr(C)]` plain data
        // for which every bit pattern is valid; the read is unaligned-safe.
        let raw: common::Event =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<common::Event>()) };
        let kind = match raw.kind {
            common::EVENT_CONNECT => EventKind::Connect,
            common::EVENT_ATTRIBUTED => EventKind::Attributed,
            _ => return None,
        };
        let verdict = match raw.verdict {
            common::VERDICT_ALLOWED => Verdict::Allowed,
            common::VERDICT_DENIED_FROZEN => Verdict::DeniedFrozen,
            common::VERDICT_BYPASS_ALLOWED => Verdict::BypassAllowed,
            common::VERDICT_BYPASS_DENIED => Verdict::BypassDenied,
            _ => return None,
        };
        let dest_kind = match raw.dest_kind {
            common::DEST_NONE => DestKind::Other,
            common::DEST_LISTENER => DestKind::Listener,
            common::DEST_UPSTREAM => DestKind::Upstream,
            _ => return None,
        };
        let source = (kind == EventKind::Attributed).then(|| sock_addr_of(&raw.source));
        Some(AccessEvent {
            kind,
            verdict,
            dest_kind,
            process: raw.process,
            dest: sock_addr_of(&raw.dest),
            source,
            family: raw.family,
        })
    }

    /// The comm field as text (informational; never used for identity).
    pub fn comm(&self) -> String {
        let end = self
            .process
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.process.comm.len());
        String::from_utf8_lossy(&self.process.comm[..end]).into_owned()
    }
}

/// A `SockKey` as a socket address, v4-mapped shown as IPv4.
pub(crate) fn sock_addr_of(key: &common::SockKey) -> SocketAddr {
    let v6 = Ipv6Addr::from(key.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, key.port())
}

/// The canonical `SockKey` of a socket address (IPv4 stored v4-mapped).
pub(crate) fn sock_key_of(addr: SocketAddr) -> common::SockKey {
    match addr.ip() {
        IpAddr::V4(v4) => common::SockKey::v4(v4.octets(), addr.port()),
        IpAddr::V6(v6) => common::SockKey::v6(v6.octets(), addr.port()),
    }
}

/// Reads events from the ring buffer.
///
/// The kernel side submits without waking the reader until a quarter of the
/// ring is unread (refusals and bypasses wake it at once), so
/// [`EventReader::run`] drains both on readiness and on a short timer. After
/// [`SLEEP_AFTER`] empty drains it stops the timer and tells the kernel
/// (`READER_ASLEEP`), which then wakes it with the next event: an idle
/// daemon is not woken a hundred times a second, a busy one is not woken
/// per event.
pub struct EventReader {
    pub(crate) ring: RingBuf<MapData>,
    pub(crate) asleep: Array<MapData, u64>,
}

/// How often the reader drains the ring when it was not woken.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Empty drains in a row (about a second) before the reader sleeps.
pub const SLEEP_AFTER: u32 = 100;
/// While asleep, the reader still looks this often: a record the kernel
/// reserved but had not submitted when the reader last looked is not lost
/// for longer than this.
const ASLEEP_LOOK: Duration = Duration::from_secs(1);

impl EventReader {
    /// Calls `handle` for every event currently in the ring; returns how
    /// many records were read (undecodable ones included).
    pub fn drain(&mut self, handle: impl FnMut(AccessEvent)) -> usize {
        drain_ring(&mut self.ring, handle)
    }

    /// Drains forever (until the task is dropped), on readiness and every
    /// [`DRAIN_INTERVAL`]. Must run inside a tokio runtime with I/O enabled.
    pub async fn run(self, mut handle: impl FnMut(AccessEvent)) -> std::io::Result<()> {
        // SAFETY: the AsyncFd owns the ring buffer, so the registered fd
        // stays open for exactly as long as it is registered.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(self.ring, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        let mut asleep = self.asleep;
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut empty = 0u32;
        loop {
            if empty >= SLEEP_AFTER {
                // Announce the sleep, then look once more: an event
                // submitted before the kernel saw the flag is read here.
                let _ = asleep.set(0, 1, 0);
                let mut n = drain_ring(fd.get_mut(), &mut handle);
                while n == 0 {
                    n = tokio::select! {
                        guard = fd.readable_mut() => {
                            let mut guard = guard?;
                            let n = drain_ring(guard.get_inner_mut(), &mut handle);
                            guard.clear_ready();
                            n
                        }
                        _ = tokio::time::sleep(ASLEEP_LOOK) => drain_ring(fd.get_mut(), &mut handle),
                    };
                }
                let _ = asleep.set(0, 0, 0);
                empty = 0;
                tick.reset();
                continue;
            }
            let n = tokio::select! {
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    let n = drain_ring(guard.get_inner_mut(), &mut handle);
                    guard.clear_ready();
                    n
                }
                _ = tick.tick() => drain_ring(fd.get_mut(), &mut handle),
            };
            empty = if n == 0 { empty + 1 } else { 0 };
        }
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, mut handle: impl FnMut(AccessEvent)) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        n += 1;
        if let Some(event) = AccessEvent::decode(&item) {
            handle(event);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_event(kind: u8, verdict: u8) -> Vec<u8> {
        let ev = common::Event {
            process: common::ProcessInfo {
                pid: 11,
                tgid: 10,
                uid: 1000,
                gid: 1000,
                cgroup_id: 42,
                ktime_ns: 1,
                comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
            },
            dest: common::SockKey::v4([127, 0, 0, 1], 15432),
            source: common::SockKey::v4([127, 0, 0, 1], 40000),
            kind,
            verdict,
            dest_kind: common::DEST_LISTENER,
            family: 4,
            _pad: [0; 4],
        };
        // SAFETY: reading the bytes of a repr(C) value without padding holes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const common::Event).cast::<u8>(),
                std::mem::size_of::<common::Event>(),
            )
        };
        bytes.to_vec()
    }

    #[test]
    fn decodes_an_attribution_event() {
        let ev = AccessEvent::decode(&raw_event(common::EVENT_ATTRIBUTED, 0)).expect("decodes");
        assert_eq!(ev.kind, EventKind::Attributed);
        assert_eq!(ev.dest, "127.0.0.1:15432".parse().expect("addr"));
        assert_eq!(ev.source, Some("127.0.0.1:40000".parse().expect("addr")));
        assert_eq!(ev.comm(), "psql");
        assert_eq!(ev.process.tgid, 10);
    }

    #[test]
    fn rejects_wrong_sizes_and_unknown_values() {
        assert!(AccessEvent::decode(&[0u8; 10]).is_none());
        assert!(AccessEvent::decode(&raw_event(9, 0)).is_none());
        assert!(AccessEvent::decode(&raw_event(common::EVENT_CONNECT, 77)).is_none());
    }

    #[test]
    fn v4_mapped_and_v6_keys_round_trip() {
        let v4: SocketAddr = "10.1.2.3:5432".parse().expect("addr");
        assert_eq!(sock_addr_of(&sock_key_of(v4)), v4);
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5432".parse().expect("addr");
        assert_eq!(sock_key_of(mapped), sock_key_of(v4));
        let v6: SocketAddr = "[::1]:5432".parse().expect("addr");
        assert_eq!(sock_addr_of(&sock_key_of(v6)), v6);
    }
}
