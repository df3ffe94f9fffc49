//! `kind = "file"`: JSON lines appended to a file (mode 0600), rotated by
//! size: when the next batch would take the file past `max_bytes`, `PATH.N`
//! is dropped, `PATH.1` … `PATH.N-1` move up one and `PATH` becomes
//! `PATH.1`; writing goes on in a new `PATH`. A file removed or renamed by
//! something else (logrotate) is noticed at the next batch and reopened.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Failure, Item, Output};
use crate::config::{ExportSink, DEFAULT_FILE_KEEP, DEFAULT_FILE_MAX_BYTES};
use crate::error::{Error, Result};

pub(crate) struct FileOutput {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    open: Option<(File, u64, u64)>,
}

impl FileOutput {
    pub(crate) fn new(s: &ExportSink) -> Result<FileOutput> {
        let path = s
            .path
            .clone()
            .ok_or_else(|| Error::usage("export: a file sink has no path"))?;
        let mut out = FileOutput {
            path,
            max_bytes: s.max_bytes.unwrap_or(DEFAULT_FILE_MAX_BYTES),
            keep: s.keep.unwrap_or(DEFAULT_FILE_KEEP).max(1),
            open: None,
        };
        // A path that cannot be opened is a start-up error, not a silent
        // stream of drops.
        out.reopen().map_err(|e| {
            Error::usage(format!(
                "export sink {}: cannot open {}: {e}; fix: create its directory, writable by warden, or change path",
                s.name(),
                out.path.display()
            ))
        })?;
        Ok(out)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)?;
        let meta = f.metadata()?;
        if meta.mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        self.open = Some((f, meta.len(), meta.ino()));
        Ok(())
    }

    /// Whether the path still names the open file.
    fn still_there(&self) -> bool {
        match (&self.open, std::fs::symlink_metadata(&self.path)) {
            (Some((_, _, ino)), Ok(m)) => m.ino() == *ino,
            _ => false,
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.open = None;
        let numbered = |n: u32| -> PathBuf {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        sync_parent(&self.path);
        self.reopen()
    }
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Output for FileOutput {
    fn deliver(&mut self, batch: &[Arc<Item>]) -> std::result::Result<usize, Failure> {
        let mut buf = Vec::with_capacity(batch.iter().map(|i| i.json.len() + 1).sum());
        for item in batch {
            buf.extend_from_slice(item.json.as_bytes());
            buf.push(b'\n');
        }
        let shown = self.path.display().to_string();
        if !self.still_there() {
            self.reopen()
                .map_err(|e| Failure::new(format!("cannot open {shown}: {e}")))?;
        }
        let size = self.open.as_ref().map_or(0, |(_, len, _)| *len);
        if self.max_bytes > 0 && size > 0 && size + buf.len() as u64 > self.max_bytes {
            self.rotate()
                .map_err(|e| Failure::new(format!("cannot rotate {shown}: {e}")))?;
        }
        let Some((f, len, _)) = self.open.as_mut() else {
            return Err(Failure::new(format!("{shown} is not open")));
        };
        match f.write_all(&buf) {
            Ok(()) => {
                *len += buf.len() as u64;
                Ok(batch.len())
            }
            Err(e) => {
                self.open = None;
                Err(Failure::new(format!("cannot write {shown}: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ExportKind, ExportStream};

    fn sink(path: &Path) -> ExportSink {
        ExportSink {
            name: None,
            kind: ExportKind::File,
            carries: None,
            path: Some(path.to_path_buf()),
            max_bytes: Some(4096),
            keep: Some(2),
            socket: None,
            address: None,
            facility: None,
            endpoint: None,
            headers: Default::default(),
            timeout: None,
        }
    }

    #[test]
    fn lines_are_appended_private_and_rotated_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut out = FileOutput::new(&sink(&path)).unwrap();
        let item = Arc::new(Item {
            stream: ExportStream::Audit,
            json: format!("{{\"pad\":\"{}\"}}", "a".repeat(1000)).into(),
        });
        for _ in 0..20 {
            assert_eq!(out.deliver(&[item.clone(), item.clone()]).ok(), Some(2));
        }
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(meta.len() <= 4096);
        let rotated = |n: u32| dir.path().join(format!("x.jsonl.{n}"));
        assert!(rotated(1).exists() && rotated(2).exists());
        assert!(!rotated(3).exists(), "keep = 2");
        for p in [path.clone(), rotated(1)] {
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                assert_eq!(line, &*item.json);
            }
        }
        // Moved away by someone else: reopened at the path.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        assert_eq!(out.deliver(std::slice::from_ref(&item)).ok(), Some(1));
        assert!(path.exists());
    }
}
