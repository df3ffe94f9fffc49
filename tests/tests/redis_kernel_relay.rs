//! The eBPF kernel relay on Redis routes end to end: a real redis-server
//! behind a warden whose monitor is loaded (root). A session past its
//! first round trips is spliced in the kernel, and every byte (a 1 MB value
//! both ways) still arrives; its end record says so. After the splice a
//! client's `AUTH` and `HELLO … AUTH` still log in as the route's user only
//! (the kernel hands them to warden), and `RESET` ends the session. A
//! route with a command list (deny or allow) is spliced too, and handed
//! back to user space before a listed command (only then), which is
//! refused in place; one with
//! `kernel_relay = false` stays in user space; a freeze ends a spliced
//! session.
//!
//! Needs root (CI runs as root with `WARDEN_REQUIRE_EBPF=1`, so these never
//! skip there).

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};
use warden_tests::cgroup::Cgroup;
use warden_tests::redis::{command, Raw, RedisServer};
use warden_tests::{
    byte_counts, free_port, have_root, metric, my_uid, session_ends, wait_for, Instance,
};

const DEFAULT_PW: &str = "redis-CANARY-4e21-kernel";
const APP_PW: &str = "redis-CANARY-9c03-kernel-app";

struct Setup {
    server: RedisServer,
    warden: Instance,
    _daemon: warden_tests::Daemon,
    /// Route `cache`: no command list, kernel relay on (the default).
    cache: u16,
    /// Route `cache-deny`: a deny list.
    deny: u16,
    /// Route `cache-off`: `kernel_relay = false`.
    off: u16,
    /// Route `cache-allow`: an allow list.
    allowed: u16,
}

/// `extra` goes after the workload `me` (more workloads); `allow` is the
/// allow list of routes `cache` and `cache-off`.
fn setup(extra: &str, allow: &str) -> Setup {
    let server = RedisServer::start(DEFAULT_PW, APP_PW);
    let [cache, deny, off, allowed] = [free_port(), free_port(), free_port(), free_port()];
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}
{extra}

[[route]]
name = "cache"
kind = "redis"
listen = "127.0.0.1:{cache}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
allow = [{allow}]

[[route]]
name = "cache-deny"
kind = "redis"
listen = "127.0.0.1:{deny}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
deny_commands = ["CONFIG"]
kernel_relay = true
allow = ["me"]

[[route]]
name = "cache-off"
kind = "redis"
listen = "127.0.0.1:{off}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
kernel_relay = false
allow = [{allow}]

[[route]]
name = "cache-allow"
kind = "redis"
listen = "127.0.0.1:{allowed}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
allow_commands = ["GET", "SET", "PING"]
allow = ["me"]

[monitor]
ebpf = "required"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("cache/default", DEFAULT_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();
    Setup {
        server,
        warden,
        _daemon: daemon,
        cache,
        deny,
        off,
        allowed,
    }
}

fn relay_metric(w: &Instance, route: &str, result: &str) -> f64 {
    metric(
        w,
        &format!("warden_redis_kernel_relay_total{{result=\"{result}\",route=\"{route}\"}}"),
    )
}

/// A session on route `cache`, warmed up and spliced (PINGs until the
/// metric says so, or 20 s): the client's socket joins the kernel's map
/// off the session's thread after the first quiet moment, and the splice
/// comes at a later one.
fn spliced_session(s: &Setup) -> Raw {
    spliced_session_on(s, s.cache, "cache")
}

/// [`spliced_session`] on another route.
fn spliced_session_on(s: &Setup, port: u16, route: &str) -> Raw {
    let mut c = Raw::connect(port);
    warm_up(&mut c);
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay_metric(&s.warden, route, "spliced") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the splice"
        );
        c.send(&command(&[b"PING"]));
        assert_eq!(c.read_at_least(7), b"+PONG\r\n");
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// More round trips than warden waits for before the hand-over (32).
fn warm_up(c: &mut Raw) {
    for i in 0..40 {
        let key = format!("k{i}");
        c.send(&command(&[
            b"SET",
            key.as_bytes(),
            i.to_string().as_bytes(),
        ]));
        assert_eq!(c.read_at_least(5), b"+OK\r\n", "SET {i}");
    }
}

