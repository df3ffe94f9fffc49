//! The kernel relay on the real kernel: two spliced sockets pass bytes
//! both ways without user space, counted; the pair's end is still seen by
//! user space; bytes that were queued before the splice stay readable.
//!
//! Root only, like `monitor.rs` (never skipped in CI: `WARDEN_REQUIRE_EBPF`).
#![allow(unsafe_code)]
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use warden_ebpf::{Monitor, MonitorConfig, SpliceError};

mod common;
use common::have_root;

/// client ⇄ (proxy_in | proxy_out) ⇄ server, all loopback TCP.
struct Pair {
    client: TcpStream,
    proxy_in: TcpStream,
    proxy_out: TcpStream,
    server: TcpStream,
}

fn pair() -> Pair {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (proxy_in, _) = front.accept().unwrap();
    let proxy_out = TcpStream::connect(back.local_addr().unwrap()).unwrap();
    let (server, _) = back.accept().unwrap();
    for s in [&client, &proxy_in, &proxy_out, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
    }
    Pair {
        client,
        proxy_in,
        proxy_out,
        server,
    }
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

fn monitor() -> Arc<Monitor> {
    let cfg = MonitorConfig {
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    };
    Arc::new(Monitor::load(&cfg).unwrap_or_else(|e| panic!("loading the monitor: {e}")))
}

#[test]
fn spliced_sockets_relay_both_ways_in_the_kernel_and_count_bytes() {
    if !have_root() {
        return;
    }
    let m = monitor();
    let relay = m
        .relay()
        .expect("kernel relay loads on this kernel")
        .clone();
    let mut p = pair();
    let spliced = relay
        .splice(p.proxy_in.as_fd(), p.proxy_out.as_fd())
        .expect("splice");
    // Many round trips and one large transfer each way.
    for i in 0..200u32 {
        let q = format!("query {i}\n");
        p.client.write_all(q.as_bytes()).unwrap();
        assert_eq!(read_n(&mut p.server, q.len()), q.as_bytes());
        let r = format!("reply {i} from the server\n");
        p.server.write_all(r.as_bytes()).unwrap();
        assert_eq!(read_n(&mut p.client, r.len()), r.as_bytes());
    }
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut server = p.server.try_clone().unwrap();
    let expect = big.clone();
    let reader = std::thread::spawn(move || read_n(&mut server, expect.len()) == expect);
    p.client.write_all(&big).unwrap();
    assert!(
        reader.join().unwrap(),
        "4 MB client → server arrived intact"
    );
    let mut client = p.client.try_clone().unwrap();
    let expect = big.clone();
    let reader = std::thread::spawn(move || read_n(&mut client, expect.len()) == expect);
    p.server.write_all(&big).unwrap();
    assert!(
        reader.join().unwrap(),
        "4 MB server → client arrived intact"
    );

    let up: u64 = (0..200u32)
        .map(|i| format!("query {i}\n").len() as u64)
        .sum();
    let down: u64 = (0..200u32)
        .map(|i| format!("reply {i} from the server\n").len() as u64)
        .sum();
    let (a, b) = spliced.bytes();
    assert_eq!(
        a,
        up + big.len() as u64,
        "bytes received on the client side"
    );
    assert_eq!(
        b,
        down + big.len() as u64,
        "bytes received on the server side"
    );

    // The proxy's own sockets never saw a byte.
    p.proxy_in.set_nonblocking(true).unwrap();
    let mut probe = [0u8; 16];
    assert!(
        matches!(p.proxy_in.read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "user space reads nothing from a spliced socket"
    );
    p.proxy_in.set_nonblocking(false).unwrap();

    // The client's close is still seen by user space (EOF on the spliced socket).
    drop(p.client);
    let mut buf = [0u8; 8];
    assert_eq!(
        p.proxy_in.read(&mut buf).unwrap(),
        0,
        "EOF reaches user space"
    );
    drop(spliced);
}

#[test]
fn a_splice_waits_for_empty_receive_queues_and_pairs_stay_apart() {
    if !have_root() {
        return;
    }
    let m = monitor();
    let relay = m.relay().expect("kernel relay").clone();
    let mut p = pair();
    // Unread bytes on either side: not a quiet moment, nothing changes.
    p.client.write_all(b"early").unwrap();
    p.server.write_all(b"async").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(matches!(
        relay.splice(p.proxy_in.as_fd(), p.proxy_out.as_fd()),
        Err(SpliceError::Busy)
    ));
    assert_eq!(read_n(&mut p.proxy_in, 5), b"early", "still user space's");
    assert!(matches!(
        relay.splice(p.proxy_in.as_fd(), p.proxy_out.as_fd()),
        Err(SpliceError::Busy)
    ));
    assert_eq!(read_n(&mut p.proxy_out, 5), b"async");
    let spliced = relay
        .splice(p.proxy_in.as_fd(), p.proxy_out.as_fd())
        .expect("quiet now");
    p.client.write_all(b"later").unwrap();
    assert_eq!(read_n(&mut p.server, 5), b"later");
    assert_eq!(spliced.bytes(), (5, 0));

    // Many pairs at once, each relayed to its own peer only.
    let mut pairs: Vec<_> = (0..50).map(|_| pair()).collect();
    let splices: Vec<_> = pairs
        .iter()
        .map(|p| {
            relay
                .splice(p.proxy_in.as_fd(), p.proxy_out.as_fd())
                .unwrap()
        })
        .collect();
    for (i, p) in pairs.iter_mut().enumerate().rev() {
        let msg = format!("pair {i:03}");
        p.client.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_n(&mut p.server, msg.len()), msg.as_bytes());
        let back = format!("back {i:03}");
        p.server.write_all(back.as_bytes()).unwrap();
        assert_eq!(read_n(&mut p.client, back.len()), back.as_bytes());
    }
    for (i, s) in splices.iter().enumerate() {
        assert_eq!(s.bytes(), (8, 8), "pair {i}");
    }
    // A socket closed while spliced leaves the map by itself; the entries
    // of every splice are gone once dropped, so the maps do not fill up.
    drop(pairs);
    drop(splices);
    drop(spliced);
}

/// The direct relay: the far ends of two connections the proxy holds (a
/// client connected to a watched listener, a server that accepted the
/// proxy's connection to a watched upstream) exchange bytes socket to
/// socket; the proxy's own sockets see nothing until the splice is
/// dropped, and then the ordinary path is back.
#[tokio::test(flavor = "multi_thread")]
async fn direct_splice_moves_bytes_between_the_far_ends_and_can_be_undone() {
    if !have_root() {
        return;
    }
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    // Watched too, but not a relay route's: its sockets stay ordinary.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = MonitorConfig {
        listeners: vec![front.local_addr().unwrap(), other.local_addr().unwrap()],
        upstreams: vec![back.local_addr().unwrap()],
        relay_listeners: vec![front.local_addr().unwrap()],
        relay_upstreams: vec![back.local_addr().unwrap()],
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    };
    let m = Arc::new(Monitor::load(&cfg).unwrap_or_else(|e| panic!("loading the monitor: {e}")));
    let relay = m.relay().expect("kernel relay").clone();
    assert_eq!(relay.direct_unavailable(), None);

    let mut client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (w1, _) = front.accept().unwrap();
    let w2 = TcpStream::connect(back.local_addr().unwrap()).unwrap();
    let (mut server, _) = back.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    w1.set_nonblocking(true).unwrap();
    w2.set_nonblocking(true).unwrap();
    let w1 = tokio::net::TcpStream::from_std(w1).unwrap();
    let w2 = tokio::net::TcpStream::from_std(w2).unwrap();

    // A client of a listener without the relay is never in the map.
    let _outsider = TcpStream::connect(other.local_addr().unwrap()).unwrap();
    let (o1, _) = other.accept().unwrap();
    o1.set_nonblocking(true).unwrap();
    let o1 = tokio::net::TcpStream::from_std(o1).unwrap();
    let r = relay.splice_direct(&o1, &w2);
    assert!(matches!(r, Err(SpliceError::Failed(_))), "{r:?}");

    let spliced = relay.splice_direct(&w1, &w2).expect("direct splice");
    for i in 0..100u32 {
        let q = format!("query {i}");
        client.write_all(q.as_bytes()).unwrap();
        assert_eq!(read_n(&mut server, q.len()), q.as_bytes());
        let r = format!("reply {i}!");
        server.write_all(r.as_bytes()).unwrap();
        assert_eq!(read_n(&mut client, r.len()), r.as_bytes());
    }
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut srv = server.try_clone().unwrap();
    let expect = big.clone();
    let reader = std::thread::spawn(move || read_n(&mut srv, expect.len()) == expect);
    client.write_all(&big).unwrap();
    assert!(reader.join().unwrap(), "3 MB client → server intact");
    let mut probe = [0u8; 8];
    for w in [&w1, &w2] {
        assert!(
            matches!(w.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the proxy's sockets carry nothing"
        );
    }
    let up: u64 = (0..100u32).map(|i| format!("query {i}").len() as u64).sum();
    let down: u64 = (0..100u32)
        .map(|i| format!("reply {i}!").len() as u64)
        .sum();
    assert_eq!(spliced.bytes(), (up + big.len() as u64, down));

    // Undone: the client's bytes reach the proxy's socket again.
    drop(spliced);
    client.write_all(b"plain").unwrap();
    w1.readable().await.unwrap();
    let mut got = [0u8; 5];
    let mut n = 0;
    while n < 5 {
        match w1.try_read(&mut got[n..]) {
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => w1.readable().await.unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&got, b"plain");

    // A closed far end leaves the membership map: no splice to it.
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let r = relay.splice_direct(&w1, &w2);
    assert!(matches!(r, Err(SpliceError::Failed(_))), "{r:?}");
}
