//! The `warden` command line: argument parsing and the verbs.
//!
//! Verbs that touch secrets go to the daemon's admin socket when a daemon
//! answers there. When none does, they open the data dir directly ("offline"),
//! taking the data dir lock so they never race a daemon, and run the very same
//! request handler ([`crate::admin::dispatch`]) — same checks, same audit
//! records. Secret values are read from stdin or a file, never from argv.

use crate::access_monitor::{format_event_line, EventRecord};
use crate::admin::{self, AdminClient, Request, Response};
use crate::daemon;
use base64::Engine;
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use warden_core::audit;
use warden_core::authority::{IdentitySettings, ImportedCa, SvidInfo};
use warden_core::config::{self, Config};
use warden_core::error::{Error, ErrorKind, Result};
use warden_core::init;
use warden_core::masterkey::{KekPlan, KekSource, UnsealProgress, DEFAULT_CREDENTIAL_NAME};
use warden_core::paths;
use warden_core::service::{Caller, SecretService, Status, StorePolicy};
use warden_core::store::{SecretSummary, VersionInfo};
use warden_identity::TrustDomain;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Node-local secretless identity proxy",
    long_about = "warden attributes each local connection to a process, attests it to a workload identity, checks policy and opens the upstream connection itself, injecting the credential so applications never hold secrets.\n\nExit codes: 0 ok, 1 internal failure, 2 usage or invalid config, 3 denied, 4 sealed, 5 not found, 6 integrity failure (tampering, wrong key), 7 daemon unavailable."
)]
pub struct Cli {
    /// Configuration file (TOML). Defaults to $WARDEN_CONFIG, else built-in defaults.
    #[arg(long, global = true, env = "WARDEN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory; overrides `data_dir` from the config.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data dir, the encrypted store and the master key (or rotate the master key).
    Init(InitArgs),
    /// Run the daemon: route listeners (PostgreSQL, HTTP, TLS), the SPIFFE Workload API, the eBPF monitor, the admin API and metrics.
    Up,
    /// Show whether the daemon runs and whether it is sealed. Exit 0 only if the daemon answers.
    Status,
    /// Give the daemon unseal shares (one per line on stdin, or --from-file).
    Unseal {
        /// Read shares from this file instead of stdin.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// Manage secrets (values are read from stdin or a file, never from argv).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Routes defined in the configuration.
    #[command(subcommand)]
    Route(ListOnly),
    /// Workloads defined in the configuration.
    #[command(subcommand)]
    Workload(ListOnly),
    /// X.509-SVIDs issued by the daemon, and the trust bundle.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Read and verify the tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish or
    /// powershell), e.g. `warden completions bash > /etc/bash_completion.d/warden`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), e.g. `warden man | man -l -`.
    Man,
    /// Check this machine for `warden up`: kernel (cgroup v2, BTF, loading
    /// the eBPF programs), capabilities, data dir permissions, clock, store,
    /// daemon, and each route's upstream (TCP and TLS as the route verifies
    /// it). Prints a table with the fix for each failure; exit code 1 when a
    /// check fails.
    Doctor,
    /// Live view of access seen by the eBPF monitor: who connected to which
    /// route or protected upstream, and the kernel's verdict.
    Events {
        /// Keep printing new events as they happen (Ctrl-C to stop).
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many recent events to print first (the daemon keeps the last
        /// 1,024 in memory).
        #[arg(long, short = 'n', default_value_t = 50)]
        lines: usize,
        /// Every node's recent events, from the fleet's shared PostgreSQL
        /// store (each line names its node).
        #[arg(long)]
        fleet: bool,
        /// Show each process's ancestry with full executable paths and pids
        /// (default: file names only).
        #[arg(long)]
        wide: bool,
    },
    /// Freeze a workload: the kernel denies its connects, warden refuses its
    /// sessions and SVIDs and closes its open sessions (admin only, audited).
    Freeze {
        /// Workload name (see `warden workload list`).
        workload: String,
        /// Why (shown to its clients and in the audit log).
        #[arg(long)]
        reason: String,
        /// Lift the freeze automatically after this long, e.g. 30m.
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
    },
    /// Lift a freeze (admin only, audited).
    Unfreeze {
        /// Workload name.
        workload: String,
    },
    /// Frozen workloads: who froze them, since when, why.
    Frozen,
    /// Validate configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Dynamic database credential leases held by the daemon.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// The secret store's database (`[store]` in the config).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Fleet nodes on a shared PostgreSQL store: join tokens, joining, the
    /// node list, removal (docs/fleet.md).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Find hard-coded secrets in files and git history (docs/scan.md).
    /// Exit 0 clean, 1 findings, 2 usage error.
    Scan(crate::scan::ScanArgs),
    /// Move what `warden scan` found into warden: store the values, write a
    /// config fragment (secrets, database routes) and, with --rewrite, point
    /// the files at warden. A dry run unless --apply (docs/scan.md).
    Import(crate::import::ImportArgs),
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Apply the PostgreSQL store's schema migrations and print its schema
    /// version. Idempotent, and safe while other nodes start or migrate.
    Migrate,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Print a single-use, short-lived join token for a new node (admin only,
    /// audited). Hand it to the new host over a channel you trust and feed it
    /// to `warden node join` on stdin.
    Token {
        /// How long the token may be used, 30s to 24h.
        #[arg(long, default_value = "10m", value_name = "DURATION")]
        ttl: String,
    },
    /// Join this host to the fleet with a token from `warden node token`.
    /// The token is read from stdin (recommended), --token-file, or the
    /// argument — which other users can read in `ps` and which stays in shell
    /// history: avoid it.
    Join {
        /// The token (visible in `ps` and shell history: prefer stdin or --token-file).
        token: Option<String>,
        /// Read the token from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// For a fleet whose master key is a systemd credential: write the
        /// key's 32 raw bytes to stdout, for `systemd-creds encrypt`
        /// (refused when stdout is a terminal).
        #[arg(long)]
        credential_to_stdout: bool,
    },
    /// The fleet's nodes: id, host, joined, last seen, intermediate CA expiry.
    List,
    /// Remove a node: it stops serving and cannot start again, and its
    /// intermediate CA is revoked and not renewed (admin only, audited).
    Remove {
        /// The node id, as `warden node list` shows it.
        id: String,
    },
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Leases the daemon holds: route, workload, role, sessions, expiry (never passwords).
    List,
    /// Revoke a lease now: its sessions end and its role is dropped (admin only).
    Revoke {
        /// The lease ID, as `warden lease list` shows it.
        id: String,
    },
    /// Benchmark: create and revoke COUNT leases on ROUTE against its real database
    /// (daemon stopped; used by `cargo xtask bench`).
    #[command(hide = true)]
    Bench {
        #[arg(long)]
        route: String,
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

#[derive(Args)]
struct InitArgs {
    /// Where the master key comes from: file (default), shamir, systemd-credential.
    #[arg(long, value_name = "SOURCE")]
    kek_source: Option<KekSource>,
    /// Split the master key into N unseal shares (implies --kek-source shamir).
    #[arg(long, value_name = "N", requires = "unseal_threshold")]
    unseal_shares: Option<u8>,
    /// Number of shares needed to unseal.
    #[arg(long, value_name = "K", requires = "unseal_shares")]
    unseal_threshold: Option<u8>,
    /// Name of the systemd credential holding the master key.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CREDENTIAL_NAME)]
    credential_name: String,
    /// Replace the master key of an initialised (stopped) store: every data key is
    /// rewrapped. With a shamir store, give the current shares on stdin.
    #[arg(long)]
    rotate_kek: bool,
    /// SPIFFE trust domain of the CA (default: `trust_domain` from the config).
    #[arg(long, value_name = "DOMAIN")]
    trust_domain: Option<String>,
    /// Import an upstream intermediate CA certificate (PEM) instead of creating a self-signed root.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The imported CA's private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The chain above the imported CA, up to and including the root (PEM).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_bundle: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Store a new version of a secret. The value comes from stdin or --from-file.
    Put {
        name: String,
        #[arg(long)]
        env: Option<String>,
        /// Read the value from this file (exact bytes). Otherwise stdin, with one trailing newline removed.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// Print a secret value (admins only; audited). Requires --reveal.
    Get {
        name: String,
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        version: Option<u32>,
        /// Confirm that the value should be printed.
        #[arg(long)]
        reveal: bool,
    },
    /// List secrets (names, versions, dates; never values).
    List {
        /// Only this environment (default: all).
        #[arg(long)]
        env: Option<String>,
    },
    /// List the versions kept for a secret.
    Versions {
        name: String,
        #[arg(long)]
        env: Option<String>,
    },
    /// Remove every version of a secret.
    Rm {
        name: String,
        #[arg(long)]
        env: Option<String>,
    },
    /// Rotate a secret now with its configured method (secret[].rotate); audited.
    Rotate {
        name: String,
        #[arg(long)]
        env: Option<String>,
    },
}

#[derive(Subcommand)]
enum SvidCommand {
    /// The workload's current SVID: SPIFFE ID, serial, key type, validity (issued now if needed).
    Show {
        workload: String,
        /// Also print the certificate chain as PEM (never the private key).
        #[arg(long)]
        pem: bool,
    },
    /// Print the trust bundle (CA certificates, PEM) that verifies warden's SVIDs.
    Bundle,
}

#[derive(Subcommand)]
enum ListOnly {
    /// List them.
    List,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print the latest records.
    Tail {
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing new records as they are written.
        #[arg(short, long)]
        follow: bool,
        /// Every node's records, from the copy in the fleet's shared
        /// PostgreSQL store, merged by time (each line names its node).
        #[arg(long)]
        fleet: bool,
    },
    /// Check the hash chain; names the first modified, removed, inserted or reordered line.
    Verify {
        /// Also require the log to end at this hash (kept outside this machine).
        #[arg(long, value_name = "HASH", conflicts_with = "fleet")]
        expect_head: Option<String>,
        /// Check each node's chain in the copy in the fleet's shared
        /// PostgreSQL store instead of the local log.
        #[arg(long)]
        fleet: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Explain every error in FILE (key path, problem, fix). Defaults to --config.
    Check { file: Option<PathBuf> },
}

/// Loaded configuration plus the resolved data dir.
pub(crate) struct Context {
    pub(crate) cfg: Config,
    pub(crate) data_dir: PathBuf,
    json: bool,
}

/// Writes `bytes` to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::internal(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn load_context(cli: &Cli) -> Result<Context> {
    let cfg = match &cli.config {
        Some(p) => config::load(p).map_err(|report| Error::usage(report.to_string()))?,
        None => Config::default_for(Path::new("warden.toml")),
    };
    for w in &cfg.warnings {
        eprintln!("warden: warning: {}: {} (fix: {})", w.key, w.problem, w.fix);
    }
    let data_dir = cli
        .data_dir
        .clone()
        .or_else(|| cfg.data_dir.clone())
        .unwrap_or_else(paths::default_data_dir);
    let data_dir = std::path::absolute(&data_dir)
        .map_err(|e| Error::io("cannot resolve data dir", &data_dir, &e))?;
    Ok(Context {
        cfg,
        data_dir,
        json: cli.json,
    })
}

pub fn run(cli: Cli) -> Result<()> {
    if let Command::Config(ConfigCommand::Check { file }) = &cli.command {
        return config_check(file.as_deref().or(cli.config.as_deref()), cli.json);
    }
    // Need no configuration or data dir either.
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "warden", &mut text);
            return write_stdout(&text);
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut text = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut text)
                .map_err(|e| Error::internal(format!("cannot render the manual page: {e}")))?;
            return write_stdout(&text);
        }
        _ => {}
    }
    if let Command::Scan(args) = cli.command {
        // Needs no configuration or data dir.
        if crate::scan::run(args, cli.json)? {
            let _ = std::io::stdout().flush();
            std::process::exit(1);
        }
        return Ok(());
    }
    let ctx = load_context(&cli)?;
    match cli.command {
        Command::Scan(_) | Command::Completions { .. } | Command::Man => Ok(()),
        Command::Init(args) => run_init(&ctx, &args),
        Command::Up => daemon::run(&ctx.cfg, &ctx.data_dir),
        Command::Status => run_status(&ctx),
        Command::Unseal { from_file } => run_unseal(&ctx, from_file.as_deref()),
        Command::Secret(cmd) => run_secret(&ctx, cmd),
        Command::Route(ListOnly::List) => route_list(&ctx),
        Command::Workload(ListOnly::List) => workload_list(&ctx),
        Command::Svid(cmd) => run_svid(&ctx, cmd),
        Command::Audit(cmd) => run_audit(&ctx, cmd),
        Command::Events {
            follow,
            lines,
            fleet: false,
            wide,
        } => run_events(&ctx, follow, lines, wide),
        Command::Events {
            follow,
            lines,
            fleet: true,
            wide,
        } => events_fleet(&ctx, follow, lines, wide),
        Command::Doctor => {
            if crate::doctor::run(&ctx.cfg, &ctx.data_dir, ctx.json)? {
                let _ = std::io::stdout().flush();
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Freeze {
            workload,
            reason,
            for_,
        } => {
            let for_secs = match for_ {
                Some(d) => Some(
                    config::parse_duration(&d)
                        .map_err(|e| Error::usage(format!("--for {d:?}: {e}")))?
                        .as_secs()
                        .max(1),
                ),
                None => None,
            };
            run_freeze(
                &ctx,
                Request::Freeze {
                    workload,
                    reason,
                    for_secs,
                },
            )
        }
        Command::Unfreeze { workload } => run_freeze(&ctx, Request::Unfreeze { workload }),
        Command::Frozen => run_freeze(&ctx, Request::Frozen),
        Command::Config(_) => Ok(()),
        Command::Lease(cmd) => run_lease(&ctx, cmd),
        Command::Store(StoreCommand::Migrate) => run_store_migrate(&ctx),
        Command::Node(cmd) => run_node(&ctx, cmd),
        Command::Import(args) => crate::import::run(&ctx, args),
    }
}

// ---- fleet nodes ------------------------------------------------------------

fn run_node(ctx: &Context, cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Token { ttl } => {
            let ttl = config::parse_duration(&ttl)
                .map_err(|e| Error::usage(format!("--ttl {ttl:?}: {e}")))?;
            let mut target = Target::connect(ctx)?;
            match target.call(Request::NodeToken {
                ttl_secs: ttl.as_secs(),
            })? {
                Response::JoinToken {
                    id,
                    expires_at,
                    carries_key,
                    token,
                } => {
                    if ctx.json {
                        return print_json(&serde_json::json!({
                            "id": id,
                            "expires_at": expires_at,
                            "carries_key": carries_key,
                            "token": &*token,
                        }));
                    }
                    eprintln!(
                        "join token {id}: single use, valid until {expires_at}{}. On the new host: `warden node join < token-file` (stdin keeps it out of ps and shell history).",
                        if carries_key {
                            "; it unwraps a copy of the master key"
                        } else {
                            "; the new node is unsealed with the unseal shares"
                        }
                    );
                    let mut out = std::io::stdout().lock();
                    out.write_all(token.as_bytes())
                        .and_then(|_| out.write_all(b"\n"))
                        .and_then(|_| out.flush())
                        .map_err(|e| Error::internal(format!("cannot write the token: {e}")))?;
                    Ok(())
                }
                other => other.into_result::<serde_json::Value>().map(|_| ()),
            }
        }
        NodeCommand::Join {
            token,
            token_file,
            credential_to_stdout,
        } => {
            if credential_to_stdout && std::io::stdout().is_terminal() {
                return Err(Error::usage(
                    "--credential-to-stdout writes the master key's raw bytes: pipe it into `systemd-creds encrypt`, never to a terminal",
                ));
            }
            let text: Zeroizing<String> = match (token, token_file) {
                (Some(t), _) => Zeroizing::new(t),
                (None, Some(p)) => read_lines(Some(&p))?
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        Error::usage(format!(
                            "{} holds no join token; fix: write the line `warden node token` printed into it",
                            p.display()
                        ))
                    })?,
                (None, None) => {
                    if std::io::stdin().is_terminal() {
                        eprintln!("Paste the join token (input hidden), then Enter and Ctrl-D.");
                    }
                    read_lines(None)?
                        .into_iter()
                        .next()
                        .ok_or_else(|| {
                            Error::usage(
                                "no join token on stdin; fix: `warden node join < token-file` with the line `warden node token` printed on a fleet node",
                            )
                        })?
                }
            };
            let out = init::join(&ctx.data_dir, &ctx.cfg.store, &text, credential_to_stdout)?;
            if let Some(raw) = &out.credential_key {
                let mut o = std::io::stdout().lock();
                o.write_all(raw)
                    .and_then(|_| o.flush())
                    .map_err(|e| Error::internal(format!("cannot write the key: {e}")))?;
            } else if ctx.json {
                print_json(&serde_json::json!({
                    "node": out.node_id,
                    "name": out.node_name,
                    "token": out.token_id,
                    "kek_source": out.source.to_string(),
                    "key_file": out.key_file,
                }))?;
            }
            eprintln!(
                "joined the fleet as node {} ({}) with join token {}{}; start it with `warden up`{}",
                out.node_id,
                out.node_name,
                out.token_id,
                match &out.key_file {
                    Some(f) => format!("; master key written to {}", f.display()),
                    None => String::new(),
                },
                if out.source == KekSource::Shamir {
                    ", then `warden unseal` with the fleet's shares"
                } else {
                    ""
                }
            );
            Ok(())
        }
        NodeCommand::List => {
            let mut target = Target::connect(ctx)?;
            let list: Vec<warden_core::fleet::NodeRecord> =
                target.call(Request::NodeList)?.into_result()?;
            if ctx.json {
                return print_json(&list);
            }
            println!(
                "{:<12}  {:<7}  {:<20}  {:<27}  {:<27}  {:<27}  NAME",
                "ID", "STATE", "HOST", "JOINED", "LAST SEEN", "INTERMEDIATE EXPIRES"
            );
            for n in list {
                println!(
                    "{:<12}  {:<7}  {:<20}  {:<27}  {:<27}  {:<27}  {}",
                    n.id,
                    match n.state {
                        warden_core::fleet::NodeState::Active => "active",
                        warden_core::fleet::NodeState::Removed => "removed",
                    },
                    n.hostname,
                    n.joined_at,
                    n.last_seen,
                    n.intermediate
                        .as_ref()
                        .map(|i| i.not_after.as_str())
                        .unwrap_or("-"),
                    n.name
                );
            }
            Ok(())
        }
        NodeCommand::Remove { id } => {
            let mut target = Target::connect(ctx)?;
            let r: warden_core::fleet::NodeRecord =
                target.call(Request::NodeRemove { id })?.into_result()?;
            if ctx.json {
                return print_json(&r);
            }
            println!(
                "removed node {} ({}): it stops serving within a second if it runs, cannot start again, and its intermediate CA{} is not renewed. Its copy of the master key is not erased: rotate the master key (docs/fleet.md) if the host is not trusted any more.",
                r.id,
                r.name,
                if r.revoked_intermediates.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.revoked_intermediates.join(", "))
                }
            );
            Ok(())
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?;
    println!("{s}");
    Ok(())
}

// ---- init -----------------------------------------------------------------

fn run_init(ctx: &Context, a: &InitArgs) -> Result<()> {
    let source = match (a.kek_source, a.unseal_shares) {
        (Some(s), Some(_)) if s != KekSource::Shamir => {
            return Err(Error::usage(format!(
            "--unseal-shares splits the key into shares, which needs --kek-source shamir (not {s})"
        )))
        }
        (_, Some(_)) => KekSource::Shamir,
        (Some(KekSource::Shamir), None) => {
            return Err(Error::usage(
                "--kek-source shamir needs --unseal-shares N --unseal-threshold K",
            ))
        }
        (Some(s), None) => s,
        (None, None) => KekSource::File,
    };
    let plan = KekPlan {
        source,
        shares: a.unseal_shares.unwrap_or(0),
        threshold: a.unseal_threshold.unwrap_or(0),
        credential_name: a.credential_name.clone(),
    };
    let outcome = if a.rotate_kek {
        if a.trust_domain.is_some() || a.ca_cert.is_some() {
            return Err(Error::usage(
                "--trust-domain and --ca-cert apply to a new store, not to --rotate-kek",
            ));
        }
        let shares = read_shares_if_needed(ctx)?;
        init::rotate_kek(&ctx.data_dir, &ctx.cfg.store, &plan, &shares)?
    } else {
        let mut settings = IdentitySettings::from_config(&ctx.cfg)?;
        if let Some(td) = &a.trust_domain {
            settings.trust_domain =
                TrustDomain::parse(td).map_err(|e| Error::usage(format!("--trust-domain: {e}")))?;
            if td != &ctx.cfg.trust_domain {
                eprintln!(
                    "warden: note: set trust_domain = \"{td}\" in the config too; the daemon refuses a config whose trust domain differs from the store's"
                );
            }
        }
        let import = match (&a.ca_cert, &a.ca_key) {
            (Some(cert), Some(key)) => Some(ImportedCa {
                cert_pem: read_text(cert)?,
                key_pem: Zeroizing::new(read_text(key)?),
                chain_pem: match &a.ca_bundle {
                    Some(b) => read_text(b)?,
                    None => String::new(),
                },
            }),
            _ => None,
        };
        init::init(&ctx.data_dir, &ctx.cfg.store, &plan, settings, import)?
    };
    if ctx.json {
        let shares: Vec<&str> = outcome.shares.iter().map(|s| s.as_str()).collect();
        return print_json(&serde_json::json!({
            "data_dir": ctx.data_dir,
            "kek_source": outcome.source.to_string(),
            "kek_id": outcome.kek_id,
            "key_file": outcome.key_file,
            "unseal_shares": shares,
            "unseal_threshold": outcome.threshold,
            "rewrapped_data_keys": outcome.rewrapped,
        }));
    }
    match outcome.rewrapped {
        Some(n) => println!(
            "master key rotated: new key id {} ({}); {n} data key(s) rewrapped",
            outcome.kek_id, outcome.source
        ),
        None => println!(
            "initialised {} (master key id {}, source {})",
            ctx.data_dir.display(),
            outcome.kek_id,
            outcome.source
        ),
    }
    match outcome.source {
        KekSource::File => {
            if let Some(f) = &outcome.key_file {
                eprintln!(
                    "warden: WARNING: the master key is a plain file, {}. Anyone who can read it (and the store) can decrypt every secret. For production use `--unseal-shares N --unseal-threshold K` or `--kek-source systemd-credential`.",
                    f.display()
                );
            }
        }
        KekSource::Shamir => {
            eprintln!(
                "warden: the master key is split into {} shares; any {} unseal it. Hand each share to a different person now: they are shown only this once and warden does not keep them.",
                outcome.shares.len(),
                outcome.threshold
            );
            for (i, s) in outcome.shares.iter().enumerate() {
                println!("unseal share {}: {}", i + 1, s.as_str());
            }
        }
        KekSource::SystemdCredential => {
            eprintln!(
                "warden: the master key is read from the systemd credential {:?} at every start.",
                a.credential_name
            );
        }
    }
    Ok(())
}

// ---- store ----------------------------------------------------------------

fn run_store_migrate(ctx: &Context) -> Result<()> {
    use warden_core::config::StoreBackend;
    use warden_core::store::postgres::{node_name, PostgresBackend, PostgresSettings};
    if ctx.cfg.store.backend == StoreBackend::Sqlite {
        return Err(Error::usage(
            "store.backend is \"sqlite\", whose store.db brings its schema up to date itself when opened; `warden store migrate` is for backend = \"postgres\"",
        ));
    }
    let settings = PostgresSettings::from_config(&ctx.cfg.store)?;
    let backend = PostgresBackend::connect(settings, &node_name(&ctx.data_dir))?;
    let (before, after) = backend.migrate()?;
    if ctx.json {
        return print_json(&serde_json::json!({
            "store": backend.describe(),
            "schema_version": after,
            "previous_version": before,
        }));
    }
    if before == after {
        println!(
            "{}: schema version {after} (up to date)",
            backend.describe()
        );
    } else {
        println!(
            "{}: schema version {after} (migrated from {before})",
            backend.describe()
        );
    }
    Ok(())
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| Error::io("cannot read", p, &e))
}

