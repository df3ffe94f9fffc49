//! MySQL routes end to end against a real MariaDB server (a throwaway
//! datadir): the `mariadb` CLI and PyMySQL through warden with no
//! password; warden's own login upstream with mysql_native_password and
//! MariaDB's ed25519; COM_CHANGE_USER refused and COM_RESET_CONNECTION
//! passed; refusals as ERR packets with code and SQLSTATE naming route and
//! workload (not allowed, wrong stored password, unreachable upstream,
//! frozen); a malformed handshake response; a secret put applying to the
//! next session; dynamic users (a lease user per workload holding a
//! MariaDB role, dropped and its sessions ended by `warden lease revoke`);
//! and the audit log and daemon log (never a password). The
//! caching_sha2_password and native scrambles are checked against
//! PyMySQL's own functions (no MySQL 8 server runs here).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use warden_tests::mysql::{cli, cli_with, python, MariaDb};
use warden_tests::{files_containing, free_port, metric, my_uid, wait_for, Instance};

const APP_PW: &str = "mysql-CANARY-41c7-app";
const APP_PW2: &str = "mysql-CANARY-9e02-rotated";
const ED_PW: &str = "mysql-CANARY-ed25-edward";
const WRONG_PW: &str = "mysql-CANARY-0bad-wrong";

struct Setup {
    server: MariaDb,
    warden: Instance,
    daemon: warden_tests::Daemon,
    orders: u16,
    ed: u16,
    other: u16,
    wrong: u16,
    down: u16,
    needs_tls: u16,
    tls_only: u16,
}

fn setup() -> Setup {
    let server = MariaDb::start();
    // Passwords reach the server on the client's stdin, never in argv.
    server.admin(&format!(
        "INSTALL SONAME 'auth_ed25519';
         CREATE DATABASE orders;
         CREATE TABLE orders.items (id INT PRIMARY KEY, name VARCHAR(20));
         CREATE TABLE orders.blobs (id INT PRIMARY KEY, b LONGBLOB);
         INSERT INTO orders.items VALUES (1, 'apple'), (2, 'pear');
         CREATE USER 'app'@'%' IDENTIFIED BY '{APP_PW}';
         GRANT ALL ON orders.* TO 'app'@'%';
         CREATE USER 'ed'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PW}');
         GRANT SELECT ON orders.* TO 'ed'@'%';"
    ));
    let [orders, ed, other, wrong, down, needs_tls, tls_only] = [
        free_port(),
        free_port(),
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

[[secret]]
name = "orders/app"
rotate = {{ method = "mysql", route = "orders" }}

[[secret]]
name = "orders/ed"
rotate = {{ method = "mysql", route = "orders-ed" }}

[[route]]
name = "orders"
kind = "mysql"
listen = "127.0.0.1:{orders}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/app" }}
client_tls = true
allow = ["me"]

[[route]]
name = "orders-ed"
kind = "mysql"
listen = "127.0.0.1:{ed}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "ed", secret = "orders/ed" }}
allow = ["me"]

[[route]]
name = "orders-other"
kind = "mysql"
listen = "127.0.0.1:{other}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/app" }}
allow = ["other"]

[[route]]
name = "orders-wrong"
kind = "mysql"
listen = "127.0.0.1:{wrong}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/wrong" }}
allow = ["me"]

[[route]]
name = "orders-down"
kind = "mysql"
listen = "127.0.0.1:{down}"
upstream = "127.0.0.1:{unreachable}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/app" }}
allow = ["me"]

[[route]]
name = "orders-needs-tls"
kind = "mysql"
listen = "127.0.0.1:{needs_tls}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "require" }}
credential = {{ user = "app", secret = "orders/app" }}
allow = ["me"]

[[route]]
name = "orders-tls-only"
kind = "mysql"
listen = "127.0.0.1:{tls_only}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/app" }}
client_tls = "require"
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("orders/app", APP_PW.as_bytes()).ok();
    warden.put("orders/ed", ED_PW.as_bytes()).ok();
    warden.put("orders/wrong", WRONG_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();
    Setup {
        needs_tls,
        tls_only,
        server,
        warden,
        daemon,
        orders,
        ed,
        other,
        wrong,
        down,
    }
}

/// A minimal raw client: the greeting, a handshake response, then packets.
struct Raw {
    s: TcpStream,
    /// The connection id warden's greeting named (after a login).
    greeting_id: u32,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        Raw { s, greeting_id: 0 }
    }

    fn send(&mut self, seq: u8, payload: &[u8]) {
        let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        out.push(seq);
        out.extend_from_slice(payload);
        self.s.write_all(&out).unwrap();
    }

    /// One packet: (seq, payload); None at EOF.
    fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 4];
        self.s.read_exact(&mut h).ok()?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).ok()?;
        Some((h[3], p))
    }

    /// Logs in as `user` with an empty password proof.
    fn login(port: u16, user: &str) -> (Raw, Vec<u8>) {
        Raw::login_with(port, user, "mysql_native_password")
    }

    /// Logs in answering for `plugin` (an empty proof).
    fn login_with(port: u16, user: &str, plugin: &str) -> (Raw, Vec<u8>) {
        let mut c = Raw::connect(port);
        let (seq, greeting) = c.read().unwrap();
        assert_eq!((seq, greeting[0]), (0, 10), "{greeting:?}");
        let at = 1 + greeting[1..].iter().position(|&b| b == 0).unwrap() + 1;
        c.greeting_id = u32::from_le_bytes(greeting[at..at + 4].try_into().unwrap());
        // PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH | DEPRECATE_EOF
        let caps: u32 = (1 << 9) | (1 << 15) | (1 << 19) | (1 << 24);
        let mut r = caps.to_le_bytes().to_vec();
        r.extend_from_slice(&(1u32 << 24).to_le_bytes());
        r.push(33);
        r.extend_from_slice(&[0u8; 23]);
        r.extend_from_slice(user.as_bytes());
        r.push(0);
        r.push(0); // empty auth response
        r.extend_from_slice(plugin.as_bytes());
        r.push(0);
        c.send(1, &r);
        let (_, answer) = c.read().unwrap();
        (c, answer)
    }

    /// COM_QUERY; the packets of its answer up to the final OK/EOF or ERR.
    fn query(&mut self, sql: &str) -> Vec<Vec<u8>> {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        self.send(0, &p);
        self.read_answer()
    }

    /// The packets of a command's answer up to the final OK/EOF or ERR.
    fn read_answer(&mut self) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Some((_, p)) = self.read() {
            let end = p[0] == 0xff
                || (p[0] == 0xfe && p.len() < 0xffffff)
                || (got.is_empty() && p[0] == 0);
            got.push(p);
            if end {
                break;
            }
        }
        got
    }
}