#[test]
fn a_long_session_is_spliced_and_a_1mb_value_goes_both_ways() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let mut c = spliced_session(&s);
    // Client → server: 1 MB (past the kernel's window: part of it takes
    // the TCP path through warden), checked on the server.
    let value: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    c.send(&command(&[b"SET", b"big", &value]));
    assert_eq!(c.read_at_least(5), b"+OK\r\n");
    assert_eq!(
        s.server
            .cli_as("default", DEFAULT_PW, &["STRLEN", "big"])
            .trim(),
        "1048576"
    );
    // Server → client: the same megabyte, whole and in order.
    c.send(&command(&[b"GET", b"big"]));
    let mut want = b"$1048576\r\n".to_vec();
    want.extend_from_slice(&value);
    want.extend_from_slice(b"\r\n");
    let got = c.read_at_least(want.len());
    assert!(got == want, "GET big: {} bytes back", got.len());
    // Commands keep their order after the splice.
    for i in 0..40 {
        c.send(&command(&[b"INCR", b"n"]));
        assert_eq!(
            c.read_at_least(3 + (i + 1).to_string().len()),
            format!(":{}\r\n", i + 1).as_bytes()
        );
    }
    c.send(&command(&[b"GET", b"k7"]));
    assert_eq!(c.read_at_least(7), b"$1\r\n7\r\n");
    drop(c);
    wait_for("session.end", || {
        !session_ends(&s.warden, Some("cache")).is_empty()
    });
    let end = session_ends(&s.warden, Some("cache")).remove(0);
    assert!(end.contains("closed (kernel relay)"), "{end}");
    let (up, down) = byte_counts(&end);
    assert!(up > 1 << 20 && down > 1 << 20, "{end}");
    // A spliced session's upstream connection is closed, never pooled.
    assert_eq!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"returned\",route=\"cache\"}"
        ),
        0.0
    );
    // A request/response client passes the splice's check: the kernel
    // moved its bytes (not warden, over TCP).
    assert_eq!(relay_metric(&s.warden, "cache", "tcp_path"), 0.0);
}

