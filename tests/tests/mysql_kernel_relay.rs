//! The eBPF kernel relay on MySQL routes end to end: a real MariaDB server
//! behind a warden whose monitor is loaded (root). A PyMySQL session that
//! ran result sets, multi-statement queries, errors and server-side
//! prepared statements (raw COM_STMT_PREPARE/EXECUTE/RESET/CLOSE) is
//! spliced in the kernel past its first round trips and keeps working (a
//! 1 MB value both ways); its end record says so and its upstream
//! connection is not pooled. The `mariadb` CLI is spliced too. A spliced
//! session's `COM_CHANGE_USER` is caught by the kernel program and refused
//! by warden, as in user space. A TLS client, a session that ran `LOAD
//! DATA LOCAL INFILE`, and a route with `kernel_relay = false` stay in user
//! space; a freeze ends a spliced session.
//!
//! Needs root (CI runs as root with `WARDEN_REQUIRE_EBPF=1`, so these never
//! skip there).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use warden_tests::cgroup::Cgroup;
use warden_tests::mysql::{cli_with, python, python_with_pymysql, MariaDb};
use warden_tests::{
    byte_counts, free_port, have_root, metric, my_uid, session_ends, wait_for, Instance,
};

const APP_PW: &str = "mysql-CANARY-77e1-kernel";

struct Setup {
    _server: MariaDb,
    warden: Instance,
    _daemon: warden_tests::Daemon,
    /// Route `kr`: no `kernel_relay` key (on by default), `client_tls =
    /// true`, pooled.
    kr: u16,
    /// Route `plain`: `kernel_relay = false`.
    plain: u16,
}

/// `extra` goes after the workload `me` (more workloads); `allow` is both
/// routes' allow list.
fn setup(extra: &str, allow: &str) -> Setup {
    let server = MariaDb::start();
    server.admin(&format!(
        "CREATE DATABASE orders;
         CREATE TABLE orders.items (id INT PRIMARY KEY, name VARCHAR(20));
         CREATE TABLE orders.blobs (id INT PRIMARY KEY, b LONGBLOB);
         CREATE TABLE orders.loaded (id INT, name VARCHAR(20));
         INSERT INTO orders.items VALUES (1, 'apple'), (2, 'pear');
         CREATE USER 'app'@'%' IDENTIFIED BY '{APP_PW}';
         CREATE USER 'nopw'@'%';
         GRANT SELECT ON orders.* TO 'nopw'@'%';
         GRANT ALL ON orders.* TO 'app'@'%';"
    ));
    let [kr, plain] = [free_port(), free_port()];
    let cfg = format!(
        r#"
trust_domain = "example.org"

[[workload]]
name = "me"
spiffe_id = "spiffe://example.org/me"
selectors = {{ uid = {uid} }}
{extra}

[[route]]
name = "kr"
kind = "mysql"
listen = "127.0.0.1:{kr}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/app" }}
client_tls = true
allow = [{allow}]

[[route]]
name = "plain"
kind = "mysql"
listen = "127.0.0.1:{plain}"
upstream = "127.0.0.1:{up}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders/app" }}
kernel_relay = false
allow = [{allow}]

[monitor]
ebpf = "required"
"#,
        uid = my_uid(),
        up = server.port,
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("orders/app", APP_PW.as_bytes()).ok();
    let check = warden.run(&["config", "check", &warden.config.display().to_string()]);
    assert_eq!(check.code, 0, "{check:#?}");
    let daemon = warden.start_daemon();
    Setup {
        _server: server,
        warden,
        _daemon: daemon,
        kr,
        plain,
    }
}

fn relay_metric(w: &Instance, route: &str, result: &str) -> f64 {
    metric(
        w,
        &format!("warden_mysql_kernel_relay_total{{result=\"{result}\",route=\"{route}\"}}"),
    )
}

/// Every kernel-relay series (for a failure's message).
fn relay_series(w: &Instance) -> String {
    let text = w.http_get("/metrics").1;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("warden_mysql_kernel_relay_total"))
        .collect();
    lines.join("; ")
}