/// The first value of a one-row result `Raw::query` returned.
fn first_value(rows: &[Vec<u8>]) -> String {
    // Column count, column definition(s), the row, the terminator.
    let row = rows
        .iter()
        .rev()
        .nth(1)
        .unwrap_or_else(|| panic!("no row in {rows:?}"));
    let len = row[0] as usize;
    String::from_utf8_lossy(&row[1..1 + len]).into_owned()
}

fn err_of(p: &[u8]) -> (u16, String, String) {
    assert_eq!(p[0], 0xff, "not an ERR: {}", String::from_utf8_lossy(p));
    let code = u16::from_le_bytes([p[1], p[2]]);
    let state = String::from_utf8_lossy(&p[4..9]).into_owned();
    let msg = String::from_utf8_lossy(&p[9..]).into_owned();
    (code, state, msg)
}

#[test]
fn mysql_clients_reach_mariadb_through_warden_without_a_password() {
    let mut s = setup();

    // The mariadb CLI with no password: warden logged in as app.
    let (code, out) = cli(
        s.orders,
        "nobody",
        "SELECT CURRENT_USER(); SELECT name FROM orders.items ORDER BY id;",
    );
    assert_eq!((code, out.as_str()), (0, "app@%\napple\npear\n"));
    // MariaDB's ed25519 plugin (an auth switch from the server).
    let (code, out) = cli(
        s.ed,
        "root",
        "SELECT CURRENT_USER(), COUNT(*) FROM orders.items;",
    );
    assert_eq!((code, out.as_str()), (0, "ed@%\t2\n"));
    // Writes, and a database named at connect time.
    let (code, out) = cli(
        s.orders,
        "x",
        "USE orders; INSERT INTO items VALUES (3, 'plum'); SELECT COUNT(*) FROM items;",
    );
    assert_eq!((code, out.as_str()), (0, "3\n"));

    // PyMySQL with a password of its own (ignored) and a database.
    let (code, out) = python(
        "import sys, pymysql\n\
         c = pymysql.connect(host='127.0.0.1', port=int(sys.argv[1]), user='someone', password='ignored', database='orders')\n\
         cur = c.cursor(); cur.execute('SELECT CURRENT_USER(), DATABASE()'); print(cur.fetchone())\n\
         cur.execute('SELECT name FROM items WHERE id = %s', (2,)); print(cur.fetchone()[0])\n\
         c.ping(); c.close()",
        &[&s.orders.to_string()],
        b"",
    );
    assert_eq!((code, out.as_str()), (0, "('app@%', 'orders')\npear\n"));

    // A 20 MiB value each way: packets over 16 MiB continue in the next
    // one, in both directions, and are relayed whole.
    let (code, out) = python(
        "import sys, hashlib, pymysql\n\
         c = pymysql.connect(host='127.0.0.1', port=int(sys.argv[1]), user='x', database='orders', max_allowed_packet=64*1024*1024)\n\
         big = bytes(i % 251 for i in range(20 * 1024 * 1024))\n\
         cur = c.cursor(); cur.execute('INSERT INTO blobs VALUES (1, %s)', (big,)); c.commit()\n\
         cur.execute('SELECT b FROM blobs WHERE id = 1'); got = cur.fetchone()[0]\n\
         print(len(got), got == big); cur.execute('SELECT 5'); print(cur.fetchone()[0])",
        &[&s.orders.to_string()], b"");
    assert_eq!((code, out.as_str()), (0, "20971520 True\n5\n"));

    // client_tls: TLS from the client with a certificate from warden's CA
    // (verified with the host name by PyMySQL, used by the CLI); plain TCP
    // is still served (every call above).
    let bundle = s.warden.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        s.warden.run(&["svid", "bundle"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let (code, out) = python(
        "import sys, pymysql\n\
         c = pymysql.connect(host='127.0.0.1', port=int(sys.argv[1]), user='x', ssl_ca=sys.argv[2], ssl_verify_cert=True, ssl_verify_identity=True)\n\
         cur = c.cursor(); cur.execute('SELECT CURRENT_USER()'); print(c._sock.version(), cur.fetchone()[0])",
        &[&s.orders.to_string(), &bundle.display().to_string()], b"");
    assert!(code == 0 && out.starts_with("TLSv1.3 app@%"), "{out}");
    let ssl_ca = format!("--ssl-ca={}", bundle.display());
    let (code, out) = cli_with(s.orders, "x", &["--ssl", &ssl_ca], "status;");
    assert!(code == 0 && out.contains("Cipher in use is TLS"), "{out}");
    // client_tls = "require": plain TCP is refused with MySQL's own 3159.
    let (code, out) = cli(s.tls_only, "x", "SELECT 1;");
    assert!(
        code == 1 && out.contains("ERROR 3159 (HY000)") && out.contains("requires TLS"),
        "{out}"
    );
    let (code, out) = cli_with(s.tls_only, "x", &["--ssl", &ssl_ca], "SELECT 12;");
    assert_eq!((code, out.as_str()), (0, "12\n"));
    // A route without client_tls refuses an SSLRequest clearly (below, raw).

    // COM_CHANGE_USER is refused (1045) and never reaches the server; the
    // session goes on; COM_RESET_CONNECTION passes.
    let (mut c, ok) = Raw::login(s.orders, "whoever");
    assert_eq!(ok[0], 0, "{ok:?}");
    let mut change = vec![0x11];
    change.extend_from_slice(b"root\0\0mysql\0");
    c.send(0, &change);
    let (seq, p) = c.read().unwrap();
    let (code, state, msg) = err_of(&p);
    assert_eq!((seq, code, state.as_str()), (1, 1045, "28000"));
    assert!(
        msg.contains("\"orders\"") && msg.contains("\"me\"") && msg.contains("COM_CHANGE_USER"),
        "{msg}"
    );
    c.send(0, &[0x1f]);
    let (_, p) = c.read().unwrap();
    assert_eq!(p[0], 0, "COM_RESET_CONNECTION: {p:?}");
    let rows = c.query("SELECT CURRENT_USER()");
    assert!(
        rows.iter()
            .any(|r| warden_tests::contains_bytes(r, b"app@%")),
        "{rows:?}"
    );
    drop(c);

    // Refusals: ERR packets with code and SQLSTATE naming route and workload.
    let (code, out) = cli(s.other, "x", "SELECT 1;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ERROR 1045 (28000)")
            && out.contains("\"orders-other\"")
            && out.contains("workload \"me\""),
        "{out}"
    );
    let (code, out) = cli(s.wrong, "x", "SELECT 1;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ERROR 1045 (28000)")
            && out.contains("upstream rejected the credential for route \"orders-wrong\"")
            && out.contains("secret orders/wrong v1")
            && out.contains("workload \"me\""),
        "{out}"
    );
    assert!(!out.contains(WRONG_PW), "{out}");
    let (code, out) = cli(s.down, "x", "SELECT 1;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ERROR 1429 (HY000)")
            && out.contains("unreachable for route \"orders-down\"")
            && out.contains("workload \"me\""),
        "{out}"
    );

    // A route that requires TLS toward a server without it: refused before
    // the password is sent.
    let (code, out) = cli(s.needs_tls, "x", "SELECT 1;");
    assert!(
        code == 1 && out.contains("ERROR 1429 (HY000)") && out.contains("does not offer TLS"),
        "{out}"
    );

    // Malformed handshake responses: an ERR (1043 bad handshake), no panic.
    for bad in [&b"\x00\x02"[..], &[0xff; 40], &[0u8; 4]] {
        let mut c = Raw::connect(s.orders);
        c.read().unwrap();
        c.send(1, bad);
        let (seq, p) = c.read().unwrap();
        let (code, state, _) = err_of(&p);
        assert_eq!((seq, code, state.as_str()), (2, 1043, "08S01"));
    }
    // A packet header claiming 16 MB, then a close.
    let mut c = Raw::connect(s.orders);
    c.read().unwrap();
    c.s.write_all(&[0xff, 0xff, 0xff, 1, 0]).unwrap();
    let (_, p) = c.read().unwrap();
    assert_eq!(err_of(&p).0, 1043);
    // An SSLRequest on a route without client TLS: a clear ERR.
    let mut c = Raw::connect(s.ed);
    c.read().unwrap();
    let mut ssl = ((1u32 << 9) | (1 << 11) | (1 << 15)).to_le_bytes().to_vec();
    ssl.extend_from_slice(&[0u8; 28]);
    c.send(1, &ssl);
    let (_, p) = c.read().unwrap();
    let (code, _, msg) = err_of(&p);
    assert!(code == 1043 && msg.contains("does not offer TLS"), "{msg}");
    // The daemon serves on.
    assert_eq!(cli(s.orders, "x", "SELECT 7;"), (0, "7\n".into()));

    // A new password: on the server, then in warden; the next session logs
    // in with it (a new secret version closes the pooled connections of
    // the old one, which stay logged in on the server until then).
    s.server
        .admin(&format!("ALTER USER 'app'@'%' IDENTIFIED BY '{APP_PW2}';"));
    let (code, out) = cli(s.wrong, "x", "SELECT 1;");
    assert!(code == 1 && out.contains("ERROR 1045"), "{out}");
    s.warden.put("orders/app", APP_PW2.as_bytes()).ok();
    assert_eq!(cli(s.orders, "x", "SELECT 8;"), (0, "8\n".into()));

    // A freeze refuses the next session and ends the open ones at once: an
    // idle one and one waiting for a slow query get ERR 1927 (70100)
    // naming the freeze as the answer to their command, then EOF.
    let (mut idle, ok) = Raw::login(s.orders, "x");
    assert_eq!(ok[0], 0, "{ok:?}");
    assert_eq!(first_value(&idle.query("SELECT 41")), "41");
    let (mut busy, ok) = Raw::login(s.orders, "x");
    assert_eq!(ok[0], 0, "{ok:?}");
    busy.send(0, b"\x03SELECT SLEEP(60)");
    let out = s.warden.run(&["freeze", "me", "--reason", "mysql test"]);
    assert_eq!(out.code, 0, "{out:#?}");
    for c in [&mut busy, &mut idle] {
        let (seq, p) = c.read().expect("an ERR before EOF");
        let (code, state, msg) = err_of(&p);
        assert_eq!((seq, code, state.as_str()), (1, 1927, "70100"), "{msg}");
        assert!(
            msg.contains("frozen") && msg.contains("mysql test"),
            "{msg}"
        );
        assert!(c.read().is_none(), "EOF after the ERR");
    }
    let (code, out) = cli(s.orders, "x", "SELECT 1;");
    assert!(
        code == 1
            && out.contains("ERROR 1045 (28000)")
            && out.contains("frozen")
            && out.contains("\"orders\""),
        "{out}"
    );
    s.warden.run(&["unfreeze", "me"]).ok();
    assert_eq!(cli(s.orders, "x", "SELECT 9;"), (0, "9\n".into()));

    // rotate = { method = "mysql" }: warden changes the password on the
    // server (keeping each account's plugin) and the next sessions use it.
    for (secret, port, user, plugin) in [
        ("orders/app", s.orders, "app", "mysql_native_password"),
        ("orders/ed", s.ed, "ed", "ed25519"),
    ] {
        let out = s.warden.run(&["secret", "rotate", secret]);
        assert_eq!(out.code, 0, "{out:#?}");
        let (code, out) = cli(port, "x", "SELECT CURRENT_USER();");
        assert_eq!((code, out), (0, format!("{user}@%\n")));
        let got = s.server.admin(&format!(
            "SELECT plugin FROM mysql.user WHERE user = '{user}';"
        ));
        assert_eq!(got.trim(), plugin);
    }
    // The old passwords no longer log in.
    for (user, old) in [("app", APP_PW2), ("ed", ED_PW)] {
        let (code, out) = s.server.direct(user, old, "SELECT 1;");
        assert!(code == 1 && out.contains("ERROR 1045"), "{user}: {out}");
    }

    // The server going away: the next session gets 1429 (unreachable).
    s.server.stop();
    let (code, out) = cli(s.orders, "x", "SELECT 1;");
    assert!(code == 1 && out.contains("ERROR 1429 (HY000)"), "{out}");
    s.server.restart();
    assert_eq!(cli(s.orders, "x", "SELECT 10;"), (0, "10\n".into()));

    // Audit: start and end records, denials, errors; never a password
    // (audit log, daemon log, store, anywhere under warden's dir).
    std::thread::sleep(Duration::from_millis(300));
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    let on = |action: &str, route: &str| {
        audit
            .lines()
            .filter(|l| {
                l.contains(&format!("\"{action}\""))
                    && l.contains(&format!("\"route\":\"{route}\""))
            })
            .count()
    };
    assert!(on("session.start", "orders") >= 5, "{audit}");
    assert!(on("session.end", "orders") >= 5, "{audit}");
    assert!(on("session.start", "orders-ed") >= 1, "{audit}");
    assert!(on("session.deny", "orders-other") >= 1, "{audit}");
    assert!(on("session.error", "orders-wrong") >= 1, "{audit}");
    assert!(on("session.error", "orders-down") >= 1, "{audit}");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("1 COM_CHANGE_USER refused")),
        "{audit}"
    );
    let log = s.daemon.log_text();
    for pw in [APP_PW, APP_PW2, ED_PW, WRONG_PW] {
        let leaks = files_containing(s.warden.dir.path(), pw.as_bytes());
        assert!(leaks.is_empty(), "{pw} found in {leaks:?}");
        assert!(!log.contains(pw));
    }
    // The session counter has kind-independent families with this route.
    assert!(log.contains("MySQL route listening"), "{log}");
}