fn run_svid(ctx: &Context, cmd: SvidCommand) -> Result<()> {
    let mut target = Target::connect(ctx)?;
    match cmd {
        SvidCommand::Show { workload, pem } => {
            if matches!(target, Target::Offline { .. }) {
                return Err(Error::unavailable(
                    "SVIDs are issued by the daemon: start `warden up` first",
                ));
            }
            let info: SvidInfo = target
                .call(Request::SvidShow { workload, pem })?
                .into_result()?;
            if ctx.json {
                return print_json(&info);
            }
            println!("workload:    {}", info.workload);
            println!("spiffe id:   {}", info.spiffe_id);
            println!("serial:      {}", info.serial);
            println!("key type:    {}", info.key_type);
            println!("not before:  {}", info.not_before);
            println!("not after:   {}", info.not_after);
            println!("refresh at:  {}", info.refresh_at);
            println!("ca serial:   {}", info.ca_serial);
            if pem {
                print!("{}", info.chain_pem);
            }
        }
        SvidCommand::Bundle => {
            let pem: String = target.call(Request::SvidBundle)?.into_result()?;
            print!("{pem}");
        }
    }
    Ok(())
}

fn read_shares_if_needed(ctx: &Context) -> Result<Vec<Zeroizing<String>>> {
    let (_, seal, _) = {
        let _lock = init::lock_for_rotation(&ctx.data_dir)?;
        warden_core::service::open_store(&ctx.data_dir, &ctx.cfg.store)?
    };
    if seal.source != KekSource::Shamir {
        return Ok(Vec::new());
    }
    let k = seal.shamir.as_ref().map(|s| s.threshold).unwrap_or(0);
    if std::io::stdin().is_terminal() {
        eprintln!("The current master key is split into shares: enter {k} current unseal shares, one per line, then Ctrl-D.");
    }
    read_lines(None)
}

