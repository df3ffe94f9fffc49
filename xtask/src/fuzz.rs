//! `cargo xtask fuzz`: the coverage-guided fuzz targets in `fuzz/` (cargo
//! fuzz, libFuzzer, the installed nightly toolchain).
//!
//! `fuzz/` is its own cargo workspace, so stable builds and clippy of the
//! main workspace never compile it. Each run starts from the committed seed
//! corpus `fuzz/corpus/<target>` (read only) and keeps what it learns in
//! `target/fuzz/corpus/<target>`, so long local runs build on each other
//! without touching the committed files. A crash fails the run; libFuzzer
//! leaves the reproducer in `fuzz/artifacts/<target>/`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Steps};
use crate::ebpf_build::nightly;
use crate::prereq;

/// Every target in `fuzz/Cargo.toml`, in the order `--all` runs them.
pub const TARGETS: &[&str] = &[
    "pg_startup",
    "pg_frontend",
    "pg_backend",
    "scram_server",
    "http_gate",
    "resp",
    "config",
    "audit_verify",
    "mysql_packet",
    "pg_session_state",
    "mysql_session_state",
    "workload_authority",
    "store_rows",
    "redis_spliced",
];

/// Each target's time in `cargo xtask test` (CI): a smoke run on the
/// committed seeds, so a regression the corpus already reaches fails CI.
pub const CI_TIME: Duration = Duration::from_secs(10);

/// What to fuzz and for how long (each target).
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub targets: Vec<&'static str>,
    pub time: Duration,
}

/// `TARGET|--all [--time DURATION]`; the time defaults to 10 minutes for
/// one target and 20 seconds each for `--all`.
pub fn parse_args(args: &[String]) -> Result<Plan, String> {
    let mut targets: Option<Vec<&'static str>> = None;
    let mut time = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--all" => targets = Some(TARGETS.to_vec()),
            "--time" => {
                let value = rest
                    .next()
                    .ok_or("--time needs a duration, e.g. 20s or 10m")?;
                time = Some(parse_duration(value)?);
            }
            name => match TARGETS.iter().find(|t| **t == name) {
                Some(t) if targets.is_none() => targets = Some(vec![t]),
                Some(_) => return Err("give one target or --all".into()),
                None => {
                    return Err(format!(
                        "unknown fuzz target `{name}` (targets: {})",
                        TARGETS.join(", ")
                    ))
                }
            },
        }
    }
    let targets = targets.ok_or("name a fuzz target or --all")?;
    let default = if targets.len() == 1 { 600 } else { 20 };
    Ok(Plan {
        targets,
        time: time.unwrap_or(Duration::from_secs(default)),
    })
}

/// `90`, `20s`, `10m` or `2h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 20s, 10m or 2h"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("`{text}`: the unit must be s, m or h")),
    };
    if n == 0 {
        return Err("the fuzzing time must be above zero".into());
    }
    Ok(Duration::from_secs(n * scale))
}

/// Builds every target once, then runs each for `plan.time`.
pub fn run(repo: &Path, plan: &Plan) -> Result<()> {
    let mut steps = Steps::default();
    let result = run_steps(&mut steps, repo, plan);
    steps.print_summary();
    result
}

/// The steps of [`run`] (also `cargo xtask test`'s bounded fuzz run).
pub fn run_steps(steps: &mut Steps, repo: &Path, plan: &Plan) -> Result<()> {
    steps.run("cargo fuzz available", ensure_cargo_fuzz)?;
    let target_dir = cmd::target_dir(repo).join("fuzz");
    steps.run("build fuzz targets", || {
        cmd::run(
            fuzz_command(repo)
                .args(["build", "--target-dir"])
                .arg(&target_dir),
        )
        .context("building the fuzz targets in fuzz/")
    })?;
    for target in &plan.targets {
        let name = format!("fuzz {target} ({}s)", plan.time.as_secs());
        steps.run(&name, || run_target(repo, &target_dir, target, plan.time))?;
    }
    Ok(())
}

/// One target, bounded by libFuzzer's `-max_total_time`.
pub fn run_target(repo: &Path, target_dir: &Path, target: &str, time: Duration) -> Result<()> {
    let learned = target_dir.join("corpus").join(target);
    std::fs::create_dir_all(&learned).with_context(|| format!("creating {}", learned.display()))?;
    let seeds = repo.join("fuzz/corpus").join(target);
    if !seeds.is_dir() {
        bail!("the seed corpus {} is missing", seeds.display());
    }
    cmd::run(
        fuzz_command(repo)
            .args(["run", "--target-dir"])
            .arg(target_dir)
            .arg(target)
            .arg(&learned)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", time.as_secs()))
            // A slow input is a hang to fix, not something to wait for.
            .arg("-timeout=10")
            // No single allocation above 256 MiB, no more than 2 GiB in all:
            // a length field must never make warden allocate that much.
            .arg("-malloc_limit_mb=256")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1"),
    )
    .with_context(|| {
        format!(
            "fuzz target `{target}` failed; the reproducer is in fuzz/artifacts/{target}/ \
             (replay it with `cargo +nightly fuzz run {target} fuzz/artifacts/{target}/<file>`)"
        )
    })
}

/// `cargo fuzz …` under nightly, run in `fuzz/`'s parent.
fn fuzz_command(repo: &Path) -> std::process::Command {
    let mut command = nightly("cargo");
    command.current_dir(repo).arg("fuzz");
    command
}

/// cargo-fuzz on the nightly toolchain; installed when missing, as root.
fn ensure_cargo_fuzz() -> Result<()> {
    if cmd::succeeds_quietly(nightly("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    if !cmd::succeeds_quietly(nightly("rustc").arg("--version")) {
        bail!(
            "the nightly Rust toolchain is needed to fuzz; install it with \
             `rustup toolchain install nightly`"
        );
    }
    let install = "cargo install cargo-fuzz --locked";
    if !prereq::is_root() {
        bail!("cargo-fuzz is missing; install it with `{install}`");
    }
    println!("  MISSING  cargo-fuzz; running `{install}`");
    cmd::run(std::process::Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .with_context(|| format!("installing cargo-fuzz failed; try `{install}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_target_defaults_to_ten_minutes_and_all_to_twenty_seconds() {
        let one = parse_args(&strings(&["resp"])).unwrap();
        assert_eq!(one.targets, ["resp"]);
        assert_eq!(one.time, Duration::from_secs(600));
        let all = parse_args(&strings(&["--all", "--time", "30s"])).unwrap();
        assert_eq!(all.targets, TARGETS);
        assert_eq!(all.time, Duration::from_secs(30));
        assert_eq!(
            parse_args(&strings(&["--all"])).unwrap().time,
            Duration::from_secs(20)
        );
    }

    #[test]
    fn durations_and_bad_arguments() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10d").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_args(&strings(&["nope"])).is_err());
        assert!(parse_args(&strings(&[])).is_err());
        assert!(parse_args(&strings(&["resp", "--time"])).is_err());
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let fuzz = crate::repo_root().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target}"
            );
            assert!(fuzz.join(format!("fuzz_targets/{target}.rs")).is_file());
            let seeds = std::fs::read_dir(fuzz.join("corpus").join(target)).unwrap();
            assert!(seeds.count() > 0, "{target} has no seeds");
        }
    }
}