/// Upstream connections are pooled between clients (route.pool, on by
/// default) and reset before reuse: nothing a session set or left behind
/// reaches the next client; a client that leaves in the middle of a result
/// leaves a connection that is drained, reset and reused; a new secret
/// version is never served by an old login.
#[test]
fn pooled_connections_are_reset_between_clients() {
    let s = setup();
    let id = |out: &str| out.lines().next().unwrap_or("").to_string();

    // Two sessions of the same client: one server connection.
    let (code, first) = cli(
        s.orders,
        "x",
        "SELECT CONNECTION_ID(), @@character_set_client;",
    );
    assert_eq!(code, 0, "{first}");
    let (conn, charset) = first.trim().split_once('\t').unwrap();
    let (code, out) = cli(s.orders, "x", "SELECT CONNECTION_ID();");
    assert_eq!((code, id(&out)), (0, conn.to_string()), "not reused");
    // Those sessions sent only SELECTs (the CLI's own included): the
    // connection went back without a reset (pool.reset = "auto").
    let skipped = || {
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"reset_skipped\",route=\"orders\"}",
        )
    };
    assert!(skipped() >= 1.0, "no reset was skipped");
    // Statements that look like reads but leave state: each session is
    // reset, so the next client on the same connection finds none of it.
    for sql in [
        "SELECT @leak := 7;",
        "SELECT 7 INTO @leak;",
        "SELECT 1 /*!, @leak := 9 */;",
        "SELECT GET_LOCK('warden-leak2', 0);",
        "BEGIN; SELECT COUNT(*) FROM orders.items;",
        "SET @leak = 5; SELECT 1;",
    ] {
        let before = skipped();
        let (code, out) = cli(s.orders, "x", sql);
        assert_eq!(code, 0, "{sql}: {out}");
        let (code, out) = cli(
            s.orders,
            "x",
            "SELECT CONNECTION_ID(), @leak IS NULL, IS_FREE_LOCK('warden-leak2'), @@in_transaction;",
        );
        assert_eq!(
            (code, out.as_str()),
            (0, format!("{conn}\t1\t1\t0\n").as_str()),
            "after {sql}"
        );
        // The checking session itself was state-free; the one before not.
        wait_for("the checking session's return", || {
            skipped() >= before + 1.0
        });
        assert_eq!(skipped(), before + 1.0, "after {sql}");
    }
    // The greeting names no server connection (a driver's KILL QUERY by
    // the handshake's id could hit another client's session).
    // It names a warden id (at or above 2^31), which KILL is translated
    // from: one client's Ctrl-C cancels its own query on whatever server
    // connection serves it.
    let (mut a, answer) = Raw::login(s.orders, "x");
    assert_eq!(answer[0], 0, "{answer:?}");
    assert!(a.greeting_id >= 1 << 31, "{}", a.greeting_id);
    a.send(0, b"\x03SELECT SLEEP(60)");
    let (code, out) = cli(s.orders, "x", &format!("KILL QUERY {};", a.greeting_id));
    assert_eq!(code, 0, "{out}");
    let slept = a.read_answer();
    // An interrupted SLEEP returns 1 (0 had it run its 60 s).
    let killed = match slept.last() {
        Some(p) if p[0] == 0xff => err_of(p).0 == 1317,
        _ => first_value(&slept) == "1",
    };
    assert!(killed, "{slept:?}");
    assert_eq!(first_value(&a.query("SELECT 2")), "2");
    drop(a);
    // A warden id no session of this workload holds: the server's answer.
    let (code, out) = cli(s.orders, "x", "KILL QUERY 4294967000;");
    assert!(
        code == 1 && out.contains("ERROR 1094") && out.contains("Unknown thread id: 4294967000"),
        "{out}"
    );

    // A session that leaves state behind, and an open transaction.
    let (code, out) = cli(
        s.orders,
        "x",
        "SET @leak = 42; CREATE TEMPORARY TABLE orders.tmp_leak (a INT); \
         SET NAMES latin1; SET SESSION sql_mode = 'ANSI'; SET autocommit = 0; \
         INSERT INTO orders.items VALUES (99, 'leak'); PREPARE st FROM 'SELECT 1'; \
         SELECT GET_LOCK('warden-leak', 0); SELECT CONNECTION_ID();",
    );
    assert_eq!((code, out.lines().last().unwrap_or("")), (0, conn), "{out}");
    // The next client: same connection, none of it.
    let (code, out) = cli(
        s.orders,
        "x",
        "SELECT CONNECTION_ID(), @leak IS NULL, DATABASE() IS NULL, @@character_set_client, \
         @@sql_mode = @@GLOBAL.sql_mode, @@autocommit, \
         (SELECT COUNT(*) FROM orders.items WHERE id = 99), IS_FREE_LOCK('warden-leak'); \
         EXECUTE st;",
    );
    let want = format!("{conn}\t1\t1\t{charset}\t1\t1\t0\t1\n");
    assert!(out.starts_with(&want), "{out}\nwanted {want}");
    assert!(
        code == 1 && out.contains("ERROR 1243"),
        "the prepared statement survived: {out}"
    );
    let (code, out) = cli(s.orders, "x", "SELECT COUNT(*) FROM orders.tmp_leak;");
    assert!(
        code == 1 && out.contains("ERROR 1146"),
        "the temporary table survived: {out}"
    );
    // A session that selected a database where its login had none leaves
    // a connection no reset can restore: it is closed, not reused.
    let (code, out) = cli(s.orders, "x", "USE orders; SELECT CONNECTION_ID();");
    assert_eq!((code, id(&out)), (0, conn.to_string()), "{out}");
    let (code, out) = cli(s.orders, "x", "SELECT CONNECTION_ID(), DATABASE() IS NULL;");
    assert_eq!(code, 0, "{out}");
    let (next, no_db) = out.trim().split_once('\t').unwrap();
    assert!(next != conn && no_db == "1", "{out}");
    let conn = next.to_string();
    let conn = conn.as_str();

    // A client with another database gets its own login (and a database
    // named at connect time is the one the next such client finds).
    let (code, out) = python(
        "import sys, pymysql\n\
         ids = []\n\
         for _ in range(2):\n\
         \x20   c = pymysql.connect(host='127.0.0.1', port=int(sys.argv[1]), user='x', database='orders')\n\
         \x20   cur = c.cursor(); cur.execute('SELECT CONNECTION_ID(), DATABASE()'); ids.append(cur.fetchone())\n\
         \x20   cur.execute('USE information_schema'); c.close()\n\
         print(ids[0] == ids[1], ids[1][1], ids[0][0] != int(sys.argv[2]))",
        &[&s.orders.to_string(), conn],
        b"",
    );
    assert_eq!((code, out.as_str()), (0, "True orders True\n"));

    // A client gone in the middle of a large result: the rest is drained,
    // the connection reset and kept.
    let (mut c, ok) = Raw::login(s.orders, "raw");
    assert_eq!(ok[0], 0, "{ok:?}");
    let raw_id = first_value(&c.query("SELECT CONNECTION_ID()"));
    let mut q = vec![0x03];
    q.extend_from_slice(b"SELECT REPEAT('x', 2000) FROM seq_1_to_1500");
    c.send(0, &q);
    c.read().unwrap();
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = s.server.admin(&format!(
            "SELECT COMMAND, INFO IS NULL FROM information_schema.PROCESSLIST WHERE ID = {raw_id};"
        ));
        if state.trim() == "Sleep\t1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reset: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (mut c, _) = Raw::login(s.orders, "raw");
    assert_eq!(first_value(&c.query("SELECT CONNECTION_ID()")), raw_id);
    assert_eq!(first_value(&c.query("SELECT 'clean'")), "clean");
    drop(c);

    // A new secret version (same password): the old login is not reused.
    s.warden.put("orders/app", APP_PW.as_bytes()).ok();
    let (code, out) = cli(s.orders, "x", "SELECT CONNECTION_ID();");
    assert_eq!(code, 0, "{out}");
    assert_ne!(
        id(&out),
        conn,
        "a login of the old secret version was reused"
    );
    // The audit record says which sessions got a pooled connection.
    std::thread::sleep(Duration::from_millis(300));
    let audit = std::fs::read_to_string(s.warden.audit_log()).unwrap();
    assert!(audit.contains("pooled upstream connection"), "{audit}");
}

