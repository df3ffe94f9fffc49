//! Selectors, registrations, and choosing the registration for a process.
//!
//! A [`Registration`] maps a set of [`Selectors`] to a SPIFFE ID. A process
//! matches a registration when every selector that is set matches its
//! [`PeerFacts`]; an empty selector set matches nothing, so a registration can
//! never accidentally cover every process. When several registrations match,
//! the most specific one wins: the one whose selectors are a strict superset
//! (same keys plus more, same values on the shared keys) of every other
//! match. Otherwise attestation fails as ambiguous rather than guess.
//! [`ambiguous_pairs`] finds, ahead of time, the pairs of registrations that
//! could cause that failure.

use std::path::PathBuf;

use super::error::AttestError;
use super::facts::PeerFacts;
use super::procfs::systemd_unit_of;

/// Conditions on a peer's facts. Each `Some` must hold; `None` is "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    /// Effective uid.
    pub uid: Option<u32>,
    /// The effective gid or any supplementary group.
    pub gid: Option<u32>,
    /// Exact path of the running executable (never matches a deleted one).
    pub exe_path: Option<PathBuf>,
    /// Hex SHA-256 of the running executable (case-insensitive).
    pub exe_sha256: Option<String>,
    /// Exact cgroup v2 path.
    pub cgroup: Option<String>,
    /// systemd unit name, e.g. `nginx.service`.
    pub systemd_unit: Option<String>,
}

/// One workload: a name, its SPIFFE ID and the selectors that identify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Name for messages and configuration.
    pub name: String,
    /// The identity handed to matching processes.
    pub spiffe_id: String,
    /// Which processes are this workload.
    pub selectors: Selectors,
}

/// Selector keys, for set comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Uid,
    Gid,
    ExePath,
    ExeSha256,
    Cgroup,
    SystemdUnit,
}

const KEYS: [Key; 6] = [
    Key::Uid,
    Key::Gid,
    Key::ExePath,
    Key::ExeSha256,
    Key::Cgroup,
    Key::SystemdUnit,
];

impl Selectors {
    /// Whether no selector is set (such a set matches nothing).
    pub fn is_empty(&self) -> bool {
        KEYS.iter().all(|k| !self.has(*k))
    }

    /// Number of selectors set.
    pub fn len(&self) -> usize {
        KEYS.iter().filter(|k| self.has(**k)).count()
    }

    fn has(&self, k: Key) -> bool {
        match k {
            Key::Uid => self.uid.is_some(),
            Key::Gid => self.gid.is_some(),
            Key::ExePath => self.exe_path.is_some(),
            Key::ExeSha256 => self.exe_sha256.is_some(),
            Key::Cgroup => self.cgroup.is_some(),
            Key::SystemdUnit => self.systemd_unit.is_some(),
        }
    }

    /// `Some(equal)` when both sets have key `k`, `None` otherwise.
    fn same_value(&self, other: &Selectors, k: Key) -> Option<bool> {
        fn eq<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> Option<bool> {
            Some(a.as_ref()? == b.as_ref()?)
        }
        match k {
            Key::Uid => eq(&self.uid, &other.uid),
            Key::Gid => eq(&self.gid, &other.gid),
            Key::ExePath => eq(&self.exe_path, &other.exe_path),
            Key::ExeSha256 => {
                let (a, b) = (self.exe_sha256.as_ref()?, other.exe_sha256.as_ref()?);
                Some(a.eq_ignore_ascii_case(b))
            }
            Key::Cgroup => eq(&self.cgroup, &other.cgroup),
            Key::SystemdUnit => eq(&self.systemd_unit, &other.systemd_unit),
        }
    }

    /// Whether `self` is strictly more specific than `other`: it has every
    /// key of `other` with the same value, plus at least one more.
    pub fn is_strict_superset_of(&self, other: &Selectors) -> bool {
        let covers = KEYS
            .iter()
            .all(|k| !other.has(*k) || self.same_value(other, *k) == Some(true));
        covers && self.len() > other.len()
    }