/// A PyMySQL session driven line by line: after its warm-up (more answered
/// commands than warden waits for, of every tracked kind) it prints
/// `warm`; then each `ping` line is one more query (`pong`), a `change`
/// line sends `COM_CHANGE_USER` to the password-less user `nopw` (prints
/// `refused <code> <the error names the command>` or `changed`, then `user
/// <CURRENT_USER()>`), and an empty line runs the workload again, prints what it got and `done`, and exits.
/// `extra_setup` runs right after connecting.
const SESSION: &str = r#"
import sys, struct, pymysql
from pymysql.constants import CLIENT, COMMAND

port = int(sys.argv[1])
extra = sys.argv[2] if len(sys.argv) > 2 else ""
c = pymysql.connect(host="127.0.0.1", port=port, user="x", database="orders",
                    client_flag=CLIENT.MULTI_STATEMENTS, autocommit=True,
                    local_infile=True, max_allowed_packet=64 * 1024 * 1024,
                    ssl_disabled=True)
cur = c.cursor()
if extra:
    cur.execute(extra)

def packets_until_eofs(n):
    """Raw packets up to the n-th EOF."""
    out = []
    while n > 0:
        p = c._read_packet().get_all_data()
        out.append(p)
        if p[0] == 0xFE and len(p) < 9:
            n -= 1
    return out

def prepared(a, b):
    """CONCAT(?, '-', name) for id ?, by the binary protocol."""
    c._execute_command(COMMAND.COM_STMT_PREPARE,
                       "SELECT CONCAT(?, '-', name) FROM items WHERE id = ?")
    ok = c._read_packet().get_all_data()
    stmt, cols, params = struct.unpack("<xIHH", ok[:9])
    assert (cols, params) == (1, 2), (cols, params)
    packets_until_eofs(2)
    def lenenc(s):
        return bytes([len(s)]) + s
    body = struct.pack("<IBI", stmt, 0, 1) + b"\x00" + b"\x01" + b"\xfd\x00\xfd\x00"
    body += lenenc(a.encode()) + lenenc(str(b).encode())
    c._execute_command(COMMAND.COM_STMT_EXECUTE, body)
    count = c._read_packet().get_all_data()
    assert count == b"\x01", count
    rows = packets_until_eofs(2)[:-1]
    row = rows[-1]
    value = row[3:3 + row[2]].decode()
    c._execute_command(COMMAND.COM_STMT_RESET, struct.pack("<I", stmt))
    assert c._read_packet().get_all_data()[0] == 0
    c._execute_command(COMMAND.COM_STMT_CLOSE, struct.pack("<I", stmt))
    return value

def workload(tag):
    out = []
    cur.execute("SELECT id, name FROM items ORDER BY id")
    out.append(cur.fetchall())
    cur.execute("SELECT 1; DO 1; SELECT 2, 'two'")
    sets = [cur.fetchall()]
    while cur.nextset():
        sets.append(cur.fetchall())
    out.append(sets)
    try:
        cur.execute("SELECT * FROM nope")
    except pymysql.err.ProgrammingError as e:
        out.append(e.args[0])
    out.append(prepared(tag, 2))
    c.ping(reconnect=False)
    c.select_db("orders")
    return out

first = workload("warm")
for i in range(40):
    cur.execute("SELECT %s", (i,))
    assert cur.fetchone()[0] == i
print("warm", first, flush=True)
while True:
    line = sys.stdin.readline().strip()
    if line == "ping":
        cur.execute("SELECT 7")
        assert cur.fetchone()[0] == 7
        print("pong", flush=True)
    elif line == "change":
        c._execute_command(COMMAND.COM_CHANGE_USER,
                           b"nopw\0\0orders\0\x21\x00mysql_native_password\0")
        try:
            c._read_packet()
            print("changed", flush=True)
        except pymysql.err.OperationalError as e:
            print("refused", e.args[0], "COM_CHANGE_USER" in e.args[1], flush=True)
        cur.execute("SELECT CURRENT_USER()")
        print("user", cur.fetchone()[0], flush=True)
    else:
        break
