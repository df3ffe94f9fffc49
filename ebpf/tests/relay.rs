//! The kernel relay on the real kernel: the far ends of two connections a
//! proxy holds (a client of a relay listener, a server that accepted the
//! proxy's connection to a relay upstream) exchange bytes socket to
//! socket, counted; the proxy's own sockets carry nothing until a
//! direction runs past the flow-control window, or the pair is unspliced,
//! and then the ordinary TCP path is back, in order.
//!
//! Root only, like `monitor.rs` (never skipped in CI: `WARDEN_REQUIRE_EBPF`).
#![allow(unsafe_code)]
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use warden_ebpf::{
    ClientPosition, JoinState, KernelRelay, Monitor, MonitorConfig, SpliceError, GUARD_MYSQL,
    GUARD_NONE, GUARD_REDIS,
};

mod common;
use common::have_root;

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// client ⇄ (w1 | w2) ⇄ server, the proxy's sockets w1/w2 in tokio.
struct Lab {
    _monitor: Arc<Monitor>,
    relay: Arc<KernelRelay>,
    client: TcpStream,
    w1: tokio::net::TcpStream,
    w2: tokio::net::TcpStream,
    server: TcpStream,
    /// A watched listener that is not a relay route's.
    other: TcpListener,
}

fn lab() -> Lab {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let back = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = MonitorConfig {
        listeners: vec![front.local_addr().unwrap(), other.local_addr().unwrap()],
        upstreams: vec![back.local_addr().unwrap()],
        relay_listeners: vec![front.local_addr().unwrap()],
        relay_upstreams: vec![back.local_addr().unwrap()],
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    };
    let monitor =
        Arc::new(Monitor::load(&cfg).unwrap_or_else(|e| panic!("loading the monitor: {e}")));
    let relay = monitor.relay().expect("kernel relay loads").clone();
    let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (w1, _) = front.accept().unwrap();
    let w2 = TcpStream::connect(back.local_addr().unwrap()).unwrap();
    let (server, _) = back.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let tokio_side = |s: TcpStream| {
        s.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(s).unwrap()
    };
    Lab {
        _monitor: monitor,
        relay,
        client,
        w1: tokio_side(w1),
        w2: tokio_side(w2),
        server,
        other,
    }
}

