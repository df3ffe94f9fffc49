//! Redis routes end to end against a real `redis-server`: redis-cli, raw
//! RESP and redis-py through warden with no password; warden's own AUTH
//! upstream (default user and an ACL user); a client's AUTH answered
//! locally; pipelining, MULTI/EXEC, SUBSCRIBE, a 1 MB value; the command
//! deny list; refusals as RESP errors naming route and workload (not
//! allowed, wrong stored password, unreachable upstream, frozen);
//! malformed RESP; and the audit log (start/end records, never a password).

use std::process::Command;
use warden_tests::redis::{cli, command, Raw, RedisServer};
use warden_tests::{files_containing, free_port, metric, my_uid, Instance};

const DEFAULT_PW: &str = "redis-CANARY-5d1f-default";
const APP_PW: &str = "redis-CANARY-77aa-app";
const WRONG_PW: &str = "redis-CANARY-0bad-wrong";

struct Setup {
    server: RedisServer,
    warden: Instance,
    _daemon: warden_tests::Daemon,
    cache: u16,
    acl: u16,
    other: u16,
    wrong: u16,
    down: u16,
}

fn setup() -> Setup {
    let server = RedisServer::start(DEFAULT_PW, APP_PW);
    let [cache, acl, other, wrong, down] = [
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    ];
    let unreachable = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[workload]]
name = "other"
spiffe_id = "spiffe://example.org/other"
selectors = {{ uid = 4242424 }}

[[route]]
name = "cache"
kind = "redis"
listen = "127.0.0.1:{cache}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
deny_commands = ["CONFIG", "FLUSHALL"]
allow = ["me"]

[[route]]
name = "cache-acl"
kind = "redis"
listen = "127.0.0.1:{acl}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "cache/app", cache_ttl = "1m" }}
allow_commands = ["GET", "SET", "ACL|WHOAMI", "PING"]
allow = ["me"]

[[route]]
name = "cache-other"
kind = "redis"
listen = "127.0.0.1:{other}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
deny_commands = ["CONFIG"]
allow = ["other"]

[[route]]
name = "cache-wrong"
kind = "redis"
listen = "127.0.0.1:{wrong}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "cache/wrong" }}
deny_commands = ["CONFIG"]
allow = ["me"]

