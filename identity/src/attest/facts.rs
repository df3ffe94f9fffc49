//! Facts about a peer process, read from procfs, and the pid-reuse guard.
//!
//! [`gather_facts`] reads the credentials, executable, and cgroup of a pid.
//! Only facts the process cannot forge without privileges are collected for
//! selectors: effective uid/gid and groups (`/proc/PID/status`), the
//! executable the kernel mapped (`/proc/PID/exe`, hashed through that magic
//! link rather than through its path), and the cgroup v2 path. The comm name
//! is kept only as [`PeerFacts::display_name`] for log messages; neither comm
//! nor cmdline is ever matched, since a process can rewrite both.
//!
//! Facts are bracketed by two reads of the start time (field 22 of
//! `/proc/PID/stat`) so a pid recycled mid-gather is detected, and
//! [`confirm_same_process`] repeats the check after selectors have been
//! evaluated, just before an identity is handed out.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::AttestError;
use super::hash::{ExeHashCache, HashSkip};
use super::procfs::{systemd_unit_of, ProcFs};

/// What the kernel appends to the exe link of a process whose executable was
/// unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// Everything attestation knows about a peer process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    /// The process id.
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks after boot when the process
    /// started. Together with the pid it identifies one process.
    pub start_time: u64,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Path of the executable (`readlink /proc/PID/exe`, without a
    /// ` (deleted)` suffix). `None` for kernel threads or when unreadable.
    pub exe_path: Option<PathBuf>,
    /// The executable file was unlinked (or replaced) after the process
    /// started; `exe_path` then names a file that is not the one running.
    pub exe_deleted: bool,
    /// Lower-case hex SHA-256 of the running executable, read through
    /// `/proc/PID/exe`. `None` when skipped; see `exe_hash_skipped`.
    pub exe_sha256: Option<String>,
    /// Why `exe_sha256` is `None` (for logging).
    pub exe_hash_skipped: Option<HashSkip>,
    /// cgroup v2 path (the `0::` line of `/proc/PID/cgroup`).
    pub cgroup: Option<String>,
    /// The systemd unit owning the cgroup (first `.service`/`.scope`
    /// component of `cgroup`).
    pub systemd_unit: Option<String>,
    /// The comm name. Chosen by the process itself: for display only, never
    /// used for matching.
    pub display_name: String,
}

impl PeerFacts {
    /// A one-line summary of the facts used for matching, escaped for logs,
    /// e.g. `"psql" exe /usr/bin/psql, uid 1001, gid 1001, cgroup /user.slice`.
    pub fn summary(&self) -> String {
        let mut s = format!("{:?}", self.display_name);
        match &self.exe_path {
            Some(p) => {
                s.push_str(&format!(" exe {}", escape(p.as_os_str())));
                if self.exe_deleted {
                    s.push_str(" (deleted)");
                }
            }
            None => s.push_str(" exe unknown"),
        }
        s.push_str(&format!(", uid {}, gid {}", self.uid, self.gid));
        if !self.groups.is_empty() {
            let g: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            s.push_str(&format!(", groups {}", g.join(",")));
        }
        if let Some(cg) = &self.cgroup {
            s.push_str(&format!(", cgroup {}", cg.escape_debug()));
        }
        match (&self.exe_sha256, &self.exe_hash_skipped) {
            (Some(h), _) => s.push_str(&format!(", sha256 {h}")),
            (None, Some(why)) => s.push_str(&format!(", sha256 unknown: {why}")),
            (None, None) => {}
        }
        s
    }
}

impl fmt::Display for PeerFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "process {} ({})", self.pid, self.summary())
    }
}

/// Escapes a path or name for a single log line.
pub(crate) fn escape(s: &OsStr) -> String {
    s.to_string_lossy().escape_debug().to_string()
}

/// [`ProcFs::gather_facts`] on `/proc`.
pub fn gather_facts(pid: u32, hashes: &ExeHashCache) -> Result<PeerFacts, AttestError> {
    ProcFs::default().gather_facts(pid, hashes)
}

/// [`ProcFs::confirm_same_process`] on `/proc`.
pub fn confirm_same_process(facts: &PeerFacts) -> Result<(), AttestError> {
    ProcFs::default().confirm_same_process(facts)
}

