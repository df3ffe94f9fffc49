//! SHA-256 of peer executables, cached by file identity.
//!
//! Hashing is done through `/proc/PID/exe`, which the kernel resolves to the
//! inode the process was actually started from, even if the path has since
//! been deleted or replaced. The cache key is (device, inode, size, mtime ns,
//! ctime ns) taken from `fstat` of the opened file, so any change to the file
//! produces a new key. The cache is bounded (oldest entries are evicted
//! first), thread-safe, and never holds its lock while reading a file.
//! Executables over a size limit are not hashed at all: the caller gets a
//! [`HashSkip`] reason to log instead of a stall.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use aws_lc_rs::digest;

/// Size of the read buffer used while hashing.
const READ_BUF: usize = 64 * 1024;

/// Why an executable's SHA-256 was not computed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashSkip {
    /// The file is larger than the configured limit.
    TooLarge {
        /// The file's size in bytes.
        size: u64,
        /// The configured limit in bytes.
        limit: u64,
    },
    /// The executable could not be opened or read (kernel thread, permission
    /// denied, process gone).
    Unreadable {
        /// The I/O error, as text.
        detail: String,
    },
    /// The file's size, times or inode changed while it was being read.
    ChangedWhileHashing,
}

impl fmt::Display for HashSkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashSkip::TooLarge { size, limit } => write!(
                f,
                "executable not hashed: {size} bytes is over the {limit}-byte limit \
                 (exe_sha256 selectors cannot match it; raise the hash size limit)"
            ),
            HashSkip::Unreadable { detail } => {
                write!(f, "executable not hashed: cannot read it: {detail}")
            }
            HashSkip::ChangedWhileHashing => write!(
                f,
                "executable not hashed: the file changed while it was being read"
            ),
        }
    }
}

/// Identity of one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<FileKey, String>,
    /// Insertion order, oldest first.
    order: VecDeque<FileKey>,
}

/// A bounded, thread-safe cache of executable SHA-256 digests. Share one
/// instance (e.g. in an `Arc`) across all connections.
#[derive(Debug)]
pub struct ExeHashCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_file_size: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Default for ExeHashCache {
    fn default() -> Self {
        Self::new()
    }
}

impl ExeHashCache {
    /// Default number of cached digests.
    pub const DEFAULT_MAX_ENTRIES: usize = 1024;
    /// Default size limit for hashing: 512 MiB.
    pub const DEFAULT_MAX_FILE_SIZE: u64 = 512 * 1024 * 1024;

    /// A cache with the default limits.
    pub fn new() -> Self {
        Self::with_limits(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_FILE_SIZE)
    }

    /// A cache holding at most `max_entries` digests (at least one) that
    /// refuses to hash files larger than `max_file_size` bytes.
    pub fn with_limits(max_entries: usize, max_file_size: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_entries: max_entries.max(1),
            max_file_size,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The configured size limit in bytes.
    pub fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    /// Number of lookups answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Number of lookups that had to read the file (including skipped ones).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Number of cached digests.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the cache holds no digest.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map is never left half-updated, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached hash of the file at `path` if it is unchanged since it
    /// was hashed (one stat, never a read); `None` otherwise.
    pub fn cached_sha256_of(&self, path: &Path) -> Option<String> {
        let seen = FileKey::of(&std::fs::metadata(path).ok()?);
        let hex = self.lock().map.get(&seen).cloned()?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(hex)
    }

    /// Lower-case hex SHA-256 of the file at `path` (normally
    /// `/proc/PID/exe`), from the cache when the file is unchanged.
    pub fn sha256_of(&self, path: &Path) -> Result<String, HashSkip> {
        let unreadable = |e: io::Error| HashSkip::Unreadable {
            detail: format!("{}: {e}", path.display()),
        };
        // A hit costs one stat (it follows /proc/PID/exe to the running
        // file, deleted or not); only a miss opens the file, and then keys
        // the result by what it opened.
        let seen = FileKey::of(&std::fs::metadata(path).map_err(unreadable)?);
        if let Some(hex) = self.lock().map.get(&seen) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hex.clone());
        }
        let mut file = File::open(path).map_err(unreadable)?;
        let before = FileKey::of(&file.metadata().map_err(unreadable)?);
        if let Some(hex) = self.lock().map.get(&before) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hex.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);

        if before.size > self.max_file_size {
            return Err(HashSkip::TooLarge {
                size: before.size,
                limit: self.max_file_size,
            });
        }

        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; READ_BUF];
        let mut total: u64 = 0;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unreadable(e)),
            };
            total = total.saturating_add(n as u64);
            if total > self.max_file_size {
                // The file grew past the limit while we read it.
                return Err(HashSkip::TooLarge {
                    size: total,
                    limit: self.max_file_size,
                });
            }
            if let Some(chunk) = buf.get(..n) {
                ctx.update(chunk);
            }
        }
        let after = FileKey::of(&file.metadata().map_err(unreadable)?);
        if after != before || total != before.size {
            return Err(HashSkip::ChangedWhileHashing);
        }
        let hex = hex::encode(ctx.finish().as_ref());

        let mut inner = self.lock();
        if inner.map.insert(before, hex.clone()).is_none() {
            inner.order.push_back(before);
            while inner.order.len() > self.max_entries {
                if let Some(old) = inner.order.pop_front() {
                    inner.map.remove(&old);
                }
            }
        }
        Ok(hex)
    }
}

