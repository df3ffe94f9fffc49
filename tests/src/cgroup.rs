//! A child cgroup v2 for tests that freeze a workload: a `cgroup` selector
//! that names it matches only the processes started in it, never another
//! test's (a freeze also freezes every process that attests to the
//! workload, so a `uid = 0` workload must never be frozen in tests).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A child cgroup at the top of cgroup v2, removed on drop.
pub struct Cgroup {
    pub dir: PathBuf,
    /// The cgroup's path as `/proc/PID/cgroup` shows it (a `cgroup` selector).
    pub name: String,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = mounts
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                post.starts_with("cgroup2 ")
                    .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                    .flatten()
            })
            .expect("a cgroup2 mount");
        let name = format!("warden-test-{tag}-{}", std::process::id());
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        Cgroup {
            dir,
            name: format!("/{name}"),
        }
    }

    /// `sh -c` that joins this cgroup and runs `cmd`.
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {cmd}",
                self.dir.display()
            ))
            .env("PGPASSFILE", "/nonexistent")
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// psql from inside the cgroup: (exit code, stdout, stderr).
    pub fn psql(&self, dsn: &str, sql: &str) -> (i32, String, String) {
        let out = self
            .command(&format!("timeout 30 psql -X -tA -d '{dsn}' -c '{sql}'"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", p]).status();
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
