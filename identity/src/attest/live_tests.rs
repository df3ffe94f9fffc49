//! End-to-end tests against real processes and real TCP connections.
//!
//! They spawn `sleep`, `curl`, `psql` and `python3` and check the facts and
//! the resolved pids against values computed independently (`id`,
//! `sha256sum`, the child's pid). A missing tool fails the test with the
//! Debian package to install; nothing is skipped.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::*;

/// `ETXTBSY`: exec of a file another process still has open for writing.
const ETXTBSY: i32 = 26;

/// Kills and reaps a child when dropped.
struct Reaped(Child);

impl Reaped {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Finds a program in the system directories, then in PATH; panics naming the
/// Debian package that provides it.
fn find_bin(name: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path));
    for d in dirs {
        let p = d.join(name);
        if p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return p;
        }
    }
    panic!("`{name}` not found: install the Debian package `{debian_package}` (apt-get install {debian_package})");
}

fn spawn(program: &Path, args: &[&str]) -> Reaped {
    for _ in 0..100 {
        match Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => return Reaped(c),
            // A freshly copied binary can still be open for writing in a
            // child forked concurrently by another test thread.
            Err(e) if e.raw_os_error() == Some(ETXTBSY) => sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot run {}: {e}", program.display()),
        }
    }
    panic!("{} stayed busy (ETXTBSY)", program.display());
}

fn sleep_bin() -> PathBuf {
    find_bin("sleep", "coreutils")
}

fn spawn_sleep(program: &Path) -> Reaped {
    let child = spawn(program, &["30"]);
    // Wait until the child has exec'd (its exe link points at the program).
    let want = fs::canonicalize(program).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{}/exe", child.pid())).ok() != Some(want.clone()) {
        assert!(
            Instant::now() < deadline,
            "child never exec'd {}",
            program.display()
        );
        sleep(Duration::from_millis(5));
    }
    child
}