[[route]]
name = "cache-down"
kind = "redis"
listen = "127.0.0.1:{down}"
upstream = "127.0.0.1:{unreachable}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
deny_commands = ["CONFIG"]
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("cache/default", DEFAULT_PW.as_bytes()).ok();
    warden.put("cache/app", APP_PW.as_bytes()).ok();
    warden.put("cache/wrong", WRONG_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();
    Setup {
        server,
        warden,
        _daemon: daemon,
        cache,
        acl,
        other,
        wrong,
        down,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn redis_clients_reach_the_server_through_warden_without_a_password() {
    let s = setup();

    // redis-cli with no password: SET/GET.
    assert_eq!(cli(s.cache, &["SET", "k", "v"]), (0, "OK\n".into()));
    assert_eq!(cli(s.cache, &["GET", "k"]).1, "v\n");
    // warden logged in upstream itself: as the default user, or the ACL user.
    assert_eq!(cli(s.cache, &["ACL", "WHOAMI"]).1, "default\n");
    assert_eq!(cli(s.acl, &["ACL", "WHOAMI"]).1, "app\n");

    // A client's own AUTH is answered here and never reaches the server.
    let mut c = Raw::connect(s.acl);
    c.send(b"AUTH nobody anything\r\n");
    c.send(&command(&[b"ACL", b"WHOAMI"]));
    assert_eq!(text(&c.read_until(b"app\r\n")), "+OK\r\n$3\r\napp\r\n");
    let log = s.server.cli_as("app", APP_PW, &["ACL", "LOG"]);
    assert!(
        !log.contains("nobody"),
        "the client's AUTH reached the server: {log}"
    );
    // HELLO 3 with the client's AUTH: warden's login instead, RESP3 map back.
    c.send(b"HELLO 3 AUTH nobody anything\r\n");
    let hello = text(&c.read_until(b"modules"));
    assert!(hello.starts_with('%') && hello.contains("redis"), "{hello}");
    drop(c);

    // The allow list of the ACL route: SET passes, DEL is refused with NOPERM.
    let (_, out) = cli(s.acl, &["DEL", "k"]);
    assert!(
        out.contains(
            "NOPERM warden: route \"cache-acl\" does not allow command \"DEL\" for workload \"me\""
        ),
        "{out}"
    );

    // Deny list: CONFIG refused with NOPERM, GET still served on the same connection.
    let mut c = Raw::connect(s.cache);
    c.send(&command(&[b"CONFIG", b"GET", b"requirepass"]));
    c.send(&command(&[b"GET", b"k"]));
    let got = text(&c.read_until(b"$1\r\nv\r\n"));
    assert_eq!(
        got,
        "-NOPERM warden: route \"cache\" does not allow command \"CONFIG\" for workload \"me\"\r\n$1\r\nv\r\n"
    );
    assert!(!got.contains(DEFAULT_PW));

    // Pipelining: 100 commands in one write, 100 answers in order.
    let mut batch = Vec::new();
    for _ in 0..100 {
        batch.extend_from_slice(&command(&[b"INCR", b"ctr"]));
    }
    c.send(&batch);
    let got = text(&c.read_until(b":100\r\n"));
    let expected: String = (1..=100).map(|i| format!(":{i}\r\n")).collect();
    assert_eq!(got, expected);

    // MULTI/EXEC.
    c.send(b"MULTI\r\nINCR t\r\nINCR t\r\nEXEC\r\n");
    assert_eq!(
        text(&c.read_until(b":2\r\n")),
        "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:2\r\n"
    );

    // A 1 MB value round-trips.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    c.send(&command(&[b"SET", b"big", &big]));
    assert_eq!(text(&c.read_at_least(5)), "+OK\r\n");
    c.send(&command(&[b"GET", b"big"]));
    let got = c.read_at_least(big.len() + 13);
    let mut want = format!("${}\r\n", big.len()).into_bytes();
    want.extend_from_slice(&big);
    want.extend_from_slice(b"\r\n");
    assert!(got == want, "1 MB value differs ({} bytes back)", got.len());

    // A blocking command waits upstream; its answer comes when pushed.
    let mut blocked = Raw::connect(s.cache);
    blocked.send(&command(&[b"BLPOP", b"queue", b"10"]));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(cli(s.cache, &["RPUSH", "queue", "job"]).1, "1\n");
    assert_eq!(
        text(&blocked.read_until(b"job\r\n")),
        "*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n"
    );

    // SUBSCRIBE, PUBLISH from a second client.
    let mut sub = Raw::connect(s.cache);
    sub.send(&command(&[b"SUBSCRIBE", b"news"]));
    assert_eq!(
        text(&sub.read_until(b":1\r\n")),
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(cli(s.cache, &["PUBLISH", "news", "hello"]).1, "1\n");
    assert_eq!(
        text(&sub.read_until(b"hello\r\n")),
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    drop(sub);

    // redis-py (Debian python3-redis), if installed.
    let py = Command::new("/usr/bin/python3")
        .args([
            "-c",
            &format!(
                "import redis; r = redis.Redis(host='127.0.0.1', port={}, password='ignored'); r.set('py', 'from-python'); p = r.pipeline(); p.incr('pyc'); p.incr('pyc'); print(r.get('py').decode(), p.execute())",
                s.cache
            ),
        ])
        .output();
    match py {
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'redis'") => {
            eprintln!("skipping redis-py: python3-redis is not installed");
        }
        Ok(o) => assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "from-python [1, 2]\n",
            "{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("skipping redis-py: {e}"),
    }

    // Refusals before the session: RESP errors naming route and workload.
    let mut c = Raw::connect(s.other);
    c.send(b"PING\r\n");
    let got = text(&c.read_to_end());
    assert!(
        got.starts_with("-NOPERM warden:")
            && got.contains("\"cache-other\"")
            && got.contains("workload \"me\""),
        "{got}"
    );
    let mut c = Raw::connect(s.wrong);
    c.send(b"PING\r\n");
    let got = text(&c.read_to_end());
    assert!(
        got.starts_with("-WRONGPASS warden: upstream rejected the credential for route \"cache-wrong\" (secret cache/wrong v1, workload \"me\")"),
        "{got}"
    );
    assert!(!got.contains(WRONG_PW), "{got}");
    let mut c = Raw::connect(s.down);
    c.send(b"PING\r\n");
    let got = text(&c.read_to_end());
    assert!(
        got.starts_with(
            "-ERR warden: upstream unreachable for route \"cache-down\" (workload \"me\")"
        ),
        "{got}"
    );

    // Malformed RESP: a protocol error and a close; the daemon serves on.
    let mut c = Raw::connect(s.cache);
    c.send(b"*1\r\n:x\r\n");
    assert_eq!(
        text(&c.read_to_end()),
        "-ERR Protocol error: expected '$', got ':'\r\n"
    );
    let mut c = Raw::connect(s.cache);
    c.send(b"*2\r\n$3\r\nGET\r\n$99999999999\r\n");
    assert!(text(&c.read_to_end()).starts_with("-ERR Protocol error: invalid bulk length"));
    assert_eq!(cli(s.cache, &["GET", "k"]).1, "v\n");

    // Audit: session start and end records, never a password.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    let on_cache = |action: &str| {
        audit
            .lines()
            .filter(|l| l.contains(&format!("\"{action}\"")) && l.contains("\"route\":\"cache\""))
            .count()
    };
    assert!(on_cache("session.start") >= 5, "{audit}");
    assert!(on_cache("session.end") >= 5, "{audit}");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"session.end\"") && l.contains("1 commands refused")),
        "{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"session.deny\"") && l.contains("cache-other")),
        "{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"session.error\"") && l.contains("cache-wrong")),
        "{audit}"
    );
    for pw in [DEFAULT_PW, APP_PW, WRONG_PW] {
        let leaks = files_containing(s.warden.dir.path(), pw.as_bytes());
        assert!(leaks.is_empty(), "{pw} found in {leaks:?}");
    }

    // A freeze refuses the next session.
    let out = s.warden.run(&["freeze", "me", "--reason", "redis test"]);
    assert_eq!(out.code, 0, "{out:#?}");
    let (_, out) = cli(s.cache, &["GET", "k"]);
    assert!(
        out.contains("NOPERM") && out.contains("frozen") && out.contains("\"cache\""),
        "{out}"
    );
    s.warden.run(&["unfreeze", "me"]).ok();
    assert_eq!(cli(s.cache, &["GET", "k"]).1, "v\n");
}

