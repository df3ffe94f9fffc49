//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in `proxy/Cargo.toml` and the files in
//! `packaging/` (unit, default config, tmpfiles.d, maintainer scripts).
//!
//! Steps: cargo-deb present (as root `cargo install cargo-deb --locked`
//! when missing, otherwise the command is printed and the run stops) → the
//! release binary → `cargo deb -p warden --no-build` → the path of the
//! `.deb` under `<target>/debian/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::{cmd, prereq};

/// The cargo-deb line the package is known to build with.
const CARGO_DEB_INSTALL: &str = "cargo install cargo-deb --locked";

pub fn run(repo: &Path) -> Result<PathBuf> {
    ensure_cargo_deb(repo)?;
    cmd::run(cmd::cargo(repo).args(["build", "--release", "-p", "warden"]))?;
    cmd::run(cmd::cargo(repo).args(["deb", "-p", "warden", "--no-build"]))?;
    let deb = newest_deb(&cmd::target_dir(repo).join("debian"))?;
    println!("\nbuilt {}", deb.display());
    println!("install it with:  apt install {}", shown(repo, &deb));
    println!("then:             systemctl enable --now warden   (after `warden init`, see README.Debian)");
    Ok(deb)
}

fn ensure_cargo_deb(repo: &Path) -> Result<()> {
    if cmd::succeeds_quietly(cmd::cargo(repo).args(["deb", "--version"])) {
        return Ok(());
    }
    if !prereq::is_root() {
        bail!("cargo-deb is missing (it builds the Debian package); install it with:\n    {CARGO_DEB_INSTALL}");
    }
    println!("  MISSING  cargo-deb; installing it from crates.io");
    cmd::run(cmd::cargo(repo).args(["install", "cargo-deb", "--locked"]))
        .with_context(|| format!("installing cargo-deb failed; try:\n    {CARGO_DEB_INSTALL}"))
}

/// The most recently written `warden_*.deb` in `dir`.
fn newest_deb(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("warden_") && name.ends_with(".deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, path)| path)
        .with_context(|| format!("cargo deb wrote no warden_*.deb to {}", dir.display()))
}

/// `./relative/path` when `path` is under the repository (apt needs the
/// `./` to take it for a file), else the absolute path.
fn shown(repo: &Path, path: &Path) -> String {
    match path.strip_prefix(repo) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deb_under_the_repository_is_shown_as_a_relative_file() {
        let repo = Path::new("/src/warden");
        assert_eq!(
            shown(
                repo,
                Path::new("/src/warden/target/debian/warden_0.1.0-1_amd64.deb")
            ),
            "./target/debian/warden_0.1.0-1_amd64.deb"
        );
        assert_eq!(
            shown(repo, Path::new("/elsewhere/w.deb")),
            "/elsewhere/w.deb"
        );
    }
}