#[test]
fn upstream_tls_is_verified_like_postgres_routes() {
    let server = MariaDb::start_tls();
    let ca = server.ca_pem.clone().unwrap();
    server.admin(&format!(
        "INSTALL SONAME 'auth_ed25519';
         CREATE USER 'app'@'%' IDENTIFIED BY '{APP_PW}' REQUIRE SSL;
         CREATE USER 'ed'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PW}') REQUIRE SSL;"
    ));
    // Another CA, which did not sign the server's certificate.
    let other_ca_dir = tempfile::tempdir().unwrap();
    let other_ca = warden_tests::pg::make_tls(other_ca_dir.path()).ca_pem;
    let [full, ed, require, wrong_ca] = [free_port(), free_port(), free_port(), free_port()];
    let route = |name: &str, listen: u16, host: &str, tls: &str, user: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nkind = \"mysql\"\nlisten = \"127.0.0.1:{listen}\"\n\
             upstream = \"{host}:{}\"\nupstream_tls = {tls}\n\
             credential = {{ user = \"{user}\", secret = \"db/{user}\" }}\nallow = [\"me\"]\n\n",
            server.port
        )
    };
    let cfg = format!(
        "trust_domain = \"example.org\"\n\n[[workload]]\nname = \"me\"\n\
         spiffe_id = \"spiffe://example.org/me\"\nselectors = {{ uid = {uid} }}\n\n{}{}{}{}\
         [monitor]\nebpf = \"off\"\n",
        route(
            "full",
            full,
            "localhost",
            &format!("{{ ca_file = \"{}\" }}", ca.display()),
            "app"
        ),
        route(
            "ed",
            ed,
            "localhost",
            &format!("{{ ca_file = \"{}\" }}", ca.display()),
            "ed"
        ),
        route(
            "require",
            require,
            "127.0.0.1",
            "{ mode = \"require\" }",
            "app"
        ),
        route(
            "wrong-ca",
            wrong_ca,
            "localhost",
            &format!("{{ ca_file = \"{}\" }}", other_ca.display()),
            "app"
        ),
        uid = my_uid(),
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("db/app", APP_PW.as_bytes()).ok();
    warden.put("db/ed", ED_PW.as_bytes()).ok();
    // `warden doctor` checks each route's upstream TLS as the route does
    // (greeting, SSLRequest, then the handshake).
    let out = warden.run(&["doctor"]);
    let text = format!("{}{}", out.stdout, out.stderr);
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line: {text}"))
            .to_string()
    };
    assert!(
        line("route full").starts_with("ok") && line("route full").contains("verified"),
        "{text}"
    );
    let wrong = line("route wrong-ca");
    assert!(
        wrong.starts_with("FAIL") && wrong.contains("certificate"),
        "{text}"
    );
    let _daemon = warden.start_daemon();

    // verify-full (the default) with the server's CA: the session runs over TLS.
    let sql = "SELECT CURRENT_USER(); SHOW SESSION STATUS LIKE 'Ssl_version';";
    let (code, out) = cli(full, "x", sql);
    assert!(
        code == 0 && out.starts_with("app@%\nSsl_version\tTLSv1."),
        "{out}"
    );
    let (code, out) = cli(ed, "x", sql);
    assert!(
        code == 0 && out.starts_with("ed@%\nSsl_version\tTLSv1."),
        "{out}"
    );
    let (code, out) = cli(require, "x", sql);
    assert!(
        code == 0 && out.starts_with("app@%\nSsl_version\tTLSv1."),
        "{out}"
    );
    // A certificate from another CA: refused before any password is sent.
    let (code, out) = cli(wrong_ca, "x", "SELECT 1;");
    assert!(
        code == 1
            && out.contains("ERROR 1429 (HY000)")
            && out.contains("is not signed by a trusted CA"),
        "{out}"
    );
}

