//! Access to a procfs tree and parsers for the few files attestation reads.
//!
//! [`ProcFs`] wraps the procfs mount point (normally `/proc`) so tests can point
//! it at a fake tree in a temporary directory. The parsers are deliberately
//! strict about the fields they use and ignore everything else; in particular
//! `/proc/PID/stat` is split at the *last* `)` because the comm field may
//! itself contain spaces and parentheses.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::AttestError;

/// `ESRCH` on Linux (all architectures): reading a /proc file of a process
/// that exited after the file was opened.
const ESRCH: i32 = 3;

/// A procfs mount, `/proc` by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcFs {
    /// A procfs rooted at `root` (use `"/proc"` outside tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The procfs mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/PID`.
    pub fn pid_dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// `ROOT/PID/NAME`.
    pub(crate) fn pid_file(&self, pid: u32, name: &str) -> PathBuf {
        self.pid_dir(pid).join(name)
    }

    /// Reads `ROOT/PID/NAME`; a vanished process yields
    /// [`AttestError::ProcessGone`].
    ///
    /// These files are generated on read and report a size of 0, so
    /// `fs::read_to_string` would `statx` and then grow its buffer from a
    /// 32-byte probe; one 4 KiB read usually takes the whole file here.
    pub(crate) fn read_pid_file(&self, pid: u32, name: &str) -> Result<String, AttestError> {
        let path = self.pid_file(pid, name);
        read_generated(&path).map_err(|e| io_error(pid, path, e))
    }

    /// Reads and parses `ROOT/PID/stat`.
    pub(crate) fn read_stat(&self, pid: u32) -> Result<Stat, AttestError> {
        let text = self.read_pid_file(pid, "stat")?;
        parse_stat(&text).map_err(|detail| AttestError::Parse {
            path: self.pid_file(pid, "stat"),
            detail,
        })
    }

    /// Start time of PID in clock ticks since boot (field 22 of `stat`): with
    /// the pid it names one process, so a reused pid can be told apart.
    pub fn start_time(&self, pid: u32) -> Result<u64, AttestError> {
        Ok(self.read_stat(pid)?.start_time)
    }

    /// The cgroup v2 path of PID (`/` for the root cgroup), if it has one.
    pub fn cgroup_path(&self, pid: u32) -> Result<Option<String>, AttestError> {
        self.read_cgroup(pid)
    }

    /// Reads and parses `ROOT/PID/status`.
    pub(crate) fn read_status(&self, pid: u32) -> Result<Status, AttestError> {
        let text = self.read_pid_file(pid, "status")?;
        parse_status(&text).map_err(|detail| AttestError::Parse {
            path: self.pid_file(pid, "status"),
            detail,
        })
    }

    /// Reads `ROOT/PID/cgroup` and returns the cgroup v2 path, if any.
    pub(crate) fn read_cgroup(&self, pid: u32) -> Result<Option<String>, AttestError> {
        let text = self.read_pid_file(pid, "cgroup")?;
        Ok(parse_cgroup_v2(&text))
    }
}

/// Reads a whole procfs file with 4 KiB reads until end of file.
fn read_generated(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or(&[])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Maps an I/O error on a per-process file: "no such file" and ESRCH mean
/// the process is gone, anything else is reported with its path.
pub(crate) fn io_error(pid: u32, path: PathBuf, e: io::Error) -> AttestError {
    if is_gone(&e) {
        AttestError::ProcessGone { pid }
    } else {
        AttestError::Io { path, source: e }
    }
}

/// Whether an I/O error on a /proc/PID file means the process went away.
pub(crate) fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(ESRCH)
}

/// The fields of `/proc/PID/stat` attestation uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stat {
    /// The comm field (untrusted; display only).
    pub comm: String,
    /// Field 3, the process state letter.
    pub state: char,
    /// Field 22, start time in clock ticks since boot.
    pub start_time: u64,
}

impl Stat {
    /// Zombie (`Z`) or dead (`X`/`x`): the process no longer runs.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/PID/stat`. The comm field (2) is enclosed in parentheses and
/// may contain anything, including `)` and spaces, so the remaining fields are
/// taken after the last `)`.
pub(crate) fn parse_stat(text: &str) -> Result<Stat, String> {
    let open = text
        .find('(')
        .ok_or_else(|| "no '(' opening the comm field".to_string())?;
    let close = text
        .rfind(')')
        .ok_or_else(|| "no ')' closing the comm field".to_string())?;
    if close < open {
        return Err("')' before '(' in the comm field".to_string());
    }
    let comm = text[open + 1..close].to_string();
    // Fields after the comm start at field 3 (state).
    let mut rest = text[close + 1..].split_ascii_whitespace();
    let state_field = rest
        .next()
        .ok_or_else(|| "missing field 3 (state)".to_string())?;
    let mut chars = state_field.chars();
    let state = match (chars.next(), chars.next()) {
        (Some(c), None) => c,
        _ => {
            return Err(format!(
                "field 3 (state) is {state_field:?}, not one letter"
            ))
        }
    };
    // Field 22 is the 19th field after field 3.
    let start_field = rest
        .nth(18)
        .ok_or_else(|| "missing field 22 (starttime)".to_string())?;
    let start_time = start_field
        .parse::<u64>()
        .map_err(|_| format!("field 22 (starttime) is {start_field:?}, not a number"))?;
    Ok(Stat {
        comm,
        state,
        start_time,
    })
}

/// The credential fields of `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    /// Effective uid (second value of `Uid:`).
    pub euid: u32,
    /// Effective gid (second value of `Gid:`).
    pub egid: u32,
    /// Supplementary groups (`Groups:`), possibly empty.
    pub groups: Vec<u32>,
}

