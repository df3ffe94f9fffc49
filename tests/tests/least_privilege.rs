//! `warden up` as a non-root user with exactly the capabilities
//! docs/operations.md lists: the eBPF monitor loads, a PostgreSQL session is
//! attested (a root psql: another uid's /proc) and served; afterwards no
//! thread holds the load capabilities, the process is not dumpable, no
//! mapping goes into a core dump and the soft descriptor limit is the hard
//! one. Each missing capability stops the start with its name. Needs root
//! (to switch to the test uid and grant capabilities with `setpriv`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warden_tests::cgroup::Cgroup;
use warden_tests::pg::{run_psql, Auth, ClusterOptions, PgCluster};
use warden_tests::{free_port, have_root, warden_bin, Instance};

/// The daemon's uid and gid in these tests (no passwd entry needed).
const UID: u32 = 64_711;
/// The capability set docs/operations.md documents (setpriv syntax).
const CAPS: [&str; 5] = [
    "bpf",
    "perfmon",
    "net_admin",
    "sys_ptrace",
    "dac_read_search",
];
/// CAP_SYS_PTRACE (19) and CAP_DAC_READ_SEARCH (2): what the daemon keeps.
const KEPT_MASK: u64 = (1 << 19) | (1 << 2);
const PASSWORD: &str = "pw-CANARY-7d1e55a0-leastpriv";

/// The pin root `/sys/fs/bpf/warden` is made the test uid's, as the
/// package's tmpfiles.d makes it the `warden` user's, and given back to root
/// when the guard drops (after the daemon has removed its pins). Root
/// daemons of other tests are unaffected (root passes any permission check).
/// Its owner is held with an exclusive `flock`, not an in-process mutex:
/// nextest runs each test in its own process (a test that needs the
/// directory root's while another lent it out would start a daemon that
/// should have been refused).
struct PinRootLoan {
    _lock: std::fs::File,
}

fn pin_root_lock() -> std::fs::File {
    warden_tests::exclusive_lock("pin-root")
}

impl PinRootLoan {
    fn to_test_uid() -> PinRootLoan {
        let lock = pin_root_lock();
        std::fs::create_dir_all("/sys/fs/bpf/warden").expect("create /sys/fs/bpf/warden");
        chown_one("/sys/fs/bpf/warden", UID);
        PinRootLoan { _lock: lock }
    }
}

/// Holds the pin root as root's while a test needs it so.
fn pin_root_kept_roots() -> std::fs::File {
    pin_root_lock()
}

impl Drop for PinRootLoan {
    fn drop(&mut self) {
        chown_one("/sys/fs/bpf/warden", 0);
    }
}

/// The directory itself, not what other daemons pinned inside it.
fn chown_one(path: &str, uid: u32) {
    let st = Command::new("chown")
        .arg(format!("{uid}:{uid}"))
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success(), "chown {path}");
}

fn chown(path: impl AsRef<Path>, uid: u32) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(path.as_ref())
        .status()
        .expect("chown");
    assert!(st.success(), "chown {}", path.as_ref().display());
}

/// An instance with a postgres route for root's psql, initialised (as
/// root) and then handed to the test uid.
fn instance(extra: &str, pg_port: u16, listen_port: u16) -> Instance {
    instance_with(extra, "", pg_port, listen_port)
}

/// As [`instance`], with more `[[workload]]` tables (`workloads`), each
/// allowed on the route.
fn instance_with(extra: &str, workloads: &str, pg_port: u16, listen_port: u16) -> Instance {
    let allow: String = workloads
        .lines()
        .filter_map(|l| l.strip_prefix("name = "))
        .map(|n| format!(", {n}"))
        .collect();
    let cfg = format!(
        r#"trust_domain = "example.org"
{extra}

[[workload]]
name = "root-psql"
spiffe_id = "spiffe://example.org/psql"
selectors = {{ uid = 0 }}
{workloads}

[[route]]
name = "app-db"
kind = "postgres"
listen = "127.0.0.1:{listen_port}"
upstream = "127.0.0.1:{pg_port}"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "app-db/app" }}
allow = ["root-psql"{allow}]
connect_timeout = "5s"
"#
    );
    let warden = Instance::new_with(&cfg);
    warden.run(&["init"]).ok();
    warden.put("app-db/app", PASSWORD.as_bytes()).ok();
    chown(warden.dir.path(), UID);
    warden
}

/// `warden up` as the test uid with `caps` (setpriv names) as inheritable
/// and ambient capabilities, the soft descriptor limit lowered to 1024.
/// A start that must be refused, bounded: a daemon that starts after all
/// is killed after a minute (the test then fails on its exit status
/// instead of waiting forever).
fn refused_start(warden: &Instance, caps: &[&str]) -> std::process::Output {
    let inner = up_as_test_uid(warden, caps);
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "60"])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c.output().expect("timeout setpriv")
}

