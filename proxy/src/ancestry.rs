//! Process ancestry for access events: the chain of parent executables of
//! the process that connected, read from `/proc/PID/stat` (ppid) and
//! `/proc/PID/exe`, up to pid 1 or the main process of a systemd service
//! (the first ancestor in a `*.service` cgroup whose parent is in another
//! cgroup), at most [`MAX_DEPTH`] steps. Display only — identity never
//! comes from it — and read once per process: chains are cached by (pid,
//! start time), so a process that connects a thousand times is walked once.
//!
//! Also the container id of a cgroup path (docker, containerd, CRI-O,
//! podman), for the event's `container` field.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Most ancestors listed.
pub const MAX_DEPTH: usize = 16;
/// Chains cached at most.
const MAX_CACHED: usize = 4096;

/// One ancestor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    /// `/proc/PID/exe` (None: unreadable, e.g. a kernel thread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

/// `ppid` and `starttime` of `/proc/PID/stat` (fields 4 and 22; the comm
/// in field 2 may hold spaces and parentheses, so fields count from the
/// last `)`).
pub fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<(u32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state).
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start))
}

fn cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

fn exe(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Walks the ancestors of `pid` (not included) from its parent upwards.
pub fn walk(pid: u32) -> Vec<Ancestor> {
    let mut chain = Vec::new();
    let Some((mut cur, _)) = stat(pid) else {
        return chain;
    };
    while cur != 0 && chain.len() < MAX_DEPTH {
        let parent = stat(cur).map(|(ppid, _)| ppid);
        chain.push(Ancestor {
            pid: cur,
            exe: exe(cur),
        });
        if cur == 1 {
            break;
        }
        let Some(ppid) = parent else { break };
        // The main process of a service: its unit's cgroup is not its
        // parent's (the service manager's).
        if let Some(cg) = cgroup(cur) {
            if cg.ends_with(".service") && cgroup(ppid).as_deref() != Some(cg.as_str()) {
                break;
            }
        }
        cur = ppid;
    }
    chain
}

/// Chains by (pid, start time).
#[derive(Default)]
pub struct AncestryCache {
    map: HashMap<(u32, u64), Arc<[Ancestor]>>,
}

impl AncestryCache {
    /// The chain of the process `pid` that started at `start_time` (from
    /// its attestation facts): cached, or walked now.
    pub fn get(&mut self, pid: u32, start_time: u64) -> Arc<[Ancestor]> {
        if let Some(hit) = self.map.get(&(pid, start_time)) {
            return hit.clone();
        }
        let chain: Arc<[Ancestor]> = walk(pid).into();
        if self.map.len() >= MAX_CACHED {
            // Exited processes' chains: drop them first, else start over.
            self.map
                .retain(|(p, s), _| stat(*p).is_some_and(|(_, st)| st == *s));
            if self.map.len() >= MAX_CACHED {
                self.map.clear();
            }
        }
        self.map.insert((pid, start_time), chain.clone());
        chain
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The container id in a cgroup path: a 64-hex id as the last part of a
/// component (`docker-ID.scope`, `cri-containerd-ID.scope`,
/// `crio-ID.scope`, `libpod-ID.scope`, `/docker/ID`, `/kubepods/…/ID`).
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.rsplit('/').find_map(|part| {
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let id = part.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

/// `a ← b ← c` of the executables' file names (`--wide`: full paths and pids).
pub fn compact(chain: &[Ancestor], wide: bool) -> String {
    let parts: Vec<String> = chain
        .iter()
        .map(|a| {
            let exe = a.exe.as_deref().unwrap_or("?");
            if wide {
                format!("{exe}[{}]", a.pid)
            } else {
                exe.rsplit('/').next().unwrap_or(exe).to_string()
            }
        })
        .collect();
    parts.join(" ← ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (evil) 1 2 3) S 77 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some((77, 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn our_own_chain_starts_with_our_parent_and_is_cached() {
        let me = std::process::id();
        let (ppid, start) = stat(me).unwrap();
        let chain = walk(me);
        assert!(!chain.is_empty() && chain.len() <= MAX_DEPTH);
        assert_eq!(chain[0].pid, ppid);
        let mut cache = AncestryCache::default();
        let a = cache.get(me, start);
        let b = cache.get(me, start);
        assert!(Arc::ptr_eq(&a, &b), "walked once");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "a".repeat(64);
        assert_eq!(
            container_id(&format!("/system.slice/docker-{id}.scope")),
            Some(id.clone())
        );
        assert_eq!(
            container_id(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/cri-containerd-{id}.scope"
            )),
            Some(id.clone())
        );
        assert_eq!(container_id(&format!("/docker/{id}")), Some(id.clone()));
        assert_eq!(container_id("/system.slice/sshd.service"), None);
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn compact_and_wide_forms() {
        let chain = vec![
            Ancestor {
                pid: 10,
                exe: Some("/usr/bin/bash".into()),
            },
            Ancestor { pid: 1, exe: None },
        ];
        assert_eq!(compact(&chain, false), "bash ← ?");
        assert_eq!(compact(&chain, true), "/usr/bin/bash[10] ← ?[1]");
    }
}