#[cfg(test)]
mod tests {
    //! Cache behaviour on ordinary files: hits, invalidation, eviction, limit.

    use super::*;
    use std::io::Write;

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, data).as_ref())
    }

    fn file_with(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(data).unwrap();
        p
    }

    #[test]
    fn known_vector_and_hit() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), "abc", b"abc");
        let cache = ExeHashCache::new();
        let h = cache.sha256_of(&p).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!((cache.hits(), cache.misses()), (0, 1));
        assert_eq!(cache.sha256_of(&p).unwrap(), h);
        assert_eq!((cache.hits(), cache.misses()), (1, 1));
    }

    #[test]
    fn cached_lookup_never_reads_and_misses_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), "f", b"one");
        let cache = ExeHashCache::new();
        assert_eq!(cache.cached_sha256_of(&p), None, "never hashed");
        assert_eq!(cache.misses(), 0, "a cached lookup does not hash");
        let h = cache.sha256_of(&p).unwrap();
        assert_eq!(cache.cached_sha256_of(&p), Some(h));
        std::thread::sleep(std::time::Duration::from_millis(20));
        file_with(dir.path(), "f", b"two");
        assert_eq!(cache.cached_sha256_of(&p), None, "rewritten: needs a read");
        assert_eq!(cache.cached_sha256_of(&dir.path().join("gone")), None);
    }

    #[test]
    fn multi_buffer_file() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(READ_BUF * 3 + 17)).map(|i| (i % 251) as u8).collect();
        let p = file_with(dir.path(), "big", &data);
        let cache = ExeHashCache::new();
        assert_eq!(cache.sha256_of(&p).unwrap(), sha256_hex(&data));
    }

    #[test]
    fn rewritten_file_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), "f", b"one");
        let cache = ExeHashCache::new();
        assert_eq!(cache.sha256_of(&p).unwrap(), sha256_hex(b"one"));
        // Same inode, same size, new content: ctime/mtime change the key.
        std::thread::sleep(std::time::Duration::from_millis(20));
        file_with(dir.path(), "f", b"two");
        assert_eq!(cache.sha256_of(&p).unwrap(), sha256_hex(b"two"));
        assert_eq!(cache.hits(), 0);
    }

    #[test]
    fn size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), "f", &[7u8; 100]);
        let cache = ExeHashCache::with_limits(8, 99);
        assert_eq!(
            cache.sha256_of(&p),
            Err(HashSkip::TooLarge {
                size: 100,
                limit: 99
            })
        );
        assert!(cache.is_empty());
        let ok = ExeHashCache::with_limits(8, 100);
        assert!(ok.sha256_of(&p).is_ok());
    }

    #[test]
    fn size_limit_checked_before_reading() {
        // A sparse 8 GiB file: refused from its size alone, without reading.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("huge");
        File::create(&p).unwrap().set_len(8 << 30).unwrap();
        let cache = ExeHashCache::new();
        let started = std::time::Instant::now();
        assert_eq!(
            cache.sha256_of(&p),
            Err(HashSkip::TooLarge {
                size: 8 << 30,
                limit: ExeHashCache::DEFAULT_MAX_FILE_SIZE
            })
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let msg = cache.sha256_of(&p).unwrap_err().to_string();
        assert!(
            msg.contains("8589934592 bytes is over the 536870912-byte limit"),
            "{msg}"
        );
    }

    #[test]
    fn bounded_evicts_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ExeHashCache::with_limits(2, 1024);
        let a = file_with(dir.path(), "a", b"a");
        let b = file_with(dir.path(), "b", b"b");
        let c = file_with(dir.path(), "c", b"c");
        for p in [&a, &b, &c] {
            cache.sha256_of(p).unwrap();
        }
        assert_eq!(cache.len(), 2);
        cache.sha256_of(&c).unwrap();
        cache.sha256_of(&b).unwrap();
        assert_eq!(cache.hits(), 2);
        cache.sha256_of(&a).unwrap(); // evicted: a miss
        assert_eq!(cache.hits(), 2);
        assert_eq!(cache.misses(), 4);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn missing_file_is_unreadable() {
        let cache = ExeHashCache::new();
        let err = cache
            .sha256_of(Path::new("/nonexistent/warden-test"))
            .unwrap_err();
        assert!(matches!(err, HashSkip::Unreadable { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/warden-test"));
    }

    #[test]
    fn shared_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), "f", b"shared");
        let cache = std::sync::Arc::new(ExeHashCache::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (cache, p) = (cache.clone(), p.clone());
                std::thread::spawn(move || cache.sha256_of(&p).unwrap())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), sha256_hex(b"shared"));
        }
        assert_eq!(cache.hits() + cache.misses(), 4);
        assert_eq!(cache.len(), 1);
    }
}