    /// Whether no process can match both `self` and `other`: they set the
    /// same key to different values (except `gid`, which one process can
    /// satisfy twice through its supplementary groups), or one's `cgroup`
    /// implies a systemd unit other than the other's `systemd_unit`.
    pub fn contradicts(&self, other: &Selectors) -> bool {
        let same_key_conflict = KEYS
            .iter()
            .filter(|k| **k != Key::Gid)
            .any(|k| self.same_value(other, *k) == Some(false));
        let unit_conflict = |a: &Selectors, b: &Selectors| match (&a.cgroup, &b.systemd_unit) {
            (Some(cg), Some(unit)) => systemd_unit_of(cg).as_ref() != Some(unit),
            _ => false,
        };
        same_key_conflict || unit_conflict(self, other) || unit_conflict(other, self)
    }
}

/// Whether every selector set in `sel` holds for `facts`. An empty set
/// matches nothing.
pub fn matches(sel: &Selectors, facts: &PeerFacts) -> bool {
    if sel.is_empty() {
        return false;
    }
    if sel.uid.is_some_and(|u| u != facts.uid) {
        return false;
    }
    if let Some(g) = sel.gid {
        if facts.gid != g && !facts.groups.contains(&g) {
            return false;
        }
    }
    if let Some(p) = &sel.exe_path {
        if facts.exe_deleted || facts.exe_path.as_ref() != Some(p) {
            return false;
        }
    }
    if let Some(h) = &sel.exe_sha256 {
        if !facts
            .exe_sha256
            .as_ref()
            .is_some_and(|f| f.eq_ignore_ascii_case(h))
        {
            return false;
        }
    }
    if sel.cgroup.is_some() && sel.cgroup != facts.cgroup {
        return false;
    }
    if sel.systemd_unit.is_some() && sel.systemd_unit != facts.systemd_unit {
        return false;
    }
    true
}

/// The registration for a process: the only match, or the match that is
/// strictly more specific than every other match.
///
/// Errors: [`AttestError::NoMatch`] (the message lists the facts checked) or
/// [`AttestError::Ambiguous`] (naming every matching registration).
pub fn attest<'a>(
    facts: &PeerFacts,
    regs: &'a [Registration],
) -> Result<&'a Registration, AttestError> {
    let found: Vec<&Registration> = regs
        .iter()
        .filter(|r| matches(&r.selectors, facts))
        .collect();
    if found.is_empty() {
        return Err(AttestError::NoMatch {
            pid: facts.pid,
            facts: facts.summary(),
        });
    }
    let best = found.iter().enumerate().find_map(|(i, cand)| {
        let beats_all = found
            .iter()
            .enumerate()
            .all(|(j, other)| i == j || cand.selectors.is_strict_superset_of(&other.selectors));
        beats_all.then_some(*cand)
    });
    match best {
        Some(r) => Ok(r),
        None => Err(AttestError::Ambiguous {
            pid: facts.pid,
            names: found.iter().map(|r| r.name.clone()).collect(),
        }),
    }
}

