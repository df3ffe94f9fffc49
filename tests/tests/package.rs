//! The Debian package from `cargo xtask package`, installed on this machine
//! with dpkg: the binary and the shipped config work, the unit passes
//! `systemd-analyze verify` and rates "OK" (exposure ≤ 3.0) in `systemd-analyze
//! security`, an edited conffile survives a reinstall, and remove and purge
//! leave nothing of the package but what they should. Needs root (dpkg).
//!
//! systemd is not PID 1 in the test container, so the second test boots one:
//! `/lib/systemd/systemd` as PID 1 of its own PID, mount, cgroup, UTS, IPC and
//! network namespaces (what systemd-nspawn does, by hand, see [`Booted`]),
//! whose root is an overlay over this machine's `/` with a tmpfs upper layer.
//! There the README's steps run for real — `dpkg -i`, `warden init` as the
//! `warden` user, `systemctl enable --now warden` — and the started unit is
//! checked (Type=notify readiness, user, capabilities, seccomp, admin socket,
//! `/readyz`, a PostgreSQL route to a cluster the container's systemd runs),
//! then `systemctl stop warden`, `dpkg -r` and `-P` under systemd (the
//! maintainer scripts' systemd side) and a poweroff. Everything the package
//! writes (user, files, dpkg database) lands in the overlay's tmpfs, so
//! nothing of it reaches the host; the sub-cgroup is removed afterwards, also
//! when the test fails. warden runs in the container's PID namespace there:
//! the route's client is attributed by the eBPF programs (which name
//! processes as warden's namespace sees them) and warden's own upstream
//! connection is not reported as a bypass.
//!
//! The package is `$WARDEN_DEB` when set, else built by `cargo xtask package`
//! (a release build: slow the first time, quick when it is up to date).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use warden_tests::have_root;

const UNIT: &str = "/lib/systemd/system/warden.service";
const CONFIG: &str = "/etc/warden/warden.toml";

/// The tests here take turns, also across processes (nextest runs each test
/// in its own process, so an in-process lock does not serialise them): both
/// build the same `.deb` with `cargo xtask package` (its packaging step runs
/// outside cargo's build lock, so one could install a file the other is
/// rewriting — seen as a truncated `/usr/bin/warden`), and the first installs
/// the package on the host, which the second's overlay would see change
/// under it. The returned file holds an exclusive `flock` until dropped.
fn one_at_a_time() -> std::fs::File {
    warden_tests::exclusive_lock("package")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// `$WARDEN_DEB`, or the .deb `cargo xtask package` prints.
fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("WARDEN_DEB") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args(["xtask", "package"])
        .stdin(Stdio::null())
        .output()
        .expect("cargo xtask package");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo xtask package:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = stdout
        .lines()
        .find_map(|l| l.strip_prefix("built "))
        .expect("`built PATH` line");
    PathBuf::from(built.trim())
}

