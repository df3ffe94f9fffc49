//! Prerequisites: system programs (installed from Debian packages) and Rust
//! toolchain components.
//!
//! To require another program, add a row to [`TEST_REQUIREMENTS`] (needed by
//! `cargo xtask test`) or [`DEMO_REQUIREMENTS`] (needed to run the demo).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// A program that must be available, and the Debian package providing it.
pub struct Requirement {
    pub binary: &'static str,
    pub package: &'static str,
    pub why: &'static str,
    pub location: Location,
}

/// Where to look for a required program.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Somewhere on `$PATH`.
    Path,
    /// In PostgreSQL's server bin directory (see [`find_pg_bin_dir`]); Debian
    /// keeps `initdb`/`pg_ctl` in `/usr/lib/postgresql/<version>/bin`.
    PgBinDir,
}

/// What `cargo xtask test` needs beyond the Rust toolchain.
pub const TEST_REQUIREMENTS: &[Requirement] = &[
    Requirement {
        binary: "ps",
        package: "procps",
        why: "end-to-end tests inspect the daemon's processes",
        location: Location::Path,
    },
    Requirement {
        binary: "curl",
        package: "curl",
        why: "tests scrape /metrics, /healthz and /readyz like a real client",
        location: Location::Path,
    },
    Requirement {
        binary: "python3",
        package: "python3-venv",
        why: "the Workload API test runs the PyPI `spiffe` client, the scan test PyPI `jsonschema` (SARIF 2.1.0 schema), from venvs they create",
        location: Location::Path,
    },
    Requirement {
        binary: "setpriv",
        package: "util-linux",
        why: "tests run clients as another uid (admin socket, Workload API)",
        location: Location::Path,
    },
    Requirement {
        binary: "prlimit",
        package: "util-linux",
        why: "the least-privilege test starts warden under a low open-files limit",
        location: Location::Path,
    },
    Requirement {
        binary: "systemd-analyze",
        package: "systemd",
        why: "the package test verifies and rates the unit offline",
        location: Location::Path,
    },
    Requirement {
        binary: "openssl",
        package: "openssl",
        why: "tests create and inspect keys and certificates",
        location: Location::Path,
    },
    Requirement {
        binary: "nginx",
        package: "nginx",
        why: "the HTTP route test uses nginx as an HTTPS + HTTP/2 upstream",
        location: Location::Path,
    },
    Requirement {
        binary: "sqlite3",
        package: "sqlite3",
        why: "tests inspect warden's store.db directly",
        location: Location::Path,
    },
    Requirement {
        binary: "psql",
        package: "postgresql",
        why: "tests connect to PostgreSQL through the proxy",
        location: Location::Path,
    },
    Requirement {
        binary: "initdb",
        package: "postgresql",
        why: "tests create a throwaway PostgreSQL cluster",
        location: Location::PgBinDir,
    },
    Requirement {
        binary: "pg_ctl",
        package: "postgresql",
        why: "tests start and stop the throwaway PostgreSQL",
        location: Location::PgBinDir,
    },
    Requirement {
        binary: "redis-server",
        package: "redis-server",
        why: "the Redis route test starts a throwaway redis-server",
        location: Location::Path,
    },
    Requirement {
        binary: "redis-cli",
        package: "redis-tools",
        why: "the Redis route test talks to Redis through warden with redis-cli",
        location: Location::Path,
    },
    Requirement {
        binary: "mariadb-install-db",
        package: "mariadb-server",
        why: "the MySQL route test creates and starts a throwaway MariaDB server (mariadbd)",
        location: Location::Path,
    },
    Requirement {
        binary: "mariadb",
        package: "mariadb-client",
        why: "the MySQL route test talks to MariaDB through warden with the mariadb CLI",
        location: Location::Path,
    },
    Requirement {
        binary: "git",
        package: "git",
        why: "the scan test builds a repository with history",
        location: Location::Path,
    },
    Requirement {
        binary: "promtool",
        package: "prometheus",
        why: "tests lint the /metrics exposition and the dashboards' rules",
        location: Location::Path,
    },
    Requirement {
        binary: "prometheus",
        package: "prometheus",
        why: "a test runs a real Prometheus server that scrapes a running warden",
        location: Location::Path,
    },
];

