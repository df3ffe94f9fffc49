//! `cargo xtask` — warden's build automation (the alias lives in `.cargo/config.toml`).
//!
//! Commands:
//!
//! * `cargo xtask test [-- RUNNER_ARGS...]` — run every check and test, exactly
//!   as CI does (`.ci/run` just calls this). Steps, each announced with a
//!   `==> step` header, stop at the first failure:
//!   1. prerequisites: the system programs the tests need (see
//!      [`prereq::TEST_REQUIREMENTS`]) and the `rustfmt`/`clippy` components.
//!      As root, missing packages are installed with `apt-get`; otherwise the
//!      missing packages and the command to install them are printed.
//!   2. `cargo fmt --all -- --check`
//!   3. the eBPF programs rebuilt from `ebpf/kernel` (nightly + bpf-linker,
//!      installed when missing as root) and compared with the committed
//!      `ebpf/prebuilt/warden-ebpf.o`: a stale object fails the run
//!   4. `cargo clippy --workspace --all-targets -- -D warnings`
//!   5. `cargo build -p warden --bins` (the end-to-end tests run the binary)
//!   6. `cargo nextest run --workspace` plus `cargo test --workspace --doc`
//!      when nextest is installed, else `cargo test --workspace`. Arguments
//!      after `--` go to the test runner (`cargo xtask test -- audit`).
//!
//!   The tests get `WARDEN_BIN` (the freshly built `warden`) and `PG_BIN_DIR`
//!   (the directory holding `initdb`/`pg_ctl`), and as root
//!   `WARDEN_REQUIRE_EBPF=1` (eBPF tests fail rather than skip). The time spent per step is
//!   printed at the end.
//!
//! * `cargo xtask demo [start|stop|status]` — run warden's daemon on the
//!   quickstart config (`examples/quickstart.toml`, state in `.warden-demo/`).
//!   `start` (the default) builds warden, initialises the store on first use,
//!   starts `warden up` detached and prints what to try next; `stop` sends it
//!   SIGTERM; `status` relays `warden status`.
//!
//! * `cargo xtask bench [-- N]` — benchmarks, each beside a baseline measured
//!   in the same run (see `bench.rs`).
//!
//! * `cargo xtask ebpf [--check]` — rebuild the kernel programs from
//!   `ebpf/kernel` (nightly + bpf-linker, installed when missing as root) and
//!   update the committed `ebpf/prebuilt/warden-ebpf.o`, or with `--check`
//!   fail if it no longer matches the sources (see `ebpf_build.rs`).
//!
//! * `cargo xtask fuzz TARGET [--time 10m]` / `cargo xtask fuzz --all
//!   [--time 20s]` — the coverage-guided fuzz targets in `fuzz/` (cargo
//!   fuzz on the nightly toolchain), each bounded by libFuzzer's
//!   `-max_total_time`; a crash fails the run (see `fuzz.rs` and
//!   `docs/fuzzing.md`).
//!
//! * `cargo xtask package` — the Debian package (`target/debian/warden_*.deb`)
//!   built by cargo-deb, installed first when missing as root (see
//!   `package.rs`).
//!
//! * `cargo xtask help` — usage.

mod bench;
mod cmd;
mod demo;
mod demo_pg;
mod ebpf_build;
mod fuzz;
mod package;
mod prereq;
mod test_suite;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [-- ARGS...]          run fmt, clippy, build and every test (what CI runs);
                             ARGS go to the test runner, e.g. `cargo xtask test -- audit`
  demo [start|stop|status]   run warden on examples/quickstart.toml (default: start)
  bench [-- ARGS]            benchmarks with same-run baselines: SVID issuance, then pgbench
                             direct vs warden vs PgBouncer (--pg-seconds N, --pg-rounds N)
  ebpf [--check]             rebuild the kernel programs (nightly + bpf-linker) into
                             ebpf/prebuilt/warden-ebpf.o; --check only compares
  fuzz TARGET|--all [--time D]
                             coverage-guided fuzzing (cargo fuzz, nightly), D per target:
                             10m for one target, 20s each for --all by default
  package                    the Debian package (cargo-deb): target/debian/warden_*.deb
  help                       show this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command named by `args[0]`; usage errors exit with status 2.
