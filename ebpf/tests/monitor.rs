//! The kernel programs on the real kernel: attribution, deny, bypass
//! detection, event accounting and the crash/restart behaviour.
//!
//! These need root (CAP_BPF + CAP_NET_ADMIN). Without it they print
//! `skipping: needs root`, unless `WARDEN_REQUIRE_EBPF=1` (set by
//! `cargo xtask test` when it runs as root, as CI does), where a missing
//! capability is a failure: the eBPF tests never silently skip in CI.
#![allow(unsafe_code)]
// ebpf/ may use unsafe (libc calls below).
// Test helpers outside #[test] functions panic on setup failures by design.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use warden_ebpf::{
    cgroup2_mount, cgroup_id_of_path, AccessEvent, EventKind, Monitor, MonitorConfig, ProtectMode,
    Verdict,
};

mod common;
use common::have_root;

fn load(cfg: MonitorConfig) -> Arc<Monitor> {
    Arc::new(Monitor::load(&cfg).unwrap_or_else(|e| panic!("loading the monitor: {e}")))
}

fn watching(listeners: &[SocketAddr]) -> Arc<Monitor> {
    load(MonitorConfig {
        listeners: listeners.to_vec(),
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    })
}

/// Accepts one connection and returns the peer address the proxy would see.
fn accept_peer(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(false).expect("blocking listener");
    let (stream, peer) = listener.accept().expect("accept");
    (stream, peer)
}