print("after", workload("spliced"), flush=True)
big = bytes(i % 251 for i in range(1 << 20))
cur.execute("REPLACE INTO blobs VALUES (1, %s)", (big,))
cur.execute("SELECT b FROM blobs WHERE id = 1")
print("big", cur.fetchone()[0] == big, flush=True)
for i in range(50):
    cur.execute("SELECT %s + 1", (i,))
    assert cur.fetchone()[0] == i + 1
print("done", flush=True)
"#;

/// The script in the warden's directory (run by path: `Cgroup::command`
/// takes a shell command line).
fn session_script(w: &Instance) -> std::path::PathBuf {
    let path = w.dir.path().join("session.py");
    std::fs::write(&path, SESSION).unwrap();
    path
}

struct Driven {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Driven {
    fn start(mut cmd: Command) -> Driven {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Driven {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    /// Round trips until route `kr` spliced a session (or 20 s).
    fn ping_until_spliced(&mut self, w: &Instance) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay_metric(w, "kr", "spliced") < 1.0 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the splice: {}",
                relay_series(w)
            );
            writeln!(self.stdin, "ping").unwrap();
            assert_eq!(self.line(), "pong");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the ping loop; the rest of the output.
    fn finish(mut self) -> (bool, String) {
        writeln!(self.stdin).unwrap();
        drop(self.stdin);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        (self.child.wait().unwrap().success(), rest)
    }
}

/// The session script on route `kr`, started.
fn start_session(s: &Setup) -> Driven {
    let script = session_script(&s.warden);
    let mut cmd = Command::new(python_with_pymysql());
    cmd.arg(&script).arg(s.kr.to_string());
    Driven::start(cmd)
}

const WORKLOAD: &str = "[((1, 'apple'), (2, 'pear')), [((1,),), [], ((2, 'two'),)], 1146";

#[test]
fn a_long_pymysql_session_is_spliced_and_keeps_working() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let mut d = start_session(&s);
    let warm = d.line();
    assert_eq!(warm, format!("warm {WORKLOAD}, 'warm-pear']"));
    // The client's socket joins the kernel's map off the session's thread
    // after the first quiet moment; the splice comes at a later one.
    d.ping_until_spliced(&s.warden);
    let (ok, rest) = d.finish();
    assert!(ok, "{rest}");
    assert_eq!(
        rest,
        format!("after {WORKLOAD}, 'spliced-pear']\nbig True\ndone\n")
    );
    wait_for("session.end", || {
        !session_ends(&s.warden, Some("kr")).is_empty()
    });
    let end = session_ends(&s.warden, Some("kr")).remove(0);
    assert!(end.contains("closed (kernel relay)"), "{end}");
    let (up, down) = byte_counts(&end);
    assert!(up > 1 << 20 && down > 1 << 20, "{end}");
    // A spliced session's upstream connection is closed, never pooled.
    assert_eq!(
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"returned\",route=\"kr\"}"
        ),
        0.0
    );
    // A request/response client passes the splice's check: the kernel
    // moved its bytes (not warden, over TCP).
    assert_eq!(relay_metric(&s.warden, "kr", "tcp_path"), 0.0);
}

/// After the splice the kernel hands `COM_CHANGE_USER` to warden, which
/// refuses it as it does in user space: the server never sees it (the
/// password-less `nopw` would have let it in), the session stays the
/// route's login and goes on.
#[test]
fn a_spliced_session_cannot_change_user() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let mut d = start_session(&s);
    assert!(d.line().starts_with("warm "));
    d.ping_until_spliced(&s.warden);
    for _ in 0..2 {
        writeln!(d.stdin, "change").unwrap();
        assert_eq!(d.line(), "refused 1045 True");
        assert_eq!(d.line(), "user app@%");
        writeln!(d.stdin, "ping").unwrap();
        assert_eq!(d.line(), "pong");
    }
    let (ok, rest) = d.finish();
    assert!(ok && rest.ends_with("done\n"), "{rest}");
    wait_for("session.end", || {
        !session_ends(&s.warden, Some("kr")).is_empty()
    });
    let end = session_ends(&s.warden, Some("kr")).remove(0);
    assert!(
        end.contains("closed (kernel relay)") && end.contains("2 COM_CHANGE_USER refused"),
        "{end}"
    );
    assert_eq!(relay_metric(&s.warden, "kr", "spliced"), 1.0);
}

