//! A real full disk under one instance's audit log only: the log is copied
//! to a 1 MiB tmpfs and bind-mounted back in place, so the store (on the
//! normal disk) keeps working and only audit records run out of space.
//! Needs root. Mount it before the daemon starts (a running daemon keeps its
//! open file).

use std::path::PathBuf;
use std::process::Command;

pub struct FullDiskLog {
    small: PathBuf,
    /// Mount points to undo, innermost first.
    mounts: Vec<PathBuf>,
}

impl FullDiskLog {
    /// Moves `i`'s audit log onto a small tmpfs.
    pub fn mount(i: &crate::Instance) -> FullDiskLog {
        let small = i.dir.path().join("small");
        std::fs::create_dir(&small).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        let mut guard = FullDiskLog {
            small: small.clone(),
            mounts: vec![small.clone()],
        };
        let log = i.audit_log();
        let moved = small.join("audit.log");
        std::fs::copy(&log, &moved).unwrap();
        let st = Command::new("mount")
            .arg("--bind")
            .arg(&moved)
            .arg(&log)
            .status()
            .unwrap();
        assert!(st.success(), "bind-mount the log");
        guard.mounts.insert(0, log);
        guard
    }

    /// Fills the tmpfs: the next records that do not fit in the log's last
    /// page fail with ENOSPC.
    pub fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k"])
            .arg(format!("of={}", self.filler().display()))
            .output();
    }

    /// Frees the space [`fill`](Self::fill) took.
    pub fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }

    fn filler(&self) -> PathBuf {
        self.small.join("filler")
    }
}

impl Drop for FullDiskLog {
    fn drop(&mut self) {
        for p in &self.mounts {
            let _ = Command::new("umount").arg(p).status();
        }
    }
}