/// Near the descriptor limit new connections get MySQL's own 1040 "too many
/// connections" in place of the greeting, not a hang; once idle clients go,
/// sessions are served again. (The idle clients here have begun their
/// handshake response, so none is silent and none can be evicted to make
/// room: that is tested in limits.rs.)
#[test]
fn near_the_descriptor_limit_clients_get_1040() {
    const NOFILE: u32 = 256;
    let server = MariaDb::start();
    server.admin(&format!("CREATE USER 'app'@'%' IDENTIFIED BY '{APP_PW}';"));
    let port = free_port();
    let cfg = format!(
        "trust_domain = \"example.org\"\n\n[[workload]]\nname = \"me\"\n\
         spiffe_id = \"spiffe://example.org/me\"\nselectors = {{ uid = {uid} }}\n\n\
         [[route]]\nname = \"db\"\nkind = \"mysql\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"127.0.0.1:{up}\"\nupstream_tls = {{ mode = \"disable\" }}\n\
         credential = {{ user = \"app\", secret = \"db/app\" }}\nallow = [\"me\"]\n\n\
         [monitor]\nebpf = \"off\"\n",
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("db/app", APP_PW.as_bytes()).ok();
    let log = warden.dir.path().join("daemon.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(warden_tests::warden_bin())
        .arg("--config")
        .arg(&warden.config)
        .arg("up")
        .env("WARDEN_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .expect("prlimit (util-linux) is required");
    let daemon = warden_tests::Daemon { child, log };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while warden.run(&["status"]).code != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready: {}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cli(port, "x", "SELECT 1;"), (0, "1\n".into()));
    // Idle clients that never finish their handshake response, more than
    // the limit allows.
    let idle: Vec<TcpStream> = (0..NOFILE + 40)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = c.write_all(&[0x20]);
            c
        })
        .collect();
    // More connections than descriptors: the ones warden could not keep
    // got MySQL's own 1040 in place of its greeting (read off the wire; a
    // connection still queued in the backlog has nothing to read).
    let refused = idle
        .iter()
        .rev()
        .take(80)
        .filter(|c| {
            let mut c = *c;
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 512];
            let n = c.read(&mut buf).unwrap_or(0);
            // An ERR packet: header, 0xff, code 1040 little-endian.
            n > 7
                && buf[4] == 0xff
                && buf[5..7] == 1040u16.to_le_bytes()
                && String::from_utf8_lossy(&buf[..n]).contains("too many connections")
        })
        .count();
    assert!(refused > 0, "no connection got 1040: {}", daemon.log_text());
    // A client meanwhile gets 1040 too, or a session if warden freed a
    // descriptor by then (a partial handshake that failed): never a hang.
    let (code, out) = cli(port, "x", "SELECT 1;");
    assert!(
        (code == 1 && out.contains("ERROR 1040") && out.contains("too many connections"))
            || (code == 0 && out == "1\n"),
        "{out} {}",
        daemon.log_text()
    );
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out) = cli(port, "x", "SELECT 2;");
        if code == 0 {
            assert_eq!(out, "2\n");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still refused: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!daemon.log_text().contains(APP_PW));
}