/// Parses the `Uid:`, `Gid:` and `Groups:` lines of `/proc/PID/status`.
pub(crate) fn parse_status(text: &str) -> Result<Status, String> {
    let mut euid = None;
    let mut egid = None;
    let mut groups = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            euid = Some(second_id(v, "Uid")?);
        } else if let Some(v) = line.strip_prefix("Gid:") {
            egid = Some(second_id(v, "Gid")?);
        } else if let Some(v) = line.strip_prefix("Groups:") {
            let parsed = v
                .split_ascii_whitespace()
                .map(|g| {
                    g.parse::<u32>()
                        .map_err(|_| format!("Groups: entry {g:?} is not a number"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            groups = Some(parsed);
        }
    }
    Ok(Status {
        euid: euid.ok_or_else(|| "no Uid: line".to_string())?,
        egid: egid.ok_or_else(|| "no Gid: line".to_string())?,
        groups: groups.ok_or_else(|| "no Groups: line".to_string())?,
    })
}

/// The effective id: the second of the four values (real, effective, saved, fs).
fn second_id(values: &str, what: &str) -> Result<u32, String> {
    let v = values
        .split_ascii_whitespace()
        .nth(1)
        .ok_or_else(|| format!("{what}: line has no effective (second) value"))?;
    v.parse::<u32>()
        .map_err(|_| format!("{what}: effective value {v:?} is not a number"))
}

/// The cgroup v2 path: the `0::PATH` line of `/proc/PID/cgroup`. `None` on a
/// host with only cgroup v1 hierarchies.
pub(crate) fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The systemd unit that owns a cgroup path: the FIRST path component ending
/// in `.service` or `.scope`.
///
/// The first one (not the deepest) is used on purpose: everything above it is
/// a `.slice` created by the system manager, while everything below it may be
/// a delegated subtree whose names the unit's own user chooses (e.g. a user's
/// `systemd --user` under `user@1000.service` can create `.../nginx.service`).
/// Taking the deepest component would let such a user impersonate a system
/// unit.
pub fn systemd_unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .split('/')
        .find(|c| {
            [".service", ".scope"]
                .iter()
                .any(|s| c.len() > s.len() && c.ends_with(s))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    //! Parser tests on literal /proc contents, including hostile comm names.

    use super::*;

    fn stat_line(comm: &str, state: char, start: u64) -> String {
        // Fields 4..=21 are filler, 22 is the start time, then more filler.
        let mut s = format!("4242 ({comm}) {state}");
        for i in 4..=21 {
            s.push_str(&format!(" {i}"));
        }
        s.push_str(&format!(" {start}"));
        for i in 23..=52 {
            s.push_str(&format!(" {i}"));
        }
        s.push('\n');
        s
    }

    #[test]
    fn stat_plain() {
        let st = parse_stat(&stat_line("sleep", 'S', 987654)).unwrap();
        assert_eq!(st.comm, "sleep");
        assert_eq!(st.state, 'S');
        assert_eq!(st.start_time, 987654);
        assert!(!st.is_dead());
    }

    #[test]
    fn stat_hostile_comm() {
        // A comm that tries to shift the fields: spaces, ')' and digits.
        let comm = "a) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 (x";
        let st = parse_stat(&stat_line(comm, 'Z', 42)).unwrap();
        assert_eq!(st.comm, comm);
        assert_eq!(st.state, 'Z');
        assert_eq!(st.start_time, 42);
        assert!(st.is_dead());
    }

    #[test]
    fn stat_real_self() {
        let text = fs::read_to_string("/proc/self/stat").unwrap();
        let st = parse_stat(&text).unwrap();
        assert!(st.start_time > 0);
    }

    #[test]
    fn stat_truncated() {
        assert!(parse_stat("1 (x) S 1 2 3")
            .unwrap_err()
            .contains("field 22"));
        assert!(parse_stat("1 x S").is_err());
        assert!(
            parse_stat("1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 nope")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn status_effective_ids() {
        let text = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\n\
                    Groups:\t4 24 27 \nNgid:\t0\n";
        let st = parse_status(text).unwrap();
        assert_eq!(st.euid, 1001);
        assert_eq!(st.egid, 2001);
        assert_eq!(st.groups, vec![4, 24, 27]);
    }

    #[test]
    fn status_empty_groups_and_missing_lines() {
        let st = parse_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(st.groups.is_empty());
        assert!(parse_status("Gid:\t0\t0\t0\t0\nGroups:\n")
            .unwrap_err()
            .contains("Uid"));
        assert!(parse_status("Uid:\t0\nGid:\t0\t0\nGroups:\n").is_err());
    }

    #[test]
    fn cgroup_v2_line() {
        let text = "12:pids:/x\n1:name=systemd:/y\n0::/system.slice/nginx.service\n";
        assert_eq!(
            parse_cgroup_v2(text).as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(parse_cgroup_v2("3:cpu:/a\n"), None);
        assert_eq!(parse_cgroup_v2("0::/\n").as_deref(), Some("/"));
    }

    #[test]
    fn unit_from_cgroup() {
        let cases = [
            ("/system.slice/nginx.service", Some("nginx.service")),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            // Delegated subtree: the user-chosen "nginx.service" below the
            // user manager must not be taken for the system unit.
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service",
                Some("user@1000.service"),
            ),
            (
                "/system.slice/docker.service/payload",
                Some("docker.service"),
            ),
            ("/system.slice", None),
            ("/", None),
            ("/x/.service", None),
            ("/init.scope", Some("init.scope")),
        ];
        for (cg, want) in cases {
            assert_eq!(systemd_unit_of(cg).as_deref(), want, "{cg}");
        }
    }
}