/// After the splice the kernel hands `AUTH`, `HELLO` and `RESET` to
/// warden: a client's `AUTH` as a password-less user (`free`, which the
/// server would accept) leaves it logged in as the route's user, `HELLO 3
/// AUTH …` too, and `RESET` ends the session with an error.
#[test]
fn a_spliced_session_cannot_log_in_as_another_user() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    s.server.cli_as(
        "default",
        DEFAULT_PW,
        &["ACL", "SETUSER", "free", "on", "nopass", "~*", "+@all"],
    );
    let mut c = spliced_session(&s);
    let whoami = |c: &mut Raw| {
        c.send(&command(&[b"ACL", b"WHOAMI"]));
        c.read_at_least(13)
    };
    c.send(&command(&[b"AUTH", b"free", b"anything"]));
    assert_eq!(c.read_at_least(5), b"+OK\r\n");
    assert_eq!(whoami(&mut c), b"$7\r\ndefault\r\n");
    // HELLO 3 with an AUTH pair: the reply is a RESP3 map naming the
    // server; the login is still the route's.
    c.send(&command(&[b"HELLO", b"3", b"AUTH", b"free", b"x"]));
    let hello = c.read_until(b"$7\r\nmodules\r\n*0\r\n");
    assert!(
        hello.starts_with(b"%"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    assert_eq!(whoami(&mut c), b"$7\r\ndefault\r\n");
    c.send(&command(&[b"RESET"]));
    let got = c.read_until(b"\r\n");
    assert!(
        got.starts_with(b"-ERR warden: RESET"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // The session ends after RESET (the end record says why).
    assert!(c.read_to_end().is_empty());
    wait_for("session.end", || {
        !session_ends(&s.warden, Some("cache")).is_empty()
    });
    let end = session_ends(&s.warden, Some("cache")).remove(0);
    assert!(end.contains("RESET refused (kernel relay)"), "{end}");
    assert!(
        !end.contains("anything") && !end.contains(DEFAULT_PW),
        "{end}"
    );
}

#[test]
fn a_route_without_kernel_relay_stays_in_user_space() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let route = "cache-off";
    let mut c = Raw::connect(s.off);
    warm_up(&mut c);
    c.send(&command(&[b"PING"]));
    assert_eq!(c.read_at_least(7), b"+PONG\r\n");
    drop(c);
    wait_for("session.end", || {
        !session_ends(&s.warden, Some(route)).is_empty()
    });
    let end = session_ends(&s.warden, Some(route)).remove(0);
    assert!(!end.contains("kernel relay"), "{end}");
    for result in ["spliced", "busy", "not_local"] {
        assert_eq!(
            relay_metric(&s.warden, route, result),
            0.0,
            "{route} {result}"
        );
    }
    // Still in user space at the end: the connection is pooled.
    wait_for("the pooled connection", || {
        metric(
            &s.warden,
            &format!("warden_pg_pool_total{{result=\"returned\",route=\"{route}\"}}"),
        ) >= 1.0
    });
}

/// A route with a deny list is spliced too: the kernel reads every
/// command's name, hands the session back before a listed one, and warden
/// refuses it exactly where its reply would have been — inside a pipeline,
/// after replies the server sent straight to the client — then relays the
/// rest of the session in user space.
#[test]
fn a_listed_command_hands_a_spliced_session_back_and_is_refused_in_place() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let route = "cache-deny";
    let mut c = spliced_session_on(&s, s.deny, route);
    // In the kernel: not listed.
    c.send(&command(&[b"GET", b"k3"]));
    assert_eq!(c.read_at_least(7), b"$1\r\n3\r\n");
    // One write: a command the kernel passes, a listed one, and one after.
    let pipeline = [
        command(&[b"GET", b"k1"]),
        command(&[b"config", b"GET", b"port"]),
        command(&[b"GET", b"k2"]),
    ]
    .concat();
    c.send(&pipeline);
    let got = c.read_until(b"\r\n$1\r\n2\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("$1\r\n1\r\n-NOPERM ") && text.contains("cache-deny"),
        "{text}"
    );
    assert_eq!(text.matches("\r\n").count(), 5, "{text}");
    assert_eq!(relay_metric(&s.warden, route, "unspliced"), 1.0);
    // In user space from here: refused again, the rest relayed.
    c.send(&command(&[b"CONFIG", b"GET", b"port"]));
    assert!(c.read_until(b"\r\n").starts_with(b"-NOPERM"));
    c.send(&command(&[b"GET", b"k4"]));
    assert_eq!(c.read_at_least(7), b"$1\r\n4\r\n");
    drop(c);
    wait_for("session.end", || {
        !session_ends(&s.warden, Some(route)).is_empty()
    });
    let end = session_ends(&s.warden, Some(route)).remove(0);
    assert!(
        end.contains("kernel relay") && end.contains("2 commands refused"),
        "{end}"
    );
}

/// An allow list: what it allows stays in the kernel (the session is not
/// handed back for it), anything else is handed back and refused in place.
#[test]
fn an_allow_list_keeps_allowed_commands_in_the_kernel_and_refuses_the_rest_in_place() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let route = "cache-allow";
    let mut c = spliced_session_on(&s, s.allowed, route);
    for i in 0..20 {
        let key = format!("k{i}");
        c.send(&command(&[b"get", key.as_bytes()]));
        let want = format!("${}\r\n{i}\r\n", i.to_string().len());
        assert_eq!(c.read_at_least(want.len()), want.as_bytes(), "GET {i}");
    }
    assert_eq!(relay_metric(&s.warden, route, "unspliced"), 0.0);
    c.send(&[command(&[b"DEL", b"k1"]), command(&[b"GET", b"k1"])].concat());
    let got = c.read_until(b"\r\n$1\r\n1\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("-NOPERM ") && text.contains("\"DEL\""),
        "{text}"
    );
    assert_eq!(relay_metric(&s.warden, route, "unspliced"), 1.0);
}