// ---- daemon or offline ------------------------------------------------------

/// Where requests go: the running daemon, or the data dir directly.
pub(crate) enum Target {
    Daemon(AdminClient),
    Offline {
        service: Box<SecretService>,
        _lock: paths::DataDirLock,
    },
}

impl Target {
    pub(crate) fn connect(ctx: &Context) -> Result<Target> {
        let socket = daemon::admin_socket_path(&ctx.cfg, &ctx.data_dir);
        if let Some(c) = AdminClient::connect(&socket)? {
            return Ok(Target::Daemon(c));
        }
        paths::check_private_dir(&ctx.data_dir)?;
        let lock = paths::lock_data_dir(&ctx.data_dir).map_err(|e| {
            Error::unavailable(format!(
                "{}; its admin socket {} does not answer",
                e.message,
                socket.display()
            ))
        })?;
        let service =
            SecretService::open(&ctx.data_dir, StorePolicy::from_config(&ctx.cfg), false)?;
        Ok(Target::Offline {
            service: Box::new(service),
            _lock: lock,
        })
    }

    pub(crate) fn call(&mut self, req: Request) -> Result<Response> {
        match self {
            Target::Daemon(c) => c.call(&req),
            Target::Offline { service, .. } => {
                let resp = admin::dispatch(service, None, &Caller::this_process(), req);
                if let Response::Error {
                    kind: ErrorKind::Sealed,
                    message,
                } = resp
                {
                    return Ok(Response::Error {
                        kind: ErrorKind::Sealed,
                        message: format!(
                            "{message} (no daemon is running: start `warden up`, then run `warden unseal`)"
                        ),
                    });
                }
                Ok(resp)
            }
        }
    }
}