/// What `cargo xtask demo` needs beyond the Rust toolchain.
pub const DEMO_REQUIREMENTS: &[Requirement] = &[];

/// What `cargo xtask bench --only mysql` needs: a throwaway MariaDB.
/// What `cargo xtask bench --only redis` needs besides what warden needs.
pub const REDIS_BENCH_REQUIREMENTS: &[Requirement] = &[
    Requirement {
        binary: "redis-server",
        package: "redis-server",
        why: "the Redis bench starts a throwaway redis-server",
        location: Location::Path,
    },
    Requirement {
        binary: "redis-benchmark",
        package: "redis-tools",
        why: "the Redis bench drives the load with redis-benchmark",
        location: Location::Path,
    },
    Requirement {
        binary: "redis-cli",
        package: "redis-tools",
        why: "the Redis bench checks the route with redis-cli",
        location: Location::Path,
    },
    Requirement {
        binary: "nutcracker",
        package: "nutcracker",
        why: "the Redis bench measures twemproxy (nutcracker), a Redis proxy, as an anchor",
        location: Location::Path,
    },
    Requirement {
        binary: "haproxy",
        package: "haproxy",
        why:
            "the Redis bench measures HAProxy in TCP mode (one proxy hop, no parsing) as an anchor",
        location: Location::Path,
    },
];

pub const MYSQL_BENCH_REQUIREMENTS: &[Requirement] = &[
    Requirement {
        binary: "mariadb-install-db",
        package: "mariadb-server",
        why: "the MySQL bench starts a throwaway MariaDB server (mariadbd)",
        location: Location::Path,
    },
    Requirement {
        binary: "mariadb",
        package: "mariadb-client",
        why: "the MySQL bench creates its user with the mariadb CLI",
        location: Location::Path,
    },
    Requirement {
        binary: "haproxy",
        package: "haproxy",
        why:
            "the MySQL bench measures HAProxy in TCP mode (one proxy hop, no parsing) as an anchor",
        location: Location::Path,
    },
];

/// What `cargo xtask bench` needs for its HTTP proxy benchmark (warden vs
/// direct vs nginx injecting the same header, driven by wrk).
pub const HTTP_BENCH_REQUIREMENTS: &[Requirement] = &[
    Requirement {
        binary: "wrk",
        package: "wrk",
        why: "the HTTP bench drives load with wrk",
        location: Location::Path,
    },
    Requirement {
        binary: "nginx",
        package: "nginx",
        why: "the HTTP bench uses nginx as the upstream and as the injecting baseline",
        location: Location::Path,
    },
];

/// What `cargo xtask bench` needs for its PostgreSQL proxy benchmark (it
/// compares warden with direct connections and with PgBouncer).
pub const BENCH_REQUIREMENTS: &[Requirement] = &[
    Requirement {
        binary: "pgbouncer",
        package: "pgbouncer",
        why: "the PostgreSQL bench measures PgBouncer as a baseline beside warden",
        location: Location::Path,
    },
    Requirement {
        binary: "pgbench",
        package: "postgresql-client",
        why: "the PostgreSQL bench drives load with pgbench",
        location: Location::Path,
    },
    Requirement {
        binary: "psql",
        package: "postgresql-client",
        why: "the PostgreSQL bench creates its role and database with psql",
        location: Location::Path,
    },
    Requirement {
        binary: "initdb",
        package: "postgresql",
        why: "the PostgreSQL bench creates a throwaway cluster",
        location: Location::PgBinDir,
    },
    Requirement {
        binary: "pg_ctl",
        package: "postgresql",
        why: "the PostgreSQL bench starts and stops its throwaway cluster",
        location: Location::PgBinDir,
    },
    Requirement {
        binary: "setpriv",
        package: "util-linux",
        why: "the PostgreSQL bench runs the server and PgBouncer as the postgres user",
        location: Location::Path,
    },
];

/// Rust components: (rustup component, cargo subcommand that needs it).
const RUST_COMPONENTS: &[(&str, &str)] = &[("rustfmt", "fmt"), ("clippy", "clippy")];