/// A spliced session (route `cache`) and one in user space (`cache-off`).
#[test]
fn a_freeze_ends_a_spliced_session_and_one_in_user_space() {
    if !have_root() {
        return;
    }
    // The frozen workload is a client in a cgroup of its own: a freeze
    // also freezes every process attesting to the workload, never uid 0.
    let cg = Cgroup::new("redis-kernel-relay");
    let workload = format!(
        "\n[[workload]]\nname = \"kr\"\nspiffe_id = \"spiffe://example.org/kr\"\nselectors = {{ uid = 0, cgroup = \"{}\" }}\n",
        cg.name
    );
    let s = setup(&workload, "\"me\", \"kr\"");
    let script = format!(
        r#"
import socket, sys
conns = []
for port in ({spliced}, {user_space}):
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    for i in range(40):
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert f.readline() == b"+PONG\r\n"
    conns.append((s, f))
print("warm", flush=True)
# One more round trip on the first connection per line until an empty one.
while sys.stdin.readline().strip() == "ping":
    s, f = conns[0]
    s.sendall(b"*1\r\n$4\r\nPING\r\n")
    assert f.readline() == b"+PONG\r\n"
    print("pong", flush=True)
for s, f in conns:
    print(f.read().decode(errors="replace").strip(), flush=True)
"#,
        spliced = s.cache,
        user_space = s.off,
    );
    let path = s.warden.dir.path().join("client.py");
    std::fs::write(&path, script).unwrap();
    let mut client = cg
        .command(&format!("timeout 60 python3 {}", path.display()))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "warm");
    // Round trips until the splice (it follows the client socket's join,
    // made off the session's thread, at a later quiet moment).
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay_metric(&s.warden, "cache", "spliced") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the splice"
        );
        writeln!(stdin, "ping").unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "pong");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = s
        .warden
        .run(&["freeze", "kr", "--reason", "kernel relay test"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    writeln!(stdin).unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = client.wait().unwrap();
    assert!(status.success(), "{rest}");
    // One line per connection, each the freeze's error (then EOF).
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines.len(), 2, "{rest}");
    for line in lines {
        assert!(
            line.starts_with("-NOPERM") && line.contains("frozen"),
            "{rest}"
        );
    }
    wait_for("the frozen sessions' records", || {
        session_ends(&s.warden, Some("cache"))
            .iter()
            .any(|e| e.contains("closed: workload frozen (kernel relay)"))
            && session_ends(&s.warden, Some("cache-off"))
                .iter()
                .any(|e| e.contains("closed: workload frozen\""))
    });
    s.warden.run(&["unfreeze", "kr"]).ok();
}

/// A multiplexing client (StackExchange.Redis, ioredis, redis-rs'
/// multiplexed connection) sends whenever its application asks, without
/// waiting for earlier replies, so it may send right while warden hands
/// its session to the kernel. Its commands must still reach the server in
/// the order sent, and it must never see an error for it: each of many
/// sessions sends `INCRBY key n` for n = 1, 2, 3, … at a jittered pace from
/// one thread while another reads the replies, which must be the running
/// sums (two commands swapped anywhere would show).
#[test]
fn a_multiplexing_client_keeps_its_order_across_the_hand_over() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    const SESSIONS: usize = 24;
    const COMMANDS: u64 = 400;
    let before = relay_metric(&s.warden, "cache", "spliced");
    std::thread::scope(|scope| {
        for session in 0..SESSIONS {
            let port = s.cache;
            scope.spawn(move || {
                let key = format!("mux{session}");
                let mut c = Raw::connect(port);
                let reader = c.0.try_clone().unwrap();
                let read = std::thread::spawn(move || {
                    let mut lines = BufReader::new(reader);
                    let mut line = String::new();
                    for n in 1..=COMMANDS {
                        line.clear();
                        lines.read_line(&mut line).unwrap();
                        assert_eq!(
                            line.trim_end(),
                            format!(":{}", n * (n + 1) / 2),
                            "session {session}: reply {n} of {COMMANDS}"
                        );
                    }
                });
                for i in 0..COMMANDS {
                    let by = (i + 1).to_string();
                    c.send(&command(&[b"INCRBY", key.as_bytes(), by.as_bytes()]));
                    // Gaps from none to about 100 µs: quiet moments (every
                    // command answered) come often, and so do sends that
                    // race them.
                    let spin = Instant::now();
                    let gap = Duration::from_micros((i * 37 + session as u64 * 11) % 100);
                    while spin.elapsed() < gap {
                        std::hint::spin_loop();
                    }
                }
                read.join().unwrap();
            });
        }
    });
    // The sessions were offered to the kernel (those whose client socket
    // joined its map in time were spliced), so the test covered the
    // hand-over, not only user space.
    assert!(
        relay_metric(&s.warden, "cache", "spliced") > before,
        "no session was spliced"
    );
}
