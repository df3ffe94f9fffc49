//! Finding the local process at the other end of an accepted TCP connection.
//!
//! [`ProcNetResolver`] is the procfs fallback (a faster resolver, e.g. one fed
//! by eBPF, can implement the same [`PeerResolver`] trait). For a connection
//! our listener accepted on `local` from `peer`, the client's socket is the
//! one whose local address is `peer` and whose remote address is `local`. It
//! is looked up in `/proc/net/tcp` and `/proc/net/tcp6` (the tables of the
//! network namespace warden runs in) to get its inode, then every
//! `/proc/PID/fd/*` is searched for a link to `socket:[INODE]`.
//!
//! When several processes hold the socket (after a `fork`, or when it was
//! passed over a unix socket), the oldest of them (earliest start time; the
//! lowest pid among equals — pid order alone is meaningless once pids wrap)
//! is returned if they all run the same program (executable and uid);
//! otherwise the connection is
//! refused ([`AttestError::SharedConnection`]): which of them speaks cannot
//! be known. Use [`ProcNetResolver::holders`] to see all of them.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use super::error::AttestError;
use super::procfs::ProcFs;

/// What the kernel recorded about the process that opened a TCP connection,
/// at connect time (an eBPF resolver's attribution entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPeer {
    /// The connecting process (thread group id).
    pub tgid: u32,
    /// Its real uid and gid at connect time.
    pub uid: u32,
    pub gid: u32,
    /// Its cgroup v2 id at connect time.
    pub cgroup_id: u64,
    /// CLOCK_BOOTTIME ns of the connect.
    pub connect_ns: u64,
    /// The kernel's count of execs and exits in the tgid's bucket, read
    /// after this entry: a kept attestation stamped with the same count
    /// (read before its facts) still describes the process — it neither
    /// exec'd nor exited since.
    pub generation: u64,
}

/// A process's executable and real uid, as far as /proc tells.
type Program = (Option<PathBuf>, Option<u32>);

/// Maps an accepted TCP connection to the pid of the local client process.
pub trait PeerResolver: Send + Sync {
    /// The pid of the process holding the client end of the connection that
    /// was accepted on `local` from `peer`.
    fn resolve_tcp(&self, local: SocketAddr, peer: SocketAddr) -> Result<u32, AttestError>;
    /// [`Self::resolve_tcp`] when the answer is at hand without blocking
    /// work (a kernel map lookup); `None`: call `resolve_tcp`.
    fn resolve_tcp_cached(&self, _local: SocketAddr, _peer: SocketAddr) -> Option<u32> {
        None
    }
    /// The kernel's record of the connection when it has a trustworthy one
    /// (the process has not exec'd since it connected); `None`: use
    /// [`Self::resolve_tcp`].
    fn kernel_peer(&self, _local: SocketAddr, _peer: SocketAddr) -> Option<KernelPeer> {
        None
    }
    /// [`Self::kernel_peer`] without the exec check: for a caller that
    /// compares [`KernelPeer::generation`] with one it kept.
    fn kernel_record(&self, _local: SocketAddr, _peer: SocketAddr) -> Option<KernelPeer> {
        None
    }
    /// The kernel's change count of `tgid`'s bucket now (see
    /// [`KernelPeer::generation`]); `None` without a kernel monitor.
    fn change_count(&self, _tgid: u32) -> Option<u64> {
        None
    }
    /// Whether process `tgid` has run the same program since `since_ns`
    /// (CLOCK_BOOTTIME): `Some(true)` when the kernel saw no exec (and lost
    /// no record of one) since then; `None` when it cannot tell.
    fn unchanged_since(&self, _tgid: u32, _since_ns: u64) -> Option<bool> {
        None
    }
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
}

/// The procfs resolver: `/proc/net/tcp{,6}` plus a scan of `/proc/*/fd`.
#[derive(Debug, Clone, Default)]
pub struct ProcNetResolver {
    proc: ProcFs,
}

impl ProcNetResolver {
    /// A resolver reading `/proc`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A resolver reading another procfs tree (tests).
    pub fn with_procfs(proc: ProcFs) -> Self {
        Self { proc }
    }