#[test]
fn warden_scrambles_match_pymysql() {
    let nonce: Vec<u8> = (0..20u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11) & 0x7f)
        .collect();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for pw in ["secret", "pässwörd with spaces", "x"] {
        let (code, out) = python(
            "import sys\n\
             from pymysql._auth import scramble_native_password, scramble_caching_sha2\n\
             pw = sys.argv[1].encode(); n = bytes.fromhex(sys.argv[2])\n\
             print(scramble_native_password(pw, n).hex()); print(scramble_caching_sha2(pw, n).hex())",
            &[pw, &hex(&nonce)], b"");
        assert_eq!(code, 0, "{out}");
        let want = format!(
            "{}\n{}\n",
            hex(&warden_mysql::auth::native_password(pw.as_bytes(), &nonce)),
            hex(&warden_mysql::auth::caching_sha2(pw.as_bytes(), &nonce))
        );
        assert_eq!(out, want, "password {pw:?}");
    }
}

const ADMIN_PW: &str = "mysql-CANARY-ad77-leaseadmin";

/// Lease user names on the server (`w_…`).
fn lease_users(server: &MariaDb) -> Vec<String> {
    server
        .admin("SELECT User FROM mysql.user WHERE User LIKE 'w\\_%' ORDER BY User;")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn dynamic_routes_log_in_as_a_lease_user_that_revocation_drops() {
    let server = MariaDb::start();
    server.admin(&format!(
        "CREATE DATABASE orders;
         CREATE TABLE orders.items (id INT PRIMARY KEY, name VARCHAR(20));
         INSERT INTO orders.items VALUES (1, 'apple');
         CREATE ROLE orders_reader;
         GRANT SELECT ON orders.* TO orders_reader;
         CREATE USER 'leaseadmin'@'%' IDENTIFIED BY '{ADMIN_PW}';
         GRANT CREATE USER, CONNECTION ADMIN ON *.* TO 'leaseadmin'@'%';
         GRANT orders_reader TO 'leaseadmin'@'%' WITH ADMIN OPTION;"
    ));
    let (port, bad) = (free_port(), free_port());
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "orders-dyn"
kind = "mysql"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "leaseadmin", secret = "orders/admin", dynamic = {{ ttl = "1h", role = "orders_reader", role_prefix = "w_" }} }}
allow = ["me"]

