//! The Debian package from `cargo xtask package`, installed on this machine
//! with dpkg: the binary and the shipped config work, the unit passes
//! `systemd-analyze verify` and rates "OK" (exposure ≤ 3.0) in `systemd-analyze
//! security`, an edited conffile survives a reinstall, and remove and purge
//! leave nothing of the package but what they should. Needs root (dpkg);
//! `systemctl start` is not tried: systemd is not PID 1 in the test
//! container, so the unit is checked offline.
//!
//! The package is `$WARDEN_DEB` when set, else built by `cargo xtask package`
//! (a release build: slow the first time, quick when it is up to date).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use warden_tests::have_root;

const UNIT: &str = "/lib/systemd/system/warden.service";
const CONFIG: &str = "/etc/warden/warden.toml";

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
    let deb = deb();
    let deb = deb.to_str().expect("utf-8 path");
    if installed_status().is_some() {
        ok("dpkg", &["-P", "warden"]);
    }
    let had_state = Path::new("/var/lib/warden").exists();

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
    // The state is kept on purge (it cannot be recreated); the test made
    // it, so it removes it.
    assert!(Path::new("/var/lib/warden/store.db").exists());
    if !had_state {
        let _ = std::fs::remove_dir_all("/var/lib/warden");
    }
}
