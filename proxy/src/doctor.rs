//! `warden doctor`: checks what `warden up` needs on this machine — the
//! kernel (cgroup v2, BTF, bpffs, loading the monitor's programs), this
//! process's capabilities for the configured features, the data dir's
//! permissions, the clock, the store, the daemon, and each route's upstream
//! (TCP, then TLS verified as the route would) — and prints a pass/fail table
//! with the fix for each failure. Exit code 1 when any check fails.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warden_core::config::{Config, EbpfMode, RouteKind, TlsMode};
use warden_core::error::{Error, Result};
use warden_core::paths;

/// How long a route's upstream gets to accept the TCP connection and finish
/// the TLS handshake.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    /// Not applicable with this configuration, or not testable as run.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        fix: None,
    }
}

fn failed(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        fix: Some(fix.into()),
        ..check(name, Status::Fail, detail)
    }
}

fn warned(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        fix: Some(fix.into()),
        ..check(name, Status::Warn, detail)
    }
}

/// Runs every check, prints them, and returns whether any failed.
pub fn run(cfg: &Config, data_dir: &Path, json: bool) -> Result<bool> {
    let mut checks = Vec::new();
    checks.extend(kernel(cfg));
    checks.extend(capabilities(cfg));
    checks.push(data_dir_check(data_dir));
    checks.push(clock());
    checks.push(store(cfg, data_dir));
    checks.push(daemon(cfg, data_dir));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start a runtime: {e}")))?;
    checks.extend(rt.block_on(routes(cfg)));
    print(&checks, json)?;
    Ok(checks.iter().any(|c| c.status == Status::Fail))
}

fn print(checks: &[Check], json: bool) -> Result<()> {
    if json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "checks": checks }))
            .map_err(|e| Error::internal(format!("JSON: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        println!("{:<4}  {:<width$}  {}", c.status.label(), c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("{:<4}  {:<width$}  fix: {fix}", "", "");
        }
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    println!(
        "\n{} ok, {} warnings, {} failed, {} skipped",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skip)
    );
    Ok(())
}

// ---- kernel -------------------------------------------------------------------

fn kernel(cfg: &Config) -> Vec<Check> {
    let wanted = cfg.monitor.ebpf != EbpfMode::Off;
    // Without the monitor warden attributes through /proc: kernel features
    // are then informational.
    let missing = if wanted { Status::Fail } else { Status::Warn };
    let mut out = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    out.push(check("kernel", Status::Pass, format!("Linux {release}")));
    match warden_ebpf::cgroup2_mount() {
        Some(p) => out.push(check(
            "kernel: cgroup v2",
            Status::Pass,
            format!("mounted at {}", p.display()),
        )),
        None => out.push(Check {
            fix: Some("mount the unified cgroup v2 hierarchy (systemd does by default)".into()),
            ..check("kernel: cgroup v2", missing, "not mounted")
        }),
    }
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        out.push(check(
            "kernel: BTF",
            Status::Pass,
            "/sys/kernel/btf/vmlinux present",
        ));
    } else {
        out.push(Check {
            fix: Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's is)".into()),
            ..check("kernel: BTF", missing, "/sys/kernel/btf/vmlinux is missing")
        });
    }
    let bpffs = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.contains(" - bpf ") && l.split(' ').nth(4) == Some("/sys/fs/bpf"))
        })
        .unwrap_or(false);
    out.push(if bpffs {
        check("kernel: bpffs", Status::Pass, "mounted at /sys/fs/bpf")
    } else {
        check(
            "kernel: bpffs",
            Status::Pass,
            "not mounted at /sys/fs/bpf (warden mounts it when it pins its programs)",
        )
    });
    if !wanted {
        out.push(check(
            "kernel: eBPF monitor",
            Status::Skip,
            "monitor.ebpf = \"off\"",
        ));
        return out;
    }
    // A real load: the embedded object, attached at the cgroup root with
    // empty maps (nothing watched or denied), detached when dropped.
    match warden_ebpf::Monitor::load(&warden_ebpf::MonitorConfig::default()) {
        Ok(m) => {
            let relay = match m.relay() {
                Ok(_) => "; kernel relay available",
                Err(_) => "; kernel relay unavailable (sessions relay in user space)",
            };
            drop(m);
            out.push(check(
                "kernel: eBPF monitor",
                Status::Pass,
                format!("programs load and attach{relay}"),
            ));
        }
        Err(warden_ebpf::MonitorError::NotPermitted { .. }) => out.push(check(
            "kernel: eBPF monitor",
            Status::Skip,
            "cannot test loading as this user (needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN): run `warden doctor` as root",
        )),
        Err(e) => {
            let status = if cfg.monitor.ebpf == EbpfMode::Required {
                Status::Fail
            } else {
                Status::Warn
            };
            out.push(Check {
                fix: Some(
                    "see the reason; with monitor.ebpf = \"auto\" warden falls back to /proc attribution"
                        .into(),
                ),
                ..check("kernel: eBPF monitor", status, format!("cannot load: {e}"))
            });
        }
    }
    out
}