/// Output of a command, trimmed.
fn output_of(program: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(find_bin(program, package))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn sha256sum(path: &Path) -> String {
    let out = output_of("sha256sum", "coreutils", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn facts_of_real_sleep() {
    let bin = sleep_bin();
    let child = spawn_sleep(&bin);
    let cache = ExeHashCache::new();
    let f = gather_facts(child.pid(), &cache).unwrap();

    assert_eq!(f.pid, child.pid());
    assert_eq!(f.uid.to_string(), output_of("id", "coreutils", &["-u"]));
    assert_eq!(f.gid.to_string(), output_of("id", "coreutils", &["-g"]));
    let real = fs::canonicalize(&bin).unwrap();
    assert_eq!(f.exe_path.as_deref(), Some(real.as_path()));
    assert!(!f.exe_deleted);
    assert_eq!(f.exe_sha256.as_deref(), Some(sha256sum(&real).as_str()));
    assert_eq!(f.exe_hash_skipped, None);
    let cg = f.cgroup.clone().unwrap_or_default();
    assert!(cg.starts_with('/'), "cgroup {cg:?}");
    assert_eq!(f.display_name, "sleep");

    let again = gather_facts(child.pid(), &cache).unwrap();
    assert_eq!(again.start_time, f.start_time);
    assert!(f.start_time > 0);
    confirm_same_process(&f).unwrap();

    let sel = Selectors {
        uid: Some(f.uid),
        exe_path: Some(real),
        exe_sha256: f.exe_sha256.clone(),
        cgroup: f.cgroup.clone(),
        ..Selectors::default()
    };
    assert!(matches(&sel, &f));
}

#[test]
fn deleted_copy_of_sleep() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("my sleep");
    fs::copy(sleep_bin(), &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    let want_sha = sha256sum(&copy);
    let copy = fs::canonicalize(&copy).unwrap();
    let child = spawn_sleep(&copy);

    let cache = ExeHashCache::new();
    let before = gather_facts(child.pid(), &cache).unwrap();
    assert_eq!(before.exe_path.as_deref(), Some(copy.as_path()));
    assert!(!before.exe_deleted);
    assert_eq!(before.exe_sha256.as_deref(), Some(want_sha.as_str()));
    let by_path = Selectors {
        exe_path: Some(copy.clone()),
        ..Selectors::default()
    };
    let by_hash = Selectors {
        exe_sha256: Some(want_sha.to_uppercase()),
        ..Selectors::default()
    };
    assert!(matches(&by_path, &before));

    fs::remove_file(&copy).unwrap();
    let after = gather_facts(child.pid(), &cache).unwrap();
    assert!(after.exe_deleted);
    assert_eq!(after.exe_path.as_deref(), Some(copy.as_path()));
    // Still hashed: through /proc/PID/exe, not through the (gone) path.
    assert_eq!(after.exe_sha256.as_deref(), Some(want_sha.as_str()));
    assert!(!matches(&by_path, &after));
    assert!(matches(&by_hash, &after));
    assert!(after.summary().contains("(deleted)"));
    // Deleting the file is not a change of process.
    confirm_same_process(&before).unwrap();

    // Another file now at the same path: the running process still does not
    // match the path, and its hash is still the old binary's.
    fs::write(&copy, b"#!/bin/sh\n").unwrap();
    let replaced = gather_facts(child.pid(), &cache).unwrap();
    assert!(replaced.exe_deleted);
    assert!(!matches(&by_path, &replaced));
    assert_eq!(replaced.exe_sha256.as_deref(), Some(want_sha.as_str()));
}

#[test]
fn hash_cache_hits_and_size_limit() {
    let bin = sleep_bin();
    let a = spawn_sleep(&bin);
    let b = spawn_sleep(&bin);
    let cache = ExeHashCache::new();
    gather_facts(a.pid(), &cache).unwrap();
    assert_eq!((cache.hits(), cache.misses()), (0, 1));
    gather_facts(a.pid(), &cache).unwrap();
    assert_eq!(cache.hits(), 1);
    // Another process running the same file hits too.
    gather_facts(b.pid(), &cache).unwrap();
    assert_eq!((cache.hits(), cache.misses()), (2, 1));

    let tiny = ExeHashCache::with_limits(16, 1024);
    let f = gather_facts(a.pid(), &tiny).unwrap();
    assert_eq!(f.exe_sha256, None);
    match &f.exe_hash_skipped {
        Some(HashSkip::TooLarge { size, limit: 1024 }) => {
            assert_eq!(*size, fs::metadata(&bin).unwrap().len())
        }
        other => panic!("want TooLarge, got {other:?}"),
    }
    assert!(f.summary().contains("1024-byte limit"), "{}", f.summary());
}

#[test]
fn exited_and_zombie_processes() {
    let mut child = spawn_sleep(&sleep_bin());
    let pid = child.pid();
    let facts = gather_facts(pid, &ExeHashCache::new()).unwrap();
    child.0.kill().unwrap();
    // Not reaped yet: a zombie. It is gone for attestation purposes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "child did not become a zombie");
        sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        gather_facts(pid, &ExeHashCache::new()),
        Err(AttestError::ProcessGone { .. })
    ));
    assert!(matches!(
        confirm_same_process(&facts),
        Err(AttestError::ProcessChanged { .. })
    ));
    child.0.wait().unwrap();
    assert!(matches!(
        gather_facts(pid, &ExeHashCache::new()),
        Err(AttestError::ProcessGone { .. })
    ));
    let err = confirm_same_process(&facts).unwrap_err();
    assert!(matches!(err, AttestError::ProcessChanged { .. }), "{err}");
}

// ---- resolver ----

/// Accepts one connection, waiting at most 10 s for the client.
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                let local = s.local_addr().unwrap();
                return (s, local, peer);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no client connected within 10 s");
                sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn resolve(local: SocketAddr, peer: SocketAddr) -> u32 {
    ProcNetResolver::new()
        .resolve_tcp(local, peer)
        .unwrap_or_else(|e| panic!("resolve {local} <- {peer}: {e}"))
}

fn curl() -> PathBuf {
    find_bin("curl", "curl")
}

fn python() -> PathBuf {
    find_bin("python3", "python3")
}

#[test]
fn resolve_curl_v4() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let child = spawn(
        &curl(),
        &["--max-time", "5", &format!("http://127.0.0.1:{port}/")],
    );
    let (_s, local, peer) = accept(&l);
    assert_eq!(resolve(local, peer), child.pid());
}

#[test]
fn resolve_curl_v6() {
    let l = TcpListener::bind("[::1]:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let child = spawn(
        &curl(),
        &["-g", "--max-time", "5", &format!("http://[::1]:{port}/")],
    );
    let (_s, local, peer) = accept(&l);
    assert!(peer.is_ipv6());
    assert_eq!(resolve(local, peer), child.pid());
}

#[test]
fn resolve_curl_to_dual_stack_listener() {
    // IPv6 listener, IPv4 client: accepted addresses are ::ffff:127.0.0.1,
    // the client's socket is in /proc/net/tcp as plain IPv4.
    let l = TcpListener::bind("[::]:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let child = spawn(
        &curl(),
        &["--max-time", "5", &format!("http://127.0.0.1:{port}/")],
    );
    let (_s, local, peer) = accept(&l);
    assert_eq!(local.to_string(), format!("[::ffff:127.0.0.1]:{port}"));
    assert_eq!(resolve(local, peer), child.pid());
}

