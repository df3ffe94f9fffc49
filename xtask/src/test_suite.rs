//! `cargo xtask test`: every check and test, in the order CI runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{self, Steps};
use crate::prereq;

/// Runs all steps, then prints the time per step (also after a failure).
pub fn run(repo: &Path, runner_args: &[String]) -> Result<()> {
    let mut steps = Steps::default();
    let result = run_steps(&mut steps, repo, runner_args);
    steps.print_summary();
    result
}

fn run_steps(steps: &mut Steps, repo: &Path, runner_args: &[String]) -> Result<()> {
    let pg_bin_dir = steps.run("prerequisites", check_prerequisites)?;
    steps.run("cargo fmt --check", || check_formatting(repo))?;
    steps.run("eBPF programs from source", || {
        crate::ebpf_build::run(repo, crate::ebpf_build::Mode::Check)
    })?;
    steps.run("cargo clippy", || run_clippy(repo))?;
    let warden_bin = steps.run("build warden", || cmd::build_warden(repo))?;
    let env = TestEnv {
        warden_bin,
        pg_bin_dir,
    };
    env.print();
    // Before the tests: nextest's summary line stays the run's last word.
    if runner_args.is_empty() {
        let plan = crate::fuzz::Plan {
            targets: crate::fuzz::TARGETS.to_vec(),
            time: crate::fuzz::CI_TIME,
        };
        crate::fuzz::run_steps(steps, repo, &plan)?;
    } else {
        println!("\nnote: fuzz smoke run skipped (runner arguments given)");
    }
    if nextest_available(repo) {
        // Doc tests first: nextest's summary line must be the run's last word.
        if runner_args.is_empty() {
            steps.run("doc tests", || run_doc_tests(repo, &env))?;
        } else {
            println!(
                "\nnote: doc tests skipped (runner arguments given; nextest runs no doc tests)"
            );
        }
        steps.run("tests (cargo nextest)", || {
            run_nextest(repo, &env, runner_args)
        })?;
    } else {
        steps.run("tests (cargo test)", || {
            run_cargo_test(repo, &env, runner_args)
        })?;
    }
    Ok(())
}

/// Ensures system programs and Rust components; returns `PG_BIN_DIR`.
fn check_prerequisites() -> Result<PathBuf> {
    let found = prereq::ensure_system_packages(prereq::TEST_REQUIREMENTS)?;
    prereq::ensure_rust_components()?;
    let pg_bin_dir = found
        .pg_bin_dir()
        .context("PostgreSQL's initdb was not found")?;
    Ok(pg_bin_dir.to_path_buf())
}

fn check_formatting(repo: &Path) -> Result<()> {
    cmd::run(cmd::cargo(repo).args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted; run `cargo fmt --all` and commit the result")
}

fn run_clippy(repo: &Path) -> Result<()> {
    cmd::run(cmd::cargo(repo).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// Environment the tests rely on.
struct TestEnv {
    warden_bin: PathBuf,
    pg_bin_dir: PathBuf,
}

impl TestEnv {
    fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .env("WARDEN_BIN", &self.warden_bin)
            .env("PG_BIN_DIR", &self.pg_bin_dir);
        if prereq::is_root() {
            // As root (CI) the eBPF tests must run: a missing capability or
            // kernel feature fails them instead of skipping.
            command.env("WARDEN_REQUIRE_EBPF", "1");
        }
        command
    }

    fn print(&self) {
        println!(
            "\nexport WARDEN_BIN={}\nexport PG_BIN_DIR={}{}",
            cmd::shell_quote(&self.warden_bin),
            cmd::shell_quote(&self.pg_bin_dir),
            if prereq::is_root() {
                "\nexport WARDEN_REQUIRE_EBPF=1"
            } else {
                ""
            }
        );
    }
}

fn nextest_available(repo: &Path) -> bool {
    cmd::succeeds_quietly(cmd::cargo(repo).args(["nextest", "--version"]))
}

fn run_nextest(repo: &Path, env: &TestEnv, runner_args: &[String]) -> Result<()> {
    let mut command = cmd::cargo(repo);
    command
        .args(["nextest", "run", "--workspace", "--no-tests=warn"])
        .args(runner_args);
    cmd::run(env.apply(&mut command))
}

fn run_doc_tests(repo: &Path, env: &TestEnv) -> Result<()> {
    let mut command = cmd::cargo(repo);
    command.args(["test", "--workspace", "--doc"]);
    cmd::run(env.apply(&mut command))
}

fn run_cargo_test(repo: &Path, env: &TestEnv, runner_args: &[String]) -> Result<()> {
    let mut command = cmd::cargo(repo);
    command.args(["test", "--workspace"]).args(runner_args);
    cmd::run(env.apply(&mut command))
}