/// Pairs `(i, j)` with `i < j` of registrations that one process could match
/// with no way to prefer one of them: neither set is empty, they do not
/// contradict (see [`Selectors::contradicts`]), and neither is a strict
/// superset of the other. Identical sets are ambiguous. If this returns no
/// pair, [`attest`] never fails with `Ambiguous` for these registrations.
pub fn ambiguous_pairs(regs: &[Registration]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, a) in regs.iter().enumerate() {
        for (j, b) in regs.iter().enumerate().skip(i + 1) {
            let (a, b) = (&a.selectors, &b.selectors);
            if a.is_empty() || b.is_empty() || a.contradicts(b) {
                continue;
            }
            if a.is_strict_superset_of(b) || b.is_strict_superset_of(a) {
                continue;
            }
            out.push((i, j));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! Table-driven matching, preference and ambiguity cases.

    use super::*;
    use std::path::Path;

    const SHA: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn facts() -> PeerFacts {
        PeerFacts {
            pid: 4121,
            start_time: 99,
            uid: 1001,
            gid: 1001,
            groups: vec![27, 100],
            exe_path: Some(PathBuf::from("/usr/bin/psql")),
            exe_deleted: false,
            exe_sha256: Some(SHA.to_string()),
            exe_hash_skipped: None,
            cgroup: Some("/system.slice/app.service".to_string()),
            systemd_unit: Some("app.service".to_string()),
            display_name: "psql".to_string(),
        }
    }

    fn sel() -> Selectors {
        Selectors::default()
    }

    fn reg(name: &str, selectors: Selectors) -> Registration {
        Registration {
            name: name.to_string(),
            spiffe_id: format!("spiffe://test/{name}"),
            selectors,
        }
    }

    #[test]
    fn match_table() {
        let f = facts();
        let mut deleted = facts();
        deleted.exe_deleted = true;
        let mut unhashed = facts();
        unhashed.exe_sha256 = None;
        let cases: Vec<(&str, Selectors, &PeerFacts, bool)> = vec![
            ("empty matches nothing", sel(), &f, false),
            (
                "uid",
                Selectors {
                    uid: Some(1001),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "wrong uid",
                Selectors {
                    uid: Some(0),
                    ..sel()
                },
                &f,
                false,
            ),
            (
                "egid",
                Selectors {
                    gid: Some(1001),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "supplementary gid",
                Selectors {
                    gid: Some(100),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "foreign gid",
                Selectors {
                    gid: Some(5),
                    ..sel()
                },
                &f,
                false,
            ),
            (
                "exe path",
                Selectors {
                    exe_path: Some("/usr/bin/psql".into()),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "other exe path",
                Selectors {
                    exe_path: Some("/usr/bin/psq".into()),
                    ..sel()
                },
                &f,
                false,
            ),
            (
                "deleted exe never matches a path",
                Selectors {
                    exe_path: Some("/usr/bin/psql".into()),
                    ..sel()
                },
                &deleted,
                false,
            ),
            (
                "deleted exe still matches its hash",
                Selectors {
                    exe_sha256: Some(SHA.into()),
                    ..sel()
                },
                &deleted,
                true,
            ),
            (
                "sha case-insensitive",
                Selectors {
                    exe_sha256: Some(SHA.to_uppercase()),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "sha of unhashed exe",
                Selectors {
                    exe_sha256: Some(SHA.into()),
                    ..sel()
                },
                &unhashed,
                false,
            ),
            (
                "cgroup exact",
                Selectors {
                    cgroup: Some("/system.slice/app.service".into()),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "cgroup prefix is not enough",
                Selectors {
                    cgroup: Some("/system.slice".into()),
                    ..sel()
                },
                &f,
                false,
            ),
            (
                "unit",
                Selectors {
                    systemd_unit: Some("app.service".into()),
                    ..sel()
                },
                &f,
                true,
            ),
            (
                "all must match",
                Selectors {
                    uid: Some(1001),
                    systemd_unit: Some("db.service".into()),
                    ..sel()
                },
                &f,
                false,
            ),
            (
                "all present match",
                Selectors {
                    uid: Some(1001),
                    gid: Some(27),
                    exe_path: Some("/usr/bin/psql".into()),
                    exe_sha256: Some(SHA.into()),
                    cgroup: Some("/system.slice/app.service".into()),
                    systemd_unit: Some("app.service".into()),
                },
                &f,
                true,
            ),
        ];
        for (name, s, f, want) in cases {
            assert_eq!(matches(&s, f), want, "{name}");
        }
    }

    #[test]
    fn attest_picks_most_specific() {
        let regs = vec![
            reg(
                "by-uid",
                Selectors {
                    uid: Some(1001),
                    ..sel()
                },
            ),
            reg(
                "psql-of-1001",
                Selectors {
                    uid: Some(1001),
                    exe_path: Some("/usr/bin/psql".into()),
                    ..sel()
                },
            ),
            reg(
                "psql-of-1001-in-app",
                Selectors {
                    uid: Some(1001),
                    exe_path: Some("/usr/bin/psql".into()),
                    systemd_unit: Some("app.service".into()),
                    ..sel()
                },
            ),
            reg(
                "root",
                Selectors {
                    uid: Some(0),
                    ..sel()
                },
            ),
        ];
        assert_eq!(attest(&facts(), &regs).unwrap().name, "psql-of-1001-in-app");
        assert_eq!(attest(&facts(), &regs[..2]).unwrap().name, "psql-of-1001");
        assert_eq!(attest(&facts(), &regs[..1]).unwrap().name, "by-uid");
        // Order of registrations does not matter.
        let rev: Vec<Registration> = regs.iter().rev().cloned().collect();
        assert_eq!(attest(&facts(), &rev).unwrap().name, "psql-of-1001-in-app");
        assert!(ambiguous_pairs(&regs).is_empty());
    }

    #[test]
    fn attest_ambiguous_and_nomatch() {
        let regs = vec![
            reg(
                "a",
                Selectors {
                    uid: Some(1001),
                    ..sel()
                },
            ),
            reg(
                "b",
                Selectors {
                    exe_path: Some("/usr/bin/psql".into()),
                    ..sel()
                },
            ),
            reg(
                "other",
                Selectors {
                    uid: Some(7),
                    ..sel()
                },
            ),
        ];
        match attest(&facts(), &regs) {
            Err(AttestError::Ambiguous { pid: 4121, names }) => assert_eq!(names, ["a", "b"]),
            other => panic!("want Ambiguous, got {other:?}"),
        }
        let msg = attest(&facts(), &regs).unwrap_err().to_string();
        assert!(msg.contains("a, b"), "{msg}");

        let err = attest(&facts(), &regs[2..]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AttestError::NoMatch { pid: 4121, .. }));
        assert!(
            msg.starts_with("process 4121 (\"psql\" exe /usr/bin/psql, uid 1001"),
            "{msg}"
        );
        assert!(msg.ends_with("matches no registered workload"), "{msg}");
        assert!(msg.contains(SHA), "{msg}");
    }

    #[test]
    fn superset_with_different_gid_is_not_preferred() {
        // One process can satisfy both gid selectors, and "x" is not a
        // refinement of "y" (different gid value): ambiguous, both at run time
        // and in ambiguous_pairs.
        let regs = vec![
            reg(
                "x",
                Selectors {
                    uid: Some(1001),
                    gid: Some(27),
                    ..sel()
                },
            ),
            reg(
                "y",
                Selectors {
                    gid: Some(100),
                    ..sel()
                },
            ),
        ];
        assert!(matches!(
            attest(&facts(), &regs),
            Err(AttestError::Ambiguous { .. })
        ));
        assert_eq!(ambiguous_pairs(&regs), vec![(0, 1)]);
    }

    #[test]
    fn identical_registrations_are_ambiguous() {
        let s = Selectors {
            uid: Some(1001),
            ..sel()
        };
        let regs = vec![reg("one", s.clone()), reg("two", s)];
        assert!(matches!(
            attest(&facts(), &regs),
            Err(AttestError::Ambiguous { .. })
        ));
        assert_eq!(ambiguous_pairs(&regs), vec![(0, 1)]);
    }

    #[test]
    fn ambiguity_table() {
        let u = |v| Selectors {
            uid: Some(v),
            ..sel()
        };
        let cases: Vec<(&str, Selectors, Selectors, bool)> = vec![
            ("identical", u(1), u(1), true),
            ("contradicting uid", u(1), u(2), false),
            (
                "strict superset",
                Selectors {
                    gid: Some(5),
                    ..u(1)
                },
                u(1),
                false,
            ),
            (
                "strict subset",
                u(1),
                Selectors {
                    gid: Some(5),
                    ..u(1)
                },
                false,
            ),
            (
                "disjoint keys",
                u(1),
                Selectors {
                    exe_path: Some("/bin/x".into()),
                    ..sel()
                },
                true,
            ),
            (
                "different gids do not contradict",
                Selectors {
                    gid: Some(5),
                    ..sel()
                },
                Selectors {
                    gid: Some(6),
                    ..sel()
                },
                true,
            ),
            (
                "superset keys with another value is no refinement",
                Selectors {
                    gid: Some(5),
                    ..u(1)
                },
                Selectors {
                    gid: Some(6),
                    ..sel()
                },
                true,
            ),
            (
                "sha differing only in case is identical",
                Selectors {
                    exe_sha256: Some("ABCD".into()),
                    ..sel()
                },
                Selectors {
                    exe_sha256: Some("abcd".into()),
                    ..sel()
                },
                true,
            ),
            (
                "different sha contradicts",
                Selectors {
                    exe_sha256: Some("ab".into()),
                    ..sel()
                },
                Selectors {
                    exe_sha256: Some("cd".into()),
                    ..sel()
                },
                false,
            ),
            (
                "different exe path contradicts",
                Selectors {
                    exe_path: Some("/a".into()),
                    ..u(1)
                },
                Selectors {
                    exe_path: Some("/b".into()),
                    gid: Some(3),
                    ..sel()
                },
                false,
            ),
            (
                "different cgroup contradicts",
                Selectors {
                    cgroup: Some("/a".into()),
                    ..sel()
                },
                Selectors {
                    cgroup: Some("/b".into()),
                    ..sel()
                },
                false,
            ),
            (
                "different unit contradicts",
                Selectors {
                    systemd_unit: Some("a.service".into()),
                    ..sel()
                },
                Selectors {
                    systemd_unit: Some("b.service".into()),
                    uid: Some(1),
                    ..sel()
                },
                false,
            ),
            (
                "cgroup implies another unit",
                Selectors {
                    cgroup: Some("/system.slice/a.service".into()),
                    ..sel()
                },
                Selectors {
                    systemd_unit: Some("b.service".into()),
                    ..sel()
                },
                false,
            ),
            (
                "cgroup implies the same unit",
                Selectors {
                    cgroup: Some("/system.slice/a.service".into()),
                    ..sel()
                },
                Selectors {
                    systemd_unit: Some("a.service".into()),
                    ..sel()
                },
                true,
            ),
            ("empty never matches", sel(), u(1), false),
        ];
        for (name, a, b, want) in cases {
            let regs = vec![reg("a", a), reg("b", b)];
            let got = ambiguous_pairs(&regs);
            assert_eq!(!got.is_empty(), want, "{name}: {got:?}");
        }
    }

    #[test]
    fn no_ambiguous_pair_means_attest_never_ambiguous() {
        // Exhaustive over small selector sets and small fact variations: the
        // static check must predict every run-time Ambiguous.
        let values_uid = [None, Some(1001), Some(2)];
        let values_gid = [None, Some(1001), Some(100), Some(3)];
        let values_exe: [Option<&Path>; 3] = [
            None,
            Some(Path::new("/usr/bin/psql")),
            Some(Path::new("/x")),
        ];
        let mut all = Vec::new();
        for uid in values_uid {
            for gid in values_gid {
                for exe in values_exe {
                    all.push(Selectors {
                        uid,
                        gid,
                        exe_path: exe.map(Path::to_path_buf),
                        ..sel()
                    });
                }
            }
        }
        let f = facts();
        for (i, a) in all.iter().enumerate() {
            for b in all.iter().skip(i) {
                let regs = vec![reg("a", a.clone()), reg("b", b.clone())];
                let runtime_ambiguous =
                    matches!(attest(&f, &regs), Err(AttestError::Ambiguous { .. }));
                if runtime_ambiguous {
                    assert_eq!(ambiguous_pairs(&regs), vec![(0, 1)], "{a:?} vs {b:?}");
                }
            }
        }
    }

    #[test]
    fn pairs_report_indices() {
        let regs = vec![
            reg(
                "a",
                Selectors {
                    uid: Some(1),
                    ..sel()
                },
            ),
            reg(
                "b",
                Selectors {
                    uid: Some(2),
                    ..sel()
                },
            ),
            reg(
                "c",
                Selectors {
                    gid: Some(9),
                    ..sel()
                },
            ),
        ];
        assert_eq!(ambiguous_pairs(&regs), vec![(0, 2), (1, 2)]);
    }
}
