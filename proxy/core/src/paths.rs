//! Where warden keeps its files, and the checks that keep them private.
//!
//! Data dir layout (all created by `warden init`, dir mode 0700):
//! - `store.db` (+ `-wal`, `-shm`): the secret store, mode 0600;
//! - `master.key`: the generated key-encryption key when the KEK source is
//!   `file`, mode 0600;
//! - `audit.log`, `audit.log.head`: the hash-chained audit log and its anchor;
//! - `warden.lock`: held (flock) by whichever process owns the store — the
//!   daemon for its lifetime, or a CLI verb working offline.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const STORE_FILE: &str = "store.db";
pub const KEY_FILE: &str = "master.key";
pub const AUDIT_FILE: &str = "audit.log";
pub const LOCK_FILE: &str = "warden.lock";

pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

pub fn is_root() -> bool {
    euid() == 0
}

/// Default data dir: `/var/lib/warden` as root, the XDG data dir otherwise.
pub fn default_data_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/warden");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("warden");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/warden"),
        None => PathBuf::from("/var/lib/warden"),
    }
}

/// Default admin socket: `/run/warden/admin.sock` as root,
/// `$XDG_RUNTIME_DIR/warden/admin.sock` otherwise, else inside the data dir.
pub fn default_admin_socket(data_dir: &Path) -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/warden/admin.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(r) => PathBuf::from(r).join("warden/admin.sock"),
        None => data_dir.join("admin.sock"),
    }
}

/// Refuses a directory that group or others can access, or that another user owns.
pub fn check_private_dir(path: &Path) -> Result<()> {
    let md = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::usage(format!(
                "data dir {} does not exist: run `warden init` first (or pass --data-dir)",
                path.display()
            ))
        } else {
            Error::io("cannot read data dir", path, &e)
        }
    })?;
    if !md.is_dir() {
        return Err(Error::usage(format!(
            "data dir {} is not a directory",
            path.display()
        )));
    }
    check_mode_and_owner(path, &md, "data dir", "700")
}

/// Refuses a key file that group or others can read, or that another user owns.
pub fn check_private_file(path: &Path) -> Result<()> {
    let md = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, &e))?;
    check_mode_and_owner(path, &md, "key file", "600")
}

fn check_mode_and_owner(path: &Path, md: &std::fs::Metadata, what: &str, mode: &str) -> Result<()> {
    let perm = md.permissions().mode() & 0o777;
    if perm & 0o077 != 0 {
        return Err(Error::denied(format!(
            "refusing to use {what} {}: it is accessible by group/others (mode {perm:04o}); fix: chmod {mode} {}",
            path.display(),
            path.display()
        )));
    }
    let me = euid();
    if md.uid() != me {
        return Err(Error::denied(format!(
            "refusing to use {what} {}: it is owned by uid {} but warden runs as uid {me}; fix: chown {me} {} (or run warden as uid {})",
            path.display(),
            md.uid(),
            path.display(),
            md.uid()
        )));
    }
    Ok(())
}

/// Creates `path` as a directory with mode 0700 (parents as needed).
pub fn create_private_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io("cannot create data dir", path, &e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("cannot chmod data dir", path, &e))
}

/// Writes a new file with mode 0600 (fails if it exists) and fsyncs it.
pub fn write_private_file_new(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("cannot create", path, &e))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("cannot write", path, &e))
}

/// An exclusive lock on the data dir, released on drop.
pub struct DataDirLock {
    _file: File,
}

/// Takes the data dir lock without waiting. On contention the error names the
/// holder's pid (written into the lock file by whoever holds it).
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io("cannot open lock file", &path, &e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::unavailable(format!(
                "data dir {} is in use by another warden process{}: stop it or talk to it through its admin socket",
                data_dir.display(),
                if holder.is_empty() { String::new() } else { format!(" (pid {holder})") }
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("cannot lock", &path, &e)),
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(DataDirLock { _file: file })
}

/// Name of a user id from /etc/passwd, for human-readable audit records.
///
/// Every route session's audit record names its user, so the parsed file is
/// kept and re-read only when its inode, size or mtime changes.
pub fn user_name(uid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    type Key = (u64, u64, i64, i64);
    type Parsed = (Key, Instant, Vec<(u32, String)>);
    static CACHE: Mutex<Option<Parsed>> = Mutex::new(None);
    const PASSWD: &str = "/etc/passwd";
    // Audit records name users: /etc/passwd is looked at (stat) at most
    // once a second, and parsed again only when it changed.
    const RECHECK: Duration = Duration::from_secs(1);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let fresh = cache
        .as_ref()
        .is_some_and(|(_, checked, _)| checked.elapsed() < RECHECK);
    if !fresh {
        let meta = std::fs::metadata(PASSWD).ok()?;
        let key = (meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
        match cache.as_mut() {
            Some((k, checked, _)) if *k == key => *checked = Instant::now(),
            _ => {
                let passwd = std::fs::read_to_string(PASSWD).ok()?;
                let users = passwd
                    .lines()
                    .filter_map(|l| {
                        let mut it = l.split(':');
                        let name = it.next()?;
                        let _ = it.next();
                        Some((it.next()?.parse::<u32>().ok()?, name.to_string()))
                    })
                    .collect();
                *cache = Some((key, Instant::now(), users));
            }
        }
    }
    let (_, _, users) = cache.as_ref()?;
    // The first entry for a uid wins, as getpwuid does.
    users
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, n)| n.clone())
}

/// Gid of a group name from /etc/group.
pub fn group_gid(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut it = l.split(':');
        (it.next()? == name).then_some(())?;
        let _ = it.next();
        it.next()?.parse().ok()
    })
}

/// Supplementary group ids of a process, from /proc/PID/status.
pub fn process_groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_names_come_from_passwd_and_stay_consistent() {
        // uid 0 is root on every Debian system this runs on.
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
        assert_eq!(super::user_name(0).as_deref(), Some("root"));
        assert_eq!(super::user_name(4_000_000_000), None);
    }
}
