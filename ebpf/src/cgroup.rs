//! cgroup v2: where it is mounted and the ids the kernel programs see.
//!
//! A cgroup's id (`bpf_get_current_cgroup_id`) is the inode number of its
//! directory in the cgroup2 filesystem.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use warden_identity::attest::ProcFs;

/// The cgroup2 mount point, from `/proc/self/mountinfo` (e.g. `/sys/fs/cgroup`
/// on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_point_of_type(&text, "cgroup2")
}

/// The first mount point whose filesystem type is `fstype` in a mountinfo
/// text. Fields: `id parent major:minor root mount-point options… - fstype …`.
pub(crate) fn mount_point_of_type(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let ty = after.split_ascii_whitespace().next()?;
        if ty != fstype {
            return None;
        }
        let mount_point = before.split_ascii_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(field.get(i + 1..i + 4).unwrap_or(""), 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The id of the cgroup at `path` (a directory in the cgroup2 mount).
pub fn cgroup_id_of_path(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The id of the cgroup v2 that process `pid` belongs to.
pub fn cgroup_id_of_pid(pid: u32) -> io::Result<u64> {
    let mount = cgroup2_mount()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem mounted"))?;
    let rel = ProcFs::default()
        .cgroup_path(pid)
        .map_err(|e| io::Error::other(e.to_string()))?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} has no cgroup v2 path"),
            )
        })?;
    cgroup_id_of_path(&mount.join(rel.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            mount_point_of_type(text, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point_of_type(text, "bpf"), None);
    }

    #[test]
    fn unescapes_octal_spaces() {
        let text = "26 25 0:23 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_point_of_type(text, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert_eq!(mount_point_of_type("garbage\n - \n", "cgroup2"), None);
    }

    #[test]
    fn own_cgroup_id_is_a_directory_inode() {
        if cgroup2_mount().is_none() {
            eprintln!("skipping: no cgroup2 mount");
            return;
        }
        let id = cgroup_id_of_pid(std::process::id()).expect("own cgroup id");
        assert!(id > 0);
    }
}