fn run_status(ctx: &Context) -> Result<()> {
    let socket = daemon::admin_socket_path(&ctx.cfg, &ctx.data_dir);
    let Some(mut client) = AdminClient::connect(&socket)? else {
        if ctx.json {
            print_json(&serde_json::json!({"running": false, "admin_socket": socket}))?;
        }
        return Err(Error::unavailable(format!(
            "no warden daemon answers on {} (start it with `warden up`)",
            socket.display()
        )));
    };
    let status: Status = client.call(&Request::Status)?.into_result()?;
    if ctx.json {
        return print_json(
            &serde_json::json!({"running": true, "admin_socket": socket, "status": status}),
        );
    }
    println!(
        "daemon:        running (pid {})",
        status
            .daemon_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into())
    );
    println!("admin socket:  {}", socket.display());
    println!("data dir:      {}", status.data_dir.display());
    println!(
        "master key:    {} (id {})",
        status.kek_source, status.kek_id
    );
    match &status.unseal_progress {
        Some(p) => println!(
            "state:         SEALED ({} of {} unseal shares)",
            p.provided, p.threshold
        ),
        None => println!("state:         unsealed"),
    }
    match &status.store_unreachable {
        Some(why) => println!("secrets:       ? ({why})"),
        None => println!("secrets:       {}", status.secrets),
    }
    println!("environment:   {}", status.default_env);
    if let Some(n) = &status.fleet_node {
        println!("fleet node:    {} ({})", n.id, n.name);
        println!(
            "intermediate:  {}",
            n.intermediate
                .as_ref()
                .map(|i| format!("serial {}, valid until {}", i.serial, i.not_after))
                .unwrap_or_else(|| "none (signing with the root)".into())
        );
    }
    if let Some(r) = &status.audit_copy {
        println!("audit copy:    {}", r.describe());
    }
    Ok(())
}

fn run_unseal(ctx: &Context, from_file: Option<&Path>) -> Result<()> {
    let socket = daemon::admin_socket_path(&ctx.cfg, &ctx.data_dir);
    let Some(mut client) = AdminClient::connect(&socket)? else {
        return Err(Error::unavailable(format!(
            "no warden daemon answers on {}: start it with `warden up`, then unseal",
            socket.display()
        )));
    };
    if from_file.is_none() && std::io::stdin().is_terminal() {
        eprintln!("Enter unseal shares, one per line (input hidden); Ctrl-D to finish.");
    }
    let shares = read_lines(from_file)?;
    if shares.is_empty() {
        return Err(Error::usage("no unseal share given on stdin"));
    }
    let mut last = None;
    for share in shares {
        let progress: UnsealProgress = client.call(&Request::Unseal { share })?.into_result()?;
        if !ctx.json {
            if progress.unsealed {
                println!("unsealed: warden now serves secrets");
            } else {
                println!(
                    "share accepted: {} of {} ({} more needed)",
                    progress.provided,
                    progress.threshold,
                    progress.threshold.saturating_sub(progress.provided)
                );
            }
        }
        let done = progress.unsealed;
        last = Some(progress);
        if done {
            break;
        }
    }
    if ctx.json {
        print_json(&last)?;
    }
    Ok(())
}

// ---- secrets --------------------------------------------------------------

