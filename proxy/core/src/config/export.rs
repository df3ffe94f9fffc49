//! `[export]`: shipping access events and audit records off the node — the
//! per-sink queue, the per-workload rate limit, and `[[export.sink]]`
//! entries (`file`, `journald`, `syslog`, `otlp`) with their checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::address::{parse_http_url, split_host_port};
use super::check::{check_socket_path, Checker};
use super::duration::{de_opt_duration, format_duration};
use super::names::{check_name, is_http_token};

/// Entries a sink's queue holds when `export.queue` is not set.
pub const DEFAULT_EXPORT_QUEUE: usize = 8192;
/// Records per second per workload when `export.rate_per_workload` is not set.
pub const DEFAULT_RATE_PER_WORKLOAD: u32 = 100;
/// The journald socket when `socket` is not set.
pub const DEFAULT_JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";
/// The syslog address when `address` is not set.
pub const DEFAULT_SYSLOG_ADDRESS: &str = "unix:/dev/log";
/// A file sink's size that starts a new file, when `max_bytes` is not set.
pub const DEFAULT_FILE_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Rotated files a file sink keeps, when `keep` is not set.
pub const DEFAULT_FILE_KEEP: u32 = 5;
/// How long an OTLP POST or a TCP syslog connect may take, when `timeout` is not set.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

config_enum! {
    /// `export.sink[].kind`.
    ExportKind {
        /// JSON lines appended to a file.
        File => "file",
        /// The systemd journal's native protocol (structured fields).
        Journald => "journald",
        /// RFC 5424 syslog over a unix datagram socket, UDP or TCP.
        Syslog => "syslog",
        /// OTLP/HTTP JSON logs to a collector.
        Otlp => "otlp",
    }
}

config_enum! {
    /// What a sink carries (`export.sink[].carries`).
    ExportStream {
        /// Access events of the eBPF monitor (what `warden events` shows).
        Events => "events",
        /// Audit records, as written to the local audit log.
        Audit => "audit",
    }
}

/// `[export]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Export {
    /// Entries each sink's queue holds before new ones are dropped (default 8192).
    pub queue: Option<usize>,
    /// Records per second one workload may send (token bucket; 0: no limit).
    pub rate_per_workload: Option<u32>,
    /// Tokens a workload's bucket holds (default twice the rate).
    pub burst: Option<u32>,
    /// `[[export.sink]]` entries.
    #[serde(rename = "sink")]
    pub sinks: Vec<ExportSink>,
}

impl Export {
    pub fn queue(&self) -> usize {
        self.queue.unwrap_or(DEFAULT_EXPORT_QUEUE)
    }

    pub fn rate_per_workload(&self) -> u32 {
        self.rate_per_workload.unwrap_or(DEFAULT_RATE_PER_WORKLOAD)
    }

    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.rate_per_workload().saturating_mul(2))
            .max(1)
    }
}

/// One `[[export.sink]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSink {
    /// The sink's name in metrics and logs (default: its kind).
    #[serde(default)]
    pub name: Option<String>,
    pub kind: ExportKind,
    /// `events`, `audit` or both (default both).
    #[serde(default)]
    pub carries: Option<Vec<ExportStream>>,
    /// file: where the JSON lines go.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// file: size at which the file is rotated (0: never; default 100 MiB).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// file: rotated files kept (`PATH.1` … `PATH.N`, default 5).
    #[serde(default)]
    pub keep: Option<u32>,
    /// journald: the native socket (default /run/systemd/journal/socket).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// syslog: `unix:/dev/log` (default), `udp:HOST:PORT` or `tcp:HOST:PORT`.
    #[serde(default)]
    pub address: Option<String>,
    /// syslog: the facility (default `authpriv`).
    #[serde(default)]
    pub facility: Option<SyslogFacility>,
    /// otlp: the collector's logs URL, e.g. `http://127.0.0.1:4318/v1/logs`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// otlp: extra request headers; a value is a string or `{ file = "PATH" }`.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValue>,
    /// otlp, syslog over TCP: how long one attempt may take (default 5s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