/// [`ProcFs::revalidate`] on `/proc`.
pub fn revalidate(facts: &PeerFacts, hashes: &ExeHashCache) -> Result<(), AttestError> {
    ProcFs::default().revalidate(facts, hashes)
}

/// [`ProcFs::revalidate_cached`] on `/proc`.
pub fn revalidate_cached(
    facts: &PeerFacts,
    hashes: &ExeHashCache,
) -> Option<Result<(), AttestError>> {
    ProcFs::default().revalidate_cached(facts, hashes)
}

/// The facts that are re-read by the pid-reuse guard.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    exe_path: Option<PathBuf>,
    exe_deleted: bool,
    cgroup: Option<String>,
}

impl ProcFs {
    /// Gathers the facts of process `pid`.
    ///
    /// Errors: [`AttestError::ProcessGone`] if the process does not exist or is
    /// a zombie; [`AttestError::ProcessChanged`] if its start time changed
    /// while the facts were read (pid reuse); `Io`/`Parse` for unreadable or
    /// malformed files. An executable that cannot be read or hashed is not an
    /// error: `exe_path`/`exe_sha256` are `None` and `exe_hash_skipped` says
    /// why.
    pub fn gather_facts(&self, pid: u32, hashes: &ExeHashCache) -> Result<PeerFacts, AttestError> {
        let stat = self.read_stat(pid)?;
        if stat.is_dead() {
            return Err(AttestError::ProcessGone { pid });
        }
        let snap = self.snapshot(pid)?;
        let (exe_sha256, exe_hash_skipped) = match hashes.sha256_of(&self.pid_file(pid, "exe")) {
            Ok(h) => (Some(h), None),
            Err(why) => (None, Some(why)),
        };
        // Second start-time read: everything above belongs to one process.
        match self.live_start_time(pid)? {
            None => return Err(AttestError::ProcessGone { pid }),
            Some(now) if now != stat.start_time => {
                return Err(changed_start(pid, stat.start_time, now))
            }
            Some(_) => {}
        }

        let systemd_unit = snap.cgroup.as_deref().and_then(systemd_unit_of);
        Ok(PeerFacts {
            pid,
            start_time: stat.start_time,
            uid: snap.uid,
            gid: snap.gid,
            groups: snap.groups,
            exe_path: snap.exe_path,
            exe_deleted: snap.exe_deleted,
            exe_sha256,
            exe_hash_skipped,
            cgroup: snap.cgroup,
            systemd_unit,
            display_name: stat.comm,
        })
    }

    /// The pid-reuse guard: call it after the selectors were evaluated and
    /// before the identity is used. Re-reads the start time and the facts
    /// selectors depend on (uid, gid, groups, executable path, cgroup; the
    /// executable is not re-hashed). Any difference, or a process that no
    /// longer exists, yields [`AttestError::ProcessChanged`].
    ///
    /// An executable deleted in between is not a change (the process still
    /// runs the file it was attested with); an `execve` of another path is.
    pub fn confirm_same_process(&self, facts: &PeerFacts) -> Result<(), AttestError> {
        let pid = facts.pid;
        let now = self.resnapshot(pid)?;
        let diffs = differences(facts, &now);
        // A pid recycled while the snapshot was read is caught by a last stat read.
        self.confirm_start_time(facts)?;
        changed_if_any(pid, diffs)
    }

    /// Whether `facts` (gathered earlier, and already attested) still
    /// describe the live process exactly: the same start time and every fact
    /// a selector can see — uid, gid, groups, executable path, whether it was
    /// deleted, its SHA-256, cgroup — unchanged. A fresh
    /// [`ProcFs::gather_facts`] would then return the same facts (up to the
    /// comm name, which is display only), so the earlier attestation still
    /// holds. It replaces [`ProcFs::confirm_same_process`] for a reused
    /// result. Any difference is [`AttestError::ProcessChanged`].
    ///
    /// One start-time read, after the others, is enough here (gathering
    /// needs two because it does not know the start time yet): the process
    /// with `facts.start_time` held the pid when it was attested, and a pid
    /// never returns to a process once reused, so the same start time read
    /// after the snapshot means that process held the pid throughout it.
    ///
    /// It reads about half of what gathering and confirming read, which is
    /// what makes repeated connections from one process cheap.
    pub fn revalidate(&self, facts: &PeerFacts, hashes: &ExeHashCache) -> Result<(), AttestError> {
        // Never `None`: this hash closure always answers.
        self.revalidate_by(facts, |exe| Some(hashes.sha256_of(exe).ok()))
            .unwrap_or_else(|| Err(exited(facts.pid)))
    }