[[route]]
name = "orders-badrole"
kind = "mysql"
listen = "127.0.0.1:{bad}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "leaseadmin", secret = "orders/admin", dynamic = {{ role = "no_such_role", role_prefix = "w_" }} }}
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("orders/admin", ADMIN_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();

    // The session logs in as a generated user holding the route's role.
    let (code, out) = cli(
        port,
        "x",
        "SELECT CURRENT_USER(), CURRENT_ROLE(); SELECT name FROM orders.items;",
    );
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    let (user, role) = lines.next().unwrap().split_once('\t').unwrap();
    let user = user.strip_suffix("@%").unwrap_or(user).to_string();
    assert!(user.starts_with("w_me_") && user.len() <= 32, "{out}");
    assert_eq!(role, "orders_reader", "{out}");
    assert_eq!(lines.next(), Some("apple"), "{out}");
    // A second session reuses the lease.
    let (code, out) = cli(port, "x", "SELECT CURRENT_USER();");
    assert_eq!((code, out.trim()), (0, format!("{user}@%").as_str()));
    assert_eq!(lease_users(&server), vec![user.clone()]);
    let hash = server.admin(&format!(
        "SELECT authentication_string FROM mysql.user WHERE User = '{user}';"
    ));
    let hash = hash.trim().to_string();
    assert!(hash.starts_with('*') && hash.len() == 41, "{hash}");

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
    assert_eq!(lease["route"], "orders-dyn");
    assert_eq!(lease["workload"], "me");
    let id = lease["id"].as_str().unwrap().to_string();

    // An open session, then the revocation: the session ends, the user is
    // gone, the next session gets a new user.
    let (mut open, answer) = Raw::login(port, "x");
    assert_eq!(answer[0], 0, "{answer:?}");
    assert_eq!(first_value(&open.query("SELECT 1")), "1");
    let out = warden.run(&["lease", "revoke", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        lease_users(&server).is_empty(),
        "{:?}",
        lease_users(&server)
    );
    let after = open.query("SELECT 1");
    assert!(
        after.first().is_none_or(|p| p[0] == 0xff),
        "the open session outlived its lease: {after:?}"
    );
    let (code, out) = cli(port, "x", "SELECT CURRENT_USER();");
    assert_eq!(code, 0, "{out}");
    let user2 = out.trim().trim_end_matches("@%").to_string();
    assert!(user2.starts_with("w_me_") && user2 != user, "{out}");
    assert_eq!(lease_users(&server), vec![user2.clone()]);
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(
        audit.contains("revoked by an admin (`warden lease revoke`)") && audit.contains(&user),
        "{audit}"
    );
    // Session records name the lease user and lease, not the admin secret.
    let start = audit
        .lines()
        .find(|l| l.contains("session.start") && l.contains(&format!("as \\\"{user}\\\"")))
        .unwrap_or_else(|| panic!("{audit}"));
    assert!(
        start.contains(&format!("lease {id}")) && !start.contains("orders/admin"),
        "{start}"
    );

    // A lease that cannot be created: access denied naming route and
    // workload (and the role), counted and recorded.
    let (code, out) = cli(bad, "x", "SELECT 1;");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ERROR 1045")
            && out.contains("orders-badrole")
            && out.contains("\"me\"")
            && out.contains("no_such_role"),
        "{out}"
    );
    assert_eq!(
        lease_users(&server),
        vec![user2.clone()],
        "a failed lease left its user"
    );
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(
        audit.contains("lease.create") && audit.contains("no_such_role"),
        "{audit}"
    );
    let (status, metrics) = warden.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("orders-badrole") && l.contains("credential_error")),
        "{metrics}"
    );

    // Neither the lease's password nor its hash is anywhere warden writes.
    assert!(
        !daemon.log_text().contains(&hash) && !metrics.contains(&hash) && !audit.contains(&hash)
    );
    assert!(files_containing(warden.dir.path(), hash.as_bytes()).is_empty());
    assert!(!daemon.log_text().contains("IDENTIFIED"));
    // Revocation of a user with no connection left (expiry, the sweep)
    // works: MariaDB's KILL USER then ends nothing and succeeds.
    server.admin("KILL USER 'w_nobody_00000000';");
    // A graceful stop revokes the leases it holds.
    drop(daemon);
    assert!(
        lease_users(&server).is_empty(),
        "{:?}",
        lease_users(&server)
    );
}