/// Where each required program was found.
pub struct Found {
    programs: Vec<(&'static str, PathBuf)>,
}

impl Found {
    /// The directory holding `initdb`, when that was required and found.
    pub fn pg_bin_dir(&self) -> Option<&Path> {
        self.programs
            .iter()
            .find(|(binary, _)| *binary == "initdb")
            .and_then(|(_, path)| path.parent())
    }
}

/// Makes sure every program in `requirements` exists: as root, installs the
/// missing Debian packages; otherwise explains what to install and fails.
pub fn ensure_system_packages(requirements: &[Requirement]) -> Result<Found> {
    if requirements.is_empty() {
        println!("  no system programs needed beyond the Rust toolchain");
    }
    let (found, missing) = locate_all(requirements);
    report_found(&found);
    if missing.is_empty() {
        return Ok(found);
    }
    report_missing(&missing);
    let packages = packages_for(&missing);
    if !is_root() {
        bail!(
            "missing programs: {}; install them with:\n    {}",
            binaries(&missing),
            apt_install_line(&packages, "sudo ")
        );
    }
    install_packages(&packages)?;
    let (found, still_missing) = locate_all(requirements);
    if !still_missing.is_empty() {
        bail!(
            "still missing after installing {}: {}",
            packages.join(" "),
            binaries(&still_missing)
        );
    }
    report_installed(&found, &missing);
    Ok(found)
}

/// Makes sure `cargo fmt` and `cargo clippy` work, adding the components
/// with rustup when they do not.
pub fn ensure_rust_components() -> Result<()> {
    let missing = missing_rust_components();
    if missing.is_empty() {
        let names: Vec<&str> = RUST_COMPONENTS.iter().map(|(name, _)| *name).collect();
        println!("  found    {}", names.join(", "));
        return Ok(());
    }
    println!("  MISSING  Rust components: {}", missing.join(", "));
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    cmd::run(&mut add).with_context(|| {
        format!(
            "could not add Rust components; install them with `{}`",
            cmd::display(&add)
        )
    })?;
    let still_missing = missing_rust_components();
    if !still_missing.is_empty() {
        bail!(
            "`cargo fmt`/`cargo clippy` still fail after adding {}",
            still_missing.join(", ")
        );
    }
    Ok(())
}

fn missing_rust_components() -> Vec<&'static str> {
    let repo = crate::repo_root();
    RUST_COMPONENTS
        .iter()
        .filter(|(_, subcommand)| {
            !cmd::succeeds_quietly(cmd::cargo(&repo).args([subcommand, "--version"]))
        })
        .map(|(component, _)| *component)
        .collect()
}

type Located<'a> = (Found, Vec<&'a Requirement>);

/// Splits `requirements` into found programs and missing ones.
fn locate_all(requirements: &[Requirement]) -> Located<'_> {
    let pg_bin_dir = find_pg_bin_dir();
    let mut found = Found {
        programs: Vec::new(),
    };
    let mut missing = Vec::new();
    for requirement in requirements {
        let path = match requirement.location {
            Location::Path => find_on_path(requirement.binary),
            Location::PgBinDir => pg_bin_dir
                .as_ref()
                .map(|dir| dir.join(requirement.binary))
                .filter(|path| is_executable(path)),
        };
        match path {
            Some(path) => found.programs.push((requirement.binary, path)),
            None => missing.push(requirement),
        }
    }
    (found, missing)
}

fn report_found(found: &Found) {
    for (binary, path) in &found.programs {
        println!("  found    {binary:<10} {}", path.display());
    }
}

fn report_installed(found: &Found, installed: &[&Requirement]) {
    for (binary, path) in &found.programs {
        if installed.iter().any(|r| r.binary == *binary) {
            println!("  installed {binary:<9} {}", path.display());
        }
    }
}

fn report_missing(missing: &[&Requirement]) {
    for requirement in missing {
        println!(
            "  MISSING  {:<10} (Debian package `{}`: {})",
            requirement.binary, requirement.package, requirement.why
        );
    }
}

fn binaries(requirements: &[&Requirement]) -> String {
    let names: Vec<&str> = requirements.iter().map(|r| r.binary).collect();
    names.join(", ")
}

/// The distinct Debian packages providing `missing`, sorted.
fn packages_for(missing: &[&Requirement]) -> Vec<&'static str> {
    let packages: BTreeSet<&'static str> = missing.iter().map(|r| r.package).collect();
    packages.into_iter().collect()
}

