//! Stage 3, meaning: the [`Checker`] that collects errors and warnings, the
//! order in which the sections are checked, and the unix socket rules shared by
//! every section that names a socket (length, no two on one path).

use std::path::{Path, PathBuf};

use super::anomaly::check_anomaly;
use super::export::check_export;
use super::globals::{check_audit, check_globals};
use super::report::ConfigIssue;
use super::route::check_routes;
use super::secret::check_secrets;
use super::store::check_store;
use super::workload::check_workloads;
use super::Config;

/// Size of `sockaddr_un.sun_path`; a socket path must be strictly shorter.
pub const SUN_PATH_MAX: usize = 108;

/// Stage 3's state: the config being checked and everything found so far.
pub(super) struct Checker<'a> {
    pub(super) config: &'a Config,
    errors: Vec<ConfigIssue>,
    warnings: Vec<ConfigIssue>,
    /// (key, path) of every unix socket, to catch two listeners on one path.
    sockets: Vec<(String, PathBuf)>,
}

impl Checker<'_> {
    pub(super) fn error(
        &mut self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.errors.push(ConfigIssue::new(key, problem, fix));
    }

    pub(super) fn warn(
        &mut self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.warnings.push(ConfigIssue::new(key, problem, fix));
    }
}

/// Check every rule; returns (errors, warnings).
pub(super) fn validate(config: &Config) -> (Vec<ConfigIssue>, Vec<ConfigIssue>) {
    let mut c = Checker {
        config,
        errors: Vec::new(),
        warnings: Vec::new(),
        sockets: Vec::new(),
    };
    check_globals(&mut c);
    check_store(&mut c);
    check_workloads(&mut c);
    check_secrets(&mut c);
    check_routes(&mut c);
    check_anomaly(&mut c);
    check_audit(&mut c);
    check_export(&mut c);
    check_socket_clashes(&mut c);
    (c.errors, c.warnings)
}

/// A unix socket path: not empty and shorter than `sun_path`. Remembered, so
/// that [`check_socket_clashes`] can find two sockets on one path.
pub(super) fn check_socket_path(c: &mut Checker<'_>, key: &str, path: &Path) {
    if path.as_os_str().is_empty() {
        c.error(
            key,
            "socket path is empty",
            "set a path such as \"/run/warden/NAME.sock\", or remove the key",
        );
        return;
    }
    let len = path.as_os_str().len();
    if len >= SUN_PATH_MAX {
        c.error(
            key,
            format!(
                "socket path {} is {len} bytes; unix socket paths must be shorter than {SUN_PATH_MAX} bytes (the sun_path limit)",
                path.display()
            ),
            "use a shorter absolute path such as /run/warden/NAME.sock (relative paths are joined to the config file's directory)",
        );
    }
    c.sockets.push((key.to_string(), path.to_path_buf()));
}

/// Runs last: two sockets (of any sections) on one path.
fn check_socket_clashes(c: &mut Checker<'_>) {
    let sockets = std::mem::take(&mut c.sockets);
    for (i, (key, path)) in sockets.iter().enumerate() {
        if let Some((first, _)) = sockets[..i].iter().find(|(_, p)| p == path) {
            c.error(
                key.as_str(),
                format!("socket path {} is also used by {first}", path.display()),
                "give every socket its own path",
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use crate::config::parse_str;
    use crate::config::test_util::{edit, ok, only_error, warning_keys};

    #[test]
    fn socket_paths_must_fit_sun_path() {
        let long = format!("/run/{}.sock", "s".repeat(100)); // 110 bytes
        only_error(&format!("[admin]\nsocket = \"{long}\"\n"), "admin.socket");
        only_error(
            &format!("[identity]\nworkload_api_socket = \"{long}\"\n"),
            "identity.workload_api_socket",
        );
        only_error(&format!("data_dir = \"{long}\"\n"), "data_dir");
        // A data_dir that only just fits leaves no room for the fallback admin socket.
        let near = format!("/{}", "d".repeat(100));
        assert_eq!(
            warning_keys(&ok(&format!("data_dir = \"{near}\"\n"))),
            vec!["data_dir"]
        );
        let with_socket = format!("data_dir = \"{near}\"\n[admin]\nsocket = \"/run/a.sock\"\n");
        assert!(ok(&with_socket).warnings.is_empty());
        only_error(
            &edit(
                "allow = [\"reports\"]",
                &format!("allow = [\"reports\"]\nunix_socket = \"{long}\""),
            ),
            "route[0].unix_socket",
        );
        // 107 bytes is the longest that fits.
        let fits = format!("/{}", "s".repeat(106));
        ok(&format!("[admin]\nsocket = \"{fits}\"\n"));
        let too_long = format!("/{}", "s".repeat(107));
        only_error(
            &format!("[admin]\nsocket = \"{too_long}\"\n"),
            "admin.socket",
        );
        // Relative paths count after resolution against the config directory.
        let deep = Path::new("/").join("d".repeat(100)).join("warden.toml");
        let report = parse_str("[admin]\nsocket = \"admin.sock\"\n", &deep).unwrap_err();
        assert_eq!(report.errors[0].key, "admin.socket");
    }

    #[test]
    fn sockets_must_not_share_a_path() {
        let text = "[admin]\nsocket = \"/run/w.sock\"\n[identity]\nworkload_api_socket = \"/run/w.sock\"\n";
        let issue = only_error(text, "identity.workload_api_socket");
        assert!(issue.problem.contains("admin.socket"), "{issue:?}");
    }
}
