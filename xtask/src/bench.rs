//! `cargo xtask bench`: performance figures, each printed beside a baseline
//! measured in the same run (never compared with numbers from elsewhere).
//!
//! Benchmarks today:
//! - SVID issuance (`identity/examples/svid_bench.rs`): SVIDs per second and
//!   p50/p99 latency per key type, against raw aws-lc-rs P-256 keygen + sign.

use std::path::Path;

use anyhow::Result;

use crate::cmd;

pub fn run(repo: &Path, args: &[String]) -> Result<()> {
    let mut steps = cmd::Steps::default();
    steps.run("SVID issuance (release build)", || {
        let mut c = cmd::cargo(repo);
        c.args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "warden-identity",
            "--example",
            "svid_bench",
            "--",
        ])
        .args(args);
        cmd::run(&mut c)
    })?;
    steps.print_summary();
    Ok(())
}