fn apt_install_line(packages: &[&str], sudo: &str) -> String {
    format!(
        "{sudo}apt-get update && {sudo}env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

/// `apt-get update` once, then installs `packages` non-interactively.
fn install_packages(packages: &[&str]) -> Result<()> {
    if find_on_path("apt-get").is_none() {
        bail!(
            "apt-get not found; install the programs providing Debian packages {} \
             with your system's package manager",
            packages.join(" ")
        );
    }
    println!("  installing {}", packages.join(" "));
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}

/// PostgreSQL's server bin directory (the one holding `initdb`): `$PG_BIN_DIR`
/// if it has `initdb`, else Debian's highest `/usr/lib/postgresql/<ver>/bin`,
/// else wherever `initdb` is on `$PATH`.
pub fn find_pg_bin_dir() -> Option<PathBuf> {
    let from_env = std::env::var_os("PG_BIN_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    if let Some(dir) = from_env {
        if is_executable(&dir.join("initdb")) {
            return Some(dir);
        }
        println!(
            "  note: ignoring PG_BIN_DIR={} (no initdb there)",
            dir.display()
        );
    }
    highest_debian_pg_bin_dir(Path::new("/usr/lib/postgresql")).or_else(|| {
        find_on_path("initdb").and_then(|initdb| initdb.parent().map(Path::to_path_buf))
    })
}

/// The `<root>/<version>/bin` with the highest version that holds `initdb`.
fn highest_debian_pg_bin_dir(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = parse_version(&entry.file_name().to_string_lossy())?;
            let bin = entry.path().join("bin");
            is_executable(&bin.join("initdb")).then_some((version, bin))
        })
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, bin)| bin)
}

/// "16" → [16], "9.6" → [9, 6]; anything else → None.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// The first executable called `binary` on `$PATH`.
pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Whether we run with effective uid 0 (from /proc, falling back to `id -u`).
pub fn is_root() -> bool {
    effective_uid_from_proc()
        .or_else(effective_uid_from_id)
        .is_some_and(|uid| uid == 0)
}

fn effective_uid_from_proc() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

fn effective_uid_from_id() -> Option<u32> {
    let output = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare_numerically() {
        assert_eq!(parse_version("16"), Some(vec![16]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("common"), None);
        assert!(parse_version("10") > parse_version("9.6"));
    }

    #[test]
    fn highest_version_dir_with_initdb_wins() -> Result<()> {
        let root = std::env::temp_dir().join(format!("xtask-pg-{}", std::process::id()));
        for (version, with_initdb) in [("9.6", true), ("15", true), ("17", false)] {
            let bin = root.join(version).join("bin");
            std::fs::create_dir_all(&bin)?;
            if with_initdb {
                let initdb = bin.join("initdb");
                std::fs::write(&initdb, "#!/bin/sh\n")?;
                std::fs::set_permissions(&initdb, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        std::fs::create_dir_all(root.join("common"))?;
        let found = highest_debian_pg_bin_dir(&root);
        std::fs::remove_dir_all(&root)?;
        assert_eq!(found, Some(root.join("15").join("bin")));
        Ok(())
    }

    #[test]
    fn missing_packages_are_deduplicated() {
        let missing: Vec<&Requirement> = TEST_REQUIREMENTS
            .iter()
            .filter(|r| r.package == "postgresql" || r.package == "procps")
            .collect();
        assert_eq!(packages_for(&missing), ["postgresql", "procps"]);
    }

    #[test]
    fn install_hint_is_a_complete_command() {
        assert_eq!(
            apt_install_line(&["prometheus"], "sudo "),
            "sudo apt-get update && sudo env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y --no-install-recommends prometheus"
        );
    }

    #[test]
    fn every_requirement_row_is_filled_in() {
        for requirement in TEST_REQUIREMENTS.iter().chain(DEMO_REQUIREMENTS) {
            assert!(!requirement.binary.is_empty());
            assert!(!requirement.package.is_empty());
            assert!(!requirement.why.is_empty());
        }
    }

    #[test]
    fn sh_is_found_on_path() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("definitely-not-a-real-program-xyz").is_none());
    }
}