fn run_secret(ctx: &Context, cmd: SecretCommand) -> Result<()> {
    // Read the value before connecting so a slow typist does not hold the lock.
    let value = match &cmd {
        SecretCommand::Put { name, from_file, .. } => Some(read_secret_value(name, from_file.as_deref())?),
        SecretCommand::Get { reveal: false, name, .. } => {
            return Err(Error::usage(format!(
                "refusing to print the value of {name:?} without --reveal (the read is audited); to see versions use `warden secret versions {name}`"
            )))
        }
        _ => None,
    };
    if let SecretCommand::Rotate { name, env } = cmd {
        return secret_rotate(ctx, &name, env.as_deref());
    }
    let mut target = Target::connect(ctx)?;
    match cmd {
        SecretCommand::Rotate { .. } => {}
        SecretCommand::Put { name, env, .. } => {
            let value = value.ok_or_else(|| Error::internal("value missing"))?;
            let value_b64 =
                Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*value));
            drop(value);
            let version: u32 = target
                .call(Request::SecretPut {
                    name: name.clone(),
                    env: env.clone(),
                    value_b64,
                    origin: None,
                })?
                .into_result()?;
            let env = env.unwrap_or_else(|| ctx.cfg.environment.clone());
            if ctx.json {
                return print_json(
                    &serde_json::json!({"name": name, "env": env, "version": version}),
                );
            }
            println!("stored {name} (env {env}) version {version}");
        }
        SecretCommand::Get {
            name, env, version, ..
        } => match target.call(Request::SecretReveal { name, env, version })? {
            Response::Revealed { value_b64, .. } => {
                let value = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(value_b64.as_bytes())
                        .map_err(|_| Error::internal("daemon returned invalid base64"))?,
                );
                let mut out = std::io::stdout().lock();
                out.write_all(&value)
                    .and_then(|_| out.flush())
                    .map_err(|e| Error::internal(format!("cannot write to stdout: {e}")))?;
            }
            other => {
                other.into_result::<serde_json::Value>()?;
            }
        },
        SecretCommand::List { env } => {
            let list: Vec<SecretSummary> =
                target.call(Request::SecretList { env })?.into_result()?;
            if ctx.json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no secrets");
                return Ok(());
            }
            println!(
                "{:<40} {:<12} {:>7} {:>5}  UPDATED",
                "NAME", "ENV", "LATEST", "KEPT"
            );
            for s in list {
                println!(
                    "{:<40} {:<12} {:>7} {:>5}  {}",
                    s.name, s.env, s.latest_version, s.versions_kept, s.updated_at
                );
            }
        }
        SecretCommand::Versions { name, env } => {
            let list: Vec<VersionInfo> = target
                .call(Request::SecretVersions { name, env })?
                .into_result()?;
            if ctx.json {
                return print_json(&list);
            }
            println!("{:>7}  {:<28} {:<20} KEK", "VERSION", "CREATED", "BY");
            for v in list {
                println!(
                    "{:>7}  {:<28} {:<20} {}",
                    v.version, v.created_at, v.created_by, v.kek_id
                );
            }
        }
        SecretCommand::Rm { name, env } => {
            let removed: u32 = target
                .call(Request::SecretRm {
                    name: name.clone(),
                    env: env.clone(),
                })?
                .into_result()?;
            let env = env.unwrap_or_else(|| ctx.cfg.environment.clone());
            if ctx.json {
                return print_json(
                    &serde_json::json!({"name": name, "env": env, "removed_versions": removed}),
                );
            }
            println!("removed {name} (env {env}): {removed} version(s)");
        }
    }
    Ok(())
}

/// Turns terminal echo off while reading a secret, restoring it on drop.
struct NoEcho {
    saved: Option<rustix::termios::Termios>,
}

impl NoEcho {
    fn new() -> NoEcho {
        let stdin = rustix::stdio::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(stdin) else {
            return NoEcho { saved: None };
        };
        let mut t = saved.clone();
        t.local_modes.remove(rustix::termios::LocalModes::ECHO);
        let _ = rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &t);
        NoEcho { saved: Some(saved) }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                rustix::stdio::stdin(),
                rustix::termios::OptionalActions::Now,
                t,
            );
            eprintln!();
        }
    }
}

fn read_secret_value(name: &str, from_file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    match from_file {
        Some(p) => {
            let mut f = std::fs::File::open(p).map_err(|e| Error::io("cannot open", p, &e))?;
            f.read_to_end(&mut buf)
                .map_err(|e| Error::io("cannot read", p, &e))?;
        }
        None => {
            let tty = std::io::stdin().is_terminal();
            let _echo = tty.then(|| {
                eprintln!(
                    "Enter the value for {name} (input hidden), then press Enter and Ctrl-D:"
                );
                NoEcho::new()
            });
            std::io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .map_err(|e| Error::internal(format!("cannot read the value from stdin: {e}")))?;
            if buf.ends_with(b"\n") {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
            }
        }
    }
    if buf.is_empty() {
        return Err(Error::usage(format!(
            "no value for {name}: pipe it on stdin (e.g. `warden secret put {name} < value.txt`) or use --from-file; values are never taken from the command line"
        )));
    }
    Ok(buf)
}

/// Non-empty trimmed lines from a file or stdin (echo off on a terminal).
fn read_lines(from_file: Option<&Path>) -> Result<Vec<Zeroizing<String>>> {
    let mut text = Zeroizing::new(String::new());
    match from_file {
        Some(p) => {
            let mut f = std::fs::File::open(p).map_err(|e| Error::io("cannot open", p, &e))?;
            f.read_to_string(&mut text)
                .map_err(|e| Error::io("cannot read", p, &e))?;
        }
        None => {
            let _echo = std::io::stdin().is_terminal().then(NoEcho::new);
            std::io::stdin()
                .lock()
                .read_to_string(&mut text)
                .map_err(|e| Error::internal(format!("cannot read stdin: {e}")))?;
        }
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| Zeroizing::new(l.to_string()))
        .collect())
}

// ---- config-only views ------------------------------------------------------

fn route_list(ctx: &Context) -> Result<()> {
    if ctx.json {
        let v: Vec<_> = ctx
            .cfg
            .routes
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "kind": format!("{:?}", r.kind).to_lowercase(), "listen": r.listen.to_string(), "upstream": r.upstream, "allow": r.allow}))
            .collect();
        return print_json(&v);
    }
    if ctx.cfg.routes.is_empty() {
        println!("no routes configured");
        return Ok(());
    }
    println!(
        "{:<20} {:<9} {:<22} {:<32} ALLOW",
        "NAME", "KIND", "LISTEN", "UPSTREAM"
    );
    for r in &ctx.cfg.routes {
        println!(
            "{:<20} {:<9} {:<22} {:<32} {}",
            r.name,
            format!("{:?}", r.kind).to_lowercase(),
            r.listen.to_string(),
            r.upstream,
            if r.allow.is_empty() {
                "(nobody)".to_string()
            } else {
                r.allow.join(",")
            }
        );
    }
    Ok(())
}

fn workload_list(ctx: &Context) -> Result<()> {
    if ctx.json {
        let v: Vec<_> = ctx
            .cfg
            .workloads
            .iter()
            .map(|w| serde_json::json!({"name": w.name, "spiffe_id": w.spiffe_id}))
            .collect();
        return print_json(&v);
    }
    if ctx.cfg.workloads.is_empty() {
        println!("no workloads configured");
        return Ok(());
    }
    println!("{:<20} SPIFFE ID", "NAME");
    for w in &ctx.cfg.workloads {
        println!("{:<20} {}", w.name, w.spiffe_id);
    }
    Ok(())
}

// ---- freeze -----------------------------------------------------------------

