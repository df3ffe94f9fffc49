//! warden's local hops joined by the kernel, on the real kernel: a client of
//! a hop listener and the proxy's accepted socket, the proxy's socket to a
//! hop upstream and the upstream's accepted socket. Every byte still passes
//! through the proxy's sockets (the proxy reads and writes it); the kernel
//! only skips the loopback TCP/IP path, in order, within its window, and
//! forgets a connection when it closes.
//!
//! Root only, like `monitor.rs` (never skipped in CI: `WARDEN_REQUIRE_EBPF`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use warden_ebpf::{Monitor, MonitorConfig};

mod common;
use common::have_root;

struct Lab {
    monitor: Arc<Monitor>,
    front: TcpListener,
    back: TcpListener,
    plain: TcpListener,
}

/// The proxy is this test process (it is the configured warden tgid).
fn lab() -> Lab {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = MonitorConfig {
        listeners: vec![front.local_addr().unwrap(), plain.local_addr().unwrap()],
        upstreams: vec![back.local_addr().unwrap()],
        hop_listeners: vec![front.local_addr().unwrap()],
        hop_upstreams: vec![back.local_addr().unwrap()],
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    };
    let monitor =
        Arc::new(Monitor::load(&cfg).unwrap_or_else(|e| panic!("loading the monitor: {e}")));
    monitor.relay().expect("the sk_msg program loads");
    Lab {
        monitor,
        front,
        back,
        plain,
    }
}

fn timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// A chain client ⇄ (a | u) ⇄ server with the proxy's two sockets.
fn chain(l: &Lab) -> [TcpStream; 4] {
    let client = TcpStream::connect(l.front.local_addr().unwrap()).unwrap();
    let (a, _) = l.front.accept().unwrap();
    let u = TcpStream::connect(l.back.local_addr().unwrap()).unwrap();
    let (server, _) = l.back.accept().unwrap();
    for s in [&client, &a, &u, &server] {
        timeouts(s);
    }
    [client, a, u, server]
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
        .collect()
}

#[test]
fn hops_are_joined_carry_every_byte_in_order_and_are_forgotten_at_close() {
    if !have_root() {
        return;
    }
    let l = lab();
    let relay = l.monitor.relay().unwrap().clone();
    let before = l.monitor.counters().hops;
    let [mut client, mut a, mut u, mut server] = chain(&l);
    // Request and response, the way a proxy moves them.
    let (mut up, mut down) = (0u64, 0u64);
    for i in 0..200u32 {
        let q = format!("GET /{i} HTTP/1.1\r\n\r\n");
        client.write_all(q.as_bytes()).unwrap();
        let got = read_n(&mut a, q.len());
        u.write_all(&got).unwrap();
        assert_eq!(read_n(&mut server, q.len()), q.as_bytes());
        let r = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{i}",
            i.to_string().len()
        );
        server.write_all(r.as_bytes()).unwrap();
        let got = read_n(&mut u, r.len());
        a.write_all(&got).unwrap();
        assert_eq!(read_n(&mut client, r.len()), r.as_bytes());
        up += q.len() as u64;
        down += r.len() as u64;
    }
    // All four directions were joined by the kernel (the test sends only
    // after both ends of a connection are established).
    assert_eq!(l.monitor.counters().hops - before, 4);
    let stats = relay.hop_stats();
    assert!(stats.joined >= 4, "{stats:?}");
    assert!(
        stats.bytes >= 2 * (up + down),
        "every direction went socket to socket: {stats:?}, {up} up, {down} down"
    );

    // A client's half close reaches the proxy after every byte it sent.
    client.write_all(b"last words").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"last words");
    drop((client, a, u, server));
    std::thread::sleep(Duration::from_millis(300));
    let after = relay.hop_stats();
    assert!(
        after.joined + after.tcp < stats.joined + stats.tcp,
        "closed connections leave the map: {stats:?} then {after:?}"
    );

    // A listener that is not a hop listener: nothing is joined.
    let before = l.monitor.counters().hops;
    let mut c = TcpStream::connect(l.plain.local_addr().unwrap()).unwrap();
    let (mut p, _) = l.plain.accept().unwrap();
    timeouts(&p);
    c.write_all(b"plain").unwrap();
    assert_eq!(read_n(&mut p, 5), b"plain");
    assert_eq!(l.monitor.counters().hops, before);
}

/// Bulk in one direction with no answer: past the hop window the sender's
/// bytes take the TCP path for good; the receiver still reads everything,
/// in order. A client that sends at once after connect() (before the
/// proxy's end may be established) is just as safe.
#[test]
fn past_the_window_and_early_senders_keep_the_order() {
    if !have_root() {
        return;
    }
    let l = lab();
    let [mut client, mut a, _u, _server] = chain(&l);
    const TOTAL: usize = 8 << 20;
    let data = pattern(TOTAL, 7);
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        for chunk in sent.chunks(100_000) {
            client.write_all(chunk).unwrap();
        }
        client
    });
    // Read slowly at first so the sender runs ahead of the reader.
    std::thread::sleep(Duration::from_millis(300));
    let got = read_n(&mut a, TOTAL);
    assert!(got == data, "bytes arrived out of order or changed");
    let _client = writer.join().unwrap();
    let stats = l.monitor.relay().unwrap().hop_stats();
    assert!(
        stats.tcp >= 1 && stats.bytes > 0 && stats.bytes <= 256 << 10,
        "the client's direction went socket to socket up to the window, then TCP: {stats:?}"
    );

    for seed in 0..50u32 {
        let mut c = TcpStream::connect(l.front.local_addr().unwrap()).unwrap();
        let first = pattern(3000, seed);
        c.write_all(&first).unwrap();
        let (mut s, _) = l.front.accept().unwrap();
        timeouts(&s);
        let second = pattern(5000, seed + 1);
        c.write_all(&second).unwrap();
        assert_eq!(read_n(&mut s, first.len()), first, "connection {seed}");
        assert_eq!(read_n(&mut s, second.len()), second, "connection {seed}");
        s.write_all(b"ok").unwrap();
        assert_eq!(read_n(&mut c, 2), b"ok");
    }
}
