//! Building the kernel programs (`ebpf/kernel`) from source.
//!
//! The user-space crate embeds `ebpf/prebuilt/warden-ebpf.o`, so a plain
//! `cargo build` needs neither nightly nor bpf-linker. `cargo xtask ebpf`
//! rebuilds that object from the sources; `cargo xtask test` rebuilds it into
//! `target/` and fails when it differs from the committed one (so the
//! programs under test are exactly the ones the sources describe).
//!
//! The toolchain (measured in `shared/docs/KERNEL.md`): the installed nightly
//! with `rust-src`, and `bpf-linker` 0.13 built against Debian's LLVM 22.
//! Paths are remapped so the object does not depend on where the repository
//! or cargo's registry live.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::prereq;

/// Where the committed object lives, relative to the repository.
pub const COMMITTED_OBJECT: &str = "ebpf/prebuilt/warden-ebpf.o";
const TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// What to do with the freshly built object.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Copy it over the committed object (`cargo xtask ebpf`).
    Update,
    /// Fail unless it equals the committed object (`cargo xtask test`).
    Check,
}

/// Ensures the toolchain, builds the object and updates or checks the
/// committed copy.
pub fn run(repo: &Path, mode: Mode) -> Result<()> {
    ensure_toolchain()?;
    let built = build(repo)?;
    let committed = repo.join(COMMITTED_OBJECT);
    match mode {
        Mode::Update => {
            std::fs::copy(&built, &committed).with_context(|| {
                format!("copying {} to {}", built.display(), committed.display())
            })?;
            println!("  updated {COMMITTED_OBJECT}; commit it with the sources");
        }
        Mode::Check => {
            let fresh =
                std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
            let old = std::fs::read(&committed)
                .with_context(|| format!("reading {}", committed.display()))?;
            if fresh != old {
                bail!(
                    "{COMMITTED_OBJECT} does not match the kernel sources in ebpf/kernel \
                     ({} bytes built vs {} committed); run `cargo xtask ebpf` and commit \
                     the updated object",
                    fresh.len(),
                    old.len()
                );
            }
            println!(
                "  {COMMITTED_OBJECT} matches the sources ({} bytes)",
                fresh.len()
            );
        }
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn bpf_linker() -> Option<PathBuf> {
    prereq::find_on_path("bpf-linker").or_else(|| {
        let p = cargo_home().join("bin/bpf-linker");
        p.exists().then_some(p)
    })
}

/// A `rustup run nightly …` command with the outer cargo's environment
/// removed (it would pin the stable toolchain and its rustc).
pub(crate) fn nightly(program: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", program]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MANIFEST_DIR",
    ] {
        c.env_remove(var);
    }
    c
}

/// Nightly with `rust-src`, and bpf-linker (installed when missing, as root).
fn ensure_toolchain() -> Result<()> {
    if !cmd::succeeds_quietly(nightly("rustc").arg("--version")) {
        bail!(
            "the nightly Rust toolchain is needed to build the eBPF programs; install it with \
             `rustup toolchain install nightly --component rust-src`"
        );
    }
    let sysroot = nightly("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc +nightly --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("adding rust-src to the nightly toolchain")?;
    }
    if let Some(path) = bpf_linker() {
        println!("  found    bpf-linker {}", path.display());
        return Ok(());
    }
    let install = format!(
        "apt-get update && apt-get install -y {} && \
         PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} \
         --no-default-features --features llvm-22",
        LLVM_PACKAGES.join(" ")
    );
    if !prereq::is_root() {
        bail!("bpf-linker is missing (needed to build the eBPF programs); install it with:\n    sudo sh -c '{install}'");
    }
    println!("  MISSING  bpf-linker; installing LLVM 22 and building it (about 2 minutes)");
    if !Path::new("/usr/lib/llvm-22/bin/llvm-config").exists() {
        cmd::run(Command::new("apt-get").arg("update"))?;
        cmd::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends"])
                .args(LLVM_PACKAGES),
        )?;
    }
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    cmd::run(
        Command::new("cargo")
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
    .with_context(|| format!("installing bpf-linker failed; try:\n    {install}"))?;
    if bpf_linker().is_none() {
        bail!("bpf-linker is still not found after installing it; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// Builds the object into `target/ebpf-kernel`; returns its path.
fn build(repo: &Path) -> Result<PathBuf> {
    let kernel = repo.join("ebpf/kernel");
    let target_dir = repo.join("target/ebpf-kernel");
    let remap = format!(
        "--remap-path-prefix={}=/warden --remap-path-prefix={}=/cargo",
        repo.display(),
        cargo_home().display()
    );
    let mut linker_path = std::env::var("PATH").unwrap_or_default();
    if let Some(dir) = bpf_linker().as_deref().and_then(Path::parent) {
        linker_path = format!("{}:{linker_path}", dir.display());
    }
    cmd::run(
        nightly("cargo")
            .current_dir(&kernel)
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", remap)
            .env("PATH", linker_path)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                TARGET,
                "-Z",
                "build-std=core",
            ]),
    )
    .context("building the eBPF programs in ebpf/kernel")?;
    Ok(target_dir.join(TARGET).join("release/warden-ebpf"))
}