impl ExportSink {
    /// The name in metrics and logs.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.kind.as_str())
    }

    pub fn carries(&self, s: ExportStream) -> bool {
        self.carries.as_ref().is_none_or(|c| c.contains(&s))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_EXPORT_TIMEOUT)
    }
}

config_enum! {
    /// RFC 5424 facilities warden may log under.
    SyslogFacility {
        Auth => "auth",
        Authpriv => "authpriv",
        Daemon => "daemon",
        User => "user",
        Local0 => "local0",
        Local1 => "local1",
        Local2 => "local2",
        Local3 => "local3",
        Local4 => "local4",
        Local5 => "local5",
        Local6 => "local6",
        Local7 => "local7",
    }
}

impl SyslogFacility {
    /// The facility's number (RFC 5424, section 6.2.1).
    pub fn code(self) -> u8 {
        match self {
            SyslogFacility::User => 1,
            SyslogFacility::Daemon => 3,
            SyslogFacility::Auth => 4,
            SyslogFacility::Authpriv => 10,
            SyslogFacility::Local0 => 16,
            SyslogFacility::Local1 => 17,
            SyslogFacility::Local2 => 18,
            SyslogFacility::Local3 => 19,
            SyslogFacility::Local4 => 20,
            SyslogFacility::Local5 => 21,
            SyslogFacility::Local6 => 22,
            SyslogFacility::Local7 => 23,
        }
    }
}

/// An OTLP request header's value: written in the file, or read from a file
/// at start (a token never has to sit in the config). `Debug` never shows a
/// literal value.
#[derive(Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Literal(String),
    File(PathBuf),
}

