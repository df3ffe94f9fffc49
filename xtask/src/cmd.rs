//! Small helpers shared by the commands: running programs, timing steps,
//! locating build outputs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A `cargo` command run from the repository root, using the same cargo
/// that runs xtask when there is one.
pub fn cargo(repo: &Path) -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(program);
    command.current_dir(repo);
    command
}

/// Echoes `command`, runs it with inherited stdio and fails unless it exits 0.
pub fn run(command: &mut Command) -> Result<()> {
    let line = display(command);
    println!("$ {line}");
    let status = command
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` silently; true iff it could be started and exited 0.
pub fn succeeds_quietly(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A shell-like rendering of `command` for messages.
pub fn display(command: &Command) -> String {
    let program = command.get_program();
    let is_our_cargo = std::env::var_os("CARGO").is_some_and(|cargo| cargo == program);
    let program = if is_our_cargo {
        OsStr::new("cargo")
    } else {
        program
    };
    std::iter::once(program)
        .chain(command.get_args())
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `word` for a POSIX shell when it holds anything unusual.
pub fn shell_quote(word: impl AsRef<OsStr>) -> String {
    let word = word.as_ref().to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the repository
/// root, where we run cargo) or `<repo>/target`.
pub fn target_dir(repo: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo.join(dir),
        _ => repo.join("target"),
    }
}

/// The debug `warden` binary that `cargo build -p warden --bins` produces.
pub fn warden_bin(repo: &Path) -> PathBuf {
    target_dir(repo).join("debug").join("warden")
}

/// Builds the `warden` binary and checks that it landed where we expect.
pub fn build_warden(repo: &Path) -> Result<PathBuf> {
    run(cargo(repo).args(["build", "-p", "warden", "--bins"]))?;
    let bin = warden_bin(repo);
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Announces and times named steps, for a summary at the end.
#[derive(Default)]
pub struct Steps {
    finished: Vec<(String, Duration, bool)>,
}

impl Steps {
    /// Prints a `==> name` header, runs `step` and records how long it took.
    pub fn run<T>(&mut self, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = step();
        self.finished
            .push((name.to_owned(), start.elapsed(), result.is_ok()));
        result.with_context(|| format!("step `{name}` failed"))
    }

    /// Prints the time each step took and the total.
    pub fn print_summary(&self) {
        println!("\n==> time per step");
        let width = self
            .finished
            .iter()
            .map(|(name, _, _)| name.len())
            .max()
            .unwrap_or(0)
            .max("total".len());
        for (name, elapsed, ok) in &self.finished {
            let verdict = if *ok { "ok" } else { "FAILED" };
            println!("  {name:<width$}  {:>8}  {verdict}", seconds(*elapsed));
        }
        let total: Duration = self.finished.iter().map(|(_, elapsed, _)| *elapsed).sum();
        println!("  {:<width$}  {:>8}", "total", seconds(total));
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_alone() {
        assert_eq!(shell_quote("/usr/bin/warden"), "/usr/bin/warden");
        assert_eq!(shell_quote("--env=dev"), "--env=dev");
    }

    #[test]
    fn shell_quote_quotes_spaces_quotes_and_empty_words() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn display_renders_program_and_args() {
        let mut command = Command::new("cargo");
        command.args(["fmt", "--all", "--", "--check"]);
        assert_eq!(display(&command), "cargo fmt --all -- --check");
    }

    #[test]
    fn steps_record_failures() {
        let mut steps = Steps::default();
        assert!(steps.run("good", || Ok(())).is_ok());
        assert!(steps.run("bad", || -> Result<()> { bail!("no") }).is_err());
        let verdicts: Vec<bool> = steps.finished.iter().map(|(_, _, ok)| *ok).collect();
        assert_eq!(verdicts, [true, false]);
    }
}