#[test]
fn a_long_mariadb_cli_session_is_spliced() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let mut child = Command::new("mariadb")
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "-P", &s.kr.to_string(), "-u", "x"])
        .args(["--batch", "--skip-column-names", "--skip-ssl", "orders"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..40 {
        writeln!(stdin, "SELECT {i}; SELECT name FROM items WHERE id = 1;").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay_metric(&s.warden, "kr", "spliced") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the splice: {}",
            relay_series(&s.warden)
        );
        writeln!(stdin, "DO 1;").unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    writeln!(
        stdin,
        "SELECT 'after', COUNT(*) FROM items; SELECT 1; SELECT 2;"
    )
    .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.ends_with("39\napple\nafter\t2\n1\n2\n"), "{text}");
    wait_for("session.end", || {
        !session_ends(&s.warden, Some("kr")).is_empty()
    });
    let end = session_ends(&s.warden, Some("kr")).remove(0);
    assert!(end.contains("closed (kernel relay)"), "{end}");
}

/// TLS from the client, a LOCAL INFILE, and a route with `kernel_relay =
/// false`: long sessions, never offered to the kernel.
#[test]
fn ineligible_sessions_stay_in_user_space() {
    if !have_root() {
        return;
    }
    let s = setup("", "\"me\"");
    let never = |route: &str| {
        for result in ["spliced", "busy", "not_local"] {
            assert_eq!(
                relay_metric(&s.warden, route, result),
                0.0,
                "{route} {result}"
            );
        }
    };
    let long: String = (0..80).map(|i| format!("SELECT {i};\n")).collect();
    // A TLS client on the kernel_relay route (the same statements, one by
    // one with pauses, from a script).
    let bundle = s.warden.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        s.warden.run(&["svid", "bundle"]).ok().stdout.as_bytes(),
    )
    .unwrap();
    let ssl_ca = format!("--ssl-ca={}", bundle.display());
    let (code, out) = cli_with(s.kr, "x", &["--ssl", &ssl_ca], &format!("{long}status;"));
    assert!(code == 0 && out.contains("Cipher in use is TLS"), "{out}");
    // PyMySQL over TLS, with pauses (time for a join and a splice).
    let (code, out) = python(
        "import sys, time, pymysql\n\
         c = pymysql.connect(host='127.0.0.1', port=int(sys.argv[1]), user='x', ssl_ca=sys.argv[2])\n\
         cur = c.cursor()\n\
         for i in range(120):\n    cur.execute('SELECT %s', (i,)); assert cur.fetchone()[0] == i; time.sleep(0.01)\n\
         print(c._sock.version())",
        &[&s.kr.to_string(), &bundle.display().to_string()],
        b"",
    );
    assert!(code == 0 && out.starts_with("TLSv1.3"), "{out}");
    wait_for("the TLS sessions' ends", || {
        session_ends(&s.warden, Some("kr")).len() == 2
    });
    never("kr");
    // LOCAL INFILE first: the session is never offered, however long.
    let data = s.warden.dir.path().join("rows.tsv");
    std::fs::write(&data, "1\tfig\n2\tkiwi\n").unwrap();
    let (code, out) = python(
        "import sys, time, pymysql\n\
         c = pymysql.connect(host='127.0.0.1', port=int(sys.argv[1]), user='x', database='orders', local_infile=True, autocommit=True, ssl_disabled=True)\n\
         cur = c.cursor()\n\
         cur.execute(\"LOAD DATA LOCAL INFILE '%s' INTO TABLE loaded\" % sys.argv[2])\n\
         for i in range(120):\n    cur.execute('SELECT %s', (i,)); assert cur.fetchone()[0] == i; time.sleep(0.01)\n\
         cur.execute('SELECT GROUP_CONCAT(name ORDER BY id) FROM loaded'); print(cur.fetchone()[0])",
        &[&s.kr.to_string(), &data.display().to_string()],
        b"",
    );
    assert_eq!((code, out.as_str()), (0, "fig,kiwi\n"));
    wait_for("the LOCAL INFILE session's end", || {
        session_ends(&s.warden, Some("kr")).len() == 3
    });
    never("kr");
    for end in session_ends(&s.warden, Some("kr")) {
        assert!(!end.contains("kernel relay"), "{end}");
    }
    // kernel_relay = false: the same long session stays in user space and
    // its connection is pooled.
    let script = session_script(&s.warden);
    let mut cmd = Command::new(python_with_pymysql());
    cmd.arg(&script).arg(s.plain.to_string());
    let mut d = Driven::start(cmd);
    assert!(d.line().starts_with("warm "));
    for _ in 0..40 {
        writeln!(d.stdin, "ping").unwrap();
        assert_eq!(d.line(), "pong");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ok, rest) = d.finish();
    assert!(ok && rest.ends_with("done\n"), "{rest}");
    wait_for("session.end", || {
        !session_ends(&s.warden, Some("plain")).is_empty()
    });
    let end = session_ends(&s.warden, Some("plain")).remove(0);
    assert!(!end.contains("kernel relay"), "{end}");
    assert!(
        !s.warden
            .http_get("/metrics")
            .1
            .contains("warden_mysql_kernel_relay_total{result=\"spliced\",route=\"plain\"}"),
        "a route with kernel_relay = false has no series"
    );
    wait_for("the pooled connection", || {
        metric(
            &s.warden,
            "warden_pg_pool_total{result=\"returned\",route=\"plain\"}",
        ) >= 1.0
    });
}

