//! `[[workload]]`: a named set of processes ([`Selectors`]) and the SPIFFE ID
//! they get; conversion to the attestation crate's registrations; checks for
//! names, IDs, selectors and ambiguous pairs.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::check::Checker;
use super::names::{check_name, check_spiffe_id};

/// One `[[workload]]`: a named set of processes and the SPIFFE ID they get.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Unique name, referenced from `route[].allow`.
    pub name: String,
    /// `spiffe://<trust_domain>/<path>`.
    pub spiffe_id: String,
    /// How processes are matched; all given selectors must match.
    #[serde(default)]
    pub selectors: Selectors,
}

/// Process selectors of a workload. At least one must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selectors {
    /// Effective user id.
    pub uid: Option<u32>,
    /// Effective group id.
    pub gid: Option<u32>,
    /// Absolute path of the executable.
    pub exe_path: Option<PathBuf>,
    /// SHA-256 of the executable, 64 hex characters (lowercased on load).
    pub exe_sha256: Option<String>,
    /// systemd unit name, e.g. `reports.service`.
    pub systemd_unit: Option<String>,
    /// cgroup v2 path, e.g. `/system.slice/reports.service`.
    pub cgroup: Option<String>,
}

impl Selectors {
    /// True when no selector is set.
    pub fn is_empty(&self) -> bool {
        self.uid.is_none()
            && self.gid.is_none()
            && self.exe_path.is_none()
            && self.exe_sha256.is_none()
            && self.systemd_unit.is_none()
            && self.cgroup.is_none()
    }

    /// The attestation crate's form of these selectors.
    pub fn to_attest(&self) -> warden_identity::attest::Selectors {
        warden_identity::attest::Selectors {
            uid: self.uid,
            gid: self.gid,
            exe_path: self.exe_path.clone(),
            exe_sha256: self.exe_sha256.clone(),
            cgroup: self.cgroup.clone(),
            systemd_unit: self.systemd_unit.clone(),
        }
    }
}

impl Workload {
    /// The attestation crate's registration for this workload.
    pub fn registration(&self) -> warden_identity::attest::Registration {
        warden_identity::attest::Registration {
            name: self.name.clone(),
            spiffe_id: self.spiffe_id.clone(),
            selectors: self.selectors.to_attest(),
        }
    }
}

pub(super) fn check_workloads(c: &mut Checker<'_>) {
    let cfg = c.config;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, w) in cfg.workloads.iter().enumerate() {
        let k = format!("workload[{i}]");

        if let Err((problem, fix)) = check_name("workload", &w.name) {
            c.error(format!("{k}.name"), problem, fix);
        }
        if let Some(first) = seen.get(w.name.as_str()) {
            c.error(
                format!("{k}.name"),
                format!(
                    "workload name \"{}\" is already used by workload[{first}]",
                    w.name
                ),
                "give every [[workload]] a unique name",
            );
        } else {
            seen.insert(w.name.as_str(), i);
        }

        if let Err((problem, fix)) = check_spiffe_id(&w.spiffe_id, &cfg.trust_domain) {
            c.error(format!("{k}.spiffe_id"), problem, fix);
        }

        let s = &w.selectors;
        if s.is_empty() {
            c.error(
                format!("{k}.selectors"),
                format!("workload \"{}\" has no selectors, so no process can ever match it", w.name),
                "add at least one selector, e.g. selectors = { uid = 1001, exe_path = \"/usr/bin/psql\" }",
            );
        }
        if let Some(path) = &s.exe_path {
            if !path.is_absolute() {
                c.error(
                    format!("{k}.selectors.exe_path"),
                    format!("exe_path \"{}\" is not an absolute path", path.display()),
                    "use the executable's full path, e.g. \"/usr/bin/psql\" (see `readlink -f \"$(command -v NAME)\"`)",
                );
            }
        }
        if let Some(sha) = &s.exe_sha256 {
            if sha.len() != 64 || !sha.chars().all(|ch| ch.is_ascii_hexdigit()) {
                c.error(
                    format!("{k}.selectors.exe_sha256"),
                    format!(
                        "exe_sha256 must be 64 hex characters; got {} characters{}",
                        sha.chars().count(),
                        if sha.chars().all(|ch| ch.is_ascii_hexdigit()) {
                            ""
                        } else {
                            " including non-hex ones"
                        }
                    ),
                    "use the digest printed by `sha256sum /path/to/executable`",
                );
            }
        }
        if let Some(unit) = &s.systemd_unit {
            if unit.trim().is_empty() || unit.chars().any(|ch| ch.is_whitespace() || ch == '/') {
                c.error(
                    format!("{k}.selectors.systemd_unit"),
                    format!("\"{unit}\" is not a systemd unit name"),
                    "use the unit name as shown by `systemctl status`, e.g. \"reports.service\"",
                );
            }
        }
        if let Some(cgroup) = &s.cgroup {
            if !cgroup.starts_with('/') || cgroup.chars().any(char::is_whitespace) {
                c.error(
                    format!("{k}.selectors.cgroup"),
                    format!("\"{cgroup}\" is not a cgroup path; it must start with /"),
                    "use the path after `0::` in /proc/PID/cgroup, e.g. \"/system.slice/reports.service\"",
                );
            }
        }
    }
    check_ambiguous_workloads(c);
}