impl std::fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderValue::Literal(_) => f.write_str("Literal(…)"),
            HeaderValue::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HeaderValue, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, or a table { file = \"/path/to/value\" }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HeaderValue, E> {
                Ok(HeaderValue::Literal(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderValue, A::Error> {
                let mut file: Option<PathBuf> = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "file" {
                        file = Some(map.next_value()?);
                    } else {
                        return Err(serde::de::Error::unknown_field(&key, &["file"]));
                    }
                }
                file.map(HeaderValue::File)
                    .ok_or_else(|| serde::de::Error::missing_field("file"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a syslog sink sends (`export.sink[].address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogAddress {
    Unix(PathBuf),
    Udp(String, u16),
    Tcp(String, u16),
}

impl SyslogAddress {
    /// Parses `unix:/PATH`, `udp:HOST:PORT` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<SyslogAddress, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err("names a relative socket path".into());
            }
            return Ok(SyslogAddress::Unix(PathBuf::from(p)));
        }
        let (proto, rest) = s
            .split_once(':')
            .ok_or_else(|| "has no unix:, udp: or tcp: prefix".to_string())?;
        let (host, port) = split_host_port(rest)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        match proto {
            "udp" => Ok(SyslogAddress::Udp(host, port)),
            "tcp" => Ok(SyslogAddress::Tcp(host, port)),
            _ => Err(format!("starts with {proto:?}, not unix:, udp: or tcp:")),
        }
    }
}

pub(super) fn check_export(c: &mut Checker<'_>) {
    let e = &c.config.export;
    if let Some(q) = e.queue {
        if !(1..=1_000_000).contains(&q) {
            c.error(
                "export.queue",
                format!("queue = {q} is outside 1..1000000"),
                "set queue to the entries each sink may hold, e.g. queue = 8192",
            );
        }
    }
    if let (Some(0), Some(_)) = (e.rate_per_workload, e.burst) {
        c.warn(
            "export.burst",
            "burst is set but rate_per_workload = 0 turns rate limiting off",
            "remove burst, or set rate_per_workload",
        );
    }
    if e.burst == Some(0) {
        c.error(
            "export.burst",
            "burst = 0 would drop every record",
            "set burst to at least 1, e.g. burst = 200",
        );
    }
    if (e.queue.is_some() || e.rate_per_workload.is_some() || e.burst.is_some())
        && e.sinks.is_empty()
    {
        c.warn(
            "export",
            "[export] has settings but no [[export.sink]], so nothing is exported",
            "add an [[export.sink]] with kind = \"file\", \"journald\", \"syslog\" or \"otlp\"",
        );
    }
    let sinks = e.sinks.clone();
    let mut names: Vec<(String, usize)> = Vec::new();
    for (i, s) in sinks.iter().enumerate() {
        let key = |k: &str| format!("export.sink[{i}].{k}");
        if let Some(n) = &s.name {
            if let Err((problem, fix)) = check_name("sink", n) {
                c.error(key("name"), problem, fix);
            }
        }
        if let Some((_, first)) = names.iter().find(|(n, _)| n == s.name()) {
            c.error(
                if s.name.is_some() { key("name") } else { key("kind") },
                format!(
                    "two sinks are named {:?} (export.sink[{first}] and this one); a sink without a name is named after its kind",
                    s.name()
                ),
                "give each sink its own name = \"...\"",
            );
        } else {
            names.push((s.name().to_string(), i));
        }
        if s.carries.as_ref().is_some_and(Vec::is_empty) {
            c.error(
                key("carries"),
                "carries is empty, so the sink would get nothing",
                "set carries = [\"events\", \"audit\"] (or one of them), or remove the sink",
            );
        }
        check_kind_keys(c, i, s);
        match s.kind {
            ExportKind::File => match &s.path {
                None => c.error(
                    key("path"),
                    "a file sink needs a path",
                    "set path = \"/var/log/warden/export.jsonl\"",
                ),
                Some(p) if p.as_os_str().is_empty() => c.error(
                    key("path"),
                    format!("path {:?} names no file", p.display().to_string()),
                    "name a file, e.g. path = \"/var/log/warden/export.jsonl\"",
                ),
                Some(_) => {
                    if let Some(m) = s.max_bytes {
                        if m != 0 && m < 4096 {
                            c.error(
                                key("max_bytes"),
                                format!("max_bytes = {m} would rotate after every few records"),
                                "set max_bytes to at least 4096 (e.g. 104857600 for 100 MiB), or 0 to never rotate",
                            );
                        }
                    }
                    if let Some(k) = s.keep {
                        if !(1..=100).contains(&k) {
                            c.error(
                                key("keep"),
                                format!("keep = {k} is outside 1..100"),
                                "set keep to the rotated files to keep, e.g. keep = 5",
                            );
                        }
                    }
                }
            },
            ExportKind::Journald => {
                if let Some(p) = &s.socket {
                    check_socket_path(c, &key("socket"), p);
                }
            }
            ExportKind::Syslog => {
                if let Some(a) = &s.address {
                    match SyslogAddress::parse(a) {
                        Err(problem) => c.error(
                            key("address"),
                            format!("address {a:?} {problem}"),
                            "use \"unix:/dev/log\", \"udp:HOST:514\" or \"tcp:HOST:601\"",
                        ),
                        Ok(SyslogAddress::Unix(p)) => {
                            if p.as_os_str().len() >= super::check::SUN_PATH_MAX {
                                c.error(
                                    key("address"),
                                    format!("socket path {} is too long for a unix socket", p.display()),
                                    "use a path shorter than 108 bytes",
                                );
                            }
                        }
                        Ok(_) => {}
                    }
                }
            }
            ExportKind::Otlp => match &s.endpoint {
                None => c.error(
                    key("endpoint"),
                    "an otlp sink needs an endpoint",
                    "set endpoint = \"http://127.0.0.1:4318/v1/logs\" (the collector's OTLP/HTTP logs URL)",
                ),
                Some(url) => {
                    if let Err(problem) = parse_http_url(url) {
                        c.error(
                            key("endpoint"),
                            format!("endpoint \"{}\" {problem}", super::url_for_display(url)),
                            "use the collector's OTLP/HTTP logs URL, e.g. endpoint = \"http://127.0.0.1:4318/v1/logs\"",
                        );
                    }
                    for (name, value) in &s.headers {
                        let hkey = format!("export.sink[{i}].headers.{name}");
                        if !is_http_token(name) {
                            c.error(
                                hkey.clone(),
                                format!("{name:?} is not a valid HTTP header name"),
                                "use letters, digits and - only, e.g. Authorization",
                            );
                        }
                        let lower = name.to_ascii_lowercase();
                        if ["host", "content-length", "content-type", "connection", "transfer-encoding"]
                            .contains(&lower.as_str())
                        {
                            c.error(
                                hkey.clone(),
                                format!("warden sets the {name} header itself"),
                                "remove it",
                            );
                        }
                        match value {
                            HeaderValue::Literal(v) => {
                                if v.chars().any(|ch| ch == '\r' || ch == '\n' || ch == '\0') {
                                    c.error(
                                        hkey.clone(),
                                        "the value contains a line break",
                                        "write the value on one line",
                                    );
                                }
                                if ["authorization", "proxy-authorization", "x-api-key", "api-key"]
                                    .contains(&lower.as_str())
                                {
                                    c.warn(
                                        hkey,
                                        "a credential is written in the config file",
                                        format!("keep it in a file readable only by warden and write {name} = {{ file = \"/etc/warden/otlp-{lower}\" }}"),
                                    );
                                }
                            }
                            HeaderValue::File(p) => {
                                if p.as_os_str().is_empty() {
                                    c.error(
                                        hkey,
                                        "file is empty",
                                        "name the file holding the header's value",
                                    );
                                }
                            }
                        }
                    }
                }
            },
        }
        if let Some(t) = s.timeout {
            if t < Duration::from_millis(100) || t > Duration::from_secs(300) {
                c.error(
                    key("timeout"),
                    format!("timeout {} is outside 100ms..5m", format_duration(t)),
                    "set a duration such as timeout = \"5s\"",
                );
            }
        }
    }
}

/// Keys that belong to another kind of sink.
fn check_kind_keys(c: &mut Checker<'_>, i: usize, s: &ExportSink) {
    let set: [(&str, bool, &[ExportKind]); 9] = [
        ("path", s.path.is_some(), &[ExportKind::File]),
        ("max_bytes", s.max_bytes.is_some(), &[ExportKind::File]),
        ("keep", s.keep.is_some(), &[ExportKind::File]),
        ("socket", s.socket.is_some(), &[ExportKind::Journald]),
        ("address", s.address.is_some(), &[ExportKind::Syslog]),
        ("facility", s.facility.is_some(), &[ExportKind::Syslog]),
        ("endpoint", s.endpoint.is_some(), &[ExportKind::Otlp]),
        ("headers", !s.headers.is_empty(), &[ExportKind::Otlp]),
        (
            "timeout",
            s.timeout.is_some(),
            &[ExportKind::Otlp, ExportKind::Syslog],
        ),
    ];
    for (k, present, kinds) in set {
        if present && !kinds.contains(&s.kind) {
            let owners: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            c.error(
                format!("export.sink[{i}].{k}"),
                format!(
                    "{k} is a key of {} sinks, and this sink is kind = \"{}\"",
                    owners.join(" and "),
                    s.kind
                ),
                format!("remove {k}, or set kind = \"{}\"", owners[0]),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::PathBuf;

    use super::{ExportKind, ExportStream, HeaderValue, SyslogAddress, SyslogFacility};
    use crate::config::test_util::{ok, only_error, report, warning_keys};

    #[test]
    fn every_sink_kind_parses_with_its_keys() {
        let c = ok(r#"
[export]
queue = 100
rate_per_workload = 10
burst = 15

[[export.sink]]
name = "local"
kind = "file"
carries = ["events", "audit"]
path = "export/warden.jsonl"
max_bytes = 1048576
keep = 3

[[export.sink]]
kind = "journald"
carries = ["audit"]
socket = "/run/test/journal.sock"

[[export.sink]]
kind = "syslog"
address = "udp:127.0.0.1:514"
facility = "local3"

[[export.sink]]
kind = "otlp"
carries = ["events"]
endpoint = "http://127.0.0.1:4318/v1/logs"
headers = { Authorization = { file = "otlp-token" }, X-Scope-OrgID = "tenant-1" }
timeout = "2s"
"#);
        let e = &c.export;
        assert_eq!((e.queue(), e.rate_per_workload(), e.burst()), (100, 10, 15));
        assert_eq!(e.sinks.len(), 4);
        assert_eq!(e.sinks[0].name(), "local");
        assert_eq!(
            e.sinks[0].path,
            Some(PathBuf::from("/etc/warden/export/warden.jsonl"))
        );
        assert_eq!(e.sinks[1].name(), "journald");
        assert!(e.sinks[1].carries(ExportStream::Audit));
        assert!(!e.sinks[1].carries(ExportStream::Events));
        assert_eq!(e.sinks[2].kind, ExportKind::Syslog);
        assert_eq!(e.sinks[2].facility.map(SyslogFacility::code), Some(19));
        assert!(e.sinks[2].carries(ExportStream::Events));
        let h = &e.sinks[3].headers;
        assert_eq!(
            h.get("Authorization"),
            Some(&HeaderValue::File(PathBuf::from("/etc/warden/otlp-token")))
        );
        // A literal value never shows in Debug output.
        let shown = format!("{:?}", c.export);
        assert!(!shown.contains("tenant-1"), "{shown}");
    }

    #[test]
    fn defaults_without_the_section() {
        let c = ok("");
        assert!(c.export.sinks.is_empty());
        assert_eq!(c.export.queue(), 8192);
        assert_eq!(c.export.rate_per_workload(), 100);
        assert_eq!(c.export.burst(), 200);
    }

    #[test]
    fn sink_mistakes_name_the_key() {
        only_error("[[export.sink]]\nkind = \"file\"\n", "export.sink[0].path");
        only_error(
            "[[export.sink]]\nkind = \"otlp\"\n",
            "export.sink[0].endpoint",
        );
        let issue = only_error(
            "[[export.sink]]\nkind = \"journald\"\npath = \"/tmp/x\"\n",
            "export.sink[0].path",
        );
        assert!(issue.fix.contains("kind = \"file\""), "{issue:?}");
        only_error(
            "[[export.sink]]\nkind = \"syslog\"\naddress = \"smtp:host:25\"\n",
            "export.sink[0].address",
        );
        only_error(
            "[[export.sink]]\nkind = \"file\"\npath = \"/tmp/a\"\ncarries = []\n",
            "export.sink[0].carries",
        );
        only_error(
            "[[export.sink]]\nkind = \"file\"\npath = \"/tmp/a\"\n[[export.sink]]\nkind = \"file\"\npath = \"/tmp/b\"\n",
            "export.sink[1].kind",
        );
        only_error("[export]\nqueue = 0\n", "export.queue");
        only_error("[export]\nburst = 0\n", "export.burst");
        let r = report("[[export.sink]]\nkind = \"kafka\"\n");
        assert_eq!(r.errors[0].key, "export.sink[0].kind", "{r}");
        let r = report(
            "[[export.sink]]\nkind = \"otlp\"\nendpoint = \"http://c/v1/logs\"\nheaders = { A = 5 }\n",
        );
        assert!(r.errors[0].key.starts_with("export.sink[0].headers"), "{r}");
    }

    #[test]
    fn an_inline_token_warns() {
        let c = ok("[[export.sink]]\nkind = \"otlp\"\nendpoint = \"https://c.example/v1/logs\"\nheaders = { Authorization = \"Bearer x\" }\n");
        assert_eq!(
            warning_keys(&c),
            vec!["export.sink[0].headers.Authorization"]
        );
    }

    #[test]
    fn syslog_addresses() {
        assert_eq!(
            SyslogAddress::parse("unix:/dev/log"),
            Ok(SyslogAddress::Unix(PathBuf::from("/dev/log")))
        );
        assert_eq!(
            SyslogAddress::parse("tcp:[::1]:601"),
            Ok(SyslogAddress::Tcp("::1".into(), 601))
        );
        assert!(SyslogAddress::parse("udp:host").is_err());
        assert!(SyslogAddress::parse("unix:dev/log").is_err());
    }
}
