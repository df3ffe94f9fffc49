//! `warden`: the node-local secretless identity proxy — daemon and CLI in one
//! binary. The binary is thin: argument parsing and the verbs live in [`cli`],
//! the daemon's wiring in [`daemon`], the admin socket in [`admin`]; the
//! subsystems are crates — `warden-core` (the admission step and everything
//! it consults) and one front end per protocol family (`warden-postgres`,
//! `warden-http`, `warden-tls`, `warden-workload-api`). See ARCHITECTURE.md
//! for the code map and invariants.

mod access_monitor;
mod admin;
mod ancestry;
mod cli;
mod daemon;
mod dburl;
mod doctor;
mod import;
mod observe;
mod privileges;
mod scan;

use clap::Parser;

fn main() {
    // A panic message could, through some future bug, carry data it should not:
    // report only where it happened.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown location".into());
        eprintln!("warden: internal error at {at} (this is a bug; please report it)");
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        eprintln!("warden: error: {}", e.message);
        std::process::exit(e.kind.exit_code());
    }
}