/// Waits until the route's pool has taken back `n` connections in all (the
/// reset runs after the client has gone: the next client must not race it).
fn wait_returned(w: &Instance, route: &str, n: f64) {
    let series = format!("warden_pg_pool_total{{result=\"returned\",route=\"{route}\"}}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while metric(w, &series) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool of {route} never took back {n} connection(s)"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// One command on a fresh raw connection, reading until `until`.
fn ask(port: u16, args: &[&[u8]], until: &[u8]) -> String {
    let mut c = Raw::connect(port);
    c.send(&command(args));
    text(&c.read_until(until))
}

/// `CLIENT INFO` on a fresh connection (the server's view of its state).
fn client_info(port: u16) -> String {
    ask(port, &[b"CLIENT", b"INFO"], b"\n\r\n")
        .split_once("\r\n")
        .map(|(_, rest)| rest.trim_end().to_string())
        .unwrap_or_default()
}

fn field<'a>(info: &'a str, key: &str) -> &'a str {
    info.split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or("?")
}

#[test]
fn redis_client_tls_and_a_pool_that_resets_between_clients() {
    let server = RedisServer::start(DEFAULT_PW, APP_PW);
    let [tls, offer, pooled, unpooled] = [free_port(), free_port(), free_port(), free_port()];
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "tls-only"
kind = "redis"
listen = "127.0.0.1:{tls}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
deny_commands = ["CONFIG"]
client_tls = "require"
allow = ["me"]

[[route]]
name = "tls-offer"
kind = "redis"
listen = "127.0.0.1:{offer}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
deny_commands = ["CONFIG"]
client_tls = true
allow = ["me"]

[[route]]
name = "pooled"
kind = "redis"
listen = "127.0.0.1:{pooled}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "cache/app" }}
deny_commands = ["CONFIG"]
pool = {{ max_idle = 4 }}
allow = ["me"]

[[route]]
name = "unpooled"
kind = "redis"
listen = "127.0.0.1:{unpooled}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "cache/app" }}
deny_commands = ["CONFIG"]
pool = false
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("cache/default", DEFAULT_PW.as_bytes()).ok();
    warden.put("cache/app", APP_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();
    let bundle = warden.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        warden.run(&["svid", "bundle"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let ca = bundle.display().to_string();

    // client_tls: redis-cli over TLS, verifying warden's certificate
    // against warden's CA.
    let tls_cli = |port: u16, args: &[&str]| {
        let mut all = vec!["--tls", "--cacert", ca.as_str()];
        all.extend_from_slice(args);
        cli(port, &all)
    };
    assert_eq!(tls_cli(tls, &["SET", "tk", "tv"]), (0, "OK\n".into()));
    assert_eq!(tls_cli(tls, &["ACL", "WHOAMI"]).1, "default\n");
    // redis-py with ssl, verifying the certificate and the host name.
    let py = Command::new("/usr/bin/python3")
        .args([
            "-c",
            &format!(
                "import redis; r = redis.Redis(host='127.0.0.1', port={tls}, ssl=True, ssl_ca_certs='{ca}', ssl_check_hostname=True); v = r.get('tk').decode(); c = r.connection_pool.get_connection('GET'); print(v, c._sock.version())"
            ),
        ])
        .output();
    match py {
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'redis'") => {
            eprintln!("skipping redis-py: it is not installed (pip install redis)");
        }
        Ok(o) => assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "tv TLSv1.3\n",
            "{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("skipping redis-py: {e}"),
    }
    // client_tls = "require": a plain-text client gets a RESP error that
    // says how to connect, then the close; a log line and a metric.
    let mut c = Raw::connect(tls);
    c.send(b"PING\r\n");
    assert_eq!(
        text(&c.read_to_end()),
        "-ERR warden: route \"tls-only\" requires TLS (client_tls = \"require\"); connect with TLS, e.g. redis-cli --tls --cacert <warden's CA certificate>\r\n"
    );
    assert_eq!(
        metric(
            &warden,
            "warden_sessions_total{result=\"tls_required\",route=\"tls-only\",workload=\"\"}"
        ),
        1.0
    );
    assert!(
        daemon
            .log_text()
            .contains("plain-text client refused: the route requires TLS"),
        "{}",
        daemon.log_text()
    );
    // A client that does not trust warden's CA fails its handshake: counted.
    let (_, out) = cli(tls, &["--tls", "PING"]);
    assert!(!out.contains("PONG"), "{out}");
    let series = "warden_sessions_total{result=\"tls_error\",route=\"tls-only\",workload=\"\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while metric(&warden, series) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no tls_error counted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A TLS client on a route without client_tls: closed (it could not
    // read a plain-text error), logged and counted.
    let (_, out) = tls_cli(unpooled, &["PING"]);
    assert!(!out.contains("PONG"), "{out}");
    // (redis-cli tries to connect again once.)
    assert!(
        metric(
            &warden,
            "warden_sessions_total{result=\"tls_not_offered\",route=\"unpooled\",workload=\"\"}"
        ) >= 1.0
    );
    assert!(
        daemon
            .log_text()
            .contains("TLS client refused: the route does not offer TLS"),
        "{}",
        daemon.log_text()
    );
    // client_tls = true: TLS and plain text both served.
    assert_eq!(tls_cli(offer, &["GET", "tk"]).1, "tv\n");
    assert_eq!(cli(offer, &["GET", "tk"]).1, "tv\n");

    // The pool: a client that leaves at a command boundary hands its
    // connection on, reset. The first client leaves a name, database 5, an
    // open MULTI and a key in database 5.
    let mut c = Raw::connect(pooled);
    c.send(&command(&[b"CLIENT", b"ID"]));
    let id = text(&c.read_until(b"\r\n"));
    c.send(b"CLIENT SETNAME dirty\r\nSELECT 5\r\nSET only5 x\r\nMULTI\r\nSET a b\r\n");
    assert_eq!(
        text(&c.read_until(b"+QUEUED\r\n")),
        "+OK\r\n+OK\r\n+OK\r\n+OK\r\n+QUEUED\r\n"
    );
    drop(c);
    wait_returned(&warden, "pooled", 1.0);
    let info = client_info(pooled);
    assert_eq!(format!(":{}\r\n", field(&info, "id")), id, "{info}");
    assert_eq!(
        (
            field(&info, "name"),
            field(&info, "db"),
            field(&info, "multi"),
            field(&info, "user"),
            field(&info, "resp")
        ),
        ("", "0", "-1", "app", "2"),
        "{info}"
    );
    wait_returned(&warden, "pooled", 2.0);
    assert_eq!(ask(pooled, &[b"GET", b"only5"], b"\r\n"), "$-1\r\n");
    wait_returned(&warden, "pooled", 3.0);
    assert_eq!(
        ask(pooled, &[b"EXEC"], b"\r\n"),
        "-ERR EXEC without MULTI\r\n"
    );
    wait_returned(&warden, "pooled", 4.0);

    // SUBSCRIBE left open (RESP2, unsynchronised) and CLIENT TRACKING on
    // (RESP3): neither reaches the next client.
    let mut c = Raw::connect(pooled);
    c.send(&command(&[b"SUBSCRIBE", b"news"]));
    c.read_until(b":1\r\n");
    drop(c);
    wait_returned(&warden, "pooled", 5.0);
    let info = client_info(pooled);
    assert_eq!(format!(":{}\r\n", field(&info, "id")), id, "{info}");
    assert_eq!(
        (field(&info, "sub"), field(&info, "flags")),
        ("0", "N"),
        "{info}"
    );
    wait_returned(&warden, "pooled", 6.0);
    assert_eq!(
        server.cli_as("app", APP_PW, &["PUBLISH", "news", "x"]),
        "0\n"
    );
    let mut c = Raw::connect(pooled);
    c.send(b"HELLO 3\r\nCLIENT TRACKING on\r\nGET tk\r\n");
    let got = text(&c.read_until(b"tv\r\n"));
    assert!(got.ends_with("+OK\r\n$2\r\ntv\r\n"), "{got}");
    drop(c);
    wait_returned(&warden, "pooled", 7.0);
    let info = client_info(pooled);
    assert_eq!(format!(":{}\r\n", field(&info, "id")), id, "{info}");
    assert_eq!(
        (field(&info, "flags"), field(&info, "resp")),
        ("N", "2"),
        "{info}"
    );
    wait_returned(&warden, "pooled", 8.0);

    // A client that leaves inside a blocking command does not hand its
    // connection on: the next client gets a new login.
    let mut c = Raw::connect(pooled);
    c.send(&command(&[b"BLPOP", b"never", b"0"]));
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(c);
    let fresh = ask(pooled, &[b"CLIENT", b"ID"], b"\r\n");
    assert_ne!(fresh, id);
    // Nor does it stay blocked upstream: warden half-closed toward the
    // server, which dropped the BLPOP as for its own client leaving.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server
        .cli_as("app", APP_PW, &["CLIENT", "LIST"])
        .contains("cmd=blpop")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the BLPOP stayed blocked on the server"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    wait_returned(&warden, "pooled", 9.0);

    // Admission runs before any pooled connection is taken: frozen, refused.
    warden.run(&["freeze", "me", "--reason", "pool test"]).ok();
    let (_, out) = cli(pooled, &["PING"]);
    assert!(out.contains("NOPERM") && out.contains("frozen"), "{out}");
    warden.run(&["unfreeze", "me"]).ok();

    // A new secret version never reuses an older version's login.
    assert_eq!(ask(pooled, &[b"CLIENT", b"ID"], b"\r\n"), fresh);
    wait_returned(&warden, "pooled", 10.0);
    warden.put("cache/app", APP_PW.as_bytes()).ok();
    let after = ask(pooled, &[b"CLIENT", b"ID"], b"\r\n");
    assert!(after != fresh && after != id, "{after} reused");
    wait_returned(&warden, "pooled", 11.0);
    assert_eq!(ask(pooled, &[b"CLIENT", b"ID"], b"\r\n"), after);
    wait_returned(&warden, "pooled", 12.0);

    // pool.reset = "auto" (the default): a session of data commands only
    // hands its connection on as it is — the server runs no RESET and the
    // pool counts a skipped reset — while one that left a MULTI open (or
    // ran anything else, as above) is reset.
    let resets = || {
        let stats = server.cli_as("app", APP_PW, &["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_reset:calls="))
            .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let skipped = "warden_pg_pool_total{result=\"reset_skipped\",route=\"pooled\"}";
    let (resets_before, skipped_before) = (resets(), metric(&warden, skipped));
    assert!(resets_before >= 10, "{resets_before}");
    assert_eq!(ask(pooled, &[b"SET", b"k2", b"v2"], b"\r\n"), "+OK\r\n");
    wait_returned(&warden, "pooled", 13.0);
    assert_eq!(ask(pooled, &[b"GET", b"k2"], b"v2\r\n"), "$2\r\nv2\r\n");
    wait_returned(&warden, "pooled", 14.0);
    assert_eq!(
        (resets(), metric(&warden, skipped)),
        (resets_before, skipped_before + 2.0)
    );
    let mut c = Raw::connect(pooled);
    c.send(b"MULTI\r\nSET a b\r\n");
    assert_eq!(text(&c.read_until(b"+QUEUED\r\n")), "+OK\r\n+QUEUED\r\n");
    drop(c);
    wait_returned(&warden, "pooled", 15.0);
    assert_eq!(
        ask(pooled, &[b"EXEC"], b"\r\n"),
        "-ERR EXEC without MULTI\r\n"
    );
    wait_returned(&warden, "pooled", 16.0);
    assert_eq!(
        (resets(), metric(&warden, skipped)),
        (resets_before + 1, skipped_before + 3.0)
    );
    assert_eq!(ask(pooled, &[b"CLIENT", b"ID"], b"\r\n"), after);

    // pool = false: every client logs in anew.
    let a = ask(unpooled, &[b"CLIENT", b"ID"], b"\r\n");
    let b = ask(unpooled, &[b"CLIENT", b"ID"], b"\r\n");
    assert_ne!(a, b);

    for pw in [DEFAULT_PW, APP_PW] {
        let leaks = files_containing(warden.dir.path(), pw.as_bytes());
        assert!(leaks.is_empty(), "{pw} found in {leaks:?}");
    }
}

#[test]
fn rotate_method_redis_sets_the_acl_users_new_password_and_saves_it() {
    let server = RedisServer::start(DEFAULT_PW, APP_PW);
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[secret]]
name = "cache/app"
rotation_period = "24h"
rotate = {{ method = "redis", route = "rot" }}

[[route]]
name = "rot"
kind = "redis"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "cache/app" }}
deny_commands = ["CONFIG", "ACL|SETUSER", "ACL|SAVE"]
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("cache/app", APP_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();
    assert_eq!(cli(port, &["ACL", "WHOAMI"]).1, "app\n");

    let out = warden.run(&["secret", "rotate", "cache/app"]);
    assert_eq!(out.code, 0, "{out:#?}");
    // The server no longer takes the old password; warden's clients go on.
    let old = server.cli_as("app", APP_PW, &["PING"]);
    assert!(!old.contains("PONG"), "{old}");
    assert_eq!(cli(port, &["ACL", "WHOAMI"]).1, "app\n");
    assert_eq!(cli(port, &["SET", "after", "rotation"]), (0, "OK\n".into()));
    // Saved to redis.conf (no ACL file): a hash, never the password.
    let conf = std::fs::read_to_string(server.dir.path().join("redis.conf")).unwrap();
    let user_line = conf
        .lines()
        .find(|l| l.starts_with("user app"))
        .unwrap_or("");
    assert!(user_line.contains(" #"), "{conf}");
    assert!(!conf.contains(APP_PW), "{conf}");
    assert!(
        daemon
            .log_text()
            .contains("redis user \"app\": new password saved with CONFIG REWRITE"),
        "{}",
        daemon.log_text()
    );
    // A second rotation works from the first one's password.
    let out = warden.run(&["secret", "rotate", "cache/app"]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(cli(port, &["GET", "after"]).1, "rotation\n");
    let conf = std::fs::read_to_string(server.dir.path().join("redis.conf")).unwrap();
    assert_eq!(conf.matches("user app").count(), 1, "{conf}");
    for pw in [DEFAULT_PW, APP_PW] {
        let leaks = files_containing(warden.dir.path(), pw.as_bytes());
        assert!(leaks.is_empty(), "{pw} found in {leaks:?}");
    }
    assert!(!server.log_text().contains(APP_PW));
}

const LEASE_ADMIN_PW: &str = "redis-CANARY-4e11-leaseadmin";
const WEAK_PW: &str = "redis-CANARY-9c0c-weak";
/// The rules of the dynamic route's lease users.
const LEASE_ACL: &str =
    "~app:* &news -@all +@read +@write +@pubsub +@connection -@dangerous +acl|whoami";

/// A redis-server with a lease admin (`+acl +client|kill`) and a user
/// without `+acl`, and an initialised warden with one dynamic redis route
/// whose `dynamic` table is `dynamic` and one whose admin is the weak user.
fn dyn_setup(dynamic: &str) -> (RedisServer, Instance, u16, u16) {
    let server = RedisServer::start(DEFAULT_PW, APP_PW);
    for (user, pw, rules) in [
        ("leaseadmin", LEASE_ADMIN_PW, "+acl +client|kill"),
        ("weak", WEAK_PW, "+ping"),
    ] {
        let mut args = vec!["ACL", "SETUSER", user, "on"];
        let pw = format!(">{pw}");
        args.push(&pw);
        args.extend(rules.split(' '));
        assert_eq!(server.cli_as("default", DEFAULT_PW, &args), "OK\n");
    }
    let (port, weak) = (free_port(), free_port());
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "cache-dyn"
kind = "redis"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "leaseadmin", secret = "cache/leaseadmin", dynamic = {dynamic} }}
allow = ["me"]

[[route]]
name = "cache-weak"
kind = "redis"
listen = "127.0.0.1:{weak}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "weak", secret = "cache/weak", dynamic = {{ acl = "~app:* +@read", role_prefix = "w_" }} }}
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden
        .put("cache/leaseadmin", LEASE_ADMIN_PW.as_bytes())
        .ok();
    warden.put("cache/weak", WEAK_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    (server, warden, port, weak)
}

/// `ACL LIST` lines of lease users (`w_…`).
fn lease_users(server: &RedisServer) -> Vec<String> {
    server
        .cli_as("default", DEFAULT_PW, &["ACL", "LIST"])
        .lines()
        .filter(|l| l.starts_with("user w_"))
        .map(str::to_string)
        .collect()
}

/// Waits (up to 60 s) until no lease user is left on the server.
fn until_no_lease_users(server: &RedisServer) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !lease_users(server).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "lease users left: {:?}",
            lease_users(server)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn dynamic_redis_routes_log_in_as_a_lease_user_that_revocation_deletes() {
    let (server, warden, port, weak) = dyn_setup(&format!(
        "{{ ttl = \"1h\", acl = \"{LEASE_ACL}\", role_prefix = \"w_\" }}"
    ));
    let daemon = warden.start_daemon();

    // The session runs as a generated user with exactly the route's rules.
    let (code, out) = cli(port, &["ACL", "WHOAMI"]);
    assert_eq!(code, 0, "{out}");
    let user = out.trim().to_string();
    assert!(user.starts_with("w_me_"), "{out}");
    assert_eq!(cli(port, &["SET", "app:1", "v"]).1, "OK\n");
    assert_eq!(cli(port, &["GET", "app:1"]).1, "v\n");
    // A second session (pooled or not) reuses the lease.
    assert_eq!(cli(port, &["ACL", "WHOAMI"]).1.trim(), user);
    let users = lease_users(&server);
    assert_eq!(users.len(), 1, "{users:?}");
    let line = &users[0];
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(&words[..3], ["user", user.as_str(), "on"], "{line}");
    let hashes: Vec<&str> = words
        .iter()
        .filter(|w| w.starts_with('#'))
        .copied()
        .collect();
    assert_eq!(hashes.len(), 1, "one password, warden's: {line}");
    let hash = hashes[0].trim_start_matches('#').to_string();
    assert!(!words.contains(&"nopass"), "{line}");
    // Keys, channels and commands: those of `acl`, as the server writes them.
    let server_view = server.cli_as(
        "default",
        DEFAULT_PW,
        &["ACL", "DRYRUN", &user, "GET", "other:1"],
    );
    assert!(server_view.contains("no permissions"), "{server_view}");
    for (cmd, ok) in [
        (&["GET", "app:x"][..], true),
        (&["PUBLISH", "news", "x"], true),
        (&["PUBLISH", "sport", "x"], false),
        (&["FLUSHALL"], false),
        (&["CONFIG", "GET", "port"], false),
        (&["ACL", "LIST"], false),
    ] {
        let mut args = vec!["ACL", "DRYRUN", user.as_str()];
        args.extend(cmd);
        let out = server.cli_as("default", DEFAULT_PW, &args);
        assert_eq!(out.trim() == "OK", ok, "{cmd:?}: {out}");
    }
    assert!(
        words.contains(&"~app:*") && words.contains(&"&news"),
        "{line}"
    );
    // A key outside the pattern: Redis's NOPERM, relayed.
    let (_, out) = cli(port, &["GET", "other:1"]);
    assert!(out.contains("NOPERM"), "{out}");

    // `warden lease list` shows it like a PostgreSQL lease.
    let list = warden.run(&["lease", "list", "--json"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let lease = v
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["role"] == user.as_str())
        .unwrap_or_else(|| panic!("{}", list.stdout));
    assert_eq!(lease["route"], "cache-dyn");
    assert_eq!(lease["workload"], "me");
    let id = lease["id"].as_str().unwrap().to_string();

    // Open sessions (one blocked in BLPOP, one subscribed), then the
    // revocation: both end, the user is gone, the next session gets a new one.
    let mut blocked = Raw::connect(port);
    blocked.send(&command(&[b"BLPOP", b"app:queue", b"0"]));
    let mut subscribed = Raw::connect(port);
    subscribed.send(&command(&[b"SUBSCRIBE", b"news"]));
    let got = text(&subscribed.read_until(b":1\r\n"));
    assert!(got.contains("subscribe"), "{got}");
    assert_eq!(cli(port, &["PUBLISH", "news", "hi"]).1, "1\n");
    let got = text(&subscribed.read_until(b"hi\r\n"));
    assert!(got.contains("hi"), "{got}");
    let out = warden.run(&["lease", "revoke", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        lease_users(&server).is_empty(),
        "{:?}",
        lease_users(&server)
    );
    let rest = blocked.read_to_end();
    assert!(
        !text(&rest).contains("app:queue"),
        "BLPOP outlived its lease: {}",
        text(&rest)
    );
    subscribed.read_to_end();
    let (code, out) = cli(port, &["ACL", "WHOAMI"]);
    assert_eq!(code, 0, "{out}");
    let user2 = out.trim().to_string();
    assert!(user2.starts_with("w_me_") && user2 != user, "{out}");
    assert_eq!(lease_users(&server).len(), 1);
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(
        audit.contains("revoked by an admin (`warden lease revoke`)") && audit.contains(&user),
        "{audit}"
    );
    // Session records name the lease user and lease, not the admin secret.
    let start = audit
        .lines()
        .find(|l| l.contains("session.start") && l.contains(&format!("as ACL user \\\"{user}\\\"")))
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(
        start.contains(&format!("lease {id}")) && !start.contains("cache/leaseadmin"),
        "{start}"
    );

    // A lease that cannot be created (the admin lacks +acl): NOPERM naming
    // route and workload, counted and recorded.
    let (_, out) = cli(weak, &["PING"]);
    assert!(
        out.contains("NOPERM") && out.contains("cache-weak") && out.contains("\"me\""),
        "{out}"
    );
    assert!(out.contains("+acl"), "the fix is named: {out}");
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(
        audit.contains("lease.create") && audit.contains("cache-weak"),
        "{audit}"
    );
    let (status, metrics) = warden.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("cache-weak") && l.contains("credential_error")),
        "{metrics}"
    );

    // Neither the lease's password nor its hash is anywhere warden writes:
    // no 43-character base64url word (a generated password's form) in the
    // log, audit log, metrics or data dir hashes to the server's hash.
    let log = daemon.log_text();
    assert!(!log.contains(&hash) && !metrics.contains(&hash) && !audit.contains(&hash));
    assert!(files_containing(warden.dir.path(), hash.as_bytes()).is_empty());
    let mut written = vec![
        log.clone().into_bytes(),
        audit.clone().into_bytes(),
        metrics.clone().into_bytes(),
    ];
    for entry in walk(warden.dir.path()) {
        written.push(std::fs::read(entry).unwrap_or_default());
    }
    assert_eq!(
        password_shaped(b"a=Ab9-_Ab9-_Ab9-_Ab9-_Ab9-_Ab9-_Ab9-_Ab9-_Ab9 b").len(),
        1
    );
    let candidates: Vec<&[u8]> = written.iter().flat_map(|b| password_shaped(b)).collect();
    assert!(
        candidates
            .iter()
            .all(|c| warden_core::crypto::sha256_hex(c) != hash),
        "the lease password was written down"
    );
    assert!(
        !log.contains("SETUSER w_") && !log.contains(LEASE_ADMIN_PW),
        "{log}"
    );
    // A graceful stop revokes the leases it holds.
    drop(daemon);
    assert!(
        lease_users(&server).is_empty(),
        "{:?}",
        lease_users(&server)
    );
}

#[test]
fn redis_leases_end_at_max_ttl_and_a_restart_deletes_what_a_killed_warden_left() {
    let (server, warden, port, _) = dyn_setup(&format!(
        "{{ ttl = \"1s\", max_ttl = \"2s\", acl = \"{LEASE_ACL}\", role_prefix = \"w_\" }}"
    ));
    let daemon = warden.start_daemon();
    // An open session past max_ttl: the user is deleted and the session ends.
    let mut open = Raw::connect(port);
    open.send(&command(&[b"PING"]));
    assert_eq!(text(&open.read_until(b"\r\n")), "+PONG\r\n");
    assert_eq!(lease_users(&server).len(), 1);
    until_no_lease_users(&server);
    open.send(&command(&[b"PING"]));
    let after = text(&open.read_to_end());
    assert!(
        !after.contains("PONG"),
        "the open session outlived its lease: {after}"
    );
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(audit.contains("max_ttl reached"), "{audit}");
    drop(daemon);
    // `warden lease bench` (daemon stopped) creates and revokes redis leases too.
    let out = warden.run(&[
        "lease",
        "bench",
        "--route",
        "cache-dyn",
        "--count",
        "8",
        "--concurrency",
        "2",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["leases"].as_u64(), Some(8), "{v}");
    assert!(
        lease_users(&server).is_empty(),
        "{:?}",
        lease_users(&server)
    );

    // A warden killed with its lease held: the next start deletes the user.
    let (server2, warden2, port2, _) = dyn_setup(&format!(
        "{{ ttl = \"1h\", acl = \"{LEASE_ACL}\", role_prefix = \"w_\" }}"
    ));
    let mut daemon = warden2.start_daemon();
    let (code, out) = cli(port2, &["ACL", "WHOAMI"]);
    assert_eq!(code, 0, "{out}");
    daemon.child.kill().ok();
    daemon.child.wait().ok();
    assert_eq!(
        lease_users(&server2).len(),
        1,
        "the user outlives the killed daemon"
    );
    let _daemon = warden2.start_daemon();
    until_no_lease_users(&server2);
    let audit = std::fs::read_to_string(warden2.audit_log()).unwrap();
    assert!(
        audit.contains("orphan: left by a previous warden process"),
        "{audit}"
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The maximal runs of 43 base64url characters in `b` (a lease password's
/// form: 256 random bits, unpadded).
fn password_shaped(b: &[u8]) -> Vec<&[u8]> {
    b.split(|c| !(c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'))
        .filter(|w| w.len() == 43)
        .collect()
}

/// With two session threads, a route has two `SO_REUSEPORT` listeners, one
/// per shard runtime; the kernel spreads clients over them, so pooled
/// connections are handed from one shard to the other and must keep
/// working there (they are moved to the taking shard's runtime).
#[test]
fn redis_sessions_run_on_the_session_shards_and_share_the_pool_across_them() {
    let server = RedisServer::start(DEFAULT_PW, APP_PW);
    let (warden, daemon, port) = warden_tests::start_sharded(
        "redis",
        server.port,
        "credential = { user = \"app\", secret = \"cache/app\" }\ndeny_commands = [\"CONFIG\"]",
        "cache/app",
        APP_PW.as_bytes(),
    );
    // Both shard threads run.
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", daemon.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    for name in ["warden-shard-0", "warden-shard-1"] {
        assert!(threads.iter().any(|t| t == name), "{threads:?}");
    }
    // Sessions one after the other, from new client ports: each shard
    // takes some, and each reuses what the other gave back.
    for i in 1..=40u32 {
        let got = ask(port, &[b"INCR", b"sharded-n"], b"\r\n");
        assert_eq!(got, format!(":{i}\r\n"), "session {i}");
        wait_returned(&warden, "sharded", f64::from(i));
    }
    let hits = metric(
        &warden,
        "warden_pg_pool_total{result=\"hit\",route=\"sharded\"}",
    );
    assert!(hits >= 39.0, "{hits}");
    assert_eq!(server.cli_as("app", APP_PW, &["GET", "sharded-n"]), "40\n");
}