fn curl(url: &str) -> Command {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "--max-time", "10", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// A child cgroup under the cgroup2 mount, removed on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(tag: &str) -> TestCgroup {
        let root = cgroup2_mount().expect("cgroup2 mount");
        let dir = root.join(format!("warden-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create cgroup");
        TestCgroup(dir)
    }
    fn id(&self) -> u64 {
        cgroup_id_of_path(&self.0).expect("cgroup id")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes must have left (exited) first; retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

const PROBE: &str = r#"
import errno, os, socket, sys
port = int(sys.argv[1])
if len(sys.argv) > 2:
    with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
print("ready", flush=True)
for line in sys.stdin:
    out = []
    for fam, addr in ((socket.AF_INET, ("127.0.0.1", port)),
                      (socket.AF_INET6, ("::ffff:127.0.0.1", port))):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(addr)
            out.append("OK")
        except OSError as e:
            out.append(errno.errorcode.get(e.errno, str(e.errno)))
        finally:
            s.close()
    print(" ".join(out), flush=True)
"#;

/// A python process that connects to 127.0.0.1:PORT and ::ffff:127.0.0.1:PORT
/// each time it is asked, and reports the errno names ("OK" on success).
struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    fn start(port: u16, cgroup: Option<&Path>) -> Probe {
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(PROBE).arg(port.to_string());
        if let Some(dir) = cgroup {
            cmd.arg(dir);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        assert_eq!(line.trim(), "ready", "probe did not start");
        Probe {
            child,
            stdin,
            stdout,
        }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn try_connect(&mut self) -> String {
        writeln!(self.stdin, "go").expect("probe stdin");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("probe answer");
        line.trim().to_string()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listener that accepts and drops connections in the background.
fn sink_listener(addr: &str) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind(addr).expect("bind");
    let local = listener.local_addr().expect("local addr");
    // A deep accept queue: with the default 128, a starved accept thread lets
    // SYNs drop and a connect waits a second for its retransmit.
    // SAFETY: a valid listening socket fd.
    unsafe {
        libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            drop(s);
        }
    });
    (local, stop)
}

fn drain_all(reader: &mut warden_ebpf::EventReader) -> Vec<AccessEvent> {
    let mut out = Vec::new();
    // The ring is drained on a timer in production; here poll until quiet.
    for _ in 0..20 {
        let n = reader.drain(|e| out.push(e));
        if n == 0 && !out.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

#[test]
fn attributes_curl_psql_and_a_rust_thread() {
    if !have_root() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let monitor = watching(&[addr]);

    let mut child = curl(&format!("http://{addr}/")).spawn().expect("curl");
    let (stream, peer) = accept_peer(&listener);
    let info = monitor
        .lookup(peer)
        .expect("curl's connection is in the map");
    assert_eq!(info.tgid, child.id(), "curl's pid");
    drop(stream);
    let _ = child.wait();

    // Debian's psql is a wrapper that execs the real binary: same pid.
    let mut psql = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=nobody dbname=x connect_timeout=10 sslmode=disable",
            addr.port()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("PGPASSWORD", "unused")
        .spawn()
        .expect("psql");
    let (stream, peer) = accept_peer(&listener);
    let info = monitor
        .lookup(peer)
        .expect("psql's connection is in the map");
    assert_eq!(info.tgid, psql.id(), "psql's pid");
    drop(stream);
    let _ = psql.wait();

    // A non-main thread of this process.
    let client = std::thread::spawn(move || {
        let s = TcpStream::connect(addr).expect("connect");
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        (s, tid)
    });
    let (stream, peer) = accept_peer(&listener);
    let (_client_stream, tid) = client.join().expect("thread");
    let info = monitor
        .lookup(peer)
        .expect("thread's connection is in the map");
    assert_eq!(info.tgid, std::process::id());
    assert_eq!(info.pid, tid, "the connecting thread's id");
    assert_ne!(info.pid, info.tgid);
    drop(stream);
}

/// Polls `f` for up to 10 s.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn an_exec_and_an_exit_change_the_processs_count() {
    if !have_root() {
        return;
    }
    let monitor = watching(&[]);
    // A shell waiting for a line, then exec'ing sleep.
    let mut child = Command::new("sh")
        .args(["-c", "read line; exec sleep 30"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh");
    let tgid = child.id();
    // The shell's own exec happened at spawn (perhaps before the read).
    std::thread::sleep(Duration::from_millis(200));
    let before = monitor.change_count(tgid);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write");
    assert!(
        eventually(|| monitor.change_count(tgid) > before),
        "the exec of sleep is counted"
    );
    assert!(
        monitor.exec_since(tgid, 0).is_some(),
        "and recorded exactly"
    );
    let after_exec = monitor.change_count(tgid);
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(
        eventually(|| monitor.change_count(tgid) > after_exec),
        "the exit is counted: a reused pid never matches a kept count"
    );
}

#[test]
fn attributes_another_uid_and_a_child_cgroup() {
    if !have_root() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let monitor = watching(&[addr]);
    let url = format!("http://{addr}/");

    let mut child = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "curl",
        ])
        .args(["-s", "-o", "/dev/null", "--max-time", "10", &url])
        .spawn()
        .expect("setpriv curl");
    let (stream, peer) = accept_peer(&listener);
    let info = monitor.lookup(peer).expect("in the map");
    assert_eq!(info.tgid, child.id());
    assert_eq!((info.uid, info.gid), (65534, 65534));
    drop(stream);
    let _ = child.wait();

    let cg = TestCgroup::new("attr");
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl -s -o /dev/null --max-time 10 {url}",
        cg.0.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .expect("sh");
    let (stream, peer) = accept_peer(&listener);
    let info = monitor.lookup(peer).expect("in the map");
    assert_eq!(info.tgid, child.id());
    assert_eq!(info.cgroup_id, cg.id(), "the child cgroup's id");
    drop(stream);
    let _ = child.wait();
}

#[test]
fn attributes_ipv6_and_v4_mapped_connections() {
    if !have_root() {
        return;
    }
    let v6 = TcpListener::bind("[::1]:0").expect("bind ::1");
    let v6_addr = v6.local_addr().expect("addr");
    // A dual-stack wildcard listener: IPv4 clients show up v4-mapped.
    let any = TcpListener::bind("[::]:0").expect("bind ::");
    let any_addr = any.local_addr().expect("addr");
    let monitor = watching(&[v6_addr, any_addr]);

    let mut child = curl(&format!("http://[::1]:{}/", v6_addr.port()))
        .spawn()
        .expect("curl -6");
    let (stream, peer) = accept_peer(&v6);
    assert!(peer.is_ipv6());
    assert_eq!(
        monitor.lookup(peer).expect("v6 in the map").tgid,
        child.id()
    );
    drop(stream);
    let _ = child.wait();

    // IPv4 client (AF_INET socket) to the dual-stack listener.
    let mut child = curl(&format!("http://127.0.0.1:{}/", any_addr.port()))
        .spawn()
        .expect("curl -4");
    let (stream, peer) = accept_peer(&any);
    assert_eq!(
        peer.ip().to_string(),
        "::ffff:127.0.0.1",
        "accepted on a v6 socket"
    );
    assert_eq!(
        monitor.lookup(peer).expect("v4 in the map").tgid,
        child.id()
    );
    drop(stream);
    let _ = child.wait();

    // AF_INET6 socket connecting to a v4-mapped address.
    let port = any_addr.port();
    let t = std::thread::spawn(move || {
        TcpStream::connect(format!("[::ffff:127.0.0.1]:{port}")).expect("connect v4-mapped")
    });
    let (stream, peer) = accept_peer(&any);
    let _c = t.join().expect("thread");
    assert_eq!(
        monitor.lookup(peer).expect("v4-mapped in the map").tgid,
        std::process::id()
    );
    drop(stream);
}

#[test]
fn frozen_tgid_and_cgroup_get_eperm_while_a_bystander_connects() {
    if !have_root() {
        return;
    }
    let (addr, _stop) = sink_listener("127.0.0.1:0");
    let monitor = watching(&[addr]);
    let mut reader = monitor.take_events().expect("reader");

    // By tgid.
    let mut probe = Probe::start(addr.port(), None);
    assert_eq!(probe.try_connect(), "OK OK", "not frozen yet");
    monitor.freeze_tgid(probe.pid()).expect("freeze");
    assert_eq!(
        probe.try_connect(),
        "EPERM EPERM",
        "frozen tgid: IPv4 and v4-mapped IPv6 connects both denied"
    );
    TcpStream::connect(addr).expect("a bystander still connects");
    let tgids = monitor.frozen().tgids;
    assert!(tgids
        .iter()
        .any(|(t, since)| *t == probe.pid() && *since > 0));
    assert!(monitor.unfreeze_tgid(probe.pid()).expect("unfreeze"));
    assert!(!monitor.unfreeze_tgid(probe.pid()).expect("second unfreeze"));
    assert_eq!(probe.try_connect(), "OK OK", "unfrozen");

    // By cgroup.
    let cg = TestCgroup::new("deny");
    let mut in_cgroup = Probe::start(addr.port(), Some(&cg.0));
    monitor.freeze_cgroup(cg.id()).expect("freeze cgroup");
    assert_eq!(in_cgroup.try_connect(), "EPERM EPERM");
    assert_eq!(probe.try_connect(), "OK OK", "a process in another cgroup");
    TcpStream::connect(addr).expect("bystander");
    assert!(monitor.unfreeze_cgroup(cg.id()).expect("unfreeze cgroup"));
    assert_eq!(in_cgroup.try_connect(), "OK OK");
    let denied_pid = in_cgroup.pid();
    drop(in_cgroup);

    let events = drain_all(&mut reader);
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e.verdict == Verdict::DeniedFrozen)
        .collect();
    assert_eq!(denied.len(), 4, "two denied connects per frozen probe");
    assert!(denied
        .iter()
        .any(|e| e.process.tgid == denied_pid && e.family == 6));
    assert!(denied.iter().all(|e| e.dest == addr));
    assert!(monitor.counters().denied >= 4);
}

#[test]
fn protected_upstream_denied_or_reported_for_everyone_but_warden() {
    if !have_root() {
        return;
    }
    let (upstream, _stop) = sink_listener("127.0.0.1:0");
    let enforce = load(MonitorConfig {
        upstreams: vec![upstream],
        protect: ProtectMode::Enforce,
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    });
    let mut reader = enforce.take_events().expect("reader");
    TcpStream::connect(upstream).expect("warden's own upstream connect works");
    let mut probe = Probe::start(upstream.port(), None);
    assert_eq!(
        probe.try_connect(),
        "EPERM EPERM",
        "bypass denied (v4 and v4-mapped)"
    );
    let events = drain_all(&mut reader);
    let bypass: Vec<_> = events
        .iter()
        .filter(|e| e.verdict == Verdict::BypassDenied)
        .collect();
    assert_eq!(bypass.len(), 2);
    assert!(bypass.iter().all(|e| e.process.tgid == probe.pid()));
    assert!(events
        .iter()
        .any(|e| e.process.tgid == std::process::id() && e.verdict == Verdict::Allowed));
    drop(reader);
    drop(enforce);

    // Observe: the same connect goes through and is reported.
    let observe = load(MonitorConfig {
        upstreams: vec![upstream],
        protect: ProtectMode::Observe,
        warden_tgid: std::process::id(),
        ..MonitorConfig::default()
    });
    let mut reader = observe.take_events().expect("reader");
    assert_eq!(
        probe.try_connect(),
        "OK OK",
        "enforcement gone with its monitor"
    );
    let events = drain_all(&mut reader);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.verdict == Verdict::BypassAllowed && e.process.tgid == probe.pid())
            .count(),
        2
    );
}