    /// [`Self::revalidate`] that never blocks: `None` when it would have to
    /// read the executable to hash it (not in the cache, or changed, or
    /// never hashed), so the caller takes the blocking path. Reads only
    /// small /proc files and stats the executable.
    pub fn revalidate_cached(
        &self,
        facts: &PeerFacts,
        hashes: &ExeHashCache,
    ) -> Option<Result<(), AttestError>> {
        facts.exe_sha256.as_ref()?;
        self.revalidate_by(facts, |exe| hashes.cached_sha256_of(exe).map(Some))
    }

    /// The re-check with `sha` giving the executable's hash now (`None`:
    /// cannot tell without blocking; the check stops there).
    fn revalidate_by(
        &self,
        facts: &PeerFacts,
        sha: impl FnOnce(&Path) -> Option<Option<String>>,
    ) -> Option<Result<(), AttestError>> {
        let pid = facts.pid;
        let now = match self.resnapshot(pid) {
            Ok(now) => now,
            Err(e) => return Some(Err(e)),
        };
        let mut diffs = differences(facts, &now);
        if now.exe_deleted != facts.exe_deleted {
            diffs.push("executable deleted".to_string());
        }
        if sha(&self.pid_file(pid, "exe"))? != facts.exe_sha256 {
            diffs.push("executable content changed".to_string());
        }
        Some(
            self.confirm_start_time(facts)
                .and_then(|()| changed_if_any(pid, diffs)),
        )
    }

    /// [`Self::snapshot`] for a re-check: a vanished process has exited.
    fn resnapshot(&self, pid: u32) -> Result<Snapshot, AttestError> {
        match self.snapshot(pid) {
            Ok(now) => Ok(now),
            Err(AttestError::ProcessGone { .. }) => Err(exited(pid)),
            Err(e) => Err(e),
        }
    }

    fn confirm_start_time(&self, facts: &PeerFacts) -> Result<(), AttestError> {
        match self.live_start_time(facts.pid)? {
            None => Err(exited(facts.pid)),
            Some(now) if now != facts.start_time => {
                Err(changed_start(facts.pid, facts.start_time, now))
            }
            Some(_) => Ok(()),
        }
    }