/// Two workloads that could match the same process with no way to prefer one
/// (neither's selectors are a strict superset of the other's) are an error:
/// attestation would have to refuse that process at run time.
fn check_ambiguous_workloads(c: &mut Checker<'_>) {
    let cfg = c.config;
    let regs: Vec<_> = cfg.workloads.iter().map(Workload::registration).collect();
    for (a, b) in warden_identity::attest::ambiguous_pairs(&regs) {
        c.error(
            format!("workload[{b}].selectors"),
            format!(
                "workloads \"{}\" (workload[{a}]) and \"{}\" (workload[{b}]) could match the same process, and neither is more specific",
                cfg.workloads[a].name, cfg.workloads[b].name
            ),
            "add a selector that tells them apart (a different uid, exe_sha256 or systemd_unit), or make one's selectors a strict superset of the other's",
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{edit, ok, only_error, report, BASE};

    #[test]
    fn workload_names_unique_and_valid() {
        let dup = format!(
            "{BASE}\n[[workload]]\nname = \"reports\"\nspiffe_id = \"spiffe://example.org/other\"\nselectors = {{ uid = 7 }}\n"
        );
        let issue = only_error(&dup, "workload[1].name");
        assert!(issue.problem.contains("workload[0]"), "{issue:?}");

        // Renaming the workload also leaves route[0].allow pointing at nothing.
        let r = report(&edit("name = \"reports\"", "name = \"Reports DB\""));
        let keys: Vec<&str> = r.errors.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec!["workload[0].name", "route[0].allow[0]"]);
        assert!(r.errors[0].fix.contains("\"reports-db\""), "{r}");
        let long = "a".repeat(64);
        for bad in ["-reports", "_x", "", "r\u{e9}ports", long.as_str()] {
            let text = edit("name = \"reports\"", &format!("name = \"{bad}\""))
                .replace("allow = [\"reports\"]", &format!("allow = [\"{bad}\"]"));
            only_error(&text, "workload[0].name");
        }
    }

    #[test]
    fn selectors_required_and_checked() {
        only_error(
            &edit("selectors = { uid = 1001 }\n", ""),
            "workload[0].selectors",
        );
        only_error(&edit("{ uid = 1001 }", "{}"), "workload[0].selectors");
        only_error(
            &edit("{ uid = 1001 }", "{ exe_path = \"bin/psql\" }"),
            "workload[0].selectors.exe_path",
        );
        only_error(
            &edit("{ uid = 1001 }", "{ exe_sha256 = \"abc123\" }"),
            "workload[0].selectors.exe_sha256",
        );
        let not_hex = format!("{{ exe_sha256 = \"{}\" }}", "g".repeat(64));
        only_error(
            &edit("{ uid = 1001 }", &not_hex),
            "workload[0].selectors.exe_sha256",
        );
        only_error(
            &edit("{ uid = 1001 }", "{ cgroup = \"system.slice/x.service\" }"),
            "workload[0].selectors.cgroup",
        );
        only_error(
            &edit("{ uid = 1001 }", "{ systemd_unit = \"\" }"),
            "workload[0].selectors.systemd_unit",
        );
        let upper = format!("{{ exe_sha256 = \"{}\" }}", "AB".repeat(32));
        let c = ok(&edit("{ uid = 1001 }", &upper));
        assert_eq!(
            c.workloads[0].selectors.exe_sha256,
            Some("ab".repeat(32)),
            "digest is lowercased"
        );
    }
}