fn dispatch(args: &[String]) -> anyhow::Result<ExitCode> {
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => return Ok(usage_error("missing command")),
    };
    match command {
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "test" => match parse_test_args(rest) {
            Ok(runner_args) => {
                test_suite::run(&repo_root(), runner_args)?;
                Ok(ExitCode::SUCCESS)
            }
            Err(msg) => Ok(usage_error(&msg)),
        },
        "bench" => {
            let args = rest.strip_prefix(&["--".to_string()][..]).unwrap_or(rest);
            bench::run(&repo_root(), args)?;
            Ok(ExitCode::SUCCESS)
        }
        "ebpf" => match rest {
            [] => {
                ebpf_build::run(&repo_root(), ebpf_build::Mode::Update)?;
                Ok(ExitCode::SUCCESS)
            }
            [flag] if flag == "--check" => {
                ebpf_build::run(&repo_root(), ebpf_build::Mode::Check)?;
                Ok(ExitCode::SUCCESS)
            }
            [other, ..] => Ok(usage_error(&format!("unexpected argument `{other}`"))),
        },
        "fuzz" => match fuzz::parse_args(rest) {
            Ok(plan) => {
                fuzz::run(&repo_root(), &plan)?;
                Ok(ExitCode::SUCCESS)
            }
            Err(msg) => Ok(usage_error(&msg)),
        },
        "package" => match rest {
            [] => {
                package::run(&repo_root())?;
                Ok(ExitCode::SUCCESS)
            }
            [other, ..] => Ok(usage_error(&format!("unexpected argument `{other}`"))),
        },
        "demo" => match parse_demo_args(rest) {
            Ok(action) => demo::run(&repo_root(), action),
            Err(msg) => Ok(usage_error(&msg)),
        },
        other => Ok(usage_error(&format!("unknown command `{other}`"))),
    }
}

/// `test` accepts nothing but an optional `-- ARGS...` tail for the runner.
fn parse_test_args(args: &[String]) -> Result<&[String], String> {
    match args.split_first() {
        None => Ok(&[]),
        Some((first, rest)) if first == "--" => Ok(rest),
        Some((first, _)) => Err(format!(
            "unexpected argument `{first}`; pass test-runner arguments after `--`, \
             e.g. `cargo xtask test -- {first}`"
        )),
    }
}

fn parse_demo_args(args: &[String]) -> Result<demo::Action, String> {
    match args {
        [] => Ok(demo::Action::Start),
        [one] => match one.as_str() {
            "start" => Ok(demo::Action::Start),
            "stop" => Ok(demo::Action::Stop),
            "status" => Ok(demo::Action::Status),
            other => Err(format!("unknown demo action `{other}`")),
        },
        [_, extra, ..] => Err(format!("unexpected argument `{extra}`")),
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("error: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

/// The workspace root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_args_after_double_dash_go_to_the_runner() {
        let args = strings(&["--", "audit", "--", "--nocapture"]);
        assert_eq!(
            parse_test_args(&args),
            Ok(&strings(&["audit", "--", "--nocapture"])[..])
        );
        assert_eq!(parse_test_args(&[]), Ok(&[][..]));
        assert!(parse_test_args(&strings(&["audit"])).is_err());
    }

    #[test]
    fn demo_action_defaults_to_start() {
        assert!(matches!(parse_demo_args(&[]), Ok(demo::Action::Start)));
        assert!(matches!(
            parse_demo_args(&strings(&["stop"])),
            Ok(demo::Action::Stop)
        ));
        assert!(parse_demo_args(&strings(&["restart"])).is_err());
        assert!(parse_demo_args(&strings(&["stop", "now"])).is_err());
    }

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(repo_root().join("xtask").is_dir());
    }
}