    /// The start time of `pid`, or `None` if it no longer exists or is a zombie.
    fn live_start_time(&self, pid: u32) -> Result<Option<u64>, AttestError> {
        match self.read_stat(pid) {
            Ok(st) if st.is_dead() => Ok(None),
            Ok(st) => Ok(Some(st.start_time)),
            Err(AttestError::ProcessGone { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads uid/gid/groups, executable path and cgroup.
    fn snapshot(&self, pid: u32) -> Result<Snapshot, AttestError> {
        let status = self.read_status(pid)?;
        let exe_link = self.pid_file(pid, "exe");
        let (exe_path, exe_deleted) = match fs::read_link(&exe_link) {
            Ok(target) => {
                let (path, deleted) = strip_deleted(&exe_link, target);
                (Some(path), deleted)
            }
            // Kernel threads have no executable; permission problems leave
            // the executable unknown (it then matches no exe selector). A
            // vanished process is caught by the start-time re-check.
            Err(_) => (None, false),
        };
        let cgroup = self.read_cgroup(pid)?;
        Ok(Snapshot {
            uid: status.euid,
            gid: status.egid,
            groups: status.groups,
            exe_path,
            exe_deleted,
            cgroup,
        })
    }
}

/// What differs between attested facts and a fresh snapshot, for the
/// message (an executable deleted meanwhile is not listed: the process still
/// runs the file it was attested with).
fn differences(facts: &PeerFacts, now: &Snapshot) -> Vec<String> {
    let mut diffs = Vec::new();
    if now.uid != facts.uid {
        diffs.push(format!("uid {} -> {}", facts.uid, now.uid));
    }
    if now.gid != facts.gid {
        diffs.push(format!("gid {} -> {}", facts.gid, now.gid));
    }
    if now.groups != facts.groups {
        diffs.push("supplementary groups changed".to_string());
    }
    if now.exe_path != facts.exe_path {
        diffs.push(format!(
            "executable {} -> {}",
            opt_path(&facts.exe_path),
            opt_path(&now.exe_path)
        ));
    }
    if now.cgroup != facts.cgroup {
        diffs.push("moved to another cgroup".to_string());
    }
    diffs
}

fn changed_if_any(pid: u32, diffs: Vec<String>) -> Result<(), AttestError> {
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(AttestError::ProcessChanged {
            pid,
            detail: diffs.join(", "),
        })
    }
}

fn exited(pid: u32) -> AttestError {
    AttestError::ProcessChanged {
        pid,
        detail: "process exited".to_string(),
    }
}

fn changed_start(pid: u32, was: u64, now: u64) -> AttestError {
    AttestError::ProcessChanged {
        pid,
        detail: format!("start time {was} -> {now}: another process now has this pid"),
    }
}

fn opt_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "unknown".to_string(), |p| escape(p.as_os_str()))
}

/// Splits the kernel's ` (deleted)` marker off an exe link target and says
/// whether the running executable was unlinked from the path it was started
/// by. The marker means deleted unless a file literally named `x (deleted)`
/// is the running executable; without the marker, a link count of zero also
/// means deleted.
fn strip_deleted(exe_link: &Path, target: PathBuf) -> (PathBuf, bool) {
    let unlinked = fs::metadata(exe_link).is_ok_and(|m| m.nlink() == 0);
    let bytes = target.as_os_str().as_bytes();
    match bytes.strip_suffix(DELETED_SUFFIX) {
        Some(stripped) if !same_file(exe_link, &target) => {
            (PathBuf::from(OsStr::from_bytes(stripped)), true)
        }
        _ => (target, unlinked),
    }
}

/// Whether `a` and `b` are the same inode.
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    //! Facts from a fake /proc tree: pid reuse, exits, identity changes.