/// A MariaDB with a role and a lease admin, and an initialised warden with
/// one dynamic mysql route whose `dynamic` table is `dynamic`.
fn dyn_setup(dynamic: &str) -> (MariaDb, Instance, u16) {
    let server = MariaDb::start();
    server.admin(&format!(
        "CREATE ROLE orders_reader;
         CREATE USER 'leaseadmin'@'%' IDENTIFIED BY '{ADMIN_PW}';
         GRANT CREATE USER, CONNECTION ADMIN ON *.* TO 'leaseadmin'@'%';
         GRANT orders_reader TO 'leaseadmin'@'%' WITH ADMIN OPTION;"
    ));
    let port = free_port();
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}

[[route]]
name = "orders-dyn"
kind = "mysql"
listen = "127.0.0.1:{port}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "leaseadmin", secret = "orders/admin", dynamic = {dynamic} }}
allow = ["me"]

[monitor]
ebpf = "off"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("orders/admin", ADMIN_PW.as_bytes()).ok();
    (server, warden, port)
}

/// Waits (up to 60 s) until no lease user is left on the server.
fn until_no_lease_users(server: &MariaDb) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lease_users(server).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "lease users left: {:?}",
            lease_users(server)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn mysql_leases_end_at_max_ttl_and_a_restart_drops_what_a_killed_warden_left() {
    let (server, warden, port) = dyn_setup(
        "{ ttl = \"1s\", max_ttl = \"2s\", role = \"orders_reader\", role_prefix = \"w_\" }",
    );
    let daemon = warden.start_daemon();
    // An open session past max_ttl: the user is dropped and the session ends.
    let (mut open, answer) = Raw::login(port, "x");
    assert_eq!(answer[0], 0, "{answer:?}");
    assert_eq!(lease_users(&server).len(), 1);
    until_no_lease_users(&server);
    let after = open.query("SELECT 1");
    assert!(
        after.first().is_none_or(|p| p[0] == 0xff),
        "the open session outlived its lease: {after:?}"
    );
    let audit = std::fs::read_to_string(warden.audit_log()).unwrap();
    assert!(audit.contains("max_ttl reached"), "{audit}");
    drop(daemon);
    // `warden lease bench` (daemon stopped) creates and revokes mysql leases too.
    let out = warden.run(&[
        "lease",
        "bench",
        "--route",
        "orders-dyn",
        "--count",
        "8",
        "--concurrency",
        "2",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["leases"].as_u64(), v["revoked"].as_u64()),
        (Some(8), Some(9)),
        "{v}"
    );
    assert!(
        lease_users(&server).is_empty(),
        "{:?}",
        lease_users(&server)
    );

    // A warden killed with its lease held: the next start drops the user.
    let (server2, warden2, port2) =
        dyn_setup("{ ttl = \"1h\", role = \"orders_reader\", role_prefix = \"w_\" }");
    let mut daemon = warden2.start_daemon();
    let (code, out) = cli(port2, "x", "SELECT CURRENT_USER();");
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

/// With two session threads, the route has a listener per shard runtime
/// and the kernel spreads clients over them: the one pooled server
/// connection goes from shard to shard (moved to the taking shard's
/// runtime) and keeps serving every client.
#[test]
fn mysql_sessions_run_on_the_session_shards_and_share_the_pool_across_them() {
    let server = MariaDb::start();
    server.admin(&format!("CREATE USER 'app'@'%' IDENTIFIED BY '{APP_PW}';"));
    let (warden, _daemon, port) = warden_tests::start_sharded(
        "mysql",
        server.port,
        "credential = { user = \"app\", secret = \"db/app\" }",
        "db/app",
        APP_PW.as_bytes(),
    );
    let returned = |n: f64| {
        wait_for("the connection back in the pool", || {
            metric(
                &warden,
                "warden_pg_pool_total{result=\"returned\",route=\"sharded\"}",
            ) >= n
        })
    };
    let mut ids = std::collections::BTreeSet::new();
    for i in 1..=30u32 {
        let (code, out) = cli(port, "x", "SELECT CONNECTION_ID();");
        assert_eq!(code, 0, "session {i}: {out}");
        ids.insert(out.trim().to_string());
        returned(f64::from(i));
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
}