fn run_freeze(ctx: &Context, req: Request) -> Result<()> {
    let list = matches!(req, Request::Frozen);
    let verb = req.op();
    let value: serde_json::Value = match Target::connect(ctx)? {
        Target::Daemon(mut c) => c.call(&req)?.into_result()?,
        Target::Offline { mut service, .. } => {
            let known: Vec<String> = ctx.cfg.workloads.iter().map(|w| w.name.clone()).collect();
            let r = req
                .freeze_request()
                .ok_or_else(|| Error::internal("not a freeze request"))?;
            let v = warden_core::freeze::admin_offline(
                &mut service,
                &known,
                &Caller::this_process(),
                r,
            )?;
            if !list {
                eprintln!("warden: no daemon is running: recorded in the store; the daemon applies it when it starts");
            }
            v
        }
    };
    let fleet = ctx.cfg.store.backend == warden_core::config::StoreBackend::Postgres;
    if list && fleet {
        let entries: Vec<warden_core::freeze::FreezeEntry> = serde_json::from_value(value.clone())
            .map_err(|e| Error::internal(format!("unexpected answer: {e}")))?;
        let nodes = if entries.is_empty() {
            Ok(Vec::new())
        } else {
            frozen_nodes(ctx, &entries)
        };
        if let Err(e) = &nodes {
            eprintln!(
                "warden: cannot show which nodes applied the freezes: {}",
                e.message
            );
        }
        let nodes = nodes.unwrap_or_default();
        if ctx.json {
            let list: Vec<serde_json::Value> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    if let (Some(obj), Some(n)) = (v.as_object_mut(), nodes.get(i)) {
                        obj.insert("nodes".into(), serde_json::to_value(n).unwrap_or_default());
                    }
                    v
                })
                .collect();
            return print_json(&serde_json::Value::Array(list));
        }
        if entries.is_empty() {
            println!("no workload is frozen");
        }
        for (i, e) in entries.iter().enumerate() {
            println!("{}", warden_core::freeze::format_entry(e));
            if let Some(n) = nodes.get(i) {
                print_frozen_nodes(n);
            }
        }
        return Ok(());
    }
    if ctx.json {
        return print_json(&value);
    }
    if list {
        let entries: Vec<warden_core::freeze::FreezeEntry> = serde_json::from_value(value)
            .map_err(|e| Error::internal(format!("unexpected answer: {e}")))?;
        if entries.is_empty() {
            println!("no workload is frozen");
        }
        for e in &entries {
            println!("{}", warden_core::freeze::format_entry(e));
        }
        return Ok(());
    }
    let e: warden_core::freeze::FreezeEntry = serde_json::from_value(value)
        .map_err(|e| Error::internal(format!("unexpected answer: {e}")))?;
    match verb {
        "freeze" => println!("{}", warden_core::freeze::format_entry(&e)),
        _ => println!("workload {} unfrozen", e.workload),
    }
    Ok(())
}

// ---- audit ------------------------------------------------------------------

fn run_events(ctx: &Context, follow: bool, lines: usize, wide: bool) -> Result<()> {
    let socket = daemon::admin_socket_path(&ctx.cfg, &ctx.data_dir);
    let Some(mut client) = AdminClient::connect(&socket)? else {
        return Err(Error::unavailable(format!(
            "no warden daemon answers on {}: access events come from the running daemon's eBPF monitor; start it with `warden up`",
            socket.display()
        )));
    };
    let kept = crate::access_monitor::RECENT_EVENTS;
    if lines > kept {
        eprintln!(
            "warden: the daemon keeps only the last {kept} access events in memory; showing at most {kept} (use --follow to watch new ones as they come)"
        );
    }
    let req = Request::Events {
        follow,
        limit: Some(lines),
    };
    let json = ctx.json;
    client.stream(&req, |resp| {
        let value: serde_json::Value = resp.into_result()?;
        if value.get("end").is_some() {
            return Ok(false);
        }
        if let Some(n) = value.get("skipped") {
            eprintln!("warden: {n} events skipped (this viewer fell behind)");
            return Ok(true);
        }
        let line = if json {
            value.to_string()
        } else {
            let record: EventRecord = serde_json::from_value(value)
                .map_err(|e| Error::internal(format!("unexpected event from daemon: {e}")))?;
            format_event_line(&record, wide)
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`warden events | head`) ends the stream quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            return Ok(false);
        }
        Ok(true)
    })
}

fn run_audit(ctx: &Context, cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Tail {
            lines,
            follow,
            fleet: true,
        } => return audit_tail_fleet(ctx, lines, follow),
        AuditCommand::Verify { fleet: true, .. } => return audit_verify_fleet(ctx),
        _ => {}
    }
    let log = ctx.data_dir.join(paths::AUDIT_FILE);
    if !log.exists() {
        return Err(Error::not_found(format!(
            "no audit log at {} (is the data dir initialised? see --data-dir)",
            log.display()
        )));
    }
    match cmd {
        AuditCommand::Tail { lines, follow, .. } => {
            let mut records = audit::read_records(&log, Some(lines))?;
            let mut last_seq = records.last().map(|r| r.seq).unwrap_or(0);
            for r in records.drain(..) {
                print_record(&r, ctx.json)?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let since = last_seq;
                for r in audit::read_records(&log, None)?
                    .into_iter()
                    .filter(|r| r.seq > since)
                {
                    last_seq = r.seq;
                    print_record(&r, ctx.json)?;
                }
            }
        }
        AuditCommand::Verify { expect_head, .. } => {
            let report = audit::verify(&log)?;
            if ctx.json {
                print_json(&serde_json::json!({
                    "records": report.records,
                    "last_hash": report.last_hash,
                    "problem": report.problem.as_ref().map(|p| p.to_string()),
                    "notes": report.notes,
                }))?;
            }
            for n in &report.notes {
                eprintln!("warden: note: {n}");
            }
            if let Some(p) = &report.problem {
                return Err(Error::integrity(format!(
                    "audit log {} is TAMPERED: {p}",
                    log.display()
                )));
            }
            if let Some(h) = expect_head {
                // The pinned head must still be in the (verified) chain: later
                // records may follow it, but it cannot have vanished or changed.
                let h = h.to_ascii_lowercase();
                let found = audit::read_records(&log, None)?.iter().any(|r| r.hash == h);
                if !found {
                    return Err(Error::integrity(format!(
                        "audit log {} does not contain the expected record hash {h} (its head is {}): records were removed or the log was rewritten",
                        log.display(),
                        report.last_hash
                    )));
                }
            }
            if !ctx.json {
                println!(
                    "audit log OK: {} records, chain intact, head {}",
                    report.records, report.last_hash
                );
            }
            Ok(())
        }
    }
}

// ---- fleet views -------------------------------------------------------------
// Read from the shared PostgreSQL store, where every node's shipper copies
// its audit records, event summaries and applied freezes
// (`warden_core::fleet_views`).

