//! `warden`: the node-local secretless identity proxy — daemon and CLI in one
//! binary. The binary is thin: argument parsing and the verbs live in [`cli`],
//! the daemon in [`daemon`], and each subsystem in its own module (see
//! ARCHITECTURE.md for the code map and invariants).

mod access_monitor;
mod admin;
mod admission;
mod anomaly;
mod audit;
mod authority;
mod cli;
mod config;
mod credentials;
mod crypto;
mod daemon;
mod error;
mod freeze;
mod http;
mod init;
mod journal;
mod masterkey;
mod metrics;
mod observe;
mod paths;
mod peer;
mod pg;
mod rotation;
mod service;
mod store;
mod timefmt;
mod tlsroute;
mod workload_api;
mod workload_identity;

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