// ---- capabilities -------------------------------------------------------------

/// (capability number, name, why) of what the configuration needs.
fn needed_capabilities(cfg: &Config) -> Vec<(u32, &'static str, &'static str)> {
    let mut need = Vec::new();
    if cfg.monitor.ebpf != EbpfMode::Off {
        need.push((39, "CAP_BPF", "load the eBPF monitor"));
        need.push((38, "CAP_PERFMON", "load the eBPF monitor"));
        need.push((12, "CAP_NET_ADMIN", "attach the monitor to cgroups"));
    }
    need.push((
        19,
        "CAP_SYS_PTRACE",
        "attest other users' processes (their /proc/PID/exe)",
    ));
    need.push((
        2,
        "CAP_DAC_READ_SEARCH",
        "attest other users' processes (their /proc/PID/fd)",
    ));
    if cfg.routes.iter().any(|r| r.listen.port() < 1024) {
        need.push((10, "CAP_NET_BIND_SERVICE", "listen on a port below 1024"));
    }
    need
}

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn capabilities(cfg: &Config) -> Vec<Check> {
    let uid = rustix::process::geteuid().as_raw();
    let Some(eff) = effective_capabilities() else {
        return vec![check(
            "capabilities",
            Status::Skip,
            "cannot read /proc/self/status",
        )];
    };
    needed_capabilities(cfg)
        .into_iter()
        .map(|(bit, name, why)| {
            let name_check = format!("capability {name}");
            if eff & (1u64 << bit) != 0 {
                check(name_check, Status::Pass, format!("held: needed to {why}"))
            } else {
                // The attestation capabilities only matter for other users'
                // processes; the monitor's make `auto` fall back to /proc.
                let status = if bit == 39 || bit == 38 || bit == 12 {
                    if cfg.monitor.ebpf == EbpfMode::Required {
                        Status::Fail
                    } else {
                        Status::Warn
                    }
                } else if bit == 10 {
                    Status::Fail
                } else {
                    Status::Warn
                };
                Check {
                    fix: Some(format!(
                        "run warden as root, or grant it with AmbientCapabilities={name} in the unit (docs/operations.md#capabilities)"
                    )),
                    ..check(
                        name_check,
                        status,
                        format!("not held by this process (uid {uid}): needed to {why}"),
                    )
                }
            }
        })
        .collect()
}

// ---- data dir, clock, store, daemon --------------------------------------------