fn up_as_test_uid(warden: &Instance, caps: &[&str]) -> Command {
    let list: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let list = list.join(",");
    let mut c = Command::new("prlimit");
    c.arg("--nofile=1024:8192").arg("--").arg("setpriv");
    c.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .arg("--clear-groups");
    if !caps.is_empty() {
        c.arg(format!("--inh-caps={list}"))
            .arg(format!("--ambient-caps={list}"));
    }
    c.arg("--")
        .arg(warden_bin())
        .arg("--config")
        .arg(&warden.config)
        .arg("up")
        .env("WARDEN_LOG", "info");
    c
}

/// The daemon under test (the shared handle: SIGTERM, then SIGKILL, on drop).
type Running = warden_tests::Daemon;

fn start(warden: &Instance, caps: &[&str]) -> Running {
    start_notifying(warden, caps, None)
}

/// As [`start`], with `NOTIFY_SOCKET` set to `notify` (sd_notify).
fn start_notifying(warden: &Instance, caps: &[&str], notify: Option<&Path>) -> Running {
    let log = warden.dir.path().join("daemon.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut command = up_as_test_uid(warden, caps);
    if let Some(socket) = notify {
        command.env("NOTIFY_SOCKET", socket);
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("prlimit/setpriv (util-linux) are required");
    let mut d = Running { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while warden.run(&["status"]).code != 0 {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("warden up exited with {st}: {}", d.log_text());
        }
        assert!(Instant::now() < deadline, "not ready: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    d
}

/// A field of `/proc/PID/status` (or of one thread's). `warden up` runs
/// under prlimit → setpriv, which both exec, so its pid is the child's.
fn status_field(pid: u32, task: Option<&str>, field: &str) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("{field} in {path}"))
}

fn hex(v: &str) -> u64 {
    u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("{v}: {e}"))
}

#[test]
fn runs_unprivileged_with_the_documented_capabilities_and_drops_what_it_no_longer_needs() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let warden = instance("[monitor]\nebpf = \"required\"", pg.port, port);
    let _pins = PinRootLoan::to_test_uid();
    // systemd's Type=notify protocol: a datagram socket the daemon may write to.
    let notify_path = warden.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    std::fs::set_permissions(
        &notify_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .expect("chmod notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut daemon = start_notifying(&warden, &CAPS, Some(&notify_path));
    let pid = daemon.child.id();
    let mut ready = [0u8; 256];
    let n = notify.recv(&mut ready).expect("READY=1 datagram");
    let ready = String::from_utf8_lossy(&ready[..n]);
    assert!(ready.starts_with("READY=1\nSTATUS=serving"), "{ready}");
    assert_eq!(
        status_field(pid, None, "Uid").split_whitespace().next(),
        Some("64711")
    );

    // An eBPF-attributed, attested PostgreSQL session of a root process.
    let via = run_psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable"),
        "select current_user",
    );
    assert_eq!(via.code, 0, "{}\n{}", via.stderr, daemon.log_text());
    assert_eq!(via.stdout.trim(), "app");
    let (_, metrics) = warden.http_get("/metrics");
    assert!(
        metrics.contains("warden_monitor_mode{mode=\"ebpf\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l
            .starts_with("warden_monitor_attributions_total{source=\"ebpf\"}")
            && !l.ends_with(" 0")),
        "attributed by the kernel: {metrics}"
    );

    // Every thread: only CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, nothing
    // inheritable or ambient (the loader thread has ended).
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() > 2, "{tasks:?}");
    for t in &tasks {
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm")).unwrap_or_default();
        assert_ne!(
            comm.trim(),
            "warden-ebpf-loa",
            "the loader thread ends after start-up"
        );
        for field in ["CapEff", "CapPrm"] {
            assert_eq!(
                hex(&status_field(pid, Some(t), field)),
                KEPT_MASK,
                "{field} of thread {t} ({})",
                comm.trim()
            );
        }
        assert_eq!(hex(&status_field(pid, Some(t), "CapInh")), 0);
        assert_eq!(hex(&status_field(pid, Some(t), "CapAmb")), 0);
    }

    // Not dumpable: the kernel gives a non-dumpable process's /proc files
    // to root, and a process of the daemon's own uid may not read them.
    let meta = std::fs::metadata(format!("/proc/{pid}/environ")).expect("environ");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        0,
        "PR_SET_DUMPABLE 0"
    );
    let peek = Command::new("setpriv")
        .arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .arg("--clear-groups")
        .arg("--")
        .arg("cat")
        .arg(format!("/proc/{pid}/environ"))
        .output()
        .expect("setpriv");
    assert!(
        !peek.status.success(),
        "same uid reads environ of a non-dumpable daemon"
    );
    assert!(String::from_utf8_lossy(&peek.stderr).contains("Permission denied"));
    // No mapping is written to a core dump.
    let filter = std::fs::read_to_string(format!("/proc/{pid}/coredump_filter")).expect("filter");
    assert_eq!(hex(filter.trim()), 0, "coredump_filter");

    // The soft descriptor limit raised from 1024 to the hard 8192.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nofile: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files")
        .split_whitespace()
        .collect();
    assert_eq!(nofile[3..5], ["8192", "8192"], "{limits}");
    let log = daemon.log_text();
    assert!(
        log.contains("open files limit raised from 1024 to the hard limit 8192"),
        "{log}"
    );
    assert!(
        log.contains(
            "capabilities: CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH held while the daemon runs"
        ),
        "{log}"
    );

    // A clean stop still releases the kernel programs (pins removed with
    // nothing but the file permissions the test uid has).
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log_text());
    let data_dir = warden.data_dir.canonicalize().expect("data dir");
    let name: String = data_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let pins = Path::new("/sys/fs/bpf/warden").join(format!("d-{name}"));
    assert!(!pins.exists(), "pins left: {}", pins.display());
}