    use super::*;
    use std::os::unix::fs::symlink;

    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn procfs(&self) -> ProcFs {
            ProcFs::new(self.dir.path().join("proc"))
        }
        fn pid_dir(&self, pid: u32) -> PathBuf {
            self.dir.path().join("proc").join(pid.to_string())
        }
        /// A process with the given start time, uid, executable content and cgroup.
        fn add(&self, pid: u32, start: u64, uid: u32, exe: &[u8], cgroup: &str) -> PathBuf {
            let d = self.pid_dir(pid);
            fs::create_dir_all(&d).unwrap();
            self.set_stat(pid, start, 'S');
            self.set_uid(pid, uid);
            fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
            let bin = self.dir.path().join(format!("bin-{pid}"));
            fs::write(&bin, exe).unwrap();
            let _ = fs::remove_file(d.join("exe"));
            symlink(&bin, d.join("exe")).unwrap();
            bin
        }
        fn set_stat(&self, pid: u32, start: u64, state: char) {
            let filler: Vec<String> = (4..=21).map(|i| i.to_string()).collect();
            fs::write(
                self.pid_dir(pid).join("stat"),
                format!(
                    "{pid} (fake) prog) {state} {} {start} 0 0\n",
                    filler.join(" ")
                ),
            )
            .unwrap();
        }
        fn set_uid(&self, pid: u32, uid: u32) {
            fs::write(
                self.pid_dir(pid).join("status"),
                format!(
                    "Name:\tfake\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n\
                     Gid:\t100\t100\t100\t100\nGroups:\t100 27\n"
                ),
            )
            .unwrap();
        }
    }

    #[test]
    fn fake_process_facts() {
        let fake = FakeProc::new();
        let bin = fake.add(4242, 1000, 1001, b"abc", "/system.slice/nginx.service");
        let cache = ExeHashCache::new();
        let f = fake.procfs().gather_facts(4242, &cache).unwrap();
        assert_eq!(f.pid, 4242);
        assert_eq!(f.start_time, 1000);
        assert_eq!((f.uid, f.gid, f.groups.clone()), (1001, 100, vec![100, 27]));
        assert_eq!(f.exe_path.as_deref(), Some(bin.as_path()));
        assert!(!f.exe_deleted);
        assert_eq!(
            f.exe_sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(f.cgroup.as_deref(), Some("/system.slice/nginx.service"));
        assert_eq!(f.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!(f.display_name, "fake) prog");
        fake.procfs().confirm_same_process(&f).unwrap();
        let line = f.to_string();
        assert!(
            line.starts_with("process 4242 (\"fake) prog\" exe "),
            "{line}"
        );
        assert!(line.contains("uid 1001, gid 100"), "{line}");
    }

    #[test]
    fn pid_reuse_detected() {
        let fake = FakeProc::new();
        fake.add(4242, 1000, 1001, b"abc", "/a.service");
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        // The process exits and a new one gets the same pid, same uid, exe, cgroup.
        fake.set_stat(4242, 2000, 'S');
        let err = fake.procfs().confirm_same_process(&f).unwrap_err();
        match &err {
            AttestError::ProcessChanged { pid: 4242, detail } => {
                assert!(detail.contains("1000 -> 2000"), "{detail}")
            }
            other => panic!("want ProcessChanged, got {other:?}"),
        }
    }

    #[test]
    fn exit_after_gather_is_changed() {
        let fake = FakeProc::new();
        fake.add(4242, 1000, 1001, b"abc", "/");
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        fs::remove_dir_all(fake.pid_dir(4242)).unwrap();
        assert!(matches!(
            fake.procfs().confirm_same_process(&f),
            Err(AttestError::ProcessChanged { pid: 4242, .. })
        ));
    }

    #[test]
    fn zombie_after_gather_is_changed() {
        let fake = FakeProc::new();
        fake.add(4242, 1000, 1001, b"abc", "/");
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        fake.set_stat(4242, 1000, 'Z');
        assert!(matches!(
            fake.procfs().confirm_same_process(&f),
            Err(AttestError::ProcessChanged { pid: 4242, .. })
        ));
    }

    #[test]
    fn missing_or_zombie_process_is_gone() {
        let fake = FakeProc::new();
        let cache = ExeHashCache::new();
        assert!(matches!(
            fake.procfs().gather_facts(77, &cache),
            Err(AttestError::ProcessGone { pid: 77 })
        ));
        fake.add(78, 5, 0, b"x", "/");
        fake.set_stat(78, 5, 'Z');
        assert!(matches!(
            fake.procfs().gather_facts(78, &cache),
            Err(AttestError::ProcessGone { pid: 78 })
        ));
    }

    #[test]
    fn uid_change_is_changed() {
        let fake = FakeProc::new();
        fake.add(4242, 1000, 0, b"abc", "/");
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        fake.set_uid(4242, 65534);
        let err = fake.procfs().confirm_same_process(&f).unwrap_err();
        assert!(err.to_string().contains("uid 0 -> 65534"), "{err}");
    }

    #[test]
    fn exec_of_other_binary_is_changed() {
        let fake = FakeProc::new();
        fake.add(4242, 1000, 0, b"abc", "/");
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        let other = fake.dir.path().join("other");
        fs::write(&other, b"zzz").unwrap();
        fs::remove_file(fake.pid_dir(4242).join("exe")).unwrap();
        symlink(&other, fake.pid_dir(4242).join("exe")).unwrap();
        let err = fake.procfs().confirm_same_process(&f).unwrap_err();
        assert!(err.to_string().contains("executable"), "{err}");
    }

    #[test]
    fn revalidate_accepts_only_an_unchanged_process() {
        let fake = FakeProc::new();
        let hashes = ExeHashCache::new();
        let bin = fake.add(4242, 1000, 0, b"abc", "/svc.slice/a.service");
        let f = fake.procfs().gather_facts(4242, &hashes).unwrap();
        assert!(f.exe_sha256.is_some());
        // Unchanged (the comm name is display only).
        fake.procfs().revalidate(&f, &hashes).unwrap();
        let stale_for = |facts: &PeerFacts, what: &str| {
            let err = fake.procfs().revalidate(facts, &hashes).unwrap_err();
            assert!(
                matches!(err, AttestError::ProcessChanged { .. }),
                "{what}: {err}"
            );
            err.to_string()
        };
        // The executable rewritten in place: same path, other content.
        fs::write(&bin, b"abcd").unwrap();
        assert!(stale_for(&f, "content").contains("executable content changed"));
        fs::write(&bin, b"abc").unwrap();
        let f = fake.procfs().gather_facts(4242, &hashes).unwrap();
        fake.procfs().revalidate(&f, &hashes).unwrap();
        let stale = |what: &str| stale_for(&f, what);
        fake.set_uid(4242, 65534);
        assert!(stale("uid").contains("uid 0 -> 65534"));
        fake.set_uid(4242, 0);
        fs::write(fake.pid_dir(4242).join("cgroup"), "0::/other\n").unwrap();
        assert!(stale("cgroup").contains("cgroup"));
        fs::write(
            fake.pid_dir(4242).join("cgroup"),
            "0::/svc.slice/a.service\n",
        )
        .unwrap();
        fake.procfs().revalidate(&f, &hashes).unwrap();
        // Another process now has the pid.
        fake.set_stat(4242, 2000, 'S');
        assert!(stale("pid reuse").contains("another process"));
        fake.set_stat(4242, 1000, 'Z');
        assert!(stale("zombie").contains("exited"));
    }

    #[test]
    fn cached_revalidation_answers_only_without_reading_the_executable() {
        let fake = FakeProc::new();
        let hashes = ExeHashCache::new();
        let bin = fake.add(4242, 1000, 0, b"abc", "/svc.slice/a.service");
        let f = fake.procfs().gather_facts(4242, &hashes).unwrap();
        let cached = |f: &PeerFacts| fake.procfs().revalidate_cached(f, &hashes);
        assert!(matches!(cached(&f), Some(Ok(()))));
        // A changed uid is still seen (and refused) without blocking.
        fake.set_uid(4242, 65534);
        assert!(matches!(
            cached(&f),
            Some(Err(AttestError::ProcessChanged { .. }))
        ));
        fake.set_uid(4242, 0);
        // The executable rewritten: only the blocking path can tell.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&bin, b"abcd").unwrap();
        assert!(cached(&f).is_none());
        assert!(fake.procfs().revalidate(&f, &hashes).is_err());
        // Facts without a hash (it was skipped) never take the quick path.
        let mut unhashed = fake.procfs().gather_facts(4242, &hashes).unwrap();
        unhashed.exe_sha256 = None;
        assert!(cached(&unhashed).is_none());
        // Another process on the pid.
        let f = fake.procfs().gather_facts(4242, &hashes).unwrap();
        fake.set_stat(4242, 2000, 'S');
        assert!(matches!(cached(&f), Some(Err(_))));
    }

    #[test]
    fn cgroup_move_is_changed() {
        let fake = FakeProc::new();
        fake.add(4242, 1000, 0, b"abc", "/a.service");
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        fs::write(fake.pid_dir(4242).join("cgroup"), "0::/b.service\n").unwrap();
        assert!(matches!(
            fake.procfs().confirm_same_process(&f),
            Err(AttestError::ProcessChanged { .. })
        ));
    }

    #[test]
    fn deleted_suffix_literal_name_kept() {
        // A file really named "x (deleted)" is not a deleted executable.
        let fake = FakeProc::new();
        fake.add(4242, 1, 0, b"abc", "/");
        let literal = fake.dir.path().join("x (deleted)");
        fs::write(&literal, b"abc").unwrap();
        let link = fake.pid_dir(4242).join("exe");
        fs::remove_file(&link).unwrap();
        symlink(&literal, &link).unwrap();
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        assert_eq!(f.exe_path.as_deref(), Some(literal.as_path()));
        assert!(!f.exe_deleted);
    }

    #[test]
    fn deleted_suffix_stripped() {
        // The kernel's marker on a link target that no longer exists.
        let fake = FakeProc::new();
        fake.add(4242, 1, 0, b"abc", "/");
        let link = fake.pid_dir(4242).join("exe");
        fs::remove_file(&link).unwrap();
        symlink("/usr/bin/gone (deleted)", &link).unwrap();
        let f = fake
            .procfs()
            .gather_facts(4242, &ExeHashCache::new())
            .unwrap();
        assert_eq!(f.exe_path.as_deref(), Some(Path::new("/usr/bin/gone")));
        assert!(f.exe_deleted);
        assert_eq!(f.exe_sha256, None);
        assert!(matches!(
            f.exe_hash_skipped,
            Some(HashSkip::Unreadable { .. })
        ));
    }
}