fn data_dir_check(data_dir: &Path) -> Check {
    let name = "data dir";
    if let Err(e) = paths::check_private_dir(data_dir) {
        return failed(
            name,
            e.to_string(),
            format!("run `warden init`, or `chmod 700 {}`", data_dir.display()),
        );
    }
    // Every file in it private too (the key file, the store, the audit log).
    use std::os::unix::fs::MetadataExt;
    let exposed: Vec<String> = std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.metadata()
                .map(|m| m.is_file() && m.mode() & 0o077 != 0)
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !exposed.is_empty() {
        return failed(
            name,
            format!(
                "{}: readable or writable by group or others: {}",
                data_dir.display(),
                exposed.join(", ")
            ),
            format!(
                "chmod 600 {}",
                exposed
                    .iter()
                    .map(|f| data_dir.join(f).display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    }
    check(
        name,
        Status::Pass,
        format!("{} is private to its owner", data_dir.display()),
    )
}

fn clock() -> Check {
    let year = time::OffsetDateTime::now_utc().year();
    if year < 2024 {
        return failed(
            "clock",
            format!("the system clock says {year}"),
            "set the time (certificates and tokens are refused or issued wrongly otherwise)",
        );
    }
    // systemd's view of the kernel's synchronisation flag.
    let synced = std::process::Command::new("timedatectl")
        .args(["show", "--property=NTPSynchronized", "--value"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes");
    match synced {
        Some(true) => check("clock", Status::Pass, "synchronised (timedatectl)"),
        Some(false) => warned(
            "clock",
            "not synchronised: SVID, lease and token expiry follow this clock",
            "enable time synchronisation (systemd-timesyncd or chrony)",
        ),
        None => check(
            "clock",
            Status::Skip,
            "cannot tell whether it is synchronised (no timedatectl answer)",
        ),
    }
}

fn store(cfg: &Config, data_dir: &Path) -> Check {
    let name = format!("store ({})", cfg.store.backend);
    match warden_core::service::open_store(data_dir, &cfg.store) {
        Ok((_, seal, _)) => check(
            name,
            Status::Pass,
            format!(
                "opens; master key from {} (id {})",
                seal.source, seal.kek_id
            ),
        ),
        Err(e) => failed(
            name,
            e.to_string(),
            "see the reason (`warden init` for a new data dir; [store] settings: docs/fleet.md)",
        ),
    }
}

fn daemon(cfg: &Config, data_dir: &Path) -> Check {
    let socket = crate::daemon::admin_socket_path(cfg, data_dir);
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => check(
            "daemon",
            Status::Pass,
            format!("answers on {}", socket.display()),
        ),
        Err(_) => warned(
            "daemon",
            format!("not running (no answer on {})", socket.display()),
            "start it: `systemctl start warden` or `warden up`",
        ),
    }
}

// ---- routes -------------------------------------------------------------------

async fn routes(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    for r in &cfg.routes {
        let name = format!("route {} ({})", r.name, r.kind);
        out.push(match route(r).await {
            Ok(detail) => check(name, Status::Pass, detail),
            Err((detail, fix)) => failed(name, detail, fix),
        });
    }
    if out.is_empty() {
        out.push(check("routes", Status::Skip, "no [[route]] configured"));
    }
    out
}

/// The upstream as the route would reach it: TCP, then TLS verified with
/// the route's mode and CA. Ok(detail) or Err((detail, fix)).
async fn route(r: &warden_core::config::Route) -> std::result::Result<String, (String, String)> {
    let (host, port) = r.upstream_host_port().map_err(|e| {
        (
            format!("upstream {:?} {e}", r.upstream),
            "fix route.upstream".to_string(),
        )
    })?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let target = format!("{host}:{port}");
    let mut tcp = tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        tokio::net::TcpStream::connect((bare.as_str(), port)),
    )
    .await
    .map_err(|_| {
        (
            format!(
                "upstream {target}: no TCP answer within {} s",
                UPSTREAM_TIMEOUT.as_secs()
            ),
            "check route.upstream, the upstream's state and firewalls".to_string(),
        )
    })?
    .map_err(|e| {
        (
            format!("upstream {target}: cannot connect: {e}"),
            "check route.upstream and that the upstream is running".to_string(),
        )
    })?;
    let https = r
        .upstream
        .trim()
        .to_ascii_lowercase()
        .starts_with("https://");
    let mode = match r.kind {
        RouteKind::Http if !https => {
            return Ok(format!("upstream {target} reachable (plain HTTP)"))
        }
        RouteKind::Http => TlsMode::VerifyFull,
        _ => r.upstream_tls.mode,
    };
    if mode == TlsMode::Disable {
        return Ok(format!("upstream {target} reachable (TLS disabled)"));
    }
    if r.kind == RouteKind::Postgres {
        // PostgreSQL starts in plain text: SSLRequest, then `S` or `N`.
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend_from_slice(&80_877_103u32.to_be_bytes());
        let mut answer = [0u8; 1];
        let asked = async {
            tcp.write_all(&req).await?;
            tcp.read_exact(&mut answer).await
        };
        tokio::time::timeout(UPSTREAM_TIMEOUT, asked)
            .await
            .map_err(|_| {
                (
                    format!("upstream {target}: no answer to SSLRequest"),
                    "check that the upstream is PostgreSQL".to_string(),
                )
            })?
            .map_err(|e| {
                (
                    format!("upstream {target}: SSLRequest failed: {e}"),
                    "check that the upstream is PostgreSQL".to_string(),
                )
            })?;
        if answer[0] != b'S' {
            return Err((
                format!("upstream {target} does not offer TLS (answered {:?} to SSLRequest)", answer[0] as char),
                "enable ssl on the server, or set upstream_tls = { mode = \"disable\" } on a trusted network".to_string(),
            ));
        }
    }
    if r.kind == RouteKind::Mysql {
        // MySQL greets first; TLS starts after the client's SSLRequest.
        mysql_ssl_request(&mut tcp, &target).await?;
    }
    let ca = r.upstream_tls.ca_file.as_deref();
    let config = warden_core::tls::client_config(mode, ca, &r.name)
        .map_err(|e| (e.to_string(), "fix route.upstream_tls.ca_file".to_string()))?
        .ok_or_else(|| ("no TLS configuration".to_string(), String::new()))?;
    let server_name = warden_core::tls::server_name(&bare)
        .map_err(|e| (e.to_string(), "fix route.upstream".to_string()))?;
    let ca_label = ca
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the system CA bundle".into());
    let handshake = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp);
    match tokio::time::timeout(UPSTREAM_TIMEOUT, handshake).await {
        Err(_) => Err((
            format!(
                "upstream {target}: TLS handshake did not finish within {} s",
                UPSTREAM_TIMEOUT.as_secs()
            ),
            "check that the upstream speaks TLS on this port".to_string(),
        )),
        Ok(Ok(tls)) => {
            let version = match tls.get_ref().1.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
                _ => "TLS",
            };
            Ok(format!(
                "upstream {target} reachable, {version} verified ({mode}, {ca_label})"
            ))
        }
        Ok(Err(e)) => {
            let inner = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .cloned();
            match inner {
                // A TLS route's upstream that wants the workload's client
                // certificate: the server side checked out.
                Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired))
                    if r.kind == RouteKind::Tls =>
                {
                    Ok(format!("upstream {target} reachable, server certificate verified (it asks for a client certificate, which sessions present)"))
                }
                Some(re) => {
                    let (_, why) = warden_core::connect::explain_tls_error(&re, &bare, &ca_label);
                    Err((why, "fix route.upstream_tls (ca_file, mode) or the upstream's certificate".to_string()))
                }
                None => Err((
                    format!("upstream {target}: TLS handshake failed: {e}"),
                    "check that the upstream speaks TLS on this port".to_string(),
                )),
            }
        }
    }
}