#[test]
fn resolve_psql() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let conn = format!("host=127.0.0.1 port={port} user=x dbname=x connect_timeout=5");
    let child = spawn(&find_bin("psql", "postgresql-client"), &[&conn]);
    let (_s, local, peer) = accept(&l);
    assert_eq!(resolve(local, peer), child.pid());
}

#[test]
fn resolve_python_client() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let code = format!(
        "import socket,time; s=socket.create_connection(('127.0.0.1',{port})); time.sleep(5)"
    );
    let child = spawn(&python(), &["-c", &code]);
    let (_s, local, peer) = accept(&l);
    assert_eq!(resolve(local, peer), child.pid());
}

#[test]
fn resolve_python_mapped_client_to_v4_listener() {
    // An AF_INET6 client socket to ::ffff:127.0.0.1 lives in /proc/net/tcp6
    // with mapped addresses; our IPv4 listener sees 127.0.0.1.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let code = format!(
        "import socket,time; s=socket.socket(socket.AF_INET6); \
         s.connect(('::ffff:127.0.0.1',{port})); time.sleep(5)"
    );
    let child = spawn(&python(), &["-c", &code]);
    let (_s, local, peer) = accept(&l);
    assert!(local.is_ipv4());
    assert_eq!(resolve(local, peer), child.pid());
}

#[test]
fn resolve_forked_client_lowest_pid() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Connect, then fork: parent and child both hold the socket; the forked
    // child writes its pid so the test can check and kill it.
    let code = format!(
        "import socket,time,os,sys; s=socket.create_connection(('127.0.0.1',{port})); \
         p=os.fork(); \
         sys.stdout.write(str(p)+'\\n') if p else None; sys.stdout.flush(); time.sleep(5)"
    );
    let mut child = Command::new(python())
        .args(["-c", &code])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    io::BufRead::read_line(
        &mut io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let parent = child.id();
    let child = Reaped(child);
    let forked: u32 = line.trim().parse().unwrap();
    let forked_guard = KillPid(forked);
    let (_s, local, peer) = accept(&l);

    let holders = ProcNetResolver::new().holders(local, peer).unwrap();
    let mut want = vec![parent, forked];
    want.sort_unstable();
    assert_eq!(holders, want);
    assert_eq!(resolve(local, peer), want[0]);
    drop(forked_guard);
    drop(child);
}

/// Kills a pid that is not our child (a grandchild) when dropped.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

#[test]
fn resolve_own_connections() {
    for bind in ["127.0.0.1:0", "[::1]:0", "[::]:0"] {
        let l = TcpListener::bind(bind).unwrap();
        let port = l.local_addr().unwrap().port();
        let target = if bind.starts_with("[::1]") {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        };
        let _client = TcpStream::connect(&target).unwrap();
        let (_s, local, peer) = accept(&l);
        assert_eq!(resolve(local, peer), std::process::id(), "{bind}");
    }
}

#[test]
fn resolve_copes_with_process_churn() {
    // Processes starting and exiting during the /proc scan must not break it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let t = find_bin("true", "coreutils");
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2000 {
                let _ = Command::new(&t).status();
                n += 1;
            }
        })
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_s, local, peer) = accept(&l);
    for _ in 0..30 {
        assert_eq!(resolve(local, peer), std::process::id());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
}

#[test]
fn resolve_closed_connection_is_not_found() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_s, local, peer) = accept(&l);
    drop(client);
    // The client end is now in FIN_WAIT2 with no owner, or gone.
    let err = ProcNetResolver::new().resolve_tcp(local, peer).unwrap_err();
    assert!(matches!(err, AttestError::PeerNotFound { .. }), "{err}");
    assert!(err.to_string().contains(&peer.to_string()), "{err}");
}

#[test]
fn full_pipeline_for_curl() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let curl = fs::canonicalize(curl()).unwrap();
    let _child = spawn(
        &curl,
        &["--max-time", "5", &format!("http://127.0.0.1:{port}/")],
    );
    let (_s, local, peer) = accept(&l);
    let pid = resolve(local, peer);
    let facts = gather_facts(pid, &ExeHashCache::new()).unwrap();
    let regs = vec![
        Registration {
            name: "any-curl".into(),
            spiffe_id: "spiffe://t/curl".into(),
            selectors: Selectors {
                exe_path: Some(curl.clone()),
                ..Selectors::default()
            },
        },
        Registration {
            name: "curl-of-this-user".into(),
            spiffe_id: "spiffe://t/curl-user".into(),
            selectors: Selectors {
                exe_path: Some(curl),
                uid: Some(facts.uid),
                ..Selectors::default()
            },
        },
    ];
    assert_eq!(attest(&facts, &regs).unwrap().name, "curl-of-this-user");
    confirm_same_process(&facts).unwrap();
}