fn set_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

#[test]
fn hundred_thousand_connects_are_all_accounted_for() {
    if !have_root() {
        return;
    }
    const N: u64 = 100_000;
    let (addr, stop) = sink_listener("127.0.0.1:0");
    let monitor = watching(&[addr]);
    let mut reader = monitor.take_events().expect("reader");
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let me = std::process::id();
    let port = addr.port();
    let consumer = std::thread::spawn(move || {
        let (mut connects, mut attributed) = (0u64, 0u64);
        let mut count = |e: AccessEvent| {
            if e.process.tgid == me && e.dest.port() == port {
                match e.kind {
                    EventKind::Connect => connects += 1,
                    EventKind::Attributed => attributed += 1,
                }
            }
        };
        while !done2.load(Ordering::Relaxed) {
            if reader.drain(&mut count) == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        reader.drain(&mut count);
        (connects, attributed)
    });
    for _ in 0..N {
        let s = TcpStream::connect(addr).expect("connect");
        set_linger_zero(&s);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    done.store(true, Ordering::Relaxed);
    let (connects, attributed) = consumer.join().expect("consumer");
    let c = monitor.counters();
    stop.store(true, Ordering::Relaxed);
    eprintln!("connect events {connects}, attribution events {attributed}, counters {c:?}");
    assert_eq!(
        connects + attributed + c.lost,
        2 * N,
        "every connect is an event or counted as lost"
    );
    assert_eq!(
        c.emitted,
        connects + attributed,
        "the kernel emitted what we read"
    );
    assert_eq!(c.lost, 0, "the ring buffer kept up");
}

/// Role of a re-executed test process (see `crash_keeps_enforcement...`).
const ROLE_VAR: &str = "WARDEN_EBPF_TEST_HOLDER";

/// Not a test on its own: when re-executed with `WARDEN_EBPF_TEST_HOLDER=
/// PIN_DIR:TGID`, loads a pinned monitor, freezes TGID, says "ready" and waits
/// to be killed.
#[test]
fn holder_process() {
    let Some(spec) = std::env::var_os(ROLE_VAR) else {
        return;
    };
    let spec = spec.to_string_lossy().into_owned();
    let (dir, tgid) = spec.rsplit_once(':').expect("PIN_DIR:TGID");
    let monitor = Monitor::load(&MonitorConfig {
        warden_tgid: std::process::id(),
        pin_dir: Some(PathBuf::from(dir)),
        ..MonitorConfig::default()
    })
    .expect("holder loads");
    monitor
        .freeze_tgid(tgid.parse().expect("tgid"))
        .expect("holder freezes");
    println!("holder-ready");
    std::io::stdout().flush().expect("flush");
    let mut sink = [0u8; 1];
    let _ = std::io::stdin().read(&mut sink);
    std::thread::sleep(Duration::from_secs(3600));
}

#[test]
fn a_crash_keeps_enforcement_and_a_clean_stop_releases_it() {
    if !have_root() {
        return;
    }
    let (addr, _stop) = sink_listener("127.0.0.1:0");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/warden-test-{}", std::process::id()));
    let mut target = Probe::start(addr.port(), None);

    let mut holder = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "holder_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_VAR, format!("{}:{}", pin_dir.display(), target.pid()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut out = BufReader::new(holder.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("holder output");
        assert!(n > 0, "holder exited before it was ready");
        if line.contains("holder-ready") {
            break;
        }
    }
    assert_eq!(target.try_connect(), "EPERM EPERM", "frozen by the holder");
    // SIGKILL: no destructor runs, exactly like a crash.
    holder.kill().expect("kill holder");
    let _ = holder.wait();
    assert_eq!(
        target.try_connect(),
        "EPERM EPERM",
        "fail closed: the freeze outlives the crashed daemon"
    );

    // A restart with the same pin directory takes over the frozen map.
    let restarted = Monitor::load(&MonitorConfig {
        warden_tgid: std::process::id(),
        pin_dir: Some(pin_dir.clone()),
        ..MonitorConfig::default()
    })
    .expect("restart");
    let tgids = restarted.frozen().tgids;
    assert!(
        tgids.iter().any(|(t, _)| *t == target.pid()),
        "the crashed instance's freeze is still known: {tgids:?}"
    );
    assert_eq!(
        target.try_connect(),
        "EPERM EPERM",
        "still enforced after the takeover"
    );
    assert!(restarted.unfreeze_tgid(target.pid()).expect("unfreeze"));
    assert_eq!(
        target.try_connect(),
        "OK OK",
        "unfrozen through the shared map"
    );

    // A clean stop releases everything, pins included.
    restarted.freeze_tgid(target.pid()).expect("freeze again");
    assert_eq!(target.try_connect(), "EPERM EPERM");
    restarted.shutdown();
    // Had the crashed instance's links survived the takeover, they would
    // still deny here (they share the frozen map).
    assert_eq!(target.try_connect(), "OK OK", "a clean stop fails open");
    assert!(!pin_dir.exists(), "pins removed on a clean stop");
}