/// Reads a MySQL server's greeting and asks for TLS (an SSLRequest), as a
/// mysql route does before its TLS handshake.
async fn mysql_ssl_request(
    tcp: &mut tokio::net::TcpStream,
    target: &str,
) -> std::result::Result<(), (String, String)> {
    use warden_mysql::packet::{caps, read_packet, write_packet, Greeting, HandshakeResponse};
    let not_mysql = || "check that the upstream is MySQL or MariaDB".to_string();
    let p = tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        read_packet(tcp, warden_mysql::packet::MAX_HANDSHAKE_PACKET),
    )
    .await
    .map_err(|_| (format!("upstream {target}: no MySQL greeting"), not_mysql()))?
    .map_err(|e| {
        (
            format!("upstream {target}: reading the greeting failed: {e}"),
            not_mysql(),
        )
    })?;
    let g = Greeting::parse(&p.payload).map_err(|e| {
        (
            format!("upstream {target} is not a MySQL server: {e}"),
            not_mysql(),
        )
    })?;
    if g.capabilities & caps::SSL == 0 {
        return Err((
            format!("upstream {target} does not offer TLS (no CLIENT_SSL in its greeting)"),
            "enable TLS on the server (ssl_cert, ssl_key), or set upstream_tls = { mode = \"disable\" } on a trusted network".to_string(),
        ));
    }
    let req = HandshakeResponse {
        capabilities: caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH,
        max_packet: 1 << 24,
        charset: 45,
        ..HandshakeResponse::default()
    }
    .encode_ssl_request();
    write_packet(tcp, p.seq.wrapping_add(1), &req)
        .await
        .map_err(|e| {
            (
                format!("upstream {target}: SSLRequest failed: {e}"),
                not_mysql(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_follow_the_configuration() {
        let cfg = Config::default_for(Path::new("warden.toml"));
        let names: Vec<&str> = needed_capabilities(&cfg).iter().map(|c| c.1).collect();
        assert!(names.contains(&"CAP_SYS_PTRACE"), "{names:?}");
        if cfg.monitor.ebpf != EbpfMode::Off {
            assert!(names.contains(&"CAP_BPF"), "{names:?}");
        }
        assert!(!names.contains(&"CAP_NET_BIND_SERVICE"), "{names:?}");
    }
}