    /// Inodes of the sockets whose local address is `peer` and remote
    /// address is `local` (normally exactly one). IPv4-mapped IPv6 addresses
    /// compare equal to their IPv4 form.
    pub fn client_socket_inodes(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Vec<u64>, AttestError> {
        // The real /proc: ask the kernel for exactly this socket first.
        if self.proc.root() == std::path::Path::new("/proc") {
            if let Some(inode) = super::sock_diag::tcp_socket_inode(peer, local) {
                return Ok(vec![inode]);
            }
        }
        let (want_local, want_remote) = (canonical(peer), canonical(local));
        let mut inodes = Vec::new();
        for table in ["tcp", "tcp6"] {
            let path = self.proc.root().join("net").join(table);
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                // No tcp6 table when IPv6 is disabled.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(AttestError::Io { path, source: e }),
            };
            for entry in parse_tcp_table(&text).map_err(|detail| AttestError::Parse {
                path: path.clone(),
                detail,
            })? {
                if entry.inode != 0
                    && canonical(entry.local) == want_local
                    && canonical(entry.remote) == want_remote
                    && !inodes.contains(&entry.inode)
                {
                    inodes.push(entry.inode);
                }
            }
        }
        Ok(inodes)
    }

    /// Every pid holding the client socket of the connection, ascending.
    pub fn holders(&self, local: SocketAddr, peer: SocketAddr) -> Result<Vec<u32>, AttestError> {
        let inodes = self.client_socket_inodes(local, peer)?;
        let mut out = Vec::new();
        for pid in self.pids()? {
            if self.holds_any(pid, &inodes) {
                out.push(pid);
            }
        }
        Ok(out)
    }