/// How often `--fleet --follow` looks for new rows.
const FLEET_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Writes one line to stdout; false once stdout is closed (`| head`).
fn out_line(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

fn fleet_record_line(c: &warden_core::store::postgres::AuditCopy, json: bool) -> Option<String> {
    match audit::parse_line(c.line.as_bytes()) {
        Ok(r) if json => Some(serde_json::json!({"node": c.node, "record": r}).to_string()),
        Ok(r) => Some(format!("[{}] {}", c.node, audit::format_record_human(&r))),
        Err(d) => {
            eprintln!(
                "warden: the store's copy of record #{} of node {} is damaged ({d}); run `warden audit verify --fleet`",
                c.seq, c.node
            );
            None
        }
    }
}

fn audit_tail_fleet(ctx: &Context, lines: usize, follow: bool) -> Result<()> {
    let store =
        warden_core::fleet_views::open_for_view(&ctx.cfg.store, &ctx.data_dir, "audit tail")?;
    // Per node and log, the newest record already accounted for.
    let mut seen: std::collections::BTreeMap<(String, String), u64> = store
        .audit_copy_logs()?
        .into_iter()
        .map(|(node, log, max, _)| ((node, log), max))
        .collect();
    for c in store.audit_copy_latest(lines)? {
        let newest = seen.entry((c.node.clone(), c.log.clone())).or_insert(0);
        *newest = (*newest).max(c.seq);
        if let Some(line) = fleet_record_line(&c, ctx.json) {
            if !out_line(&line) {
                return Ok(());
            }
        }
    }
    if !follow {
        return Ok(());
    }
    let mut warned = false;
    loop {
        std::thread::sleep(FLEET_POLL);
        // A node (or a recreated data dir) that starts shipping: from its
        // first record.
        if let Ok(recent) = store.audit_copy_recent_logs(std::time::Duration::from_secs(30)) {
            for key in recent {
                seen.entry(key).or_insert(0);
            }
        }
        let keys: Vec<(String, String, u64)> = seen
            .iter()
            .map(|((n, l), s)| (n.clone(), l.clone(), *s))
            .collect();
        let rows = match store.audit_copy_after(&keys, 1000) {
            Ok(rows) => {
                warned = false;
                rows
            }
            Err(e) => {
                if !warned {
                    eprintln!("warden: {} (retrying)", e.message);
                    warned = true;
                }
                continue;
            }
        };
        for c in rows {
            seen.insert((c.node.clone(), c.log.clone()), c.seq);
            if let Some(line) = fleet_record_line(&c, ctx.json) {
                if !out_line(&line) {
                    return Ok(());
                }
            }
        }
    }
}

/// Checks each node's chain in the store's copy: every record from #1 on,
/// each line's own hash, its seq and hash columns, and its link to the one
/// before.
fn audit_verify_fleet(ctx: &Context) -> Result<()> {
    let store =
        warden_core::fleet_views::open_for_view(&ctx.cfg.store, &ctx.data_dir, "audit verify")?;
    let logs = store.audit_copy_logs()?;
    let mut report = Vec::new();
    let mut tampered = Vec::new();
    for (node, log, _, _) in &logs {
        let mut prev = audit::GENESIS_HASH.to_string();
        let mut expected = 1u64;
        let mut problem: Option<String> = None;
        'pages: loop {
            let page = store.audit_copy_page(node, log, expected - 1, 1000)?;
            if page.is_empty() {
                break;
            }
            for c in page {
                if c.seq != expected {
                    problem = Some(format!(
                        "record{} #{expected}{} not in the store (deleted or pruned; the next one there is #{})",
                        if c.seq > expected + 1 { "s" } else { "" },
                        if c.seq > expected + 1 {
                            format!(" to #{} are", c.seq - 1)
                        } else {
                            " is".to_string()
                        },
                        c.seq
                    ));
                    break 'pages;
                }
                problem = match audit::parse_line(c.line.as_bytes()) {
                    Err(d) => Some(format!("record #{} is damaged: {d}", c.seq)),
                    Ok(r) if r.seq != c.seq || r.hash != c.hash => Some(format!(
                        "record #{}: its row's seq or hash does not match its line",
                        c.seq
                    )),
                    Ok(r) if r.prev != prev => Some(format!(
                        "record #{} does not follow #{} in the chain (modified, inserted or reordered)",
                        c.seq,
                        c.seq - 1
                    )),
                    Ok(r) if c.seq == 1 && r.hash != *log => Some(
                        "record #1 is not the first record of this log (it was replaced)".to_string(),
                    ),
                    Ok(r) => {
                        prev = r.hash;
                        expected += 1;
                        None
                    }
                };
                if problem.is_some() {
                    break 'pages;
                }
            }
        }
        let records = expected - 1;
        if !ctx.json {
            match &problem {
                None => println!("node {node}: {records} records, chain intact, head {prev}"),
                Some(p) => println!("node {node}: TAMPERED: {p}"),
            }
        }
        if let Some(p) = &problem {
            tampered.push(format!("node {node}: {p}"));
        }
        report.push(serde_json::json!({
            "node": node,
            "log": log,
            "records": records,
            "last_hash": prev,
            "problem": problem,
        }));
    }
    if ctx.json {
        print_json(&serde_json::Value::Array(report))?;
    } else if logs.is_empty() {
        println!("no audit records in the store yet");
    }
    if !tampered.is_empty() {
        return Err(Error::integrity(format!(
            "the audit copy in the {} is TAMPERED: {}",
            store.describe(),
            tampered.join("; ")
        )));
    }
    Ok(())
}

fn fleet_event_line(
    e: &warden_core::store::postgres::StoredEvent,
    json: bool,
    wide: bool,
) -> Option<String> {
    // A summary the nodes wrote (names, ids, addresses; no secret).
    let value: serde_json::Value = match serde_json::from_str(&e.event) {
        Ok(v) => v,
        Err(_) => {
            eprintln!(
                "warden: event row {} of node {} is not readable",
                e.id, e.node
            );
            return None;
        }
    };
    if json {
        return Some(serde_json::json!({"node": e.node, "event": value}).to_string());
    }
    match serde_json::from_value::<EventRecord>(value) {
        Ok(r) => Some(format!("[{}] {}", e.node, format_event_line(&r, wide))),
        Err(_) => {
            eprintln!(
                "warden: event row {} of node {} is not readable",
                e.id, e.node
            );
            None
        }
    }
}

fn events_fleet(ctx: &Context, follow: bool, lines: usize, wide: bool) -> Result<()> {
    let store = warden_core::fleet_views::open_for_view(&ctx.cfg.store, &ctx.data_dir, "events")?;
    let mut last = 0i64;
    for e in store.events_latest(lines)? {
        last = last.max(e.id);
        if let Some(line) = fleet_event_line(&e, ctx.json, wide) {
            if !out_line(&line) {
                return Ok(());
            }
        }
    }
    if !follow {
        return Ok(());
    }
    // Rows already there but older than the last -n are not printed.
    last = last.max(store.events_newest_id()?);
    let mut warned = false;
    loop {
        std::thread::sleep(FLEET_POLL);
        let rows = match store.events_after(last, 1000) {
            Ok(rows) => {
                warned = false;
                rows
            }
            Err(e) => {
                if !warned {
                    eprintln!("warden: {} (retrying)", e.message);
                    warned = true;
                }
                continue;
            }
        };
        for e in rows {
            last = last.max(e.id);
            if let Some(line) = fleet_event_line(&e, ctx.json, wide) {
                if !out_line(&line) {
                    return Ok(());
                }
            }
        }
    }
}

/// On a fleet store: for each frozen workload, which nodes applied its
/// freeze, which have not yet, and which cannot (removed, not running).
fn frozen_nodes(
    ctx: &Context,
    entries: &[warden_core::freeze::FreezeEntry],
) -> Result<Vec<Vec<warden_core::fleet_views::FreezeNodeState>>> {
    let store = warden_core::fleet_views::open_for_view(&ctx.cfg.store, &ctx.data_dir, "frozen")?;
    let nodes = warden_core::fleet::list(&store)?;
    let acks = store.freeze_acks()?;
    Ok(entries
        .iter()
        .map(|e| warden_core::fleet_views::freeze_nodes(&nodes, &acks, e))
        .collect())
}

fn print_frozen_nodes(states: &[warden_core::fleet_views::FreezeNodeState]) {
    for (state, label) in [
        ("applied", "applied on:"),
        ("pending", "not yet on:"),
        ("not running", "not running:"),
        ("removed", "removed:"),
    ] {
        let names: Vec<String> = states
            .iter()
            .filter(|s| s.state == state)
            .map(|s| match (&s.applied_at, &s.last_seen) {
                (Some(t), _) => format!("{} (at {t})", s.node),
                (None, Some(t)) => format!("{} (last seen {t})", s.node),
                _ => s.node.clone(),
            })
            .collect();
        if !names.is_empty() {
            println!("  {label:<13}{}", names.join(", "));
        }
    }
}

fn print_record(r: &audit::Record, json: bool) -> Result<()> {
    let line = if json {
        serde_json::to_string(r).map_err(|e| Error::internal(e.to_string()))?
    } else {
        audit::format_record_human(r)
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) ends the output quietly.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    Ok(())
}

// ---- config check -------------------------------------------------------------