/// A [`lab`] whose two far ends are in the relay's map (the server's since
/// its connection was established, the client's since the probe: a splice
/// that is undone at once; no state is left, counters belong to the
/// splice). On a loaded
/// host a connection may miss its entry (warden then relays that session in
/// user space, as it does any pair it cannot splice); the lab is built
/// again then, up to five times.
fn lab_with_far_ends() -> Lab {
    const ATTEMPTS: u32 = 5;
    for attempt in 1..=ATTEMPTS {
        let l = lab();
        if let Err(e) = join(&l) {
            if attempt < ATTEMPTS {
                eprintln!("attempt {attempt}: {e}; building the lab again");
                continue;
            }
            panic!("join after {attempt} attempts: {e}");
        }
        match l.relay.splice(&l.w1, &l.w2, GUARD_NONE, 0) {
            Ok(probe) => {
                drop(probe);
                return l;
            }
            Err(SpliceError::Failed(e)) if attempt < ATTEMPTS => {
                eprintln!("attempt {attempt}: {e}; building the lab again");
            }
            Err(e) => panic!("splice after {attempt} attempts: {e:?}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// The client's far end into the relay's map ([`KernelRelay::join`]),
/// waited for.
fn join(l: &Lab) -> Result<(), String> {
    let joining = l.relay.join(&l.w1, &l.w2).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match joining.state() {
            JoinState::Joined => return Ok(()),
            JoinState::Failed => return Err("the client's socket was not entered".into()),
            JoinState::Pending if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            JoinState::Pending => return Err("the join did not finish in 30 s".into()),
        }
    }
}

fn idle(w: &tokio::net::TcpStream) -> bool {
    let mut probe = [0u8; 8];
    matches!(w.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// [`read_exact_now`] with a deadline: bytes that never come fail the
/// test instead of hanging it.
async fn read_exact(w: &tokio::net::TcpStream, n: usize) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(30), read_exact_now(w, n))
        .await
        .unwrap_or_else(|_| panic!("{n} bytes did not reach the proxy's socket in 30 s"))
}

async fn read_exact_now(w: &tokio::net::TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    let mut have = 0;
    while have < n {
        w.readable().await.unwrap();
        match w.try_read(&mut got[have..]) {
            Ok(0) => panic!("EOF after {have} bytes"),
            Ok(k) => have += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn spliced_far_ends_exchange_bytes_and_unsplicing_restores_tcp() {
    if !have_root() {
        return;
    }
    let mut l = lab_with_far_ends();
    // A client of a listener without the relay is never in the map.
    let _outsider = TcpStream::connect(l.other.local_addr().unwrap()).unwrap();
    let (o1, _) = l.other.accept().unwrap();
    o1.set_nonblocking(true).unwrap();
    let o1 = tokio::net::TcpStream::from_std(o1).unwrap();
    let r = l.relay.splice(&o1, &l.w2, GUARD_NONE, 0);
    assert!(matches!(r, Err(SpliceError::Failed(_))), "{r:?}");
    // Nor does asking `warden_join` for it enter it.
    let outsider = l.relay.join(&o1, &l.w2).expect("join");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while outsider.state() == JoinState::Pending && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(outsider.state(), JoinState::Failed);
    // Unread bytes on warden's side: not a quiet moment.
    l.client.write_all(b"early").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(matches!(
        l.relay.splice(&l.w1, &l.w2, GUARD_NONE, 0),
        Err(SpliceError::Busy)
    ));
    assert_eq!(read_exact(&l.w1, 5).await, b"early");

    let spliced = l.relay.splice(&l.w1, &l.w2, GUARD_NONE, 0).expect("splice");
    for i in 0..100u32 {
        let q = format!("query {i}");
        l.client.write_all(q.as_bytes()).unwrap();
        assert_eq!(read_n(&mut l.server, q.len()), q.as_bytes());
        let r = format!("reply {i}!");
        l.server.write_all(r.as_bytes()).unwrap();
        assert_eq!(read_n(&mut l.client, r.len()), r.as_bytes());
    }
    assert!(
        idle(&l.w1) && idle(&l.w2),
        "the proxy's sockets carry nothing"
    );
    let up: u64 = (0..100u32).map(|i| format!("query {i}").len() as u64).sum();
    let down: u64 = (0..100u32)
        .map(|i| format!("reply {i}!").len() as u64)
        .sum();
    assert_eq!(spliced.bytes(), (up, down));
    assert_eq!(spliced.tcp_path(), (false, false));

    // Unspliced: the client's bytes reach the proxy's socket again.
    drop(spliced);
    l.client.write_all(b"plain").unwrap();
    assert_eq!(read_exact(&l.w1, 5).await, b"plain");

    // A closed far end leaves the membership map (the state callback
    // `warden_join` asked for): no splice to it, and no entry left over.
    assert_eq!(l.relay.member_count(), 2, "the client's and the server's");
    drop(l.client);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(l.relay.member_count(), 1, "the server's");
    let r = l.relay.splice(&l.w1, &l.w2, GUARD_NONE, 0);
    assert!(matches!(r, Err(SpliceError::Failed(_))), "{r:?}");
}

/// A receiver that stops reading: the kernel queues at most the window
/// ahead of it, then the direction takes the TCP path through the proxy's
/// sockets (here forwarded by a thread, as warden does), where TCP holds
/// the sender back; nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread")]
async fn past_the_window_a_direction_takes_the_tcp_path_and_the_sender_waits() {
    if !have_root() {
        return;
    }
    let mut l = lab_with_far_ends();
    let spliced = l.relay.splice(&l.w1, &l.w2, GUARD_NONE, 0).expect("splice");
    // The client's request opens the server's direction (see ARM_HOLD).
    l.client.write_all(b"go").unwrap();
    assert_eq!(read_n(&mut l.server, 2), b"go");
    const TOTAL: usize = 64 << 20;
    let (tx, rx) = std::sync::mpsc::channel();
    let mut server = l.server.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < TOTAL {
            server.write_all(&chunk).unwrap();
            sent += chunk.len();
            let _ = tx.send(sent);
        }
    });
    // The proxy forwards what takes the TCP path, w2 → w1.
    let (w1, w2) = (l.w1, l.w2);
    let forwarder = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let mut moved = 0u64;
        loop {
            w2.readable().await.unwrap();
            let n = match w2.try_read(&mut buf) {
                Ok(0) => return moved,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return moved,
            };
            let mut off = 0;
            while off < n {
                w1.writable().await.unwrap();
                match w1.try_write(&buf[off..n]) {
                    Ok(k) => off += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return moved,
                }
            }
            moved += n as u64;
        }
    });
    // Nobody reads for a while: the writer must stall.
    std::thread::sleep(Duration::from_secs(2));
    let stalled_at = rx.try_iter().last().unwrap_or(0);
    assert!(
        stalled_at < 32 << 20,
        "{stalled_at} bytes went out with nobody reading"
    );
    assert_eq!(spliced.tcp_path(), (false, true));
    let direct = spliced.bytes().1;
    assert!(direct <= 4 << 20, "{direct} bytes queued past the window");
    let mut got = vec![0u8; TOTAL];
    l.client.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    for (i, b) in got.iter().enumerate() {
        assert_eq!(*b, ((i % 65_536) % 251) as u8, "byte {i}");
    }
    drop(l.server);
    let moved = forwarder.await.unwrap();
    assert_eq!(direct + moved, TOTAL as u64);
}

/// A MySQL packet: 3-byte little-endian length, sequence id, payload.
fn mysql_packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut p = vec![len[0], len[1], len[2], seq];
    p.extend_from_slice(payload);
    p
}

/// A MySQL client's direction (`GUARD_MYSQL`): packets go to the server
/// one at a time, a payload sent in pieces included; a `COM_CHANGE_USER`,
/// a header cut by the end of a send, and a packet that would go past the
/// window take the TCP path to the proxy's socket from their first byte,
/// with everything after them — never half a packet either way, and
/// nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_mysql_client_direction_hands_change_user_to_the_proxy() {
    if !have_root() {
        return;
    }
    let mut l = lab_with_far_ends();
    let spliced = l
        .relay
        .splice(&l.w1, &l.w2, GUARD_MYSQL, 0)
        .expect("splice");
    let query = mysql_packet(0, b"\x03SELECT 1");
    // Whole packets, several in one send, and the server's answers back.
    let mut two = query.clone();
    two.extend_from_slice(&mysql_packet(0, b"\x0e"));
    l.client.write_all(&two).unwrap();
    assert_eq!(read_n(&mut l.server, two.len()), two);
    l.server.write_all(b"answer").unwrap();
    assert_eq!(read_n(&mut l.client, 6), b"answer");
    // A payload in pieces (the header and command byte in the first).
    let long = mysql_packet(0, &[b'\x03'; 3000]);
    for piece in [&long[..5], &long[5..100], &long[100..]] {
        l.client.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_n(&mut l.server, long.len()), long);
    // LOAD DATA LOCAL content (sequence id > 0) may start with 0x11.
    let data = mysql_packet(2, b"\x11 file bytes");
    l.client.write_all(&data).unwrap();
    assert_eq!(read_n(&mut l.server, data.len()), data);
    assert!(idle(&l.w1), "nothing took the TCP path yet");
    let direct = (two.len() + long.len() + data.len()) as u64;
    assert_eq!(spliced.bytes().0, direct);

    // A query, then COM_CHANGE_USER and a query in the same send: the
    // first goes to the server, the rest to the proxy, in order.
    let change_user = mysql_packet(0, b"\x11anonymous\0\0");
    let mut three = query.clone();
    three.extend_from_slice(&change_user);
    three.extend_from_slice(&query);
    l.client.write_all(&three).unwrap();
    assert_eq!(read_n(&mut l.server, query.len()), query);
    let rest = [change_user.as_slice(), query.as_slice()].concat();
    assert_eq!(read_exact(&l.w1, rest.len()).await, rest);
    assert_eq!(spliced.tcp_path(), (true, false));
    assert_eq!(spliced.client_position(), ClientPosition::default());
    assert_eq!(spliced.bytes().0, direct + query.len() as u64);
    // From now on the whole direction takes the TCP path.
    l.client.write_all(&query).unwrap();
    assert_eq!(read_exact(&l.w1, query.len()).await, query);
    // The server's direction is not guarded.
    l.server.write_all(b"still direct").unwrap();
    assert_eq!(read_n(&mut l.client, 12), b"still direct");
    assert!(idle(&l.w2));
    drop(spliced);

    // A header cut by the end of a send: that packet and the next (sent
    // with the rest of it) go to the proxy, none lost.
    let mut l = lab_with_far_ends();
    let _spliced = l
        .relay
        .splice(&l.w1, &l.w2, GUARD_MYSQL, 0)
        .expect("splice");
    let both = [query.clone(), query.clone()].concat();
    l.client.write_all(&both[..2]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    l.client.write_all(&both[2..]).unwrap();
    assert_eq!(read_exact(&l.w1, both.len()).await, both);
    drop(_spliced);

    // Past the window: a packet that would go over it takes the TCP path
    // from its header on, not from the window's edge.
    let mut l = lab_with_far_ends();
    let spliced = l
        .relay
        .splice(&l.w1, &l.w2, GUARD_MYSQL, 0)
        .expect("splice");
    l.client.write_all(&query).unwrap();
    assert_eq!(read_n(&mut l.server, query.len()), query);
    let big = mysql_packet(0, &vec![b'\x03'; 5 << 20]);
    let mut client = l.client.try_clone().unwrap();
    let sent = big.clone();
    let writer = std::thread::spawn(move || client.write_all(&sent).unwrap());
    assert_eq!(read_exact(&l.w1, big.len()).await, big);
    writer.join().unwrap();
    assert_eq!(spliced.tcp_path(), (true, false));
    assert_eq!(spliced.bytes().0, query.len() as u64);
}

/// A Redis client's direction (`GUARD_REDIS`): commands go to the server
/// element by element, cut between or inside bulk strings included; an
/// `AUTH` (any case), `HELLO`, `RESET`, an inline command, a
/// non-canonical length, a header or name cut by the end of a send, and an
/// element that would go past the window take the TCP path to the proxy's
/// socket from their first byte, with everything after them.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_client_direction_hands_auth_to_the_proxy() {
    if !have_root() {
        return;
    }
    let set = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n".to_vec();
    let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec();
    let mut l = lab_with_far_ends();
    let spliced = l
        .relay
        .splice(&l.w1, &l.w2, GUARD_REDIS, 0)
        .expect("splice");
    // Pipelined, then in pieces cut inside every kind of header.
    let two = [set.clone(), get.clone()].concat();
    l.client.write_all(&two).unwrap();
    assert_eq!(read_n(&mut l.server, two.len()), two);
    // Cut inside a bulk string or between elements (the headers whole).
    for cut in [10, 13, 18, 20, 24, 27] {
        l.client.write_all(&set[..cut]).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        l.client.write_all(&set[cut..]).unwrap();
        assert_eq!(read_n(&mut l.server, set.len()), set, "cut at {cut}");
    }
    // Names that only look like warden's pass.
    let near = b"*1\r\n$4\r\nAUTO\r\n*1\r\n$6\r\nAUTHXX\r\n".to_vec();
    l.client.write_all(&near).unwrap();
    assert_eq!(read_n(&mut l.server, near.len()), near);
    assert!(idle(&l.w1), "nothing took the TCP path yet");
    let direct = (two.len() + 6 * set.len() + near.len()) as u64;
    assert_eq!(spliced.bytes().0, direct);
    // A GET, then AUTH (mixed case) and a GET in one send.
    let auth = b"*2\r\n$4\r\naUtH\r\n$2\r\npw\r\n".to_vec();
    l.client
        .write_all(&[get.clone(), auth.clone(), get.clone()].concat())
        .unwrap();
    assert_eq!(read_n(&mut l.server, get.len()), get);
    let rest = [auth.clone(), get.clone()].concat();
    assert_eq!(read_exact(&l.w1, rest.len()).await, rest);
    assert_eq!(spliced.tcp_path(), (true, false));
    assert_eq!(spliced.client_position(), ClientPosition::default());
    drop(spliced);

    // HELLO and RESET, an inline command, a leading zero, a header or a
    // name cut by the end of a send: each goes to the proxy, with what
    // follows it.
    for (odd, cut) in [
        (&b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"[..], 0),
        (b"*1\r\n$5\r\nreset\r\n", 0),
        (b"PING\r\n", 0),
        (b"*01\r\n$4\r\nPING\r\n", 0),
        (b"*1\r\n$04\r\nPING\r\n", 0),
        (b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n", 2),
        (b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n", 6),
        (b"*1\r\n$4\r\nAUTH\r\n", 10),
    ] {
        let mut l = lab_with_far_ends();
        let _spliced = l
            .relay
            .splice(&l.w1, &l.w2, GUARD_REDIS, 0)
            .expect("splice");
        if cut > 0 {
            l.client.write_all(&odd[..cut]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        l.client.write_all(&odd[cut..]).unwrap();
        assert_eq!(
            read_exact(&l.w1, odd.len()).await,
            odd,
            "{}",
            String::from_utf8_lossy(odd)
        );
    }

    // Past the window: the large value's bulk string (and what follows)
    // takes the TCP path at its header; the proxy learns one is left.
    let mut l = lab_with_far_ends();
    let spliced = l
        .relay
        .splice(&l.w1, &l.w2, GUARD_REDIS, 0)
        .expect("splice");
    let value = vec![b'v'; 5 << 20];
    let head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n".to_vec();
    let mut big = format!("${}\r\n", value.len()).into_bytes();
    big.extend_from_slice(&value);
    big.extend_from_slice(b"\r\n");
    let mut client = l.client.try_clone().unwrap();
    let sent = [head.clone(), big.clone()].concat();
    let writer = std::thread::spawn(move || client.write_all(&sent).unwrap());
    assert_eq!(read_exact(&l.w1, big.len()).await, big);
    writer.join().unwrap();
    assert_eq!(read_n(&mut l.server, head.len()), head);
    assert_eq!(spliced.tcp_path(), (true, false));
    assert_eq!(
        spliced.client_position(),
        ClientPosition {
            continues: false,
            args: 1
        }
    );
}

/// A client that sends before it has read the reply the proxy held back
/// for the hand-over (a pipelining or multiplexing client): nothing is
/// redirected — its bytes, and the server's answer, keep the TCP path
/// through the proxy's sockets for good, so nothing can overtake the
/// reply still on its way or a command the proxy has not forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_sends_before_reading_the_held_reply_keeps_the_tcp_path() {
    if !have_root() {
        return;
    }
    let mut l = lab_with_far_ends();
    let held = b"+held\r\n";
    let spliced = l
        .relay
        .splice(&l.w1, &l.w2, GUARD_REDIS, held.len())
        .expect("splice");
    let q1 = b"*1\r\n$4\r\nPING\r\n";
    l.client.write_all(q1).unwrap();
    assert_eq!(read_exact(&l.w1, q1.len()).await, q1);
    // The held reply goes out after the splice, as warden sends it.
    l.w1.writable().await.unwrap();
    assert_eq!(l.w1.try_write(held).unwrap(), held.len());
    assert_eq!(read_n(&mut l.client, held.len()), held);
    // Later sends take the same path; the proxy forwards them in order.
    let q2 = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    l.client.write_all(q2).unwrap();
    assert_eq!(read_exact(&l.w1, q2.len()).await, q2);
    // The server's answers too.
    l.server.write_all(b"+PONG\r\n$-1\r\n").unwrap();
    assert_eq!(read_exact(&l.w2, 12).await, b"+PONG\r\n$-1\r\n");
    assert_eq!(spliced.bytes(), (0, 0));
    assert_eq!(spliced.tcp_path(), (true, true));
    assert_eq!(spliced.client_position(), ClientPosition::default());
}

/// A server that sends first after the splice (before the client's first
/// send passed its check) keeps the TCP path: its bytes reach the proxy's
/// socket; and once the proxy has not forwarded them, its next answer
/// cannot overtake them — the server's direction stays on the TCP path,
/// while the client's is redirected.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_sends_first_keeps_the_tcp_path() {
    if !have_root() {
        return;
    }
    let mut l = lab_with_far_ends();
    let spliced = l.relay.splice(&l.w1, &l.w2, GUARD_NONE, 0).expect("splice");
    l.server.write_all(b"notice").unwrap();
    assert_eq!(read_exact(&l.w2, 6).await, b"notice");
    // The client has read all warden wrote (nothing): redirected.
    l.client.write_all(b"query").unwrap();
    assert_eq!(read_n(&mut l.server, 5), b"query");
    assert!(idle(&l.w1));
    // The server's answer: its count shows the notice warden read but has
    // not forwarded yet, so the TCP path for good.
    l.server.write_all(b"reply").unwrap();
    assert_eq!(read_exact(&l.w2, 5).await, b"reply");
    assert_eq!(spliced.bytes(), (5, 0));
    assert_eq!(spliced.tcp_path(), (false, true));
}