    /// All numeric entries of the procfs root, ascending.
    fn pids(&self) -> Result<Vec<u32>, AttestError> {
        let root = self.proc.root();
        let dir = fs::read_dir(root).map_err(|e| AttestError::Io {
            path: root.to_path_buf(),
            source: e,
        })?;
        let mut pids: Vec<u32> = dir
            .filter_map(|ent| ent.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Whether `pid` has an fd linked to one of the socket `inodes`. Any
    /// error (process gone, permission denied) counts as "no".
    fn holds_any(&self, pid: u32, inodes: &[u64]) -> bool {
        if inodes.is_empty() {
            return false;
        }
        let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
        let Ok(fds) = fs::read_dir(self.proc.pid_file(pid, "fd")) else {
            return false;
        };
        fds.filter_map(Result::ok).any(|fd| {
            fs::read_link(fd.path())
                .ok()
                .and_then(|t| t.to_str().map(|s| wanted.iter().any(|w| w == s)))
                .unwrap_or(false)
        })
    }

    /// The program a process runs: its executable and real uid (`None`
    /// where unreadable; two unreadable holders compare equal only to
    /// each other).
    fn program_of(&self, pid: u32) -> Program {
        let exe = fs::read_link(self.proc.pid_file(pid, "exe")).ok();
        let uid = self
            .proc
            .read_pid_file(pid, "status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            });
        (exe, uid)
    }

    fn not_found(&self, local: SocketAddr, peer: SocketAddr, detail: String) -> AttestError {
        AttestError::PeerNotFound {
            local,
            peer,
            detail,
        }
    }
}

impl PeerResolver for ProcNetResolver {
    fn resolve_tcp(&self, local: SocketAddr, peer: SocketAddr) -> Result<u32, AttestError> {
        let inodes = self.client_socket_inodes(local, peer)?;
        if inodes.is_empty() {
            let net = display(&self.proc.root().join("net"));
            return Err(self.not_found(
                local,
                peer,
                format!(
                    "no socket from {peer} to {local} in {net}/tcp or {net}/tcp6; the client \
                     closed the connection, is not on this host, or is in another network \
                     namespace"
                ),
            ));
        }
        let holders: Vec<u32> = self
            .pids()?
            .into_iter()
            .filter(|pid| self.holds_any(*pid, &inodes))
            .collect();
        if !holders.is_empty() {
            // A connection inherited by or passed to another program (fork
            // then exec, SCM_RIGHTS): unless every holder is the same
            // program as the same user, the one speaking is unknown.
            // Read each holder's program, then keep only those that still
            // hold the socket: a child between fork and exec holds it only
            // until exec closes its close-on-exec descriptors.
            let (holders, ids): (Vec<u32>, Vec<Program>) = holders
                .iter()
                .map(|p| (*p, self.program_of(*p)))
                .filter(|(p, _)| self.holds_any(*p, &inodes))
                .unzip();
            let Some(first) = holders.first() else {
                return Err(self.not_found(
                    local,
                    peer,
                    "the processes that held the socket let go of it while warden looked".into(),
                ));
            };
            if ids.iter().any(|id| *id != ids[0]) {
                return Err(AttestError::SharedConnection {
                    holders: holders
                        .iter()
                        .zip(&ids)
                        .map(|(pid, (exe, uid))| {
                            let exe = exe
                                .as_ref()
                                .map(|e| e.display().to_string())
                                .unwrap_or_else(|| "unknown executable".into());
                            let uid = uid.map(|u| u.to_string()).unwrap_or_else(|| "?".into());
                            format!("{pid} ({exe}, uid {uid})")
                        })
                        .collect(),
                });
            }
            // The same program everywhere: the oldest holder (the one that
            // opened the socket or forked the others; a fork child caught
            // between fork and exec is younger).
            let started = |p: u32| self.proc.start_time(p).unwrap_or(u64::MAX);
            let oldest = holders
                .iter()
                .copied()
                .min_by_key(|p| (started(*p), *p))
                .unwrap_or(*first);
            return Ok(oldest);
        }
        let list: Vec<String> = inodes.iter().map(u64::to_string).collect();
        Err(self.not_found(
            local,
            peer,
            format!(
                "socket inode {} is held by no process whose {}/PID/fd warden can read; the \
                 client exited, or warden lacks permission (run as root with CAP_SYS_PTRACE, \
                 and without hidepid on {})",
                list.join(","),
                display(self.proc.root()),
                display(self.proc.root())
            ),
        ))
    }

    fn name(&self) -> &'static str {
        "procfs"
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// IPv4-mapped IPv6 addresses become IPv4; scope and flow info are dropped.
fn canonical(a: SocketAddr) -> (IpAddr, u16) {
    let ip = match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    (ip, a.port())
}

/// One row of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u64,
}

/// Parses a `/proc/net/tcp` or `/proc/net/tcp6` table (header line first).
/// Columns: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
pub(crate) fn parse_tcp_table(text: &str) -> Result<Vec<TcpEntry>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split_ascii_whitespace().collect();
        let (Some(local), Some(remote), Some(inode)) = (cols.get(1), cols.get(2), cols.get(9))
        else {
            return Err(format!("line {}: fewer than 10 columns: {line:?}", n + 1));
        };
        let at = |what: &str, e: String| format!("line {}: {what}: {e}", n + 1);
        out.push(TcpEntry {
            local: parse_hex_sockaddr(local).map_err(|e| at("local address", e))?,
            remote: parse_hex_sockaddr(remote).map_err(|e| at("remote address", e))?,
            inode: inode
                .parse()
                .map_err(|_| at("inode", format!("{inode:?} is not a number")))?,
        });
    }
    Ok(out)
}

/// Parses `ADDR:PORT` as printed by the kernel. The port is plain hex. The
/// address is 8 (IPv4) or 32 (IPv6) hex digits: each 32-bit word of the
/// network-order address printed as a host-endian integer (`%08X`), so on a
/// little-endian machine every group of 4 bytes appears reversed while the
/// words keep their order. `u32::to_ne_bytes` undoes this on any host.
pub(crate) fn parse_hex_sockaddr(s: &str) -> Result<SocketAddr, String> {
    let (addr, port) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} has no ':'"))?;
    let port = u16::from_str_radix(port, 16).map_err(|_| format!("bad port in {s:?}"))?;
    let word = |i: usize| -> Result<[u8; 4], String> {
        let hex = addr
            .get(i * 8..i * 8 + 8)
            .ok_or_else(|| format!("short address in {s:?}"))?;
        u32::from_str_radix(hex, 16)
            .map(u32::to_ne_bytes)
            .map_err(|_| format!("bad hex in {s:?}"))
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        n => return Err(format!("address in {s:?} has {n} hex digits, not 8 or 32")),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    //! Parsing of kernel tables and resolution on a fake /proc tree.

    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn hex_addresses() {
        // Literal kernel output from a little-endian machine.
        if cfg!(target_endian = "little") {
            let cases = [
                ("0100007F:1F90", "127.0.0.1:8080"),
                ("00000000:0016", "0.0.0.0:22"),
                ("0101A8C0:01BB", "192.168.1.1:443"),
                ("00000000000000000000000001000000:0050", "[::1]:80"),
                (
                    "0000000000000000FFFF00000100007F:0050",
                    "[::ffff:127.0.0.1]:80",
                ),
                (
                    "B80D0120000000000000000001000000:1F90",
                    "[2001:db8::1]:8080",
                ),
            ];
            for (hex, want) in cases {
                let got = parse_hex_sockaddr(hex).unwrap();
                assert_eq!(got, want.parse::<SocketAddr>().unwrap(), "{hex}");
            }
        }
        for bad in [
            "",
            "0100007F",
            "0100007:1F90",
            "0100007F:XYZ",
            "0100007G:0001",
        ] {
            assert!(parse_hex_sockaddr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canonical_maps_v4_in_v6() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:5".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(canonical(a), canonical(b));
        let c: SocketAddr = "[::1]:5".parse().unwrap();
        assert_ne!(canonical(c), canonical(b));
    }

    #[test]
    fn table_parse_errors_name_line() {
        let text = "  sl  local_address rem_address   st\n   0: 0100007F:1F90\n";
        assert!(parse_tcp_table(text).unwrap_err().contains("line 2"));
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn row(local: &str, remote: &str, inode: u64) -> String {
        format!(
            "   0: {local} {remote} 01 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 20 4 30 10 -1\n"
        )
    }

    fn fake_proc(tcp: &str, tcp6: &str, fds: &[(u32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net");
        fs::create_dir_all(&net).unwrap();
        fs::write(net.join("tcp"), format!("{HEADER}{tcp}")).unwrap();
        fs::write(net.join("tcp6"), format!("{HEADER}{tcp6}")).unwrap();
        for (i, (pid, target)) in fds.iter().enumerate() {
            let fd = dir.path().join(pid.to_string()).join("fd");
            fs::create_dir_all(&fd).unwrap();
            symlink(target, fd.join(i.to_string())).unwrap();
        }
        // A process whose fd directory cannot be listed (not a directory).
        fs::create_dir_all(dir.path().join("5")).unwrap();
        fs::write(dir.path().join("5").join("fd"), "").unwrap();
        dir
    }

    fn v4_tables_only_on_little_endian() -> bool {
        cfg!(target_endian = "little")
    }

    #[test]
    fn fake_tree_lowest_pid_wins() {
        if !v4_tables_only_on_little_endian() {
            return;
        }
        // Our accepted socket (inode 111) and the client's (inode 222), held by
        // a parent (300) and a forked child (40000); unrelated 900 holds 333.
        let tcp = row("0100007F:1F90", "0100007F:C350", 111)
            + &row("0100007F:C350", "0100007F:1F90", 222)
            + &row("0100007F:C351", "0100007F:1F90", 333);
        let dir = fake_proc(
            &tcp,
            "",
            &[
                (40000, "socket:[222]"),
                (300, "socket:[222]"),
                (300, "/dev/null"),
                (900, "socket:[333]"),
                (7, "socket:[111]"),
            ],
        );
        let r = ProcNetResolver::with_procfs(ProcFs::new(dir.path()));
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(r.client_socket_inodes(local, peer).unwrap(), vec![222]);
        assert_eq!(r.resolve_tcp(local, peer).unwrap(), 300);
        assert_eq!(r.holders(local, peer).unwrap(), vec![300, 40000]);
        // The same connection as seen by a dual-stack listener.
        let local6: SocketAddr = "[::ffff:127.0.0.1]:8080".parse().unwrap();
        let peer6: SocketAddr = "[::ffff:127.0.0.1]:50000".parse().unwrap();
        assert_eq!(r.resolve_tcp(local6, peer6).unwrap(), 300);
        assert_eq!(r.name(), "procfs");
    }

    #[test]
    fn fake_tree_holders_running_different_programs_are_refused() {
        if !v4_tables_only_on_little_endian() {
            return;
        }
        // The client's socket (inode 222) held by a parent that exec'd
        // psql and the forked python child that speaks on it.
        let tcp = row("0100007F:C350", "0100007F:1F90", 222);
        let dir = fake_proc(&tcp, "", &[(300, "socket:[222]"), (301, "socket:[222]")]);
        symlink("/usr/bin/psql", dir.path().join("300").join("exe")).unwrap();
        symlink("/usr/bin/python3", dir.path().join("301").join("exe")).unwrap();
        let r = ProcNetResolver::with_procfs(ProcFs::new(dir.path()));
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let err = r.resolve_tcp(local, peer).unwrap_err().to_string();
        assert!(
            err.contains("2 processes hold this connection")
                && err.contains("300 (/usr/bin/psql")
                && err.contains("301 (/usr/bin/python3"),
            "{err}"
        );
        // The same program in both (a plain fork): the lowest pid answers
        // when start times are unknown...
        fs::remove_file(dir.path().join("301").join("exe")).unwrap();
        symlink("/usr/bin/psql", dir.path().join("301").join("exe")).unwrap();
        assert_eq!(r.resolve_tcp(local, peer).unwrap(), 300);
        // ...and the oldest process when they are known: after pids wrap, a
        // child forked later can have the lower pid.
        let stat = |pid: u32, start: u64| {
            format!(
                "{pid} (psql) S 1 {pid} {pid} 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0"
            )
        };
        fs::write(dir.path().join("300").join("stat"), stat(300, 5000)).unwrap();
        fs::write(dir.path().join("301").join("stat"), stat(301, 1000)).unwrap();
        assert_eq!(r.resolve_tcp(local, peer).unwrap(), 301);
    }

    #[test]
    fn fake_tree_tcp6_and_mapped_client() {
        if !v4_tables_only_on_little_endian() {
            return;
        }
        // An AF_INET6 client connected to a v4 listener through a mapped address.
        let tcp6 = row(
            "0000000000000000FFFF00000100007F:C350",
            "0000000000000000FFFF00000100007F:1F90",
            444,
        ) + &row(
            "00000000000000000000000001000000:C351",
            "00000000000000000000000001000000:1F90",
            555,
        );
        let dir = fake_proc("", &tcp6, &[(10, "socket:[444]"), (11, "socket:[555]")]);
        let r = ProcNetResolver::with_procfs(ProcFs::new(dir.path()));
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            r.resolve_tcp(a("127.0.0.1:8080"), a("127.0.0.1:50000"))
                .unwrap(),
            10
        );
        assert_eq!(
            r.resolve_tcp(a("[::1]:8080"), a("[::1]:50001")).unwrap(),
            11
        );
    }

    #[test]
    fn fake_tree_not_found_messages() {
        let tcp = row("0100007F:C350", "0100007F:1F90", 222);
        let dir = fake_proc(&tcp, "", &[(300, "socket:[999]")]);
        let r = ProcNetResolver::with_procfs(ProcFs::new(dir.path()));
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let err = r
            .resolve_tcp(local, "127.0.0.1:1".parse().unwrap())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AttestError::PeerNotFound { .. }));
        assert!(
            msg.contains("127.0.0.1:1") && msg.contains("127.0.0.1:8080"),
            "{msg}"
        );
        assert!(msg.contains("no socket"), "{msg}");
        if v4_tables_only_on_little_endian() {
            let err = r
                .resolve_tcp(local, "127.0.0.1:50000".parse().unwrap())
                .unwrap_err();
            assert!(err.to_string().contains("inode 222"), "{err}");
        }
    }

    #[test]
    fn missing_tcp6_is_fine() {
        let dir = fake_proc("", "", &[]);
        fs::remove_file(dir.path().join("net").join("tcp6")).unwrap();
        let r = ProcNetResolver::with_procfs(ProcFs::new(dir.path()));
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(r.client_socket_inodes(a, a).unwrap().is_empty());
    }
}