fn config_check(file: Option<&Path>, json: bool) -> Result<()> {
    let Some(file) = file else {
        return Err(Error::usage("config check: give a FILE (or --config FILE)"));
    };
    match config::load(file) {
        Ok(cfg) => {
            if json {
                let w: Vec<_> = cfg
                    .warnings
                    .iter()
                    .map(|w| serde_json::json!({"key": w.key, "problem": w.problem, "fix": w.fix}))
                    .collect();
                return print_json(
                    &serde_json::json!({"file": file, "ok": true, "errors": [], "warnings": w}),
                );
            }
            for w in &cfg.warnings {
                println!(
                    "{}: warning: {}: {} (fix: {})",
                    file.display(),
                    w.key,
                    w.problem,
                    w.fix
                );
            }
            println!(
                "{}: OK ({} workload(s), {} route(s), {} secret polic(ies))",
                file.display(),
                cfg.workloads.len(),
                cfg.routes.len(),
                cfg.secrets.len()
            );
            Ok(())
        }
        Err(report) => {
            if json {
                let issues = |v: &Vec<config::ConfigIssue>| -> Vec<serde_json::Value> {
                    v.iter()
                        .map(|i| serde_json::json!({"key": i.key, "problem": i.problem, "fix": i.fix}))
                        .collect()
                };
                print_json(
                    &serde_json::json!({"file": file, "ok": false, "errors": issues(&report.errors), "warnings": issues(&report.warnings)}),
                )?;
                return Err(Error::usage(format!(
                    "{} error(s) in {}",
                    report.errors.len(),
                    file.display()
                )));
            }
            Err(Error::usage(report.to_string().trim_end().to_string()))
        }
    }
}

// ---- rotation and leases ----------------------------------------------------

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the async runtime: {e}")))
}

/// `warden secret rotate`: by the daemon when it runs, else here under the data dir lock.
fn secret_rotate(ctx: &Context, name: &str, env: Option<&str>) -> Result<()> {
    let outcome: warden_core::rotation::RotateOutcome = match Target::connect(ctx)? {
        Target::Daemon(mut c) => c
            .call(&Request::SecretRotate {
                name: name.to_string(),
                env: env.map(String::from),
            })?
            .into_result()?,
        Target::Offline { service, _lock } => {
            let service = std::sync::Arc::new(std::sync::Mutex::new(*service));
            let creds = std::sync::Arc::new(warden_postgres::CredentialCache::default());
            let rotator = warden_core::rotation::Rotator::new(&ctx.cfg, service, creds, None)?
                .with_changer(
                    "mysql",
                    std::sync::Arc::new(warden_mysql::rotate::MysqlRotation::from_config(
                        &ctx.cfg,
                    )?),
                )
                .with_changer(
                    "redis",
                    std::sync::Arc::new(warden_redis::rotate::RedisRotation::from_config(
                        &ctx.cfg,
                    )?),
                );
            let actor = admin::caller_actor(&Caller::this_process());
            runtime()?.block_on(rotator.rotate(
                name,
                env,
                actor,
                "requested by an admin (`warden secret rotate`, offline)",
            ))?
        }
    };
    if ctx.json {
        return print_json(&outcome);
    }
    println!(
        "rotated {} (env {}) to version {} ({})",
        outcome.name, outcome.env, outcome.version, outcome.method
    );
    Ok(())
}

fn run_lease(ctx: &Context, cmd: LeaseCommand) -> Result<()> {
    match cmd {
        LeaseCommand::Revoke { id } => {
            let socket = daemon::admin_socket_path(&ctx.cfg, &ctx.data_dir);
            let mut c = AdminClient::connect(&socket)?.ok_or_else(|| {
                Error::unavailable(
                    "leases live in the daemon: start `warden up` first (a stopped daemon's leases are revoked at its next start)",
                )
            })?;
            let l: warden_core::leases::LeaseInfo =
                c.call(&Request::LeaseRevoke { id })?.into_result()?;
            if ctx.json {
                return print_json(&l);
            }
            match &l.node {
                Some(node) => println!(
                    "revoked lease {} on node {node}, which held it (route {}, workload {}, role {} dropped, its sessions ended)",
                    l.id, l.route, l.workload, l.role
                ),
                None => println!(
                    "revoked lease {} (route {}, workload {}, role {} dropped, {} session(s) ended)",
                    l.id, l.route, l.workload, l.role, l.sessions
                ),
            }
            Ok(())
        }
        LeaseCommand::List => {
            let socket = daemon::admin_socket_path(&ctx.cfg, &ctx.data_dir);
            let mut c = AdminClient::connect(&socket)?.ok_or_else(|| {
                Error::unavailable("leases live in the daemon: start `warden up` first")
            })?;
            let list: Vec<warden_core::leases::LeaseInfo> =
                c.call(&Request::LeaseList)?.into_result()?;
            if ctx.json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no leases");
                return Ok(());
            }
            println!(
                "{:<32} {:<16} {:<16} {:<40} {:>8}  EXPIRES",
                "ID", "ROUTE", "WORKLOAD", "ROLE", "SESSIONS"
            );
            for l in list {
                println!(
                    "{:<32} {:<16} {:<16} {:<40} {:>8}  {}",
                    l.id, l.route, l.workload, l.role, l.sessions, l.expires_at
                );
            }
            Ok(())
        }
        LeaseCommand::Bench {
            route,
            count,
            concurrency,
        } => lease_bench(ctx, &route, count, concurrency),
    }
}

/// Creates `count` leases with `concurrency` tasks, then revokes them; prints JSON.
fn lease_bench(ctx: &Context, route: &str, count: usize, concurrency: usize) -> Result<()> {
    use std::sync::Arc;
    let Target::Offline { service, _lock } = Target::connect(ctx)? else {
        return Err(Error::unavailable(
            "lease bench runs on the data dir: stop the daemon first",
        ));
    };
    let service = Arc::new(std::sync::Mutex::new(*service));
    let creds = Arc::new(warden_postgres::CredentialCache::default());
    let mut specs = warden_postgres::dynamic_specs(&ctx.cfg)?;
    specs.extend(warden_mysql::dynamic::dynamic_specs(&ctx.cfg)?);
    specs.extend(warden_redis::dynamic::dynamic_specs(&ctx.cfg)?);
    if !specs.iter().any(|s| s.route == route) {
        return Err(Error::usage(format!(
            "route {route:?} has no credential.dynamic in the config"
        )));
    }
    let leases = Arc::new(warden_core::leases::LeaseManager::new(
        specs, service, creds, None,
    ));
    let scram = Arc::new(warden_core::pgwire::scram::ScramKeyCache::with_capacity(
        count + 16,
    ));
    let rt = runtime()?;
    let report = rt.block_on(async {
        let spec = leases
            .spec(route)
            .ok_or_else(|| Error::internal("spec vanished"))?;
        // Warm-up: one lease so the admin login is not in the figures.
        leases
            .create(
                &spec,
                "bench-warmup",
                warden_core::authority::daemon_actor(),
                &scram,
            )
            .await?;
        let started = std::time::Instant::now();
        let per = count.div_ceil(concurrency.max(1));
        let mut tasks = Vec::new();
        for t in 0..concurrency.max(1) {
            let (leases, scram, spec) = (leases.clone(), scram.clone(), spec.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    let t0 = std::time::Instant::now();
                    leases
                        .create(
                            &spec,
                            &format!("bench-{t}"),
                            warden_core::authority::daemon_actor(),
                            &scram,
                        )
                        .await?;
                    lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                }
                Ok::<_, Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.map_err(|e| Error::internal(e.to_string()))??);
        }
        let secs = started.elapsed().as_secs_f64();
        let r0 = std::time::Instant::now();
        let revoked = leases.revoke_all(&scram, "benchmark clean-up").await;
        let revoke_secs = r0.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
        Ok::<_, Error>(serde_json::json!({
            "leases": lat.len(),
            "seconds": secs,
            "per_second": lat.len() as f64 / secs,
            "p50_ms": q(0.50),
            "p99_ms": q(0.99),
            "mean_ms": lat.iter().sum::<f64>() / lat.len() as f64,
            "revoked": revoked,
            "revoke_per_second": revoked as f64 / revoke_secs,
        }))
    })?;
    print_json(&report)
}