/// A spliced session (route `kr`) and one in user space (`plain`).
#[test]
fn a_freeze_ends_a_spliced_session_and_one_in_user_space() {
    if !have_root() {
        return;
    }
    // The frozen workload is a client in a cgroup of its own: a freeze
    // also freezes every process attesting to the workload, never uid 0.
    let cg = Cgroup::new("mysql-kernel-relay");
    let workload = format!(
        "\n[[workload]]\nname = \"kr\"\nspiffe_id = \"spiffe://example.org/kr\"\nselectors = {{ uid = 0, cgroup = \"{}\" }}\n",
        cg.name
    );
    let s = setup(&workload, "\"me\", \"kr\"");
    let script = format!(
        r#"
import sys, pymysql
conns = []
for port in ({spliced}, {user_space}):
    c = pymysql.connect(host="127.0.0.1", port=port, user="x", ssl_disabled=True)
    cur = c.cursor()
    for i in range(40):
        cur.execute("SELECT %s", (i,))
        assert cur.fetchone()[0] == i
    conns.append(c)
print("warm", flush=True)
while sys.stdin.readline().strip() == "ping":
    cur = conns[0].cursor()
    cur.execute("SELECT 7")
    assert cur.fetchone()[0] == 7
    print("pong", flush=True)
for c in conns:
    try:
        c.cursor().execute("SELECT 1")
        print("not frozen", flush=True)
    except pymysql.err.OperationalError as e:
        print(e.args[0], e.args[1], flush=True)
"#,
        spliced = s.kr,
        user_space = s.plain,
    );
    let path = s.warden.dir.path().join("client.py");
    std::fs::write(&path, script).unwrap();
    let mut d = Driven::start(cg.command(&format!(
        "timeout 60 {} {}",
        python_with_pymysql().display(),
        path.display()
    )));
    assert_eq!(d.line(), "warm");
    d.ping_until_spliced(&s.warden);
    let out = s
        .warden
        .run(&["freeze", "kr", "--reason", "kernel relay test"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    wait_for("the frozen sessions' records", || {
        session_ends(&s.warden, Some("kr"))
            .iter()
            .any(|e| e.contains("closed: workload frozen (kernel relay)"))
            && session_ends(&s.warden, Some("plain"))
                .iter()
                .any(|e| e.contains("closed: workload frozen\""))
    });
    let (ok, rest) = d.finish();
    assert!(ok, "{rest}");
    // One line per connection: the freeze's error (1927, connection
    // killed), read as the answer to the next query.
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines.len(), 2, "{rest}");
    for line in lines {
        assert!(
            line.starts_with("1927 ") && line.contains("frozen"),
            "{rest}"
        );
    }
    s.warden.run(&["unfreeze", "kr"]).ok();
}