#[test]
fn each_missing_capability_stops_the_start_with_its_name() {
    if !have_root() {
        return;
    }
    let warden = instance("[monitor]\nebpf = \"required\"", free_port(), free_port());
    for (missing, name) in [
        ("bpf", "CAP_BPF"),
        ("perfmon", "CAP_PERFMON"),
        ("net_admin", "CAP_NET_ADMIN"),
    ] {
        let caps: Vec<&str> = CAPS.iter().copied().filter(|c| *c != missing).collect();
        let out = refused_start(&warden, &caps);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("(missing: {name})"))
                && stderr.contains("monitor.ebpf = \"required\"")
                && stderr.contains("AmbientCapabilities="),
            "names {name}, the key and the fix: {stderr}"
        );
    }

    // A pin directory the daemon's user may not write to.
    {
        let _root_owned = pin_root_kept_roots();
        let out = refused_start(&warden, &CAPS);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("uid 64711 cannot use the eBPF pin directory /sys/fs/bpf/warden")
                && stderr.contains("install -d -m 0700 -o 64711 /sys/fs/bpf/warden"),
            "{stderr}"
        );
    }

    // A listener below 1024 without CAP_NET_BIND_SERVICE.
    let low = instance("[monitor]\nebpf = \"off\"", free_port(), 999);
    let out = refused_start(&low, &CAPS);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("route \"app-db\" listen") && stderr.contains("CAP_NET_BIND_SERVICE"),
        "{stderr}"
    );
}

/// The kernel relay and a freeze work with what the unprivileged daemon
/// keeps: sockhash and frozen-cgroup map updates through descriptors it
/// opened at start-up need no capability.
#[test]
fn kernel_relay_and_freeze_work_after_the_capabilities_are_dropped() {
    if !have_root() {
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    pg.create_role("app", PASSWORD);
    let port = free_port();
    let cg = Cgroup::new("least-privilege");
    let workloads = format!(
        "[[workload]]\nname = \"kr\"\nspiffe_id = \"spiffe://example.org/kr\"\nselectors = {{ uid = 0, cgroup = \"{}\" }}\n",
        cg.name
    );
    let warden = instance_with("[monitor]\nebpf = \"required\"", &workloads, pg.port, port);
    let _pins = PinRootLoan::to_test_uid();
    let daemon = start(&warden, &CAPS);

    let mut psql = cg
        .command(&format!(
            "psql -X -q -tA -v ON_ERROR_STOP=1 -d 'host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable' -f -"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql in a cgroup");
    let mut stdin = psql.stdin.take().expect("stdin");
    for i in 0..40 {
        writeln!(stdin, "select {i};").expect("write");
    }
    stdin.flush().expect("flush");
    let spliced = "warden_pg_kernel_relay_total{result=\"spliced\",route=\"app-db\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !warden.http_get("/metrics").1.lines().any(|l| {
        l.strip_prefix(spliced)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0)
    }) {
        assert!(
            Instant::now() < deadline,
            "no splice: {}",
            daemon.log_text()
        );
        // More round trips: the splice follows the client socket's join
        // (off the session's thread) at a later quiet moment.
        writeln!(stdin, "select 0;").expect("write");
        stdin.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = warden.run(&["freeze", "kr", "--reason", "least privilege test"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(300));
    let _ = writeln!(stdin, "select 'after the freeze';");
    drop(stdin);
    let out = psql.wait_with_output().expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("39"),
        "the spliced queries ran: {stdout}{stderr}"
    );
    assert!(!stdout.contains("after the freeze"), "{stdout}");
    assert!(stderr.contains("frozen"), "{stderr}");
    // The kernel refuses the frozen cgroup's next connection.
    let (code, _, stderr) = cg.psql(
        &format!("host=127.0.0.1 port={port} dbname=postgres user=app sslmode=disable"),
        "select 1",
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    assert_eq!(warden.run(&["unfreeze", "kr"]).code, 0);
}