fn installed_status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", "warden"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `warden up` from the installed files as the `warden` user with the
/// unit's capabilities, until `warden status` answers; then a clean stop.
/// Skipped (with a note) when /run/warden or the default metrics port is
/// already in use on this machine.
fn serve_as_the_unit_would(warden_uid: u32) {
    let run_dir = Path::new("/run/warden");
    if run_dir.exists() || std::net::TcpListener::bind("127.0.0.1:9477").is_err() {
        println!(
            "note: /run/warden or 127.0.0.1:9477 in use here; not starting the packaged daemon"
        );
        return;
    }
    let unit = std::fs::read_to_string(UNIT).expect("unit");
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities=");
    let caps: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let caps = caps.join(",");
    ok(
        "install",
        &[
            "-d",
            "-m",
            "0755",
            "-o",
            "warden",
            "-g",
            "warden",
            "/run/warden",
        ],
    );
    let log_path = std::env::temp_dir().join(format!("warden-package-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemon = Command::new("setpriv")
        .arg(format!("--reuid={warden_uid}"))
        .arg(format!("--regid={warden_uid}"))
        .args(["--init-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .args(["--", "/usr/bin/warden", "--config", CONFIG, "up"])
        .env("WARDEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("setpriv");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !run("/usr/bin/warden", &["--config", CONFIG, "status"])
        .status
        .success()
    {
        if let Ok(Some(st)) = daemon.try_wait() {
            panic!("the packaged daemon exited ({st}): {}", log_text());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready: {}",
            log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ok("kill", &["-TERM", &daemon.id().to_string()]);
    let status = daemon.wait().expect("wait");
    let text = log_text();
    let _ = std::fs::remove_dir_all(run_dir);
    let _ = std::fs::remove_file(&log_path);
    assert!(status.success(), "clean stop: {text}");
    assert!(
        text.contains("eBPF access monitor attached"),
        "the monitor loads as the warden user: {text}"
    );
    assert!(
        text.contains(
            "capabilities: CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH held while the daemon runs"
        ),
        "{text}"
    );
}

fn user_exists(name: &str, db: &str) -> bool {
    run("getent", &[db, name]).status.success()
}

#[test]
fn the_debian_package_installs_a_hardened_unit_keeps_edited_config_and_removes_cleanly() {
    if !have_root() {
        return;
    }
    let _turn = one_at_a_time();
    let deb = deb();
    let deb = deb.to_str().expect("utf-8 path");
    let _host = HostPackage::take_over();

    // What is in it.
    let contents = ok("dpkg-deb", &["-c", deb]);
    for path in [
        "./usr/bin/warden",
        "./lib/systemd/system/warden.service",
        "./usr/lib/tmpfiles.d/warden.conf",
        "./etc/warden/warden.toml",
        "./usr/share/doc/warden/README.Debian",
        "./usr/share/bash-completion/completions/warden",
        "./usr/share/zsh/vendor-completions/_warden",
        "./usr/share/fish/vendor_completions.d/warden.fish",
        "./usr/share/man/man1/warden.1.gz",
    ] {
        assert!(contents.contains(path), "{path} in:\n{contents}");
    }
    let conffiles = ok("dpkg-deb", &["-I", deb, "conffiles"]);
    assert_eq!(conffiles.trim(), CONFIG);

    // Install: the user, the binary, the shipped config.
    ok("dpkg", &["-i", deb]);
    assert_eq!(installed_status().as_deref(), Some("install ok installed"));
    assert!(user_exists("warden", "passwd") && user_exists("warden", "group"));
    let version = ok("/usr/bin/warden", &["--version"]);
    assert!(version.starts_with("warden "), "{version}");
    ok("/usr/bin/warden", &["config", "check", CONFIG]);
    // `warden init` as the warden user, as README.Debian says.
    let init = run(
        "runuser",
        &[
            "-u",
            "warden",
            "--",
            "/usr/bin/warden",
            "--config",
            CONFIG,
            "init",
        ],
    );
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let owner = std::fs::metadata("/var/lib/warden/store.db").expect("store.db");
    let warden_uid: u32 = ok("id", &["-u", "warden"]).trim().parse().expect("uid");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), warden_uid);

    // The daemon as the unit runs it, minus systemd: the warden user with
    // the unit's ambient capabilities, the shipped config, /run/warden as
    // RuntimeDirectory= makes it, the pin directory from tmpfiles.d.
    serve_as_the_unit_would(warden_uid);

    // The unit, offline.
    let verify = run("systemd-analyze", &["verify", UNIT]);
    let verify_text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {verify_text}"
    );
    assert!(
        !verify_text.contains("warden.service"),
        "warnings about the unit: {verify_text}"
    );
    let security = ok("systemd-analyze", &["security", "--offline=yes", UNIT]);
    let overall = security
        .lines()
        .find(|l| l.contains("Overall exposure level for warden.service"))
        .expect("overall exposure line");
    println!("{overall}");
    let score: f64 = overall
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("score in {overall}"));
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{security}");
    assert!(overall.contains("OK"), "{overall}");

    // An edited conffile survives a reinstall, with no question asked.
    let mut edited = std::fs::read_to_string(CONFIG).expect("config");
    edited.push_str("# edited by the package test\n");
    std::fs::write(CONFIG, &edited).expect("edit config");
    ok("dpkg", &["-i", deb]);
    assert_eq!(std::fs::read_to_string(CONFIG).expect("config"), edited);

    // Remove keeps the conffile (and the user); purge takes both.
    ok("dpkg", &["-r", "warden"]);
    assert_eq!(
        installed_status().as_deref(),
        Some("deinstall ok config-files")
    );
    assert!(!Path::new("/usr/bin/warden").exists());
    assert!(!Path::new(UNIT).exists());
    assert!(Path::new(CONFIG).exists(), "remove keeps conffiles");
    ok("dpkg", &["-P", "warden"]);
    assert!(installed_status().is_none_or(|s| s.contains("not-installed")));
    assert!(!Path::new(CONFIG).exists(), "purge removes the conffile");
    assert!(!user_exists("warden", "passwd"), "purge removes the user");
    assert!(!user_exists("warden", "group"), "purge removes the group");
    // The state is kept on purge (it cannot be recreated); `_host` removes
    // it when the test ends.
    assert!(Path::new("/var/lib/warden/store.db").exists());
}

/// What this machine had of warden before the host-install test, put aside
/// so the test starts from a machine without the package, and put back when
/// the test ends, also when it fails: a state directory left by an earlier
/// (killed) run, or a real one, must neither make `warden init` refuse nor
/// be lost.
struct HostPackage {
    /// The state directory as it was, renamed out of the way.
    stashed: Option<PathBuf>,
}

const STATE_DIR: &str = "/var/lib/warden";

impl HostPackage {
    fn take_over() -> HostPackage {
        if installed_status().is_some() {
            ok("dpkg", &["-P", "warden"]);
        }
        let stash = PathBuf::from(format!("{STATE_DIR}.before-package-test"));
        let stashed = if Path::new(STATE_DIR).exists() {
            // A stash from a run that died before putting it back wins: it
            // is the older (the machine's own) one.
            if stash.exists() {
                std::fs::remove_dir_all(STATE_DIR).expect("remove a test's leftover state");
            } else {
                std::fs::rename(STATE_DIR, &stash).expect("put the state directory aside");
            }
            Some(stash)
        } else {
            stash.exists().then_some(stash)
        };
        HostPackage { stashed }
    }
}

impl Drop for HostPackage {
    fn drop(&mut self) {
        if installed_status().is_some() {
            let _ = run("dpkg", &["-P", "warden"]);
        }
        let _ = std::fs::remove_dir_all(STATE_DIR);
        if let Some(stash) = &self.stashed {
            if let Err(e) = std::fs::rename(stash, STATE_DIR) {
                eprintln!("could not put {} back: {e}", stash.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The unit under a real systemd.

const SYSTEMD: &str = "/lib/systemd/systemd";

/// Run by `unshare` as PID 1 of the new namespaces, with `$1` the (host)
/// directory to mount the container's tmpfs on. It makes the root the way
/// systemd-nspawn would — an overlay of `/` with its upper layer in that
/// tmpfs, fresh proc, read-only sysfs, the cgroup namespace's cgroup2 at
/// /sys/fs/cgroup, its own bpffs, a minimal /dev, tmpfs /run and /tmp —
/// pivots into it and execs systemd with `container=` set (systemd's
/// container interface) and a target that pulls in only basic.target.
const BOOT: &str = r#"set -e
B=$1
mount -t tmpfs -o mode=0700 warden-test "$B"
mkdir "$B/upper" "$B/work" "$B/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" "$B/root"
R=$B/root
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t bpf -o mode=0700 bpf "$R/sys/fs/bpf"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do
    touch "$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
done
touch "$R/dev/console"
mount --bind /dev/null "$R/dev/console"
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mkdir -p "$R/etc/systemd/system"
printf '[Unit]\nDescription=warden package test\nRequires=basic.target\nAfter=basic.target\n' \
    > "$R/etc/systemd/system/warden-test.target"
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=warden-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=warden-test.target
"#;

/// Where cgroup v2 is mounted here (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid host).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Removes a cgroup and the ones systemd left under it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Every process in a cgroup and the ones under it.
fn cgroup_pids(dir: &Path, pids: &mut Vec<String>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.split_whitespace().map(str::to_owned));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), pids);
            }
        }
    }
}

/// systemd booted as PID 1 of throw-away PID, mount, cgroup, UTS, IPC and
/// network namespaces (see [`BOOT`]); its cgroup namespace is rooted at a
/// sub-cgroup of cgroup v2 made for it. [`Booted::power_off`], or dropping
/// it (a failed test), powers the container off, kills what is left after
/// 30 s and removes the sub-cgroup; the mounts go with the mount namespace.
struct Booted {
    cgroup: PathBuf,
    /// `unshare`, whose only child is the container's PID 1.
    unshare: Child,
    /// systemd's PID as this host sees it (0 until known).
    init: u32,
    /// `boot.log` (the boot script's output) and `ns/`, which the container
    /// mounts its tmpfs on (empty here).
    dir: tempfile::TempDir,
    off: bool,
}

impl Booted {
    fn boot() -> Booted {
        let root = cgroup2_root().expect("a cgroup2 mount");
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .unwrap_or_else(|| "/".into());
        let own = root.join(own.trim().trim_start_matches('/'));
        let cgroup = root.join(format!("warden-package-systemd-{}", std::process::id()));
        std::fs::create_dir(&cgroup).expect("sub-cgroup");
        let dir = tempfile::Builder::new()
            .prefix("warden-package-systemd-")
            .tempdir()
            .expect("temp dir");
        let ns = dir.path().join("ns");
        std::fs::create_dir(&ns).expect("ns dir");
        let log = std::fs::File::create(dir.path().join("boot.log")).expect("boot.log");
        // Joins the sub-cgroup, then unshare: the cgroup namespace is rooted
        // where the process is when it is made. Should this test process be
        // killed without unwinding, unshare gets SIGKILL (--pdeathsig) and
        // takes the container's PID 1, and so the whole PID namespace, with
        // it (--kill-child): only the empty sub-cgroup would be left.
        let unshare = Command::new("sh")
            .args([
                "-c",
                r#"echo $$ > "$1/cgroup.procs" && exec setpriv --pdeathsig KILL -- unshare --kill-child=SIGKILL --pid --mount --cgroup --uts --ipc --net --propagation private sh -c "$2" boot "$3""#,
                "join",
            ])
            .arg(&cgroup)
            .arg(BOOT)
            .arg(&ns)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("unshare");
        let mut booted = Booted {
            cgroup,
            unshare,
            init: 0,
            dir,
            off: false,
        };
        let pid = booted.unshare.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        loop {
            if let Ok(Some(st)) = booted.unshare.try_wait() {
                panic!("the container ended ({st}): {}", booted.boot_log());
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(init) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                if comm(init).trim() == "systemd" {
                    booted.init = init;
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not start: {}",
                booted.boot_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // unshare itself goes back to this test's cgroup: the container's
        // root cgroup holds only its own processes, so its systemd may
        // enable controllers there.
        let _ = std::fs::write(own.join("cgroup.procs"), pid.to_string());
        // Until its bus is up, systemctl fails; then it waits for the boot.
        let state = loop {
            let out = booted.run(&["systemctl", "is-system-running", "--wait"], b"");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if ["running", "degraded"].contains(&state.as_str()) {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not finish booting ({state}): {}",
                booted.boot_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            state,
            "running",
            "failed units: {}",
            booted.ok(&["systemctl", "--failed", "--no-legend"])
        );
        booted
    }

    fn boot_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("boot.log")).unwrap_or_default()
    }

    /// A host path of a file in the container.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.init))
    }

    /// `args` in the container (all its namespaces and its root), fed
    /// `stdin`, with a deadline.
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let init = self.init.to_string();
        let mut child = Command::new("timeout")
            .args([
                "-k", "5", "60", "nsenter", "-t", &init, "-a", "-r", "-w", "--",
            ])
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/nonexistent")
            .env("PGCONNECT_TIMEOUT", "10")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nsenter");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin);
        }
        child.wait_with_output().expect("nsenter")
    }

    fn ok_with(&self, args: &[&str], stdin: &[u8]) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "in the container: {args:?} failed ({}):\n{}\n{}\njournal:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal(&[])
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, b"")
    }

    /// The container's journal (the last 60 lines; `extra` e.g. `-u warden`).
    fn journal(&self, extra: &[&str]) -> String {
        let mut args = vec!["journalctl", "--no-pager", "-o", "cat", "-n", "60"];
        args.extend_from_slice(extra);
        let out = self.run(&args, b"");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show` of a unit: property → value.
    fn show(&self, unit: &str) -> std::collections::HashMap<String, String> {
        self.ok(&["systemctl", "show", unit])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Powers the container off and removes its cgroup. True when systemd
    /// shut down by itself (no process had to be killed).
    fn power_off(&mut self) -> bool {
        if self.off {
            return true;
        }
        self.off = true;
        if self.init != 0 {
            let _ = self.run(&["systemctl", "--no-block", "poweroff"], b"");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut clean = false;
        loop {
            match self.unshare.try_wait() {
                Ok(Some(_)) => {
                    clean = true;
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => break,
            }
        }
        let mut pids = Vec::new();
        cgroup_pids(&self.cgroup, &mut pids);
        clean &= pids.is_empty();
        if !clean {
            if std::fs::write(self.cgroup.join("cgroup.kill"), "1").is_err() {
                for p in &pids {
                    let _ = Command::new("kill").args(["-KILL", p]).status();
                }
            }
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cgroup.exists() && Instant::now() < deadline {
            remove_cgroup_tree(&self.cgroup);
            if self.cgroup.exists() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        clean
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// The bit of a capability the unit names (those it may name).
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_NET_BIND_SERVICE" => 10,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("{other}: add it to cap_bit"),
    }
}

fn cap_mask(names: &str) -> u64 {
    names
        .split_whitespace()
        .fold(0, |m, n| m | 1u64 << cap_bit(n))
}

/// A `Name:\tvalue` line of /proc/PID/status.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{name} in {status}"))
        .trim()
}

fn hex_field(status: &str, name: &str) -> u64 {
    u64::from_str_radix(status_field(status, name), 16).unwrap_or_else(|_| panic!("{name} hex"))
}

/// The soft `Max open files` of a /proc/PID/limits.
fn open_files(limits: &str, hard: bool) -> u64 {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next();
    let value = if hard { fields.next() } else { soft };
    value.and_then(|v| v.parse().ok()).expect("a number")
}

/// What of the package could be on the host, to compare before and after.
fn host_state() -> Vec<(String, bool)> {
    let mut state = vec![
        (
            "dpkg: warden installed".to_owned(),
            installed_status().is_some_and(|s| s.contains(" installed")),
        ),
        ("user warden".to_owned(), user_exists("warden", "passwd")),
        ("group warden".to_owned(), user_exists("warden", "group")),
    ];
    for p in [
        "/usr/bin/warden",
        UNIT,
        "/etc/systemd/system/multi-user.target.wants/warden.service",
        "/etc/warden",
        "/var/lib/warden",
        "/sys/fs/bpf/warden",
        "/run/warden",
    ] {
        state.push((p.to_owned(), Path::new(p).exists()));
    }
    state
}

#[test]
fn the_package_runs_under_a_real_systemd_as_the_readme_says() {
    if !have_root() {
        return;
    }
    if !Path::new(SYSTEMD).exists() || cgroup2_root().is_none() {
        println!("note: no {SYSTEMD} or no cgroup2 mount here; not booting systemd");
        return;
    }
    let _turn = one_at_a_time();
    let deb = deb();
    let before = host_state();
    let mut c = Booted::boot();
    let ns = c.dir.path().join("ns");

    // A fresh machine, as far as warden goes, whatever this host has.
    c.ok(&[
        "sh",
        "-c",
        "dpkg -P warden >/dev/null 2>&1; rm -rf /etc/warden /var/lib/warden",
    ]);

    // The README's steps.
    std::fs::copy(&deb, c.path("/tmp/warden.deb")).expect("the .deb into the container");
    c.ok(&["dpkg", "-i", "/tmp/warden.deb"]);
    c.ok(&[
        "runuser", "-u", "warden", "--", "warden", "--config", CONFIG, "init",
    ]);
    // `warden doctor` as the README has it: as the unit's user with its
    // capabilities (as root it refuses the warden user's data dir; as the
    // bare user it lacks the capabilities).
    let doctor = c.ok(&[
        "systemd-run",
        "--quiet",
        "--pipe",
        "--wait",
        "-p",
        "User=warden",
        "-p",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
        "warden",
        "--config",
        CONFIG,
        "doctor",
    ]);
    assert!(doctor.contains(" 0 failed"), "{doctor}");
    assert!(
        doctor.contains("programs load and attach"),
        "the eBPF load test ran: {doctor}"
    );
    // Returns once the job is done: for Type=notify, after READY=1.
    c.ok(&["systemctl", "enable", "--now", "warden"]);
    let unit = c.show("warden");
    let prop = |k: &str| unit.get(k).map(String::as_str).unwrap_or("");
    let journal = || c.journal(&["-u", "warden"]);
    assert_eq!(prop("Type"), "notify");
    assert_eq!(prop("UnitFileState"), "enabled");
    assert_eq!(
        (prop("ActiveState"), prop("SubState")),
        ("active", "running"),
        "{}",
        journal()
    );
    assert_eq!(prop("StatusText"), "serving", "READY=1 with STATUS=");
    assert_eq!(prop("NRestarts"), "0");
    let main = prop("MainPID").to_owned();

    // The warden user, the unit's bounding set; of it only the two
    // capabilities the daemon keeps are effective, and none is ambient any
    // more (the eBPF loader thread that used the others has ended).
    let uid = c.ok(&["id", "-u", "warden"]).trim().to_owned();
    let gid = c.ok(&["id", "-g", "warden"]).trim().to_owned();
    let status = c.ok(&["cat", &format!("/proc/{main}/status")]);
    assert_eq!(
        status_field(&status, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(
        status_field(&status, "Gid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [gid.as_str(); 4]
    );
    let unit_text = c.ok(&["cat", UNIT]);
    let bounding = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet=");
    let ambient = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities=");
    assert_eq!(cap_mask(bounding), cap_mask(ambient));
    let kept = cap_mask("CAP_SYS_PTRACE CAP_DAC_READ_SEARCH");
    assert_eq!(hex_field(&status, "CapBnd"), cap_mask(bounding), "{status}");
    assert_eq!(hex_field(&status, "CapAmb"), 0, "{status}");
    assert_eq!(hex_field(&status, "CapInh"), 0, "{status}");
    let threads = c.ok(&["sh", "-c", &format!("cat /proc/{main}/task/*/status")]);
    for name in ["CapEff", "CapPrm"] {
        for line in threads.lines().filter(|l| l.starts_with(name)) {
            assert_eq!(hex_field(line, name), kept, "{line} (each thread)");
        }
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Seccomp"), "2", "SystemCallFilter=");
    // LimitNOFILE=, as far as this host's hard limit lets systemd go.
    let limit: u64 = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("LimitNOFILE=");
    let ours = std::fs::read_to_string("/proc/self/limits").expect("limits");
    let theirs = c.ok(&["cat", &format!("/proc/{main}/limits")]);
    assert_eq!(
        open_files(&theirs, false),
        limit.min(open_files(&ours, true))
    );

    // The admin socket, the metrics listener, the eBPF monitor.
    let st = c.ok(&["warden", "--config", CONFIG, "status"]);
    assert!(st.contains(&format!("running (pid {main})")), "{st}");
    assert!(st.contains("unsealed"), "{st}");
    let ready = c.ok(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://127.0.0.1:9477/readyz",
    ]);
    assert_eq!(ready.trim(), "ready");
    let log = journal();
    assert!(log.contains("eBPF access monitor attached"), "{log}");
    assert!(
        c.ok(&["ls", "/sys/fs/bpf/warden"]).contains("d-"),
        "pins under the tmpfiles.d directory"
    );

    // The live unit rates as the offline check says.
    let security = c.ok(&["systemd-analyze", "security", "warden"]);
    let overall = security
        .lines()
        .find(|l| l.contains("Overall exposure level for warden.service"))
        .expect("overall exposure line");
    println!("live: {overall}");
    assert!(overall.contains("OK"), "{security}");

    // A PostgreSQL route end to end, to a cluster the container's systemd
    // runs (its own network namespace: port 5432 is its own).
    let pg = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/psql")).exists())
        .max();
    match pg {
        Some(v) if Path::new("/usr/bin/pg_createcluster").exists() => {
            let v = v.to_string();
            c.ok(&["pg_createcluster", &v, "wardentest", "-p", "5432"]);
            c.ok(&["systemctl", "start", &format!("postgresql@{v}-wardentest")]);
            let mut raw = [0u8; 24];
            std::io::Read::read_exact(
                &mut std::fs::File::open("/dev/urandom").expect("urandom"),
                &mut raw,
            )
            .expect("random");
            let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            c.ok_with(
                &[
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    "psql",
                    "-qX",
                    "-v",
                    "ON_ERROR_STOP=1",
                ],
                format!("CREATE ROLE app LOGIN PASSWORD '{password}';").as_bytes(),
            );
            c.ok_with(
                &["warden", "--config", CONFIG, "secret", "put", "db/app"],
                password.as_bytes(),
            );
            let mut config = std::fs::read_to_string(c.path(CONFIG)).expect("config");
            config.push_str(&format!(
                r#"
[[workload]]
name = "psql"
spiffe_id = "spiffe://warden.local/psql"
selectors = {{ exe_path = "/usr/lib/postgresql/{v}/bin/psql" }}

[[route]]
name = "db"
kind = "postgres"
listen = "127.0.0.1:25432"
upstream = "127.0.0.1:5432"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "db/app" }}
allow = ["psql"]
"#
            ));
            std::fs::write(c.path(CONFIG), config).expect("config");
            c.ok(&["systemctl", "restart", "warden"]);
            // As a unit of the container's systemd: in its cgroup, where
            // the kernel programs are attached (an `nsenter`ed process
            // stays in the host's).
            let user = c.ok(&[
                "systemd-run",
                "--quiet",
                "--pipe",
                "--wait",
                "psql",
                "-XAt",
                "-d",
                "host=127.0.0.1 port=25432 dbname=postgres user=app",
                "-c",
                "select current_user",
            ]);
            assert_eq!(user.trim(), "app", "{}", journal());
            // warden runs in the container's PID namespace: the kernel
            // programs name processes as it sees them, so psql was
            // attributed from the eBPF map, and warden's own connection to
            // the protected upstream is not a bypass.
            let metrics = c.ok(&[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "http://127.0.0.1:9477/metrics",
            ]);
            let sample = |name: &str| -> f64 {
                metrics
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{name} in:\n{metrics}"))
            };
            assert!(
                sample("warden_monitor_attributions_total{source=\"ebpf\"}") >= 1.0,
                "{metrics}"
            );
            assert_eq!(
                sample("warden_monitor_bypass_attempts_total "),
                0.0,
                "{metrics}"
            );
            let log = c.journal(&["-u", "warden", "-n", "500"]);
            assert!(!log.contains(&password), "the password in the journal");
        }
        _ => println!("note: no PostgreSQL server package here; no route checked"),
    }

    // A clean stop: exit 0 on SIGTERM, the kernel programs released.
    c.ok(&["systemctl", "stop", "warden"]);
    let unit = c.show("warden");
    let prop = |k: &str| unit.get(k).map(String::as_str).unwrap_or("");
    let log = c.journal(&["-u", "warden", "-n", "20"]);
    assert_eq!(prop("ActiveState"), "inactive", "{log}");
    assert_eq!(prop("Result"), "success", "{log}");
    assert_eq!(prop("ExecMainStatus"), "0", "{log}");
    assert!(log.contains("SIGTERM received: shutting down"), "{log}");
    assert!(log.contains("eBPF monitor detached"), "{log}");

    // The maintainer scripts' systemd side: `dpkg -r` stops the running
    // service cleanly, purge takes the enablement link, user and pin dir.
    c.ok(&["systemctl", "start", "warden"]);
    c.ok(&["dpkg", "-r", "warden"]);
    let unit = c.show("warden");
    let prop = |k: &str| unit.get(k).map(String::as_str).unwrap_or("");
    let log = c.journal(&["-u", "warden", "-n", "20"]);
    assert_eq!(prop("ActiveState"), "inactive", "prerm stops it: {log}");
    assert_eq!(prop("Result"), "success", "{log}");
    assert_eq!(prop("LoadState"), "not-found", "postrm reloads systemd");
    const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/warden.service";
    let wants = c.path(WANTS);
    assert!(
        std::fs::symlink_metadata(&wants).is_ok(),
        "remove keeps the admin's enablement"
    );
    c.ok(&["dpkg", "-P", "warden"]);
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "purge leaves a dangling {WANTS}"
    );
    assert!(!c.run(&["getent", "passwd", "warden"], b"").status.success());
    assert!(!c.path("/sys/fs/bpf/warden").exists(), "the pin directory");

    // The container powers off by itself and leaves nothing on the host.
    let cgroup = c.cgroup.clone();
    assert!(c.power_off(), "systemd did not power off: {}", c.boot_log());
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let ns_str = ns.to_str().expect("utf-8");
    assert!(!mounts.contains(ns_str), "mounts left behind:\n{mounts}");
    assert_eq!(
        std::fs::read_dir(&ns).expect("ns dir").count(),
        0,
        "the container wrote to the host's {}",
        ns.display()
    );
    assert_eq!(host_state(), before, "the host changed");
}
